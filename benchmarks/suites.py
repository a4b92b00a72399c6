"""The benchmarks themselves; each returns plain data (dicts of figures) and prints nothing.

throughput   training tokens/s and achieved FLOP/s at a fixed shape
budget_run   train for a fixed time, evaluating the full validation split along the way
sampling     tokens/s of generation with and without the KV cache, and ms per token along the output
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import Trainer, full_val_loss, sync
from tinylm.config import Config
from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.prepare import Prepared


def throughput(cfg: Config, prep: Prepared, seconds: float, warmup_steps: int = 3, foreach_adamw: bool = False) -> dict[str, Any]:
    """Tokens/s over `seconds` of steady training, after `warmup_steps` (which include any compilation)."""
    tr = Trainer(cfg, prep, foreach_adamw=foreach_adamw)
    start = time.perf_counter()
    for _ in range(warmup_steps):
        tr.step(cfg.train.lr)
    sync(tr.device)
    warmup = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        tr.step(cfg.train.lr)
        steps += 1
        if steps % 5 == 0:
            sync(tr.device)
    sync(tr.device)
    took = time.perf_counter() - start
    return {"tokens_per_s": steps * tr.tokens_per_step / took, "steps": steps, "seconds": took,
            "warmup_s": warmup, "autocast": str(tr.dtype).replace("torch.", "") if tr.dtype else "float32"}


def budget_run(cfg: Config, prep: Prepared, budget: float | None, n_evals: int, target: float,
               foreach_adamw: bool = False) -> dict[str, Any]:
    """Train for `budget` seconds (the schedule's cosine timed to end there; compilation counts, evaluation
    does not), with the full validation loss every budget/n_evals seconds and at the end.

    budget=None runs the recipe exactly as configured instead: its max_steps and its step-based schedule
    (nanoGPT's 2,000 iterations for the baseline), evaluated every max_steps/n_evals steps."""
    if budget:
        cfg.train.max_time, cfg.train.max_steps = budget, 10**9
    tr = Trainer(cfg, prep, foreach_adamw=foreach_adamw)
    curve = [(0.0, full_val_loss(tr))]
    total = budget or cfg.train.max_steps  # seconds, or steps
    elapsed, next_eval = 0.0, total / n_evals
    position = lambda: elapsed if budget else tr.steps  # noqa: E731
    while position() < total:
        start = time.perf_counter()
        tr.step(tr.lr_at(elapsed))
        due = elapsed + (time.perf_counter() - start) >= min(next_eval, budget) if budget else tr.steps >= next_eval
        if due:
            sync(tr.device)  # the clock must include the queued GPU work before an evaluation
        elapsed += time.perf_counter() - start
        if position() >= next_eval or position() >= total:
            curve.append((elapsed, full_val_loss(tr)))
            while next_eval <= position():
                next_eval += total / n_evals
    reached = next((t for t, loss in curve if loss <= target), None)
    return {"budget_s": budget, "steps": tr.steps, "tokens": tr.tokens, "seconds": elapsed, "curve": curve,
            "best_val": min(loss for _, loss in curve), "final_val": curve[-1][1], "time_to_target_s": reached}


def sampling(cfg: Config, prep: Prepared, n_tokens: int, use_cache: bool) -> dict[str, Any]:
    """Generate n_tokens from an untrained model (speed does not depend on the weights' values)."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, prep.tokenizer.vocab_size).eval()
    gen = torch.Generator().manual_seed(0)
    stamps = []
    start = time.perf_counter()
    for _ in generate(model, [prep.tokenizer.eot_id], n_tokens, temperature=1.0, gen=gen, use_cache=use_cache):
        stamps.append(time.perf_counter() - start)
    quarters = [round(n_tokens * q / 4) for q in range(5)]
    ms_per_token = [
        1000 * (stamps[b - 1] - (stamps[a - 1] if a else 0.0)) / (b - a) for a, b in zip(quarters, quarters[1:])
    ]
    return {"tokens": n_tokens, "seconds": stamps[-1], "tokens_per_s": n_tokens / stamps[-1],
            "ms_per_token_by_quarter": ms_per_token}
