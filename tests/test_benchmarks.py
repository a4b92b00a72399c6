"""The benchmark harness measures what it says (its figures are printed, never asserted here)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, markov_text

from benchmarks.common import Trainer, full_val_loss, recipe


def test_full_validation_loss_covers_every_window(tmp_path):
    (tmp_path / "c.txt").write_text(markov_text(20_000))
    cfg = recipe("tuned", tmp_path / "c.txt", str(tmp_path / "cache"),
                 {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 16, "train.device": "cpu",
                  "train.dtype": "float32"})  # the reference loop below runs in float32 too
    from tinylm.prepare import prepare

    tr = Trainer(cfg, prepare(cfg.data))
    ids = torch.from_numpy(tr.prep.val.astype("int64"))
    n = (len(ids) - 1) // 16
    with torch.no_grad():
        tr.model.eval()
        losses = [tr.model(ids[i * 16 : i * 16 + 16][None], ids[i * 16 + 1 : i * 16 + 17][None])[1].item() for i in range(n)]
    assert math.isclose(full_val_loss(tr, batch=7), sum(losses) / n, rel_tol=1e-4)


@pytest.mark.slow  # the whole benchmark at toy sizes; its parts are tested above
def test_run_prints_the_table_and_writes_json(tmp_path):
    (tmp_path / "c.txt").write_text(markov_text(20_000))
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "benchmarks.run", "--corpus", str(tmp_path / "c.txt"), "--suites", "loss",
            "--budgets", "1", "--evals", "2", "--own_steps", "6", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seconds to 1.886" in done.stdout and "best in 1 s" in done.stdout
    results = json.loads(out.read_text())
    runs = results["loss"]
    assert set(runs) == {"own/baseline", "1/baseline", "1/tuned"}
    for r in runs.values():
        assert r["steps"] > 0 and len(r["curve"]) >= 2 and r["best_val"] == min(v for _, v in r["curve"])
    # The baseline's own run: exactly its steps, on its own step schedule, evaluated every 6/2 = 3 steps.
    assert runs["own/baseline"]["steps"] == 6 and len(runs["own/baseline"]["curve"]) == 3
    assert "baseline's own 6-step run" in done.stdout
    assert results["recipes"]["baseline"]["model"]["pos"] == "learned"
    bad = subprocess.run([*args[:3], "--corpus", str(tmp_path / "missing.txt")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "corpus not found" in bad.stderr


def test_the_cpu_shakespeare_config_is_the_benchmarked_600s_model():
    """configs/shakespeare_char_cpu.yaml promises the loss the benchmark measured for its 600 s budget:
    it must be that model (the default recipe at the benchmark's 600 s shape) with that time limit."""
    from benchmarks.run import LOSS_SHAPES, shape_for
    from tinylm import config as config_

    cfg = config_.load(ROOT / "configs" / "shakespeare_char_cpu.yaml")
    shape = shape_for(LOSS_SHAPES, 600)
    field = lambda c, key: getattr(getattr(c, key.split(".")[0]), key.split(".")[1])  # noqa: E731
    assert {key: field(cfg, key) for key in shape} == shape
    assert cfg.train.max_time == 600 and cfg.data.tokenizer == "char"
    tuned = recipe("tuned", ROOT / "README.md", "unused")  # the recipe's settings other than shape and data
    for section in ("model", "train"):
        for key, value in vars(getattr(tuned, section)).items():
            if f"{section}.{key}" not in shape and key not in ("max_steps", "max_time", "eval_interval", "eval_batches", "sample_tokens"):
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
