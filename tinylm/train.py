"""The training loop: batches -> forward/backward -> AdamW step -> evaluation -> checkpoint -> TensorBoard.

`train(cfg)` runs one training run into a run directory and returns its final figures; the command
line (`python train.py`, `tinylm train`) is a thin layer over it. Everything a run needs is in its run
directory: `config.yaml`, `tokenizer.json`, `data.json`, `checkpoint.pt` and TensorBoard event files.

A run survives its faults: checkpoints are written atomically (tinylm/checkpoint.py); SIGINT or SIGTERM
stops it at the end of a step with a checkpoint, and a step with a non-finite loss or gradient is
skipped (tinylm/guard.py); `resume=True` continues it exactly where its checkpoint left off (on the
same device and dtype, bit for bit, unless train.max_time shapes the learning-rate schedule).

Gradient descent here is the seed's w_new = w - lr * dL/dw, done by AdamW for millions of weights at
once. Weight decay (a pull of every weight towards zero) applies to weight matrices and embeddings
only: biases and LayerNorm gains are left undecayed, as GPT-2 and nanoGPT do, since shrinking an
offset or a per-channel scale towards zero does not make the model simpler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from tinylm import __version__, checkpoint, config as config_, distributed, guard, tblog
from tinylm.anatomy import describe_architecture, format_parameter_table, parameter_summary, parameter_table
from tinylm.batches import batch_starts, batch_windows, check_window
from tinylm.config import Config, TrainConfig
from tinylm.errors import UserError
from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.optim import Muon
from tinylm.prepare import Prepared, fingerprint, prepare

# ---------------------------------------------------------------- hardware


def pick_device(name: str) -> torch.device:
    """'auto' means the fastest thing present: CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but this torch build sees no CUDA GPU; use train.device=cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available here; use train.device=cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast matrix products to, or None for plain float32. Weights stay float32."""
    if setting == "float32":
        return None
    if setting == "bfloat16":
        if device.type == "mps":
            raise UserError("train.dtype=bfloat16 is not supported on MPS here; use float32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- optimisation


def learning_rate(step: int, progress: float, t: TrainConfig) -> float:
    """Linear warmup over the first `warmup_steps`, then cosine decay from lr to min_lr.

    `progress` in [0, 1] is how far the run is towards its end: steps over max_steps or, when a time
    limit comes first, seconds over max_time, so the decay finishes whichever limit stops the run.
    """
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm * (t.min_lr + (t.lr - t.min_lr) * cosine)


def progress(step: int, elapsed: float, t: TrainConfig) -> float:
    by_time = elapsed / t.max_time if t.max_time else 0.0
    return max(step / t.max_steps, by_time)


def make_optimizer(
    model: torch.nn.Module, t: TrainConfig, device: torch.device, dtype: torch.dtype | None = None
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (2-D tensors) only.

    With train.optimizer=muon the blocks' weight matrices (attention and MLP) move by Muon instead
    (tinylm.optim), at peak rate train.muon_lr and in `dtype`'s precision where that is bfloat16;
    embeddings, the output head, biases and norm gains stay with AdamW. Param groups: [0] decayed by
    AdamW, [1] not decayed, [2] Muon.
    """
    named = list(model.named_parameters())
    muon = [p for n, p in named if t.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    taken = {id(p) for p in muon}
    decay = [p for _, p in named if p.dim() >= 2 and id(p) not in taken]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # one kernel for all tensors: fewer passes over memory
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    groups.append({"params": muon, "muon": True, "weight_decay": t.weight_decay, "lr_scale": t.muon_lr / t.lr})
    return Muon(groups, lr=t.lr, betas=(t.beta1, t.beta2), ns_dtype=dtype or torch.float32, fused=fused)


def describe_optimizer(optimizer: torch.optim.Optimizer, t: TrainConfig) -> str:
    """One line per optimizer part: which tensors are decayed, which are not, which Muon moves."""
    count = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
    decayed = "embeddings" if len(count) > 2 else "matrices, embeddings"
    lines = [
        f"AdamW: weight decay {t.weight_decay} on {count[0]:,} weights ({decayed}); "
        f"none on {count[1]:,} biases and norm gains"
    ]
    if len(count) > 2:
        lines.append(
            f"Muon: {count[2]:,} weights in {len(optimizer.param_groups[2]['params'])} block matrices "
            f"(attention, MLP), peak lr {t.muon_lr}, weight decay {t.weight_decay}"
        )
    return "\n".join(lines)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: np.ndarray, t: TrainConfig, block: int, device, dtype, seed: int,
             d: distributed.Dist | None = None) -> float:
    """Mean loss over `eval_batches` windows; the same windows every time, so evaluations compare.
    Several processes share the windows out and average (FSDP needs each to run as many batches: a
    process short of one repeats its first, uncounted)."""
    d = d or distributed.Dist(device)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    starts = [batch_starts(len(ids), t.batch_size, block, gen) for _ in range(t.eval_batches)]
    mine = starts[d.rank :: d.world]
    total = torch.zeros((), device=device)
    for i in range(-(-t.eval_batches // d.world)):
        x, y = batch_windows(ids, mine[i] if i < len(mine) else starts[0], block, device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        if i < len(mine):
            total += loss.float()
    model.train(was_training)
    return (d.average(total) * d.world / t.eval_batches).item()


def dropout_seed(seed: int, step: int, micro: int) -> int:
    """The random seed of a micro-batch's dropout: the same whichever process runs it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest(), "little")


def sample_text(model: GPT, prep: Prepared, n_tokens: int, seed: int) -> str:
    tok = prep.tokenizer
    gen = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    ids = list(generate(model, [tok.eot_id], n_tokens, temperature=0.8, top_k=50, gen=gen))
    return tok.decode(ids)


# ---------------------------------------------------------------- run directory


def new_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if taken: a new run never overwrites an old one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def environment() -> dict[str, str]:
    env = {
        "tinylm": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion is not plain data: weights_only loads refuse it
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ---------------------------------------------------------------- the run


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    out: Callable[[str], None] = print,
    name: str = "default",
) -> dict[str, Any]:
    """Train per cfg into run_dir (a fresh runs/<name> if None); resume=True continues its checkpoint.
    Started by torchrun, this process is one of several (tinylm/distributed.py); only rank 0 writes."""
    d = distributed.setup(cfg.train, pick_device(cfg.train.device))
    try:
        with contextlib.ExitStack() as held:  # the run directory's lock, for as long as training runs
            result = _train(cfg, d, run_dir, resume, out if d.main else distributed.quiet, name, held)
        d.barrier()  # leave together: torchrun stops the other processes as soon as one has ended
        if d.world > 1:  # an FSDP model holds the process group, which must not outlive close()
            result.pop("model", None)
        return result
    finally:
        d.close()


def _train(cfg: Config, d: distributed.Dist, run_dir: str | Path | None, resume: bool,
           out: Callable[[str], None], name: str, held: contextlib.ExitStack) -> dict[str, Any]:
    t, m = cfg.train, cfg.model
    device = d.device
    dtype = autocast_dtype(t.dtype, device)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)

    run_dir = Path(run_dir) if run_dir is not None else d.from_main(new_run_dir(name) if d.main else None)
    d.on_main(lambda: held.enter_context(checkpoint.run_lock(run_dir)))  # one trainer per run directory
    ckpt_path = run_dir / checkpoint.CHECKPOINT
    if resume:
        state: dict[str, Any] | None = checkpoint.load(ckpt_path)
        changes = checkpoint.check_resume(state, cfg, ckpt_path)
    elif ckpt_path.exists():
        raise UserError(f"{run_dir} already holds a checkpoint; continue it with --resume {run_dir}, or pick another --run_dir")
    else:
        state = None

    pretrained = None
    if t.init_from:  # fine-tuning: the shape, weights and tokenizer come from a GPT-2 folder
        from tinylm.hf import read_pretrained

        pretrained = read_pretrained(t.init_from)
        cfg.model = m = pretrained.fit(m)
    prep = d.first_on_each_node(lambda: prepare(cfg.data, tokenizer=pretrained.tokenizer if pretrained else None))
    vocab_size = pretrained.vocab_size if pretrained else prep.tokenizer.vocab_size
    meta = prep.meta
    if prep.note:
        out(f"data: {prep.note}")
    out(
        f"data: {'reused' if prep.reused else 'prepared'} {prep.dir} | {prep.tokenizer.kind} tokenizer, "
        f"vocab {prep.tokenizer.vocab_size:,} | train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens"
    )
    check_window("training", meta["train_tokens"], m.block_size)
    check_window("validation", meta["val_tokens"], m.block_size)

    data_id = fingerprint(prep)
    if state is not None:
        checkpoint.check_resume_data(state, cfg, data_id, ckpt_path)
        for change in changes:
            out(f"resume: {change}")
        d.on_main(lambda: checkpoint.remove_stale_temps(run_dir))
    d.on_main(lambda: checkpoint.write_run_files(run_dir, config_.to_yaml(cfg), prep.dir / "tokenizer.json",
                                                 json.dumps({**meta, "cache": str(prep.dir)}, indent=2)))

    model = GPT(m, vocab_size)
    if pretrained is not None and state is None:
        try:
            model.load_state_dict(pretrained.state_for(m))
        except RuntimeError as e:  # tensors whose shapes config.json does not describe
            raise UserError(f"the weights in {t.init_from} do not match its config.json: "
                            f"{str(e).strip().splitlines()[-1].strip()}") from None
        out(f"initialised from {t.init_from}: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}")
    rows = parameter_table(model)
    summary = parameter_summary(rows)
    table = format_parameter_table(rows, m.n_layer, m.tie_embeddings)
    out(table)
    out(describe_architecture(m))
    model = d.place(model)  # on the device; with FSDP only this process's shard
    optimizer = make_optimizer(model, t, device, dtype)
    out(describe_optimizer(optimizer, t))
    step, tokens_seen, elapsed, best_val = 0, 0, 0.0, float("inf")
    batch_gen = torch.Generator().manual_seed(t.seed)  # the data-sampling position, saved in checkpoints
    if state is not None:
        checkpoint.restore(state, *d.loaders(model, optimizer), batch_gen, ckpt_path)
        step, tokens_seen, elapsed, best_val = state["step"], state["tokens"], state["elapsed"], state["best_val"]
        out(f"resumed {run_dir} at step {step}")
    core = torch.compile(model) if t.compile else model
    fwd = d.wrap(core)  # with DDP, the wrapper that averages gradients across processes

    tokens_per_step = t.batch_size * t.grad_accum * m.block_size
    if d.world > 1:
        out(d.describe(t, m.block_size))
    out(
        f"device {device}, {'bfloat16 autocast' if dtype else 'float32'}, "
        f"{tokens_per_step:,} tokens per step, up to {t.max_steps:,} steps"
        + (f" or {t.max_time:g} s" if t.max_time else "")
    )

    # On resume, TensorBoard drops what a killed process logged after its checkpoint (purge_step).
    say = tqdm.write if out is print else out  # lines printed while the progress bar is on screen
    writer = (tblog.TolerantWriter(lambda: _writer(run_dir, cfg, table, summary, purge_step=step + 1 if state is not None else None), say)
              if d.main else distributed.NullWriter())
    # Weight/bias histograms, update ratios and the projector read whole tensors: rank 0 only, and not
    # under FSDP, where each process holds a shard (the scalars and text are still logged).
    inspect = d.main and d.strategy != "fsdp"
    if inspect:
        tblog.watch_updates(optimizer, model, writer, lambda: step + 1, t.log_interval)  # update/weight ratios
    saver = checkpoint.Saver(ckpt_path, state["step"] if state is not None else None, say)
    blowup = guard.BlowUpGuard(t.max_bad_steps, device, optimizer, say)
    poisoned = guard.injected_nan_steps()

    def save(final: bool) -> None:
        if not d.all_true(guard.params_finite(model)):  # never replace a good checkpoint with broken weights
            raise guard.Diverged(f"training diverged: the weights hold inf or NaN at step {step}")
        weights, moments = d.full_state(model, optimizer)  # FSDP: gathered onto rank 0
        saved = d.on_main(lambda: saver.save(
            {
                "model": weights,
                "optimizer": moments,
                "step": step,
                "tokens": tokens_seen,
                "elapsed": elapsed,
                "best_val": best_val,
                "batch_rng": batch_gen.get_state(),
                "rng": checkpoint.rng_state(),
                "config": cfg.to_dict(),
                "vocab_size": vocab_size,
                "data": data_id,
                "environment": environment(),
            },
            final,
        ))
        saver.step = step if saved else saver.step  # other processes learn what rank 0 wrote

    def run_eval() -> dict[str, float]:
        nonlocal best_val
        val = evaluate(core, prep.val, t, m.block_size, device, dtype, t.seed + 1, d)
        train_loss = evaluate(core, prep.train, t, m.block_size, device, dtype, t.seed + 2, d)
        bpb = val * prep.tokens_per_byte / math.log(2)
        best_val = min(best_val, val)
        for tag, value in (("val/loss", val), ("val/ppl", math.exp(min(val, 50))), ("val/bpb", bpb), ("train/eval_loss", train_loss)):
            writer.add_scalar(tag, value, step)
        if inspect:
            tblog.log_histograms(writer, model, step)
        line = f"step {step}: val loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f}, {bpb:.3f} bits/byte), train loss {train_loss:.4f}"
        if t.sample_tokens:
            text = sample_text(model, prep, t.sample_tokens, t.seed)
            writer.add_text("samples", "```\n" + text + "\n```", step)
            line += "\n--- sample ---\n" + text.strip() + "\n--------------"
        say(line)
        writer.flush()
        return {"val_loss": val, "val_bpb": bpb, "train_loss": train_loss}

    figures: dict[str, float] = {}
    # From here on SIGINT/SIGTERM ask the loop to stop after its step.
    stop = guard.StopSignals(announce=d.main, repeat_stops=d.world == 1).install()
    bar = tqdm(total=t.max_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=out is not print, file=sys.stdout)
    try:
        if step == 0:
            figures = run_eval()
        model.train()
        started = time.perf_counter() - elapsed
        window_start, window_tokens = time.perf_counter(), 0
        while True:
            # Several processes stop at the same step, whichever got the signal, and follow one clock.
            signum, elapsed = d.agree(stop.signal, elapsed)
            if step >= t.max_steps or (t.max_time and elapsed >= t.max_time) or signum:
                break
            lr = learning_rate(step, progress(step, elapsed, t), t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The step's global batch is drawn alike in every process; each trains on its share of it.
            micro = [batch_starts(len(prep.train), t.batch_size, m.block_size, batch_gen) for _ in range(t.grad_accum)]
            mine = range(d.rank, t.grad_accum, d.world)
            step_loss = torch.zeros((), device=device)
            for j in mine:
                x, y = batch_windows(prep.train, micro[j], m.block_size, device)
                torch.manual_seed(dropout_seed(t.seed, step, j))
                with d.no_sync(fwd, last=j == mine[-1]):  # DDP averages gradients after the last one only
                    with autocast(device, dtype):
                        _, loss = fwd(x, y)
                    if step + 1 in poisoned:  # fault injection for tests (TINYLM_TEST_NAN_STEPS)
                        loss = loss * float("nan")
                    (loss / len(mine)).backward()
                step_loss += loss.detach().float() / len(mine)
            # The global batch's mean loss, the same in every process, so the blow-up guard decides alike.
            loss = d.average(step_loss)
            grad_norm = distributed.plain(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf")))
            blowup.step(optimizer, loss, grad_norm, step + 1)  # optimizer.step() unless not finite
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = time.perf_counter() - started
            bar.update(1)
            if step % t.log_interval == 0:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                loss_value = loss.item()  # the only host sync in the step, and only every log_interval
                blowup.poll()
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("lr", lr, step)
                writer.add_scalar("grad_norm", float(grad_norm), step)
                writer.add_scalar("tokens_per_sec", tps, step)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            if step % t.eval_interval == 0:
                blowup.poll()
                figures = run_eval()
                save(final=False)
                window_start = time.perf_counter()  # evaluation time is not training throughput
        blowup.poll()
        bar.close()
        elapsed = time.perf_counter() - started
        if signum:
            if saver.step != step:
                save(final=True)
            out(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in {ckpt_path}\n"
                f"  resume with: python train.py --resume {run_dir}")
            return {"run_dir": str(run_dir), "step": step, "interrupted": True, "signal": signum, **figures}
        if step % t.eval_interval:
            figures = run_eval()
        save(final=True)
        writer.add_scalar("time/elapsed_sec", elapsed, step)
        if inspect:
            tblog.log_embeddings(writer, model, prep.tokenizer, step)
    except guard.Diverged as e:
        if not d.main:  # every process decided alike; rank 0 says so
            raise SystemExit(2) from None
        raise UserError(f"{e}; {saver.kept()}; lower train.lr or raise train.warmup_steps, then resume with "
                        f"--resume {run_dir}") from None
    finally:
        stop.uninstall()
        bar.close()
        writer.close()
    out(
        f"done: {step} steps, {tokens_seen:,} tokens in {elapsed:.0f} s; val loss {figures.get('val_loss', float('nan')):.4f}\n"
        f"run saved in {run_dir}\n"
        f"  sample:      tinylm sample {run_dir} --prompt \"The\"\n"
        f"  tensorboard: tensorboard --logdir {run_dir.parent}"
    )
    return {"run_dir": str(run_dir), "step": step, "elapsed": elapsed, "tokens": tokens_seen,
            "parameters": summary["total"], "interrupted": False, "model": model, **figures}


def _writer(run_dir: Path, cfg: Config, table: str, summary: dict[str, int], purge_step: int | None = None):
    """A TensorBoard writer with the run's description logged once: config, parameters, hyperparameters.

    purge_step: TensorBoard hides what earlier writers logged at this step and later (a resumed run's
    killed predecessor may have logged steps past its checkpoint)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    import yaml

    # TensorBoard reads a run's event files in name order, and a name starts with the second it was made
    # in (then host, pid, a counter): a resumed run's file made in its predecessor's second could sort first.
    made = [int(m.group(1)) for p in run_dir.glob("events.out.tfevents.*") if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", p.name))]
    if made:  # at most a second: a file stamped in the future (a clock set back) must not hang the run
        time.sleep(max(0.0, min(1.0, max(made) + 1 - time.time())))
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    writer.add_text("parameters", table)
    writer.add_text("config", "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
    writer.add_text("environment", "\n".join(f"- {k}: {v}" for k, v in environment().items()))
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
