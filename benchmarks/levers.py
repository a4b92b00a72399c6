"""Each speed lever on its own: what it does to training tokens/s, and to the loss per token trained.

Run through `python -m benchmarks.run --levers [--quick]`. Both halves are built to survive a shared,
noisy machine:

* speed: every variant of a shape is built first, then they take turns, a few steps each, for several
  rounds, so a change in the machine's load hits all of them alike (ratios within a shape compare);
* loss: every variant trains for the same number of tokens with its schedule timed to end there, and
  is scored by the full validation loss: a figure that does not depend on the machine's load at all.
  Divide by the speed ratio to see what a lever is worth per second.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from benchmarks.common import SHAPES, Trainer, full_val_loss, recipe, shape_overrides, sync
from tinylm.prepare import Prepared
from tinylm.speed import flops_per_token

BF16 = {"train.dtype": "bfloat16"}
LLAMA = {"model.pos": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu"}

# (label, recipe, overrides, nanoGPT's unfused AdamW)
SPEED_LEVERS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("baseline: fp32, unfused AdamW", "baseline", {}, True),
    ("+ fused AdamW", "baseline", {}, False),
    ("+ bf16 autocast", "baseline", BF16, False),
    ("+ bf16 + torch.compile", "baseline", {**BF16, "train.compile": True}, False),
    ("+ bf16 + rope", "baseline", {**BF16, "model.pos": "rope"}, False),
    ("+ bf16 + rmsnorm", "baseline", {**BF16, "model.norm": "rmsnorm"}, False),
    ("+ bf16 + swiglu", "baseline", {**BF16, "model.mlp": "swiglu"}, False),
    ("+ bf16 + relu2", "baseline", {**BF16, "model.mlp": "relu2"}, False),
    ("+ bf16 + qk_norm", "baseline", {**BF16, "model.qk_norm": True}, False),
    ("+ bf16 + bias=true", "baseline", {**BF16, "model.bias": True}, False),
    ("+ bf16 + muon", "baseline", {**BF16, "train.optimizer": "muon"}, False),
    ("tuned defaults", "tuned", {}, False),
    ("tuned, optimizer=adamw", "tuned", {"train.optimizer": "adamw"}, False),
]

# (label, recipe, overrides): trained at the baseline's shape (4L/4H/128w/ctx64/batch 12).
LOSS_LEVERS: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline (lr 1e-3)", "baseline", {}),
    ("baseline, lr 3e-3", "baseline", {"train.lr": 3e-3, "train.min_lr": 3e-4}),
    ("baseline + rope/rmsnorm/swiglu, lr 3e-3", "baseline", {**BF16, **LLAMA, "train.lr": 3e-3, "train.min_lr": 3e-4}),
    ("tuned defaults", "tuned", {}),
    ("tuned, pos=learned", "tuned", {"model.pos": "learned"}),
    ("tuned, norm=layernorm", "tuned", {"model.norm": "layernorm"}),
    ("tuned, mlp=gelu", "tuned", {"model.mlp": "gelu"}),
    ("tuned, mlp=relu2", "tuned", {"model.mlp": "relu2"}),
    ("tuned, qk_norm=true", "tuned", {"model.qk_norm": True}),
    ("tuned, bias=true", "tuned", {"model.bias": True}),
    ("tuned, optimizer=adamw", "tuned", {"train.optimizer": "adamw"}),
    ("tuned, dtype=float32", "tuned", {"train.dtype": "float32"}),
]


def interleaved_throughput(trainers: dict[str, Trainer], seconds: float, warmup_steps: int = 3) -> dict[str, dict[str, float]]:
    """Tokens/s of each trainer, measured in turns of a few steps over about `seconds` in all."""
    out: dict[str, dict[str, float]] = {}
    for name, tr in trainers.items():
        start = time.perf_counter()
        for _ in range(warmup_steps):
            tr.step(tr.cfg.train.lr)
        sync(tr.device)
        out[name] = {"warmup_s": time.perf_counter() - start, "seconds": 0.0, "steps": 0}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(x["steps"] for x in out.values()) < 3:
        for name, tr in trainers.items():
            start = time.perf_counter()
            for _ in range(2):
                tr.step(tr.cfg.train.lr)
            sync(tr.device)
            out[name]["seconds"] += time.perf_counter() - start
            out[name]["steps"] += 2
    for name, tr in trainers.items():
        out[name]["tokens_per_s"] = out[name]["steps"] * tr.tokens_per_step / out[name]["seconds"]
    return out


def loss_after_tokens(trainer: Trainer, tokens: float) -> dict[str, float]:
    """Train for `tokens` tokens, the schedule timed to end there; the full validation loss then."""
    t = trainer.cfg.train
    t.max_steps, t.max_time = max(1, round(tokens / trainer.tokens_per_step)), 0
    start = time.perf_counter()
    while trainer.steps < t.max_steps:
        trainer.step(trainer.lr_at(0.0))
    return {"steps": trainer.steps, "tokens": trainer.tokens, "val": full_val_loss(trainer),
            "seconds": time.perf_counter() - start}


def run_levers(a: argparse.Namespace, prep: Prepared, peak: dict[str, float], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"speed": {}, "loss": {}, "lever_tokens": a.lever_tokens}
    for shape in SHAPES:
        log(f"levers: interleaved throughput at {shape} ({len(SPEED_LEVERS)} variants) ...")
        cfgs = {label: recipe(name, a.corpus, a.cache_dir, {**shape_overrides(shape), **ov}) for label, name, ov, _ in SPEED_LEVERS}
        trainers = {label: Trainer(cfgs[label], prep, foreach_adamw=unfused) for label, _, _, unfused in SPEED_LEVERS}
        speeds = interleaved_throughput(trainers, a.seconds * len(SPEED_LEVERS) / 2)
        for label, r in speeds.items():
            dtype = trainers[label].dtype
            r["fraction_of_peak"] = r["tokens_per_s"] * flops_per_token(cfgs[label].model, prep.tokenizer.vocab_size) / peak[
                str(dtype).replace("torch.", "") if dtype else "float32"]
            out["speed"][f"{shape}/{label}"] = r
        del trainers
    for label, name, overrides in LOSS_LEVERS:
        log(f"levers: loss after {a.lever_tokens:,.0f} tokens: {label} ...")
        cfg = recipe(name, a.corpus, a.cache_dir, {**shape_overrides("tiny"), **overrides})
        out["loss"][label] = loss_after_tokens(Trainer(cfg, prep, foreach_adamw=name == "baseline" and not overrides), a.lever_tokens)
    return out


def lever_table(r: dict[str, Any]) -> str:
    lines = ["speed levers: training tokens/s, ratio to the baseline, % of the peak in its own precision "
             "(variants of a shape measured in turns)"]
    for shape in SHAPES:
        base = r["speed"][f"{shape}/{SPEED_LEVERS[0][0]}"]["tokens_per_s"]
        L, H, C, T, B = SHAPES[shape]
        lines.append(f"  {L}L/{H}H/{C}w/ctx{T}/batch{B}:")
        for label, *_ in SPEED_LEVERS:
            x = r["speed"][f"{shape}/{label}"]
            lines.append(f"    {label:<32} {x['tokens_per_s']:>8,.0f}  {x['tokens_per_s'] / base:5.2f}x  "
                         f"{100 * x['fraction_of_peak']:5.1f}%  warm-up {x['warmup_s']:.1f} s")
    lines.append(f"loss levers: full validation loss after {r['lever_tokens']:,.0f} training tokens at 4L/4H/128w/ctx64/batch12")
    for label, x in r["loss"].items():
        lines.append(f"    {label:<42} {x['val']:.4f}  ({x['steps']:,} steps, {x['seconds']:.0f} s)")
    return "\n".join(lines)
