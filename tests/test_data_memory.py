"""Texts held in memory as a corpus (the Python API's `data=["...", ...]`): prepared exactly as the same
documents read from files, cached under a key that hashes their content, described in meta.json, and
identified by the same fingerprint that a resumed run checks its data against."""

from __future__ import annotations

import json
import re

import pytest
from conftest import markov_text, read_texts

from tinylm.config import Config, DataConfig
from tinylm.errors import UserError
from tinylm.prepare import fingerprint, prepare

TEXTS = ["The first document.\r\nIt has two lines.\n", "   \n", markov_text(3000, seed=1) + "\n",
         "Ünïcödé — 日本語 " * 50, markov_text(2000, seed=2)]


def cache_files(prep) -> dict[str, bytes]:
    return {name: (prep.dir / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_texts_are_prepared_exactly_as_the_same_documents_in_files(tmp_path, tokenizer):
    # The reference: the texts as the files of a folder, in order; a blank text is skipped as a blank row
    # of a dataset is (a blank file would be an error), so the folder leaves it out.
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        if text.strip():
            (folder / f"{i:02d}.txt").write_bytes(text.encode())
    settings = {"tokenizer": tokenizer, "vocab_size": 300, "val_fraction": 0.2}
    from_files = prepare(DataConfig(paths=[str(folder)], cache_dir=str(tmp_path / "files"), **settings))
    from_memory = prepare(DataConfig(cache_dir=str(tmp_path / "memory"), **settings), texts=TEXTS)
    assert cache_files(from_memory) == cache_files(from_files)
    assert fingerprint(from_memory) == fingerprint(from_files)
    assert from_memory.meta["documents"] == 4 and from_memory.meta["val_bytes"] > 1000


def test_same_texts_reuse_the_cache_and_other_texts_rebuild_it(tmp_path):
    cfg = DataConfig(tokenizer="char", cache_dir=str(tmp_path / "cache"))
    first = prepare(cfg, texts=TEXTS)
    again = prepare(cfg, texts=list(TEXTS))  # another list, the same texts
    assert not first.reused and again.reused and again.dir == first.dir
    meta = json.loads((first.dir / "meta.json").read_text())
    assert len(meta["sources"]) == 1 and re.fullmatch(r"memory: 5 texts, sha256 [0-9a-f]{16}", meta["sources"][0])

    edited = [*TEXTS[:-1], TEXTS[-1][:-1] + "x"]  # one character changed
    changed = prepare(cfg, texts=edited)
    assert not changed.reused and changed.dir != first.dir
    assert json.loads((changed.dir / "meta.json").read_text())["sources"] != meta["sources"]
    assert fingerprint(changed) != fingerprint(first)

    # The same characters cut into other documents are another corpus (an end-of-text token moves).
    regrouped = prepare(cfg, texts=[TEXTS[0] + TEXTS[1], *TEXTS[2:]])
    assert not regrouped.reused and regrouped.dir not in (first.dir, changed.dir)


def test_texts_follow_the_configured_paths(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("from a file\n")
    cfg = DataConfig(paths=[str(p)], tokenizer="char", val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    assert read_texts(cfg, ["in memory\r\n", "also in memory"]) == ["from a file\n", "in memory\n", "also in memory"]
    prep = prepare(cfg, texts=["in memory\r\n", "also in memory"])
    sources = json.loads((prep.dir / "meta.json").read_text())["sources"]
    assert sources[0] == str(p) and sources[1].startswith("memory: 2 texts, sha256 ")
    assert prep.meta["documents"] == 3


@pytest.mark.parametrize("texts, message", [
    ([], "the data texts hold no text"),
    (["", "  \n\t"], "the data texts hold no text"),
    ("one string", "data texts must be a list of strings, not one string"),
    (["fine", 3], "data texts must be strings; text 1 is int"),
])
def test_bad_texts_are_one_line_errors(tmp_path, texts, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        prepare(DataConfig(tokenizer="char", cache_dir=str(tmp_path / "cache")), texts=texts)


def test_a_resume_on_other_texts_is_refused_by_the_fingerprint(tmp_path):
    # What a resumed run compares: the checkpoint's data fingerprint against the data prepared now.
    from tinylm import rundir

    cfg = Config()
    cfg.data.tokenizer, cfg.data.cache_dir = "char", str(tmp_path / "cache")
    previous = rundir.Resume(tmp_path / "ckpt.pt", {"data": fingerprint(prepare(cfg.data, texts=TEXTS))}, {})
    cfg.data.cache_dir = str(tmp_path / "elsewhere")  # a new cache, the same texts: resumes
    previous.check_data(fingerprint(prepare(cfg.data, texts=TEXTS)))
    with pytest.raises(UserError, match="cannot resume from .*: the data differs from the checkpoint's"):
        previous.check_data(fingerprint(prepare(cfg.data, texts=TEXTS[:-1])))
