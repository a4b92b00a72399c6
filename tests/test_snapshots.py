"""Kept snapshots: bounded, the best kept, each a whole checkpoint (kills mid-save: tests/test_faults.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tinylm import checkpoint, rundir, snapshots


def save_step(run_dir, step: int) -> None:
    checkpoint.save({"step": step, "model": {"w": torch.full((3,), float(step))}}, run_dir / rundir.CHECKPOINT)


def test_the_newest_n_and_the_best_are_kept_each_a_whole_checkpoint(tmp_path):
    losses = {10: 5.0, 20: 3.0, 30: 4.0, 40: 4.5, 50: 4.2, 60: 4.1}
    said = []
    for step, loss in losses.items():
        save_step(tmp_path, step)
        snapshots.after_save(tmp_path, step, {"eval_step": step, "val_loss": loss}, 2, said.append)
        assert len(rundir.snapshot_steps(tmp_path)) <= 3
    assert rundir.snapshot_steps(tmp_path) == [20, 50, 60]  # the newest two and the best (step 20)
    assert snapshots.read_index(tmp_path) == {20: 3.0, 50: 4.2, 60: 4.1}
    for step in (20, 50, 60):
        assert checkpoint.load(rundir.snapshot_path(tmp_path, step))["step"] == step
    assert len(said) == 1 and "up to 3 x" in said[0] and "MB" in said[0]  # the disk cost, said once
    # The newest is a hard link to checkpoint.pt: no space of its own until the checkpoint is replaced,
    # by a rename that leaves the snapshot as it was.
    assert os.path.samefile(rundir.snapshot_path(tmp_path, 60), tmp_path / rundir.CHECKPOINT)
    save_step(tmp_path, 70)
    assert checkpoint.load(rundir.snapshot_path(tmp_path, 60))["step"] == 60
    assert not list((tmp_path / rundir.SNAPSHOTS).glob(".*"))


def test_no_snapshot_between_evaluations_or_when_turned_off(tmp_path):
    save_step(tmp_path, 5)
    snapshots.after_save(tmp_path, 5, {"eval_step": 0, "val_loss": 1.0}, 3, print)  # a save by time, not an evaluation
    snapshots.after_save(tmp_path, 5, {"eval_step": 5, "val_loss": 1.0}, 0, print)  # keep_snapshots=0
    assert rundir.snapshot_steps(tmp_path) == []


def test_without_hard_links_the_checkpoint_is_copied(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    save_step(tmp_path, 10)
    monkeypatch.setattr(os, "link", no_links)
    snapshots.keep(tmp_path, 10, 2.0, 1)
    path = rundir.snapshot_path(tmp_path, 10)
    assert not os.path.samefile(path, tmp_path / rundir.CHECKPOINT)
    assert path.read_bytes() == (tmp_path / rundir.CHECKPOINT).read_bytes()


def test_a_training_run_keeps_the_checkpoint_of_each_evaluation(trained_run):
    run_dir = rundir.Path(trained_run["run_dir"])
    assert rundir.snapshot_steps(run_dir) == [50, 100]  # the evaluations with a save (step 0 has none)
    last = checkpoint.load(rundir.snapshot_path(run_dir, 100))
    final = checkpoint.load(run_dir / rundir.CHECKPOINT)
    for name, tensor in final["model"].items():
        assert torch.equal(last["model"][name], tensor)
    assert snapshots.read_index(run_dir)[100] == pytest.approx(trained_run["val_loss"])
