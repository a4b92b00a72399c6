from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from tinylm import config
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
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "sec.yaml").write_text("modle:\n  n_layer: 2\n")
    with pytest.raises(UserError, match="did you mean 'model'"):
        config.load(tmp_path / "sec.yaml")


def test_diff_names_changed_keys():
    a, b = config.Config(), config.load(None, {"model.n_layer": 9})
    assert config.diff(a, b) == {"model.n_layer": (4, 9)}
