"""float16 training with loss scaling, on the CPU (PyTorch runs float16 autocast and the GradScaler there
too): it learns as float32 does, an overflow is the scaler's business and not a blow-up, a collapsing
scale stops the run with one line, and a resume is exact, the scale included."""

import copy
import math
import signal
import time

import pytest
import torch
from conftest import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import checkpoint, rundir
from tinylm.config import TrainConfig
from tinylm.console import QUIET, Console
from tinylm.distributed import Dist
from tinylm.errors import UserError
from tinylm.loop import train
from tinylm.model import GPT
from tinylm.optim import make_optimizer
from tinylm.step import MicroBatch, make_learner, train_step

FP16 = {"dtype": "float16"}
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: faster on one thread (conftest.py)


def run_cfg(tmp_path, markov_file, **train_fields):
    return tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                       train={**FP16, "max_steps": 30, "eval_interval": 30, "log_interval": 1, "sample_tokens": 0,
                              **train_fields})


def scalars(run_dir, tag) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)}


def test_float16_learns_as_float32_does(tmp_path, markov_file):
    lines: list[str] = []
    half = train(run_cfg(tmp_path, markov_file, max_steps=60, eval_interval=60), run_dir=tmp_path / "fp16",
                 console=Console(lines.append))
    full = train(run_cfg(tmp_path, markov_file, max_steps=60, eval_interval=60, dtype="float32"),
                 run_dir=tmp_path / "fp32", console=QUIET)
    assert any("float16 autocast with loss scaling" in line for line in lines)
    assert full.metrics["val_loss"] < math.log(9) - 0.5  # it learned something...
    assert half.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], abs=0.02)  # ...and float16 as much
    state = checkpoint.load(tmp_path / "fp16" / rundir.CHECKPOINT)
    assert state["scaler"]["scale"] == 65536.0  # no overflow in 60 steps: the starting scale, not yet grown


def test_the_step_sees_the_true_gradients():
    """The gradient norm a float16 step clips and reports is the float32 one (the scaler divides its
    65,536 back out before clipping), and Muon's momentum holds the true gradients."""
    from tinylm.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    x, y = torch.randint(20, (4, 32)), torch.randint(20, (4, 32))
    results = []
    for dtype in (None, torch.float16):
        torch.manual_seed(1)
        model = GPT(cfg, 20)
        learner = make_learner(model, make_optimizer(model, TrainConfig(), CPU, dtype), Dist(CPU), dtype, compile=False)
        assert (learner.scaler is not None) == (dtype == torch.float16)
        _, norm = train_step(learner, [MicroBatch(x, y)], 1e-3, grad_clip=0.0)
        buffers = [learner.optimizer.state[p]["momentum_buffer"] for p in learner.optimizer.param_groups[2]["params"]]
        results.append((norm.item(), buffers))
    (norm32, buf32), (norm16, buf16) = results
    assert norm16 == pytest.approx(norm32, rel=0.02)
    for a, b in zip(buf32, buf16):  # equal to float16's precision (scaled, they would be 65,536 times larger)
        assert (a - b).norm() < 0.01 * a.norm()


def test_an_overflow_is_skipped_and_the_scale_halved_without_tripping_the_guard(tmp_path, markov_file, monkeypatch):
    clean = train(run_cfg(tmp_path, markov_file), run_dir=tmp_path / "clean", console=QUIET)
    monkeypatch.setenv("TINYLM_TEST_OVERFLOW_STEPS", "5,9-12")  # 4 in a row: past max_bad_steps=3 for a blow-up
    lines: list[str] = []
    result = train(run_cfg(tmp_path, markov_file), run_dir=tmp_path / "overflow", console=Console(lines.append))
    assert result.step == 30 and math.isfinite(result.metrics["val_loss"])
    assert not [line for line in lines if line.startswith("warning")]  # no blow-up was reported
    a = checkpoint.load(tmp_path / "clean" / rundir.CHECKPOINT)
    b = checkpoint.load(tmp_path / "overflow" / rundir.CHECKPOINT)
    assert b["scaler"]["scale"] == a["scaler"]["scale"] / 2**5  # halved once per overflow
    # Every optimizer part counted its updates: 30 steps less the 5 skipped.
    assert {int(s["step"]) for s in a["optimizer"]["state"].values()} == {30}
    assert {int(s["step"]) for s in b["optimizer"]["state"].values()} == {25}
    logged = scalars(tmp_path / "overflow", "amp/loss_scale")
    assert logged[4] == 65536 and logged[5] == 32768 and logged[12] == 65536 / 32
    assert scalars(tmp_path / "overflow", "amp/overflow_steps")[30] == 5
    del clean


def test_a_collapsing_scale_stops_the_run_with_one_line(tmp_path, markov_file, monkeypatch):
    monkeypatch.setenv("TINYLM_TEST_OVERFLOW_STEPS", "3-200")
    cfg = run_cfg(tmp_path, markov_file, max_steps=60, eval_interval=20)
    with pytest.raises(UserError) as stopped:
        train(cfg, run_dir=tmp_path / "run", console=QUIET)
    message = str(stopped.value)
    # 65,536 halved 30 times (steps 3-32) is 6.1e-05, the first scale below 1e-4.
    assert message.startswith("training diverged: the float16 loss scale fell to 6.1e-05 (below 0.0001) at step 32: "
                              "the gradients overflowed float16 at 30 steps in a row")
    assert "train in bfloat16 or float32 (train.dtype)" in message and "\n" not in message
    assert checkpoint.load(tmp_path / "run" / rundir.CHECKPOINT)["step"] == 20  # the last evaluation's save is kept


def test_a_nan_loss_in_float16_is_still_a_blow_up(tmp_path, markov_file, monkeypatch):
    monkeypatch.setenv("TINYLM_TEST_NAN_STEPS", "5-7")
    with pytest.raises(UserError, match=r"^training diverged: the loss or the gradient was not finite for 3 steps"):
        train(run_cfg(tmp_path, markov_file), run_dir=tmp_path / "run", console=QUIET)


def test_float16_resume_is_bit_identical_scale_included(tmp_path, markov_file, monkeypatch):
    # Overflows before and after the stop: the resumed run must continue from the scale it had.
    monkeypatch.setenv("TINYLM_TEST_OVERFLOW_STEPS", "4,15")
    cfg = run_cfg(tmp_path, markov_file, max_steps=20, eval_interval=20, grad_accum=2)
    cfg.model.dropout = 0.1
    straight = train(cfg, run_dir=tmp_path / "straight", console=QUIET)
    split_cfg = copy.deepcopy(cfg)
    split_cfg.train.eval_interval = 10

    def interrupt_at_10(line: str) -> None:
        if line.startswith("step 10:"):
            signal.raise_signal(signal.SIGINT)

    assert train(split_cfg, run_dir=tmp_path / "split", console=Console(interrupt_at_10)).step == 10
    assert checkpoint.load(tmp_path / "split" / rundir.CHECKPOINT)["scaler"]["scale"] == 32768.0
    time.sleep(max(0.0, 1.05 - time.time() % 1.0))  # a new TensorBoard event file name (see test_resume.py)
    resumed = train(cfg, run_dir=tmp_path / "split", resume=True, console=QUIET)
    assert resumed.step == straight.step == 20
    a, b = (checkpoint.load(tmp_path / name / rundir.CHECKPOINT) for name in ("straight", "split"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 16384.0
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]
