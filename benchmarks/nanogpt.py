"""tinylm against real nanoGPT on tiny Shakespeare (characters), side by side on this machine, every model
scored on the same text: nanoGPT's validation split (the last 10% of the file), all of it.

    python -m benchmarks.nanogpt --nanogpt ../shared/anchors/nanoGPT --budgets 60 180

nanoGPT runs its README's CPU command (2,000 iterations, from a copy of the checkout given by path); tinylm
runs as a new user would, with only --data, --data.tokenizer=char and --train.max_time, then with
--plan off (the fixed defaults) and with the best fixed recipe in configs/ for a CPU
(shakespeare_char_cpu), each at every budget. Without --nanogpt, nanoGPT's row is skipped with a line
saying so. Each run is a real subprocess, one after another; the table and the machine's CPU features
are printed at the end (markdown).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DEFAULT_CORPUS
from tinylm import measure, rundir

# nanoGPT's README command for a CPU (nanoGPT/README.md, "I only have a macbook"), as SOURCE.md gives it.
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
               "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
TINYLM_RUNS = {"tinylm (planned)": [], "tinylm --plan off": ["--plan", "off"],
               "tinylm --config shakespeare_char_cpu": ["--config", "shakespeare_char_cpu"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nanogpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (see ../shared/anchors/nanoGPT/SOURCE.md)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="tiny Shakespeare's text")
    p.add_argument("--budgets", type=float, nargs="+", default=[60.0], help="tinylm's train.max_time values")
    p.add_argument("--runs", nargs="*", default=list(TINYLM_RUNS), choices=list(TINYLM_RUNS),
                   help="tinylm's runs (none: nanoGPT only)")
    p.add_argument("--nanogpt_threads", type=int, default=0,
                   help="CPU threads for nanoGPT (OMP_NUM_THREADS; 0: torch's default). On a busy machine one "
                        "thread can be several times faster, as tinylm measures for itself")
    return p.parse_args(argv)


def val_text(corpus: Path) -> str:
    text = corpus.read_text(encoding="utf-8")
    return text[int(len(text) * 0.9):]  # nanoGPT's data/shakespeare_char/prepare.py split


def windows_loss(forward, ids: np.ndarray, block: int) -> float:
    """Mean next-token loss of `forward(x, y) -> loss` over ids cut into windows of block tokens, all of them."""
    n = (len(ids) - 1) // block
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 32):
            w = np.stack([ids[s * block : s * block + block + 1] for s in range(i, min(n, i + 32))]).astype(np.int64)
            w = torch.from_numpy(w)
            total += forward(w[:, :-1].contiguous(), w[:, 1:].contiguous()).item() * len(w)
    return total / n


def score_tinylm(run_dir: Path, text: str) -> float:
    cfg, tok, model, _ = rundir.load(run_dir)
    ids = np.array(tok.encode(text), dtype=np.int64)
    return windows_loss(lambda x, y: model(x, y)[1], ids, cfg.model.block_size)


def run_nanogpt(checkout: Path, corpus: Path, text: str, work: Path, threads: int = 0) -> tuple[float, float]:
    """(full-validation loss, wall seconds) of nanoGPT's CPU recipe, run in a copy of the checkout."""
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy)
    data = copy / "data" / "shakespeare_char"
    shutil.copy(corpus, data / "input.txt")
    (work / "stub").mkdir()
    (work / "stub" / "requests.py").write_text("")  # prepare.py imports requests only to download input.txt
    env = {**os.environ, "PYTHONPATH": str(work / "stub")}
    subprocess.run([sys.executable, "prepare.py"], cwd=data, env=env, check=True, capture_output=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    subprocess.run([sys.executable, "train.py", *NANOGPT_CPU, "--always_save_checkpoint=True"], cwd=copy, check=True,
                   capture_output=True, env=env)
    wall = time.perf_counter() - start
    spec = importlib.util.spec_from_file_location("nanogpt_model", copy / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(copy / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=False)
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    stoi = {c: i for i, c in enumerate(sorted(set(corpus.read_text(encoding="utf-8"))))}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    return windows_loss(lambda x, y: model(x, y)[1], ids, ckpt["model_args"]["block_size"]), wall


def run_tinylm(flags: list[str], corpus: Path, budget: float, work: Path, text: str) -> tuple[float, str]:
    """(full-validation loss, the plan: lines) of one tinylm run at `budget` seconds."""
    run_dir = work / f"run-{len(list(work.glob('run-*')))}"
    command = [sys.executable, "-m", "tinylm", "train", "--data", str(corpus), "--data.tokenizer=char",
               f"--train.max_time={budget:g}", "--run_dir", str(run_dir), f"--data.cache_dir={work / 'cache'}", *flags]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    plan_lines = " / ".join(line for line in out.splitlines() if line.startswith(("plan:", "threads:")))
    return score_tinylm(run_dir, text), plan_lines


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    text = val_text(a.corpus)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="tinylm-nanogpt-") as tmp:
        work = Path(tmp)
        for budget in a.budgets:
            for name in a.runs:
                loss, lines = run_tinylm(TINYLM_RUNS[name], a.corpus, budget, work, text)
                rows.append((name, f"max_time {budget:g} s", loss))
                print(f"{name}, {budget:g} s: {loss:.4f}", flush=True)
                if lines:
                    notes.append(f"{name} at {budget:g} s: {lines}")
        if a.nanogpt is None or not (a.nanogpt / "train.py").is_file():
            notes.append("nanoGPT: skipped (no checkout given: --nanogpt PATH, see ../shared/anchors/nanoGPT)")
        else:
            loss, wall = run_nanogpt(a.nanogpt, a.corpus, text, work, a.nanogpt_threads)
            threads = f", {a.nanogpt_threads} thread(s)" if a.nanogpt_threads else ""
            rows.insert(0, (f"nanoGPT CPU recipe (README command, 2,000 iterations{threads})", f"{wall:.0f} s wall", loss))
    m = measure.machine()
    print(f"machine: {m['cpu']}; features {m['cpu_features']}; {os.cpu_count()} cores; torch {m['torch']}")
    print(f"validation: the last 10% of {a.corpus.name}, {len(text):,} characters, all of it\n")
    print("| run | budget | full-validation loss |\n|---|---|---|")
    for name, budget, loss in rows:
        print(f"| {name} | {budget} | {loss:.4f} |" if math.isfinite(loss) else f"| {name} | {budget} | - |")
    print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
