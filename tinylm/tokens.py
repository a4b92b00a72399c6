"""A corpus's documents as token files: split into training and validation text, tokenized, appended.

However large the corpus, memory stays bounded: its documents (tinylm.sources) are read in passes, one
to `survey` it (its size, and for a character tokenizer its character set; `bpe_sample` then draws a
bounded sample of training text for BPE), one to `encode` it: `split_stream` says which text is training
and which validation, `tokenizer_pieces` cuts it where the tokenizer would split anyway, `encode` tokenizes
batches in parallel (`encode_batch_fast`) and appends the ids to train.bin and val.bin (`TokenFiles`).
The ids do not depend on how the text was cut into pieces along the way.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinylm.errors import UserError
from tinylm.sources import Document, Source, iter_documents, pieces
from tinylm.tokenizer import TextTokenizer

PIECE_CHARS = 1 << 16  # characters per piece handed to the tokenizer
BATCH_CHARS = 1 << 22  # characters tokenized in one parallel batch
SAMPLE_WINDOW = 1 << 20  # characters per window of a sampled BPE training text
CUT_LOOKBACK = 10_000  # characters before the train/val cut searched for a line end to cut at
TRAIN, VAL = 0, 1


# ---------------------------------------------------------------- split


def split_stream(documents: Iterable[Document], cut: int) -> Iterator[tuple[int, str | None]]:
    """(TRAIN or VAL, text) in corpus order: the first `cut` characters are training text and the rest
    validation text, the document the cut falls in divided just after the last line end before the cut
    (if one is within CUT_LOOKBACK characters), as nanoGPT cuts its single file; the other documents
    stay whole. None for text ends a text: where an end-of-text token goes. Text within CUT_LOOKBACK
    characters before the cut is held back until the cut is placed."""
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


# ---------------------------------------------------------------- cut for the tokenizer


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


# ---------------------------------------------------------------- pass 1: survey


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


@dataclass
class Survey:
    """What one pass over the corpus learns before anything is tokenized."""

    chars: int = 0
    bytes: int = 0  # UTF-8 bytes of the cleaned text
    documents: int = 0
    charset: np.ndarray | None = None  # for a character tokenizer: which code points occur
    _unseen: list[str] = field(default_factory=list)  # text whose characters are not yet in charset
    _unseen_chars: int = 0

    def add(self, doc: Document) -> None:
        self.documents += 1
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


def survey(sources: list[Source], charset: bool) -> Survey:
    """Pass 1: sizes and (with `charset`, for a character tokenizer) the character set; every input
    error surfaces here."""
    result = Survey(charset=np.zeros(0x110000, dtype=bool) if charset else None)
    for doc in iter_documents(sources):
        result.add(doc)
    return result


def bpe_sample(sources: list[Source], cut: int, corpus: Survey, sample_bytes: int) -> Iterator[str]:
    """The training text BPE learns its merges from: all of it when it is at most `sample_bytes`, else
    windows of SAMPLE_WINDOW characters spread evenly over it, about that many bytes in all, so that
    learning takes bounded time and memory however large the corpus."""
    train_bytes = corpus.bytes * cut / corpus.chars
    rate = sample_bytes / train_bytes
    period = max(SAMPLE_WINDOW, int(SAMPLE_WINDOW / rate)) if rate < 1 else 0
    offset = 0  # characters of training text so far
    for side, text in tokenizer_pieces(split_stream(iter_documents(sources), cut)):
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


# ---------------------------------------------------------------- pass 2: tokenize and store


def storage_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(f"vocabulary of {vocab_size} does not fit in uint32 token storage")


def as_bytes(ids: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(ids)).cast("B")


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
        self.files[side].write(as_bytes(array))  # not ndarray.tofile, whose error drops the reason (disk full)
        self.sha.update(as_bytes(array))
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
