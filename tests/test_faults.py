"""Fault injection with real training processes: SIGKILL at random moments and inside a checkpoint write,
SIGINT and SIGTERM, a disk that refuses the checkpoint. After each, the checkpoint on disk loads, the run
resumes from it, and the finished run is bit for bit the run that was never interrupted (weights and the
TensorBoard loss curve), so nothing was lost but the steps since the last checkpoint, which were redone.

Every process runs one CPU thread (OMP_NUM_THREADS=1): fast on a busy machine, and the same arithmetic
in every process, which the bit-for-bit comparisons need.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, file_size_limited, markov_text
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import checkpoint, rundir

STEPS, EVERY = 60, 10  # the run's length and its checkpoint (evaluation) interval
TINY = ["--data.tokenizer=char", "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32",
        "--model.block_size=32", "--model.dropout=0.1", "--train.batch_size=16", f"--train.max_steps={STEPS}",
        f"--train.eval_interval={EVERY}", "--train.eval_batches=2", "--train.log_interval=1",
        "--train.sample_tokens=8", "--train.device=cpu", "--train.dtype=float32", "--train.max_time=0",
        "--train.evals=0", "--train.save_interval=0"]  # checkpoints every EVERY steps, and only then


class Proc:
    """A training process whose stdout and stderr lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path, file_size_limit: int | None = None, launcher: tuple[str, ...] = (),
                 **env: str):
        """launcher: Python arguments that start train.py, e.g. ("-m", "torch.distributed.run", ...)."""
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
        command = [*launcher, str(ROOT / "train.py"), *args]
        if file_size_limit is not None:
            command = file_size_limited(file_size_limit, command)
        self.p = subprocess.Popen([sys.executable, *command], cwd=cwd, env=full_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in (("out", self.p.stdout), ("err", self.p.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            (self.out if name == "out" else self.err).append(line)
            self.lines.put((name, line))

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first line (stdout or stderr) matching pattern; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    break
                continue
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; stdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def finish(self, timeout: float = 180) -> int:
        rc = self.p.wait(timeout=timeout)
        for reader in self.readers:  # every line the process wrote is read once its pipes close
            reader.join(timeout=30)
        return rc

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.finish()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """The train/loss curve as TensorBoard reads it (events a killed process logged past its checkpoint are purged)."""
    return [(e.step, e.value) for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")]


def assert_same_run(run_dir: Path, reference: dict) -> None:
    state = checkpoint.load(run_dir / rundir.CHECKPOINT)
    assert state["step"] == STEPS
    for name, tensor in reference["state"]["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    for index, slots in reference["state"]["optimizer"]["state"].items():
        for slot, tensor in slots.items():
            assert torch.equal(state["optimizer"]["state"][index][slot], tensor), (index, slot)
    curve = losses(run_dir)
    assert curve == reference["losses"]  # every step once, each loss bit-identical


def assert_snapshots_whole(run_dir: Path, keep: int = 3) -> list[int]:
    """Every kept snapshot (train.keep_snapshots, default 3, plus the best) loads as the checkpoint of its
    step; no temporary file is left beside them. Returns their steps."""
    steps = rundir.snapshot_steps(run_dir)
    assert 1 <= len(steps) <= keep + 1 and not list((run_dir / rundir.SNAPSHOTS).glob(".*"))
    for step in steps:
        assert checkpoint.load(rundir.snapshot_path(run_dir, step))["step"] == step  # whole: CRC-checked
    return steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults")
    (work / "corpus.txt").write_text(markov_text(30_000))
    return work


def train_args(run: str) -> list[str]:
    return ["--data", "corpus.txt", "--data.cache_dir=cache", "--run_dir", run, *TINY]


@pytest.fixture(scope="module")
def reference(workdir) -> dict:
    """The run nothing happened to."""
    proc = Proc(train_args("reference"), workdir)
    assert proc.finish() == 0, proc.stderr
    curve = losses(workdir / "reference")
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    return {"state": checkpoint.load(workdir / "reference" / rundir.CHECKPOINT), "losses": curve}


def checkpoint_step(run_dir: Path) -> int:
    return checkpoint.load(run_dir / rundir.CHECKPOINT)["step"]  # a UserError here means a broken file


def resume(run: str, workdir: Path, **env: str) -> Proc:
    return Proc(["--resume", run, *TINY], workdir, **env)


def test_sigkill_at_random_moments_then_resume_gives_the_same_run(workdir, reference):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    print(f"kill moments drawn with seed {seed}")
    run = workdir / "killed"
    proc = Proc(train_args("killed"), workdir)
    while not (run / rundir.CHECKPOINT).exists():  # first kill: some time after the first checkpoint
        assert proc.p.poll() is None, proc.stderr
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    kills = 0
    for attempt in range(4):
        if proc.p.poll() is not None:
            break
        before = checkpoint_step(run)
        proc.kill()
        kills += 1
        on_disk = checkpoint_step(run)
        assert on_disk % EVERY == 0
        # At most the steps since the last checkpoint are lost: a save comes right after its evaluation's
        # line, so the checkpoint is at the last evaluation printed or, killed mid-save, the one before.
        reached = [int(s) for s in re.findall(r"^step (\d+): val loss", proc.stdout, re.M)]
        if reached:
            assert max(reached) - EVERY <= on_disk <= max(reached)
        else:
            assert on_disk == before
        proc = resume("killed", workdir)
        if attempt == 0:  # second kill: at a random moment from the start, perhaps while starting up
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # later kills: while training, some time after it resumed
            assert int(proc.wait_for(r"resumed .* at step (\d+)").group(1)) == checkpoint_step(run)
            time.sleep(rng.uniform(0, 0.5))
    assert kills >= 2
    assert proc.finish() == 0, proc.stderr
    assert not list(run.glob(".*.tmp"))
    assert_same_run(run, reference)
    assert assert_snapshots_whole(run)[-1] == STEPS


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(workdir, reference):
    run = workdir / "midsave"
    # The second save (step 20) pauses after writing its temporary file, before renaming it into place.
    proc = Proc(train_args("midsave"), workdir, TINYLM_TEST_SAVE_PAUSE="2:60")
    proc.wait_for(r"test hook: save 2 written, pausing")
    (tmp,) = run.glob(".checkpoint.pt.*.tmp")
    assert tmp.stat().st_size > 0
    # A second trainer on the same directory now would delete that temp file and write the same checkpoint:
    # it is refused, with the holder's pid, and touches nothing.
    second = resume("midsave", workdir)
    assert second.finish() == 2
    assert second.stderr.strip().splitlines() == [
        f"error: midsave is in use by another training process (pid {proc.p.pid}); wait for it to end, or pick another --run_dir"]
    assert tmp.exists() and checkpoint_step(run) == EVERY
    proc.kill()  # the OS drops a killed process's lock: the resume below takes it
    assert checkpoint_step(run) == EVERY  # the previous checkpoint, whole
    assert assert_snapshots_whole(run) == [EVERY]  # and the snapshot of its evaluation
    proc = resume("midsave", workdir)
    assert proc.finish() == 0, proc.stderr
    assert f"resumed midsave at step {EVERY}" in proc.stdout
    assert not tmp.exists()  # the killed write's leftover is cleaned up
    assert_same_run(run, reference)
    assert assert_snapshots_whole(run)[-3:] == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]  # bounded: the newest 3 (+ best)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_saves_at_the_end_of_the_step_and_resumes_exactly(workdir, reference, sig, code):
    name = signal.Signals(sig).name
    run = workdir / name
    proc = Proc(train_args(name), workdir)
    proc.wait_for(rf"^step {EVERY}: val loss")
    proc.p.send_signal(sig)
    assert proc.finish() == code, proc.stderr
    stopped = int(re.search(rf"stopped by {name} at step (\d+)", proc.stdout).group(1))
    assert EVERY <= stopped < STEPS  # most likely between two checkpoints: saved by the stop itself
    assert f"resume with: tinylm train --resume {name}" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert checkpoint_step(run) == stopped  # nothing lost
    if sig == signal.SIGINT:  # the same code path for both; one resume shows it continues exactly
        proc = resume(name, workdir)
        assert proc.finish() == 0, proc.stderr
        assert_same_run(run, reference)


def test_a_disk_that_refuses_the_checkpoint_keeps_the_previous_one(workdir, reference):
    run = workdir / "diskfull"
    import shutil

    shutil.copytree(workdir / "reference", run)
    size = (run / rundir.CHECKPOINT).stat().st_size

    more = [f"--train.max_steps={STEPS + 2 * EVERY}"]
    # No file may grow past half a checkpoint: every checkpoint write fails part-way, as on a full disk.
    proc = Proc(["--resume", "diskfull", *TINY, *more], workdir, file_size_limit=size // 2)
    assert proc.finish() == 2
    # The periodic save fails: a warning, and training goes on; the last save fails: a one-line error.
    assert re.search(rf"warning: could not write diskfull/checkpoint.pt: File too large; diskfull/checkpoint.pt "
                     rf"still holds step {STEPS}; training goes on", proc.stdout), proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not write") and f"still holds step {STEPS}" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert checkpoint_step(run) == STEPS and not list(run.glob(".*.tmp"))

    proc = Proc(["--resume", "diskfull", *TINY, *more], workdir)  # space again: the run goes on
    assert proc.finish() == 0, proc.stderr
    assert checkpoint_step(run) == STEPS + 2 * EVERY


def test_a_tensorboard_log_that_cannot_be_written_does_not_stop_training(workdir, reference):
    """The event file hits a file-size limit (as on a full disk) that the checkpoint stays under: one
    warning, training and its checkpoints go on, and the log written so far still reads."""
    limit = 2 * (workdir / "reference" / rundir.CHECKPOINT).stat().st_size
    # An evaluation (histograms of every tensor, a sample) at every step makes the event file outgrow the limit.
    proc = Proc(train_args("tbfull") + ["--train.eval_interval=1"], workdir, file_size_limit=limit)
    assert proc.finish() == 0, proc.stderr
    warnings = [line for line in proc.out if "TensorBoard log could not be written" in line]
    assert warnings == ["warning: the TensorBoard log could not be written (File too large); training goes on "
                        "without it, and checkpoints are still saved\n"]
    assert "Traceback" not in proc.stderr and f"done: {STEPS} steps" in proc.stdout
    assert checkpoint_step(workdir / "tbfull") == STEPS
    logged = [s for s, _ in losses(workdir / "tbfull")]
    assert logged == list(range(1, len(logged) + 1)) and 0 < len(logged) < STEPS  # what was written before the limit
