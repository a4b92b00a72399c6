"""The Python API (tinylm/api.py): `tinylm.train` on paths or texts held in memory, `tinylm.load`, a run's
`.sample` against generate() and a whole decode, resuming a run trained on texts, and `import tinylm`
staying light."""

from __future__ import annotations

import json
import os
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, markov_text

import tinylm
from tinylm import api, rundir
from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.generate import generate
from tinylm.prepare import fingerprint, prepare

# A model and schedule that train in a couple of seconds; char tokens, so any text can be a prompt.
TINY = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "model.dropout": 0.0,
        "data.tokenizer": "char", "train.batch_size": 8, "train.max_steps": 20, "train.max_time": 0,
        "train.eval_batches": 2, "train.sample_tokens": 0, "train.device": "cpu", "train.dtype": "float32",
        "train.evals": 2, "train.save_interval": 0}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"The {rng.choice(['cat', 'dog', 'bird'])} sat on the {rng.choice(['mat', 'log', 'tree'])}."
            for _ in range(n)]


TEXTS = sentences(300)


def tiny(tmp_path: Path, **more) -> dict:
    return {**TINY, "data.cache_dir": str(tmp_path / "cache"), **more}


@pytest.fixture(scope="module")
def texts_run(tmp_path_factory) -> tinylm.Run:
    tmp = tmp_path_factory.mktemp("api")
    return tinylm.train(data=TEXTS, run_dir=tmp / "run", overrides=tiny(tmp), quiet=True)


# ---------------------------------------------------------------- import tinylm


def test_import_tinylm_imports_no_torch_and_serves_the_api_on_first_use():
    code = ("import sys, tinylm; light = 'torch' not in sys.modules; train = tinylm.train; "
            "from tinylm import load, Run; import tinylm.api as api; "
            "print(light, train is api.train, load is api.load, Run is api.Run, 'train' in dir(tinylm))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 5
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        tinylm.trian  # noqa: B018
    # A submodule named train or load would replace tinylm.train or tinylm.load once imported.
    assert not {m.name for m in pkgutil.iter_modules(tinylm.__path__)} & {"train", "load", "Run"}


# ---------------------------------------------------------------- what data means


def test_the_data_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text("text")
    (tmp_path / "shelf").mkdir()
    assert api.data_inputs(None) == (None, None)
    assert api.data_inputs("book.txt") == (["book.txt"], None)
    assert api.data_inputs(Path("missing.txt")) == (["missing.txt"], None)  # a Path is a path, found or not
    assert api.data_inputs(["book.txt", Path("shelf"), "hf:user/set"]) == (["book.txt", "shelf", "hf:user/set"], None)
    assert api.data_inputs(("one text", "book")) == (None, ["one text", "book"])  # no file 'book' here: a text
    cases = [
        ("no such thing", "one string is a path, and 'no such thing' is no file or folder; to train on text held "
                          r"in memory, pass a list of strings: data=\[text, \.\.\.\]"),
        (["book.txt", "The cat sat."], r"data mixes paths \('book.txt'\) and texts held in memory \('The cat sat.'"),
        (["book.txt", "bok.txt"], r"data mixes paths \('book.txt'\) and texts held in memory \('bok.txt'"),
        (["bok.txt"], "data: no file or folder 'bok.txt'"),
        (["The cat sat.", " corpus.JSONL\n"], "data: no file or folder 'corpus.JSONL'"),
        ([], "data is an empty list"),
        (["a text", 3], "data items must be paths or strings; item 1 is int"),
        (b"bytes", "data must be a path or a list of paths or texts, not bytes"),
        ({"a": 1}, "data must be a path or a list of paths or texts, not dict"),
    ]
    for data, message in cases:
        with pytest.raises(UserError, match=message):
            api.data_inputs(data)


def test_data_given_twice_and_resume_without_a_run_dir_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"give the data once: data=\.\.\. or overrides\['data.paths'\]"):
        tinylm.train(data=TEXTS, overrides={"data.paths": ["x.txt"]})
    with pytest.raises(UserError, match="resume=True needs the run_dir"):
        tinylm.train(data=TEXTS, resume=True)
    with pytest.raises(UserError, match="unknown config key 'train.max_step'"):
        tinylm.train(data=TEXTS, overrides={"train.max_step": 3})


# ---------------------------------------------------------------- training on texts, loading, sampling


def test_a_run_trained_on_texts(texts_run):
    run = texts_run
    assert (run.dir / rundir.CHECKPOINT).is_file() and rundir.trained_on_texts(run.dir)
    data = json.loads((run.dir / rundir.DATA).read_text())
    assert data["sources"][0].startswith(f"memory: {len(TEXTS)} texts, sha256 ")
    # It trained on exactly these texts: the checkpoint's data fingerprint is theirs, prepared afresh.
    reference = prepare(DataConfig(tokenizer="char", cache_dir=str(run.dir.parent / "elsewhere")), texts=TEXTS)
    assert torch.load(run.dir / rundir.CHECKPOINT, weights_only=True)["data"] == fingerprint(reference)
    assert run.metrics == json.loads((run.dir / rundir.METRICS).read_text()) and run.metrics["step"] == 20
    assert (run.config.model.n_embd, run.config.train.max_steps, run.config.data.paths) == (32, 20, [])
    assert run.tokenizer.decode(run.tokenizer.encode("The cat")) == "The cat"
    assert sum(p.numel() for p in run.model.parameters()) > 0 and not run.model.training
    assert repr(run) == (f"Run('{run.dir}': 1 layers, 32 wide, {sum(p.numel() for p in run.model.parameters()):,} "
                         f"parameters, step 20, val loss {run.metrics['val_loss']:.4f})")


def test_sample_is_the_prompt_and_what_generate_picks(texts_run):
    run, tok = texts_run, texts_run.tokenizer
    text = run.sample("The cat", max_new_tokens=30, temperature=0.9, top_k=10, top_p=0.95, seed=7)
    gen = torch.Generator().manual_seed(7)
    ids = list(generate(run.model, tok.encode("The cat"), 30, 0.9, 10, 0.95, gen))
    assert text == "The cat" + tok.decode(ids) and len(ids) == 30
    assert run.sample("The cat", max_new_tokens=30, temperature=0.9, top_k=10, top_p=0.95, seed=7) == text
    assert run.sample("The cat", max_new_tokens=30, temperature=0.9, seed=8) != text
    greedy = list(generate(run.model, [tok.eot_id], 12, 0.0))  # no prompt: the start of a document
    assert run.sample(max_new_tokens=12, temperature=0) == tok.decode(greedy)
    again = tinylm.load(run.dir)  # another session's view of the same files
    assert again.sample("The cat", max_new_tokens=30, temperature=0.9, top_k=10, top_p=0.95, seed=7) == text
    with pytest.raises(UserError, match=r"top_p must be in \(0, 1\], got 1.5"):
        run.sample("The", top_p=1.5)
    with pytest.raises(UserError, match="the character tokenizer never saw 'Z'"):
        run.sample("Zebra")


def test_resuming_a_run_trained_on_texts(tmp_path):
    run_dir = tmp_path / "run"
    first = tinylm.train(data=TEXTS, run_dir=run_dir, overrides=tiny(tmp_path, **{"train.max_steps": 10}), quiet=True)
    assert first.metrics["step"] == 10
    with pytest.raises(UserError, match="was trained on texts held in memory, which a run directory does not keep"):
        tinylm.train(run_dir=run_dir, resume=True, overrides={"train.max_steps": 16}, quiet=True)
    with pytest.raises(UserError, match="cannot resume from .*: the data differs from the checkpoint's"):
        tinylm.train(data=sentences(300, seed=1), run_dir=run_dir, resume=True, quiet=True)
    cli = subprocess.run([sys.executable, "-m", "tinylm", "train", "--resume", str(run_dir)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 2
    assert cli.stderr == (f"error: {run_dir} was trained on texts held in memory, which a run directory does not keep; "
                          f"resume it in Python with the same texts: tinylm.train(data=texts, run_dir='{run_dir}', "
                          "resume=True)\n")
    resumed = tinylm.train(data=TEXTS, run_dir=run_dir, resume=True, overrides={"train.max_steps": 16}, quiet=True)
    assert resumed.metrics["step"] == 16 and resumed.config.train.max_steps == 16


def test_explain_says_when_the_texts_are_gone(texts_run, tmp_path):
    import shutil

    from tinylm.explain import explain

    lines: list[str] = []
    explain(texts_run.dir, out=lines.append)  # the cache is there: the lesson's step uses its tokens
    cache = json.loads((texts_run.dir / rundir.DATA).read_text())["cache"]
    assert any(f"the run's training data ({cache})" in line for line in lines)
    run_dir = tmp_path / "copy"
    shutil.copytree(texts_run.dir, run_dir)
    data = json.loads((run_dir / rundir.DATA).read_text())
    (run_dir / rundir.DATA).write_text(json.dumps({**data, "cache": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=f"{run_dir} was trained on texts held in memory and its data cache "
                                        f"{tmp_path / 'gone'} is gone"):
        explain(run_dir, out=lines.append)


# ---------------------------------------------------------------- paths, names, the console


def test_train_on_a_path_names_the_run_like_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("book.txt").write_text(markov_text(4000))
    run = tinylm.train(data="book.txt", overrides=tiny(tmp_path, **{"train.max_steps": 4}))
    assert run.dir == Path("runs") / "default-book" and run.metrics["step"] == 4
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "tinylm sample runs/default-book" in out  # the log, not quiet
    quiet = tinylm.train(data=["book.txt"], config="default", overrides=tiny(tmp_path, **{"train.max_steps": 4}),
                         quiet=True)
    assert quiet.dir == Path("runs") / "default-book-2" and capsys.readouterr().out == ""
    texts = tinylm.train(data=TEXTS, overrides=tiny(tmp_path, **{"train.max_steps": 2}), quiet=True)
    assert texts.dir == Path("runs") / "default-texts"
