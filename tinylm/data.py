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
`datasets`, `.jsonl`/`.json`/`.csv`/`.parquet` files and folders written by `Dataset.save_to_disk`.
With no input the built-in corpus is used: the Python reference documentation that every CPython
ships as `pydoc_data.topics` (about 465 KB of English technical prose), so training works offline.
"""

from __future__ import annotations

import hashlib
import re
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinylm.config import DataConfig
from tinylm.errors import UserError
from tinylm.tokenizer import TextTokenizer
from tinylm.tokenizer import train as train_tokenizer

FORMAT_VERSION = 1
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN = "builtin:pydoc_data"


@dataclass
class Document:
    source: str  # a path or a description, for messages
    text: str


# ---------------------------------------------------------------- reading and cleaning


def clean(text: str) -> str:
    """Drop a byte-order mark and normalise line ends (CRLF and lone CR become LF)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_bytes(raw: bytes, source: str, errors: str = "strict") -> str:
    """UTF-8 bytes -> cleaned text; a binary file or invalid UTF-8 is a UserError saying where."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{source} looks like a binary file (NUL byte at offset {nul}), not text")
    try:
        text = raw.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{source} is not valid UTF-8 (byte {e.start}, line {line}); "
            "convert it to UTF-8 or pass --data.errors=replace to replace undecodable bytes"
        ) from None
    return clean(text)


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


def read_dataset(path: Path, cfg: DataConfig) -> list[Document]:
    """Rows of a tabular file or saved dataset, read with Hugging Face `datasets`: one row, one document."""
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
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds; the first line says what went wrong
        raise UserError(f"cannot read {path} as a dataset: {str(e).strip().splitlines()[0]}") from None
    column = _text_column(ds.features, cfg.text_column, str(path))
    return [Document(f"{path}[{i}]", clean(t)) for i, t in enumerate(ds[column]) if t and t.strip()]


def read_documents(cfg: DataConfig) -> list[Document]:
    """Every document of the configured corpus, cleaned, in a stable order."""
    if not cfg.paths:
        return [builtin_corpus()]
    docs: list[Document] = []
    for path in expand_paths(cfg.paths):
        if is_saved_dataset(path) or path.suffix.lower() in DATASET_SUFFIXES:
            rows = read_dataset(path, cfg)
            if not rows:
                raise UserError(f"{path} holds no text")
            docs.extend(rows)
            continue
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        text = decode_bytes(raw, str(path), cfg.errors)
        if not text.strip():
            raise UserError(f"{path} is empty" if not raw else f"{path} holds only whitespace")
        docs.append(Document(str(path), text))
    return docs


# ---------------------------------------------------------------- split


def split(docs: list[Document], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: the last `val_fraction` of the text (cut at a line end) is validation.

    Documents are kept whole except the one the cut falls in, as nanoGPT cuts its single file.
    """
    total = sum(len(d.text) for d in docs)
    cut = round(total * (1 - val_fraction))
    train: list[str] = []
    val: list[str] = []
    seen = 0
    for d in docs:
        n = len(d.text)
        if seen + n <= cut:
            train.append(d.text)
        elif seen >= cut:
            val.append(d.text)
        else:
            local = cut - seen
            nl = d.text.rfind("\n", 0, local)  # prefer to cut just after a line end
            at = nl + 1 if nl > 0 and local - nl < 10_000 else local
            train.append(d.text[:at])
            val.append(d.text[at:])
        seen += n
    return [t for t in train if t], [t for t in val if t]


# ---------------------------------------------------------------- tokenize and store


def chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Cut text into pieces of about `size` characters at points where byte-level BPE's
    pre-tokenizer would split anyway (a newline followed by a non-space), so encoding the pieces
    gives exactly the ids of encoding the whole."""
    out, start = [], 0
    while len(text) - start > size:
        boundary = _SAFE_CUT.search(text, start + size)
        if boundary is None:
            break
        out.append(text[start : boundary.end()])
        start = boundary.end()
    out.append(text[start:])
    return out


_SAFE_CUT = re.compile(r"\n(?=\S)")


def storage_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(f"vocabulary of {vocab_size} does not fit in uint32 token storage")


def encode_documents(tok: TextTokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """Token ids of all texts, each followed by the end-of-text token."""
    parts: list[np.ndarray] = []
    eot = np.array([tok.eot_id], dtype=dtype)
    for text in texts:
        tok.check_known(text)
        for ids in tok.encode_batch(chunks(text)):
            parts.append(np.asarray(ids, dtype=dtype))
        parts.append(eot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def cache_key(cfg: DataConfig) -> str:
    """Hash of what determines the prepared tokens: the sources' identity and the data settings."""
    if cfg.paths:
        sources = []
        for p in expand_paths(cfg.paths):
            if p.is_dir():  # a saved dataset: its files together
                stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file()]
            else:
                st = p.stat()
                stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns)]
            sources.append(stats)
    else:
        sources = [BUILTIN, sys.version]
    settings = {
        "format": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
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


def build(cfg: DataConfig, out: Path) -> dict:
    """Read, split, train the tokenizer and write token files into `out`; returns meta."""
    docs = read_documents(cfg)
    train_texts, val_texts = split(docs, cfg.val_fraction)
    if not train_texts or not val_texts:
        raise UserError("the corpus is too short to hold both a training and a validation split")
    # BPE learns its merges from the training split only. A character vocabulary is the corpus's
    # character set (as in nanoGPT), so a character that occurs only in validation text still has an id.
    tok = train_tokenizer(train_texts + val_texts if cfg.tokenizer == "char" else train_texts,
                          cfg.tokenizer, cfg.vocab_size)
    dtype = storage_dtype(tok.vocab_size)
    train_ids = encode_documents(tok, train_texts, dtype)
    val_ids = encode_documents(tok, val_texts, dtype)
    try:
        tok.save(out / "tokenizer.json")  # tokenizers raises a bare Exception when it cannot write
        for name, ids in (("train.bin", train_ids), ("val.bin", val_ids)):
            with open(out / name, "wb") as f:  # not ndarray.tofile, whose error drops the reason (disk full)
                f.write(_bytes(ids))
    except Exception as e:
        raise _cache_error(out.parent, e) from None
    meta = {
        "format": FORMAT_VERSION,
        "sources": [d.source for d in docs[:100]] + ([f"... {len(docs) - 100} more"] if len(docs) > 100 else []),
        "documents": len(docs),
        "tokenizer": cfg.tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_bytes": sum(len(t.encode("utf-8")) for t in train_texts),
        "val_bytes": sum(len(t.encode("utf-8")) for t in val_texts),
        "tokens_sha256": _sha256(train_ids, val_ids),
    }
    try:
        (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    except OSError as e:
        raise _cache_error(out.parent, e) from None
    return meta


def prepare(cfg: DataConfig) -> Prepared:
    """Prepared token files for cfg: reused from the cache when nothing changed, else built."""
    root = Path(cfg.cache_dir)
    final = root / cache_key(cfg)
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    except OSError as e:
        raise _cache_error(root, e) from None
    try:
        meta = build(cfg, tmp)
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
    return torch.randint(n_ids - block_size, (batch_size,), generator=gen).tolist()


def batch_windows(
    ids: np.ndarray, starts: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `block_size + 1` tokens at `starts`: inputs and the same shifted by one."""
    windows = torch.from_numpy(np.stack([ids[s : s + block_size + 1] for s in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]
