"""tinylm models in the Hugging Face `transformers` checkpoint format, both ways.

tinylm's model is one of two architectures that transformers loads, chosen by the config's switches:

* Llama (the default: model.pos=rope, norm=rmsnorm, mlp=swiglu, no biases) maps onto
  `LlamaForCausalLM`: the fused q/k/v projection splits into q_proj, k_proj, v_proj and the fused SwiGLU
  input into gate_proj and up_proj; biases, if a recipe turns them on, become attention_bias and mlp_bias.
* GPT-2 (pos=learned, norm=layernorm, mlp=gelu: token plus learned position embeddings, pre-LayerNorm
  blocks, GELU in its tanh form, what transformers calls "gelu_new") maps one to one onto
  `GPT2LMHeadModel`, with two differences of layout: GPT-2's linear layers are `Conv1D` modules whose
  weight is stored (in, out), the transpose of `nn.Linear`'s (out, in); and GPT-2 always has biases, so a
  model trained with `model.bias=false` is written with zero biases, which compute exactly what no
  biases compute.

* Llama with QK-norm (model.qk_norm=true, which the planner chooses) maps onto `Qwen3ForCausalLM`: Llama's
  tensors plus each layer's q_norm and k_norm gains.

Any other mix (ReLU squared, learned positions with RMSNorm, ...) is refused with the reason.

`architecture` and `to_hf` write the format (`tinylm export`); `read_pretrained` reads a GPT-2 or Llama
folder written by `save_pretrained` (config.json, model.safetensors or pytorch_model.bin, and a
tokenizer) back into a tinylm model config, state dict and tokenizer (`tinylm train --init_from`):
Llama-family models with grouped-query attention, a tied or untied head, any rope_theta, RMSNorm eps
and intermediate_size, tinylm's own exports among them. What tinylm's model cannot compute (rope
scaling, sliding windows, experts, ...) is refused with the reason. None of this needs `transformers`:
config.json is plain JSON and the weights are safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm.checkpoint import load_tensors
from tinylm.config import ModelConfig
from tinylm.errors import UserError, shown
from tinylm.hf_config import READERS, RELATIVES, WRITERS, refuse
from tinylm.tokenizer import EOT, TextTokenizer

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# One entry per tinylm tensor: (tinylm name, the Hugging Face names it becomes, transposed). Several
# names split the tensor by rows into equal parts (tinylm fuses q, k, v into one projection, and for
# SwiGLU gate and up into one); transposed marks GPT-2's Conv1D layers.
Names = list[tuple[str, tuple[str, ...], bool]]

# Per GPT-2 block: (tinylm module, GPT-2 module, GPT-2 stores the weight transposed because it is a Conv1D).
_GPT2_BLOCK = (
    ("norm1", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),  # queries, keys and values in one (C -> 3C) projection
    ("attn.proj", "attn.c_proj", True),
    ("norm2", "ln_2", False),
    ("mlp.fc", "mlp.c_fc", True),
    ("mlp.proj", "mlp.c_proj", True),
)


def gpt2_names(n_layer: int, tied: bool) -> Names:
    """Every GPT2LMHeadModel tensor, biases included (GPT-2 always has them)."""
    names: Names = [("tok_emb.weight", ("transformer.wte.weight",), False),
                    ("pos_emb.weight", ("transformer.wpe.weight",), False)]
    for i in range(n_layer):
        for ours, theirs, conv in _GPT2_BLOCK:
            names.append((f"blocks.{i}.{ours}.weight", (f"transformer.h.{i}.{theirs}.weight",), conv))
            names.append((f"blocks.{i}.{ours}.bias", (f"transformer.h.{i}.{theirs}.bias",), False))
    names += [("norm_f.weight", ("transformer.ln_f.weight",), False), ("norm_f.bias", ("transformer.ln_f.bias",), False)]
    if not tied:
        names.append(("head.weight", ("lm_head.weight",), False))
    return names


def llama_names(n_layer: int, tied: bool, bias: bool, qk_norm: bool = False) -> Names:
    """Every LlamaForCausalLM tensor; biases (attention_bias, mlp_bias) only if the model has them; with
    qk_norm, Qwen3ForCausalLM's (Llama's plus each layer's q_norm and k_norm gains)."""
    names: Names = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names.append((ours + "norm1.weight", (theirs + "input_layernorm.weight",), False))
        names.append((ours + "norm2.weight", (theirs + "post_attention_layernorm.weight",), False))
        if qk_norm:
            names.append((ours + "attn.q_norm.weight", (theirs + "self_attn.q_norm.weight",), False))
            names.append((ours + "attn.k_norm.weight", (theirs + "self_attn.k_norm.weight",), False))
        for p in ("weight", "bias") if bias else ("weight",):
            names.append((ours + f"attn.qkv.{p}", tuple(theirs + f"self_attn.{x}_proj.{p}" for x in "qkv"), False))
            names.append((ours + f"attn.proj.{p}", (theirs + f"self_attn.o_proj.{p}",), False))
            names.append((ours + f"mlp.fc.{p}", (theirs + f"mlp.gate_proj.{p}", theirs + f"mlp.up_proj.{p}"), False))
            names.append((ours + f"mlp.proj.{p}", (theirs + f"mlp.down_proj.{p}",), False))
    names.append(("norm_f.weight", ("model.norm.weight",), False))
    if not tied:
        names.append(("head.weight", ("lm_head.weight",), False))
    return names


# ---------------------------------------------------------------- which architecture

GPT2_SWITCHES = ("learned", "layernorm", "gelu")  # model.pos, model.norm, model.mlp
LLAMA_SWITCHES = ("rope", "rmsnorm", "swiglu")


def switches(m: ModelConfig) -> tuple[str, str, str]:
    return m.pos, m.norm, m.mlp


def architecture(m: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3' (Llama with QK-norm): the transformers architecture that computes exactly
    what m computes. A combination none can express is a UserError that says why."""
    have = switches(m)
    if m.qk_norm:  # Qwen3: Llama's blocks with an RMSNorm on each head's queries and keys before RoPE
        if have != LLAMA_SWITCHES:
            raise UserError("cannot export: model.qk_norm=true (RMSNorm on queries and keys) exists only in Qwen3, "
                            "whose other switches are Llama's (pos=rope, norm=rmsnorm, mlp=swiglu)")
        if m.bias:
            raise UserError("cannot export: model.qk_norm=true with model.bias=true; Qwen3 (the architecture with "
                            "QK-norm) has no biases in its MLP")
        return "qwen3"
    if have == GPT2_SWITCHES:
        if m.kv_heads != m.n_head:
            raise UserError(f"cannot export: model.n_kv_head={m.n_kv_head} (grouped-query attention) does not exist in "
                            "GPT2LMHeadModel; Llama (pos=rope, norm=rmsnorm, mlp=swiglu) has it")
        return "gpt2"
    if have == LLAMA_SWITCHES:
        return "llama"
    if have[2] == "relu2":
        raise UserError("cannot export: model.mlp=relu2 (ReLU squared) exists in neither GPT-2 (GELU) nor Llama (SwiGLU)")
    raise UserError(
        "cannot export: model.pos={}, model.norm={}, model.mlp={} mixes the two architectures transformers "
        "loads: GPT-2 is pos=learned, norm=layernorm, mlp=gelu; Llama is pos=rope, norm=rmsnorm, mlp=swiglu".format(*have)
    )


# ---------------------------------------------------------------- tinylm -> Hugging Face

def qkv_rows(m: ModelConfig) -> tuple[int, int, int]:
    """The rows of the fused qkv projection that are queries, keys and values."""
    kv = m.kv_heads * m.head_size
    return m.n_embd, kv, kv


def names_for(arch: str, m: ModelConfig) -> Names:
    if arch == "gpt2":
        return gpt2_names(m.n_layer, m.tie_embeddings)
    return llama_names(m.n_layer, m.tie_embeddings, m.bias, qk_norm=arch == "qwen3")


def to_hf(arch: str, m: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int,
          eot_id: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json contents, safetensors tensors) of the model in the given architecture.

    Fused tensors are split, GPT-2's Conv1D weights transposed, and biases GPT-2 needs but the model
    lacks (model.bias=false) written as zeros. A tied head is left out, as `save_pretrained` does:
    transformers ties it back on load."""
    config = WRITERS[arch](m, vocab_size, eot_id)
    tensors: dict[str, torch.Tensor] = {}
    for ours, theirs, conv in names_for(arch, m):
        t = state.get(ours)
        if t is None:  # model.bias=false exported as GPT-2: a zero bias as long as the layer's output
            t = torch.zeros(state[ours.replace(".bias", ".weight")].shape[0])
        # q, k and v: C, K and K rows (K = C / (n_head / n_kv_head)); gate and up: halves
        parts = t.split(qkv_rows(m)) if len(theirs) == 3 else t.chunk(len(theirs), dim=0)
        for name, part in zip(theirs, parts):
            tensors[name] = (part.t() if conv else part).detach().float().contiguous().clone()
    return config, tensors


# ---------------------------------------------------------------- Hugging Face folder -> tinylm


@dataclass
class Pretrained:
    """A Hugging Face checkpoint folder read into tinylm's terms."""

    folder: Path
    model: ModelConfig  # the folder's shape; block_size is its full context (n_positions)
    vocab_size: int
    state: dict[str, torch.Tensor]  # tinylm parameter names
    tokenizer: TextTokenizer

    def state_for(self, m: ModelConfig) -> dict[str, torch.Tensor]:
        """The state dict for a model with config m: the position table cut to m.block_size."""
        state = dict(self.state)
        if "pos_emb.weight" in state:
            state["pos_emb.weight"] = state["pos_emb.weight"][: m.block_size]
        return state

    def fit(self, m: ModelConfig) -> ModelConfig:
        """m with the folder's architecture, keeping m's block_size (up to the folder's) and dropout."""
        if m.block_size > self.model.block_size:
            raise UserError(
                f"model.block_size={m.block_size} exceeds the {self.model.block_size} positions of {self.folder}; "
                f"use --model.block_size={self.model.block_size} or less"
            )
        return dataclasses.replace(self.model, block_size=m.block_size, dropout=m.dropout)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model: model.safetensors (possibly sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
        if (folder / "pytorch_model.bin").is_file():
            return load_tensors(folder / "pytorch_model.bin", "cpu", "the weights")
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read the weights in {folder}: {shown(str(e).strip()) if str(e).strip() else type(e).__name__}") from None
    raise UserError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin)")


def read_tokenizer(folder: Path) -> TextTokenizer:
    """The folder's tokenizer: tokenizer.json, or GPT-2's vocab.json + merges.txt as byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens([EOT])  # already in GPT-2's vocabulary: this makes it never split
        else:
            raise UserError(f"{folder} holds no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read the tokenizer in {folder}: {str(e).strip().splitlines()[0]}") from None
    if tok.token_to_id(EOT) is None:
        raise UserError(f"the tokenizer in {folder} has no {EOT} token; only GPT-2-style tokenizers can be used")
    return TextTokenizer(tok)


def from_hf_state(tensors: dict[str, torch.Tensor], names: Names, folder: Path) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> tinylm state dict (split tensors joined, Conv1D weights transposed back)."""
    # GPT2Model checkpoints (the original openai-community/gpt2 files) lack the "transformer." prefix.
    named = {k if k.startswith(("transformer.", "lm_head.", "model.")) else f"transformer.{k}": v for k, v in tensors.items()}
    state = {}
    for ours, theirs, conv in names:
        missing = [name for name in theirs if name not in named]
        if missing:
            raise UserError(f"cannot import {folder}: its weights have no tensor {missing[0]}")
        t = torch.cat([named[name].t() if conv else named[name] for name in theirs], dim=0)
        state[ours] = t.float().contiguous()
    if "head.weight" not in state:  # tied: tinylm's state dict names the shared matrix twice
        state["head.weight"] = state["tok_emb.weight"]
    return state


def read_pretrained(folder: str | Path) -> Pretrained:
    """A GPT-2 or Llama checkpoint folder (as `save_pretrained` writes it) as a tinylm config, weights and
    tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"pretrained model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; pass a folder saved by transformers' save_pretrained")
    c = _read_json(folder / "config.json")
    if not isinstance(c, dict):
        raise UserError(f"{folder / 'config.json'} is not a model config (a JSON object)")
    kind = c.get("model_type")
    if kind not in ARCHITECTURES:
        why = f"; it has {RELATIVES[kind]}" if kind in RELATIVES else ""
        raise refuse(folder, f"model_type is {kind!r}{why}; tinylm imports GPT-2 (model_type 'gpt2'), Llama "
                             "('llama') and Qwen3 ('qwen3') checkpoints")
    m = READERS[kind](c, folder)
    names = names_for(kind, m)
    tensors = read_tensors(folder)
    if kind != "gpt2":  # a tensor with no place in the model (a bias config.json does not declare, ...)
        used = {name for _, theirs, _ in names for name in theirs}
        extra = sorted(k for k in tensors if k not in used and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise refuse(folder, f"its weights hold {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, "
                                 "which its config.json does not describe")
    state = from_hf_state(tensors, names, folder)
    tok = read_tokenizer(folder)
    vocab = c["vocab_size"]
    if tok.vocab_size > vocab:
        raise UserError(f"the tokenizer in {folder} has {tok.vocab_size} tokens but the model only {vocab}")
    return Pretrained(folder, m, vocab, state, tok)
