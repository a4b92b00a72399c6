"""Property-based fuzzing of the command line with hypothesis: config files, `--section.field=value`
overrides, and the options of train, sample, export and explain.

For every generated input, `tinylm` (its `main`, called in-process: a subprocess per example would cost
seconds) must exit 0, or 2 with exactly one `error:` line; never raise (an exception escaping `main` is
a traceback for a user), finish in bounded time, and write nothing outside the run, cache and export
folders it was given. Each example gets a fresh copy of a small world of user files: a corpus, a folder
of the user's own files, a note, a crafted pickle, a trained run.

Seeded and small in CI (derandomize: the same examples every run, so a failure replays); a longer run:

    TINYLM_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py

What is left out, by design: values that ask for long work and are not wrong (train.max_steps=10**9,
--max_new_tokens=10**9, torch.compile on a CPU, a corpus of "/"), drawn only small; and hf: datasets (no
network in tests).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import markov_text, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm import cli
from tinylm.config import all_keys
from tinylm.console import QUIET
from tinylm.loop import train

EXAMPLES = int(os.environ.get("TINYLM_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECONDS = 60  # the most one example may take (most take a fraction of a second)

# Always given first, so a valid input trains a tiny model for a step or two; the fuzzed ones come after
# and win.
BASE = ["--data.paths=corpus.txt", "--data.tokenizer=char", "--model.n_layer=1", "--model.n_embd=16",
        "--model.n_head=2", "--model.block_size=8", "--train.max_steps=2", "--train.batch_size=2",
        "--train.eval_batches=1", "--train.sample_tokens=0", "--train.device=cpu", "--train.compile=false",
        "--data.cache_dir=cache"]

junk = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**80), 2**80),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                 st.sampled_from(["", "nan", "inf", "-1", "0", "1e-3", "1_000", "auto", "true", "[1, 2]", "{a: 1}",
                                  "&a [*a]", "x" * 500]))
values = st.recursive(junk, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=2), max_leaves=6)
bad_small = st.one_of(st.integers(-3, 0), st.floats(allow_nan=True), st.text(max_size=5), st.none())
# Settings whose large valid values mean long work: drawn small when valid.
BOUNDED = {"train.max_steps": st.integers(1, 3), "train.max_time": st.sampled_from([0, 0.5, 2]),
           "train.eval_batches": st.integers(1, 2), "train.sample_tokens": st.integers(0, 8),
           "train.grad_accum": st.integers(1, 2), "train.compile": st.sampled_from(["false", "auto", "maybe"])}
PLACES = ["", "corpus.txt", "missing", "mine", "notes.txt", "evil", "trained", "theirs", "new", "new/deep", "x" * 300]
CURATED = {"data.paths": st.lists(st.sampled_from(PLACES + ["utf16.txt", "binary.bin"]), max_size=2),
           "data.cache_dir": st.sampled_from(["cache", "cache2", "", "notes.txt", "mine/sub"]),
           "train.init_from": st.sampled_from(PLACES)}


def value_for(key: str) -> st.SearchStrategy:
    if key in CURATED:
        return CURATED[key] | junk
    if key in BOUNDED:
        return BOUNDED[key] | bad_small
    return values


keys = st.sampled_from(all_keys()) | st.sampled_from(["model.n_layers", "train", "x.y", "train.", ".seed"])
overrides = st.lists(keys.flatmap(lambda k: st.tuples(st.just(k), value_for(k))), max_size=4)


def override_args(pairs: list) -> list[str]:
    """--key=value, the value written as YAML would read it back (or plain text)."""
    out = []
    for key, value in pairs:
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip() if not isinstance(value, str) else text
        out.append(f"--{key}={text}")
    return out


config_files = st.one_of(
    st.dictionaries(st.sampled_from(["model", "data", "train", "other"]),
                    st.dictionaries(st.sampled_from([k.split(".")[1] for k in all_keys()] + ["typo"]), values,
                                    max_size=3) | junk, max_size=3).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=60),  # anything, YAML or not
)


@st.composite
def train_commands(draw) -> list[str]:
    args = ["train", *BASE]
    if draw(st.booleans()):
        args += ["--config", draw(st.sampled_from(["cfg.yaml", "mine", "missing.yaml", "default"]))]
    place = draw(st.sampled_from(["run_dir", "resume", "neither"]))
    if place != "neither":
        args += [f"--{place}", draw(st.sampled_from(PLACES))]
    return args + override_args(draw(overrides))


def option(name: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just([]), strategy.map(lambda v: [f"--{name}={v}"]))


@st.composite
def other_commands(draw) -> list[str]:
    command = draw(st.sampled_from(["sample", "export", "explain"]))
    run = draw(st.sampled_from(PLACES))
    if command == "sample":
        args = ["sample", run]
        for name, strategy in (("prompt", st.text(max_size=10)), ("max_new_tokens", st.integers(-2, 12)),
                               ("temperature", st.floats(allow_nan=True) | st.text(max_size=3)),
                               ("top_k", st.integers(-2, 2**70)), ("top_p", st.floats(allow_nan=True)),
                               ("seed", st.integers(-(2**70), 2**70) | st.sampled_from([2**32, 2**63, 2**64, -(2**63) - 1])), ("num_samples", st.integers(-1, 2)),
                               ("device", st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "tpu", "mps", ""]))):
            args += draw(option(name, strategy))
        return args
    if command == "export":
        return ["export", run, draw(st.sampled_from(PLACES)), *draw(st.sampled_from([[], ["--force"]]))]
    neighbors = draw(st.lists(st.text(max_size=6), max_size=2))
    return ["explain", *([run] if draw(st.booleans()) else []), *(["--neighbors", *neighbors] if neighbors else [])]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The user's files each example starts from (copied afresh for each)."""
    w = tmp_path_factory.mktemp("fuzz-world")
    (w / "corpus.txt").write_text(markov_text(3000))
    (w / "mine").mkdir()
    (w / "mine" / "config.yaml").write_text("the user's own config\n")
    (w / "notes.txt").write_text("the user's notes\n")
    (w / "theirs").mkdir()
    (w / "theirs" / "checkpoint.pt").write_bytes(b"not ours")
    (w / "utf16.txt").write_bytes("some text\n".encode("utf-16"))
    (w / "binary.bin").write_bytes(bytes(range(256)))
    (w / "evil").mkdir()
    (w / "evil" / "config.json").write_text('{"model_type": "gpt2"}')
    (w / "evil" / "pytorch_model.bin").write_bytes(b"\x80\x04cposix\nsystem\n(S'touch pwned'\ntR.")
    cfg = tiny_config(w, [w / "corpus.txt"], data={"tokenizer": "char"}, train={"max_steps": 2, "sample_tokens": 0})
    cfg.data.cache_dir = "cache"
    with contextlib.chdir(w):
        train(cfg, run_dir="trained", console=QUIET)
    return w


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def allowed(args: list[str]) -> list[str]:
    """The folders a command may write in: its runs, caches (data/cache by default) and export folder."""
    roots = ["runs", "cache", "data/cache"]
    for i, arg in enumerate(args):
        if arg in ("--run_dir", "--resume") and i + 1 < len(args):
            roots.append(args[i + 1])
        if arg.startswith("--data.cache_dir="):
            roots.append(arg.split("=", 1)[1])
    if args[0] == "export":
        roots.append(args[2])
    return [r for r in roots if r and r != "."]


def run_cli(world: Path, tmp: Path, args: list[str], config: str = "") -> int:
    """One example: main(args) in a fresh copy of the world, with `config` in cfg.yaml; checks the
    properties every input must have and returns the exit status."""
    w = tmp / "w"
    shutil.rmtree(w, ignore_errors=True)
    shutil.copytree(world, w, symlinks=True)
    (w / "cfg.yaml").write_text(config)
    before = snapshot(w)
    err, out = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.chdir(w), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(args)
        except SystemExit as e:  # --help
            rc = e.code
    took = time.monotonic() - started
    stderr = err.getvalue()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc in (0, 2), (args, rc, stderr[-2000:])
    assert "Traceback" not in stderr, (args, stderr[-2000:])
    assert len(errors) == (1 if rc == 2 else 0), (args, stderr[-2000:])
    assert all(len(line) < 1000 for line in errors), (args, errors)
    assert took < SECONDS, (args, took)
    after = snapshot(w)
    roots = allowed(args)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    stray = [p for p in changed if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)]
    assert not stray, (args, stray)
    assert not (w / "pwned").exists()
    return rc


@FUZZ
@given(args=train_commands(), config=config_files)
def test_train_inputs_end_in_one_line_or_a_run(world, tmp_path, args, config):
    run_cli(world, tmp_path, args, config)


@FUZZ
@given(args=other_commands())
def test_sample_export_and_explain_inputs_end_in_one_line_or_their_work(world, tmp_path, args):
    run_cli(world, tmp_path, args)


def test_the_fuzzer_reaches_both_outcomes(world, tmp_path):
    """The properties are not met by refusing everything: an ordinary input trains, an odd one is refused."""
    assert run_cli(world, tmp_path, ["train", *BASE, "--run_dir", "new"]) == 0
    assert (tmp_path / "w" / "new" / "checkpoint.pt").is_file()
    assert run_cli(world, tmp_path, ["train", *BASE, "--train.seed=-1"]) == 2
