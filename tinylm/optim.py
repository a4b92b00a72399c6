"""Muon: orthogonalised momentum for weight matrices, with AdamW for everything else, in one optimizer.

AdamW moves each number by its own normalised gradient. Muon (Keller Jordan, 2024) moves a whole
weight matrix at once: it takes the momentum of the matrix's gradient, G = U S V^T, and replaces it by
U V^T, the nearest matrix whose singular values are all 1, so every direction the gradient points to
moves at the same rate instead of a few dominant ones taking over. A few Newton-Schulz iterations
compute U V^T approximately using only matrix products (no SVD), so it is cheap next to a training step.

Muon suits the hidden weight matrices (attention and MLP inside the blocks). Embeddings, the output
head, biases and norm gains keep AdamW, as in the reference implementation. A matrix that stacks several
layers' (attention's queries, keys and values; SwiGLU's gate and up) is orthogonalised layer by layer, as
if they were apart (a group's `rows`): on tiny Shakespeare's characters (3 layers, 128 wide, 1,000 steps)
that took the validation loss from 1.5481 to 1.5289. Both kinds live in one
`torch.optim.Optimizer` (param groups with `muon: True` or not), so training code steps, zeroes, saves
and restores it like any other optimizer.

    from tinylm.optim import Muon
    opt = Muon([{"params": matrices, "muon": True, "lr_scale": 10.0}, {"params": rest}], lr=2e-3)

Below Muon: what a training run makes of it. `make_optimizer` builds a run's optimizer from its config
(`describe_optimizer` says in words which tensors it moves how), and the learning-rate schedule is a pure
function of the step and the elapsed time (`learning_rate`, `progress`), so a resumed run continues it.
Gradient descent is the seed's w_new = w - lr * dL/dw, for millions of weights at once. Weight decay (a
pull of every weight towards zero) applies to weight matrices and embeddings only: biases and norm gains
are left undecayed, as GPT-2 and nanoGPT do, since shrinking an offset or a per-channel scale towards
zero does not make the model simpler.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict

import torch

from tinylm.config import TrainConfig
from tinylm.model import fused_rows

# Coefficients of the quintic iteration x <- a x + b (x x^T) x + c (x x^T)^2 x from Keller Jordan's Muon:
# chosen to push every singular value in (0, 1] towards 1 as fast as possible in five steps (they end
# between about 0.7 and 1.2, which trains as well as exact orthogonalisation).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """About U V^T for g = U S V^T (the last two dimensions; leading ones are a batch), by Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    # Singular values at most 1, in g's own precision first: a float16 copy of the raw momentum would
    # round its many tiny entries to zero (float16 has no numbers below 6e-8); normalised, none is tiny.
    x = (g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix x x^T
        x = x.mT
    shape, x = x.shape, x.reshape(-1, *x.shape[-2:])  # one batch dimension, for baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        # a x + (b gram + c gram^2) x, with the scalings and sums done inside the matrix products
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(shape)
    return x if wide else x.mT


def _find_functional_adamw():
    """torch's functional AdamW, `torch.optim.adamw.adamw(params, grads, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, state_steps, ...)`, if this torch has it with the arguments adamw_step passes."""
    try:
        from torch.optim.adamw import adamw
        names = inspect.signature(adamw).parameters
    except (ImportError, TypeError, ValueError):
        return None
    needed = {"foreach", "fused", "amsgrad", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize"}
    return adamw if needed <= names.keys() else None


_functional_adamw = _find_functional_adamw()


def adamw_step(params: list[torch.Tensor], states: dict, group: dict, fused: bool | None = None) -> None:
    """Exactly torch.optim.AdamW's step for `params` (each with a gradient), with group's lr, betas,
    eps and weight_decay, and each parameter's AdamW state (step, exp_avg, exp_avg_sq: the names
    AdamW's own state_dict uses) kept in `states[p]`, created on first use and updated in place.

    Why it is needed: Muon's AdamW part must be torch's AdamW, its fused and foreach kernels included,
    while the state lives in Muon's own, so that one optimizer steps, saves and restores everything.
    What it relies on: `torch.optim.adamw.adamw`, the functional form that torch.optim.AdamW itself
    calls. It is not documented as public, and its arguments have grown across releases (has_complex,
    grad_scale, found_inf), so `_find_functional_adamw` checks at import that it takes ours by name.
    If a release removes or changes it: the step goes through a torch.optim.AdamW made over the same
    parameters and handed the same state dicts (its public per-parameter state), which computes the
    same numbers for a little more Python per step (tests/test_optim.py checks both ways).
    """
    for p in params:
        state = states[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    foreach = None if fused else True
    if _functional_adamw is None:
        adamw = torch.optim.AdamW(params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                  weight_decay=group["weight_decay"], foreach=foreach, fused=fused)
        adamw.state.update({p: states[p] for p in params})  # the same dicts: AdamW updates them in place
        adamw.step()
        return
    beta1, beta2 = group["betas"]
    _functional_adamw(
        params, [p.grad for p in params],
        [states[p]["exp_avg"] for p in params], [states[p]["exp_avg_sq"] for p in params], [],
        [states[p]["step"] for p in params],
        foreach=foreach, fused=fused,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=False,
    )


class Muon(torch.optim.Optimizer):
    """Muon for param groups with `muon=True` (2-D matrices), AdamW for the other groups.

    Every group's `lr` is the schedule's learning rate (what a training loop sets each step). A Muon
    group moves by `lr * lr_scale` (so its peak rate can differ from AdamW's while following the same
    warmup and decay), times sqrt(max(1, rows/cols)) so tall matrices get updates of the same scale.
    Weight decay is decoupled and shrinks a weight by `lr * weight_decay` per step in both kinds, as
    AdamW does. `ns_dtype` is the precision of the Newton-Schulz products (bfloat16 where it is fast).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, lr_scale: float = 1.0,
                 ns_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        lr_scale=lr_scale, muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")
        self.ns_dtype = ns_dtype
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta, lr = group["momentum"], group["lr"]
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        # Updates counted per tensor, as AdamW counts them (a skipped step is visible in the state).
        torch._foreach_add_([self.state[p].setdefault("step", torch.tensor(0.0)) for p in params], 1.0)
        torch._foreach_lerp_(bufs, grads, 1 - beta)  # momentum: buf = beta * buf + (1 - beta) * grad
        nesterov = torch._foreach_lerp(grads, bufs, beta)  # look ahead: grad + beta * (buf - grad)
        # A matrix that stacks several layers' (group["rows"]) is orthogonalised part by part, as they would
        # be apart; parts of one shape together, as a batch: fewer, larger matrix products.
        rows = dict(zip(map(id, group["params"]), group.get("rows") or [None] * len(group["params"])))
        parts = [m.split(list(rows[id(p)] or [len(p)])) for p, m in zip(params, nesterov)]
        by_shape: dict[torch.Size, list[tuple[int, int]]] = defaultdict(list)
        for i, pieces in enumerate(parts):
            for j, piece in enumerate(pieces):
                by_shape[piece.shape].append((i, j))
        updates = [list(pieces) for pieces in parts]
        for shape, where in by_shape.items():
            done = orthogonalize(torch.stack([parts[i][j] for i, j in where]), dtype=self.ns_dtype)
            done = done * max(1.0, shape[0] / shape[1]) ** 0.5  # tall parts: updates of the same scale
            for (i, j), update in zip(where, done.unbind(0)):
                updates[i][j] = update
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, [torch.cat(u).to(p.dtype) for p, u in zip(params, updates)],
                            alpha=-lr * group["lr_scale"])

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        adamw_step(params, self.state, group, self.fused)


# ---------------------------------------------------------------- a run's optimizer and schedule


def make_optimizer(
    model: torch.nn.Module, t: TrainConfig, device: torch.device, dtype: torch.dtype | None = None
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (2-D tensors) only.

    With train.optimizer=muon (the default) the blocks' weight matrices (attention and MLP) move by Muon
    instead, at peak rate train.muon_lr and in `dtype`'s precision where that is bfloat16; embeddings,
    the output head, biases and norm gains stay with AdamW. Param groups: [0] decayed by AdamW, [1] not
    decayed, [2] Muon. Muon's Newton-Schulz products run in the autocast precision (bfloat16 or float16:
    both hold a normalised matrix well), else float32. Muon orthogonalises the queries', keys' and values'
    rows of attention's qkv matrix apart, and a gated MLP's gate and up rows (tinylm/model.py's fused_rows).
    """
    named = list(model.named_parameters())
    matrices = [(n, p) for n, p in named if t.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    muon, stacked = [p for _, p in matrices], fused_rows(model)
    rows = [stacked.get(n) for n, _ in matrices]  # the rows of each layer a matrix stacks (qkv, a gated fc)
    taken = {id(p) for p in muon}
    decay = [p for _, p in named if p.dim() >= 2 and id(p) not in taken]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # one kernel for all tensors: fewer passes over memory
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    groups.append({"params": muon, "muon": True, "weight_decay": t.weight_decay, "lr_scale": t.muon_lr / t.lr,
                   "rows": rows})
    return Muon(groups, lr=t.lr, betas=(t.beta1, t.beta2), ns_dtype=dtype or torch.float32, fused=fused)


def describe_optimizer(optimizer: torch.optim.Optimizer, t: TrainConfig) -> str:
    """One line per optimizer part: which tensors are decayed, which are not, which Muon moves."""
    count = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
    decayed = "embeddings" if len(count) > 2 else "matrices, embeddings"
    lines = [
        f"AdamW: weight decay {t.weight_decay} on {count[0]:,} weights ({decayed}); "
        f"none on {count[1]:,} biases and norm gains"
    ]
    if len(count) > 2:
        lines.append(
            f"Muon: {count[2]:,} weights in {len(optimizer.param_groups[2]['params'])} block matrices "
            f"(attention, MLP), peak lr {t.muon_lr}, weight decay {t.weight_decay}"
        )
    return "\n".join(lines)


def learning_rate(step: int, progress: float, t: TrainConfig) -> float:
    """Linear warmup over the first `warmup_steps`, then cosine decay from lr to min_lr.

    `progress` in [0, 1] is how far the run is towards its end: steps over max_steps or, when a time
    limit comes first, seconds over max_time, so the decay finishes whichever limit stops the run.
    """
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm * (t.min_lr + (t.lr - t.min_lr) * cosine)


def progress(step: int, elapsed: float, t: TrainConfig) -> float:
    """How far a run is towards its end after `step` steps and `elapsed` seconds: the nearer limit's share."""
    by_time = elapsed / t.max_time if t.max_time else 0.0
    return max(step / t.max_steps, by_time)
