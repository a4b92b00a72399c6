"""Training in several processes, for real: torchrun starts two CPU processes that talk over gloo.

Two processes that each run one of a step's two micro-batches (or, with one micro-batch per step as
by default, their shares of its sequences) train the same model as one process that runs both (the global batch is train.batch_size x train.grad_accum sequences either way, drawn alike,
with dropout seeded per micro-batch), so their loss curves, weights and optimizer state agree within
float rounding. A run resumes across a change in the number of processes, DDP and FSDP alike, and a
signal that reaches one process stops both at the same step with a checkpoint.

Every process runs one CPU thread (OMP_NUM_THREADS=1), as in test_faults.py.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from conftest import markov_text, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_faults import Proc

from tinylm import checkpoint, rundir
from tinylm import config as config_
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs use one CPU thread too (conftest.py)

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
STEPS = 8
TOLERANCE = 1e-5  # float rounding: the processes add the same numbers in another order


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


LAUNCHED: list[Proc] = []


def launch(work: Path, *args: str) -> Proc:
    proc = Proc(list(args), work, launcher=TORCHRUN)
    LAUNCHED.append(proc)
    return proc


def workers(proc: Proc) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started (Linux: read from /proc)."""
    pids = Path(f"/proc/{proc.p.pid}/task/{proc.p.pid}/children").read_text().split()
    ranks = {}
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])] = int(pid)
    return ranks


@pytest.fixture(autouse=True, scope="module")
def no_leftovers():
    """A failed test leaves no torchrun behind: its workers (in sessions of their own) are killed too."""
    yield
    for proc in LAUNCHED:
        if proc.p.poll() is None:
            for pid in workers(proc).values():
                os.kill(pid, signal.SIGKILL)
            proc.kill()


def max_differences(run: Path, reference: Path) -> tuple[float, float, float]:
    """The largest differences in train/loss, weights and optimizer state between two runs."""
    a, b = (checkpoint.load(r / rundir.CHECKPOINT) for r in (run, reference))
    assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()  # the single-process numbering
    loss_a, loss_b = scalars(run, "train/loss"), scalars(reference, "train/loss")
    assert [s for s, _ in loss_a] == [s for s, _ in loss_b]
    loss = max(abs(x - y) for (_, x), (_, y) in zip(loss_a, loss_b))
    weights = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    moments = max((a["optimizer"]["state"][i][k].float() - b["optimizer"]["state"][i][k].float()).abs().max().item()
                  for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])
    return loss, weights, moments


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process running both micro-batches of each step, and two processes running one each."""
    work = tmp_path_factory.mktemp("distributed")
    corpus = work / "corpus.txt"
    corpus.write_text(markov_text(30_000))
    cfg = tiny_config(work, [corpus], data={"tokenizer": "char"}, model={"dropout": 0.1},
                      train={"batch_size": 8, "grad_accum": 2, "max_steps": STEPS, "eval_interval": 4,
                             "eval_batches": 3, "log_interval": 1, "sample_tokens": 8, "warmup_steps": 2})
    config_.save(cfg, work / "tiny.yaml")
    train(cfg, run_dir=work / "one", console=QUIET)
    proc = launch(work, "--config", "tiny.yaml", "--run_dir", "two")
    rc = proc.finish()
    assert rc == 0, proc.stdout + proc.stderr
    return {"work": work, "cfg": cfg, "proc": proc}


def test_two_processes_write_one_run(runs):
    work, proc = runs["work"], runs["proc"]
    out = proc.stdout
    assert out.count("| tok_emb.weight |") == 1 and out.count("done: 8 steps") == 1  # rank 0 alone prints
    assert ("2 processes (DDP over gloo): each runs 1 of the step's 2 micro-batches of 8 sequences; "
            "global batch 8 x 2 x 32 tokens") in out
    assert "512 tokens per step" in out
    assert re.findall(r"^step (\d+): val loss", out, re.M) == ["0", "4", "8"]
    files = sorted(p.name for p in (work / "two").iterdir())
    # Besides TensorBoard's files (events, and the embedding projector's step folder and config):
    projector = ["projector_config.pbtxt", f"{STEPS:05d}"]
    assert all(name in files for name in projector)
    assert [f for f in files if not f.startswith("events.") and f not in projector] == [
        ".lock", ".tinylm-run", "checkpoint.pt", "config.yaml", "data.json", "metrics.json", "snapshots",
        "tokenizer.json"]
    assert rundir.snapshot_steps(work / "two") == [4, 8]  # rank 0 keeps the checkpoint of each evaluation
    assert len([f for f in files if f.startswith("events.")]) == 1  # one TensorBoard writer
    assert [s for s, _ in scalars(work / "two", "train/loss")] == list(range(1, STEPS + 1))
    assert "Traceback" not in proc.stderr


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    work = runs["work"]
    loss, weights, moments = max_differences(work / "two", work / "one")
    print(f"2 processes x 1 micro-batch vs 1 process x 2: max |train loss diff| {loss:.2e}, "
          f"max |weight diff| {weights:.2e}, max |optimizer state diff| {moments:.2e}")
    assert loss < TOLERANCE and weights < TOLERANCE and moments < TOLERANCE
    # Evaluation is shared out (3 batches over 2 processes) and averaged: the same figure as one process's.
    for (s1, v1), (s2, v2) in zip(scalars(work / "one", "val/loss"), scalars(work / "two", "val/loss")):
        assert s1 == s2 and abs(v1 - v2) < TOLERANCE


@pytest.mark.slow  # two torchrun launches
def test_resume_across_a_change_in_the_number_of_processes(runs):
    work, cfg = runs["work"], runs["cfg"]
    longer = copy.deepcopy(cfg)
    longer.train.max_steps = 2 * STEPS
    config_.save(longer, work / "longer.yaml")
    for name in ("one_then_one", "two_then_one", "one_then_two_fsdp"):
        shutil.copytree(work / ("two" if name.startswith("two") else "one"), work / name)
    train(longer, run_dir=work / "one_then_one", resume=True, console=QUIET)  # the reference
    lines: list[str] = []
    train(longer, run_dir=work / "two_then_one", resume=True, console=Console(lines.append))  # 2 processes -> 1
    assert f"resumed {work / 'two_then_one'} at step {STEPS}" in lines
    # 1 process -> 2, sharded with FSDP: the checkpoint is scattered into shards, gathered back on save.
    proc = launch(work, "--resume", "one_then_two_fsdp", "--config", "longer.yaml", "--train.strategy=fsdp")
    assert proc.finish() == 0, proc.stdout + proc.stderr
    assert "2 processes (FSDP over gloo)" in proc.stdout and f"resumed one_then_two_fsdp at step {STEPS}" in proc.stdout
    for name in ("two_then_one", "one_then_two_fsdp"):
        loss, weights, moments = max_differences(work / name, work / "one_then_one")
        print(f"{name} vs one process throughout: max |train loss diff| {loss:.2e}, "
              f"max |weight diff| {weights:.2e}, max |optimizer state diff| {moments:.2e}")
        assert loss < TOLERANCE and weights < TOLERANCE and moments < TOLERANCE
    # What FSDP saved is an ordinary checkpoint: a single process samples from it.
    _, _, model, state = rundir.load(work / "one_then_two_fsdp")
    assert state["step"] == 2 * STEPS and not any(hasattr(p, "to_local") for p in model.parameters())


def test_a_signal_to_one_process_stops_both_at_the_same_step(runs):
    work = runs["work"]
    # One evaluation batch for two processes: the second runs it too, uncounted (FSDP would need that).
    proc = launch(work, "--config", "tiny.yaml", "--run_dir", "stopped", "--train.max_steps=100000",
                  "--train.eval_interval=5", "--train.eval_batches=1", "--train.sample_tokens=0")
    proc.wait_for(r"^step 10: val loss")
    os.kill(workers(proc)[1], signal.SIGTERM)  # rank 1 only: rank 0 learns of it from rank 1
    proc.finish()  # had the processes disagreed, rank 0 would wait forever in the next collective
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", proc.stdout).group(1))
    assert stopped >= 10 and checkpoint.load(work / "stopped" / rundir.CHECKPOINT)["step"] == stopped
    assert scalars(work / "stopped", "train/loss")[-1][0] == stopped


def test_the_global_batch_must_split_somehow(tmp_path, markov_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 would; refused before any process group
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"}, train={"grad_accum": 3, "batch_size": 1})
    with pytest.raises(UserError, match=r"^the global batch is train.batch_size x train.grad_accum = 1 x 3 sequences, "
                                        r"and 2 processes can share neither its 3 micro-batches evenly nor the 1 "
                                        r"sequences of each; set train.grad_accum to a multiple of 2, or "
                                        r"train.batch_size to at least 2$"):
        train(cfg, run_dir=tmp_path / "run", console=QUIET)


def test_uneven_shares_of_a_micro_batch_weigh_as_one_process_would(markov_file):
    """3 processes share 8 sequences as 3, 3 and 2: DDP's plain average of their weighted losses (and so of
    their gradients) is the mean over all 8, the loss one process takes."""
    import numpy as np
    import torch

    from tinylm.distributed import Dist
    from tinylm.model import GPT
    from tinylm.step import draw_batches

    cfg = tiny_config(markov_file.parent, [markov_file], train={"batch_size": 8, "grad_accum": 1})
    ids = np.arange(1000, dtype=np.uint16) % 50
    model = GPT(cfg.model, 50)

    def loss_and_grad(batches) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss = sum(model(b.x, b.y)[1] * b.weight for b in batches) / len(batches)
        loss.backward()
        return loss.item(), model.tok_emb.weight.grad.clone()

    one = draw_batches(ids, cfg.train, 32, torch.Generator().manual_seed(0), 0, Dist(torch.device("cpu")))
    shares = [draw_batches(ids, cfg.train, 32, torch.Generator().manual_seed(0), 0,
                           Dist(torch.device("cpu"), rank=r, world=3)) for r in range(3)]
    assert [len(b[0].x) for b in shares] == [3, 3, 2]
    assert torch.equal(torch.cat([b[0].x for b in shares]), one[0].x[[0, 3, 6, 1, 4, 7, 2, 5]])
    loss, grad = loss_and_grad(one)
    parts = [loss_and_grad(b) for b in shares]
    assert abs(sum(p[0] for p in parts) / 3 - loss) < 1e-6
    assert torch.allclose(sum(p[1] for p in parts) / 3, grad, atol=1e-7)


def test_two_processes_train_the_defaults_single_micro_batch_as_one(tmp_path):
    """The default config's one micro-batch per step on 2 processes (here 5 sequences: 3 and 2): each runs
    its share of the sequences, and the weights after two steps are one process's."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(markov_text(10_000))
    cfg = tiny_config(tmp_path, [corpus], data={"tokenizer": "char"},
                      train={"batch_size": 5, "grad_accum": 1, "max_steps": 2, "eval_interval": 2,
                             "eval_batches": 2, "log_interval": 1, "sample_tokens": 0, "warmup_steps": 1})
    config_.save(cfg, tmp_path / "tiny.yaml")
    train(cfg, run_dir=tmp_path / "one", console=QUIET)
    proc = launch(tmp_path, "--config", "tiny.yaml", "--run_dir", "two")
    assert proc.finish() == 0, proc.stdout + proc.stderr
    assert "each runs 2 or 3 of the 5 sequences of each of the step's 1 micro-batch" in proc.stdout
    loss, weights, moments = max_differences(tmp_path / "two", tmp_path / "one")
    assert loss < TOLERANCE and weights < TOLERANCE and moments < TOLERANCE, (loss, weights, moments)


def test_an_error_is_said_once(tmp_path):
    proc = launch(tmp_path, "--train.seed=-1")
    assert proc.finish() != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config key 'train.seed' must be between 0 and 4,294,967,295 (2**32 - 1), got -1"]
