"""Each speed lever on its own: what it does to training tokens/s, and to the loss reached in a budget.

Run through `python -m benchmarks.run --levers [--quick]`. Throughput levers are added one at a time
to the nanoGPT baseline at both fixed shapes; loss levers are switched one at a time, on top of the
baseline (does it help?) and off in the tuned defaults (is it still pulling its weight?).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from benchmarks.common import SHAPES, flops_per_token, recipe, shape_overrides
from benchmarks.suites import budget_run, throughput
from tinylm.data import Prepared

BF16 = {"train.dtype": "bfloat16"}

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
    ("+ bf16 + muon", "baseline", {**BF16, "train.optimizer": "muon"}, False),
    ("tuned defaults", "tuned", {}, False),
    ("tuned, model.bias=true", "tuned", {"model.bias": True}, False),
    ("tuned, train.compile=false", "tuned", {"train.compile": False}, False),
]

# (label, recipe, overrides): the recipe's own shape and schedule, stretched over the lever budget.
LOSS_LEVERS: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline", "baseline", {}),
    ("baseline + bf16", "baseline", BF16),
    ("baseline + bf16 + rope", "baseline", {**BF16, "model.pos": "rope"}),
    ("baseline + bf16 + rmsnorm", "baseline", {**BF16, "model.norm": "rmsnorm"}),
    ("baseline + bf16 + swiglu", "baseline", {**BF16, "model.mlp": "swiglu"}),
    ("baseline + bf16 + relu2", "baseline", {**BF16, "model.mlp": "relu2"}),
    ("baseline + bf16 + qk_norm", "baseline", {**BF16, "model.qk_norm": True}),
    ("baseline + bf16 + muon", "baseline", {**BF16, "train.optimizer": "muon"}),
    ("tuned defaults", "tuned", {}),
    ("tuned, pos=learned", "tuned", {"model.pos": "learned"}),
    ("tuned, norm=layernorm", "tuned", {"model.norm": "layernorm"}),
    ("tuned, mlp=gelu", "tuned", {"model.mlp": "gelu"}),
    ("tuned, optimizer=adamw", "tuned", {"train.optimizer": "adamw"}),
    ("tuned, dtype=float32", "tuned", {"train.dtype": "float32"}),
    ("tuned, bias=true", "tuned", {"model.bias": True}),
]


def run_levers(a: argparse.Namespace, prep: Prepared, peak: dict[str, float], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"speed": {}, "loss": {}}
    for label, name, overrides, unfused in SPEED_LEVERS:
        for shape in SHAPES:
            log(f"lever throughput {shape}: {label} ...")
            cfg = recipe(name, a.corpus, a.cache_dir, {**shape_overrides(shape), **overrides})
            r = throughput(cfg, prep, a.seconds, foreach_adamw=unfused)
            r["fraction_of_peak"] = r["tokens_per_s"] * flops_per_token(cfg, prep.tokenizer.vocab_size) / peak[r["autocast"]]
            out["speed"][f"{shape}/{label}"] = r
    for label, name, overrides in LOSS_LEVERS:
        log(f"lever loss in {a.lever_budget:g} s: {label} ...")
        cfg = recipe(name, a.corpus, a.cache_dir, overrides)
        r = budget_run(cfg, prep, a.lever_budget, 4, 1.886, foreach_adamw=name == "baseline" and not overrides)
        out["loss"][label] = r
    return out


def lever_table(r: dict[str, Any]) -> str:
    lines = ["speed levers (training tokens/s; ratio to the baseline; % of the peak in its precision)"]
    for shape in SHAPES:
        base = r["speed"][f"{shape}/{SPEED_LEVERS[0][0]}"]["tokens_per_s"]
        lines.append(f"  {shape}:")
        for label, *_ in SPEED_LEVERS:
            x = r["speed"][f"{shape}/{label}"]
            lines.append(f"    {label:<34} {x['tokens_per_s']:>9,.0f}  {x['tokens_per_s'] / base:5.2f}x  "
                         f"{100 * x['fraction_of_peak']:5.1f}%  warm-up {x['warmup_s']:.1f} s")
    budget = next(iter(r["loss"].values()))["budget_s"] if r["loss"] else 0
    lines.append(f"loss levers (full validation loss after {budget:g} s of training; steps taken)")
    for label, x in r["loss"].items():
        lines.append(f"    {label:<34} {x['final_val']:.4f}  {x['steps']:>6,} steps")
    return "\n".join(lines)
