"""A run's checkpoint on disk: written so that it is always whole, read so that nothing in it runs.

Writing: `atomic_file` (which writes every file of a run: tinylm/rundir.py) writes a temporary file
beside its target, flushes and fsyncs it, then renames it over the old one (a rename is atomic on POSIX),
and the directory is fsynced so that the rename itself survives a power cut. A process killed at any
moment leaves the old file or the new one, never half of one. A failed write (disk full, permission
denied) removes its temporary file, leaves the previous checkpoint untouched and raises `SaveError`;
`Saver` remembers which step is on disk and lets the training loop go on (a periodic save) or stop
(the last save).

Reading: a checkpoint is `torch.save`'s zip archive. `load` checks every member's CRC-32 with `zipfile`
(torch does not, so a flipped byte in a tensor would otherwise load as a wrong number), then unpickles
with `torch.load(weights_only=True)`, which accepts only tensors and plain data: a file crafted to run
code when unpickled is refused, not executed. Every failure is one line naming the file.

Resuming: `restore` puts back everything an exact resume needs (whether a checkpoint may be resumed
under a config is tinylm/rundir.py's decision).

Test hook: TINYLM_TEST_SAVE_PAUSE=N:SECONDS makes this process's N-th checkpoint save say so on stderr
and sleep after the temporary file is written and before it is renamed, so that a test can SIGKILL a
real training process in the middle of a save.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tinylm.errors import SHOWN_CHARS, UserError, shown

RUN_KEYS = ("model", "vocab_size", "config")  # what sampling needs
RESUME_KEYS = RUN_KEYS + ("optimizer", "step", "tokens", "elapsed", "best_val", "batch_rng", "rng")


class SaveError(UserError):
    """A file of the run could not be written; the previous version of it, if any, is untouched."""


# ---------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable: fsync the directory that holds the new name.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind e: torch.save reports a failed write as a RuntimeError whose context it is."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _reason(e: BaseException) -> str:
    os_error = _os_error(e)
    if os_error is not None and os_error.strerror:
        return os_error.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


_saves = 0  # checkpoint saves by this process, for the test hook


def _test_pause(f: BinaryIO, path: Path) -> None:
    global _saves
    _saves += 1
    nth, _, seconds = os.environ.get("TINYLM_TEST_SAVE_PAUSE", "").partition(":")
    if nth and int(nth) == _saves:
        f.flush()
        print(f"test hook: save {_saves} written, pausing {seconds} s before renaming it to {path}", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically; SaveError (the old file kept) if the disk or permissions refuse."""
    path = Path(path)
    try:
        with atomic_file(path) as f:
            torch.save(state, f)
            _test_pause(f, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and _os_error(e) is None:
            raise  # not a file-system problem: a bug, keep its traceback
        raise SaveError(f"could not write {path}: {_reason(e)}") from None


class Saver:
    """Saves a run's checkpoint and remembers which step is on disk, to say what a failure keeps."""

    def __init__(self, path: Path, step_on_disk: int | None, out: Callable[[str], None]):
        self.path, self.step, self.out = path, step_on_disk, out

    def kept(self) -> str:
        if self.step is None:
            return "no checkpoint was saved yet"
        return f"{self.path} still holds step {self.step}"

    def save(self, state: dict[str, Any], final: bool) -> bool:
        """True if written. A failed periodic save is a warning and training goes on (the next one may
        succeed once space is freed); a failed final save is an error, since nothing comes after it."""
        try:
            save(state, self.path)
        except SaveError as e:
            if final:
                raise SaveError(f"{e}; {self.kept()}") from None
            self.out(f"warning: {e}; {self.kept()}; training goes on and tries again at the next save")
            return False
        self.step = state["step"]
        return True


# ---------------------------------------------------------------- reading


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot load checkpoint {path}: it is truncated or not a checkpoint ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if damaged is not None:
        raise UserError(f"cannot load checkpoint {path}: it is damaged (member {damaged} fails its CRC-32 check)")
    return load_tensors(path, map_location, "checkpoint")


def load_tensors(path: Path, map_location: str | torch.device, what: str) -> Any:
    """torch.load(path, weights_only=True): tensors and plain data, nothing that runs. A file that holds
    anything else is one line naming what it references, never PyTorch's own message, whose advice (load
    it with weights_only=False) is the one thing not to do with a file that may be crafted; PyTorch's
    warnings about the pickle are silenced for the same reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, zip errors: all mean "not a checkpoint"
        text = str(e).strip()
        unsafe = re.search(r"GLOBAL (\S+)", text)  # torch's wording varies between versions
        if unsafe:  # the file asks to import and call something: a crafted or foreign pickle
            reason = f"it references {unsafe.group(1)[:SHOWN_CHARS]}, and only tensors and plain data are loaded"
        elif "weights only" in text.lower() or "weights_only" in text:
            reason = "it holds objects other than tensors and plain data, which are not loaded"
        else:
            reason = shown(text.splitlines()[0]) if text else type(e).__name__
        raise UserError(f"cannot load {what} {path}: {reason}") from None


def require(state: Any, keys: tuple[str, ...], path: Path) -> dict[str, Any]:
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a tinylm training checkpoint (it lacks {', '.join(missing)})")
    return state


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from (dropout uses torch's or CUDA's)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [list(py_state), version, py_gauss],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n.get("has_gauss", 0), n.get("gauss", 0.0)))
    keys, version, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))


def restore(state: dict[str, Any], load_model: Callable[[dict], Any], load_optimizer: Callable[[dict], Any],
            batch_gen: torch.Generator, path: Path) -> None:
    """Put model, optimizer, data-sampling position and every RNG back where the checkpoint left them.

    load_model and load_optimizer take the saved (full, single-process) state dicts: `model.load_state_dict`
    and `optimizer.load_state_dict`, or their FSDP counterparts (tinylm.distributed.Dist.loaders)."""
    try:
        load_model(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"the model in {path} does not fit the config: {str(e).splitlines()[0]}") from None
    try:
        load_optimizer(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"the optimizer state in {path} does not fit this optimizer: {str(e).splitlines()[0]}; "
                        "start a new run instead") from None
    batch_gen.set_state(state["batch_rng"])
    set_rng_state(state["rng"])
