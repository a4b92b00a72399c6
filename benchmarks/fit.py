"""Fit tinylm/plan.py's law to the sweep's table and print the constants to paste there, with how well
the law reproduces each run's measured loss.

    python -m benchmarks.fit [benchmarks/results/sweep.csv]

The law: L = E + A / N^alpha + B / D_eff^beta + C (N / U)^gamma (D / U)^delta, D_eff = U R (1 - exp(-D / (U R))), with N
the parameters in the blocks, D the tokens trained on, U the corpus's tokens. For each choice of the
exponents and R on a grid (alpha, beta, R, gamma, delta), E, A and B (one set per tokenizer kind) and C follow by least squares (the law is
linear in them); the grid point with the smallest squared error wins. Only runs without dropout, and only
the points from halfway through a run on (see benchmarks/sweep.py), are fitted.
"""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path

import numpy as np

from benchmarks.sweep import OUT
from tinylm import plan

ALPHAS = np.round(np.arange(0.1, 1.01, 0.1), 2)
BETAS = np.round(np.arange(0.1, 1.01, 0.1), 2)
REPEATS = (2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
GAMMAS = (0.5, 1.0, 1.5, 2.0)
DELTAS = (0.5, 1.0, 2.0)
KINDS = ("char", "bpe")


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        table = [{k: (v if k == "tokenizer" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in table if r["dropout"] == 0 and r["fraction"] >= 0.5]


def design(data: list[dict], alpha: float, beta: float, repeats: float, gamma: float, delta: float) -> np.ndarray:
    """One row per point: [1, N^-alpha, D_eff^-beta] in its tokenizer kind's columns, then (N / U)^gamma
    (D / U)^delta, P = min(D / U, MAX_PASSES), in a column shared by both kinds: only the character runs on
    a small corpus memorised it enough to measure."""
    x = np.zeros((len(data), 3 * len(KINDS) + 1))
    for i, r in enumerate(data):
        n = plan.block_params(int(r["n_layer"]), int(r["n_embd"]))
        limit = r["corpus_tokens"] * repeats
        d = limit * -np.expm1(-r["tokens"] / limit)
        j = 3 * KINDS.index(r["tokenizer"])
        u = r["corpus_tokens"]
        x[i, j : j + 3] = (1.0, n**-alpha, d**-beta)
        x[i, -1] = (n / u) ** gamma * min(r["tokens"] / u, plan.MAX_PASSES) ** delta
    return x


def fit(data: list[dict]) -> tuple[float, float, float, float, float, np.ndarray, float]:
    """(alpha, beta, R, gamma, delta, coefficients, rms error) of the best grid point."""
    y = np.array([r["val_loss"] for r in data])
    best = None
    for alpha, beta, repeats, gamma, delta in itertools.product(ALPHAS, BETAS, REPEATS, GAMMAS, DELTAS):
        x = design(data, alpha, beta, repeats, gamma, delta)
        used = x.any(axis=0)  # a kind the table lacks has no columns to fit
        coef = np.zeros(x.shape[1])
        # Non-negative terms only (a law where more parameters or tokens hurt would be nonsense): a negative
        # least-squares coefficient drops its column and the rest is refitted.
        while True:
            coef[:] = 0
            coef[used] = np.linalg.lstsq(x[:, used], y, rcond=None)[0]
            negative = [j for j in np.flatnonzero(used) if (j % 3 or j == len(coef) - 1) and coef[j] < 0]
            if not negative:
                break
            used[negative] = False
        err = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
        if best is None or err < best[-1]:
            best = (float(alpha), float(beta), repeats, gamma, delta, coef.copy(), err)
    return best


def fit_kind(data: list[dict], memorising: float = plan.MEMORISING) -> tuple[float, float, float, np.ndarray, float]:
    """One tokenizer kind's own (alpha, beta, R, (E, A, B), rms error), the memorising term held at the
    sweep's (gamma, delta, C): for a handful of runs of the current recipe, scored on a whole validation split
    (benchmarks/results/char_recipe.csv), which a grid over the exponents fits exactly or nearly."""
    y = np.array([r["val_loss"] for r in data])
    best = None
    for alpha, beta, repeats in itertools.product(np.round(np.arange(0.05, 1.01, 0.05), 2),
                                                  np.round(np.arange(0.05, 1.01, 0.05), 2), REPEATS):
        x = np.zeros((len(data), 3))
        held = np.zeros(len(data))
        for i, r in enumerate(data):
            n, u = plan.block_params(int(r["n_layer"]), int(r["n_embd"])), r["corpus_tokens"]
            limit = u * repeats
            x[i] = (1.0, n**-alpha, (limit * -np.expm1(-r["tokens"] / limit)) ** -beta)
            held[i] = memorising * (n / u) ** plan.GAMMA * min(r["tokens"] / u, plan.MAX_PASSES) ** plan.DELTA
        coef = np.linalg.lstsq(x, y - held, rcond=None)[0]
        if (coef[1:] < 0).any():  # a law where more parameters or tokens hurt would be nonsense
            continue
        err = float(np.sqrt(np.mean((x @ coef + held - y) ** 2)))
        if best is None or err < best[-1] - 1e-9:
            best = (float(alpha), float(beta), repeats, coef, err)
    return best


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and Path(argv[0]).name == "char_recipe.csv":  # one kind's own law, the sweep's memorising term
        with open(argv[0]) as f:
            data = [{k: (v if k in ("tokenizer", "how") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
        alpha, beta, repeats, (e, a, b), err = fit_kind(data)
        print(f'LAWS["{data[0]["tokenizer"]}"] = ({e:.6g}, {a:.6g}, {alpha}, {b:.6g}, {beta}, {repeats})  '
              f"# rms error {err:.4f} over {len(data)} runs")
        return 0
    data = rows(Path(argv[0]) if argv else OUT)
    alpha, beta, repeats, gamma, delta, coef, err = fit(data)
    print(f"GAMMA, DELTA = {gamma}, {delta}")
    print("LAWS = {  # tokenizer kind: (E, A, alpha, B, beta, R)")
    for i, kind in enumerate(KINDS):
        e, a, b = coef[3 * i : 3 * i + 3]
        print(f'    "{kind}": ({e:.6g}, {a:.6g}, {alpha}, {b:.6g}, {beta}, {repeats}),')
    print(f"}}\nMEMORISING = {coef[-1]:.6g}")
    print(f"rms error {err:.4f} over {len(data)} points")
    predicted = design(data, alpha, beta, repeats, gamma, delta) @ coef
    for r, p in zip(data, predicted):
        if r["fraction"] == 1:
            print(f"  {r['tokenizer']:4} U={r['corpus_tokens']:>9,.0f} {int(r['n_layer'])}L/{int(r['n_embd']):<3} "
                  f"D={r['tokens']:>9,.0f} measured {r['val_loss']:.3f} law {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
