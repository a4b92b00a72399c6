"""`--data hf:NAME[@REVISION][:CONFIG][:SPLIT]`: Hugging Face Hub datasets through `datasets.load_dataset`.

A local folder laid out like a Hub dataset repository (parquet files per split, configs declared in the
README's YAML, as on the Hub) stands in for the Hub: `load_dataset` reads it by the same code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, read_texts

from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.prepare import cache_key, prepare
from tinylm.sources import HubSource, corpus_sources, parse_hub

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "elk", "ant", "yak"]
CARD = """---
configs:
- config_name: full
  default: true
  data_files:
  - split: train
    path: full/train.parquet
  - split: validation
    path: full/validation.parquet
- config_name: short
  data_files:
  - split: train
    path: short/train.parquet
---
# stories
"""


def story(i: int) -> str:
    return f"Once upon a time a {ANIMALS[i % 8]} named {ANIMALS[(i * 3) % 8].title()} found {i} stones.\n"


@pytest.fixture
def hub_repo(tmp_path) -> Path:
    import datasets

    repo = tmp_path / "stories"
    for sub in ("full", "short"):
        (repo / sub).mkdir(parents=True)
    datasets.Dataset.from_dict({"story": [story(i) for i in range(40)], "id": list(range(40))}).to_parquet(repo / "full" / "train.parquet")
    datasets.Dataset.from_dict({"story": [story(i) for i in range(40, 45)], "id": list(range(40, 45))}).to_parquet(repo / "full" / "validation.parquet")
    datasets.Dataset.from_dict({"story": ["Short one.\n", "", "Short two.\n"], "id": [0, 1, 2]}).to_parquet(repo / "short" / "train.parquet")
    (repo / "README.md").write_text(CARD)
    return repo


def cfg_for(tmp_path, spec: str, **kw) -> DataConfig:
    return DataConfig(paths=[spec], cache_dir=str(tmp_path / "cache"), **kw)


def test_parse_hub_spec():
    assert parse_hub("hf:roneneldan/TinyStories") == HubSource("roneneldan/TinyStories", None, "train", None)
    assert parse_hub("hf:wikitext:wikitext-2-raw-v1:validation") == HubSource("wikitext", "wikitext-2-raw-v1", "validation", None)
    assert parse_hub("hf:a/b@v1.0::train[:10%]") == HubSource("a/b", None, "train[:10%]", "v1.0")
    with pytest.raises(UserError, match="names no dataset"):
        parse_hub("hf:")


def test_default_config_and_train_split_with_the_text_column_found(tmp_path, hub_repo):
    cfg = cfg_for(tmp_path, f"hf:{hub_repo}")
    assert read_texts(cfg) == [story(i) for i in range(40)]  # "story" is the only string column
    assert [source.name for source in corpus_sources(cfg)] == [f"hf:{hub_repo}"]


def test_config_split_and_slice_are_honoured(tmp_path, hub_repo):
    assert read_texts(cfg_for(tmp_path, f"hf:{hub_repo}:short")) == ["Short one.\n", "Short two.\n"]
    assert read_texts(cfg_for(tmp_path, f"hf:{hub_repo}:full:validation")) == [story(i) for i in range(40, 45)]
    assert read_texts(cfg_for(tmp_path, f"hf:{hub_repo}::train[:3]")) == [story(i) for i in range(3)]


def test_ambiguous_text_column_needs_the_flag(tmp_path):
    import datasets

    repo = tmp_path / "two"
    repo.mkdir()
    datasets.Dataset.from_dict({"title": ["A", "B"], "body": ["alpha text\n", "beta text\n"]}).to_parquet(repo / "train.parquet")
    with pytest.raises(UserError, match="cannot tell which column .* pass --data.text_column=NAME"):
        read_texts(cfg_for(tmp_path, f"hf:{repo}"))
    assert read_texts(cfg_for(tmp_path, f"hf:{repo}", text_column="body")) == ["alpha text\n", "beta text\n"]


def test_unknown_split_is_a_user_error(tmp_path, hub_repo):
    with pytest.raises(UserError, match=f"cannot load Hugging Face dataset hf:{hub_repo}:short:test"):
        read_texts(cfg_for(tmp_path, f"hf:{hub_repo}:short:test"))


def test_cache_key_tracks_name_config_split_revision_and_local_files(tmp_path, hub_repo):
    def key(spec: str) -> str:
        cfg = cfg_for(tmp_path, spec)
        return cache_key(cfg, corpus_sources(cfg))

    keys = {key(s) for s in ("hf:org/name", "hf:org/name:cfg", "hf:org/name::validation", "hf:org/name@abc123", "hf:org/other")}
    assert len(keys) == 5  # each part of the name changes the key, and no network is needed for any
    before = key(f"hf:{hub_repo}")
    (hub_repo / "README.md").write_text(CARD + "edited\n")
    assert key(f"hf:{hub_repo}") != before  # a local stand-in is known by its files


def test_prepare_from_hub_and_reuse(tmp_path, hub_repo):
    cfg = cfg_for(tmp_path, f"hf:{hub_repo}", tokenizer="char")
    first = prepare(cfg)
    again = prepare(cfg)
    assert not first.reused and again.reused and first.dir == again.dir
    text = first.tokenizer.decode(first.train.tolist() + first.val.tolist()).replace("<|endoftext|>", "")
    assert text == "".join(story(i) for i in range(40))


def test_unreachable_hub_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "hf:nobody/nothing", "--train.device=cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face Hub to load hf:nobody/nothing")
