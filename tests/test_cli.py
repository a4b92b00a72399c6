"""The command line in real subprocesses: train, sample, and a one-line error for every bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, markov_text, tiny_config

TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=8", "--train.max_steps=30", "--train.eval_interval=15", "--train.eval_batches=2",
        "--train.sample_tokens=10", "--train.device=cpu", "--train.max_time=0"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_train_then_sample_end_to_end(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("It was the best of times, it was the worst of times.\n" * 300)
    trained = run([str(ROOT / "train.py"), "--data", str(corpus), "--data.tokenizer", "bpe", "--data.vocab_size=300", *TINY], tmp_path)
    assert trained.returncode == 0, trained.stderr
    run_dir = tmp_path / "runs" / "default-book"
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "config.yaml").is_file()
    assert "tensorboard --logdir runs" in trained.stdout and f"tinylm sample {Path('runs') / 'default-book'}" in trained.stdout
    assert "none on" in trained.stdout and "biases and norm gains" in trained.stdout  # the decay story is logged

    sample = ["-m", "tinylm", "sample", str(run_dir), "--prompt", "It was", "--seed", "3", "--max_new_tokens", "15"]
    first, second = run(sample, tmp_path), run(sample, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("It was") and len(first.stdout) > len("It was") + 5
    assert first.stdout == second.stdout  # same seed, same text
    two = run([*sample, "--num_samples", "2"], tmp_path)
    assert two.returncode == 0 and two.stdout.count("It was") >= 2

    # A second run with the same name gets a fresh directory instead of overwriting the first.
    again = run([str(ROOT / "train.py"), "--data", str(corpus), "--data.tokenizer=bpe", "--data.vocab_size=300", *TINY], tmp_path)
    assert again.returncode == 0 and (tmp_path / "runs" / "default-book-2" / "checkpoint.pt").is_file()
    assert "data: reused" in again.stdout  # the prepared corpus came from the cache


def test_tinylm_train_is_train_py(tmp_path):
    a, b = run([str(ROOT / "train.py"), "--help"], tmp_path), run(["-m", "tinylm", "train", "--help"], tmp_path)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "--config" in a.stdout


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    from tinylm.train import train

    tmp = tmp_path_factory.mktemp("char")
    (tmp / "m.txt").write_text(markov_text(3000))
    cfg = tiny_config(tmp, [tmp / "m.txt"], data={"tokenizer": "char"}, train={"max_steps": 2, "sample_tokens": 0})
    return Path(train(cfg, run_dir=tmp / "run", out=lambda s: None)["run_dir"])


def bad_inputs(tmp: Path, char_run: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "blank.txt").write_text("   \n\n\t \n")
    (tmp / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (tmp / "short.txt").write_text("Too short.\n")
    (tmp / "nodir").mkdir(exist_ok=True)
    (tmp / "bad.yaml").write_text("model:\n  n_layers: 4\n")
    train = [str(ROOT / "train.py")]
    return {
        "missing file": (train + ["--data", str(tmp / "nope.txt")], "data path not found"),
        "empty file": (train + ["--data", str(tmp / "empty.txt")], "is empty"),
        "whitespace file": (train + ["--data", str(tmp / "blank.txt")], "holds only whitespace"),
        "binary file": (train + ["--data", str(tmp / "binary.bin")], "looks like a binary file"),
        "invalid utf-8": (train + ["--data", str(tmp / "latin1.txt")], "not valid UTF-8 (byte 3, line 1)"),
        "folder without txt": (train + ["--data", str(tmp / "nodir")], "no .txt files"),
        "too short": (train + ["--data", str(tmp / "short.txt"), "--data.tokenizer=char"], "fewer than one training window"),
        "unknown config key": (train + ["--config", str(tmp / "bad.yaml")], "did you mean 'model.n_layer'"),
        "unknown override": (train + ["--train.learning_rate=0.1"], "unknown config key 'train.learning_rate'"),
        "wrong type": (train + ["--train.batch_size=big"], "'train.batch_size' must be int"),
        "impossible value": (train + ["--model.n_embd=100", "--model.n_head=3"], "must be divisible"),
        "negative lr": (train + ["--train.lr=-1"], "'train.lr' must be > 0"),
        "missing config": (train + ["--config", str(tmp / "nope.yaml")], "config file not found"),
        "unknown flag": (train + ["--bogus"], "unrecognized arguments: --bogus"),
        "missing run": (["-m", "tinylm", "sample", str(tmp / "no_run")], "run directory not found"),
        "run without checkpoint": (["-m", "tinylm", "sample", str(tmp / "nodir")], "holds no checkpoint"),
        "unseen characters": (["-m", "tinylm", "sample", str(char_run), "--prompt", "xyz"], "never saw 'x', 'y', 'z'"),
        "zero samples": (["-m", "tinylm", "sample", str(char_run), "--num_samples", "0"], "--num_samples must be at least 1"),
        "negative temperature": (["-m", "tinylm", "sample", str(char_run), "--temperature", "-1"], "--temperature must be >= 0"),
        "top_p out of range": (["-m", "tinylm", "sample", str(char_run), "--top_p", "0"], "--top_p must be in (0, 1]"),
    }




@pytest.mark.parametrize("case", [
    "missing file", "empty file", "whitespace file", "binary file", "invalid utf-8", "folder without txt",
    "too short", "unknown config key", "unknown override", "wrong type", "impossible value", "negative lr",
    "missing config", "unknown flag", "missing run", "run without checkpoint", "unseen characters",
    "zero samples", "negative temperature", "top_p out of range",
])
def test_bad_input_gives_one_line_error(case, tmp_path, char_run):
    args, message = bad_inputs(tmp_path, char_run)[case]
    result = run(args, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
