"""config.json of the architectures tinylm exchanges with Hugging Face `transformers`, both ways:
written from a tinylm model config (`gpt2_config_json`, `llama_config_json`, `qwen3_config_json`) and read back into one
(`gpt2_model`, `llama_model`, `qwen3_model`), with what tinylm's model cannot compute refused, saying why. By hand,
as plain JSON: no transformers needed. tinylm/hf.py moves the tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tinylm.config import ModelConfig
from tinylm.errors import UserError

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, and GPT-2's


# ---------------------------------------------------------------- tinylm -> config.json


def gpt2_config_json(m: ModelConfig, vocab_size: int, eot_id: int) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel with tinylm's shape (written by hand: no transformers needed)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": m.mlp_width,
        "activation_function": "gelu_new",  # GELU, tanh approximation: F.gelu(x, approximate="tanh")
        "layer_norm_epsilon": m.norm_eps,
        "initializer_range": 0.02,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": 0.0,  # tinylm drops no attention weights (tinylm/model.py)
        "scale_attn_weights": True,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def llama_config_json(m: ModelConfig, vocab_size: int, eot_id: int) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM: rotary positions, RMSNorm, SwiGLU, grouped-query attention when
    model.n_kv_head is below model.n_head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.mlp_width,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": 0.0,  # tinylm drops no attention weights; Llama has no other dropout to carry it
        "initializer_range": 0.02,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def qwen3_config_json(m: ModelConfig, vocab_size: int, eot_id: int) -> dict[str, Any]:
    """config.json of a Qwen3ForCausalLM: Llama's (rotary positions, RMSNorm, SwiGLU, grouped-query
    attention) with an RMSNorm on each head's queries and keys, no sliding window."""
    config = llama_config_json(m, vocab_size, eot_id)
    del config["mlp_bias"]  # Qwen3's MLP has none (hf.architecture refuses model.bias with qk_norm)
    return {**config, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
            "sliding_window": None}


# ---------------------------------------------------------------- config.json -> tinylm


def _whole_numbers(c: dict[str, Any], keys: tuple[str, ...], folder: Path) -> None:
    for key in keys:
        if not isinstance(c.get(key), int) or isinstance(c.get(key), bool) or c[key] <= 0:
            raise UserError(f"{folder / 'config.json'} has no valid {key} (a positive whole number)")


def refuse(folder: Path, why: str) -> UserError:
    return UserError(f"cannot import {folder}: {why}")


def gpt2_model(c: dict[str, Any], folder: Path) -> ModelConfig:
    """A GPT-2 config.json as tinylm's model config; variants whose computation tinylm's blocks do not
    reproduce are refused."""
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise refuse(folder, f"activation_function is {c['activation_function']!r}; tinylm's MLP uses GELU's tanh form (gelu_new)")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse(folder, "its attention scaling differs from 1/sqrt(head size)")
    if c.get("add_cross_attention", False):
        raise refuse(folder, "it has cross-attention (an encoder-decoder model)")
    _whole_numbers(c, ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"), folder)
    tied = bool(c.get("tie_word_embeddings", True))
    m = ModelConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["n_positions"],
                    bias=True, dropout=0.0, tie_embeddings=tied, pos="learned", norm="layernorm", mlp="gelu",
                    mlp_hidden=c.get("n_inner") or 0, norm_eps=c.get("layer_norm_epsilon", LAYER_NORM_EPS), qk_norm=False)
    return m


# Llama's relatives that transformers gives their own model_type, and what in each tinylm cannot express.
RELATIVES = {
    "mistral": "Mistral's sliding-window attention", "mixtral": "a mixture of experts (Mixtral)",
    "qwen2": "Qwen2's biases on q, k and v but not on the output projection",
    "gemma": "Gemma's scaled embeddings and GELU MLP", "gemma2": "Gemma 2's soft-capping and sliding windows",
    "phi3": "Phi-3's fused projections and rope scaling",
}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _llama_rope_theta(c: dict[str, Any], folder: Path) -> float:
    """RoPE's base from config.json, written as transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters) writes it; a rotary variant other than the plain one is refused."""
    params, scaling = c.get("rope_parameters") or {}, c.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict) or any(isinstance(v, dict) for v in params.values()):
        raise refuse(folder, "its rotary settings differ between layers; tinylm rotates every layer alike")
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise refuse(folder, f"it scales its rotary positions ({kind!r} rope scaling, for contexts longer than it was "
                              "trained on); tinylm's RoPE is the plain one")
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise UserError(f"{folder / 'config.json'} has no valid rope_theta (a positive number)")
    return float(theta)


def llama_model(c: dict[str, Any], folder: Path) -> ModelConfig:
    """A LlamaForCausalLM config.json as tinylm's model config. What tinylm's model cannot compute is
    refused with the reason: rope scaling, sliding windows, experts, biases on some layers only, a
    head_dim other than hidden_size / num_attention_heads, an activation other than SiLU."""
    _whole_numbers(c, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "vocab_size"), folder)
    C, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    if c.get("hidden_act", "silu") != "silu":
        raise refuse(folder, f"hidden_act is {c['hidden_act']!r}; Llama's (and tinylm's) SwiGLU gates with silu")
    if C % heads or not isinstance(kv, int) or heads % kv:
        raise refuse(folder, f"{heads} attention heads do not divide hidden_size {C}, or {kv} key/value heads "
                              f"do not divide the {heads} heads")
    if c.get("head_dim") not in (None, C // heads):
        raise refuse(folder, f"head_dim is {c['head_dim']}, not hidden_size / num_attention_heads = {C // heads}; "
                              "tinylm's heads split the width evenly")
    if (C // heads) % 2:
        raise refuse(folder, f"its head size {C // heads} is odd; rotary positions rotate pairs of channels")
    if c.get("sliding_window"):
        raise refuse(folder, f"it attends over a sliding window of {c['sliding_window']} tokens; tinylm's attention sees the whole context")
    if any(c.get(key) for key in MOE_KEYS):
        raise refuse(folder, "it is a mixture of experts; tinylm's blocks have one MLP each")
    if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
        raise refuse(folder, "it has biases in its attention or in its MLP but not both; tinylm's model.bias "
                              "puts them in every layer or none")
    bias, tied = bool(c.get("attention_bias", False)), bool(c.get("tie_word_embeddings", False))
    m = ModelConfig(n_layer=c["num_hidden_layers"], n_head=heads, n_kv_head=0 if kv == heads else kv, n_embd=C,
                    block_size=c["max_position_embeddings"], bias=bias, dropout=0.0, tie_embeddings=tied, pos="rope",
                    rope_theta=_llama_rope_theta(c, folder), norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                    mlp="swiglu", mlp_hidden=c["intermediate_size"], qk_norm=False)
    return m


def qwen3_model(c: dict[str, Any], folder: Path) -> ModelConfig:
    """A Qwen3ForCausalLM config.json as tinylm's model config: Llama's reading (the same refusals: a head_dim
    other than hidden_size / num_attention_heads, as most released Qwen3 sizes have, rope scaling, ...) with
    QK-norm, and without a sliding window."""
    if c.get("use_sliding_window"):
        raise refuse(folder, f"it attends over a sliding window of {c.get('sliding_window')} tokens; tinylm's attention "
                             "sees the whole context")
    return dataclasses.replace(llama_model({**c, "sliding_window": None}, folder), qk_norm=True)


# Each architecture's config.json writer and reader, by model_type.
WRITERS = {"gpt2": gpt2_config_json, "llama": llama_config_json, "qwen3": qwen3_config_json}
READERS = {"gpt2": gpt2_model, "llama": llama_model, "qwen3": qwen3_model}
