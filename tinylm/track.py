"""Tracked neurons: a few single numbers of the real model, followed step by step as training nudges them.

The one-neuron story of docs/lesson.md (y = w*x + b, a gradient, a nudge) happens to every number of the
model at every step; this follows a few of them. Every train.log_interval steps `watch` writes, for each
tracked number, under `track/<parameter>_<index>/`:

    value      the number after the step
    grad       its gradient, as the optimizer received it (after clipping)
    update     how far the step moved it (value after - value before)
    exp_avg, exp_avg_sq   AdamW's running means of the gradient and of its square, for a number AdamW moves
    momentum   Muon's momentum buffer, for a number of a matrix Muon moves

By default (train.track empty) one weight w[i,j] of the first MLP's input matrix, chosen at random with
the run's seed, and its neuron's bias b[i]; a model without biases (the default, Llama-like one) has no b,
so the norm gain g[j] that scales the weight's input j is tracked instead, and the log says so.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from tinylm.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")  # optimizer state kept per number (AdamW's, Muon's)
ENTRY = r"([\w.]+)\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]"


@dataclass(frozen=True)
class Tracked:
    name: str  # the parameter, as model.named_parameters() names it
    index: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.name}[{','.join(map(str, self.index))}]"

    @property
    def tag(self) -> str:
        """The TensorBoard prefix: brackets are not allowed in a tag."""
        return f"track/{self.name}_{'_'.join(map(str, self.index))}"


def parse(spec: str, params: dict[str, torch.Tensor]) -> list[Tracked]:
    """train.track's NAME[I,J], ... checked against the model's parameters; one line naming a bad entry."""
    if not re.fullmatch(rf"\s*{ENTRY}(\s*,\s*{ENTRY})*\s*", spec):
        raise UserError(f"train.track must be NAME[I,J] entries separated by commas, e.g. blocks.0.mlp.fc.weight[3,5], "
                        f"or none; got {spec!r}")
    tracked = []
    for name, index in re.findall(ENTRY, spec):
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1, cutoff=0.5)
            raise UserError(f"train.track: the model has no parameter {name}"
                            + (f"; did you mean {close[0]}?" if close else ""))
        idx, shape = tuple(int(i) for i in index.split(",")), tuple(params[name].shape)
        if len(idx) != len(shape) or any(i >= n for i, n in zip(idx, shape)):
            raise UserError(f"train.track: {name}[{index}] is outside that parameter, whose shape is {list(shape)}")
        tracked.append(Tracked(name, idx))
    return tracked


def default(model: torch.nn.Module, seed: int) -> tuple[list[Tracked], str]:
    """One weight w[i,j] of the first MLP, chosen with `seed`, and its bias b[i] or, without biases, the
    norm gain g[j]; and a note for the log when a norm gain stands in for the bias."""
    params = dict(model.named_parameters())
    fc = "blocks.0.mlp.fc.weight"
    gen = torch.Generator().manual_seed(seed)
    rows = model.cfg.mlp_width  # (swiglu's fc holds the gate rows first: a neuron's gate)
    i, j = (int(torch.randint(n, (1,), generator=gen)) for n in (rows, params[fc].size(1)))
    if "blocks.0.mlp.fc.bias" in params:
        return [Tracked(fc, (i, j)), Tracked("blocks.0.mlp.fc.bias", (i,))], ""
    note = (f"track: the model has no biases (model.bias=false), so besides the weight w = {fc}[{i},{j}] the "
            f"norm gain that scales its input, blocks.0.norm2.weight[{j}], is tracked")
    return [Tracked(fc, (i, j)), Tracked("blocks.0.norm2.weight", (j,))], note


def choose(spec: str, model: torch.nn.Module, seed: int) -> tuple[list[Tracked], str]:
    """The numbers train.track names (empty: `default`; none: nothing), and a note for the log."""
    if spec.strip().lower() == "none":
        return [], ""
    if not spec.strip():
        return default(model, seed)
    return parse(spec, dict(model.named_parameters())), ""


def watch(optimizer: torch.optim.Optimizer, model: torch.nn.Module, writer, tracked: list[Tracked],
          next_step: Callable[[], int], every: int):
    """Log the tracked numbers on the optimizer steps numbered next_step() that are multiples of `every`
    (the only cost on other steps is one modulo). Returns the hook handles (`.remove()` to stop)."""
    pre, post = hooks(model, writer, tracked, next_step, every)
    return optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)


def hooks(model: torch.nn.Module, writer, tracked: list[Tracked], next_step: Callable[[], int], every: int):
    """`watch`'s optimizer hooks (pre, post): before the step the gradients and values, after it the
    values and the moments, written together (benchmarks/watching.py times them)."""
    params = dict(model.named_parameters())
    before: list[torch.Tensor] = []

    def pre(opt, args, kwargs) -> None:
        before.clear()
        if tracked and next_step() % every == 0:
            for t in tracked:
                p = params[t.name]
                grad = p.grad[t.index] if p.grad is not None else torch.tensor(math.nan, device=p.device)
                before.extend((p.detach()[t.index].clone().float(), grad.detach().float()))

    def post(opt, args, kwargs) -> None:
        if not before:
            return
        names, values = [], []
        for n, t in enumerate(tracked):
            p = params[t.name]
            state = opt.state.get(p, {})
            moments = [m for m in MOMENTS if m in state]
            value = p.detach()[t.index].float()
            names += [f"{t.tag}/{k}" for k in ("value", "grad", "update")]
            names += [f"{t.tag}/{'momentum' if m == 'momentum_buffer' else m}" for m in moments]
            values += [value, before[2 * n + 1], value - before[2 * n]]
            values += [state[m][t.index].float() for m in moments]
        before.clear()
        step = next_step()
        for tag, v in zip(names, torch.stack(values).tolist()):  # one host sync
            writer.add_scalar(tag, v, step)

    return pre, post


def describe(tracked: list[Tracked]) -> str:
    return "track: " + ", ".join(t.label for t in tracked) + " (TensorBoard: track/)"
