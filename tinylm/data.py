"""Corpus -> cleaned text -> train/val split -> tokenizer -> token ids on disk -> random training windows.

`prepare(cfg.data)` does it all once and caches the result under `data.cache_dir/<key>/`:

    tokenizer.json   the trained tokenizer
    train.bin        token ids of the training split (numpy uint16, or uint32 for vocabularies > 65,536)
    val.bin          token ids of the validation split
    meta.json        sizes, dtype, the sources and settings that produced them

The key hashes the inputs (path, size, modification time) and every setting that changes the tokens,
so editing a file or the tokenizer settings builds afresh while an unchanged corpus is reused. A cache
folder whose files do not match its meta.json (a disk that filled up, a file cut short) is rebuilt.
`fingerprint` identifies the prepared tokens, so a resumed run can tell that its data is the same.

Inputs: text files, folders of `.txt` files (searched recursively), or, read through Hugging Face
`datasets`, `.jsonl`/`.json`/`.csv`/`.parquet` files, folders written by `Dataset.save_to_disk`, and
Hub datasets named `hf:NAME[@REVISION][:CONFIG][:SPLIT]` (e.g. `hf:roneneldan/TinyStories`).
With no input the built-in corpus is used: the Python reference documentation that every CPython
ships as `pydoc_data.topics` (about 465 KB of English technical prose), so training works offline.

A corpus larger than memory is fine: preparing never holds the whole corpus or its token ids. Files
are read READ_BYTES at a time and tabular files streamed (`datasets`' streaming=True) row by row; the
documents, any iterable of `Document`s, are read in passes: one to size the corpus (and collect the
character set, or a bounded sample of text for BPE), one to tokenize it in parallel batches
(`encode_batch_fast`), appending to train.bin and val.bin as it goes. The result does not depend on
how the text was cut into pieces: pieces are cut where the tokenizer would split anyway.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.tokenizer import TextTokenizer
from tinylm.tokenizer import train as train_tokenizer

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN = "builtin:pydoc_data"
READ_BYTES = 1 << 22  # bytes read from a text file at a time
PIECE_CHARS = 1 << 16  # characters per piece handed to the tokenizer
BATCH_CHARS = 1 << 22  # characters tokenized in one parallel batch
SAMPLE_WINDOW = 1 << 20  # characters per window of a sampled BPE training text
CUT_LOOKBACK = 10_000  # characters before the train/val cut searched for a line end to cut at
TRAIN, VAL = 0, 1


@dataclass
class Document:
    source: str  # a path or a description, for messages
    text: str | Iterable[str]  # the cleaned text, whole or as consecutive pieces (a file is read in chunks)


def pieces(doc: Document) -> Iterable[str]:
    return [doc.text] if isinstance(doc.text, str) else doc.text


# ---------------------------------------------------------------- reading and cleaning


def clean(text: str) -> str:
    """Drop a byte-order mark and normalise line ends (CRLF and lone CR become LF)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _incomplete_tail(raw: bytes) -> int:
    """How many bytes at the end of raw begin a UTF-8 character that the next read completes."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: where the character starts
            need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
            return back if need > back else 0
    return 0


def _line_of(path: Path, offset: int) -> int:
    """The line number of a byte offset, counted without reading the file whole."""
    lines, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(READ_BYTES, offset - done))
            if not block:
                break
            lines += block.count(b"\n")
            done += len(block)
    return lines


def read_text_file(path: Path, errors: str = "strict") -> Iterator[str]:
    """The cleaned text of a UTF-8 file in pieces of about READ_BYTES: a byte-order mark dropped, line
    ends normalised (a CRLF split between two reads too). A NUL byte (a binary file), invalid UTF-8 (with
    errors="strict"), an empty file or one of only whitespace is a UserError saying where, exactly as
    if the file had been read whole (the first NUL anywhere wins over an earlier invalid byte)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        offset = 0  # file offset of the first byte of `raw`
        carry = b""  # the start of a character the previous read cut
        cr = False  # the previous piece ended with "\r", perhaps the first half of a CRLF
        bad = -1  # file offset of the first invalid UTF-8 byte, once found
        size, has_text = 0, False
        while True:
            try:
                block = f.read(READ_BYTES)
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            size += len(block)
            raw = carry + block
            if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw, offset = raw[3:], 3
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise UserError(f"{path} looks like a binary file (NUL byte at offset {offset + nul}), not text")
            keep = _incomplete_tail(raw) if block and bad < 0 else 0
            data, carry = raw[: len(raw) - keep], raw[len(raw) - keep :]
            if bad < 0:
                try:
                    text = data.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:  # go on looking for a NUL, which would be reported first
                    bad = offset + e.start
                else:
                    if offset <= 3 and text.startswith("\ufeff"):  # as clean(): a second mark goes too
                        text = text[1:]
                    text = ("\r" if cr else "") + text
                    cr = bool(block) and text.endswith("\r")
                    text = (text[:-1] if cr else text).replace("\r\n", "\n").replace("\r", "\n")
                    has_text = has_text or (bool(text) and not text.isspace())
                    if text:
                        yield text
            offset += len(data)
            if not block:
                break
    if bad >= 0:
        raise UserError(
            f"{path} is not valid UTF-8 (byte {bad}, line {_line_of(path, bad)}); "
            "convert it to UTF-8 or pass --data.errors=replace to replace undecodable bytes"
        )
    if not has_text:
        raise UserError(f"{path} is empty" if not size else f"{path} holds only whitespace")


def builtin_corpus() -> Document:
    """The Python reference documentation shipped with CPython (pydoc_data.topics), as one document."""
    from pydoc_data.topics import topics

    return Document(BUILTIN, clean("\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"))


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders as their .txt files (recursive, sorted); missing or empty is an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"data path not found: {p}")
        if p.is_dir() and not is_saved_dataset(p):
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise UserError(f"no .txt files in folder {p}")
            files.extend(found)
        else:
            files.append(p)
    return files


def _text_column(columns: dict[str, object], wanted: str, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{source} has no column '{wanted}'; its columns are {', '.join(columns)}")
        return wanted
    if "text" in columns:
        return "text"
    strings = [name for name, feature in columns.items() if getattr(feature, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise UserError(
        f"cannot tell which column of {source} holds the text (columns: {', '.join(columns)}); "
        "pass --data.text_column=NAME"
    )


def dataset_documents(ds, cfg: DataConfig, source: str) -> Iterator[Document]:
    """The rows of a `datasets.Dataset`, or of an `IterableDataset` (load_dataset(..., streaming=True)),
    as documents from its text column, read a batch of rows at a time; none is a UserError."""
    import datasets

    def failed(e: Exception) -> UserError:  # datasets raises many kinds; the first line says what went wrong
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return UserError(f"cannot read {source} as a dataset: {first_line}")

    try:
        columns = ds.features
        if columns is None:  # a streamed CSV: the column types show in its first rows
            first = next(iter(ds.iter(batch_size=1)), None)
            if first is None:
                raise UserError(f"{source} holds no text")
            columns = {k: datasets.Value("string") if isinstance(v[0], str) else None for k, v in first.items()}
    except UserError:
        raise
    except Exception as e:
        raise failed(e) from None
    column = _text_column(columns, cfg.text_column, source)
    rows = ds.select_columns([column]).iter(batch_size=1000)
    index, found = 0, 0
    while True:
        try:
            batch = next(rows, None)
        except Exception as e:
            raise failed(e) from None
        if batch is None:
            break
        for text in batch[column]:
            if text and text.strip():
                found += 1
                yield Document(f"{source}[{index}]", clean(text))
            index += 1
    if not found:
        raise UserError(f"{source} holds no text")


def read_dataset(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """Rows of a tabular file (streamed, never converted whole) or a saved dataset (memory-mapped),
    read with Hugging Face `datasets`: one row, one document."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"{path} holds splits {', '.join(ds)} but no 'train' split")
                ds = ds["train"]
        else:
            builder = DATASET_SUFFIXES[path.suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds; the first line says what went wrong
        raise UserError(f"cannot read {path} as a dataset: {str(e).strip().splitlines()[0]}") from None
    yield from dataset_documents(ds, cfg, str(path))


# ---------------------------------------------------------------- Hugging Face Hub datasets

HUB = "hf:"


@dataclass
class HubSource:
    name: str  # "roneneldan/TinyStories", or a local folder laid out like a Hub dataset repository
    config: str | None
    split: str  # "train", or a slice such as "train[:10%]"
    revision: str | None  # a branch, tag or commit of the dataset repository

    @property
    def local(self) -> Path | None:
        p = Path(self.name)
        return p if p.exists() else None


def parse_hub(spec: str) -> HubSource:
    """hf:NAME[@REVISION][:CONFIG][:SPLIT] -> its parts (the split may itself hold colons: train[:10%])."""
    name, _, rest = spec[len(HUB):].partition(":")
    config, _, split_ = rest.partition(":")
    name, _, revision = name.partition("@")
    if not name:
        raise UserError(f"'{spec}' names no dataset; write hf:NAME[@REVISION][:CONFIG][:SPLIT], e.g. hf:roneneldan/TinyStories")
    return HubSource(name, config or None, split_ or "train", revision or None)


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, or None. Offline, `datasets` would retry for half a minute and
    print a warning per attempt; one quick connection says the same at once. Skipped in offline mode
    (HF_HUB_OFFLINE=1 loads what `datasets` has cached) and behind a proxy (the probe would go direct)."""
    import urllib.request
    from urllib.parse import urlparse

    import datasets
    from huggingface_hub import constants

    proxies = urllib.request.getproxies()  # the environment's, as urllib and requests read them
    if constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE or proxies.get("https") or proxies.get("all"):
        return None

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def read_hub(spec: str, cfg: DataConfig) -> Iterator[Document]:
    """A Hugging Face Hub dataset split, downloaded (and cached) by `datasets.load_dataset`, or with
    data.streaming rows streamed as they are read (without a copy on disk; read once per pass)."""
    import datasets

    src = parse_hub(spec)
    if src.local is None:
        why = hub_unreachable()
        if why:
            raise UserError(f"cannot reach the Hugging Face Hub to load {spec} ({why}); check the internet "
                            "connection, or set HF_HUB_OFFLINE=1 to use a copy that datasets has cached")
    datasets.enable_progress_bars()  # a Hub download can take minutes: show it
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, revision=src.revision,
                                   streaming=cfg.streaming)
    except Exception as e:  # not found, no such config or split: the first line says which
        raise UserError(f"cannot load Hugging Face dataset {spec}: {str(e).strip().splitlines()[0]}") from None
    yield from dataset_documents(ds, cfg, spec)


def _inputs(paths: list[str]) -> list[Path | str]:
    """expand_paths for files and folders, Hub specs (hf:...) kept as they are, in the given order."""
    out: list[Path | str] = []
    for p in paths:
        out.extend([p] if p.startswith(HUB) else expand_paths([p]))
    return out


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of the configured corpus, cleaned, in a stable order, read lazily: each call reads
    the corpus afresh, a file a chunk at a time."""
    if not cfg.paths:
        yield builtin_corpus()
        return
    for path in _inputs(cfg.paths):
        if isinstance(path, str):  # hf:...
            yield from read_hub(path, cfg)
        elif is_saved_dataset(path) or path.suffix.lower() in DATASET_SUFFIXES:
            yield from read_dataset(path, cfg)
        else:
            yield Document(str(path), read_text_file(path, cfg.errors))


def read_documents(cfg: DataConfig) -> list[Document]:
    """Every document of the configured corpus, each text whole, in memory (for small corpora and tests)."""
    return [Document(d.source, "".join(pieces(d))) for d in iter_documents(cfg)]


# ---------------------------------------------------------------- split


def split_stream(documents: Iterable[Document], cut: int) -> Iterator[tuple[int, str | None]]:
    """(TRAIN or VAL, text) in corpus order: the first `cut` characters are training text and the rest
    validation text, the document the cut falls in divided just after the last line end before the cut
    (if one is within CUT_LOOKBACK characters). None for text ends a text: where an end-of-text token
    goes. Text within CUT_LOOKBACK characters before the cut is held back until the cut is placed."""
    seen = 0
    for doc in documents:
        start = seen
        local = cut - start  # the cut, counted from this document's start
        hold_from = max(0, local - CUT_LOOKBACK)
        held: list[str] = []
        side = TRAIN if local > 0 else VAL
        wrote = False  # an empty document is no text at all
        for text in pieces(doc):
            if not text:
                continue
            wrote = True
            a, b = seen - start, seen - start + len(text)  # this piece is [a, b) of the document
            seen += len(text)
            if side == VAL:
                yield VAL, text
                continue
            if b <= hold_from:
                yield TRAIN, text
                continue
            if a < hold_from:
                yield TRAIN, text[: hold_from - a]
                text = text[hold_from - a :]
            held.append(text)
            if b > local:  # the document goes on past the cut: place it
                near = "".join(held)  # the document's [hold_from, b)
                nl = near.rfind("\n", max(1, local - CUT_LOOKBACK + 1) - hold_from, local - hold_from)
                at = (nl + 1 if nl >= 0 else local - hold_from)
                yield TRAIN, near[:at]
                yield TRAIN, None
                yield VAL, near[at:]
                side, held = VAL, []
        if held:
            yield TRAIN, "".join(held)
        if wrote:
            yield side, None


def split(docs: list[Document], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: the last `val_fraction` of the text (cut at a line end) is validation.

    Documents are kept whole except the one the cut falls in, as nanoGPT cuts its single file.
    (In memory; `build` does the same with `split_stream` on a corpus of any size.)
    """
    cut = round(sum(len(d.text) for d in docs) * (1 - val_fraction))
    texts: tuple[list[str], list[str]] = ([], [])
    current: list[str] = []
    for side, text in split_stream(docs, cut):
        if text is None:
            texts[side].append("".join(current))
            current = []
        else:
            current.append(text)
    return [t for t in texts[TRAIN] if t], [t for t in texts[VAL] if t]


# ---------------------------------------------------------------- tokenize and store


def chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Cut text into pieces of about `size` characters at points where byte-level BPE's pre-tokenizer
    would split anyway (between a non-space character and a space or newline: no pre-token spans
    those), so encoding the pieces gives exactly the ids of encoding the whole."""
    out, start = [], 0
    while len(text) - start > size:
        boundary = _SAFE_CUT.search(text, start + size)
        if boundary is None:
            break
        out.append(text[start : boundary.end()])
        start = boundary.end()
    out.append(text[start:])
    return out


# Python's \S excludes a few control characters that the tokenizer's regex counts as non-space, so
# the left side is safe; the right side is a plain space or newline, whitespace to both.
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \n])")


def tokenizer_pieces(events: Iterable[tuple[int, str | None]]) -> Iterator[tuple[int, str | None]]:
    """split_stream's events with each text re-cut into `chunks` of about PIECE_CHARS, whatever pieces
    it came in: what the tokenizer makes of them does not depend on how the corpus was read."""
    carry = ""
    for side, text in events:
        if text is None:
            if carry:
                yield side, carry
            carry = ""
            yield side, None
            continue
        cut = chunks(carry + text, PIECE_CHARS)
        carry = cut.pop()
        for piece in cut:
            yield side, piece


def storage_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(f"vocabulary of {vocab_size} does not fit in uint32 token storage")


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


@dataclass
class Survey:
    """What one pass over the corpus learns before anything is tokenized."""

    chars: int = 0
    bytes: int = 0  # UTF-8 bytes of the cleaned text
    documents: int = 0
    sources: list[str] = field(default_factory=list)  # the first 100 documents'
    charset: np.ndarray | None = None  # for a character tokenizer: which code points occur
    _unseen: list[str] = field(default_factory=list)  # text whose characters are not yet in charset
    _unseen_chars: int = 0

    def add(self, doc: Document) -> None:
        self.documents += 1
        if len(self.sources) < 100:
            self.sources.append(doc.source)
        for text in pieces(doc):
            self.chars += len(text)
            self.bytes += _utf8_len(text)
            if self.charset is not None:
                self._unseen.append(text)
                self._unseen_chars += len(text)
                if self._unseen_chars >= 1 << 20:
                    self._count_characters()

    def _count_characters(self) -> None:
        # numpy counts code points far faster than a Python set is built, best a megabyte at a time
        text = "".join(self._unseen)
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        self.charset |= np.bincount(points, minlength=len(self.charset)).astype(bool)
        self._unseen, self._unseen_chars = [], 0

    def characters(self) -> str:
        self._count_characters()
        return "".join(map(chr, np.flatnonzero(self.charset)))


def survey(cfg: DataConfig) -> Survey:
    """Pass 1: sizes, sources and (character tokenizer) the character set; every input error surfaces here."""
    result = Survey(charset=np.zeros(0x110000, dtype=bool) if cfg.tokenizer == "char" else None)
    for doc in iter_documents(cfg):
        result.add(doc)
    return result


def bpe_sample(cfg: DataConfig, cut: int, corpus: Survey) -> Iterator[str]:
    """The training text BPE learns its merges from: all of it when it is at most
    data.tokenizer_sample_bytes, else windows of SAMPLE_WINDOW characters spread evenly over it, about
    that many bytes in all, so that learning takes bounded time and memory however large the corpus."""
    train_bytes = corpus.bytes * cut / corpus.chars
    rate = cfg.tokenizer_sample_bytes / train_bytes
    period = max(SAMPLE_WINDOW, int(SAMPLE_WINDOW / rate)) if rate < 1 else 0
    offset = 0  # characters of training text so far
    for side, text in tokenizer_pieces(split_stream(iter_documents(cfg), cut)):
        if side == VAL:
            return
        if not text:
            continue
        if not period:
            yield text
            continue
        end = offset + len(text)
        for window in range(offset // period * period, end, period):  # windows overlapping [offset, end)
            lo, hi = max(window, offset), min(window + SAMPLE_WINDOW, end)
            if lo < hi:
                yield text[lo - offset : hi - offset]
        offset = end


class TokenFiles:
    """train.bin and val.bin, appended to as token ids come, with their sizes and one hash of both."""

    def __init__(self, out: Path, dtype: np.dtype):
        self.dtype = dtype
        self.files = [open(out / "train.bin", "wb"), open(out / "val.bin", "wb")]
        self.tokens, self.chars, self.bytes = [0, 0], [0, 0], [0, 0]
        self.sha = hashlib.sha256()  # train's ids then val's: all of train comes first

    def write(self, side: int, ids: list[list[int]]) -> None:
        n = sum(map(len, ids))
        array = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=n)
        self.files[side].write(_bytes(array))  # not ndarray.tofile, whose error drops the reason (disk full)
        self.sha.update(_bytes(array))
        self.tokens[side] += n

    def close(self) -> None:
        for f in self.files:
            f.close()


def encode(tok: TextTokenizer, events: Iterable[tuple[int, str | None]], files: TokenFiles) -> None:
    """Pass 2: tokenize split_stream's events in parallel batches of about BATCH_CHARS characters, each
    text followed by the end-of-text token, and append the ids to their split's file."""
    batch: list[tuple[int, str | None]] = []
    size = 0

    def flush() -> None:
        encoded = iter(tok.encode_batch([text for _, text in batch if text is not None]))
        for side, group in itertools.groupby(batch, key=lambda event: event[0]):
            files.write(side, [next(encoded) if text is not None else [tok.eot_id] for _, text in group])
        batch.clear()

    for side, text in tokenizer_pieces(events):
        batch.append((side, text))
        if text:
            size += len(text)
            files.chars[side] += len(text)
            files.bytes[side] += _utf8_len(text)
        if size >= BATCH_CHARS:
            flush()
            size = 0
    flush()


def _file_stats(p: Path) -> list:
    if p.is_dir():  # a saved dataset: its files together
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file()]
    st = p.stat()
    return [(str(p.resolve()), st.st_size, st.st_mtime_ns)]


def _hub_identity(spec: str) -> list:
    """A Hub dataset is known by name, config, split and revision: without a pinned @REVISION a prepared
    copy is reused even if the dataset changes upstream (pin one, or clear the cache, to refresh). A
    local folder standing in for a repository is known by its files, like any other input."""
    src = parse_hub(spec)
    files = _file_stats(src.local) if src.local else []
    return [HUB, src.name, src.config, src.split, src.revision, files]


def cache_key(cfg: DataConfig, tokenizer: TextTokenizer | None = None) -> str:
    """Hash of what determines the prepared tokens: the sources' identity and the data settings."""
    if cfg.paths:
        sources = [_hub_identity(p) if isinstance(p, str) else _file_stats(p) for p in _inputs(cfg.paths)]
    else:
        sources = [BUILTIN, sys.version]
    given = hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest() if tokenizer else None
    trained_bpe = cfg.tokenizer == "bpe" and given is None
    settings = {
        "format": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": cfg.tokenizer if given is None else given,
        "vocab_size": cfg.vocab_size if trained_bpe else None,
        "val_fraction": cfg.val_fraction,
        "tokenizer_sample_bytes": cfg.tokenizer_sample_bytes if trained_bpe else None,
        "errors": cfg.errors,
        "text_column": cfg.text_column,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    dir: Path
    tokenizer: TextTokenizer
    meta: dict
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    reused: bool  # True when the cache already held this corpus
    note: str = ""  # why a damaged cache was rebuilt, if it was

    @property
    def tokens_per_byte(self) -> float:
        """Validation tokens per UTF-8 byte: turns loss per token into bits per byte."""
        return self.meta["val_tokens"] / max(1, self.meta["val_bytes"])


def _open(dir_: Path, meta: dict, reused: bool, note: str = "") -> Prepared:
    dtype = np.dtype(meta["dtype"])
    tok = TextTokenizer.load(dir_ / "tokenizer.json")
    train = np.memmap(dir_ / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(dir_ / "val.bin", dtype=dtype, mode="r")
    return Prepared(dir_, tok, meta, train, val, reused, note)


def _inspect_cache(dir_: Path) -> tuple[dict | None, str]:
    """(meta, "") for a cache folder whose files are whole, else (None, what is wrong with it)."""
    try:
        meta = json.loads((dir_ / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected = {split: meta[f"{split}_tokens"] * itemsize for split in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its meta.json is unreadable ({type(e).__name__})"
    if not (dir_ / "tokenizer.json").is_file():
        return None, "tokenizer.json is missing"
    for split, size in expected.items():
        f = dir_ / f"{split}.bin"
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            return None, f"{split}.bin holds {actual if actual is not None else 'no'} bytes, meta.json says {size}"
    return meta, ""


def _bytes(ids: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(ids)).cast("B")


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(_bytes(a))
    return h.hexdigest()


def fingerprint(prep: Prepared) -> dict:
    """What identifies the prepared data: the tokenizer file and the token ids (hashes) and sizes."""
    return {
        "tokenizer_sha256": hashlib.sha256((prep.dir / "tokenizer.json").read_bytes()).hexdigest(),
        "tokens_sha256": prep.meta.get("tokens_sha256") or _sha256(prep.train, prep.val),
        "train_tokens": prep.meta["train_tokens"],
        "val_tokens": prep.meta["val_tokens"],
    }


def _cache_error(root: Path, e: BaseException) -> UserError:
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    return UserError(f"cannot write the data cache in {root}: {reason}; free some space or set "
                     "--data.cache_dir to a writable folder")


def build(cfg: DataConfig, out: Path, tokenizer: TextTokenizer | None = None) -> dict:
    """Read, split, train the tokenizer (unless one is given) and write token files into `out`; returns
    meta. Memory stays bounded however large the corpus: see the module's docstring."""
    corpus = survey(cfg)
    cut = round(corpus.chars * (1 - cfg.val_fraction))
    if not 0 < cut < corpus.chars:
        raise UserError("the corpus is too short to hold both a training and a validation split")
    # BPE learns its merges from (a sample of) the training split only. A character vocabulary is the
    # corpus's character set (as in nanoGPT), so a character that occurs only in validation text has an id.
    if tokenizer is not None:
        tok = tokenizer
    elif cfg.tokenizer == "char":
        tok = train_tokenizer([corpus.characters()], "char", cfg.vocab_size)
    else:
        tok = train_tokenizer(bpe_sample(cfg, cut, corpus), "bpe", cfg.vocab_size)
    dtype = storage_dtype(tok.vocab_size)
    try:
        tok.save(out / "tokenizer.json")
    except Exception as e:  # tokenizers raises a bare Exception when it cannot write
        raise _cache_error(out.parent, e) from None
    try:
        files = TokenFiles(out, dtype)
        try:
            encode(tok, split_stream(iter_documents(cfg), cut), files)
        finally:
            files.close()
    except OSError as e:  # only writing can fail here: reading the corpus raises UserErrors of its own
        raise _cache_error(out.parent, e) from None
    if sum(files.chars) != corpus.chars:  # a file edited while it was being read
        raise UserError("the corpus changed while it was being prepared; prepare it again")
    meta = {
        "format": FORMAT_VERSION,
        "sources": corpus.sources + ([f"... {corpus.documents - 100} more"] if corpus.documents > 100 else []),
        "documents": corpus.documents,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": files.tokens[TRAIN],
        "val_tokens": files.tokens[VAL],
        "train_bytes": files.bytes[TRAIN],
        "val_bytes": files.bytes[VAL],
        "tokens_sha256": files.sha.hexdigest(),
    }
    try:
        (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    except OSError as e:
        raise _cache_error(out.parent, e) from None
    return meta


def remove_dead_builds(root: Path, key: str) -> None:
    """Delete the build folders of `key` that a process on this machine left when it was killed mid-build.

    A build folder is named .<key>-<host>-<pid>-<random>; one whose process is gone is garbage. Folders
    of live processes (a concurrent build) and of other machines sharing the cache are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) asks about a process only on POSIX (on Windows it kills it)
        return
    prefix = f".{key}-{socket.gethostname()}-"
    for folder in root.glob(f".{key}-*"):
        pid = folder.name[len(prefix):].split("-")[0] if folder.name.startswith(prefix) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # it exists (another user's): leave it
            pass


def prepare(cfg: DataConfig, tokenizer: TextTokenizer | None = None) -> Prepared:
    """Prepared token files for cfg: reused from the cache when nothing changed, else built.

    `tokenizer` (a pretrained model's) is used instead of training one."""
    root = Path(cfg.cache_dir)
    final = root / cache_key(cfg, tokenizer)
    note = ""
    if final.exists():
        meta, problem = _inspect_cache(final)
        if meta is not None:
            return _open(final, meta, reused=True)
        note = f"rebuilt the damaged cache {final}: {problem}"
        shutil.rmtree(final, ignore_errors=True)
    # Build in a private folder and rename it into place, so a crash or a concurrent run never
    # leaves a half-written cache that a later run would trust.
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_dead_builds(root, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-{socket.gethostname()}-{os.getpid()}-", dir=root))
    except OSError as e:
        raise _cache_error(root, e) from None
    try:
        meta = build(cfg, tmp, tokenizer)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(final, meta, reused=False, note=note)


# ---------------------------------------------------------------- batches


def check_window(split_name: str, n_tokens: int, block_size: int) -> None:
    if n_tokens < block_size + 1:
        raise UserError(
            f"the {split_name} split has {n_tokens} tokens, fewer than one training window "
            f"(model.block_size + 1 = {block_size + 1}); use more text or a smaller model.block_size"
        )


def get_batch(
    ids: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size + 1` tokens: inputs and the same shifted by one."""
    return batch_windows(ids, batch_starts(len(ids), batch_size, block_size, gen), block_size, device)


def batch_starts(n_ids: int, batch_size: int, block_size: int, gen: torch.Generator) -> list[int]:
    """Where `batch_size` random windows start (drawn apart from reading them, so that every process of a
    distributed run draws the whole global batch alike and reads only its share)."""
    import torch  # here, not at the top: preparing data needs no torch (and its 200 MB)

    return torch.randint(n_ids - block_size, (batch_size,), generator=gen).tolist()


def batch_windows(
    ids: np.ndarray, starts: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `block_size + 1` tokens at `starts`: inputs and the same shifted by one."""
    import torch

    windows = torch.from_numpy(np.stack([ids[s : s + block_size + 1] for s in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]
