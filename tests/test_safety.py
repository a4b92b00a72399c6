"""Hostile and careless input (issue 12), each case a real `python -m tinylm` process: exit status 2, exactly
one `error:` line that says what is wrong, no traceback, a few hundred bytes of stderr, and the user's
files byte for byte as they were (no file written where it was not asked for).

The processes start together (a module fixture) and each test reads its own: most fail before torch is
loaded, in a fraction of a second. A failing final save is simulated in-process (a writer that raises
ENOSPC), as no test can fill a real disk.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import ROOT, markov_text, tiny_config

from tinylm import checkpoint, rundir
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.loop import train

TINY = ["--data.tokenizer=char", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2",
        "--model.block_size=16", "--train.max_steps=2", "--train.batch_size=2", "--train.eval_batches=1",
        "--train.sample_tokens=0", "--train.device=cpu"]


@dataclass
class Case:
    args: list[str]
    error: str  # a regex the one error line must match (after "error: ")
    cwd: str = "."
    keep: list[str] = field(default_factory=list)  # folders (or files) that must be byte for byte as they were
    absent: list[str] = field(default_factory=list)  # paths that must not exist afterwards
    memory: int | None = None  # an address-space limit for the process, in bytes


CASES = {
    "run_dir_empty": Case(["train", "--run_dir", "", *TINY], r"--run_dir is empty", cwd="mine", keep=["mine"]),
    "run_dir_user_folder": Case(["train", "--run_dir", "mine", *TINY],
                                r"^'mine' is a folder with files of its own, not a tinylm run", keep=["mine"]),
    "run_dir_file": Case(["train", "--run_dir", "notes.txt", *TINY], r"is a file, not a folder", keep=["notes.txt"]),
    "resume_not_a_run": Case(["train", "--resume", "theirs"], r"^'theirs' is not a tinylm run", keep=["theirs"]),
    "alias_bomb": Case(["train", "--config", "bomb.yaml"], r"aliases expand to more than 100,000 values",
                       memory=2 << 30),
    "huge_value_echoed": Case(["train", "--data.tokenizer=" + "x" * 100_000], r"must be one of bpe, char, got 'xxx"),
    "batch_size_1e9": Case(["train", "--data", "corpus.txt", "--run_dir", "big", *TINY,
                            "--train.batch_size=1000000000"], r"^this run cannot fit: .*lower train.batch_size",
                           absent=["big"]),
    "n_embd_1e6": Case(["train", "--data", "corpus.txt", "--run_dir", "wide", *TINY, "--model.n_embd=1048576",
                        "--model.n_head=1"], r"^this run cannot fit: the model's weights", absent=["wide"]),
    "seed_negative": Case(["train", "--train.seed=-1"], r"'train.seed' must be between 0 and 4,294,967,295"),
    "seed_too_large": Case(["train", "--train.seed=4294967296"], r"'train.seed' must be between 0 and"),
    "sample_tpu": Case(["sample", "run", "--device", "tpu"], r"^--device must be auto, cpu, cuda, cuda:N or mps, got"),
    "sample_cuda": Case(["sample", "run", "--device", "cuda"], r"^--device=cuda but this torch build sees no CUDA"),
    "other_tokenizer": Case(["sample", "swapped", "--prompt", "ab", "--max_new_tokens", "3"],
                            r"^swapped/tokenizer.json is not the tokenizer the weights in swapped/checkpoint.pt "
                            r"were trained with .*fingerprint differs", keep=["swapped"]),
    "n_layer_edited": Case(["sample", "deeper", "--max_new_tokens", "3"],
                           r"do not fit the model config.yaml describes: model.n_layer is 2, but the checkpoint "
                           r"holds 1 block$", keep=["deeper"]),
    "sample_seed_overflow": Case(["sample", "run", "--seed", str(2**64)], r"^--seed must be between -2\*\*63 and"),
    "export_empty_out": Case(["export", "run", ""], r"^OUT_DIR is empty", keep=["mine"], absent=["config.json"]),
    "path_too_long": Case(["train", "--config", "x" * 5000], r"^cannot use the path 'xxx.*': File name too long$"),
    "config_folder": Case(["train", "--config", "conf/"], r"^conf is a folder, not a config file"),
    "cache_dir_file": Case(["train", "--data", "corpus.txt", "--run_dir", "c", *TINY, "--data.cache_dir=notes.txt"],
                           r"^data.cache_dir 'notes.txt' is a file, not a folder", keep=["notes.txt"], absent=["c"]),
    "download_dir_file": Case(["download", "shakespeare", "--dir", "notes.txt"], r"^--dir 'notes.txt' is a file",
                              keep=["notes.txt"]),
    "utf16_config": Case(["train", "--config", "utf16.yaml"], r"is UTF-16 \(it starts with a byte-order mark\)"),
    "yaml_syntax": Case(["train", "--config", "broken.yaml"], r"is not valid YAML at line 3, column 1"),
    "crafted_pickle": Case(["train", "--init_from", "evil", "--data", "corpus.txt", "--run_dir", "e", *TINY],
                           r"^cannot load the weights evil/pytorch_model.bin: it holds objects other than tensors",
                           keep=["evil"], absent=["e", "pwned"]),
}


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


def make_world(w: Path) -> None:
    """The user's files every case may meet."""
    (w / "corpus.txt").write_text(markov_text(4000))
    (w / "mine").mkdir()
    for name in ("config.yaml", "tokenizer.json", "data.json"):
        (w / "mine" / name).write_text(f"the user's own {name}\n")
    (w / "notes.txt").write_text("the user's notes\n")
    (w / "theirs").mkdir()
    (w / "theirs" / "config.yaml").write_text("model:\n  n_layer: 1\n")
    (w / "theirs" / "checkpoint.pt").write_bytes(b"someone else's checkpoint")
    (w / "conf").mkdir()
    (w / "utf16.yaml").write_bytes("model:\n  n_layer: 2\n".encode("utf-16"))
    (w / "broken.yaml").write_text("model:\n  n_layer: [1\n")
    nested = "&l0 [" + ", ".join(["aaaaaaaaaa"] * 9) + "]"
    for i in range(1, 9):  # nine levels of nine: 387 million strings once expanded
        nested = f"&l{i} [{nested}, " + ", ".join([f"*l{i - 1}"] * 8) + "]"
    (w / "bomb.yaml").write_text(f"data:\n  paths:\n    - {nested}\n")
    (w / "evil").mkdir()
    (w / "evil" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                                        "n_positions": 32, "vocab_size": 50}))
    (w / "evil" / "pytorch_model.bin").write_bytes(pickle.dumps(Crafted(), protocol=4))

    cfg = tiny_config(w, [w / "corpus.txt"], data={"tokenizer": "char"}, train={"max_steps": 2, "sample_tokens": 0})
    train(cfg, run_dir=w / "run", console=QUIET)
    shutil.copytree(w / "run", w / "swapped")  # a valid tokenizer.json of the same size, two tokens swapped
    tok = json.loads((w / "swapped" / rundir.TOKENIZER).read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[3:5]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (w / "swapped" / rundir.TOKENIZER).write_text(json.dumps(tok))
    shutil.copytree(w / "run", w / "deeper")  # n_layer edited in config.yaml and in the checkpoint's config
    config_file = w / "deeper" / rundir.CONFIG
    config_file.write_text(config_file.read_text().replace("n_layer: 1", "n_layer: 2"))
    state = checkpoint.load(w / "deeper" / rundir.CHECKPOINT)
    state["config"]["model"]["n_layer"] = 2
    torch.save(state, w / "deeper" / rundir.CHECKPOINT)


class Crafted:
    """A pickle that would create a file named pwned if unpickled by anything but weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def start(w: Path, case: Case) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def limit() -> None:
        if case.memory:
            resource.setrlimit(resource.RLIMIT_AS, (case.memory, case.memory))

    return subprocess.Popen([sys.executable, "-m", "tinylm", *case.args], cwd=w / case.cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    w = tmp_path_factory.mktemp("hostile")
    make_world(w)
    before = {name: {p: snapshot(w / p) for p in case.keep} for name, case in CASES.items()}
    procs = {name: start(w, case) for name, case in CASES.items()}
    results = {name: (*p.communicate(timeout=120), p.returncode) for name, p in procs.items()}
    return {"world": w, "before": before, "results": results}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line_leaving_files_alone(ran, name):
    if name == "sample_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    case, w = CASES[name], ran["world"]
    out, err, rc = ran["results"][name]
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip() == errors[0], err  # one line and nothing else: no warnings
    assert re.search(case.error, errors[0][len("error: "):]), errors[0]
    assert len(errors[0]) < 600 and "weights_only" not in err
    for path in case.keep:
        assert snapshot(w / path) == ran["before"][name][path], f"{path} changed"
    for path in case.absent:
        assert not (w / path).exists(), f"{path} was written"


def test_a_file_name_with_a_line_break_names_no_folder_with_one(tmp_path):
    (tmp_path / "a\nb.txt").write_text(markov_text(2000))
    p = subprocess.run([sys.executable, "-m", "tinylm", "train", "--data", "a\nb.txt", *TINY], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [d.name for d in (tmp_path / "runs").iterdir()] == ["default-a_b"]
    assert "tinylm sample runs/default-a_b" in p.stdout


def test_a_final_save_on_a_full_disk_is_an_error_with_no_promise(tmp_path, markov_file, monkeypatch):
    """Every save fails with ENOSPC: the one at step 2 warns that training goes on, the last one (step 4,
    an evaluation too) is the run's error and promises nothing."""
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                      train={"max_steps": 4, "eval_interval": 2, "sample_tokens": 0})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    lines: list[str] = []
    with pytest.raises(UserError) as e:
        train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert str(e.value) == (f"could not write {tmp_path / 'run' / 'checkpoint.pt'}: No space left on device; "
                            "no checkpoint was saved yet")
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [f"warning: could not write {tmp_path / 'run' / 'checkpoint.pt'}: No space left on device; "
                        "no checkpoint was saved yet; training goes on and tries again at the next save"]
    assert "tries again" not in lines[-1]


def test_a_derived_run_name_is_one_short_line():
    name = rundir.run_name(None, ["a\tb\x1b" + "y" * 300 + ".txt"])
    assert name.startswith("default-a_b_y") and len(name) == rundir.NAME_CHARS
