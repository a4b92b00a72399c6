"""When a run evaluates, logs and saves (tinylm/cadence.py's `due`): by steps, and by its progress and its
clock, so that every run draws curves and a kill loses at most about a minute, whatever the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, markov_text, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import checkpoint, rundir
from tinylm.cadence import LOG_POINTS, due, finished, mark_done
from tinylm.config import TrainConfig
from tinylm.console import QUIET
from tinylm.loop import train
from tinylm.start import LoopState


def simulate(t: TrainConfig, seconds_per_step: list[float]) -> dict[str, list]:
    """Run the loop's decisions over steps that take the given times (cycled); what was done when."""
    state = LoopState(torch.Generator())
    done: dict[str, list] = {"log": [], "evaluate": [], "save": [], "steps": []}
    i = 0
    while not finished(state, t):
        state.step += 1
        state.elapsed += seconds_per_step[i % len(seconds_per_step)]
        i += 1
        done["steps"].append((state.step, state.elapsed))
        when = due(state, t)
        for kind in ("log", "evaluate", "save"):
            if getattr(when, kind):
                done[kind].append((state.step, state.elapsed))
        mark_done(state, t, when)
    done["end"] = [(state.step, state.elapsed)]
    return done


def test_a_slow_machine_still_evaluates_eight_times_and_saves_every_minute():
    # The busy machine: 37 steps in the default 180 s, where eval_interval (250 steps) never comes.
    t = TrainConfig()
    done = simulate(t, [180 / 37])
    assert done["end"][0][0] == 37
    assert len(done["evaluate"]) == 8
    assert all(b[1] - a[1] <= t.save_interval + 180 / 37 for a, b in zip([(0, 0.0)] + done["save"], done["save"]))
    assert len(done["log"]) == 37  # fewer steps than LOG_POINTS: every one is logged


@settings(max_examples=200, deadline=None, derandomize=True)
@given(seconds=st.lists(st.floats(0.001, 40.0), min_size=1, max_size=5), max_time=st.floats(5.0, 900.0),
       max_steps=st.integers(1, 5000), evals=st.integers(0, 12), save_interval=st.sampled_from([0.0, 10.0, 60.0]))
def test_every_mark_gets_its_evaluation_and_no_more_than_a_save_interval_is_ever_lost(seconds, max_time, max_steps,
                                                                                   evals, save_interval):
    t = TrainConfig(max_time=max_time, max_steps=max_steps, evals=evals, save_interval=save_interval,
                    eval_interval=10**9, log_interval=10**9)
    done = simulate(t, seconds)

    def crossings(n: int) -> list[int]:  # the steps at which the run passes one of n evenly spaced marks
        passed = [min(n, int(max(step / max_steps, at / max_time) * n + 1e-9)) for step, at in done["steps"]]
        return [step for (step, _), now, before in zip(done["steps"], passed, [0] + passed) if now > before]

    assert [step for step, _ in done["evaluate"]] == crossings(evals)
    assert [step for step, _ in done["log"]] == crossings(LOG_POINTS)
    if save_interval:
        saved = [0.0] + [at for _, at in done["save"]]
        assert all(b - a <= save_interval + max(seconds) for a, b in zip(saved, saved[1:]))
        assert done["end"][0][1] - saved[-1] <= save_interval + max(seconds)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(max_time=st.floats(5.0, 900.0), evals=st.integers(1, 12), steps_per_mark=st.floats(1.0, 50.0),
       jitter=st.lists(st.floats(0.5, 1.0), min_size=1, max_size=5))
def test_a_run_whose_steps_are_shorter_than_a_mark_has_at_least_evals_evaluations(max_time, evals, steps_per_mark,
                                                                                  jitter):
    step_time = max_time / evals / steps_per_mark  # at most one mark's worth of time per step
    t = TrainConfig(max_time=max_time, max_steps=10**9, evals=evals, eval_interval=10**9, save_interval=0)
    assert len(simulate(t, [step_time * j for j in jitter])["evaluate"]) >= evals


def test_a_run_limited_by_steps_evaluates_at_its_eighths():
    t = TrainConfig(max_steps=80, max_time=0, eval_interval=1000, save_interval=0)
    assert [step for step, _ in simulate(t, [1.0])["evaluate"]] == [10, 20, 30, 40, 50, 60, 70, 80]


def test_eval_interval_still_counts_and_evals_zero_turns_the_marks_off():
    t = TrainConfig(max_steps=40, max_time=0, eval_interval=15, evals=0, save_interval=0)
    assert [step for step, _ in simulate(t, [1.0])["evaluate"]] == [15, 30]


def test_eval_interval_and_the_marks_merge_instead_of_evaluating_twice_in_a_row():
    # A 60 s run of 1,250 steps: the marks fall every ~156 steps, and eval_interval's 250, 500, 750 and
    # 1,000 each came within a few dozen steps of one (250 and 304, 469 and 500, ...): now the marks alone.
    t = TrainConfig(max_time=60, max_steps=10**6, eval_interval=250, save_interval=0)
    done = simulate(t, [60 / 1250])
    evaluated = [step for step, _ in done["evaluate"]]
    assert len(evaluated) == 8 and all(step % 250 for step in evaluated[:-1])
    assert evaluated[-1] == done["end"][0][0]
    # Where eval_interval is finer than the marks (150 steps against 200) it keeps the evaluations that
    # are at least half its spacing (75 steps) from a mark's: 300, 900 and 1,500, not 150, 450, 750, ...
    t = TrainConfig(max_steps=1600, max_time=0, eval_interval=150, save_interval=0)
    assert [step for step, _ in simulate(t, [1.0])["evaluate"]] == [200, 300, 400, 600, 800, 900, 1000, 1200,
                                                                   1400, 1500, 1600]


def test_a_real_run_evaluates_at_its_marks_and_a_resumed_one_goes_on_from_them(tmp_path):
    (tmp_path / "m.txt").write_text(markov_text(4000))
    cfg = tiny_config(tmp_path, [tmp_path / "m.txt"], data={"tokenizer": "char"},
                      train={"max_steps": 8, "evals": 4, "eval_interval": 1000, "sample_tokens": 0})
    run = tmp_path / "run"
    train(cfg, run_dir=run, console=QUIET)
    cfg.train.max_steps = 16  # resumed at step 8, the marks are now 4, 8, 12, 16: 8 is behind it
    train(cfg, run_dir=run, resume=True, console=QUIET)
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4, 6, 8, 12, 16]


def test_a_kill_before_the_first_evaluation_loses_at_most_the_save_interval(tmp_path):
    """The first evaluation is far away (eval_interval 10^6, no marks): the clock alone saves."""
    (tmp_path / "m.txt").write_text(markov_text(20_000))
    args = [str(ROOT / "train.py"), "--data", str(tmp_path / "m.txt"), "--run_dir", str(tmp_path / "run"),
            "--data.tokenizer=char", "--data.cache_dir", str(tmp_path / "cache"), "--model.n_layer=1",
            "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32", "--train.batch_size=8",
            "--train.max_steps=1000000", "--train.max_time=0", "--train.eval_interval=1000000", "--train.evals=0",
            "--train.save_interval=1", "--train.eval_batches=1", "--train.sample_tokens=0",
            "--train.device=cpu", "--train.dtype=float32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / rundir.CHECKPOINT
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint within two minutes, with save_interval=1"
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = checkpoint.load(ckpt)
    assert state["step"] > 0 and 1 <= state["elapsed"]
