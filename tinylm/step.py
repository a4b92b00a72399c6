"""One training step and one evaluation, as plain functions over explicit arguments.

The training loop (tinylm/loop.py), the benchmarks (benchmarks/common.py) and `tinylm explain`'s real
step all train with `train_step`, so what is measured and explained is what trains:

    learner = make_learner(model, optimizer, Dist(device), dtype, compile=False)
    batches = draw_batches(prep.train, cfg.train, block_size, batch_gen, step, learner.dist)
    loss, grad_norm = train_step(learner, batches, lr, cfg.train.grad_clip, guard, number=step + 1)

A step is gradient descent on one global batch: the forward pass of each micro-batch (in the autocast
precision), its backward pass (gradients summed over the micro-batches, so the step's gradient is that
of their mean loss), the gradient clipped to a norm of train.grad_clip, the optimizer's update (through
the blow-up guard, which skips an update whose loss or gradient is not finite), and the gradients
cleared. Several processes (tinylm/distributed.py) each run their share of the micro-batches.

In float16 (train.dtype=float16, or auto on a GPU without native bfloat16) small gradients would round
to zero in float16's narrow range, so the loss is multiplied by a large scale before the backward pass
(torch.amp.GradScaler) and the gradients divided by it again before anything reads them: clipping, the
guard's check and the optimizer (Muon's orthogonalisation included) all see the true gradients. A step
whose scaled gradients overflowed is skipped and the scale halved (tinylm/guard.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tinylm import distributed
from tinylm.batches import batch_starts, batch_windows
from tinylm.config import TrainConfig
from tinylm.guard import BlowUpGuard
from tinylm.hardware import autocast


@dataclass
class Learner:
    """What a training step moves, and how it calls it."""

    model: torch.nn.Module  # the parameters: clipped, stepped, saved (under FSDP this process's shards)
    core: torch.nn.Module  # the model as evaluated: compiled with train.compile
    forward: torch.nn.Module  # the model as trained: `core`, in DDP's wrapper when several processes train
    optimizer: torch.optim.Optimizer
    dist: distributed.Dist
    dtype: torch.dtype | None = None  # autocast's dtype; None trains in plain float32
    scaler: torch.amp.GradScaler | None = None  # float16's loss scaler (None in bfloat16 and float32)

    @property
    def device(self) -> torch.device:
        return self.dist.device


def make_learner(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: distributed.Dist,
                 dtype: torch.dtype | None, compile: bool) -> Learner:
    """A Learner for a model already on its device (or sharded, dist.place): compiled and wrapped as asked,
    with a loss scaler when it trains in float16."""
    core = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(dist.device.type) if dtype == torch.float16 else None
    return Learner(model, core, dist.wrap(core), optimizer, dist, dtype, scaler)


@dataclass
class MicroBatch:
    x: torch.Tensor  # (batch, block) input token ids
    y: torch.Tensor  # (batch, block) the next token of each
    seed: int | None = None  # torch's seed for this micro-batch's dropout; None leaves torch's generator as is
    # This process's share of the global batch's loss, against an equal share: 1 unless several processes
    # split a micro-batch's sequences unevenly (3 processes, 32 sequences: 11, 11 and 10 of them).
    weight: float = 1.0


def dropout_seed(seed: int, step: int, micro: int) -> int:
    """The random seed of a micro-batch's dropout: the same whichever process runs it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest(), "little")


def draw_batches(ids: np.ndarray, t: TrainConfig, block_size: int, gen: torch.Generator, step: int,
                 dist: distributed.Dist) -> list[MicroBatch]:
    """This process's micro-batches of step `step`. The global batch (train.grad_accum micro-batches of
    train.batch_size windows) is drawn alike in every process, which then reads only its share of it:
    whole micro-batches when they divide evenly among the processes, else its sequences of every one."""
    starts = [batch_starts(len(ids), t.batch_size, block_size, gen) for _ in range(t.grad_accum)]
    if dist.splits_micro_batches(t):
        return [MicroBatch(*batch_windows(ids, starts[j], block_size, dist.device), dropout_seed(t.seed, step, j))
                for j in range(dist.rank, t.grad_accum, dist.world)]
    # DDP averages the processes' gradients equally: a process with fewer sequences weighs its mean loss less,
    # so that the average is the mean over the whole global batch, as one process would take it.
    weight = len(range(dist.rank, t.batch_size, dist.world)) * dist.world / t.batch_size
    return [MicroBatch(*batch_windows(ids, starts[j][dist.rank :: dist.world], block_size, dist.device),
                       dropout_seed(t.seed, step, j), weight) for j in range(t.grad_accum)]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group at the schedule's rate (a Muon group scales it by its own lr_scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def overflow_gradients(loss: torch.Tensor) -> torch.Tensor:
    """loss, unchanged, whose gradient is inf: what a float16 overflow in the backward pass leaves
    (fault injection for tests)."""
    loss.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    return loss


def train_step(learner: Learner, batches: list[MicroBatch], lr: float, grad_clip: float,
               guard: BlowUpGuard | None = None, number: int = 0,
               poison: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on `batches`; returns (mean loss of the global batch, gradient norm before
    clipping), both still on the device (reading them is a host sync: the loop does so at its log interval).

    grad_clip 0 means no clipping. guard: the blow-up guard that makes the update (step `number`), or
    None for a plain optimizer.step(). poison (fault injection for tests): "nan" makes the loss NaN,
    "overflow" the gradients inf.
    """
    model, optimizer, dist, scaler = learner.model, learner.optimizer, learner.dist, learner.scaler
    set_learning_rate(optimizer, lr)
    step_loss = torch.zeros((), device=learner.device)
    for i, batch in enumerate(batches):
        if batch.seed is not None:
            torch.manual_seed(batch.seed)
        # DDP averages the gradients across processes in the last micro-batch's backward only.
        with dist.no_sync(learner.forward, last=i == len(batches) - 1):
            with autocast(learner.device, learner.dtype):
                _, loss = learner.forward(batch.x, batch.y)
            if poison == "nan":
                loss = loss * float("nan")
            share = (loss if batch.weight == 1 else loss * batch.weight) / len(batches)
            if poison == "overflow":
                share = overflow_gradients(share)
            (share if scaler is None else scaler.scale(share)).backward()
        step_loss += share.detach().float()
    # The global batch's mean loss, the same in every process, so the blow-up guard decides alike.
    loss = dist.average(step_loss)
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients from here on: clipping, the guard and the update see them
    grad_norm = distributed.plain(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    if guard is not None:
        guard.step(optimizer, loss, grad_norm, number)  # optimizer.step() unless not finite; the scaler's update
    elif scaler is not None:
        scaler.step(optimizer)  # skipped if the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: np.ndarray, t: TrainConfig, block_size: int, device: torch.device,
             dtype: torch.dtype | None, seed: int, d: distributed.Dist | None = None) -> float:
    """Mean loss over train.eval_batches windows drawn with `seed`: the same windows every time, so
    evaluations compare. Several processes share the windows out and average (FSDP needs each to run as
    many batches: a process short of one repeats its first, uncounted)."""
    d = d or distributed.Dist(device)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    starts = [batch_starts(len(ids), t.batch_size, block_size, gen) for _ in range(t.eval_batches)]
    mine = starts[d.rank :: d.world]
    total = torch.zeros((), device=device)
    for i in range(-(-t.eval_batches // d.world)):
        x, y = batch_windows(ids, mine[i] if i < len(mine) else starts[0], block_size, device)
        with autocast(device, dtype):
            _, loss = model(x, y)
        if i < len(mine):
            total += loss.float()
    model.train(was_training)
    return (d.average(total) * d.world / t.eval_batches).item()
