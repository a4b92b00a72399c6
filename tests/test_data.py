import json
import os

import numpy as np
import pytest
import torch
from conftest import markov_text, read_texts

from tinylm.batches import check_window, get_batch
from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.prepare import fingerprint, prepare
from tinylm.sources import builtin_corpus, corpus_sources
from tinylm.tokenizer import train_bpe
from tinylm.tokens import TRAIN, VAL, chunks, split_stream, storage_dtype


def cfg_for(tmp_path, paths, **kw) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def test_bom_and_line_endings_are_normalised(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffone\r\ntwo\rthree\n".encode("utf-8"))
    assert read_texts(cfg_for(tmp_path, [p])) == ["one\ntwo\nthree\n"]


def test_builtin_corpus_is_pydoc_reference_text():
    text = builtin_corpus()
    assert 400_000 < len(text.encode()) < 600_000
    assert "assert" in text and "\r" not in text


def test_split_cuts_at_the_last_line_end_before_the_cut():
    text = "".join(f"line {i}\n" for i in range(1000))
    cut = round(len(text) * 0.9)
    events = list(split_stream([text], cut))
    train = "".join(t for side, t in events if side == TRAIN and t)
    val = "".join(t for side, t in events if side == VAL and t)
    assert train + val == text and len(train) == text.rfind("\n", 0, cut) + 1 != cut
    assert val.startswith("line 9") and abs(len(val) / len(text) - 0.1) < 0.01
    assert [e for e in events if e[1] is None] == [(TRAIN, None), (VAL, None)]


def test_split_keeps_whole_documents_before_the_cut(tmp_path):
    # Through prepare, with a character vocabulary: the token files hold each split's texts, each followed
    # by an end-of-text token. 600 characters, the cut at 450 falls after the 5th line of document 7.
    docs = [f"doc {i}\n" * 10 for i in range(10)]
    prep = prepare(DataConfig(tokenizer="char", val_fraction=0.25, cache_dir=str(tmp_path / "cache")), texts=docs)

    def texts(ids: np.ndarray) -> list[str]:  # the texts between end-of-text tokens
        ends = np.flatnonzero(ids == prep.tokenizer.eot_id)
        assert ends[-1] == len(ids) - 1
        starts = [0, *(ends[:-1] + 1)]
        return [prep.tokenizer.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)]

    assert texts(prep.train) == docs[:7] + [docs[7][:30]]
    assert texts(prep.val) == [docs[7][30:]] + docs[8:]


def test_chunked_encoding_equals_whole_encoding():
    text = "".join(f"  indented {i}\n\nword{i} and more {i*7}\n  \n" for i in range(3000))
    tok = train_bpe([text], 400)
    pieces = chunks(text, size=1000)
    assert len(pieces) > 10 and "".join(pieces) == text
    chunked = [i for ids in tok.encode_batch(pieces) for i in ids]
    assert chunked == tok.encode(text)


def test_storage_dtype():
    assert storage_dtype(65_536) == np.uint16
    assert storage_dtype(65_537) == np.uint32


def test_prepare_writes_memmaps_and_meta(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text(markov_text(5000))
    prep = prepare(cfg_for(tmp_path, [p], tokenizer="char"))
    meta = json.loads((prep.dir / "meta.json").read_text())
    assert meta["vocab_size"] == 9 and meta["dtype"] == "uint16"
    assert len(prep.train) == meta["train_tokens"] and len(prep.val) == meta["val_tokens"]
    assert meta["train_tokens"] + meta["val_tokens"] == 5000 + 2  # every character, plus EOT after each split
    # The token files hold exactly the ids of the text, with EOT closing each split.
    tok = prep.tokenizer
    assert tok.decode(prep.train[:-1].tolist()) + tok.decode(prep.val[:-1].tolist()) == p.read_text()
    assert prep.train[-1] == tok.eot_id


def test_cache_is_reused_and_rebuilt_on_change(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text(markov_text(5000))
    first = prepare(cfg_for(tmp_path, [p], tokenizer="char"))
    again = prepare(cfg_for(tmp_path, [p], tokenizer="char"))
    assert not first.reused and again.reused and again.dir == first.dir

    p.write_text(markov_text(6000))  # the input changes: a new cache
    changed = prepare(cfg_for(tmp_path, [p], tokenizer="char"))
    assert not changed.reused and changed.dir != first.dir and changed.meta["train_tokens"] > first.meta["train_tokens"]

    other = prepare(cfg_for(tmp_path, [p], tokenizer="bpe", vocab_size=300))  # tokenizer settings change
    assert not other.reused and other.dir != changed.dir and other.meta["tokenizer"] == "bpe"
    assert prepare(cfg_for(tmp_path, [p], tokenizer="bpe", vocab_size=300)).reused
    assert not prepare(cfg_for(tmp_path, [p], tokenizer="bpe", vocab_size=320)).reused


def test_folder_of_txt_files(tmp_path):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 100)
    (d / "sub" / "b.txt").write_text("beta " * 100)
    (d / "skip.bin").write_bytes(b"\x00\x01")
    cfg = cfg_for(tmp_path, [d])
    assert [os.path.basename(source.name) for source in corpus_sources(cfg)] == ["a.txt", "b.txt"]
    assert read_texts(cfg) == ["alpha " * 100, "beta " * 100]


def test_jsonl_through_datasets(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps({"id": i, "story": f"story number {i}\r\n"}) for i in range(5)))
    assert read_texts(cfg_for(tmp_path, [p])) == [f"story number {i}\n" for i in range(5)]


def test_saved_dataset_through_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(cfg_for(tmp_path, [tmp_path / "ds"])) == ["first doc", "second doc"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\t\n", "holds only whitespace"),
        (b"text\x00more", "binary file (NUL byte at offset 4)"),
        (b"good line\nbad \xff byte", "not valid UTF-8 (byte 14, line 2)"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_texts(cfg_for(tmp_path, [p]))


def test_invalid_utf8_can_be_replaced(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good \xff byte")
    assert read_texts(cfg_for(tmp_path, [p], errors="replace")) == ["good \ufffd byte"]


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_texts(cfg_for(tmp_path, [tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        read_texts(cfg_for(tmp_path, [tmp_path / "empty"]))


def test_batches_are_windows_shifted_by_one():
    ids = np.arange(1000, dtype=np.uint16)
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(ids, 8, 16, gen, torch.device("cpu"))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the ids are consecutive, so each target is its input plus one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    gen2 = torch.Generator().manual_seed(0)
    assert torch.equal(get_batch(ids, 8, 16, gen2, torch.device("cpu"))[0], x)


def test_too_short_for_one_window():
    with pytest.raises(UserError, match="fewer than one training window"):
        check_window("training", 64, 64)
    check_window("training", 65, 64)


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:100]), "train.bin holds 100 bytes, meta.json says 9002"),
    (lambda d: (d / "val.bin").unlink(), "val.bin holds no bytes"),
    (lambda d: (d / "meta.json").write_text('{"dtype": "uint16", "train_tok'), "its meta.json is unreadable"),
])
def test_damaged_cache_is_rebuilt(tmp_path, damage, problem):
    # A disk that filled up or a process killed while copying a cache can leave meta.json beside a cut file.
    p = tmp_path / "m.txt"
    p.write_text(markov_text(5000))
    cfg = cfg_for(tmp_path, [p], tokenizer="char")
    first = prepare(cfg)
    before = (first.train.tolist(), first.val.tolist(), fingerprint(first))
    damage(first.dir)
    again = prepare(cfg)
    assert not again.reused and again.dir == first.dir and problem in again.note
    assert (again.train.tolist(), again.val.tolist(), fingerprint(again)) == before
    assert prepare(cfg).reused


def test_fingerprint_names_the_tokens_not_the_path(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(markov_text(5000))
    b.write_text(markov_text(5000))
    c = tmp_path / "c.txt"
    c.write_text(markov_text(5000, seed=1))
    fa, fb, fc = (fingerprint(prepare(cfg_for(tmp_path, [p], tokenizer="char"))) for p in (a, b, c))
    assert fa == fb and fa["tokens_sha256"] != fc["tokens_sha256"]
    meta = json.loads((prepare(cfg_for(tmp_path, [a], tokenizer="char")).dir / "meta.json").read_text())
    del meta["tokens_sha256"]  # a cache from before the hash was stored: computed from the files instead
    prep = prepare(cfg_for(tmp_path, [a], tokenizer="char"))
    prep.meta = meta
    assert fingerprint(prep) == fa


def test_unwritable_cache_is_one_line(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text(markov_text(5000))
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(UserError, match=rf"^data.cache_dir '{blocker}/cache' cannot be a folder: '{blocker}' is a file$"):
        prepare(DataConfig(paths=[str(p)], cache_dir=str(blocker / "cache"), tokenizer="char"))


def test_a_build_killed_midway_leaves_nothing_behind(tmp_path):
    """SIGKILL a real cache build while its private folder exists: the next prepare removes that folder
    (its process is gone) and builds the cache; a live process's build folder is left alone."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    corpus = tmp_path / "big.txt"
    corpus.write_text(markov_text(3_000_000))
    cfg = cfg_for(tmp_path, [corpus], tokenizer="char")
    cache = tmp_path / "cache"
    script = (f"from tinylm import config; from tinylm.prepare import prepare; prepare(config.DataConfig(paths=[{str(corpus)!r}], "
              f"cache_dir={str(cache)!r}, tokenizer='char'))")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (dead,) = cache.glob(".*")  # killed mid-build: its folder, and no finished cache
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []
    live = cache / f"{dead.name.rsplit('-', 2)[0]}-{os.getpid()}-x"  # as if this process were building
    live.mkdir()
    prep = prepare(cfg)
    assert not prep.reused and not dead.exists() and live.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([prep.dir.name, live.name])
