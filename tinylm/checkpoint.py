"""Saving and loading a run's checkpoint, so that what is on disk is always a whole, loadable file.

A save writes a temporary file beside the target, flushes and fsyncs it, then renames it over the old
checkpoint (a rename is atomic on POSIX): a crash mid-save leaves the previous checkpoint intact.
Loading uses `torch.load(weights_only=True)`, which refuses pickled code, and turns a missing,
truncated or corrupted file into a one-line error naming the file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from tinylm.errors import UserError

CHECKPOINT = "checkpoint.pt"


def save(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
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


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, zip errors, truncated files: all mean "not a checkpoint"
        text = str(e).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:  # the file asks to import and call something: a crafted or foreign pickle
            reason = f"it references {unsafe.group(1)}, and only tensors and plain data are loaded"
        else:
            reason = text.splitlines()[0][:200] if text else type(e).__name__
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(config, tokenizer, model, checkpoint state) of a run directory, the model in eval mode."""
    from tinylm import config as config_
    from tinylm.model import GPT
    from tinylm.tokenizer import TextTokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} holds no checkpoint ({CHECKPOINT}); train into it first")
    cfg = config_.load(run_dir / "config.yaml")
    tok = TextTokenizer.load(run_dir / "tokenizer.json")
    state = load(run_dir / CHECKPOINT, map_location=device)
    model = GPT(cfg.model, state["vocab_size"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"checkpoint {run_dir / CHECKPOINT} does not match {run_dir / 'config.yaml'}: {str(e).splitlines()[0]}") from None
    return cfg, tok, model.to(device).eval(), state
