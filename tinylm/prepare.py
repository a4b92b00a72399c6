"""Prepare a corpus once: token files in a cache folder, reused while nothing that shapes them changes.

`prepare(cfg.data)` reads the corpus (tinylm.sources), trains the tokenizer (tinylm.tokenizer) and writes
the token files (tinylm.tokens) under `data.cache_dir/<key>/`:

    tokenizer.json   the trained tokenizer
    train.bin        token ids of the training split (numpy uint16, or uint32 for vocabularies > 65,536)
    val.bin          token ids of the validation split
    meta.json        sizes, dtype, the sources and settings that produced them

The key hashes what identifies the sources (a file's path, size and modification time; a Hub dataset's
name and revision; the content of texts held in memory) and every setting that changes the tokens, so
editing a file or the tokenizer settings builds afresh while an unchanged corpus is reused. A cache is
built in a private folder and renamed into place; a folder whose files do not match its meta.json (a disk
that filled up, a file cut short) is rebuilt. `fingerprint` identifies the prepared tokens, so a resumed
run can tell that its data is the same wherever it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.config import DataConfig
from tinylm.errors import UserError, require_folder
from tinylm.sources import Source, corpus_sources, iter_documents
from tinylm.tokenizer import TextTokenizer
from tinylm.tokenizer import train as train_tokenizer
from tinylm.tokens import TRAIN, VAL, TokenFiles, as_bytes, bpe_sample, encode, split_stream, storage_dtype, survey

FORMAT_VERSION = 1
MAX_SOURCES_LISTED = 100  # in meta.json


def cache_key(cfg: DataConfig, sources: list[Source], tokenizer: TextTokenizer | None = None) -> str:
    """Hash of what determines the prepared tokens: the sources' identity and the data settings."""
    given = hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest() if tokenizer else None
    trained_bpe = cfg.tokenizer == "bpe" and given is None
    settings = {
        "format": FORMAT_VERSION,
        "sources": [source.identity() for source in sources],
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


def fingerprint(prep: Prepared) -> dict:
    """What identifies the prepared data: the tokenizer file and the token ids (hashes) and sizes."""
    if "tokens_sha256" in prep.meta:
        tokens_sha256 = prep.meta["tokens_sha256"]
    else:  # a cache from before the hash was stored in meta.json
        h = hashlib.sha256()
        for ids in (prep.train, prep.val):
            h.update(as_bytes(ids))
        tokens_sha256 = h.hexdigest()
    return {
        "tokenizer_sha256": hashlib.sha256((prep.dir / "tokenizer.json").read_bytes()).hexdigest(),
        "tokens_sha256": tokens_sha256,
        "train_tokens": prep.meta["train_tokens"],
        "val_tokens": prep.meta["val_tokens"],
    }


def _cache_error(root: Path, e: BaseException) -> UserError:
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    return UserError(f"cannot write the data cache in {root}: {reason}; free some space or set "
                     "--data.cache_dir to a writable folder")


def build(cfg: DataConfig, sources: list[Source], out: Path, tokenizer: TextTokenizer | None = None) -> dict:
    """Read, split, train the tokenizer (unless one is given) and write token files into `out`; returns
    meta. Memory stays bounded however large the corpus: see tinylm.tokens."""
    corpus = survey(sources, charset=cfg.tokenizer == "char" and tokenizer is None)
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
        tok = train_tokenizer(bpe_sample(sources, cut, corpus, cfg.tokenizer_sample_bytes), "bpe", cfg.vocab_size)
    dtype = storage_dtype(tok.vocab_size)
    try:
        tok.save(out / "tokenizer.json")
    except Exception as e:  # tokenizers raises a bare Exception when it cannot write
        raise _cache_error(out.parent, e) from None
    try:
        files = TokenFiles(out, dtype)
        try:
            encode(tok, split_stream(iter_documents(sources), cut), files)
        finally:
            files.close()
    except OSError as e:  # only writing can fail here: reading the corpus raises UserErrors of its own
        raise _cache_error(out.parent, e) from None
    if sum(files.chars) != corpus.chars:  # a file edited while it was being read
        raise UserError("the corpus changed while it was being prepared; prepare it again")
    names = [source.name for source in sources]
    more = len(names) - MAX_SOURCES_LISTED
    meta = {
        "format": FORMAT_VERSION,
        "sources": names[:MAX_SOURCES_LISTED] + ([f"... {more} more"] if more > 0 else []),
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


def prepare(cfg: DataConfig, tokenizer: TextTokenizer | None = None, texts: Sequence[str] | None = None) -> Prepared:
    """Prepared token files for cfg: reused from the cache when nothing changed, else built.

    `tokenizer` (a pretrained model's) is used instead of training one. `texts`, strings held in memory
    (they cannot live in a config file), are documents of the corpus after those of cfg.paths; with
    texts and no paths the corpus is the texts alone."""
    require_folder(cfg.cache_dir, "data.cache_dir")  # not "File exists; free some space" from mkdir
    sources = corpus_sources(cfg, texts)
    root = Path(cfg.cache_dir)
    final = root / cache_key(cfg, sources, tokenizer)
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
        meta = build(cfg, sources, tmp, tokenizer)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(final, meta, reused=False, note=note)
