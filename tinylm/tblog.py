"""What training does to weights, biases and embeddings, written to TensorBoard.

The training loop (tinylm/loop.py) opens the run's writer with `open_writer`, which logs the run's
description once (parameter table, config, environment, hyperparameters, and the Custom Scalars tab's
`LAYOUT`: train and val loss on one chart), then calls three functions;
everything they write lands in the run's own event files:

* `log_histograms` at every evaluation: one histogram per parameter tensor, filed by kind
  (`weights/`, `biases/`, `embeddings/`, `norm_gains/`) and named by layer, e.g.
  `weights/blocks.0.attn.qkv` and `biases/blocks.0.attn.qkv`: how each layer's numbers spread out.
* `watch_updates` hooks the optimizer so that every `every` steps it logs the update-to-weight ratio
  ||w_after - w_before|| / ||w_before|| of each kind (`update_ratio/weights`, `update_ratio/biases`, ...):
  how big a nudge gradient descent gave. On other steps it does nothing, so the copy of the parameters
  and the one host sync it needs are paid only at the log interval.
* `log_embeddings` at the end: the token embedding matrix for TensorBoard's projector, each row
  labelled with its token's text, so that tokens used alike (docs/lesson.md) can be seen lying near
  each other in 3-D.

`TolerantWriter` wraps the run's SummaryWriter so that a log that cannot be written (a full disk) costs
one warning, not the run.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tinylm import rundir
from tinylm.anatomy import param_group

HISTOGRAM_BINS = 64  # TensorBoard shows 30; its default 'tensorflow' bins make each histogram 7x larger on disk
MAX_PROJECTOR_TOKENS = 8192  # the projector's file is text, ~8 bytes a number: cap large vocabularies


# TensorBoard's Custom Scalars tab: training and validation loss on one chart, first, since the loss curves
# are what a user looks at first; then what the model makes of the probe and how the tracked numbers move.
LAYOUT = {
    "loss": {"training and validation loss": ["Multiline", ["train/loss", "val/loss"]],
             "validation loss and the same estimate on training text": ["Multiline", ["val/loss", "train/eval_loss"]]},
    "watching it learn": {"probe: the loss on each token": ["Multiline", [r"probe/token_loss/.*"]],
                          "tracked numbers": ["Multiline", [r"track/.*/value"]],
                          "their gradients": ["Multiline", [r"track/.*/grad"]]},
}


def open_writer(run_dir: Path, cfg, table: str, summary: dict[str, int], environment: dict[str, str],
                purge_step: int | None = None):
    """A SummaryWriter into run_dir with the run's description logged once: parameter table, config,
    environment, parameter counts and hyperparameters.

    purge_step: TensorBoard hides what earlier writers logged at this step and later (a resumed run's
    killed predecessor may have logged steps past its checkpoint)."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    # TensorBoard reads a run's event files in name order, and a name starts with the second it was made
    # in (then host, pid, a counter): a resumed run's file made in its predecessor's second could sort first.
    stamp = re.compile(re.escape(rundir.EVENTS) + r"(\d+)\.")
    made = [int(m.group(1)) for p in rundir.event_files(run_dir) if (m := stamp.match(p.name))]
    if made:  # at most a second: a file stamped in the future (a clock set back) must not hang the run
        time.sleep(max(0.0, min(1.0, max(made) + 1 - time.time())))
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    writer.add_custom_scalars(LAYOUT)
    writer.add_text("parameters", table)
    writer.add_text("config", "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
    writer.add_text("environment", "\n".join(f"- {k}: {v}" for k, v in environment.items()))
    for key in ("total", "embedding", "non_embedding", "weights", "biases"):
        writer.add_scalar(f"parameters/{key}", summary[key], 0)
    flat = {
        f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
        for s, section in cfg.to_dict().items() for k, v in section.items()
    }
    # Written into this run's own event file (add_hparams would start a separate run folder).
    for proto in hparams(flat, {"val/loss": 0.0, "val/bpb": 0.0}):
        writer.file_writer.add_summary(proto)
    return writer


def histogram_tag(name: str, p: torch.Tensor) -> str:
    """'blocks.0.attn.qkv.bias' -> 'biases/blocks.0.attn.qkv'."""
    layer = name.removesuffix(".weight").removesuffix(".bias")
    return f"{param_group(name, p)}/{layer}"


def log_histograms(writer, model: torch.nn.Module, step: int) -> None:
    for name, p in model.named_parameters():
        values = p.detach().float()
        if torch.isfinite(values).all():  # a histogram needs finite numbers; the blow-up guard reports the rest
            writer.add_histogram(histogram_tag(name, p), values, step, bins=HISTOGRAM_BINS)


def watch_updates(optimizer: torch.optim.Optimizer, model: torch.nn.Module, writer,
                  next_step: Callable[[], int], every: int):
    """Log the update-to-weight ratio of each kind of parameter on the optimizer steps numbered
    next_step() that are multiples of `every`. Returns the hook handles (`.remove()` to stop)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(param_group(name, p), []).append(p)
    before: list[torch.Tensor] = []

    def pre(opt, args, kwargs) -> None:
        before.clear()
        if next_step() % every == 0:
            before.extend(p.detach().clone() for ps in groups.values() for p in ps)

    def post(opt, args, kwargs) -> None:
        if not before:
            return
        old = iter(before)
        ratios = []
        for ps in groups.values():
            pairs = [(p.detach(), next(old)) for p in ps]
            delta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - b) for p, b in pairs]))
            size = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for _, b in pairs]))
            ratios.append(delta / size)
        before.clear()
        for group, value in zip(groups, torch.stack(ratios).tolist()):  # the one host sync
            if math.isfinite(value):  # a group still all zeros (biases at step 1) has no ratio yet
                writer.add_scalar(f"update_ratio/{group}", value, next_step())

    return optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)


def token_label(tokenizer, token_id: int) -> str:
    """A token's text as Python writes it: quotes show leading spaces, and newlines stay on one line."""
    return repr(tokenizer.decode([token_id]))


def log_embeddings(writer, model: torch.nn.Module, tokenizer, step: int) -> None:
    """The token embedding matrix (rows = tokens) for the projector, labelled with decoded tokens."""
    emb = model.tok_emb.weight.detach().float().cpu()
    n = min(len(emb), tokenizer.vocab_size, MAX_PROJECTOR_TOKENS)
    labels = [token_label(tokenizer, i) for i in range(n)]
    # The projector reads a text file: five decimals keep cosine similarities and make it 2.5x smaller.
    writer.add_embedding(emb[:n].double().round(decimals=5), metadata=labels, global_step=step, tag="tok_emb")


class TolerantWriter:
    """A SummaryWriter (made by `make`) whose failures to write do not stop training.

    The TensorBoard log is a view of the run, not the run: if writing it fails (a full disk, a quota,
    a file-size limit), `say` gets one warning and logging stops, while training and its checkpoints
    (which handle a full disk themselves, keeping the last good one) go on. TensorBoard writes from a
    background thread, so a failure surfaces at a later call: every call is guarded.
    """

    def __init__(self, make: Callable[[], Any], say: Callable[[str], None]):
        self.say, self.writer, self.failed = say, None, False
        quiet_writer_thread_errors()
        self.writer = self._guard(make)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except OSError as e:
            self.failed = True
            self.say(f"warning: the TensorBoard log could not be written ({e.strerror or e}); "
                     "training goes on without it, and checkpoints are still saved")
            return None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: self._guard(lambda: getattr(self.writer, name)(*args, **kwargs))

    def close(self) -> None:
        if self.writer is None:
            return
        if not self.failed:
            self._guard(self.writer.close)  # the last flush can be the first write to fail
            return
        try:
            self.writer.close()  # release the file; its error was reported already
        except OSError:
            pass


def is_event_writer_error(args: threading.ExceptHookArgs) -> bool:
    """True for an OSError raised in the background thread that TensorBoard's event files are written from.

    Why it is needed: that thread keeps its error for the writer's next call (where TolerantWriter reports
    it in one line) and then re-raises it, which Python's default thread hook prints as a traceback in the
    middle of training's output.
    What it relies on: the thread's class being defined in the module of tensorboard's `EventFileWriter`
    (tensorboard.summary.writer.event_file_writer, where torch's SummaryWriter imports it from). Today
    that class is the private `_AsyncWriterThread`: it is matched by the module it lives in, not by name.
    If a release moves it: nothing matches, and Python prints that thread's traceback again: noisy but
    harmless, since TolerantWriter still reports the failure in one line and training goes on.
    """
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return isinstance(args.exc_value, OSError) and type(args.thread).__module__ == EventFileWriter.__module__


def quiet_writer_thread_errors() -> None:
    """Keep Python from printing a traceback when TensorBoard's background writer thread fails to write
    (see `is_event_writer_error`). Other threads' errors, and other errors of that thread, are printed
    as before."""
    previous = threading.excepthook
    if getattr(previous, "tinylm_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not is_event_writer_error(args):
            previous(args)

    hook.tinylm_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook
