"""A run directory, the folder a user trains into, samples from, resumes and exports: its one owner.

This module names every file of a run, writes them (each atomically: the old version or the new one,
never half of one), holds the one-trainer lock, reads them back, and decides whether a checkpoint may be
continued under a given config.

    runs/<name>/
        .tinylm-run           written first: marks the folder as a run, which tinylm may write into again
        config.yaml           the run's settings: readable, editable (train.* may change on resume)
        tokenizer.json        the tokenizer, in Hugging Face `tokenizers`' format
        data.json             what the data was: sources, token counts, the cache it was prepared in,
                              whether it was texts held in memory (which no file keeps)
        checkpoint.pt         weights, optimizer state, step, random states, and the config the weights
                              were trained with (tinylm.checkpoint writes and reads it)
        metrics.json          how far the run got and its last evaluation, rewritten at each evaluation
        snapshots/            the checkpoints of the latest evaluations and the best one, kept (tinylm.snapshots):
            step-000120.pt    each a checkpoint as checkpoint.pt was at that step
            index.json        the validation loss of each
        .lock                 held by the process training here
        events.out.tfevents.* TensorBoard's log (tinylm.tblog)

A run is written only into a folder that is new, empty or a run already (`claim`, before a byte is
written), so a mistyped --run_dir can never replace a user's own config.yaml or tokenizer.json.

config.yaml and the checkpoint both hold the config: config.yaml is the copy a person reads and edits,
the checkpoint's is the one its weights were trained with. `compare` is the one place they are set side
by side, for resuming (`resume`) and for loading a run to sample from (`load`): it names the setting
that disagrees with the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tinylm import config as config_
from tinylm.config import Config
from tinylm.errors import UserError, require_folder, shown

# tinylm.checkpoint (and with it torch) is imported where a checkpoint is read or written: a command
# whose settings are wrong fails in a fraction of a second, before torch has loaded.

MARKER = ".tinylm-run"
NAME_CHARS = 100  # the most characters of a run's derived folder name
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
DATA = "data.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
LOCK = ".lock"
SNAPSHOTS = "snapshots"
SNAPSHOT_INDEX = "index.json"
EVENTS = "events.out.tfevents."  # how TensorBoard's SummaryWriter starts the name of each event file
IN_MEMORY = "texts_in_memory"  # data.json's key: true when the corpus was texts held in memory
# Settings the weights depend on, with what they are: a run cannot continue, or be sampled, under others.
FIXED = {"model.": "the architecture", "data.tokenizer": "the tokenizer", "data.vocab_size": "the tokenizer"}


def is_run(run_dir: Path) -> bool:
    """True for a folder tinylm made: its marker, or (a run from before the marker) every file a run has."""
    return (run_dir / MARKER).is_file() or all((run_dir / f).is_file() for f in (CONFIG, TOKENIZER, DATA, CHECKPOINT))


def claim(run_dir: str | Path, resume: bool) -> Path:
    """The folder to train into, once it is known to be safe to write: a new or empty folder, or a run
    (and a run only, to resume). One line otherwise, before anything is written."""
    if str(run_dir) == "":
        raise UserError("--run_dir is empty; name a new folder for the run, or leave the option out for runs/<name>")
    run_dir = Path(run_dir)
    require_folder(run_dir, "run directory")
    if resume:
        require_checkpoint(run_dir, " to resume from")
        if not is_run(run_dir):
            raise UserError(f"{shown(str(run_dir))} is not a tinylm run (it has no {MARKER}); --resume continues "
                            "a folder that tinylm train wrote")
    # A folder holding only a lock is a run being started (by rank 0, when several processes each check).
    elif run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()) and not is_run(run_dir):
        raise UserError(f"{shown(str(run_dir))} is a folder with files of its own, not a tinylm run; tinylm writes a "
                        "run only into a new or empty folder, and never over your files: pick another --run_dir")
    return run_dir


def new_dir(name: str, root: Path = Path("runs")) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if taken: a new run never overwrites an old one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def run_name(config: str | Path | None, data: Sequence[str | Path] = (), texts: bool = False) -> str:
    """A new run's name: its config's ("default" without one, else the recipe's or file's stem), then its
    data's first input ("default-book" for book.txt, "default-TinyStories" for hf:roneneldan/TinyStories)
    or "-texts" for texts held in memory."""
    name = Path(config).stem if config else "default"
    if data:
        from tinylm.sources import HUB, parse_hub

        first = str(data[0])
        name += "-" + (Path(parse_hub(first).name).name if first.startswith(HUB) else Path(first).stem)
    elif texts:
        name += "-texts"
    # A file called "a\nb.txt" must not make a folder with a line break in its name (nor a tab or an escape),
    # and a file name near the system's limit (255 bytes) must leave room for "default-" and "-2".
    return re.sub(r"[\x00-\x1f\x7f]+", "_", name)[:NAME_CHARS]


def settings(config: str | Path | None, overrides: dict[str, Any], resume_dir: str | Path | None = None) -> Config:
    """A run's settings: the defaults, then `config` (a recipe's name or a YAML file; when resuming, the
    run's own config.yaml unless another is named), then `overrides` ({"train.max_steps": 6000, ...})."""
    if resume_dir is not None:  # a run with a checkpoint, before its config.yaml is read
        claim(resume_dir, resume=True)
        config = config or Path(resume_dir) / CONFIG
    return config_.load(config, overrides)


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(EVENTS + "*"))


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """The kept checkpoint of a run's evaluation at `step` (tinylm.snapshots)."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step:06d}.pt"


def snapshot_steps(run_dir: str | Path) -> list[int]:
    """The steps whose checkpoints are kept in run_dir/snapshots, oldest first."""
    names = (p.name for p in (Path(run_dir) / SNAPSHOTS).glob("step-*.pt"))
    return sorted(int(n[5:-3]) for n in names if n[5:-3].isdigit())


# ---------------------------------------------------------------- writing


def _cannot_write(run_dir: Path, e: OSError) -> UserError:
    return UserError(f"cannot write to run directory {run_dir}: {e.strerror or e}")


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir for this process while it trains: a second trainer started on the same directory
    stops with a one-line error instead of both writing one checkpoint. The lock is the OS's (flock on
    run_dir/.lock), so it goes when the process ends, however it ends: a killed run leaves none behind.
    If the run fails before writing anything, the directory this created is removed again."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; keeping to one trainer per directory is up to the user
        yield
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise _cannot_write(run_dir, e) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip()
            raise UserError(f"{run_dir} is in use by another training process{f' (pid {pid})' if pid else ''}; "
                            "wait for it to end, or pick another --run_dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        except BaseException:
            if [p.name for p in run_dir.iterdir()] == [LOCK]:  # a run that failed before its first file
                (run_dir / LOCK).unlink()  # leaves nothing behind: no lock file, no empty folder it made
                if created:
                    run_dir.rmdir()
            raise


def write_files(run_dir: Path, cfg: Config, tokenizer: Path, data: dict[str, Any]) -> None:
    """The marker, config.yaml, tokenizer.json (a copy of the file `tokenizer`) and data.json, each
    written atomically, the marker first."""
    from tinylm import checkpoint

    contents = {MARKER: b"a tinylm run directory: tinylm train may write here (--resume)\n",
                CONFIG: config_.to_yaml(cfg).encode(), TOKENIZER: tokenizer.read_bytes(),
                DATA: json.dumps(data, indent=2).encode()}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, content in contents.items():
            with checkpoint.atomic_file(run_dir / name) as f:
                f.write(content)
    except OSError as e:
        raise _cannot_write(run_dir, e) from None


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, atomically; SaveError (the previous file kept) if the disk refuses."""
    from tinylm import checkpoint

    path = run_dir / METRICS
    try:
        with checkpoint.atomic_file(path) as f:
            f.write((json.dumps(metrics, indent=2) + "\n").encode())
    except OSError as e:
        raise checkpoint.SaveError(f"could not write {path}: {e.strerror or e}") from None


def remove_stale_temps(run_dir: Path) -> None:
    """Delete temporary files a killed process left behind (its checkpoint on disk is the old one)."""
    for tmp in [*run_dir.glob(".*.tmp"), *(run_dir / SNAPSHOTS).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged
        return None
    return value if isinstance(value, dict) else None


def read_data(run_dir: Path) -> dict[str, Any]:
    """data.json, or {} if it is missing or damaged."""
    return _read_json(Path(run_dir) / DATA) or {}


def trained_on_texts(run_dir: Path) -> bool:
    """True for a run whose corpus was texts held in memory (the Python API's data=[...]): no file holds them."""
    return bool(read_data(run_dir).get(IN_MEMORY))


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json, or None for a run that has none (one trained before tinylm wrote it) or a damaged one."""
    return _read_json(Path(run_dir) / METRICS)


def require_checkpoint(run_dir: str | Path, missing: str) -> Path:
    """The checkpoint file of run_dir; one line if the folder or its checkpoint is not there ("X holds no
    checkpoint (checkpoint.pt)" + `missing`, e.g. " to resume from")."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} holds no checkpoint ({CHECKPOINT}){missing}")
    return run_dir / CHECKPOINT


def trained_config(state: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint's weights were trained with."""
    return config_.from_dict(state["config"], source=f"config in {path}")


def compare(trained: Config, now: Config, refusal: str, advice: str) -> dict[str, tuple[Any, Any]]:
    """{key: (trained, now)} for every setting that differs between the config the weights were trained
    with and `now`; a UserError "<refusal>: <key> was <old> and is now <new> (<what> must not change);
    <advice>" when one of them is a setting the weights depend on (the architecture, the tokenizer)."""
    changed = config_.diff(trained, now)
    for key, (old, new) in changed.items():
        what = next((what for prefix, what in FIXED.items() if key.startswith(prefix)), "")
        if what:
            raise UserError(f"{refusal}: {key} was {old!r} and is now {new!r} ({what} must not change); {advice}")
    return changed


class LoadedRun(NamedTuple):
    config: Config
    tokenizer: Any  # tinylm.tokenizer.TextTokenizer
    model: Any  # tinylm.model.GPT, in eval mode
    state: dict[str, Any]  # the checkpoint


def load(run_dir: str | Path, device: Any = "cpu") -> LoadedRun:
    """(config, tokenizer, model, checkpoint state) of a trained run, the model on `device` in eval mode."""
    from tinylm import checkpoint
    from tinylm.model import GPT
    from tinylm.tokenizer import TextTokenizer

    run_dir = Path(run_dir)
    path = require_checkpoint(run_dir, "; train into it first")
    cfg = config_.load(run_dir / CONFIG)
    tok = TextTokenizer.load(run_dir / TOKENIZER)
    state = checkpoint.require(checkpoint.load(path, map_location=device), checkpoint.RUN_KEYS, path)
    compare(trained_config(state, path), cfg, f"{run_dir / CONFIG} does not describe the weights in {path}",
            f"undo that edit of {CONFIG}")
    check_tokenizer(tok, state, run_dir / TOKENIZER, path)
    model = GPT(cfg.model, state["vocab_size"])
    fit_weights(model, state["model"], cfg, path)
    return LoadedRun(cfg, tok, model.to(device).eval(), state)


def check_tokenizer(tok: Any, state: dict[str, Any], file: Path, path: Path) -> None:
    """One line unless `tok` (from `file`) is the tokenizer the checkpoint at `path` was trained with: by its
    identity saved there (a checkpoint from before tinylm saved it: the sha256 of the file's bytes in its
    data fingerprint), and by its size (a token id past the model's vocabulary cannot be looked up)."""
    saved, legacy = state.get("tokenizer") or {}, (state.get("data") or {}).get("tokenizer_sha256")
    if saved:
        same = saved.get("sha256") == tok.identity()["sha256"]
    else:
        same = legacy is None or legacy == hashlib.sha256(file.read_bytes()).hexdigest()
    if same and tok.vocab_size <= state["vocab_size"]:
        return
    raise UserError(f"{file} is not the tokenizer the weights in {path} were trained with (its vocabulary holds "
                    f"{tok.vocab_size:,} tokens, the model's {state['vocab_size']:,}"
                    f"{'' if same else ', and its fingerprint differs'}); put back the run's own {TOKENIZER}")


def fit_weights(model: Any, weights: dict[str, Any], cfg: Config, path: Path) -> None:
    """Load a checkpoint's weights into `model`, naming the setting behind any tensor of another shape."""
    from tinylm.model import explain_mismatch

    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"the weights in {path} do not fit the model {CONFIG} describes: "
                        f"{explain_mismatch(model.state_dict(), weights, cfg.model) or shown(str(e))}") from None


# ---------------------------------------------------------------- resuming


def refuse_overwrite(run_dir: Path) -> None:
    """A fresh run never replaces the checkpoint of an earlier one."""
    if (run_dir / CHECKPOINT).exists():
        raise UserError(f"{run_dir} already holds a checkpoint; continue it with --resume "
                        f"{shlex.quote(str(run_dir))}, or pick another --run_dir")


@dataclass
class Resume:
    """A checkpoint to continue, and what the new config changes (only harmless settings: `resume` refused
    the rest). Made by `resume`; `check_data` is the second half of the check, once the data is prepared."""

    path: Path
    state: dict[str, Any]
    changed: dict[str, tuple[Any, Any]]

    def changes(self) -> list[str]:
        """Every change, for the log: "train.max_steps: 40 -> 80"."""
        return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changed.items()]

    def check_data(self, data_id: dict[str, Any]) -> None:
        """Refuse resuming on data other than the checkpoint's. The data is compared by its fingerprint
        (tokenizer file, token ids), so moving the corpus or the cache is fine while editing the text is not;
        a checkpoint without a fingerprint compares the data settings instead."""
        data_keys = [k for k in self.changed if k.startswith("data.") and k != "data.cache_dir"]
        old_id = self.state.get("data")
        if old_id == data_id or (old_id is None and not data_keys):
            return
        if old_id is None:
            what = "the data settings changed"
        elif old_id.get("tokenizer_sha256") != data_id["tokenizer_sha256"]:
            what = "the tokenizer differs from the one the checkpoint was trained with"
        else:
            what = (f"the data differs from the checkpoint's (train/val tokens {old_id.get('train_tokens'):,}/"
                    f"{old_id.get('val_tokens'):,}, now {data_id['train_tokens']:,}/{data_id['val_tokens']:,})")
        keys = "; ".join(f"{k} was {self.changed[k][0]!r} and is now {self.changed[k][1]!r}" for k in data_keys)
        raise UserError(f"cannot resume from {self.path}: {what}{f' ({keys})' if keys else ''}; start a new run instead")


def resume(run_dir: Path, cfg: Config, texts: bool = False) -> Resume:
    """The checkpoint in run_dir, checked for continuing under cfg (the data is checked later, by
    `Resume.check_data`, so that a refusal here comes before the data is prepared). `texts`: the caller
    holds texts in memory to train on (a run trained on such texts cannot resume without them)."""
    from tinylm import checkpoint

    path = require_checkpoint(run_dir, " to resume from")
    if trained_on_texts(run_dir) and not texts:
        raise UserError(f"{run_dir} was trained on texts held in memory, which a run directory does not keep; resume it "
                        f"in Python with the same texts: tinylm.train(data=texts, run_dir={str(run_dir)!r}, resume=True)")
    state = checkpoint.require(checkpoint.load(path), checkpoint.RESUME_KEYS, path)
    changed = compare(trained_config(state, path), cfg, f"cannot resume from {path}", "start a new run instead")
    return Resume(path, state, changed)
