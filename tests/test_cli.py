"""The command line in real subprocesses: train, sample, and a one-line error for every bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, file_size_limited, markov_text, tiny_config

TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=8", "--train.max_steps=30", "--train.eval_interval=15", "--train.eval_batches=2",
        "--train.sample_tokens=10", "--train.device=cpu", "--train.max_time=0"]


def run(args: list[str], cwd: Path, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: root, without the capability to override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]


@pytest.mark.slow  # test_docs runs the README's train and sample too
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
    from tinylm.console import QUIET
    from tinylm.loop import train

    tmp = tmp_path_factory.mktemp("char")
    (tmp / "m.txt").write_text(markov_text(3000))
    cfg = tiny_config(tmp, [tmp / "m.txt"], data={"tokenizer": "char"}, train={"max_steps": 2, "sample_tokens": 0})
    return Path(train(cfg, run_dir=tmp / "run", console=QUIET).run_dir)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A folder holding a corpus, a writable cache folder and a folder nobody may write into."""
    base = tmp_path_factory.mktemp("locked")
    (base / "corpus.txt").write_text(markov_text(3000))
    (base / "cache").mkdir()
    (base / "readonly").mkdir(mode=0o555)
    yield base
    os.chmod(base / "readonly", 0o755)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling runs a shell command that creates the marker file
        return os.system, (f"touch {self.marker}",)


def bad_inputs(tmp: Path, char_run: Path, locked) -> dict[str, tuple[list[str], str, dict]]:
    """name: (python arguments, the message, options: unprivileged, absent (a file that must not appear))."""
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "blank.txt").write_text("   \n\n\t \n")
    (tmp / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (tmp / "short.txt").write_text("Too short.\n")
    (tmp / "nodir").mkdir(exist_ok=True)
    (tmp / "bad.yaml").write_text("model:\n  n_layers: 4\n")
    (tmp / "broken.yaml").write_text("model: [1,\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "markov.txt").write_text(markov_text(30_000))
    for name in ("evil_run", "cut_run"):
        shutil.copytree(char_run, tmp / name, dirs_exist_ok=True)
    torch.save({"model": {}, "vocab_size": 9, "config": {}, "x": Exploit(tmp / "pwned")}, tmp / "evil_run" / "checkpoint.pt")
    ckpt = (char_run / "checkpoint.pt").read_bytes()
    (tmp / "cut_run" / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 3])
    base = locked
    train = [str(ROOT / "train.py")]
    markov = ["--data", str(tmp / "markov.txt"), "--data.tokenizer=char", *TINY]
    sample = ["-m", "tinylm", "sample"]
    return {
        # data
        "missing file": (train + ["--data", str(tmp / "nope.txt")], "data path not found", {}),
        "no path after --data": (train + ["--data"], "expected at least one argument", {}),
        "folder without txt": (train + ["--data", str(tmp / "nodir")], "no .txt files", {}),
        "empty file": (train + ["--data", str(tmp / "empty.txt")], "is empty", {}),
        "whitespace file": (train + ["--data", str(tmp / "blank.txt")], "holds only whitespace", {}),
        "binary file": (train + ["--data", str(tmp / "binary.bin")], "looks like a binary file (NUL byte at offset 4)", {}),
        "invalid utf-8": (train + ["--data", str(tmp / "latin1.txt")],
                          "not valid UTF-8 (byte 3, line 1); convert it to UTF-8 or pass --data.errors=replace", {}),
        "too short": (train + ["--data", str(tmp / "short.txt"), "--data.tokenizer=char"], "fewer than one training window", {}),
        "vocab below the byte alphabet": (train + ["--data.vocab_size=256"], "must be at least 257 for byte-level BPE", {}),
        "vocab above uint32": (train + ["--data.vocab_size=4294967297"], "must be at most 4,294,967,296 (token ids are stored as uint32)", {}),
        # config
        "unknown config key": (train + ["--config", str(tmp / "bad.yaml")], "did you mean 'model.n_layer'", {}),
        "config not yaml": (train + ["--config", str(tmp / "broken.yaml")], "is not valid YAML", {}),
        "unknown override": (train + ["--train.learning_rate=0.1"], "unknown config key 'train.learning_rate'", {}),
        "wrong type": (train + ["--train.batch_size=big"], "'train.batch_size' must be int", {}),
        "impossible value": (train + ["--model.n_embd=100", "--model.n_head=3"], "must be divisible", {}),
        "negative lr": (train + ["--train.lr=-1"], "'train.lr' must be > 0", {}),
        "no bad steps allowed": (train + ["--train.max_bad_steps=0"], "'train.max_bad_steps' must be > 0", {}),
        "missing config": (train + ["--config", str(tmp / "nope.yaml")], "config file not found", {}),
        "unknown flag": (train + ["--bogus"], "unrecognized arguments: --bogus", {}),
        # run directories and checkpoints
        "resume missing run": (train + ["--resume", str(tmp / "no_run")], "run directory not found", {}),
        "resume run without checkpoint": (train + ["--resume", str(tmp / "nodir")], "holds no checkpoint (checkpoint.pt) to resume from", {}),
        "resume another architecture": (train + ["--resume", str(char_run), "--model.n_embd=64"],
                                        "model.n_embd was 32 and is now 64 (the architecture must not change)", {}),
        "resume another tokenizer": (train + ["--resume", str(char_run), "--data.tokenizer=bpe"],
                                     "data.tokenizer was 'char' and is now 'bpe' (the tokenizer must not change)", {}),
        "resume other data": (train + ["--resume", str(char_run), "--data", str(tmp / "markov.txt")],
                              "the data differs from the checkpoint's (train/val tokens 2,701/301, now 27,001/3,001)", {}),
        "resume truncated checkpoint": (train + ["--resume", str(tmp / "cut_run")], "/cut_run/checkpoint.pt: it is truncated or not a checkpoint", {}),
        "fresh run over a checkpoint": (train + ["--run_dir", str(char_run), *markov], "already holds a checkpoint; continue it with --resume", {}),
        "run dir is a file": (train + ["--run_dir", str(tmp / "a_file"), *markov], "a_file' is a file, not a folder", {}),
        "run dir not writable": (train + ["--data", str(base / "corpus.txt"), "--data.tokenizer=char", f"--data.cache_dir={base / 'cache'}",
                                          "--run_dir", str(base / "readonly" / "run"), *TINY],
                                 f"cannot write to run directory {base / 'readonly' / 'run'}: Permission denied", {"unprivileged": True}),
        "cache dir not writable": (train + ["--data", str(base / "corpus.txt"), "--data.tokenizer=char",
                                            f"--data.cache_dir={base / 'readonly' / 'cache'}", *TINY],
                                   f"cannot write the data cache in {base / 'readonly' / 'cache'}: Permission denied", {"unprivileged": True}),
        "disk full while caching": (file_size_limited(20_000, train + [*markov, f"--data.cache_dir={tmp / 'fullcache'}"]),
                                    f"cannot write the data cache in {tmp / 'fullcache'}: File too large", {}),
        # sampling
        "missing run": (sample + [str(tmp / "no_run")], "run directory not found", {}),
        "run without checkpoint": (sample + [str(tmp / "nodir")], "holds no checkpoint", {}),
        "checkpoint that runs code": (sample + [str(tmp / "evil_run")], "it references posix.system, and only tensors and plain data are loaded",
                                      {"absent": tmp / "pwned"}),
        "unseen characters": (sample + [str(char_run), "--prompt", "xyz"], "never saw 'x', 'y', 'z'", {}),
        "zero samples": (sample + [str(char_run), "--num_samples", "0"], "--num_samples must be at least 1", {}),
        "zero new tokens": (sample + [str(char_run), "--max_new_tokens", "0"], "--max_new_tokens must be at least 1", {}),
        "negative temperature": (sample + [str(char_run), "--temperature", "-1"], "--temperature must be >= 0", {}),
        "top_p zero": (sample + [str(char_run), "--top_p", "0"], "--top_p must be in (0, 1]", {}),
        "top_p above one": (sample + [str(char_run), "--top_p", "1.5"], "--top_p must be in (0, 1]", {}),
    }


CASES = [
    "missing file", "no path after --data", "folder without txt", "empty file", "whitespace file", "binary file",
    "invalid utf-8", "too short", "vocab below the byte alphabet", "vocab above uint32",
    "unknown config key", "config not yaml", "unknown override", "wrong type", "impossible value", "negative lr",
    "no bad steps allowed", "missing config", "unknown flag",
    "resume missing run", "resume run without checkpoint", "resume another architecture", "resume another tokenizer",
    "resume other data", "resume truncated checkpoint", "fresh run over a checkpoint", "run dir is a file",
    "run dir not writable", "cache dir not writable", "disk full while caching",
    "missing run", "run without checkpoint", "checkpoint that runs code", "unseen characters", "zero samples",
    "zero new tokens", "negative temperature", "top_p zero", "top_p above one",
]


def test_sample_into_a_pipe_closed_early_stops_without_a_traceback(tmp_path, char_run):
    """`tinylm sample RUN | head -1`: the reader leaves after one line, and sample stops quietly."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", "sample", str(char_run), "--max_new_tokens", "100000",
                             "--seed", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # it has begun writing
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err.decode()
    assert err.decode().strip() == ""


def test_the_case_list_is_the_table(tmp_path, char_run, locked):
    assert CASES == list(bad_inputs(tmp_path, char_run, locked))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error(case, tmp_path, char_run, locked):
    args, message, opts = bad_inputs(tmp_path, char_run, locked)[case]
    result = run(args, tmp_path, unprivileged() if opts.get("unprivileged") else [])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    if "absent" in opts:
        assert not opts["absent"].exists()
