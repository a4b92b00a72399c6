"""Exact resume, what a resume refuses and allows, and the blow-up guard, in-process (the process-level
faults are in test_faults.py)."""

import copy
import math
import os
import signal
import time

import pytest
import torch
from conftest import markov_text, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import checkpoint, guard, rundir
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: faster on one thread (conftest.py)


def train_losses(run_dir) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")]


def test_resume_is_bit_identical(tmp_path, markov_file):
    # Dropout and two micro-batches per step: the resume must restore torch's RNG and the batch sampler.
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, model={"dropout": 0.1},
                      train={"max_steps": 24, "eval_interval": 8, "log_interval": 1, "sample_tokens": 8, "grad_accum": 2})
    straight = train(cfg, run_dir=tmp_path / "straight", console=QUIET)

    # The split run evaluates (and samples) every 5 steps, which must not disturb training, and is stopped
    # by a real SIGINT after its evaluation at step 10, a step where the straight run saved nothing.
    split_cfg = copy.deepcopy(cfg)
    split_cfg.train.eval_interval = 5

    def interrupt_at_10(line: str) -> None:
        if line.startswith("step 10:"):
            signal.raise_signal(signal.SIGINT)  # to this thread: handled before the loop goes on

    first = train(split_cfg, run_dir=tmp_path / "split", console=Console(interrupt_at_10))
    assert first.interrupted and first.signal == signal.SIGINT and first.step == 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    lines: list[str] = []
    # TensorBoard reads a folder's event files in name order: whole seconds, then a per-process counter
    # compared as text (".10" before ".9"), so a resume within the same second can sort first: start the
    # resumed run in the next second, as any real resume is.
    time.sleep(max(0.0, 1.05 - time.time() % 1.0))
    resumed = train(cfg, run_dir=tmp_path / "split", resume=True, console=Console(lines.append))
    assert "resume: train.eval_interval: 5 -> 8" in lines and "resumed " + str(tmp_path / "split") + " at step 10" in lines

    assert resumed.step == straight.step == 24
    a, b = (checkpoint.load(tmp_path / name / rundir.CHECKPOINT) for name in ("straight", "split"))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    a_opt, b_opt = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(a_opt[i][k], b_opt[i][k]) for i in a_opt for k in a_opt[i])
    curve = train_losses(tmp_path / "straight")
    assert [s for s, _ in curve] == list(range(1, 25)) and train_losses(tmp_path / "split") == curve
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]


def test_resume_refuses_what_matters_and_allows_the_rest(tmp_path, markov_file):
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, train={"max_steps": 4, "eval_interval": 4, "sample_tokens": 0})
    run = tmp_path / "run"
    train(cfg, run_dir=run, console=QUIET)

    def refused(change, message: str) -> None:
        changed = copy.deepcopy(cfg)
        change(changed)
        with pytest.raises(UserError, match=message):
            train(changed, run_dir=run, resume=True, console=QUIET)

    refused(lambda c: setattr(c.model, "n_layer", 2), r"model.n_layer was 1 and is now 2 \(the architecture must not change\)")
    refused(lambda c: setattr(c.model, "tie_embeddings", False), r"model.tie_embeddings was True and is now False")
    refused(lambda c: (setattr(c.data, "tokenizer", "bpe"), setattr(c.data, "vocab_size", 300)),
            r"data.tokenizer was 'char' and is now 'bpe' \(the tokenizer must not change\)")
    refused(lambda c: setattr(c.data, "val_fraction", 0.2),
            r"the data differs from the checkpoint's \(train/val tokens 27,001/3,001, now 24,001/6,001\) "
            r"\(data.val_fraction was 0.1 and is now 0.2\)")
    edited = tmp_path / "edited.txt"  # the same path with new text: the config is the same, the data is not
    edited.write_text(markov_text(30_000, seed=1))
    refused(lambda c: setattr(c.data, "paths", [str(edited)]), r"the data differs from the checkpoint's")
    assert checkpoint.load(run / "checkpoint.pt")["step"] == 4  # nothing was touched

    # The corpus moved and the cache with it, more steps, another time limit: all fine.
    moved = tmp_path / "moved" / "markov.txt"
    moved.parent.mkdir()
    os.replace(markov_file, moved)
    later = copy.deepcopy(cfg)
    later.data.paths, later.data.cache_dir = [str(moved)], str(tmp_path / "cache2")
    later.train.max_steps, later.train.max_time = 8, 600.0
    lines: list[str] = []
    assert train(later, run_dir=run, resume=True, console=Console(lines.append)).step == 8
    assert "resume: train.max_steps: 4 -> 8" in lines and any(l.startswith("resume: data.paths:") for l in lines)


def test_fresh_run_never_overwrites_a_checkpoint(tmp_path, markov_file):
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, train={"max_steps": 2, "sample_tokens": 0})
    train(cfg, run_dir=tmp_path / "run", console=QUIET)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a checkpoint; continue it with --resume"):
        train(cfg, run_dir=tmp_path / "run", console=QUIET)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("poisoned", ["7", "6-7"])
def test_isolated_non_finite_steps_are_skipped_and_the_run_goes_on(tmp_path, markov_file, monkeypatch, poisoned):
    monkeypatch.setenv("TINYLM_TEST_NAN_STEPS", poisoned)
    bad = guard.injected_steps("TINYLM_TEST_NAN_STEPS")
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                      train={"max_steps": 12, "eval_interval": 4, "log_interval": 1, "sample_tokens": 0, "max_bad_steps": 3})
    lines: list[str] = []
    result = train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert result.step == 12 and math.isfinite(result.metrics["val_loss"])
    warnings = [line for line in lines if "not finite" in line]
    assert [int(w.split()[2].rstrip(":")) for w in warnings] == sorted(bad)
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    # AdamW counts its own updates: 12 steps with the poisoned ones skipped.
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {12 - len(bad)}
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    curve = dict(train_losses(tmp_path / "run"))
    assert all(math.isnan(curve[s]) == (s in bad) for s in range(1, 13))


def test_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, markov_file, monkeypatch):
    monkeypatch.setenv("TINYLM_TEST_NAN_STEPS", "9-11")
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                      train={"max_steps": 16, "eval_interval": 4, "sample_tokens": 0, "max_bad_steps": 3})
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^training diverged: the loss or the gradient was not finite for 3 steps in a "
                                        r"row \(steps 9-11\), each skipped; .*checkpoint.pt still holds step 8; lower train.lr"):
        train(cfg, run_dir=run, console=QUIET)
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["step"] == 8 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.delenv("TINYLM_TEST_NAN_STEPS")
    assert train(cfg, run_dir=run, resume=True, console=QUIET).step == 16  # the kept checkpoint resumes


def guarded_step(model, opt, g, n: int, poison: str = "") -> list[torch.Tensor]:
    """One guarded update of a small linear model; returns the parameters from before it."""
    loss = model(torch.ones(3, 4, device=model.weight.device)).pow(2).mean()
    if poison == "loss":
        loss = loss + float("inf")  # an infinite loss whose gradient is finite
    loss.backward()
    if poison == "grad":
        model.weight.grad[0, 0] = float("inf")  # a finite loss with an infinite gradient
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    g.step(opt, loss, norm, n)
    opt.zero_grad(set_to_none=True)
    return before


def unchanged(model, before) -> bool:
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_guard_skips_an_infinite_loss_or_gradient_and_stops_after_a_streak():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    lines: list[str] = []
    g = guard.BlowUpGuard(2, torch.device("cpu"), opt, lines.append)
    assert unchanged(model, guarded_step(model, opt, g, 1, "grad")) and not opt.state  # no update at all
    assert not unchanged(model, guarded_step(model, opt, g, 2))  # a good step resets the streak
    assert unchanged(model, guarded_step(model, opt, g, 3, "loss"))
    with pytest.raises(guard.Diverged, match=r"2 steps in a row \(steps 3-4\)"):
        guarded_step(model, opt, g, 4, "grad")
    assert [line.split(":")[0] for line in lines] == ["warning"] * 3 and g.skipped == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guard_skips_on_the_gpu_without_waiting():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    lines: list[str] = []
    g = guard.BlowUpGuard(3, torch.device("cuda"), opt, lines.append)
    assert g.on_device
    assert unchanged(model, guarded_step(model, opt, g, 1, "grad"))  # the fused kernel skipped the update
    assert not lines  # the verdict is still on the GPU...
    g.poll()
    assert len(lines) == 1 and "step 1:" in lines[0]  # ...until the loop syncs
    assert int(opt.state[model.weight]["step"]) == 0
    assert not unchanged(model, guarded_step(model, opt, g, 2))
    g.poll()
    assert int(opt.state[model.weight]["step"]) == 1


def test_a_second_signal_stops_at_once():
    stop = guard.StopSignals().install()
    try:
        signal.raise_signal(signal.SIGINT)  # to this thread: handled before the loop goes on
        time.sleep(0.01)
        assert stop.signal == signal.SIGINT  # the first only asks
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # to this thread: handled before the loop goes on
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_guard_hands_the_verdict_to_a_fused_optimizer():
    # The GPU path (a "cuda" guard), run on the CPU's fused AdamW: the verdict goes in as found_inf, which the
    # fused step subtracts from every parameter's 0-dim step count, so it must be 0-dim too (as GradScaler's is).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    lines: list[str] = []
    g = guard.BlowUpGuard(3, torch.device("cuda"), opt, lines.append)
    assert g.on_device
    assert unchanged(model, guarded_step(model, opt, g, 1, "grad"))
    assert not lines  # the verdict waits for the next poll
    assert not unchanged(model, guarded_step(model, opt, g, 2))
    g.poll()
    assert len(lines) == 1 and "step 1:" in lines[0] and int(opt.state[model.weight]["step"]) == 1


class IgnoresFoundInf(torch.optim.AdamW):
    """A fused AdamW as a torch release might change it: it still claims the AMP protocol but no longer
    reads found_inf, so it would apply a bad step's update."""

    def step(self, closure=None):
        found_inf = vars(self).pop("found_inf", None)  # unseen by the step, and put back after it
        try:
            return super().step(closure)
        finally:
            if found_inf is not None:
                self.found_inf = found_inf


def test_only_an_optimizer_that_honours_found_inf_gets_the_verdict_on_the_device():
    from tinylm.optim import Muon

    def params():
        return torch.nn.Linear(4, 2).parameters()

    assert guard.honours_found_inf(torch.optim.AdamW(params(), fused=True))
    assert not guard.honours_found_inf(torch.optim.AdamW(params(), foreach=True))  # no protocol
    assert not guard.honours_found_inf(Muon([{"params": list(params())}]))  # no protocol
    claims = IgnoresFoundInf(params(), fused=True)
    assert claims._step_supports_amp_scaling and not guard.honours_found_inf(claims)  # the probe moved


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True),  # lacks the protocol
    lambda ps: IgnoresFoundInf(ps, lr=0.1, fused=True),  # claims it but would apply the update
])
def test_on_a_gpu_the_guard_falls_back_to_reading_the_verdict(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make(model.parameters())
    lines: list[str] = []
    g = guard.BlowUpGuard(3, torch.device("cuda"), opt, lines.append)
    assert not g.on_device
    assert unchanged(model, guarded_step(model, opt, g, 1, "grad")) and not opt.state  # skipped on the host...
    assert len(lines) == 1 and "step 1:" in lines[0]  # ...and reported at once, with no poll
    assert not unchanged(model, guarded_step(model, opt, g, 2))


def test_under_torchrun_a_repeated_signal_is_ignored():
    # torchrun forwards the SIGTERM a scheduler may also have sent each process: the save must still happen.
    stop = guard.StopSignals(announce=False, repeat_stops=False).install()
    try:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert stop.signal == signal.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
