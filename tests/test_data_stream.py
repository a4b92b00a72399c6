"""Preparing a corpus in pieces: the same bytes on disk however small the pieces, the same one-line errors,
and a bounded sample of text for BPE. The pieces are made tiny here (a few bytes read at a time, pieces
of a few characters for the tokenizer) so that every boundary case occurs: a CRLF, a multi-byte character
and the byte-order mark cut between two reads, the train/val cut inside a piece, a batch of one piece."""

from __future__ import annotations

import codecs
import json
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from conftest import markov_text, read_texts
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import sources, tokens
from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.prepare import Prepared, prepare
from tinylm.sources import clean, corpus_sources, read_text_file
from tinylm.tokens import TRAIN, VAL, bpe_sample, split_stream, survey


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Read 7 bytes at a time, cut the text into pieces of ~5 characters, tokenize ~40 at a time."""
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    for name, value in (("PIECE_CHARS", 5), ("BATCH_CHARS", 40), ("SAMPLE_WINDOW", 64)):
        monkeypatch.setattr(tokens, name, value)


def cache_files(prep: Prepared) -> dict[str, bytes]:
    meta = json.loads((prep.dir / "meta.json").read_text())
    return {"meta": json.dumps(meta, sort_keys=True).encode(),
            **{name: (prep.dir / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}}


def corpus(tmp_path):
    """Files with what chunked reading could get wrong: a BOM, CRLF and CR line ends, multi-byte
    characters, long lines and blank ones; a folder of several documents; rows of a JSON Lines file."""
    (tmp_path / "books").mkdir()
    lines = "".join(f"Ligne {i}: naïve café — 日本語 {'x' * (i % 13)}\r\n" + ("\r" if i % 5 == 0 else "") for i in range(400))
    (tmp_path / "books" / "a.txt").write_bytes(("\ufeff" + lines).encode())
    (tmp_path / "books" / "b.txt").write_text(markov_text(3000) + "\n\n  indented\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i} \U0001F600 " * (i % 4 + 1) + "\r\n"}) for i in range(300)))
    return [tmp_path / "books", rows]


@pytest.mark.parametrize("tokenizer, vocab_size, sample", [("char", 0, 10**8), ("bpe", 400, 10**8), ("bpe", 400, 2000)],
                         ids=["char", "bpe", "bpe-sampled"])
def test_prepared_in_pieces_is_byte_identical_to_prepared_at_once(tmp_path, monkeypatch, tokenizer, vocab_size, sample):
    paths = corpus(tmp_path)

    def prepared(cache: str) -> dict[str, bytes]:
        cfg = DataConfig(paths=[str(p) for p in paths], tokenizer=tokenizer, vocab_size=vocab_size or 4096,
                         tokenizer_sample_bytes=sample, cache_dir=str(tmp_path / cache))
        return cache_files(prepare(cfg))

    at_once = prepared("whole")
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    for name, value in (("PIECE_CHARS", 5), ("BATCH_CHARS", 40)):
        monkeypatch.setattr(tokens, name, value)
    in_pieces = prepared("pieces")
    assert in_pieces == at_once
    assert len(in_pieces["train.bin"]) > 10_000 and len(in_pieces["val.bin"]) > 1000


def test_prepared_in_pieces_holds_the_ids_of_the_whole_text(tmp_path, tiny_pieces):
    # An independent reference: the file decoded whole, cut by hand, each part encoded in one call.
    p = tmp_path / "one.txt"
    text = "".join(f"line {i}, naïve — 日本\r\n" for i in range(300))
    p.write_bytes(("\ufeff" + text).encode())
    prep = prepare(DataConfig(paths=[str(p)], tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "c")))
    whole = text.replace("\r\n", "\n")
    cut = round(len(whole) * 0.9)
    at = whole.rfind("\n", 0, cut) + 1  # the last line end before the cut
    eot = prep.tokenizer.eot_id
    assert prep.train.tolist() == prep.tokenizer.tok.encode(whole[:at]).ids + [eot]
    assert prep.val.tolist() == prep.tokenizer.tok.encode(whole[at:]).ids + [eot]
    assert prep.meta["train_bytes"] == len(whole[:at].encode()) and prep.meta["val_bytes"] == len(whole[at:].encode())


@pytest.mark.parametrize("read_bytes", [7, 1 << 24], ids=["in pieces", "at once"])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\t\n" * 5, "holds only whitespace"),
        (b"\xef\xbb\xbf", "holds only whitespace"),
        (b"text\x00more", "looks like a binary file (NUL byte at offset 4), not text"),
        (b"good line\nbad \xff byte", "is not valid UTF-8 (byte 14, line 2); convert it"),
        (b"a\n" * 20 + b"\xc3(" + b"b" * 30 + b"\x00", "looks like a binary file (NUL byte at offset 72), not text"),  # a NUL anywhere wins
        (b"\xef\xbb\xbfab\ncd\xe2\x82", "is not valid UTF-8 (byte 8, line 2); convert it"),  # the offset in the file, BOM included
        ("text\n".encode("utf-16"), "is UTF-16 text (it starts with a UTF-16 byte-order mark); convert it to UTF-8$"),
        (codecs.BOM_UTF16_BE + "text\n".encode("utf-16-be"), "is UTF-16 text"),
        ("text\n".encode("utf-32"), "is UTF-32 text (it starts with a UTF-32 byte-order mark); convert it to UTF-8$"),
        (codecs.BOM_UTF32_BE + "text\n".encode("utf-32-be"), "is UTF-32 text"),
    ],
)
def test_bad_files_are_the_same_one_line_errors_in_pieces(tmp_path, monkeypatch, read_bytes, content, message):
    monkeypatch.setattr(sources, "READ_BYTES", read_bytes)
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=f"^{p} " + message.replace("(", r"\(").replace(")", r"\)")):
        read_texts(DataConfig(paths=[str(p)]))


# Bytes that make decoding in pieces hard: line ends (a CRLF to cut), multi-byte characters, a character
# cut short, bytes that are never UTF-8, a byte-order mark anywhere, text and blanks.
AWKWARD = st.lists(st.sampled_from([b"a", b" ", b"\n", b"\r", b"\r\n", "é".encode(), "日".encode(), "😀".encode(),
                                    b"\xe2\x82", b"\xff", codecs.BOM_UTF8]), max_size=20).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(raw=AWKWARD, read_bytes=st.integers(1, 9), errors=st.sampled_from(["strict", "replace"]))
def test_a_file_read_in_any_pieces_is_as_if_decoded_whole(raw, read_bytes, errors):
    # The reference: Python's one-shot decode of the whole file, then `clean`; or where it fails, the
    # position it fails at.
    try:
        expected, problem = clean(raw.decode("utf-8", errors=errors)), ""
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        expected, problem = "", f"is not valid UTF-8 (byte {e.start}, line {line})"
    if not problem and (not expected or expected.isspace()):
        problem = "holds only whitespace" if raw else "is empty"
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(sources, "READ_BYTES", read_bytes):
        p = Path(folder) / "t.txt"
        p.write_bytes(raw)
        if problem:
            with pytest.raises(UserError, match="^" + re.escape(f"{p} {problem}")):
                "".join(read_text_file(p, errors))
        else:
            assert "".join(read_text_file(p, errors)) == expected


def test_invalid_utf8_is_replaced_alike_in_pieces(tmp_path, tiny_pieces):
    raw = bytes(range(256)).replace(b"\x00", b"") * 3 + "€ ü 😀".encode() + b"\xe2\x82" + b"\r"
    p = tmp_path / "messy.txt"
    p.write_bytes(raw)
    assert read_texts(DataConfig(paths=[str(p)], errors="replace")) == [clean(raw.decode("utf-8", errors="replace"))]


def test_split_stream_places_the_cut_at_a_line_end_in_a_piece(tiny_pieces):
    # The same split whether the document comes whole or in pieces of 3 characters.
    text = "".join(f"line {i}\n" for i in range(100))
    cut = round(len(text) * 0.9)
    whole = list(split_stream([text], cut))
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    events = list(split_stream([iter(pieces)], cut))
    train = "".join(t for side, t in events if side == TRAIN and t)
    val = "".join(t for side, t in events if side == VAL and t)
    assert whole == [(TRAIN, train), (TRAIN, None), (VAL, val), (VAL, None)]
    assert train == text[: text.rfind("\n", 0, cut) + 1] and val.startswith("line 9")
    assert [e for e in events if e[1] is None] == [(TRAIN, None), (VAL, None)]


def test_bpe_learns_from_a_bounded_sample_spread_over_the_training_text(tmp_path, tiny_pieces):
    p = tmp_path / "big.txt"
    p.write_text("".join(f"{i:06d} " for i in range(20_000)))  # 140,000 characters whose numbers say where
    cfg = DataConfig(paths=[str(p)], tokenizer="bpe", vocab_size=300, tokenizer_sample_bytes=6_400)
    corpus = survey(corpus_sources(cfg), charset=False)
    cut = round(corpus.chars * 0.9)
    sample = list(bpe_sample(corpus_sources(cfg), cut, corpus, cfg.tokenizer_sample_bytes))
    taken = "".join(sample)
    assert 6_400 - 64 <= len(taken) <= 6_400 + 64  # the budget, give or take a window
    numbers = [int(n) for piece in sample for n in re.findall(r"(?<!\d)\d{6}(?!\d)", piece)]
    assert numbers[0] == 0 and 0.85 * 20_000 < numbers[-1] < 0.9 * 20_000  # from the start to the cut
    assert len(sample) > 50 and max(numbers) == numbers[-1]  # many windows, in order


def test_char_vocabulary_sees_every_character_of_a_large_corpus(tmp_path, tiny_pieces):
    p = tmp_path / "rare.txt"
    p.write_text("a" * 5000 + "Ω" + "b" * 5000 + "\n" + "c" * 1000 + "ζ")  # ζ only in the validation text
    prep = prepare(DataConfig(paths=[str(p)], tokenizer="char", cache_dir=str(tmp_path / "c")))
    assert set(prep.tokenizer.tok.get_vocab()) == {"a", "b", "c", "\n", "Ω", "ζ", "<|endoftext|>"}
    assert prep.tokenizer.decode(prep.val[:-1].tolist()).endswith("cζ")


def test_a_hub_dataset_streamed_gives_the_same_shards(tmp_path):
    # A local folder laid out like a Hub repository stands in for the Hub (as in test_hub_data.py).
    import datasets

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    rows = [f"story {i}: " + "once upon a time " * (i % 5 + 1) + "\n" for i in range(200)]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(200))}).to_parquet(repo / "data" / "train.parquet")

    def prepared(streaming: bool) -> dict[str, bytes]:
        cfg = DataConfig(paths=[f"hf:{repo}"], tokenizer="bpe", vocab_size=300, streaming=streaming,
                         cache_dir=str(tmp_path / f"cache-{streaming}"))
        return cache_files(prepare(cfg))

    streamed = prepared(True)
    assert streamed == prepared(False)
    assert json.loads(streamed["meta"])["documents"] == 200
