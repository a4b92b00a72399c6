"""The training loop: batches -> forward/backward -> optimizer step -> evaluation -> checkpoint -> TensorBoard.

`train(cfg)` runs one training run into a run directory (tinylm/rundir.py: config.yaml, tokenizer.json,
data.json, checkpoint.pt, metrics.json, TensorBoard's event files) and returns its figures as a
`TrainResult`; `tinylm train` is a thin layer over it. By default the blocks' weight matrices learn by
Muon and the embeddings, biases and norm gains by AdamW (train.optimizer=adamw: AdamW for all; see
tinylm/optim.py), on a learning rate that warms up, then follows a cosine down to train.min_lr.

A run survives its faults: checkpoints are written atomically (tinylm/checkpoint.py); SIGINT or SIGTERM
stops it at the end of a step with a checkpoint, and a step with a non-finite loss or gradient is
skipped (tinylm/guard.py); `resume=True` continues it exactly where its checkpoint left off (on the
same device and dtype, bit for bit, unless train.max_time shapes the learning-rate schedule).

How it is built: `train` sets a run up once (tinylm/start.py: directory and lock, data, model and
optimizer, logs, into a `Training`); a `LoopState` holds what changes from step to step, which is what a
checkpoint saves. Each iteration takes one step (tinylm/step.py's `train_step`, the same step the
benchmarks and `tinylm explain` take), then asks `due` what else this step calls for (logging, an
evaluation, a checkpoint); `evaluate_run`, `save` and `record_metrics` are plain functions of the
Training and the state.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import checkpoint, distributed, guard, probe, rundir, snapshots, tblog, timings
from tinylm.cadence import Due, due, finished, mark_done
from tinylm.config import Config
from tinylm.console import QUIET, Console
from tinylm.errors import UserError
from tinylm.generate import generate
from tinylm.hardware import environment, pick_device
from tinylm.model import GPT
from tinylm.optim import learning_rate, progress
from tinylm.prepare import Prepared
from tinylm.start import LoopState, Training, start
from tinylm.step import draw_batches, evaluate, train_step


@dataclass
class TrainResult:
    """What a finished (or stopped) run reached. The model itself is in run_dir (rundir.load)."""

    run_dir: str
    step: int
    elapsed: float  # seconds of training, over every resume
    tokens: int
    parameters: int
    metrics: dict[str, Any]  # what metrics.json holds: the last evaluation's figures and how far the run got
    interrupted: bool = False  # stopped by a signal (with a checkpoint) before its end
    signal: int = 0  # that signal's number


# ---------------------------------------------------------------- the run


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False, console: Console | None = None,
          name: str = "default", texts: Sequence[str] | None = None) -> TrainResult:
    """Train per cfg into run_dir (a fresh runs/<name> if None); resume=True continues its checkpoint.
    console: where messages go (default: print, with a progress bar). texts: strings held in memory, the
    corpus with cfg.data.paths (the Python API's data=[...]). Started by torchrun, this process is one of
    several (tinylm/distributed.py); only rank 0 writes files and messages."""
    d = distributed.setup(cfg.train, pick_device(cfg.train.device))
    console = console or Console(bar=True)
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, for as long as training runs
            result = _train(cfg, d, run_dir, resume, console if d.main else QUIET, name, held, texts)
        d.barrier()  # leave together: torchrun stops the other processes as soon as one has ended
        return result
    finally:
        d.close()


def _train(cfg: Config, d: distributed.Dist, run_dir: str | Path | None, resume: bool, console: Console,
           name: str, held: contextlib.ExitStack, texts: Sequence[str] | None) -> TrainResult:
    """start() then run_loop(): the model and optimizer live only in this call (FSDP's must be gone
    before the process group closes)."""
    tr, state = start(cfg, d, run_dir, resume, console, name, held, texts)
    return run_loop(tr, state)


# ---------------------------------------------------------------- the loop


def run_loop(tr: Training, state: LoopState) -> TrainResult:
    """Train until the run ends or a signal stops it; evaluate, log and save along the way."""
    t = tr.cfg.train
    # From here on SIGINT/SIGTERM ask the loop to stop after its step.
    stop = guard.StopSignals(announce=tr.d.main, repeat_stops=tr.d.world == 1).install()
    bar = tr.console.progress(t.max_steps, state.step)
    try:
        if state.step == 0:
            evaluate_run(tr, state)
            record_metrics(tr, state, final=False)
        else:  # resumed: the marks already passed were the predecessor's to log and evaluate
            mark_done(state, t, Due(log=True, evaluate=True, save=False))
        tr.learner.model.train()
        signum, clock = train_until_stopped(tr, state, stop, bar)
        tr.guard.poll()
        bar.close()
        state.elapsed = clock()
        if signum:
            return stop_run(tr, state, signum)
        finish_run(tr, state)
    except guard.Diverged as e:
        if not tr.d.main:  # every process decided alike; rank 0 says so
            raise SystemExit(2) from None
        raise UserError(f"{e}; {tr.saver.kept()}; lower train.lr or raise train.warmup_steps, then resume: "
                        f"tinylm train --resume {shlex.quote(str(tr.dir))}") from None
    finally:
        stop.uninstall()
        bar.close()
        tr.writer.close()
    tr.console.say(
        f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f} s; "
        f"val loss {state.evaluation.get('val_loss', float('nan')):.4f}\n"
        f"run saved in {tr.dir}\n"
        f"  sample:      tinylm sample {shlex.quote(str(tr.dir))} --prompt \"The\"\n"
        f"  tensorboard: tensorboard --logdir {shlex.quote(str(tr.dir.parent))}"
    )
    return result(tr, state)


def train_until_stopped(tr: Training, state: LoopState, stop: guard.StopSignals,
                        bar: Any) -> tuple[int, Callable[[], float]]:
    """Steps until the run's end or a stop signal; returns (the signal or 0, the run's clock)."""
    t, block = tr.cfg.train, tr.cfg.model.block_size
    clock = stopwatch(state.elapsed)
    meter = Throughput()
    timer = tr.compile_timer
    while True:
        # Several processes stop at the same step, whichever got the signal, and follow one clock.
        signum, state.elapsed = tr.d.agree(stop.signal, state.elapsed)
        if signum or finished(state, t):
            return signum, clock
        lr = learning_rate(state.step, progress(state.step, state.elapsed, t), t)
        batches = draw_batches(tr.prep.train, t, block, state.batch_gen, state.step, tr.d)
        if timer is not None:
            timer.start()
        loss, grad_norm = train_step(tr.learner, batches, lr, t.grad_clip, tr.guard, number=state.step + 1,
                                     poison=tr.poisoned.get(state.step + 1, ""))  # TINYLM_TEST_*_STEPS
        if timer is not None and timer.stop():  # a compiled run's compile time, kept for the next decision
            timer = None
        state.step += 1
        state.tokens += tr.tokens_per_step
        meter.tokens += tr.tokens_per_step
        # Decisions by time must be the same in every process (an evaluation is collective): one clock.
        _, state.elapsed = tr.d.agree(0, clock())
        bar.update(1)
        when = due(state, t)
        # The last step's save and metrics are finish_run's: final, so a failure is an error, never a
        # warning that promises another try.
        last = finished(state, t)
        if when.log:
            log_step(tr, state, lr, loss, grad_norm, meter.read(), bar)
        if when.evaluate:
            tr.guard.poll()
            evaluate_run(tr, state)
        if when.save and not last:
            save(tr, state, final=False)
        if when.evaluate and not last:  # after the save: metrics.json never gets ahead of the checkpoint beside it
            record_metrics(tr, state, final=False)
        mark_done(state, t, when)
        if when.evaluate or when.save:
            meter.restart()  # evaluating and saving are not training throughput


def stopwatch(elapsed: float) -> Callable[[], float]:
    """A clock that reads `elapsed` seconds now and counts on (a resumed run continues its count)."""
    started = time.perf_counter() - elapsed
    return lambda: time.perf_counter() - started


@dataclass
class Throughput:
    """Training tokens per second since the last reading."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate

    def restart(self) -> None:
        self.start = time.perf_counter()


def log_step(tr: Training, state: LoopState, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
             tokens_per_sec: float, bar: Any) -> None:
    """The training loss and the speed, to TensorBoard and the progress bar: tokens/s and, where the
    device's peak is known, model FLOPs utilisation (tinylm/speed.py: the FLOPs the model needs per token
    times tokens/s, over the peak of every process's device)."""
    loss_value = loss.item()  # the only host sync in the step, and only every log_interval
    tr.guard.poll()
    state.speeds.append(tokens_per_sec)
    scalars = {"train/loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "speed/tokens_per_sec": tokens_per_sec}
    shown = {"loss": f"{loss_value:.3f}", "tok_s": f"{tokens_per_sec:,.0f}"}
    if tr.peak is not None:
        mfu = 100 * tokens_per_sec * tr.flops_per_token / (tr.peak.flops * tr.d.world)
        scalars["speed/mfu_percent"] = mfu
        shown["mfu"] = f"{mfu:.1f}%"
    scaler = tr.learner.scaler
    if scaler is not None:  # float16: the loss scale, and how many steps its overflows skipped
        scalars["amp/loss_scale"], scalars["amp/overflow_steps"] = scaler.get_scale(), tr.guard.overflows
    for tag, value in scalars.items():
        tr.writer.add_scalar(tag, value, state.step)
    bar.set_postfix(**shown, lr=f"{lr:.2e}")


def stop_run(tr: Training, state: LoopState, signum: int) -> TrainResult:
    """A signal stopped the run: save where it is (unless this step is saved already) and say how to go on."""
    if tr.saver.step != state.step:
        save(tr, state, final=True)
    record_metrics(tr, state, final=True)
    tr.console.say(f"stopped by {signal.Signals(signum).name} at step {state.step}; "
                   f"checkpoint saved in {tr.saver.path}\n"
                   f"  resume with: tinylm train --resume {shlex.quote(str(tr.dir))}")
    return result(tr, state, signum)


def finish_run(tr: Training, state: LoopState) -> None:
    """The run reached its end: a last evaluation (unless this step had one), the last save, the final logs."""
    if state.evaluation.get("eval_step") != state.step:
        evaluate_run(tr, state)
    save(tr, state, final=True)
    record_metrics(tr, state, final=True)
    tr.writer.add_scalar("time/elapsed_sec", state.elapsed, state.step)
    if tr.inspect:
        tblog.log_embeddings(tr.writer, tr.learner.model, tr.prep.tokenizer, state.step)
    if tr.d.world == 1 and tr.compile_timer is None and len(state.speeds) > 4:  # the planner's timings still true?
        t, m = tr.cfg.train, tr.cfg.model
        real = sorted(state.speeds[1:])[(len(state.speeds) - 1) // 2]  # the median, the first (warm-up) left out
        timings.check_kept_speed(m, t.batch_size, tr.vocab_size, tr.learner.device, tr.learner.dtype, real,
                                 tr.console.say)


def result(tr: Training, state: LoopState, signum: int = 0) -> TrainResult:
    return TrainResult(str(tr.dir), state.step, state.elapsed, state.tokens, tr.summary["total"], metrics(state),
                       interrupted=bool(signum), signal=signum)


# ---------------------------------------------------------------- evaluating and saving


def evaluate_run(tr: Training, state: LoopState) -> None:
    """Validation and training loss on their fixed windows, logged to TensorBoard and the console (with a
    sample of text) and kept in state.evaluation (for metrics.json: record_metrics); what the model makes
    of the probe (tinylm/probe.py) to TensorBoard."""
    t, block, learner = tr.cfg.train, tr.cfg.model.block_size, tr.learner
    val = evaluate(learner.core, tr.prep.val, t, block, learner.device, learner.dtype, t.seed + 1, tr.d)
    train_loss = evaluate(learner.core, tr.prep.train, t, block, learner.device, learner.dtype, t.seed + 2, tr.d)
    bpb = val * tr.prep.tokens_per_byte / math.log(2)
    ppl = math.exp(min(val, 50))
    state.best_val = min(state.best_val, val)
    state.evaluation = {"eval_step": state.step, "val_loss": val, "val_bpb": bpb, "train_loss": train_loss}
    for tag, value in (("val/loss", val), ("val/ppl", ppl), ("val/bpb", bpb), ("train/eval_loss", train_loss)):
        tr.writer.add_scalar(tag, value, state.step)
    if tr.inspect:
        tblog.log_histograms(tr.writer, learner.model, state.step)
    if tr.probe is not None:  # what the model predicts and where it looks, on one fixed text
        probe.log_probe(tr.writer, learner.model, tr.probe, tr.prep.tokenizer, state.step)
    line = f"step {state.step}: val loss {val:.4f} (ppl {ppl:.2f}, {bpb:.3f} bits/byte), train loss {train_loss:.4f}"
    if t.sample_tokens:
        text = sample_text(learner.model, tr.prep, t.sample_tokens, t.seed)
        tr.writer.add_text("samples", "```\n" + text + "\n```", state.step)
        line += "\n--- sample ---\n" + text.strip() + "\n--------------"
    tr.console.say(line)
    tr.writer.flush()


def sample_text(model: GPT, prep: Prepared, n_tokens: int, seed: int) -> str:
    tok = prep.tokenizer
    gen = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    ids = list(generate(model, [tok.eot_id], n_tokens, temperature=0.8, top_k=50, gen=gen))
    return tok.decode(ids)


def metrics(state: LoopState) -> dict[str, Any]:
    """metrics.json: how far the run got, its last evaluation (at eval_step), and its best val loss."""
    return {"step": state.step, "tokens": state.tokens, "elapsed": state.elapsed, **state.evaluation,
            "best_val_loss": state.best_val}


def record_metrics(tr: Training, state: LoopState, final: bool) -> None:
    """Write metrics.json (rank 0). A failure is a warning while training goes on, an error at the end."""

    def write() -> None:
        try:
            rundir.write_metrics(tr.dir, metrics(state))
        except checkpoint.SaveError as e:
            if final:
                raise
            tr.console.say(f"warning: {e}; training goes on and tries again at the next evaluation")

    tr.d.on_main(write)


def save(tr: Training, state: LoopState, final: bool) -> None:
    """Write the checkpoint (rank 0; FSDP gathers the shards there). A failed periodic save is a warning,
    a failed final one an error (checkpoint.Saver); weights that hold inf or NaN are never saved."""
    model, optimizer = tr.learner.model, tr.learner.optimizer
    if not tr.d.all_true(guard.params_finite(model)):  # never replace a good checkpoint with broken weights
        raise guard.Diverged(f"training diverged: the weights hold inf or NaN at step {state.step}")
    weights, moments = tr.d.full_state(model, optimizer)

    def write() -> bool:  # and, at an evaluation, keep it as a snapshot (tinylm/snapshots.py)
        saved = tr.saver.save(checkpoint_contents(tr, state, weights, moments), final)
        if saved:
            snapshots.after_save(tr.dir, state.step, state.evaluation, tr.cfg.train.keep_snapshots, tr.console.say)
        return saved

    saved = tr.d.on_main(write)
    tr.saver.step = state.step if saved else tr.saver.step  # other processes learn what rank 0 wrote


def checkpoint_contents(tr: Training, state: LoopState, weights: dict, moments: dict) -> dict[str, Any]:
    """Everything an exact resume needs (checkpoint.RESUME_KEYS), and what the run was."""
    return {
        "model": weights,
        "optimizer": moments,
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "best_val": state.best_val,
        "batch_rng": state.batch_gen.get_state(),
        "rng": checkpoint.rng_state(),
        "config": tr.cfg.to_dict(),  # the config these weights were trained with (rundir.compare)
        "vocab_size": tr.vocab_size,
        "data": tr.data_id,
        "tokenizer": tr.tokenizer_id,  # sample, explain and export check the run's tokenizer.json against it
        "environment": environment(),
        "probe": tr.probe.text if tr.probe is not None else "",  # what `tinylm explain --compare` reads
        **({"scaler": tr.learner.scaler.state_dict()} if tr.learner.scaler is not None else {}),  # float16's loss scale
    }
