"""Kept snapshots: the checkpoint of each evaluation, so that two moments of training can be compared.

After every checkpoint saved at an evaluation the training loop calls `keep`, which keeps that checkpoint
as run_dir/snapshots/step-NNNNNN.pt (names: tinylm/rundir.py) and then removes the older ones beyond the
newest train.keep_snapshots, never the one of the best validation loss so far. `tinylm explain RUN
--compare A B` reads two of them.

Why this keeps the atomic-save guarantee of checkpoint.pt: a snapshot is a hard link to the checkpoint
file just written (no copy, and no disk space until checkpoint.pt is next replaced, by a rename that
leaves the linked file as it was), made under a temporary name and renamed into place, so a snapshot is
whole or absent whenever the process is killed. Where the file system has no hard links, the checkpoint
is copied through checkpoint.atomic_file, which is as safe. snapshots/index.json (each snapshot's
validation loss, for choosing the best) is written atomically after the snapshot; a snapshot it lacks
(a kill in between) counts as not the best.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tinylm import checkpoint, rundir


def read_index(run_dir: Path) -> dict[int, float]:
    try:
        raw = json.loads((run_dir / rundir.SNAPSHOTS / rundir.SNAPSHOT_INDEX).read_text())
        return {int(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError):  # missing or damaged: no snapshot counts as the best
        return {}


def write_index(run_dir: Path, index: dict[int, float]) -> None:
    with checkpoint.atomic_file(run_dir / rundir.SNAPSHOTS / rundir.SNAPSHOT_INDEX) as f:
        f.write(json.dumps({str(k): v for k, v in sorted(index.items())}, indent=1).encode())


def link_or_copy(source: Path, target: Path) -> None:
    """target becomes source's content, atomically: a hard link renamed into place, else an atomic copy."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network and FAT file systems)
        with open(source, "rb") as src, checkpoint.atomic_file(target) as dst:
            shutil.copyfileobj(src, dst)
        return
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename survives a power cut
    finally:
        os.close(fd)


def chosen(steps: list[int], index: dict[int, float], n: int) -> set[int]:
    """The snapshots to keep: the newest n, and the one of the lowest validation loss."""
    kept = set(steps[-n:]) if n else set()
    scored = [s for s in steps if s in index]
    if scored:
        kept.add(min(scored, key=lambda s: (index[s], -s)))
    return kept


def keep(run_dir: Path, step: int, val_loss: float, n: int) -> list[int]:
    """Keep run_dir's checkpoint (just saved at `step`, whose evaluation gave val_loss) as a snapshot, then
    remove the snapshots that `chosen` drops. Returns the steps kept."""
    folder = run_dir / rundir.SNAPSHOTS
    folder.mkdir(exist_ok=True)
    link_or_copy(run_dir / rundir.CHECKPOINT, rundir.snapshot_path(run_dir, step))
    index = read_index(run_dir)
    index[step] = val_loss
    write_index(run_dir, index)
    steps = rundir.snapshot_steps(run_dir)
    kept = chosen(steps, index, n)
    for s in steps:
        if s not in kept:
            rundir.snapshot_path(run_dir, s).unlink(missing_ok=True)
    if set(index) - kept:
        write_index(run_dir, {s: v for s, v in index.items() if s in kept})
    return sorted(kept)


def disk_cost(run_dir: Path, n: int) -> str:
    """What the snapshots cost on disk, in words, for the log."""
    size = (run_dir / rundir.CHECKPOINT).stat().st_size
    return (f"snapshots: the checkpoints of the latest {n} evaluations and of the best are kept in "
            f"{run_dir / rundir.SNAPSHOTS}: up to {n + 1} x {size / 1e6:.1f} MB = {(n + 1) * size / 1e6:.0f} MB "
            f"(the newest shares its space with {rundir.CHECKPOINT}; train.keep_snapshots=0 keeps none)")


def after_save(run_dir: Path, step: int, evaluation: dict, n: int, say: Callable[[str], None]) -> None:
    """The loop's call after a checkpoint is written: at an evaluation keep it (a failure is a warning;
    the checkpoint itself is saved), and say what snapshots cost the first time."""
    if not n or evaluation.get("eval_step") != step:
        return
    first = not rundir.snapshot_steps(run_dir)
    try:
        keep(run_dir, step, evaluation["val_loss"], n)
        if first:
            say(disk_cost(run_dir, n))
    except OSError as e:
        say(f"warning: could not keep a snapshot of step {step} in {run_dir / rundir.SNAPSHOTS}: {e.strerror or e}; "
            "training goes on")
