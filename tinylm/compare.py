"""`tinylm explain RUN --compare A B`: what training did between two kept snapshots (steps A and B).

    tinylm explain runs/default --compare 250 1000

Four views of the same change, every number computed from the two snapshots (tinylm/snapshots.py):

1. the tensors that moved most: the norm of each tensor's change ||W_B - W_A||, and that relative to the
   tensor, ||W_B - W_A|| / ||W_A|| (the update-to-weight ratio of TensorBoard's update_ratio/, summed
   over the steps between A and B);
2. the tracked numbers (train.track, tinylm/track.py): each one's value at A and at B;
3. the probe (tinylm/probe.py): the loss on each of its tokens at A and at B;
4. the tokens whose embeddings moved most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tinylm import checkpoint, rundir, track
from tinylm.errors import UserError
from tinylm.probe import make_probe, read

TOP = 10  # rows of each table


@dataclass
class Moved:
    name: str
    before: float  # ||W_A||
    change: float  # ||W_B - W_A||

    @property
    def relative(self) -> float:
        return self.change / self.before if self.before else (0.0 if not self.change else float("inf"))


def load_snapshot(run_dir: Path, step: int, cfg):
    """(model, checkpoint state) of the snapshot of `step`; one line naming the kept steps if there is none."""
    from tinylm.model import GPT

    path = rundir.snapshot_path(run_dir, step)
    if not path.is_file():
        kept = ", ".join(map(str, rundir.snapshot_steps(run_dir))) or "none"
        raise UserError(f"no snapshot of step {step} in {run_dir / rundir.SNAPSHOTS} (kept: {kept}); snapshots are "
                        "the checkpoints of evaluations, train.keep_snapshots of them and the best")
    state = checkpoint.require(checkpoint.load(path), checkpoint.RUN_KEYS, path)
    rundir.compare(rundir.trained_config(state, path), cfg, f"{path} is not a snapshot of this run's model",
                   f"undo that edit of {rundir.CONFIG}")
    model = GPT(cfg.model, state["vocab_size"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def moved_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[Moved]:
    """Every tensor's change from a to b, the largest relative change first."""
    rows = [Moved(name, float(a[name].double().norm()), float((b[name].double() - a[name].double()).norm()))
            for name in a]
    return sorted(rows, key=lambda m: (-m.relative, m.name))


def moved_tokens(a: torch.Tensor, b: torch.Tensor) -> list[tuple[int, float, float]]:
    """(token id, ||e_B - e_A||, relative to ||e_A||) of the embeddings that moved most."""
    change = (b.double() - a.double()).norm(dim=1)
    order = change.argsort(descending=True, stable=True)[:TOP]
    size = a.double().norm(dim=1)
    return [(int(i), float(change[i]), float(change[i] / size[i]) if size[i] else 0.0) for i in order]


def compare(run_dir: str | Path, step_a: int, step_b: int, out: Callable[[str], None] = print) -> dict:
    """Print the four views (see the module's docstring); return their numbers."""
    run_dir = Path(run_dir)
    rundir.require_checkpoint(run_dir, "; train into it first")
    from tinylm import config as config_
    from tinylm.tokenizer import TextTokenizer

    cfg = config_.load(run_dir / rundir.CONFIG)
    tok = TextTokenizer.load(run_dir / rundir.TOKENIZER)
    (model_a, state_a), (model_b, state_b) = (load_snapshot(run_dir, s, cfg) for s in (step_a, step_b))
    out(f"From step {step_a:,} to step {step_b:,} of {run_dir}: what training changed")
    tensors = moved_tensors(state_a["model"], state_b["model"])
    section_tensors(tensors, out)
    tracked, _ = track.choose(cfg.train.track, model_a, cfg.train.seed)
    values = {t.label: (float(state_a["model"][t.name][t.index]), float(state_b["model"][t.name][t.index]))
              for t in tracked}
    section_tracked(values, out)
    probe_text = state_b.get("probe") or state_a.get("probe") or cfg.train.probe
    losses = None
    if probe_text and probe_text.lower() != "none":
        probe = make_probe(probe_text, tok, np.zeros(1, dtype=np.int64), cfg.model.block_size)
        losses = (read(model_a, probe).losses, read(model_b, probe).losses)
        section_probe(probe.labels, losses, step_a, step_b, out)
    tokens = moved_tokens(state_a["model"]["tok_emb.weight"], state_b["model"]["tok_emb.weight"])
    section_tokens(tokens, tok, out)
    return {"tensors": tensors, "tracked": values, "probe": losses, "tokens": tokens}


def section_tensors(rows: list[Moved], out: Callable[[str], None]) -> None:
    out("\n1. THE TENSORS THAT MOVED MOST (relative to their size)")
    out(f"  {'tensor':<28} {'||W_A||':>10} {'||W_B - W_A||':>14} {'relative':>9}")
    for m in rows[:TOP]:
        out(f"  {m.name:<28} {m.before:>10.4f} {m.change:>14.6f} {m.relative:>9.2%}")


def section_tracked(values: dict[str, tuple[float, float]], out: Callable[[str], None]) -> None:
    out("\n2. THE TRACKED NUMBERS (train.track; TensorBoard's track/ shows every step between)")
    if not values:
        out("  none (train.track=none)")
    for label, (a, b) in values.items():
        out(f"  {label:<32} {a:+.6f} -> {b:+.6f}  (moved {b - a:+.6f})")


def section_probe(labels: list[str], losses: tuple[list[float], list[float]], step_a: int, step_b: int,
                  out: Callable[[str], None]) -> None:
    out("\n3. THE PROBE: the loss on each token (-log of the probability the model gave it)")
    out(f"  {'token':<14} {f'step {step_a:,}':>10} {f'step {step_b:,}':>10} {'change':>8}")
    for label, a, b in zip(labels[1:], *losses):
        out(f"  {label:<14} {a:>10.3f} {b:>10.3f} {b - a:>+8.3f}")
    mean_a, mean_b = (sum(x) / len(x) for x in losses)
    out(f"  {'mean':<14} {mean_a:>10.3f} {mean_b:>10.3f} {mean_b - mean_a:>+8.3f}")


def section_tokens(rows: list[tuple[int, float, float]], tok, out: Callable[[str], None]) -> None:
    out("\n4. THE TOKENS WHOSE EMBEDDINGS MOVED MOST")
    out(f"  {'token':<14} {'||e_B - e_A||':>14} {'relative':>9}")
    for i, change, relative in rows:
        out(f"  {tok.decode([i])!r:<14} {change:>14.6f} {relative:>9.2%}")
