import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tinylm import config, configfile
from tinylm.errors import UserError


def test_default_yaml_equals_builtin_defaults():
    assert config.load(ROOT / "configs" / "default.yaml") == config.Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config.load(path)


def test_shakespeare_config_is_nanogpt_reference_shape():
    cfg = config.load(ROOT / "configs" / "shakespeare_char.yaml")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (6, 6, 384, 256)
    assert cfg.data.tokenizer == "char"


def test_overrides_are_typed():
    cfg = config.load(None, {"model.n_layer": "3", "train.lr": "1e-3", "model.bias": "false", "data.paths": "a.txt"})
    assert cfg.model.n_layer == 3 and cfg.train.lr == 1e-3 and cfg.model.bias is False
    assert cfg.data.paths == ["a.txt"]


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"n_layer": 2}, "train": {"max_steps": 7}}))
    cfg = config.load(p, {"train.max_steps": 9})
    assert cfg.model.n_layer == 2 and cfg.train.max_steps == 9 and cfg.model.n_embd == config.ModelConfig().n_embd


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(None, {"model.n_layer": 2, "data.paths": ["x.txt"]})
    config.save(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.n_layr": 2}, "did you mean 'model.n_layer'"),
        ({"trian.lr": 1.0}, "did you mean 'train.lr'"),
        ({"model.n_layer": "four"}, "'model.n_layer' must be int"),
        ({"model.n_layer": 2.5}, "'model.n_layer' must be int"),
        ({"model.bias": "maybe"}, "'model.bias' must be bool"),
        ({"model.n_embd": 100, "model.n_head": 3}, "must be divisible by model.n_head"),
        ({"train.lr": -0.1}, "'train.lr' must be > 0"),
        ({"model.dropout": 1.5}, "model.dropout"),
        ({"data.tokenizer": "words"}, "must be one of bpe, char"),
        ({"data.vocab_size": 100}, "at least 257"),
        ({"data.val_fraction": 0}, "data.val_fraction"),
        ({"train.device": "tpu"}, "train.device"),
        ({"model.pos": "alibi"}, "'model.pos' must be one of learned, rope"),
        ({"model.norm": "batchnorm"}, "'model.norm' must be one of layernorm, rmsnorm"),
        ({"model.mlp": "tanh"}, "'model.mlp' must be one of gelu, relu2, swiglu"),
        ({"model.qk_norm": "sometimes"}, "'model.qk_norm' must be bool"),
        ({"model.rope_theta": 0}, "'model.rope_theta' must be > 0"),
        ({"model.norm_eps": -1e-5}, "'model.norm_eps' must be > 0"),
        ({"model.mlp_hidden": -4}, "'model.mlp_hidden' must be >= 0"),
        ({"model.pos": "rope", "model.n_embd": 12, "model.n_head": 4}, "model.pos=rope needs an even head size, got"),
        ({"train.optimizer": "sgd"}, "'train.optimizer' must be one of adamw, muon"),
        ({"train.muon_lr": 0}, "'train.muon_lr' must be > 0"),
    ],
)
def test_bad_values_fail_with_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "sec.yaml").write_text("modle:\n  n_layer: 2\n")
    with pytest.raises(UserError, match="did you mean 'model'"):
        config.load(tmp_path / "sec.yaml")


@pytest.mark.parametrize("text, where", [
    # An unclosed list: found at the end of the file, and where the list began.
    ("model: [1, 2\n", "at line 2, column 1: expected ',' or ']', but got '<stream end>' "
                       "(while parsing a flow sequence, line 1, column 8)"),
    ("model:\n  n_layer: 2\n\tn_head: 1\n", "at line 3, column 1: found character '\\t' that cannot start any token"),
    ("model:\n  n_layer: 2: 3\n", "at line 2, column 13: mapping values are not allowed here"),
    ("model:\n  n_layer: 2\x07\n", "at line 2, column 13: character U+0007 is not allowed"),
])
def test_yaml_errors_say_where(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(path)
    assert str(e.value) == f"config file {path} is not valid YAML {where}"


def test_a_config_that_is_not_utf8(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("model:\n  n_layer: 2 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.yaml is not valid UTF-8 \(byte 25, line 2\)$"):
        config.load(tmp_path / "latin1.yaml")


def test_recipes_are_the_configs_folder():
    assert configfile.recipes_dir() == ROOT / "configs"  # a checkout: no copy inside the package
    assert configfile.recipes() == {p.stem: p for p in sorted((ROOT / "configs").glob("*.yaml"))}
    assert {"default", "small", "shakespeare_char_cpu"} <= set(configfile.recipes())


def test_a_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout: configs/small.yaml is not a path here
    small = config.load("small")
    assert small == config.load(ROOT / "configs" / "small.yaml")
    assert (small.model.n_embd, small.data.vocab_size) == (384, 8192)  # small.yaml's own values, not defaults
    assert configfile.resolve("shakespeare_char_cpu") == ROOT / "configs" / "shakespeare_char_cpu.yaml"


def test_an_existing_file_wins_over_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("small").write_text("model:\n  n_layer: 2\n")
    assert config.load("small").model.n_layer == 2
    Path("small").unlink()
    Path("small").mkdir()  # a folder is never a config file: the recipe of that name is meant
    assert config.load("small").model.n_layer == 6


@pytest.mark.parametrize("given, message", [
    ("configs", "configs is a folder, not a config file; name a YAML file or a recipe (recipes: baseline, "),
    ("smal", "config file not found: smal; did you mean the recipe 'small'? (recipes: baseline, "),
    ("configs/small.yaml", "config file not found: configs/small.yaml; did you mean the recipe 'small'?"),
    ("nothing_like_it", "config file not found: nothing_like_it (recipes: baseline, default, gpt2_small, "
                        "shakespeare_char, shakespeare_char_cpu, small)"),
])
def test_a_config_that_is_neither_file_nor_recipe(tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    Path("configs").mkdir()
    if given == "configs/small.yaml":
        Path("configs").rmdir()
    with pytest.raises(UserError) as e:
        config.load(given)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_field_is_documented_where_it_is_defined():
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{section}.{f.name} has no help text"


@pytest.mark.parametrize("key", [f"{s}.{f.name}" for s, cls in config.SECTIONS.items()
                                 for f in dataclasses.fields(cls) if f.metadata["choices"]])
def test_declared_choices_are_what_validation_accepts(key):
    section, name = key.split(".")
    choices = next(f for f in dataclasses.fields(config.SECTIONS[section]) if f.name == name).metadata["choices"]
    assert getattr(getattr(config.Config(), section), name) in choices
    for choice in choices:
        assert getattr(getattr(config.load(None, {key: choice}), section), name) == choice
    with pytest.raises(UserError, match=f"'{key}' must be one of {', '.join(choices)}, got 'other'"):
        config.load(None, {key: "other"})


def test_docs_config_md_is_generated_from_the_help_texts():
    from tinylm import confdoc

    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == confdoc.markdown(), f"docs/config.md is out of date; regenerate it with: {confdoc.REGENERATE}"
    for f in confdoc.fields():  # every field, with its type, default and help, in the page
        assert f"| `{f.key}` | " in page and f"| `{f.default_text}` | " in page
    assert all(f"| `{name}` |" in page for name in configfile.recipes())


def test_every_recipe_starts_with_a_one_line_summary():
    from tinylm import confdoc

    summaries = confdoc.recipe_summaries()
    assert list(summaries) == list(configfile.recipes())
    for name, summary in summaries.items():
        assert summary.endswith(".") and len(summary) > 30, f"configs/{name}.yaml: its first line should say what it is"


def test_diff_names_changed_keys():
    a, b = config.Config(), config.load(None, {"model.n_layer": 9})
    assert config.diff(a, b) == {"model.n_layer": (4, 9)}
