"""Check the planner's rule on a corpus the sweep never saw: train every ladder shape on the tokens a time
budget buys it on this machine (its measured speed, tinylm/timings.py), and set the measured losses beside
the law's (tinylm/plan.py). The rule holds where the shape it plans is the one that measures best, or
close to it.

    python -m benchmarks.check_plan --corpus my.txt --budget 60     # default: the built-in corpus

Each shape trains for a fixed number of steps (the budget's tokens, evaluations taken out), so other work
on the machine slows the check but does not change it. The law's E (a corpus's own difficulty) is not
known for a new corpus: the table compares each shape's loss with the planned shape's, measured and
predicted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.sweep import one_run
from tinylm import config as config_
from tinylm import measure, plan, timings
from tinylm.hardware import autocast_dtype
from tinylm.prepare import prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="a text the sweep never saw (default: the built-in corpus)")
    p.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training to plan for")
    p.add_argument("--shapes", nargs="+", default=["A", "B", "C", "D", "E"], choices=list(plan.LADDER))
    p.add_argument("--cache_dir", default="data/cache")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cpu")
    dtype = autocast_dtype("auto", device)
    timings.choose_threads(device, dtype, print)
    overhead = plan.Overhead.of(8, 20, 120)  # the default run's evaluations
    for kind in a.tokenizers:
        cfg = config_.load(None, {"data.paths": [str(a.corpus)] if a.corpus else [], "data.tokenizer": kind,
                                  "data.cache_dir": a.cache_dir})
        prep = prepare(cfg.data)
        corpus, vocab = len(prep.train), prep.tokenizer.vocab_size
        rows = []
        for shape in a.shapes:
            m, batch = timings.shape_config(shape, kind)
            speed, _ = timings.speed(m, batch, vocab, device, dtype)
            tokens = plan.budget_tokens(speed, batch * m.block_size, a.budget, overhead)
            dropout = plan.dropout_for(tokens / corpus, plan.block_params(m.n_layer, m.n_embd), corpus)
            measured = one_run(prep, corpus, shape, dropout, tokens)[-1]["val_loss"]
            rows.append((shape, speed, tokens, dropout, measured, plan.predicted_loss(shape, tokens, corpus, kind)))
            print(f"  {kind} {shape}: {tokens:,.0f} tokens, dropout {dropout}, val {measured:.4f}", flush=True)
        speeds = {shape: speed for shape, speed, *_ in rows}
        chosen, _ = plan.choose(a.budget, 10**9, corpus, kind, speeds, overhead=overhead)
        ref = {r[0]: r for r in rows}[chosen]
        m = measure.machine()
        print(f"\n{a.corpus or 'built-in corpus'}, {kind}: {corpus:,} training tokens, budget {a.budget:g} s; "
              f"planned shape {chosen}\nmachine: {m['cpu']}, {m['cpu_threads']} threads, CPU features "
              f"{m['cpu_features']}, torch {m['torch']}\n")
        print("| shape | tokens/s | tokens | passes | dropout | val loss | vs planned | law: vs planned |")
        print("|---|---|---|---|---|---|---|---|")
        for shape, speed, tokens, dropout, measured, law in rows:
            n_layer, n_embd, *_ = plan.LADDER[shape]
            print(f"| {shape} {n_layer}L/{n_embd} | {speed:,.0f} | {tokens:,.0f} | {tokens / corpus:.2f} | {dropout} | "
                  f"{measured:.4f} | {measured - ref[4]:+.4f} | {law - ref[5]:+.4f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
