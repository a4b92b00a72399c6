"""The language model: token ids -> embeddings -> transformer blocks -> logits -> next-token loss.

A decoder-only transformer: token embedding, `n_layer` pre-norm blocks of causal self-attention and
an MLP, a final norm, and an output head that by default shares the token embedding matrix.
Everything learnable is a weight or a bias, exactly as in the one-neuron y = w*x + b:
`tinylm.anatomy.parameter_table` lists every tensor and says which it is.

Config switches choose between the two families this file implements:

    GPT-2 (nanoGPT):  pos=learned  norm=layernorm  mlp=gelu    bias=true
    Llama:            pos=rope     norm=rmsnorm    mlp=swiglu  bias=false

The Llama options follow Hugging Face's `LlamaForCausalLM` exactly (RoPE with `rotate_half`, RMSNorm
with an eps, SwiGLU = down(silu(gate(x)) * up(x)), grouped-query attention with model.n_kv_head), so
such a model can be exported as one: `qkv` holds q_proj, k_proj, v_proj stacked by rows, and `mlp.fc`
holds gate_proj then up_proj.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.config import ModelConfig


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, so each new token costs the same.

    Pre-allocated for `max_len` positions of `n_kv_head` heads (with grouped-query attention fewer than
    the query heads: the cache shrinks by the same factor); `length` is how many are filled.
    `GPT.forward` writes the new tokens' keys and values at `length`, attends over everything up to
    them, then advances `length`.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_size: int, device, dtype):
        shape = (n_layer, batch, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """LayerNorm (subtract the mean, divide by the spread, then gain and bias) or RMSNorm (divide by the
    root mean square, then gain: no mean, no bias)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, each (length, hs), in Hugging Face's layout:
    frequency i = theta^(-2i/hs) for i < hs/2, repeated for the second half of the head."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # float64: exact angles
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels (i, i + hs/2) by each position's angles: a query and a key then meet
    with a dot product that depends only on how far apart they are. x is (B, heads, T, hs), cos and
    sin (T, hs)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# F.scaled_dot_product_attention shares each key/value head among its group of query heads itself
# (enable_gqa) from torch 2.5; before that the keys and values are repeated to one per query head.
SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Keys or values (B, n_kv_head, T, hs) repeated to (B, n_head, T, hs): query head i reads kv head
    i // (n_head / n_kv_head), as in Llama (and transformers' repeat_kv)."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


class CausalSelfAttention(nn.Module):
    """Each token mixes in the value vectors of earlier tokens, weighted by query-key similarity.

    `qkv` computes queries (n_head heads), keys and values (n_kv_head heads each) in one matrix
    product; with grouped-query attention (n_kv_head < n_head) a group of query heads shares one key
    and value head. `project` gives the queries, keys and values as attention uses them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.kv_heads, cfg.head_size
        kv_width = self.n_kv_head * self.head_size
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_width, bias=cfg.bias)  # queries, keys, values in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # heads back into the residual stream
        self.q_norm = nn.RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        # Dropout on the attention's output only, not on its weights: PyTorch's
        # CPU attention kernel cannot drop weights, so dropout_p > 0 falls back to the unfused kernel and
        # cost a 3-layer 128-wide step a third of its speed (37.0k -> 24.7k tokens/s; this dropout: 33.3k).
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cpu_attention_fp32 = True  # under bfloat16 autocast on a CPU: attention in float32 (see forward)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, n_kv_head, T, hs) of x (B, T, C): queries and keys
        normed (qk_norm) and rotated (rope) as attention compares them."""
        B, T, C = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split((C, self.n_kv_head * hs, self.n_kv_head * hs), dim=-1)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)
        if self.q_norm is not None:  # in float32 (under autocast q and k arrive in 16 bits), as Qwen3 does
            q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x, rope)
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, past + T, hs)
            if past:  # new queries see every cached key and the new keys up to their own position
                causal = False
                if T > 1:  # (a single new token sees everything: no mask needed)
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        gqa = {}
        if self.n_kv_head != self.n_head:
            if SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = expand_kv(k, self.n_head), expand_kv(v, self.n_head)
        dtype = q.dtype
        cpu_bf16 = self.cpu_attention_fp32 and q.device.type == "cpu" and q.dtype == torch.bfloat16
        if cpu_bf16:
            # On many CPUs PyTorch's attention kernel is faster in float32 than in bfloat16 (its bf16 backward
            # 1.5-5x slower at small shapes); where so, attention runs in float32, outside autocast (which
            # would cast it back), and only the weight matrix products in bfloat16. Which is faster depends on
            # the CPU and the shape: tinylm/probe.py's choose_attention times both and sets this.
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_bf16 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, **gqa
            ).to(dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, in its tanh form (what transformers calls "gelu_new")."""
    return F.gelu(x, approximate="tanh")


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


# The MLP's activation for each model.mlp (`tinylm explain` prints the model's own from here). For
# swiglu it is SiLU, x * sigmoid(x), applied to the gate half and multiplied by the up half.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_tanh, "relu2": relu_squared, "swiglu": F.silu,
}


class MLP(nn.Module):
    """Per-token feed-forward network: widen, a nonlinearity, project back.

    gelu: GPT-2's tanh-GELU. relu2: ReLU squared. swiglu: silu(gate) * up, where `fc` computes gate and
    up in one matmul (its rows are gate_proj then up_proj in Hugging Face's naming).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.act = ACTIVATIONS[cfg.mlp]
        self.fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.mlp_width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)  # token id -> vector: docs/lesson.md's "cat" -> [0.25, -0.1, ...]
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)  # position 0..block_size-1 -> vector
        else:  # rotary: positions rotate queries and keys inside attention; nothing to learn
            cos, sin = rope_tables(cfg.head_size, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never saved
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)  # vector -> one score (logit) per token
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # reading and writing tokens share one matrix (GPT-2)
        self.apply(self._init)
        # GPT-2: scale the layers that write into the residual stream by 1/sqrt(2 * n_layer), so its
        # variance does not grow with depth. zero_init starts them (and an untied head) at zero: their
        # gradients are not zero (their inputs are not), so they move from the first step, and the layers
        # before them from the second.
        for name, p in self.named_parameters():
            if cfg.zero_init and (name.endswith("proj.weight") or name == "head.weight" and not cfg.tie_embeddings):
                nn.init.zeros_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given."""
        x, rope = self.embed(idx, cache.length if cache is not None else 0)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += idx.size(1)
        logits = self.head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            # The next-token loss: -log p(correct next token), averaged; float32 for a precise softmax.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def embed(self, idx: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token vectors (B, T, C) of idx at positions start.., and RoPE's (cos, sin) tables for them (None
        with learned positions, which are added to the vectors instead)."""
        T = idx.size(1)
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.pos == "learned":
            return x + self.pos_emb(torch.arange(start, start + T, device=idx.device)), None
        # (T, hs) each: one angle per position and channel, the same for queries, keys and heads
        return x, (self.rope_cos[start : start + T], self.rope_sin[start : start + T])

    def new_cache(self, batch: int = 1) -> KVCache:
        p = self.head.weight
        c = self.cfg
        return KVCache(c.n_layer, batch, c.kv_heads, c.block_size, c.head_size, p.device, p.dtype)



def fused_rows(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weight matrices that stack several layers' matrices by rows, and each one's rows, by parameter
    name: attention's qkv (queries, keys, values) and a gated MLP's fc (gate, up). One matrix product
    computes them all; Muon (tinylm/optim.py) still orthogonalises each on its own, as separate layers."""
    rows = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, CausalSelfAttention):
            kv_width = module.n_kv_head * module.head_size
            rows[f"{prefix}qkv.weight"] = (module.n_head * module.head_size, kv_width, kv_width)
        elif isinstance(module, MLP) and module.gated:
            rows[f"{prefix}fc.weight"] = (module.proj.in_features,) * 2
    return rows


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention probabilities for idx (B, T), each (B, n_head, T, T): row t is how much
    token t reads each earlier token, softmax(q k^T / sqrt(hs)) under the causal mask.

    F.scaled_dot_product_attention never returns these weights, so they are recomputed here from the
    queries and keys each block projects (normed and rotated as attention uses them; a shared key head
    of grouped-query attention serves each of its query heads), in float32, while the blocks run."""
    x, rope = model.embed(idx)
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    maps = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, _ = attn.project(block.norm1(x), rope)
        scores = q.float() @ expand_kv(k, attn.n_head).float().mT / math.sqrt(attn.head_size)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1))
        x = block(x, rope, None, i)
    return maps


# Which settings shape each tensor, by the start of its name (the first that matches): what a checkpoint
# whose tensors do not fit a model must have been trained with otherwise.
SHAPED_BY = {"pos_emb": "model.pos or model.block_size", "attn.qkv": "model.n_head or model.n_kv_head",
             "mlp": "model.mlp or model.mlp_hidden", "": "model.n_embd"}


def explain_mismatch(now: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], m: ModelConfig) -> str:
    """Which model setting makes a checkpoint's tensors (`saved`) differ from those of a model built under
    m (`now`), in words; "" if they do not differ."""
    blocks = len({k.split(".")[1] for k in saved if k.startswith("blocks.")})
    if blocks != m.n_layer:
        return f"model.n_layer is {m.n_layer}, but the checkpoint holds {blocks} block{'s' * (blocks != 1)}"
    width = saved["tok_emb.weight"].shape[1] if "tok_emb.weight" in saved else m.n_embd
    if width != m.n_embd:
        return f"model.n_embd is {m.n_embd}, but the checkpoint's embeddings are {width} wide"
    for name in sorted(set(now) ^ set(saved)):
        what = "model.pos" if name.startswith("pos_emb") else "model.bias or model.norm" if name.endswith(".bias") else ""
        held = "holds" if name in saved else "lacks"
        return f"the checkpoint {held} {name}{f' ({what} differs)' if what else ''}"
    for name in now:
        if now[name].shape != saved[name].shape:
            what = next(setting for part, setting in SHAPED_BY.items() if part in name)
            return (f"{name} is {tuple(saved[name].shape)} in the checkpoint and {tuple(now[name].shape)} under these "
                    f"settings ({what} differs)")
    return ""
