"""Starting a training run: its directory and lock, data, model, optimizer and logs, gathered into a
`Training` that the loop (tinylm/loop.py) reads, and the `LoopState` the loop then changes (a resumed
run's restored from its checkpoint, exactly).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import checkpoint, distributed, guard, memory, plan, rundir, speed, tblog, timings, track
from tinylm import config as config_
from tinylm.anatomy import describe_architecture, format_parameter_table, parameter_summary, parameter_table
from tinylm.batches import check_window
from tinylm.config import Config
from tinylm.console import Console
from tinylm.errors import UserError
from tinylm.hardware import CompileTimer, autocast_dtype, compile_choice, environment
from tinylm.model import GPT
from tinylm.optim import describe_optimizer, make_optimizer
from tinylm.prepare import Prepared, fingerprint, prepare
from tinylm.probe import Probe, make_probe
from tinylm.step import Learner, make_learner


@dataclass
class LoopState:
    """What changes from step to step. All of it but `evaluation` is in every checkpoint."""

    batch_gen: torch.Generator  # the data-sampling position
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    evaluation: dict[str, float] = field(default_factory=dict)  # the last one: eval_step, val_loss, ...
    # Where the cadence stands (tinylm/cadence.py's `due`), derived again from step and elapsed on resume:
    log_mark: int = 0  # of the run's LOG_POINTS evenly spaced marks, how many had a logged loss
    eval_mark: int = 0  # of its train.evals marks, how many had an evaluation
    mark_evaluated: float = 0.0  # the progress at the latest of them (the start's evaluation is at 0)
    saved_at: float = 0.0  # elapsed seconds at the last checkpoint (or the start)
    speeds: list[float] = field(default_factory=list)  # this session's logged training tokens/s (not saved)


@dataclass
class Training:
    """What a training run sets up once (`start`) and its loop reads."""

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
    flops_per_token: float  # training FLOPs per token (tinylm/speed.py), for MFU
    peak: speed.Peak | None  # the device's peak FLOP/s in the run's precision, None where not known
    tokenizer_id: dict[str, Any] = field(default_factory=dict)  # the tokenizer's identity, saved with every checkpoint
    compile_timer: CompileTimer | None = None  # times a compiled run's first steps (its compile time)
    poisoned: dict[int, str] = field(default_factory=dict)  # steps a test makes fail: {step: "nan" or "overflow"}
    probe: Probe | None = None  # read at every evaluation (tinylm/probe.py); None: train.probe=none, or not rank 0

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.cfg)


def tokens_per_step(cfg: Config) -> int:
    """The global batch: train.batch_size x train.grad_accum windows of model.block_size tokens."""
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size


# ---------------------------------------------------------------- starting


def start(cfg: Config, d: distributed.Dist, run_dir: str | Path | None, resume: bool, console: Console,
          name: str, held: contextlib.ExitStack, texts: Sequence[str] | None = None) -> tuple[Training, LoopState]:
    """Set a run up: its directory (locked in `held`), data, model, optimizer and logs, and the state
    its loop starts from (a resumed run's as its checkpoint left it). `texts`: strings held in memory
    that make up the corpus with cfg.data.paths (tinylm.prepare)."""
    t = cfg.train
    dtype = autocast_dtype(t.dtype, d.device)
    if dtype == torch.float16 and d.strategy == "fsdp":  # each process would see only its shard's overflows
        raise UserError(f"float16 training (train.dtype={t.dtype} on {d.device.type}) needs loss scaling, which "
                        "tinylm does with DDP only; use train.strategy=ddp, or train.dtype=float32")
    seed_everything(t.seed)
    memory.check(cfg, d.device)  # before anything is written: a run that cannot fit leaves no folder behind
    if run_dir is not None:
        d.on_main(lambda: rundir.claim(run_dir, resume))  # new, empty or a run: never a folder of the user's
    run_dir = Path(run_dir) if run_dir is not None else d.from_main(rundir.new_dir(name) if d.main else None)
    d.on_main(lambda: held.enter_context(rundir.lock(run_dir)))  # one trainer per run directory
    previous = rundir.resume(run_dir, cfg, texts=texts is not None) if resume else None
    if previous is None:
        rundir.refuse_overwrite(run_dir)

    prep, pretrained = prepare_data(cfg, d, console, texts)
    plan_run(cfg, d, prep, dtype, console, resumed=previous is not None)
    check_window("training", prep.meta["train_tokens"], cfg.model.block_size)
    check_window("validation", prep.meta["val_tokens"], cfg.model.block_size)
    data_id = fingerprint(prep)
    if previous is not None:
        previous.check_data(data_id)
        for change in previous.changes():
            console.say(f"resume: {change}")
        d.on_main(lambda: rundir.remove_stale_temps(run_dir))
    tokenizer_file = prep.dir / "tokenizer.json"  # the data cache's (data.fingerprint hashes the same file)
    data = {**prep.meta, "cache": str(prep.dir), rundir.IN_MEMORY: texts is not None}
    vocab_size = pretrained.vocab_size if pretrained else prep.tokenizer.vocab_size
    model, table, summary = build_model(cfg, d, vocab_size, pretrained if previous is None else None, console)
    inspect = d.main and d.strategy != "fsdp"  # FSDP: each process holds a shard of each tensor
    probe = make_probe(t.probe, prep.tokenizer, prep.val, cfg.model.block_size) if inspect else None
    tracked, note = track.choose(t.track, model, t.seed) if inspect else ([], "")
    # Written once train.probe and train.track are known to fit the model: a bad one leaves no run behind.
    d.on_main(lambda: rundir.write_files(run_dir, cfg, tokenizer_file, data))
    timings.choose_attention(model, cfg.model, t.batch_size, d.device, dtype, console.say)
    optimizer = make_optimizer(model, t, d.device, dtype)
    console.say(describe_optimizer(optimizer, t))
    state = LoopState(torch.Generator().manual_seed(t.seed))
    if previous is not None:
        restore(state, previous, d, model, optimizer)
        console.say(f"resumed {run_dir} at step {state.step}")
    compiled, why = compile_choice(t.compile, d.device, t.max_time, cfg.model, dtype)
    learner = make_learner(model, optimizer, d, dtype, compiled)
    if previous is not None and learner.scaler is not None and "scaler" in previous.state:
        learner.scaler.load_state_dict(previous.state["scaler"])  # the loss scale where it was
    if d.world > 1:
        console.say(d.describe(t, cfg.model.block_size))
    precision = f"{speed.dtype_name(dtype)} autocast" if dtype else "float32"
    console.say(f"device {d.device}, {precision}{' with loss scaling' if learner.scaler else ''}, "
                f"{tokens_per_step(cfg):,} tokens per step, up to {t.max_steps:,} steps"
                + (f" or {t.max_time:g} s" if t.max_time else "") + f"; torch.compile {why}")
    flops = speed.flops_per_token(cfg.model, vocab_size)
    peak = d.on_main(lambda: speed.device_peak(d.device, dtype))  # rank 0 logs MFU: only it times a CPU
    console.say(speed.describe(flops, peak, d.device))

    # On resume, TensorBoard drops what a killed process logged after its checkpoint (purge_step).
    purge_step = state.step + 1 if previous is not None else None
    writer = (tblog.TolerantWriter(lambda: tblog.open_writer(run_dir, cfg, table, summary, environment(), purge_step),
                                   console.say) if d.main else distributed.NullWriter())
    if peak is not None:  # MFU's denominator, beside it (speed/mfu_percent)
        writer.add_scalar("speed/peak_tflops", peak.flops / 1e12, state.step)
    if inspect:
        tblog.watch_updates(optimizer, model, writer, lambda: state.step + 1, t.log_interval)  # update/weight ratios
        if tracked:  # a few single numbers, their gradients and moments (track/)
            console.say(note or track.describe(tracked))
            track.watch(optimizer, model, writer, tracked, lambda: state.step + 1, t.log_interval)
    saver = checkpoint.Saver(run_dir / rundir.CHECKPOINT, state.step if previous is not None else None, console.say)
    blowup = guard.BlowUpGuard(t.max_bad_steps, d.device, optimizer, console.say, learner.scaler)
    timer = CompileTimer(cfg.model, dtype, d.device, keep=d.main) if compiled else None
    faults = {**dict.fromkeys(guard.injected_steps("TINYLM_TEST_NAN_STEPS"), "nan"),
              **dict.fromkeys(guard.injected_steps("TINYLM_TEST_OVERFLOW_STEPS"), "overflow")}
    training = Training(cfg, d, run_dir, console, prep, vocab_size, data_id, learner, summary, saver, writer,
                        blowup, inspect, flops, peak, prep.tokenizer.identity(), timer, faults, probe)
    return training, state


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def prepare_data(cfg: Config, d: distributed.Dist, console: Console,
                 texts: Sequence[str] | None = None) -> tuple[Prepared, Any]:
    """The prepared data of cfg.data and `texts` (and the pretrained model it is tokenized for, with
    train.init_from, else None); the model's shape then is the pretrained one's (cfg.model is replaced)."""
    pretrained = None
    if cfg.train.init_from:  # fine-tuning: the shape, weights and tokenizer come from a GPT-2 or Llama folder
        from tinylm.hf import read_pretrained

        pretrained = read_pretrained(cfg.train.init_from)
        cfg.model = pretrained.fit(cfg.model)
    tokenizer = pretrained.tokenizer if pretrained else None
    prep = d.first_on_each_node(lambda: prepare(cfg.data, tokenizer=tokenizer, texts=texts))
    meta = prep.meta
    if prep.note:
        console.say(f"data: {prep.note}")
    console.say(
        f"data: {'reused' if prep.reused else 'prepared'} {prep.dir} | {prep.tokenizer.kind} tokenizer, "
        f"vocab {prep.tokenizer.vocab_size:,} | train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens"
    )
    return prep, pretrained


def plan_run(cfg: Config, d: distributed.Dist, prep: Prepared, dtype: torch.dtype | None, console: Console,
             resumed: bool) -> None:
    """Set what train.plan=auto plans (tinylm/plan.py) and the user left unset, and say so in `plan:`
    lines. A resumed run keeps the settings its config.yaml recorded, planned ones included."""
    t = cfg.train
    if d.world == 1:
        timings.choose_threads(d.device, dtype, console.say)
    if t.plan == "off" or resumed or t.init_from:
        return
    if d.world > 1:  # each process would time its own share of the machine, and might plan differently
        console.say("plan: off with several processes (torchrun): the settings are the config's")
        return
    corpus, kind, vocab = prep.meta["train_tokens"], prep.tokenizer.kind, prep.tokenizer.vocab_size
    own_shape = any(key in cfg.explicit for key in plan.OWN_SHAPE)
    speeds, overhead = None, plan.Overhead.of(t.evals, t.eval_batches, t.sample_tokens)
    if t.max_time and own_shape:
        speeds = {"own": timings.speed(cfg.model, t.batch_size, vocab, d.device, dtype)[0]}
    elif t.max_time:
        speeds = timings.ladder_speeds(t.max_time, corpus, kind, vocab, d.device, dtype, console.say, overhead)
    fits = min(corpus, prep.meta["val_tokens"]) - 1  # the longest context both splits hold a window of
    p = plan.plan(t.max_time, t.max_steps, corpus, kind, speeds, cfg.explicit, tokens_per_step(cfg), fits, overhead)
    for key, value in p.values.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    config_.validate(cfg)
    for line in p.lines:
        console.say(line)


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
    state.step, state.tokens = saved["step"], saved["tokens"]
    state.elapsed, state.best_val = saved["elapsed"], saved["best_val"]
    state.saved_at = state.elapsed
