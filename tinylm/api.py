"""The Python API, for notebooks and scripts: `tinylm.train` and `tinylm.load`, each returning a `Run`.

    import tinylm

    run = tinylm.train(data=["The cat sat on the mat.", ...], run_dir="runs/cats",
                       overrides={"train.max_steps": 200})
    print(run.sample("The cat", max_new_tokens=40, seed=1))
    run = tinylm.load("runs/cats")             # later, or in another session
    run.metrics["val_loss"], run.model, run.tokenizer, run.config, run.dir

`tinylm/__init__.py` imports this module on first use, so `import tinylm` stays light. A run is the
run directory a `tinylm train` makes: the command line and this API read and write the same files.
docs/python.md is the guide, and a test runs its examples.

What `data` is (`data_inputs`, the one rule):

- None: the config's data.paths (with none there, the built-in corpus).
- A `str` or a `pathlib.Path`: one input, as `tinylm train --data` takes it (a file, a folder, a table
  file, a saved dataset, `hf:NAME`). One string is never a text: train on one text as `data=[text]`.
- A list: each `pathlib.Path`, each string that names an existing file or folder and each string
  starting with `hf:` is a path; every other string is a text held in memory (a document of the corpus).
  A list is all paths or all texts: a mix is refused, which also catches a misspelt path among real
  ones. A would-be text that looks like a file name (one word ending in .txt, .json, .jsonl, .csv or
  .parquet) is refused as a missing file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from tinylm import rundir
from tinylm.config import Config
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.sources import DATASET_SUFFIXES, HUB

DataArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None]
FILE_SUFFIXES = {".txt", *DATASET_SUFFIXES}  # a "text" ending in one of these was meant as a file


@dataclass(frozen=True, repr=False)
class Run:
    """A trained run, loaded from its directory: `.sample(...)` text from it, read `.metrics`, and look at
    `.model` (a torch module, tinylm.model.GPT, in eval mode), `.tokenizer` (tinylm.tokenizer.TextTokenizer:
    encode, decode, and `.tok`, the Hugging Face tokenizer), `.config` (the run's settings) and `.dir`."""

    dir: Path
    config: Config
    tokenizer: Any
    model: Any

    @property
    def metrics(self) -> dict[str, Any] | None:
        """metrics.json as it is now: step, tokens, elapsed (seconds), eval_step, val_loss, val_bpb (bits per
        byte), train_loss, best_val_loss; None for a run that has none."""
        return rundir.read_metrics(self.dir)

    def sample(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
        """Text generated from the model: `prompt` and its continuation of up to max_new_tokens tokens
        (temperature 0: always the most likely token; top_k, top_p: sample among the likeliest only).
        The same seed gives the same text; no seed, new text each time."""
        from tinylm.generate import check_options, stream_text

        check_options(max_new_tokens, temperature, top_k, top_p)
        gen = torch.Generator(device=self.model.head.weight.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return prompt + "".join(stream_text(self.model, self.tokenizer, prompt, max_new_tokens, temperature,
                                            top_k, top_p, gen))

    def __repr__(self) -> str:
        m, metrics = self.config.model, self.metrics or {}
        params = sum(p.numel() for p in self.model.parameters())
        got = (f", step {metrics['step']:,}, val loss {metrics['val_loss']:.4f}"
               if "step" in metrics and "val_loss" in metrics else "")
        return f"Run('{self.dir}': {m.n_layer} layers, {m.n_embd} wide, {params:,} parameters{got})"


def load(run_dir: str | os.PathLike, device: str = "auto") -> Run:
    """The run in run_dir (trained by `tinylm train` or `tinylm.train`), its model on `device` (auto: a
    CUDA GPU, else Apple's MPS, else the CPU)."""
    from tinylm.hardware import pick_device

    cfg, tok, model, _ = rundir.load(run_dir, pick_device(device, flag="device"))
    return Run(Path(run_dir), cfg, tok, model)


def train(data: DataArg = None, run_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
          overrides: dict[str, Any] | None = None, resume: bool = False, quiet: bool = False) -> Run:
    """Train a tokenizer and a model, as `tinylm train` does, and return the trained run.

    data: what to learn from (None: the config's, else the built-in corpus): one path, or a list of paths
      or of texts held in memory (the rule is in this module's docstring and docs/python.md).
    run_dir: where the run goes (None: a new runs/<config>[-<data>], numbered rather than overwriting).
    config: a recipe's name ("small") or a YAML file (None: the defaults; resuming: the run's own).
    overrides: settings on top, as on the command line: {"train.max_steps": 100, "model.n_layer": 2}.
    resume: continue the checkpoint in run_dir (a run trained on texts needs the same texts again).
    quiet: print nothing (else the log, with a progress bar on a terminal).

    Ctrl-C (a notebook's interrupt) stops at the end of a step with a checkpoint, and the run comes back
    as it is; bad input raises tinylm.errors.UserError, whose message is the command line's error line."""
    from tinylm.loop import train as train_loop

    paths, texts = data_inputs(data)
    overrides = dict(overrides or {})
    if paths is not None or texts is not None:
        if "data.paths" in overrides:
            raise UserError("give the data once: data=... or overrides['data.paths'], not both")
        overrides["data.paths"] = paths or []
    if resume and run_dir is None:
        raise UserError("resume=True needs the run_dir of the run to continue")
    cfg = rundir.settings(config, overrides, resume_dir=run_dir if resume else None)
    console = QUIET if quiet else Console(bar=sys.stdout.isatty())
    result = train_loop(cfg, run_dir=run_dir, resume=resume, console=console,
                        name=rundir.run_name(config, paths or [], texts is not None), texts=texts)
    return load(result.run_dir)


def data_inputs(data: DataArg) -> tuple[list[str] | None, list[str] | None]:
    """(paths, texts) that `data` means, at most one of them not None (the rule: this module's docstring)."""
    if data is None:
        return None, None
    if isinstance(data, (str, os.PathLike)):
        if isinstance(data, str) and not is_path(data):
            raise UserError(f"data: one string is a path, and {shorten(data)} is no file or folder; to train on "
                            "text held in memory, pass a list of strings: data=[text, ...]")
        return [os.fspath(data)], None
    if isinstance(data, bytes) or not isinstance(data, Sequence):
        raise UserError(f"data must be a path or a list of paths or texts, not {type(data).__name__}")
    if not data:
        raise UserError("data is an empty list: give paths or texts")
    for i, item in enumerate(data):
        if not isinstance(item, (str, os.PathLike)):
            raise UserError(f"data items must be paths or strings; item {i} is {type(item).__name__}")
    paths = [os.fspath(item) for item in data if not isinstance(item, str) or is_path(item)]
    texts = [item for item in data if isinstance(item, str) and not is_path(item)]
    if paths and texts:
        raise UserError(f"data mixes paths ({shorten(paths[0])}) and texts held in memory ({shorten(texts[0])}: "
                        "no such file or folder); pass a list of one kind")
    for text in texts:
        if len(text.split()) == 1 and Path(text.strip()).suffix.lower() in FILE_SUFFIXES:
            raise UserError(f"data: no file or folder {text.strip()!r} (a text held in memory would be more than "
                            "a file name)")
    return (paths, None) if paths else (None, texts)


def is_path(s: str) -> bool:
    """True for a string that names an input: an existing file or folder, or a Hub dataset (hf:...)."""
    return s.startswith(HUB) or os.path.exists(s)  # exists: False for a text too long or odd to be a path


def shorten(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[: n - 3] + "...")
