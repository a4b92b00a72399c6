"""The planner's data: train a ladder of model shapes on corpora of several sizes, for fixed token counts,
and record the validation loss along each run. tinylm/plan.py's rule is fitted to the table this writes
(`python -m benchmarks.fit` refits it).

    python -m benchmarks.sweep                       # the sweep behind plan.py (about 45 min on 2 busy cores)
    python -m benchmarks.sweep --scale 0.05 --out /tmp/s.csv   # a quick check of the script itself

Each run is a fixed number of optimizer steps, never seconds: how much a model learns from a number of
tokens does not depend on the machine, while how many tokens a second buys does (that part the planner
measures on the machine at hand). So other processes on a shared machine slow the sweep but do not
change its table. Every run uses the default recipe's architecture, optimizer and learning rates
(Llama, Muon) and a cosine schedule timed to its own length; the validation loss is measured on the
same validation text for every corpus size (a corpus of U tokens is the first U tokens of the training
split), at 1/4, 1/2, 3/4 and all of the run. Only the points from halfway on are used for the fit: earlier
ones are taken at a learning rate the run's decay has not yet brought down.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import DEFAULT_CORPUS, REPO, Trainer
from tinylm import config as config_
from tinylm import measure, plan
from tinylm.hardware import autocast
from tinylm.prepare import Prepared, prepare

OUT = REPO / "benchmarks" / "results" / "sweep.csv"
COLUMNS = ("tokenizer", "corpus_tokens", "n_layer", "n_embd", "n_head", "block_size", "batch_size", "dropout",
           "params", "run_tokens", "fraction", "tokens", "passes", "val_loss", "train_loss", "seconds")
# (n_layer, n_embd, n_head, block_size, batch_size): the shapes of tinylm/plan.py's ladder a CPU can sweep.
SHAPES = {name: plan.LADDER[name] for name in "ABCDE"}
# (tokenizer, corpus tokens or 0 for all of it, shape, dropout, run tokens in millions): ordered so the most
# informative runs come first, should the sweep be stopped early.
RUNS = [
    ("char", 0, "A", 0.0, 1.5), ("char", 0, "C", 0.0, 1.5), ("char", 0, "D", 0.0, 1.0),
    ("char", 0, "B", 0.0, 1.5), ("char", 0, "E", 0.0, 0.6),
    ("char", 60_000, "A", 0.0, 1.0), ("char", 60_000, "C", 0.0, 1.0), ("char", 60_000, "C", 0.1, 1.0),
    ("char", 60_000, "D", 0.0, 0.6), ("char", 60_000, "D", 0.1, 0.6),
    ("bpe", 0, "A", 0.0, 1.0), ("bpe", 0, "C", 0.0, 0.8), ("bpe", 0, "D", 0.0, 0.5), ("bpe", 0, "D", 0.1, 0.5),
    ("char", 250_000, "C", 0.0, 1.0),  # the shipped table stops before these last two and a half runs
]
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
VAL_TOKENS = 16_384  # each evaluation's share of the validation split: the same text for every run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the text (default: tiny Shakespeare)")
    p.add_argument("--out", type=Path, default=OUT, help=f"the table to write (default: {OUT.relative_to(REPO)})")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's tokens by this")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--cache_dir", default="data/cache")
    return p.parse_args(argv)


def corpus(path: Path, tokenizer: str, cache_dir: str) -> Prepared:
    cfg = config_.load(None, {"data.paths": [str(path)], "data.tokenizer": tokenizer, "data.cache_dir": cache_dir})
    return prepare(cfg.data)


@torch.no_grad()
def val_loss(tr: Trainer, ids: np.ndarray) -> float:
    """Mean next-token loss over the first VAL_TOKENS of `ids`, in windows of the model's context."""
    block = tr.cfg.model.block_size
    n = max(1, min(len(ids) - 1, VAL_TOKENS) // block)
    windows = np.stack([ids[i * block : i * block + block + 1] for i in range(n)]).astype(np.int64)
    tr.model.eval()
    total = 0.0
    for i in range(0, n, 64):
        w = torch.from_numpy(windows[i : i + 64])
        with autocast(tr.device, tr.dtype):
            total += tr.model(w[:, :-1], w[:, 1:])[1].item() * len(w)
    tr.model.train()
    return total / n


def one_run(prep: Prepared, corpus_tokens: int, shape: str, dropout: float, run_tokens: float) -> list[dict[str, Any]]:
    """Train one shape for run_tokens tokens on the first corpus_tokens of prep's training split."""
    n_layer, n_embd, n_head, block, batch = SHAPES[shape]
    steps = max(8, round(run_tokens / (batch * block)))
    kind = prep.tokenizer.kind  # the architecture and learning rate the plan gives this kind's shapes
    lr = {"train.lr": plan.EMBEDDING_LR[kind]} if kind in plan.EMBEDDING_LR and shape in plan.LR_SHAPES else {}
    cfg = config_.load(None, {"model.n_layer": n_layer, "model.n_embd": n_embd, "model.n_head": n_head,
                              "model.block_size": block, "model.dropout": dropout, "train.batch_size": batch,
                              "train.max_steps": steps, "train.max_time": 0, **plan.architecture(kind), **lr})
    sliced = dataclasses.replace(prep, train=prep.train[:corpus_tokens])
    tr = Trainer(cfg, sliced)
    params = sum(p.numel() for p in tr.model.parameters())
    rows, marks, start, recent = [], [round(f * steps) for f in FRACTIONS], time.perf_counter(), []
    while tr.steps < steps:
        recent = (recent + [tr.step(tr.lr_at(0.0)).item()])[-10:]
        if tr.steps in marks:
            rows.append({"tokenizer": prep.tokenizer.kind, "corpus_tokens": corpus_tokens, "n_layer": n_layer,
                         "n_embd": n_embd, "n_head": n_head, "block_size": block, "batch_size": batch,
                         "dropout": dropout, "params": params, "run_tokens": steps * batch * block,
                         "fraction": round(tr.steps / steps, 3), "tokens": tr.tokens,
                         "passes": round(tr.tokens / corpus_tokens, 3), "val_loss": round(val_loss(tr, prep.val), 4),
                         "train_loss": round(float(np.mean(recent)), 4),
                         "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    m = measure.machine()
    print(f"machine: {m['cpu']}, {a.threads} thread(s), CPU features {m['cpu_features']}, torch {m['torch']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    preps = {kind: corpus(a.corpus, kind, a.cache_dir) for kind in ("char", "bpe")}
    with open(a.out, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for kind, size, shape, dropout, millions in RUNS:
            prep = preps[kind]
            size = size or len(prep.train)
            rows = one_run(prep, size, shape, dropout, millions * 1e6 * a.scale)
            writer.writerows(rows)
            f.flush()
            last = rows[-1]
            print(f"{kind} {size:>9,} tokens, shape {shape} dropout {dropout}: {last['tokens']:,} tokens "
                  f"({last['passes']:.1f} passes) val {last['val_loss']:.4f} train {last['train_loss']:.4f} "
                  f"in {last['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
