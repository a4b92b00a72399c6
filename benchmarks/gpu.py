"""The GPU check: what tinylm's CUDA paths do on a real GPU, in under 8 minutes, as one table.

    PYTHONPATH=. python -m benchmarks.gpu --corpus path/to/tinyshakespeare.txt
    PYTHONPATH=. python -m benchmarks.gpu --corpus c.txt --device cpu --quick     # a dry run of every part

Parts (--skip leaves some out):

  tests       the CUDA-only tests (python -m pytest -m gpu)
  throughput  GPT-2 small (124M, context 1024, batch 16) in bfloat16: training tokens/s and MFU against
              the GPU's datasheet peak, eager and torch.compile'd (the compile speed-up is kept for this
              machine's train.compile=auto decisions), and the measured matrix-product peak
  shakespeare nanoGPT's shakespeare_char GPU recipe (configs/shakespeare_char.yaml: 6 layers, 384 wide,
              context 256, batch 64, 5,000 steps) to its validation loss of 1.47: when, and how long
  float16     the same recipe in float16 with loss scaling, stopped at step 1,000: against bfloat16 there

Each part's figures go to the JSON file as soon as they exist (a run cut short keeps what it measured).
It needs torch, tokenizers, numpy, pyyaml, safetensors, tqdm and tensorboard, not `datasets` (the corpus is
a plain text file) nor `transformers`. A benchmark prints figures; it never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import REPO, matmul_peak, sync
from tinylm import config as config_
from tinylm import measure, speed
from tinylm.console import Console
from tinylm.distributed import Dist
from tinylm.guard import BlowUpGuard
from tinylm.hardware import pick_device
from tinylm.model import GPT
from tinylm.optim import make_optimizer
from tinylm.step import draw_batches, make_learner, train_step

PARTS = ("tests", "throughput", "shakespeare", "float16")
TARGET = 1.47  # nanoGPT's shakespeare_char validation loss with this recipe
FP16_STEPS = 1000
# --quick: every part at a toy size (seconds on a CPU), to check the script itself.
QUICK_MODEL = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32}
QUICK_TRAIN = {"train.batch_size": 4, "train.max_steps": 4, "train.eval_interval": 2, "train.eval_batches": 2,
               "train.sample_tokens": 0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="tiny Shakespeare as one text file")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run with --quick")
    p.add_argument("--quick", action="store_true", help="every part at a toy size: checks the script, measures nothing")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out, from: " + ", ".join(PARTS))
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per throughput measurement (default 10)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu.json", help="JSON results (default: %(default)s)")
    a = p.parse_args(argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    a.seconds = min(a.seconds, 0.5) if a.quick else a.seconds
    if a.skip - set(PARTS):
        p.error(f"unknown part {', '.join(sorted(a.skip - set(PARTS)))}; parts are {', '.join(PARTS)}")
    if not a.corpus.is_file():
        p.error(f"corpus not found: {a.corpus}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}, but this torch sees no CUDA GPU (use --device cpu --quick for a dry run)")
    if a.device == "cpu" and not a.quick:
        p.error("--device cpu runs only as a dry run: add --quick")
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the parts


def cuda_tests(device: torch.device) -> dict[str, Any]:
    """The tests marked gpu, in a subprocess; their summary line's counts."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--continue-on-collection-errors",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True)
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {kind: int(n) for n, kind in (w.split() for w in _summary_words(tail))}
    return {"returncode": done.returncode, "summary": tail, "counts": counts, "seconds": time.perf_counter() - started,
            "failures": [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]}


def _summary_words(tail: str) -> list[str]:
    """'3 passed, 1 skipped in 9.1s' -> ['3 passed', '1 skipped']."""
    words = [w.strip() for w in tail.split(" in ")[0].strip("= ").split(",")]
    return [w for w in words if len(w.split()) == 2 and w.split()[0].isdigit()]


def gpt2_throughput(device: torch.device, compiled: bool, seconds: float, quick: bool) -> dict[str, Any]:
    """Training tokens/s of GPT-2 small (configs/gpt2_small.yaml's model, AdamW) at context 1024 in bfloat16
    on random tokens (speed does not depend on the text), and its MFU against the device's peak."""
    cfg = config_.load("gpt2_small", {"train.grad_accum": 1, "train.batch_size": 4 if quick else 16,
                                      "train.dtype": "bfloat16", **(QUICK_MODEL if quick else {})})
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = GPT(m, 50257).to(device)
    optimizer = make_optimizer(model, t, device, torch.bfloat16)
    learner = make_learner(model, optimizer, Dist(device), torch.bfloat16, compiled)
    guard = BlowUpGuard(t.max_bad_steps, device, optimizer, log, learner.scaler)
    ids = np.random.default_rng(0).integers(0, 50257, size=2_000_000, dtype=np.int64).astype(np.uint32)
    gen = torch.Generator().manual_seed(0)
    step = lambda n: train_step(learner, draw_batches(ids, t, m.block_size, gen, n, learner.dist), 3e-4,  # noqa: E731
                                t.grad_clip, guard, number=n + 1)
    started = time.perf_counter()
    for n in range(3):  # warm-up: the compile, the allocator, cuBLAS's choices
        step(n)
    sync(device)
    warmup = time.perf_counter() - started
    n, started = 3, time.perf_counter()
    while n < 6 or time.perf_counter() - started < seconds:
        step(n)
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    rate = (n - 3) * t.batch_size * m.block_size / (time.perf_counter() - started)
    flops, peak = speed.flops_per_token(m, 50257), speed.device_peak(device, torch.bfloat16)
    return {"tokens_per_s": rate, "warmup_s": warmup, "flops_per_token": flops,
            "mfu": rate * flops / peak.flops if peak else None, "peak": peak.source if peak else None}


def shakespeare(corpus: Path, device: torch.device, work: Path, quick: bool, name: str,
                extra: dict[str, Any], stop_at: int = 0) -> dict[str, Any]:
    """Train configs/shakespeare_char.yaml on `corpus`; the validation curve with its wall-clock times
    (from the run's TensorBoard events), when it first reached TARGET, and how long it all took.

    stop_at: stop after the evaluation at that step, as Ctrl-C would (the learning-rate schedule stays
    the full recipe's, so the curve compares step for step with a run that went on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinylm.loop import train

    overrides = {"data.paths": [str(corpus)], "data.cache_dir": str(work / "cache"), "train.device": str(device),
                 **(dict(QUICK_MODEL, **QUICK_TRAIN) if quick else {}), **extra}
    cfg = config_.load("shakespeare_char", overrides)

    def watch(line: str) -> None:
        if stop_at and line.startswith(f"step {stop_at}:"):
            signal.raise_signal(signal.SIGINT)  # the loop stops at the end of this step, cleanly

    started = time.perf_counter()
    result = train(cfg, run_dir=work / name, console=Console(watch))
    wall = time.perf_counter() - started
    events = EventAccumulator(str(work / name)).Reload()
    curve = [(e.step, e.value, e.wall_time) for e in events.Scalars("val/loss")]
    first = curve[0][2] if curve else 0.0
    reached = next(((s, w - first) for s, v, w in curve if v <= TARGET), None)
    tags = set(events.Tags()["scalars"])
    last = lambda tag: events.Scalars(tag)[-1].value if tag in tags else None  # noqa: E731
    return {"steps": result.step, "train_seconds": result.elapsed, "wall_seconds": wall,
            "val_loss": result.metrics.get("val_loss"), "best_val_loss": result.metrics.get("best_val_loss"),
            "curve": [(s, v) for s, v, _ in curve], "reached_step": reached[0] if reached else None,
            "reached_seconds": reached[1] if reached else None, "tokens_per_s": result.tokens / max(result.elapsed, 1e-9),
            "mfu_percent": last("speed/mfu_percent"), "loss_scale": last("amp/loss_scale"),
            "overflow_steps": last("amp/overflow_steps")}


# ---------------------------------------------------------------- the table


def fmt(value: float | None, pattern: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"machine: gpu {m['gpu']}; cpu {m['cpu']} ({m['cpu_threads']} threads, features {m['cpu_features']}); "
             f"torch {m['torch']}", ""]
    rows: list[tuple[str, str]] = []
    if "tests" in r:
        x = r["tests"]
        rows.append(("CUDA-only tests (pytest -m gpu)", f"{x['summary'] or 'no summary'} ({x['seconds']:.0f} s)"))
        rows += [("  " + f, "") for f in x["failures"]]
    for key, label in (("eager", "GPT-2 small ctx1024 bf16, eager"), ("compiled", "GPT-2 small ctx1024 bf16, compiled")):
        x = r.get("throughput", {}).get(key)
        if x:
            mfu = fmt(x["mfu"], "{:.1%}", "not known") + (f" of {x['peak']}" if x["peak"] else "")
            rows.append((label, f"{x['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, warm-up {x['warmup_s']:.1f} s"))
    if "throughput" in r:
        t = r["throughput"]
        if "compile_speedup" in t:
            rows.append(("  torch.compile speed-up", f"{t['compile_speedup']:.2f}x (kept for train.compile=auto)"))
        if "matmul_bf16" in t:
            rows.append(("  bf16 matrix products, measured", f"{t['matmul_bf16'] / 1e12:,.1f} TFLOP/s"))
    for key, label in (("shakespeare", "shakespeare_char, bf16"), ("float16", "shakespeare_char, fp16, stopped early")):
        x = r.get(key)
        if not x:
            continue
        reached = (f"{TARGET} at step {x['reached_step']:,} after {x['reached_seconds']:.0f} s"
                   if x["reached_step"] is not None else f"{TARGET} not reached")
        rows.append((label, f"val {fmt(x['val_loss'], '{:.4f}')} at step {x['steps']:,} (best "
                            f"{fmt(x['best_val_loss'], '{:.4f}')}); {reached}; {x['train_seconds']:.0f} s training, "
                            f"{x['wall_seconds']:.0f} s in all; {x['tokens_per_s']:,.0f} tokens/s, "
                            f"MFU {fmt(x['mfu_percent'], '{:.1f}%', 'not known')}"))
        if key == "float16":
            rows.append(("  float16 against bf16 at the same step", r.get("fp16_vs_bf16", "-")))
            rows.append(("  loss scale, overflow steps", f"{fmt(x['loss_scale'], '{:,.0f}')}, "
                                                         f"{fmt(x['overflow_steps'], '{:.0f}')}"))
    width = max((len(a) for a, _ in rows), default=0)
    return "\n".join(lines + [f"{a:<{width}}  {b}".rstrip() for a, b in rows])


def compare_fp16(r: dict[str, Any]) -> str:
    """float16's last validation loss against bfloat16's at the same step (from the bf16 run's curve)."""
    half, full = r.get("float16"), r.get("shakespeare")
    if not half or not full or not half["curve"]:
        return "-"
    step, value = half["curve"][-1]
    same = dict(full["curve"]).get(step)
    return f"fp16 {value:.4f}, bf16 {same:.4f} at step {step:,}" if same is not None else f"fp16 {value:.4f} at step {step:,}"


# ---------------------------------------------------------------- main


def run_part(results: dict[str, Any], name: str, out: Path, fn: Callable[[], Any]) -> None:
    """Run one part, keep its figures (or its error) and write the JSON at once."""
    log(f"gpu check: {name} ...")
    try:
        results[name] = fn()
    except Exception as e:  # one part's failure must not cost the others' figures
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        log(f"gpu check: {name} failed: {type(e).__name__}: {e}")
    out.write_text(json.dumps(results, indent=1, default=str))


def throughput_part(device: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"eager": gpt2_throughput(device, False, a.seconds, a.quick)}
    if device.type == "cuda":
        out["compiled"] = gpt2_throughput(device, True, a.seconds, a.quick)
        out["compile_speedup"] = out["compiled"]["tokens_per_s"] / out["eager"]["tokens_per_s"]
        if not a.quick:
            measure.store("compile_speedup", {}, round(out["compile_speedup"], 3))
        out["matmul_bf16"] = matmul_peak(torch.bfloat16, device, seconds=1.0 if a.quick else 3.0)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = pick_device(a.device)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.gpu", *(argv if argv is not None else sys.argv[1:])]),
                               "machine": measure.machine(), "quick": a.quick}
    with tempfile.TemporaryDirectory(prefix="tinylm-gpu-") as tmp:
        work = Path(tmp)
        if "tests" not in a.skip:
            run_part(results, "tests", a.out, lambda: cuda_tests(device))
        if "throughput" not in a.skip:
            run_part(results, "throughput", a.out, lambda: throughput_part(device, a))
        if "shakespeare" not in a.skip:
            run_part(results, "shakespeare", a.out,
                     lambda: shakespeare(a.corpus, device, work, a.quick, "bf16", {"train.dtype": "bfloat16"}))
        if "float16" not in a.skip:
            stop = QUICK_TRAIN["train.eval_interval"] if a.quick else FP16_STEPS
            run_part(results, "float16", a.out,
                     lambda: shakespeare(a.corpus, device, work, a.quick, "fp16", {"train.dtype": "float16"}, stop))
    results["fp16_vs_bf16"] = compare_fp16(results)
    a.out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    for name, error in results.get("errors", {}).items():
        print(f"{name}: {error}")
    print(f"\nresults written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
