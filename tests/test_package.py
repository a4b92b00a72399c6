"""The package a user installs: a wheel built from this checkout carries the recipes and finds them by name
outside the checkout; `tinylm --version`; `tinylm train --help` documents every setting and recipe."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from test_cli import run, unprivileged

from tinylm import __version__, confdoc, configfile
from tinylm.cli import main


def pip(*args: str) -> None:
    """pip of this Python, offline: everything it needs is already here."""
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "--no-deps", "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built, as `pip install .` builds it, from a copy of the checkout (the build writes into its source)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("tinylm", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip("wheel", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (found,) = (tmp / "dist").glob("tinylm-*.whl")
    return found


def test_the_wheel_carries_every_recipe_and_the_version(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for recipe in sorted((ROOT / "configs").glob("*.yaml")):
            assert f"tinylm/configs/{recipe.name}" in names, recipe.name
            assert z.read(f"tinylm/configs/{recipe.name}") == recipe.read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert f"\nVersion: {__version__}\n" in z.read(metadata).decode()
    assert wheel.name.startswith(f"tinylm-{__version__}-")
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # written once, in tinylm/__init__.py


def test_the_installed_package_finds_recipes_by_name_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)

    code = ("import tinylm; from tinylm import config, configfile; c = config.load('small'); "
            "print(tinylm.__file__, configfile.resolve('small'), c.model.n_embd, c.data.vocab_size, sep='\\n')")
    found = python("-c", code)
    assert found.returncode == 0, found.stderr
    package, recipe, n_embd, vocab = found.stdout.split("\n")[:4]
    assert Path(package) == site / "tinylm" / "__init__.py"  # the installed copy, not this checkout
    assert Path(recipe) == site / "tinylm" / "configs" / "small.yaml"
    assert (n_embd, vocab) == ("384", "8192")  # small.yaml's values

    # The Python API from the installed copy: texts in memory, a run in this folder, a sample from it.
    code = ("import sys, tinylm; light = 'torch' not in sys.modules; tiny = {'model.n_layer': 1, 'model.n_head': 2, "
            "'model.n_embd': 32, 'model.block_size': 16, 'data.tokenizer': 'char', 'train.batch_size': 4, "
            "'train.max_steps': 2, 'train.max_time': 0, 'train.eval_batches': 1, 'train.sample_tokens': 0}; "
            "run = tinylm.train(data=['abc ' * 100, 'cab ' * 100], run_dir='run', overrides=tiny, quiet=True); "
            "print(light, tinylm.api.__file__, tinylm.load('run').sample('ab', max_new_tokens=3, seed=0), sep='\\n')")
    api = python("-c", code)
    assert api.returncode == 0, api.stderr
    light, module, sample = api.stdout.split("\n")[:3]
    assert light == "True" and Path(module) == site / "tinylm" / "api.py"
    assert sample.startswith("ab") and len(sample) >= 5 and (elsewhere / "run" / "checkpoint.pt").is_file()

    version = python("-m", "tinylm", "--version")
    assert (version.returncode, version.stdout) == (0, f"tinylm {__version__}\n")
    helped = python("-m", "tinylm", "train", "--help")
    assert helped.returncode == 0 and "--model.n_layer=INT" in helped.stdout
    assert all(f"  {name} " in helped.stdout for name in configfile.recipes())
    unknown = python("-m", "tinylm", "train", "--config", "tiny")
    assert unknown.returncode == 2
    assert unknown.stderr == ("error: config file not found: tiny (recipes: baseline, default, gpt2_small, "
                              "shakespeare_char, shakespeare_char_cpu, small)\n")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    assert main([flag]) == 0
    assert capsys.readouterr().out == f"tinylm {__version__}\n"


def test_usage_goes_to_stdout_when_asked_for_and_to_stderr_when_a_command_is_missing(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr()
    assert "tinylm train [--config NAME_OR_FILE]" in out.out and "tinylm --version" in out.out and not out.err
    assert main([]) == 2
    out = capsys.readouterr()
    assert "tinylm train [--config NAME_OR_FILE]" in out.err and not out.out


def test_train_help_documents_every_setting_and_recipe(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the help is wrapped; compare words
    for f in confdoc.fields():
        assert f"  --{f.key}={f.metavar}" in out
        assert f"{' '.join(f.help.split())} (default: {f.default_text})" in flat, f.key
    for name, summary in confdoc.recipe_summaries().items():
        assert f"{name} {summary}" in flat
    assert max(map(len, out.splitlines())) <= 98  # COLUMNS - 2, as argparse wraps its own part


def test_a_config_folder_or_an_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "mine").mkdir()
    folder = run(["-m", "tinylm", "train", "--config", "mine/"], tmp_path)
    assert folder.returncode == 2
    assert folder.stderr.startswith("error: mine is a folder, not a config file; name a YAML file or a recipe")
    secret = tmp_path / "secret.yaml"
    secret.write_text("model:\n  n_layer: 2\n")
    secret.chmod(0)
    denied = run(["-m", "tinylm", "train", "--config", str(secret)], tmp_path, unprivileged())
    assert (denied.returncode, denied.stderr) == (2, f"error: cannot read config file {secret}: Permission denied\n")
