"""The model's anatomy: every learnable tensor, what kind it is, what it does, and how many there are.

Everything learnable in tinylm's model is a weight or a bias, as in the one-neuron y = w*x + b of
`docs/lesson.md`. This module says which, in the one place that `train` (the table it prints and logs),
`tinylm explain` (roles and the closed-form count), `tblog` (histograms grouped by kind) and `export`
(the parameter count) all read:

* kinds: `param_kind` sorts a tensor into embedding, weight, bias or norm gain; `param_group` is the
  plural TensorBoard files it under;
* the table: `parameter_table` lists every tensor once, `parameter_summary` totals them by kind,
  `format_parameter_table` writes the Markdown table;
* roles: `role` says in one line what a tensor does;
* the architecture line: `describe_architecture` names the switches a config chose;
* the formula: `parameter_formula` counts the same parameters from the config alone (no tensors), for
  any architecture option and for GPT-2 small and XL; `formula_text` writes it out.

Nothing here builds a model or imports torch: a table takes a model that exists already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tinylm.config import ModelConfig

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- kinds


@dataclass
class ParamRow:
    name: str  # e.g. "blocks.0.attn.qkv.weight"
    shape: tuple[int, ...]
    count: int
    kind: str  # "embedding", "weight", "bias" or "norm gain"


def param_kind(name: str, p: torch.Tensor) -> str:
    """'embedding', 'weight', 'bias' or 'norm gain': what a parameter tensor is, from its name and shape."""
    if name.endswith(".bias"):
        return "bias"
    if "emb" in name:
        return "embedding"
    if p.dim() == 1:
        return "norm gain"  # a norm's multiplier: a weight per channel, initialised to 1
    return "weight"


# TensorBoard groups tags by their first path component: one group per kind of parameter.
KIND_GROUPS = {"embedding": "embeddings", "weight": "weights", "bias": "biases", "norm gain": "norm_gains"}


def param_group(name: str, p: torch.Tensor) -> str:
    """The plural of a tensor's kind, as TensorBoard groups it: 'weights', 'biases', 'embeddings', 'norm_gains'."""
    return KIND_GROUPS[param_kind(name, p)]


# ---------------------------------------------------------------- the table


def parameter_table(model: torch.nn.Module) -> list[ParamRow]:
    """Every learnable tensor once (a tied head is not counted twice)."""
    return [ParamRow(n, tuple(p.shape), p.numel(), param_kind(n, p)) for n, p in model.named_parameters()]


def parameter_summary(rows: list[ParamRow]) -> dict[str, int]:
    """Totals by kind; 'weights' counts every multiplier (matrices, embeddings, norm gains)."""
    by = {k: sum(r.count for r in rows if r.kind == k) for k in KIND_GROUPS}
    return {
        "total": sum(r.count for r in rows),
        "embedding": by["embedding"],
        "non_embedding": sum(r.count for r in rows) - by["embedding"],
        "weights": by["embedding"] + by["weight"] + by["norm gain"],
        "biases": by["bias"],
        **{f"kind:{k}": v for k, v in by.items()},
    }


def display_name(name: str, n_layer: int) -> str | None:
    """The name as the parameter table shows it: block 0 stands for all blocks, the others are skipped."""
    if not name.startswith("blocks."):
        return name
    if not name.startswith("blocks.0."):
        return None
    return name.replace("blocks.0.", f"blocks.[0-{n_layer - 1}]." if n_layer > 1 else "blocks.0.")


def format_parameter_table(rows: list[ParamRow], n_layer: int, tied: bool) -> str:
    """A Markdown table: one block shown in full (all blocks are alike), then the totals."""
    lines = ["| parameter | shape | count | kind |", "|---|---|---:|---|"]
    for r in rows:
        name = display_name(r.name, n_layer)
        if name is None:
            continue
        each = f" (x{n_layer} = {r.count * n_layer:,})" if r.name.startswith("blocks.") and n_layer > 1 else ""
        lines.append(f"| {name} | {'x'.join(map(str, r.shape))} | {r.count:,}{each} | {r.kind} |")
    if tied:
        lines.append("| head.weight | tied to tok_emb.weight | 0 (shared) | embedding |")
    s = parameter_summary(rows)
    lines += [
        "",
        f"total {s['total']:,} = weights {s['weights']:,} + biases {s['biases']:,}",
        f"embeddings {s['embedding']:,}, everything else {s['non_embedding']:,}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- roles

# What each layer does, by the end of its name: (its title, what its weights do). Biases and norm gains
# are described through their layer; a name not listed here gets the line for its kind.
LAYER_ROLES = {
    "tok_emb": ("token embeddings", "row i is token i's vector, like the lesson's \"cat\" -> [0.25, -0.1, ...]"),
    "pos_emb": ("position embeddings", "row t is added to the vector of the token at position t"),
    "attn.qkv": ("attention in", "turns each token's vector into a query, a key and a value"),
    "attn.proj": ("attention out", "mixes the heads' results back into the token's vector"),
    "mlp.fc": ("MLP in", "widens each token's vector from {in} to {out} numbers, before the activation"),
    "mlp.proj": ("MLP out", "brings the activated vector from {in} numbers back to {out}"),
    "norm1": ("norm before attention", "rescales each token's vector to a standard size"),
    "norm2": ("norm before the MLP", "rescales each token's vector to a standard size"),
    "norm_f": ("final norm", "rescales each token's vector before the output head"),
    "head": ("output head", "one row per token, scoring every token as the next one"),
}
KIND_ROLES = {
    "embedding": "a table of learned vectors, one row per id",
    "weight": "a weight matrix: row i holds the w's of output neuron i",
    "bias": "one b per output, added after the weights (the b in y = w*x + b)",
    "norm gain": "one multiplier per channel, applied after normalising",
}


def role(row: ParamRow, tied: bool = False) -> str:
    """One line on what a parameter tensor does."""
    layer = row.name.removesuffix(".weight").removesuffix(".bias")
    short = layer.split(".", 2)[2] if layer.startswith("blocks.") and layer.count(".") >= 2 else layer
    known = next((v for key, v in LAYER_ROLES.items() if short == key or short.endswith("." + key)), None)
    if known is None:
        return KIND_ROLES.get(row.kind, "a learned tensor")
    title, does = known
    if row.kind == "bias":
        after = "one offset per channel, after the gain" if "norm" in title else "one b per output, after the weights"
        return f"{title}: {after} (the b in y = w*x + b)"
    if row.kind == "norm gain":
        return f"{title}: one multiplier per channel (starts at 1)"
    if len(row.shape) == 2:  # a Linear weight is (out, in)
        does = does.format(out=row.shape[0], **{"in": row.shape[1]})
    return f"{title}: {does}" + ("; also the output head (tied)" if short == "tok_emb" and tied else "")


# ---------------------------------------------------------------- the architecture line


def describe_architecture(cfg: ModelConfig) -> str:
    """One line naming the architecture switches, saying plainly whether the model has biases."""
    parts = [
        "learned positions" if cfg.pos == "learned" else f"rotary positions (theta {cfg.rope_theta:g})",
        "LayerNorm" if cfg.norm == "layernorm" else "RMSNorm",
        {"gelu": "GELU", "relu2": "ReLU-squared", "swiglu": "SwiGLU"}[cfg.mlp] + f" MLP ({cfg.mlp_width} wide)",
        *(["QK-norm"] if cfg.qk_norm else []),
        *([f"grouped-query attention ({cfg.kv_heads} key/value head{'s' if cfg.kv_heads > 1 else ''} for "
           f"{cfg.n_head} query heads)"]
          if cfg.kv_heads != cfg.n_head else []),
        "head tied to the token embedding" if cfg.tie_embeddings else "untied head",
        *(["output projections started at zero"] if cfg.zero_init else []),
    ]
    if cfg.bias:
        bias = "with biases: model.bias=true" + (" (RMSNorm itself has none)" if cfg.norm == "rmsnorm" else "")
    else:
        bias = "no biases: model.bias=false, every layer computes y = w*x (model.bias=true adds the b back)"
    return f"architecture: {', '.join(parts)}; {bias}"


# ---------------------------------------------------------------- the formula

# GPT-2's architectural choices: the GPT-2 rows of `tinylm explain` count GPT-2's own architecture,
# whatever the default recipe chooses.
GPT2_CHOICES = {"bias": True, "tie_embeddings": True, "pos": "learned", "norm": "layernorm", "mlp": "gelu",
                "mlp_hidden": 0, "qk_norm": False}


def gpt2_config(**fields) -> ModelConfig:
    """A ModelConfig with GPT-2's architecture; `fields` (shape, bias, tie_embeddings) override."""
    return ModelConfig(**{**GPT2_CHOICES, **fields})


GPT2_VOCAB = 50257
GPT2_SMALL = gpt2_config(n_layer=12, n_head=12, n_embd=768, block_size=1024)
GPT2_XL = gpt2_config(n_layer=48, n_head=25, n_embd=1600, block_size=1024)


def parameter_formula(cfg: ModelConfig, vocab_size: int) -> int:
    """The parameter count of tinylm's GPT in closed form, for any of its architecture options
    (V vocab, T context, C width, L layers, H the MLP's hidden width, hs = C / n_head, K = n_kv_head * hs
    the width of the keys and of the values: C unless grouped-query attention shares them).

    token embeddings V*C, learned positions T*C (rotary ones have none); per block: attention qkv
    C*(C + 2K) (3C^2 when K = C) and proj C^2, an MLP of fc C*H (2*C*H for SwiGLU's gate and up) and proj
    H*C, two norms of C gains each, QK-norm 2*hs; the final norm C; with biases every Linear adds one per
    output and a LayerNorm one per channel; an untied output head another V*C. GPT-2 (H = 4C, biases)
    makes a block 12C^2 + 13C.
    """
    V, T, C, L, H = vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.mlp_width
    K = cfg.kv_heads * cfg.head_size
    fc_out = 2 * H if cfg.mlp == "swiglu" else H
    norm = 2 * C if cfg.norm == "layernorm" and cfg.bias else C
    block = (2 * C + 2 * K) * C + (fc_out + H) * C + 2 * norm + (2 * cfg.head_size if cfg.qk_norm else 0)
    if cfg.bias:
        block += 2 * C + 2 * K + fc_out + C  # qkv C + 2K and proj C; the MLP's fc and proj
    positions = T * C if cfg.pos == "learned" else 0
    return V * C + positions + L * block + norm + (0 if cfg.tie_embeddings else V * C)


def formula_text(cfg: ModelConfig) -> tuple[str, str]:
    """The formula for this architecture, and its per-block terms spelled out."""
    C, H, K = cfg.n_embd, cfg.mlp_width, cfg.kv_heads * cfg.head_size
    gqa = K != C  # grouped-query attention: keys and values narrower than the queries
    up = 2 if cfg.mlp == "swiglu" else 1  # fc's outputs per hidden unit
    norm_c = 2 if cfg.norm == "layernorm" and cfg.bias else 1
    c2, ch, h, c = (2 if gqa else 4), 0, 0, 2 * norm_c  # coefficients of C^2, C*H, H and C in one block
    if H == 4 * C:
        c2 += 4 * (up + 1)
    else:
        ch = up + 1
    if cfg.bias:
        c += (2 if gqa else 4) + 1
        if H == 4 * C:
            c += 4 * up
        else:
            h = up
    terms = [f"{c2}*C^2", "2*C*K" if gqa else "", f"{ch}*C*H" if ch else "", f"{h}*H" if h else "", f"{c}*C",
             "2*K" if gqa and cfg.bias else "", "2*hs" if cfg.qk_norm else ""]
    formula = ("P = V*C" + (" + T*C" if cfg.pos == "learned" else "") + f" + L*({' + '.join(t for t in terms if t)})"
               + f" + {'2*C' if norm_c == 2 else 'C'}" + ("" if cfg.tie_embeddings else " + V*C"))
    where = ([f"H = {H} (the MLP's width)"] if H != 4 * C else []) + (
        [f"K = {K} (n_kv_head x hs = {cfg.kv_heads} x {cfg.head_size}: the width of the keys and of the values)"]
        if gqa else [])
    if where:
        formula += ", with " + " and ".join(where)
    if H == 4 * C:
        fc, proj, mlp = f"{4 * up}*C^2", "4*C^2", f"{4 * (up + 1)}*C^2"
    else:
        fc, proj, mlp = (f"{up}*C*H" if up > 1 else "C*H"), "H*C", f"{up + 1}*C*H"
    attention = "2*C^2 + 2*C*K (q C^2, k and v C*K each, proj C^2)" if gqa else "4*C^2 (qkv 3*C^2, proj C^2)"
    per_block = (f"per block: attention {attention}, MLP {mlp} (fc {fc}"
                 + (": gate and up" if up == 2 else "") + f", proj {proj}), norms 2*C"
                 + (", QK-norm 2*hs" if cfg.qk_norm else "")
                 + (f", biases {c - 2}*C" + (" + 2*K" if gqa else "") + (f" + {h}*H" if h else "") if cfg.bias else ""))
    return formula, per_block
