"""`tinylm explain RUN --compare A B`: zero between identical snapshots, a hand-made change reported exactly."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tinylm import checkpoint, cli, rundir
from tinylm.compare import compare


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared run, whose snapshots (steps 50 and 100) the tests add to."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], copy)
    return copy


def test_identical_snapshots_report_zero_movement(run):
    shutil.copy(rundir.snapshot_path(run, 100), rundir.snapshot_path(run, 200))
    lines = []
    result = compare(run, 100, 200, lines.append)
    assert all(m.change == 0 and m.relative == 0 for m in result["tensors"])
    assert all(a == b for a, b in result["tracked"].values()) and len(result["tracked"]) == 2
    assert result["probe"][0] == result["probe"][1]
    assert all(change == 0 for _, change, _ in result["tokens"])
    assert "(moved +0.000000)" in "\n".join(lines)


def test_a_hand_made_change_is_reported_exactly(run):
    state = checkpoint.load(rundir.snapshot_path(run, 100))
    w = state["model"]["blocks.0.mlp.fc.weight"]
    before = w.double().norm().item()
    w[2, 3] += 0.5
    state["model"]["tok_emb.weight"][7] += 0.25  # (the output head shares this matrix: it moves with it)
    state["model"]["tok_emb.weight"][9, 0] -= 0.125
    checkpoint.save(state, rundir.snapshot_path(run, 300))
    lines = []
    result = compare(run, 100, 300, lines.append)
    moved = {m.name: m for m in result["tensors"] if m.change}
    assert set(moved) == {"blocks.0.mlp.fc.weight", "tok_emb.weight", "head.weight"}
    fc = moved["blocks.0.mlp.fc.weight"]
    assert fc.change == pytest.approx(0.5, rel=1e-6) and fc.relative == pytest.approx(0.5 / before, rel=1e-6)
    emb = math.sqrt(0.25**2 * w.size(1) + 0.125**2)
    assert moved["tok_emb.weight"].change == pytest.approx(emb, rel=1e-6)
    (top, change, _), (second, change2, _) = result["tokens"][:2]
    assert (top, second) == (7, 9)
    assert change == pytest.approx(0.25 * math.sqrt(w.size(1)), rel=1e-6) and change2 == pytest.approx(0.125, rel=1e-6)
    assert result["tokens"][2][1] == 0
    assert result["probe"][0] != result["probe"][1]  # the model changed: so did its losses on the probe


def test_cli_compare_and_its_bad_input(run, capsys):
    assert cli.main(["explain", str(run), "--compare", "50", "100"]) == 0
    out = capsys.readouterr().out
    for heading in ("1. THE TENSORS THAT MOVED MOST", "2. THE TRACKED NUMBERS", "3. THE PROBE", "4. THE TOKENS"):
        assert heading in out
    assert cli.main(["explain", str(run), "--compare", "50", "70"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no snapshot of step 70") and "(kept: 50, 100)" in err[0]
    assert cli.main(["explain", "--compare", "50", "100"]) == 2
    assert capsys.readouterr().err.startswith("error: --compare needs a trained run")


def test_moved_tensors_relative_to_a_zero_tensor():
    from tinylm.compare import moved_tensors

    a = {"b": torch.zeros(3), "w": torch.ones(4)}
    rows = {m.name: m for m in moved_tensors(a, {"b": torch.tensor([0.0, 3.0, 4.0]), "w": torch.ones(4)})}
    assert rows["b"].change == 5 and rows["b"].relative == math.inf and rows["w"].relative == 0
