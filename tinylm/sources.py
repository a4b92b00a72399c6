"""Where training text comes from: each input of a corpus as a source of cleaned documents.

A source names itself (for meta.json and messages), says what identifies it (for the data cache's key)
and reads its documents afresh on every pass. The kinds, in the order `corpus_sources` finds them:

    LocalFile    a UTF-8 text file (each .txt file of a folder, searched recursively), or a table read
                 with Hugging Face `datasets` (a .jsonl/.json/.csv/.parquet file, a `Dataset.save_to_disk`
                 folder): one row, one document, from the text column found or named
    HubDataset   `hf:NAME[@REVISION][:CONFIG][:SPLIT]`, a Hugging Face Hub dataset (datasets.load_dataset)
    Memory       texts held in memory, one document each (the Python API's `data=[...]`)
    Builtin      with none of those: the Python reference documentation that every CPython ships as
                 `pydoc_data.topics` (about 465 KB of English technical prose), so training works offline

A document is its cleaned text (a byte-order mark dropped, line ends made LF), whole or as consecutive
pieces: a text file is read READ_BYTES at a time and a tabular file streamed row by row, so no corpus
is ever held whole. Bad input is a UserError saying which input and where.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinylm.config import DataConfig
from tinylm.errors import UserError

DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN = "builtin:pydoc_data"
HUB = "hf:"
READ_BYTES = 1 << 22  # bytes read from a text file at a time

Document = str | Iterable[str]  # the cleaned text, whole or as consecutive pieces (a file is read in chunks)


def pieces(doc: Document) -> Iterable[str]:
    return [doc] if isinstance(doc, str) else doc


def clean(text: str) -> str:
    """Drop a byte-order mark and normalise line ends (CRLF and lone CR become LF)."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------- text files

# Byte-order marks of the encodings a text file is most often in when it is not UTF-8, longest first
# (UTF-32-LE's begins with UTF-16-LE's). None of them can begin UTF-8 text.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _invalid_utf8_at(path: Path) -> tuple[int, int]:
    """The byte offset and line number of the first invalid UTF-8 in a file, read afresh a block at a
    time (only to say where, once reading it has failed)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    done, lines = 0, 1  # bytes handed to the decoder, line ends among them
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous read
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.start counts from the pending bytes (which hold no line end)
                return done - len(pending) + e.start, lines + (pending + block)[: e.start].count(b"\n")
            done += len(block)
            lines += block.count(b"\n")
            if not block:
                raise UserError(f"{path} changed while it was being read; prepare it again")


def read_text_file(path: Path | str, errors: str = "strict") -> Iterator[str]:
    """The cleaned text of a UTF-8 file in pieces of about READ_BYTES, decoded incrementally (`codecs`'
    utf-8-sig drops a byte-order mark, `io.IncrementalNewlineDecoder` makes CRLF and CR into LF, a CRLF
    cut between two reads too). A NUL byte (a binary file), invalid UTF-8 (with errors="strict"), an
    empty file, one of only whitespace or one in UTF-16/32 is a UserError saying where, exactly as if
    the file had been read whole (the first NUL anywhere wins over an earlier invalid byte)."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8-sig")(errors), translate=True)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        offset = 0  # file offset of the first byte of `block`
        invalid = False  # invalid UTF-8 seen: decoding stops, the search for a NUL goes on
        has_text = False
        while True:
            try:
                block = f.read(max(READ_BYTES, 4))  # at least 4: the first read holds any byte-order mark whole
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            wide = next((name for bom, name in _WIDE_BOMS if block.startswith(bom)), None) if offset == 0 else None
            if wide:
                raise UserError(f"{path} is {wide} text (it starts with a {wide} byte-order mark); convert it to UTF-8")
            nul = block.find(b"\x00")
            if nul >= 0:
                raise UserError(f"{path} looks like a binary file (NUL byte at offset {offset + nul}), not text")
            offset += len(block)
            if not invalid:
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError:
                    invalid = True
                else:
                    has_text = has_text or (bool(text) and not text.isspace())
                    if text:
                        yield text
            if not block:
                break
    if invalid:
        at, line = _invalid_utf8_at(Path(path))
        raise UserError(f"{path} is not valid UTF-8 (byte {at}, line {line}); "
                        "convert it to UTF-8 or pass --data.errors=replace to replace undecodable bytes")
    if not has_text:
        raise UserError(f"{path} is empty" if not offset else f"{path} holds only whitespace")


def builtin_corpus() -> str:
    """The Python reference documentation shipped with CPython (pydoc_data.topics), as one document."""
    from pydoc_data.topics import topics

    return clean("\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def expand_path(p: Path) -> list[Path]:
    """A file as given, a folder as its .txt files (recursive, sorted); missing or empty is an error."""
    if not p.exists():
        raise UserError(f"data path not found: {p}")
    if p.is_dir() and not is_saved_dataset(p):
        found = sorted(q for q in p.rglob("*.txt") if q.is_file())
        if not found:
            raise UserError(f"no .txt files in folder {p}")
        return found
    return [p]


def file_stats(p: Path) -> list:
    """What identifies a file, or a folder's files together: paths, sizes and modification times."""
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p.resolve()]
    return [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]


# ---------------------------------------------------------------- tables, through Hugging Face datasets


def _first_line(e: Exception) -> str:  # datasets raises many kinds; the first line says what went wrong
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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


def dataset_documents(ds, text_column: str, source: str) -> Iterator[str]:
    """The rows of a `datasets.Dataset`, or of an `IterableDataset` (load_dataset(..., streaming=True)),
    as documents from its text column, read a batch of rows at a time; none is a UserError."""
    import datasets

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
        raise UserError(f"cannot read {source} as a dataset: {_first_line(e)}") from None
    column = _text_column(columns, text_column, source)
    rows = ds.select_columns([column]).iter(batch_size=1000)
    found = 0
    while True:
        try:
            batch = next(rows, None)
        except Exception as e:
            raise UserError(f"cannot read {source} as a dataset: {_first_line(e)}") from None
        if batch is None:
            break
        for text in batch[column]:
            if text and text.strip():
                found += 1
                yield clean(text)
    if not found:
        raise UserError(f"{source} holds no text")


def read_dataset(path: Path, text_column: str) -> Iterator[str]:
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
    except Exception as e:
        raise UserError(f"cannot read {path} as a dataset: {_first_line(e)}") from None
    yield from dataset_documents(ds, text_column, str(path))


@dataclass
class HubSource:
    name: str  # "roneneldan/TinyStories", or a local folder laid out like a Hub dataset repository
    config: str | None
    split: str  # "train", or a slice such as "train[:10%]"
    revision: str | None  # a branch, tag or commit of the dataset repository

    @property
    def local(self) -> Path | None:
        return p if (p := Path(self.name)).exists() else None


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


def read_hub(spec: str, text_column: str, streaming: bool) -> Iterator[str]:
    """A Hugging Face Hub dataset split, downloaded (and cached) by `datasets.load_dataset`, or with
    `streaming` rows streamed as they are read (without a copy on disk; read once per pass)."""
    import datasets

    src = parse_hub(spec)
    if src.local is None:
        why = hub_unreachable()
        if why:
            raise UserError(f"cannot reach the Hugging Face Hub to load {spec} ({why}); check the internet "
                            "connection, or set HF_HUB_OFFLINE=1 to use a copy that datasets has cached")
    datasets.enable_progress_bars()  # a Hub download can take minutes: show it
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, revision=src.revision, streaming=streaming)
    except Exception as e:  # not found, no such config or split: the first line says which
        raise UserError(f"cannot load Hugging Face dataset {spec}: {_first_line(e)}") from None
    yield from dataset_documents(ds, text_column, spec)


# ---------------------------------------------------------------- the sources of a corpus


@dataclass(frozen=True)
class LocalFile:
    """A text file, one document read a chunk at a time; or a table (a .jsonl/.json/.csv/.parquet file, a
    saved dataset folder) read with `datasets`, one document a row."""

    path: Path
    errors: str  # for invalid UTF-8 in a text file: "strict" or "replace"
    text_column: str  # for a table: the column that holds the text ("": found)

    @property
    def name(self) -> str:
        return str(self.path)

    def identity(self) -> list:
        return file_stats(self.path)

    def documents(self) -> Iterator[Document]:
        if is_saved_dataset(self.path) or self.path.suffix.lower() in DATASET_SUFFIXES:
            return read_dataset(self.path, self.text_column)
        return iter([read_text_file(self.path, self.errors)])


@dataclass(frozen=True)
class HubDataset:
    name: str  # the spec as given: hf:NAME[@REVISION][:CONFIG][:SPLIT]
    text_column: str
    streaming: bool

    def identity(self) -> list:
        """Name, config, split and revision: without a pinned @REVISION a prepared copy is reused even
        if the dataset changes upstream (pin one, or clear the cache, to refresh). A local folder standing
        in for a repository is known by its files, like any other input."""
        src = parse_hub(self.name)
        return [HUB, src.name, src.config, src.split, src.revision, file_stats(src.local) if src.local else []]

    def documents(self) -> Iterator[Document]:
        return read_hub(self.name, self.text_column, self.streaming)


class Memory:
    """Texts held in memory, one document each (the Python API's `data=["...", ...]`). Having no file to
    stat, they are known by a hash of their content; they are copied, so that the texts read are the
    texts hashed even if the caller's list changes afterwards."""

    def __init__(self, texts: Sequence[str]):
        if isinstance(texts, (str, bytes)):
            raise UserError("data texts must be a list of strings, not one string")
        self.texts = tuple(texts)
        h = hashlib.sha256()
        for i, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise UserError(f"data texts must be strings; text {i} is {type(text).__name__}")
            raw = text.encode("utf-8", errors="surrogatepass")
            h.update(len(raw).to_bytes(8, "little") + raw)  # the length too: ["ab", "c"] is not ["a", "bc"]
        self.sha256 = h.hexdigest()
        self.name = f"memory: {len(self.texts)} texts, sha256 {self.sha256[:16]}"

    def identity(self) -> list:
        return ["memory", self.sha256]

    def documents(self) -> Iterator[Document]:
        found = False
        for text in self.texts:
            if text and not text.isspace():  # blank texts are skipped, as blank rows of a dataset are
                found = True
                yield clean(text)
        if not found:
            raise UserError(f"the data texts hold no text ({self.name})")


class Builtin:
    name = BUILTIN

    def identity(self) -> list:
        return [BUILTIN, sys.version]  # pydoc_data changes with the Python version

    def documents(self) -> Iterator[Document]:
        yield builtin_corpus()


Source = LocalFile | HubDataset | Memory | Builtin


def corpus_sources(cfg: DataConfig, texts: Sequence[str] | None = None) -> list[Source]:
    """The sources of the configured corpus, in order: cfg.paths (folders expanded, Hub specs parsed, so
    that a missing file or a malformed spec fails now), then `texts` held in memory; the built-in corpus
    when there are neither."""
    sources: list[Source] = []
    for p in cfg.paths:
        if p.startswith(HUB):
            parse_hub(p)
            sources.append(HubDataset(p, cfg.text_column, cfg.streaming))
            continue
        sources.extend(LocalFile(path, cfg.errors, cfg.text_column) for path in expand_path(Path(p)))
    if texts is not None:
        sources.append(Memory(texts))
    return sources or [Builtin()]


def iter_documents(sources: Iterable[Source]) -> Iterator[Document]:
    """Every document of the sources, cleaned, in order, read lazily: each call reads them afresh."""
    for source in sources:
        yield from source.documents()
