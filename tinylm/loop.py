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

How it is built: `train` sets a run up once into a `Run` (directory and lock, data, model and optimizer,
logs); a `LoopState` holds what changes from step to step, which is what a checkpoint saves. Each
iteration takes one step (tinylm/step.py's `train_step`, the same step the benchmarks and `tinylm
explain` take), then asks `due` what else this step calls for (logging, an evaluation, a checkpoint);
`evaluate_run`, `save` and `record_metrics` are plain functions of the Run and the state.
"""

from __future__ import annotations

import contextlib
import math
import random
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import checkpoint, distributed, guard, rundir, tblog
from tinylm.config import Config, TrainConfig
from tinylm.console import QUIET, Console
from tinylm.data import Prepared, check_window, fingerprint, prepare
from tinylm.errors import UserError
from tinylm.generate import generate
from tinylm.hardware import autocast_dtype, environment, pick_device
from tinylm.model import GPT, describe_architecture, format_parameter_table, parameter_summary, parameter_table
from tinylm.optim import describe_optimizer, learning_rate, make_optimizer, progress
from tinylm.step import Learner, draw_batches, evaluate, make_learner, train_step


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


@dataclass
class LoopState:
    """What changes from step to step. All of it but `evaluation` is in every checkpoint."""

    batch_gen: torch.Generator  # the data-sampling position
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    evaluation: dict[str, float] = field(default_factory=dict)  # the last one: eval_step, val_loss, ...


@dataclass
class Run:
    """What a run sets up once and its loop reads."""

    cfg: Config
    d: distributed.Dist
    dir: Path
    console: Console
    prep: Prepared
    vocab_size: int
    data_id: dict[str, Any]  # the data's fingerprint, saved with every checkpoint
    learner: Learner
    summary: dict[str, int]  # parameter counts
    saver: checkpoint.Saver
    writer: Any  # TensorBoard (tblog.TolerantWriter; distributed.NullWriter on ranks other than 0)
    guard: guard.BlowUpGuard
    inspect: bool  # log histograms, update ratios and embeddings (rank 0, whole tensors: not under FSDP)
    poisoned: set[int] = field(default_factory=set)  # steps whose loss a test makes NaN

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.cfg)


def tokens_per_step(cfg: Config) -> int:
    """The global batch: train.batch_size x train.grad_accum windows of model.block_size tokens."""
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size


# ---------------------------------------------------------------- when


@dataclass(frozen=True)
class Due:
    log: bool
    evaluate: bool
    save: bool


def due(state: LoopState, t: TrainConfig) -> Due:
    """What the step just taken calls for besides itself: the loop's one decision of when."""
    evaluate_now = state.step % t.eval_interval == 0
    return Due(log=state.step % t.log_interval == 0, evaluate=evaluate_now, save=evaluate_now)


def finished(state: LoopState, t: TrainConfig) -> bool:
    """True once the run has reached train.max_steps or, if set, train.max_time seconds."""
    return state.step >= t.max_steps or bool(t.max_time and state.elapsed >= t.max_time)


# ---------------------------------------------------------------- the run


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False, console: Console | None = None,
          name: str = "default") -> TrainResult:
    """Train per cfg into run_dir (a fresh runs/<name> if None); resume=True continues its checkpoint.
    console: where messages go (default: print, with a progress bar). Started by torchrun, this process
    is one of several (tinylm/distributed.py); only rank 0 writes files and messages."""
    d = distributed.setup(cfg.train, pick_device(cfg.train.device))
    console = console or Console(bar=True)
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, for as long as training runs
            result = _train(cfg, d, run_dir, resume, console if d.main else QUIET, name, held)
        d.barrier()  # leave together: torchrun stops the other processes as soon as one has ended
        return result
    finally:
        d.close()


def _train(cfg: Config, d: distributed.Dist, run_dir: str | Path | None, resume: bool, console: Console,
           name: str, held: contextlib.ExitStack) -> TrainResult:
    t = cfg.train
    dtype = autocast_dtype(t.dtype, d.device)
    seed_everything(t.seed)
    run_dir = Path(run_dir) if run_dir is not None else d.from_main(rundir.new_dir(name) if d.main else None)
    d.on_main(lambda: held.enter_context(rundir.lock(run_dir)))  # one trainer per run directory
    previous = rundir.resume(run_dir, cfg) if resume else None
    if previous is None:
        rundir.refuse_overwrite(run_dir)

    prep, pretrained = prepare_data(cfg, d, console)
    data_id = fingerprint(prep)
    if previous is not None:
        previous.check_data(data_id)
        for change in previous.changes():
            console.say(f"resume: {change}")
        d.on_main(lambda: rundir.remove_stale_temps(run_dir))
    # The data cache's tokenizer file (data.fingerprint hashes the same file).
    d.on_main(lambda: rundir.write_files(run_dir, cfg, prep.dir / "tokenizer.json", {**prep.meta, "cache": str(prep.dir)}))

    vocab_size = pretrained.vocab_size if pretrained else prep.tokenizer.vocab_size
    model, table, summary = build_model(cfg, d, vocab_size, pretrained if previous is None else None, console)
    optimizer = make_optimizer(model, t, d.device, dtype)
    console.say(describe_optimizer(optimizer, t))
    state = LoopState(torch.Generator().manual_seed(t.seed))
    if previous is not None:
        restore(state, previous, d, model, optimizer)
        console.say(f"resumed {run_dir} at step {state.step}")
    learner = make_learner(model, optimizer, d, dtype, t.compile)
    if d.world > 1:
        console.say(d.describe(t, cfg.model.block_size))
    console.say(f"device {d.device}, {'bfloat16 autocast' if dtype else 'float32'}, "
                f"{tokens_per_step(cfg):,} tokens per step, up to {t.max_steps:,} steps"
                + (f" or {t.max_time:g} s" if t.max_time else ""))

    # On resume, TensorBoard drops what a killed process logged after its checkpoint (purge_step).
    purge_step = state.step + 1 if previous is not None else None
    writer = (tblog.TolerantWriter(lambda: tblog.open_writer(run_dir, cfg, table, summary, environment(), purge_step),
                                   console.say) if d.main else distributed.NullWriter())
    inspect = d.main and d.strategy != "fsdp"  # FSDP: each process holds a shard of each tensor
    if inspect:
        tblog.watch_updates(optimizer, model, writer, lambda: state.step + 1, t.log_interval)  # update/weight ratios
    saver = checkpoint.Saver(run_dir / rundir.CHECKPOINT, state.step if previous is not None else None, console.say)
    blowup = guard.BlowUpGuard(t.max_bad_steps, d.device, optimizer, console.say)
    run = Run(cfg, d, run_dir, console, prep, vocab_size, data_id, learner, summary, saver, writer, blowup,
              inspect, guard.injected_nan_steps())
    del previous  # the checkpoint read back, weights and all: restored, no longer needed
    return run_loop(run, state)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def prepare_data(cfg: Config, d: distributed.Dist, console: Console) -> tuple[Prepared, Any]:
    """The prepared data (and the pretrained model it is tokenized for, with train.init_from, else None);
    the model's shape then is the pretrained one's (cfg.model is replaced)."""
    pretrained = None
    if cfg.train.init_from:  # fine-tuning: the shape, weights and tokenizer come from a GPT-2 folder
        from tinylm.hf import read_pretrained

        pretrained = read_pretrained(cfg.train.init_from)
        cfg.model = pretrained.fit(cfg.model)
    prep = d.first_on_each_node(lambda: prepare(cfg.data, tokenizer=pretrained.tokenizer if pretrained else None))
    meta = prep.meta
    if prep.note:
        console.say(f"data: {prep.note}")
    console.say(
        f"data: {'reused' if prep.reused else 'prepared'} {prep.dir} | {prep.tokenizer.kind} tokenizer, "
        f"vocab {prep.tokenizer.vocab_size:,} | train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens"
    )
    check_window("training", meta["train_tokens"], cfg.model.block_size)
    check_window("validation", meta["val_tokens"], cfg.model.block_size)
    return prep, pretrained


def build_model(cfg: Config, d: distributed.Dist, vocab_size: int, pretrained: Any,
                console: Console) -> tuple[torch.nn.Module, str, dict[str, int]]:
    """The model on this process's device (sharded under FSDP), with `pretrained`'s weights if given;
    its parameter table is printed. Returns (model, table, parameter counts)."""
    m = cfg.model
    model = GPT(m, vocab_size)
    if pretrained is not None:
        try:
            model.load_state_dict(pretrained.state_for(m))
        except RuntimeError as e:  # tensors whose shapes config.json does not describe
            raise UserError(f"the weights in {cfg.train.init_from} do not match its config.json: "
                            f"{str(e).strip().splitlines()[-1].strip()}") from None
        console.say(f"initialised from {cfg.train.init_from}: {m.n_layer} layers, {m.n_head} heads, "
                    f"{m.n_embd} wide, context {m.block_size}")
    rows = parameter_table(model)
    table = format_parameter_table(rows, m.n_layer, m.tie_embeddings)
    console.say(table)
    console.say(describe_architecture(m))
    return d.place(model), table, parameter_summary(rows)


def restore(state: LoopState, previous: rundir.Resume, d: distributed.Dist, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer, random states and the loop's counters as `previous`'s checkpoint left them."""
    saved = previous.state
    checkpoint.restore(saved, *d.loaders(model, optimizer), state.batch_gen, previous.path)
    state.step, state.tokens, state.elapsed, state.best_val = saved["step"], saved["tokens"], saved["elapsed"], saved["best_val"]


# ---------------------------------------------------------------- the loop


def run_loop(run: Run, state: LoopState) -> TrainResult:
    """Train until the run ends or a signal stops it; evaluate, log and save along the way."""
    t = run.cfg.train
    # From here on SIGINT/SIGTERM ask the loop to stop after its step.
    stop = guard.StopSignals(announce=run.d.main, repeat_stops=run.d.world == 1).install()
    bar = run.console.progress(t.max_steps, state.step)
    try:
        if state.step == 0:
            evaluate_run(run, state)
        run.learner.model.train()
        signum, clock = train_until_stopped(run, state, stop, bar)
        run.guard.poll()
        bar.close()
        state.elapsed = clock()
        if signum:
            return stop_run(run, state, signum)
        finish_run(run, state)
    except guard.Diverged as e:
        if not run.d.main:  # every process decided alike; rank 0 says so
            raise SystemExit(2) from None
        raise UserError(f"{e}; {run.saver.kept()}; lower train.lr or raise train.warmup_steps, then resume: "
                        f"tinylm train --resume {shlex.quote(str(run.dir))}") from None
    finally:
        stop.uninstall()
        bar.close()
        run.writer.close()
    run.console.say(
        f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f} s; "
        f"val loss {state.evaluation.get('val_loss', float('nan')):.4f}\n"
        f"run saved in {run.dir}\n"
        f"  sample:      tinylm sample {shlex.quote(str(run.dir))} --prompt \"The\"\n"
        f"  tensorboard: tensorboard --logdir {shlex.quote(str(run.dir.parent))}"
    )
    return result(run, state)


def train_until_stopped(run: Run, state: LoopState, stop: guard.StopSignals, bar: Any) -> tuple[int, Callable[[], float]]:
    """Steps until the run's end or a stop signal; returns (the signal or 0, the run's clock)."""
    t, block = run.cfg.train, run.cfg.model.block_size
    clock = stopwatch(state.elapsed)
    meter = Throughput()
    while True:
        # Several processes stop at the same step, whichever got the signal, and follow one clock.
        signum, state.elapsed = run.d.agree(stop.signal, state.elapsed)
        if signum or finished(state, t):
            return signum, clock
        lr = learning_rate(state.step, progress(state.step, state.elapsed, t), t)
        batches = draw_batches(run.prep.train, t, block, state.batch_gen, state.step, run.d)
        loss, grad_norm = train_step(run.learner, batches, lr, t.grad_clip, run.guard, number=state.step + 1,
                                     poison=state.step + 1 in run.poisoned)  # poison: TINYLM_TEST_NAN_STEPS
        state.step += 1
        state.tokens += run.tokens_per_step
        meter.tokens += run.tokens_per_step
        state.elapsed = clock()
        bar.update(1)
        when = due(state, t)
        if when.log:
            log_step(run, state, lr, loss, grad_norm, meter.read(), bar)
        if when.evaluate:
            run.guard.poll()
            evaluate_run(run, state)
        if when.save:
            save(run, state, final=False)
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


def log_step(run: Run, state: LoopState, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
             tokens_per_sec: float, bar: Any) -> None:
    loss_value = loss.item()  # the only host sync in the step, and only every log_interval
    run.guard.poll()
    for tag, value in (("train/loss", loss_value), ("lr", lr), ("grad_norm", float(grad_norm)),
                       ("tokens_per_sec", tokens_per_sec)):
        run.writer.add_scalar(tag, value, state.step)
    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_sec:,.0f}", lr=f"{lr:.2e}")


def stop_run(run: Run, state: LoopState, signum: int) -> TrainResult:
    """A signal stopped the run: save where it is (unless this step is saved already) and say how to go on."""
    if run.saver.step != state.step:
        save(run, state, final=True)
    record_metrics(run, state, final=True)
    run.console.say(f"stopped by {signal.Signals(signum).name} at step {state.step}; checkpoint saved in {run.saver.path}\n"
                    f"  resume with: tinylm train --resume {shlex.quote(str(run.dir))}")
    return result(run, state, signum)


def finish_run(run: Run, state: LoopState) -> None:
    """The run reached its end: a last evaluation (unless this step had one), the last save, the final logs."""
    if state.evaluation.get("eval_step") != state.step:
        evaluate_run(run, state)
    save(run, state, final=True)
    record_metrics(run, state, final=True)
    run.writer.add_scalar("time/elapsed_sec", state.elapsed, state.step)
    if run.inspect:
        tblog.log_embeddings(run.writer, run.learner.model, run.prep.tokenizer, state.step)


def result(run: Run, state: LoopState, signum: int = 0) -> TrainResult:
    return TrainResult(str(run.dir), state.step, state.elapsed, state.tokens, run.summary["total"], metrics(state),
                       interrupted=bool(signum), signal=signum)


# ---------------------------------------------------------------- evaluating and saving


def evaluate_run(run: Run, state: LoopState) -> None:
    """Validation and training loss on their fixed windows, logged to TensorBoard and the console (with a
    sample of text), kept in state.evaluation and written to metrics.json."""
    t, block, learner = run.cfg.train, run.cfg.model.block_size, run.learner
    val = evaluate(learner.core, run.prep.val, t, block, learner.device, learner.dtype, t.seed + 1, run.d)
    train_loss = evaluate(learner.core, run.prep.train, t, block, learner.device, learner.dtype, t.seed + 2, run.d)
    bpb = val * run.prep.tokens_per_byte / math.log(2)
    ppl = math.exp(min(val, 50))
    state.best_val = min(state.best_val, val)
    state.evaluation = {"eval_step": state.step, "val_loss": val, "val_bpb": bpb, "train_loss": train_loss}
    for tag, value in (("val/loss", val), ("val/ppl", ppl), ("val/bpb", bpb), ("train/eval_loss", train_loss)):
        run.writer.add_scalar(tag, value, state.step)
    if run.inspect:
        tblog.log_histograms(run.writer, learner.model, state.step)
    line = f"step {state.step}: val loss {val:.4f} (ppl {ppl:.2f}, {bpb:.3f} bits/byte), train loss {train_loss:.4f}"
    if t.sample_tokens:
        text = sample_text(learner.model, run.prep, t.sample_tokens, t.seed)
        run.writer.add_text("samples", "```\n" + text + "\n```", state.step)
        line += "\n--- sample ---\n" + text.strip() + "\n--------------"
    run.console.say(line)
    run.writer.flush()
    record_metrics(run, state, final=False)


def sample_text(model: GPT, prep: Prepared, n_tokens: int, seed: int) -> str:
    tok = prep.tokenizer
    gen = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    ids = list(generate(model, [tok.eot_id], n_tokens, temperature=0.8, top_k=50, gen=gen))
    return tok.decode(ids)


def metrics(state: LoopState) -> dict[str, Any]:
    """metrics.json: how far the run got, its last evaluation (at eval_step), and its best val loss."""
    return {"step": state.step, "tokens": state.tokens, "elapsed": state.elapsed, **state.evaluation,
            "best_val_loss": state.best_val}


def record_metrics(run: Run, state: LoopState, final: bool) -> None:
    """Write metrics.json (rank 0). A failure is a warning while training goes on, an error at the end."""

    def write() -> None:
        try:
            rundir.write_metrics(run.dir, metrics(state))
        except checkpoint.SaveError as e:
            if final:
                raise
            run.console.say(f"warning: {e}; training goes on and tries again at the next evaluation")

    run.d.on_main(write)


def save(run: Run, state: LoopState, final: bool) -> None:
    """Write the checkpoint (rank 0; FSDP gathers the shards there). A failed periodic save is a warning,
    a failed final one an error (checkpoint.Saver); weights that hold inf or NaN are never saved."""
    model, optimizer = run.learner.model, run.learner.optimizer
    if not run.d.all_true(guard.params_finite(model)):  # never replace a good checkpoint with broken weights
        raise guard.Diverged(f"training diverged: the weights hold inf or NaN at step {state.step}")
    weights, moments = run.d.full_state(model, optimizer)
    saved = run.d.on_main(lambda: run.saver.save(checkpoint_contents(run, state, weights, moments), final))
    run.saver.step = state.step if saved else run.saver.step  # other processes learn what rank 0 wrote


def checkpoint_contents(run: Run, state: LoopState, weights: dict, moments: dict) -> dict[str, Any]:
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
        "config": run.cfg.to_dict(),  # the config these weights were trained with (rundir.compare)
        "vocab_size": run.vocab_size,
        "data": run.data_id,
        "environment": environment(),
    }
