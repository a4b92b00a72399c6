"""Run the benchmarks: the nanoGPT baseline recipe and tinylm's tuned defaults side by side, one table.

    python -m benchmarks.run                      # the full run: 60 s and 600 s budgets (30-45 minutes)
    python -m benchmarks.run --quick              # a few minutes: shorter measurements, one 60 s budget
    python -m benchmarks.run --suites throughput,sampling --corpus path/to/tinyshakespeare.txt
    python -m benchmarks.run --levers             # also each lever on its own (adds about 20 minutes; quick 8)

Suites: `peak` (the machine's matrix-product ceiling, fp32 and bf16), `throughput` (training tokens/s
and FLOP/s at 4L/4H/128w/ctx64/batch 12 and 6L/6H/384w/ctx256/batch 16), `loss` (seconds to a full
validation loss of 1.886, best loss within each budget), `sampling` (tokens/s with and without the
KV cache on the 6-layer model). A benchmark prints figures; it never passes or fails. The machine is
usually shared: compare the ratios of one run, not figures between runs. Results also go to JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_CORPUS,
    RECIPES,
    REPO,
    SHAPES,
    data,
    fmt_seconds,
    matmul_peak,
    recipe,
    shape_overrides,
)
from benchmarks.levers import run_levers
from benchmarks.suites import budget_run, sampling, throughput
from tinylm import measure
from tinylm.hardware import cpu_has_fast_bf16, pick_device
from tinylm.speed import flops_per_token

SUITES = ("peak", "throughput", "loss", "sampling")
TARGET = 1.886  # nanoGPT's CPU recipe's validation loss
# The tuned recipe's model per budget (n_layer, n_head, n_embd, block_size, batch_size), from a sweep on
# this machine kind: in a minute a small model sees the most text; ten minutes pay for a wider one.
LOSS_SHAPES = "60:3,4,128,64,32/600:4,4,192,128,32"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="tiny Shakespeare text (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="short measurements and one 60 s budget: a few minutes")
    p.add_argument("--suites", default=",".join(SUITES), help="comma-separated, from: " + ", ".join(SUITES))
    p.add_argument("--budgets", help="training budgets in seconds for the loss suite (default 60,600; quick 60)")
    p.add_argument("--evals", type=int, help="full validation evaluations per budget (default 20; quick 10)")
    p.add_argument("--loss_shape", default=LOSS_SHAPES,
                   help="the tuned recipe's model in the loss suite, n_layer,n_head,n_embd,block_size,batch_size, "
                        "for every budget or per budget as BUDGET:SHAPE/BUDGET:SHAPE (a budget not named takes the "
                        "shape of the largest named budget below it, else the smallest); default %(default)s: "
                        "what a budget's best loss calls for (the baseline keeps its own 4,4,128,64,12)")
    p.add_argument("--own_steps", type=int, help="steps of the baseline's run on its own schedule "
                   "(default: its max_steps, nanoGPT's 2,000; 0 leaves that run out)")
    p.add_argument("--seconds", type=float, help="seconds per throughput measurement (default 20; quick 6)")
    p.add_argument("--sample_tokens", type=int, help="new tokens per sampling run (default 1000; quick 500)")
    p.add_argument("--nocache_tokens", type=int, help="new tokens without the KV cache (default 1000; quick 300)")
    p.add_argument("--levers", action="store_true", help="also measure each speed lever on its own")
    p.add_argument("--lever_tokens", type=float, help="training tokens per lever's loss run (default 750,000; quick 250,000)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--cache_dir", default=str(REPO / "data" / "cache"), help="prepared-corpus cache")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks.json", help="JSON results (default: %(default)s)")
    a = p.parse_args(argv)
    q = a.quick
    a.budgets = [float(b) for b in (a.budgets or ("60" if q else "60,600")).split(",")]
    a.seconds = a.seconds or (6.0 if q else 20.0)
    a.evals = a.evals or (10 if q else 20)
    a.sample_tokens = a.sample_tokens or (500 if q else 1000)
    a.nocache_tokens = a.nocache_tokens or (300 if q else 1000)
    a.lever_tokens = a.lever_tokens or (250_000 if q else 750_000)
    a.suites = [s.strip() for s in a.suites.split(",") if s.strip()]
    unknown = set(a.suites) - set(SUITES)
    if unknown:
        p.error(f"unknown suite {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    try:
        for budget in a.budgets:
            shape_for(a.loss_shape, budget)
    except ValueError:
        p.error(f"--loss_shape {a.loss_shape!r}: expected n_layer,n_head,n_embd,block_size,batch_size (or BUDGET:that/...)")
    if not a.corpus.is_file():
        p.error(f"corpus not found: {a.corpus} (pass --corpus PATH to tiny Shakespeare)")
    return a


SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "train.batch_size")


def shape_for(spec: str, budget: float) -> dict[str, int]:
    """The --loss_shape for one budget: "L,H,C,T,B" for all, or "60:L,H,C,T,B/600:L,H,C,T,B"."""
    shapes = {}
    for part in spec.split("/"):
        when, _, shape = part.rpartition(":")
        shapes[float(when) if when else 0.0] = dict(zip(SHAPE_KEYS, (int(x) for x in shape.split(","))))
    below = [b for b in shapes if b <= budget]
    return shapes[max(below) if below else min(shapes)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
                               "machine": machine(), "settings": {k: str(v) for k, v in vars(a).items()}}
    cfgs = {name: recipe(name, a.corpus, a.cache_dir) for name in RECIPES}
    prep = data(cfgs["baseline"])
    device = pick_device(cfgs["tuned"].train.device)
    results["recipes"] = {name: cfg.to_dict() for name, cfg in cfgs.items()}
    peak = {}
    if "peak" in a.suites or "throughput" in a.suites or a.levers:
        log("measuring the matrix-product peak ...")
        peak = {"float32": matmul_peak(torch.float32, device), "bfloat16": matmul_peak(torch.bfloat16, device)}
        results["peak_flops"] = peak
    if "throughput" in a.suites:
        results["throughput"] = {}
        for shape in SHAPES:
            # The third: the tuned recipe with AdamW, to show what Muon's per-step cost takes back.
            for name, extra in (("baseline", {}), ("tuned", {}), ("tuned+adamw", {"train.optimizer": "adamw"})):
                log(f"throughput {shape} {name} ...")
                cfg = recipe(name.split("+")[0], a.corpus, a.cache_dir, {**shape_overrides(shape), **extra})
                r = throughput(cfg, prep, a.seconds, foreach_adamw=name == "baseline")
                r["flops_per_token"] = flops_per_token(cfg.model, prep.tokenizer.vocab_size)
                r["flops_per_s"] = r["tokens_per_s"] * r["flops_per_token"]
                r["fraction_of_peak"] = r["flops_per_s"] / peak[r["autocast"]]
                results["throughput"][f"{shape}/{name}"] = r
    if "loss" in a.suites:
        results["loss"] = {}
        # nanoGPT's recipe as nanoGPT runs it (2,000 steps, its schedule by steps): the baseline's own best
        # shot at the target, next to the budget runs whose schedules are timed to each budget.
        if a.own_steps != 0:
            own = recipe("baseline", a.corpus, a.cache_dir, {"train.max_steps": a.own_steps} if a.own_steps else None)
            log(f"loss: baseline on its own {own.train.max_steps:,}-step schedule ...")
            results["loss"]["own/baseline"] = budget_run(own, prep, None, a.evals, TARGET, foreach_adamw=True)
        for budget in a.budgets:
            for name in RECIPES:
                log(f"loss: {name} for {budget:g} s ...")
                cfg = recipe(name, a.corpus, a.cache_dir, shape_for(a.loss_shape, budget) if name == "tuned" else None)
                results["loss"][f"{budget:g}/{name}"] = budget_run(cfg, prep, budget, a.evals, TARGET, foreach_adamw=name == "baseline")
    if "sampling" in a.suites:
        results["sampling"] = {}
        for name in RECIPES:
            cfg = recipe(name, a.corpus, a.cache_dir, shape_overrides("6L"))
            for use_cache, n in ((True, a.sample_tokens), (False, a.nocache_tokens)):
                log(f"sampling {name} {'with' if use_cache else 'without'} KV cache, {n} tokens ...")
                results["sampling"][f"{name}/{'cache' if use_cache else 'nocache'}"] = sampling(cfg, prep, n, use_cache)
    if a.levers:
        results["levers"] = run_levers(a, prep, peak, log)
    print(table(results, a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults written to {a.out}")
    return 0


def machine() -> dict[str, Any]:
    """The machine the figures were measured on, its CPU's matrix features included (tinylm/measure.py)."""
    m = measure.machine()
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": m["torch"],
            "threads": torch.get_num_threads(), "cpu": m["cpu"], "cpu_features": m["cpu_features"],
            "cpu_fast_bf16": cpu_has_fast_bf16(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(r: dict[str, Any], a: argparse.Namespace) -> str:
    """The side-by-side table: one row per figure, baseline | tuned | tuned/baseline."""
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, base: float | None, tuned: float | None, fmt: str = "{:,.0f}", ratio: bool = True) -> None:
        show = lambda v: "-" if v is None else fmt.format(v)  # noqa: E731
        rat = f"{tuned / base:.2f}x" if ratio and base and tuned is not None else ""
        rows.append((label, show(base), show(tuned), rat))

    m = r["machine"]
    head = [f"machine: {m.get('gpu') or m['cpu']}, {m['threads']} threads, CPU features "
            f"{m.get('cpu_features', 'not recorded')}, torch {m['torch']}"]
    if "peak_flops" in r:
        p = r["peak_flops"]
        head.append(f"matrix-product peak: float32 {p['float32'] / 1e9:,.0f} GFLOP/s, bfloat16 {p['bfloat16'] / 1e9:,.0f} GFLOP/s")
    for shape in SHAPES if "throughput" in r else ():
        b, t = r["throughput"][f"{shape}/baseline"], r["throughput"][f"{shape}/tuned"]
        L, H, C, T, B = SHAPES[shape]
        rows.append((f"training {L}L/{H}H/{C}w/ctx{T}/batch{B}", "", "", ""))
        row("  tokens/s", b["tokens_per_s"], t["tokens_per_s"])
        row("  tokens/s, tuned with optimizer=adamw", b["tokens_per_s"], r["throughput"][f"{shape}/tuned+adamw"]["tokens_per_s"])
        row("  GFLOP/s achieved", b["flops_per_s"] / 1e9, t["flops_per_s"] / 1e9)
        row("  % of peak (own precision)", 100 * b["fraction_of_peak"], 100 * t["fraction_of_peak"], "{:.1f}%", ratio=False)
        row("  warm-up s (3 steps, compile)", b["warmup_s"], t["warmup_s"], "{:.1f}", ratio=False)
    if "loss" in r:
        rows.append((f"full validation loss (target {TARGET}; baseline 4L/4H/128w/ctx64/batch12)", "", "", ""))
        reach = {n: [x["time_to_target_s"] for k, x in r["loss"].items() if k.endswith("/" + n) and x["time_to_target_s"]] for n in RECIPES}
        first = {n: min(v) if v else None for n, v in reach.items()}
        rows.append((f"  seconds to {TARGET}", fmt_seconds(first["baseline"]), fmt_seconds(first["tuned"]),
                     f"{first['tuned'] / first['baseline']:.2f}x" if first["baseline"] and first["tuned"] else ""))
        if "own/baseline" in r["loss"]:
            own = r["loss"]["own/baseline"]
            rows.append((f"  baseline's own {own['steps']:,}-step run: best (seconds)", f"{own['best_val']:.4f} ({own['seconds']:.0f} s)", "", ""))
        for budget in a.budgets:
            b, t = r["loss"][f"{budget:g}/baseline"], r["loss"][f"{budget:g}/tuned"]
            L, H, C, T, B = (shape_for(a.loss_shape, budget)[k] for k in SHAPE_KEYS)
            row(f"  best in {budget:g} s (tuned {L}L/{H}H/{C}w/ctx{T}/batch{B})", b["best_val"], t["best_val"], "{:.4f}")
            row(f"  steps in {budget:g} s", b["steps"], t["steps"])
    if "sampling" in r:
        s = r["sampling"]
        rows.append(("sampling, 6L/6H/384w/ctx256", "", "", ""))
        row(f"  tokens/s without KV cache ({a.nocache_tokens})", s["baseline/nocache"]["tokens_per_s"], s["tuned/nocache"]["tokens_per_s"], "{:,.1f}")
        row(f"  tokens/s with KV cache ({a.sample_tokens})", s["baseline/cache"]["tokens_per_s"], s["tuned/cache"]["tokens_per_s"], "{:,.1f}")
        row("  cache speed-up", s["baseline/cache"]["tokens_per_s"] / s["baseline/nocache"]["tokens_per_s"],
            s["tuned/cache"]["tokens_per_s"] / s["tuned/nocache"]["tokens_per_s"], "{:.1f}x", ratio=False)
        for key, label in (("cache", "with cache"), ("nocache", "without")):
            quarters = lambda n: "/".join(f"{v:.1f}" for v in s[f"{n}/{key}"]["ms_per_token_by_quarter"])  # noqa: E731
            rows.append((f"  ms/token by quarter, {label}", quarters("baseline"), quarters("tuned"), ""))
    widths = [max(len(x[i]) for x in rows + [("figure", "baseline", "tuned", "ratio")]) for i in range(4)]
    line = lambda x: f"{x[0]:<{widths[0]}}  {x[1]:>{widths[1]}}  {x[2]:>{widths[2]}}  {x[3]:>{widths[3]}}"  # noqa: E731
    out = head + ["", line(("figure", "baseline", "tuned", "ratio")), "-" * (sum(widths) + 6), *map(line, rows)]
    if "levers" in r:
        from benchmarks.levers import lever_table

        out += ["", lever_table(r["levers"])]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
