"""One training run in several processes: the pieces of PyTorch's distributed stack that the training
loop (tinylm/loop.py, tinylm/step.py) uses.

Launch with torchrun, which starts the processes and tells each its place in environment variables:

    torchrun --standalone --nproc_per_node=4 train.py --config configs/small.yaml        # one machine, 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 train.py ...                                      # two machines (node_rank 1 on the other)

`setup` reads RANK, WORLD_SIZE and LOCAL_RANK, starts the process group (NCCL between CUDA GPUs, gloo
between CPU processes) and returns a `Dist`; without torchrun (or with one process) it returns a `Dist`
for one process whose methods do nothing but hand their arguments back, so the single-process path of
the training loop stays exactly what it was.

What the loop needs from it, and why:

* `train.strategy=ddp` (the default): every process holds the whole model; DistributedDataParallel
  averages the gradients, skipping the all-reduce on all but the last micro-batch of a step (`no_sync`).
* `train.strategy=fsdp`: FSDP2 (`fully_shard`) splits parameters, gradients and optimizer state across
  the processes, each transformer block its own unit, so a model larger than one GPU trains. The token
  embedding, the tied output head, the position embedding and the final norm form the root unit: a
  tied matrix must live in one unit. Checkpoints hold full (unsharded) tensors gathered on rank 0, in
  the single-process format, so any number of processes (one included) resumes them.
* the global batch: `train.batch_size` sequences per micro-batch, `train.grad_accum` micro-batches per
  step, whatever the number of processes. When the micro-batches divide evenly among the processes,
  each runs grad_accum / world of them; otherwise (the defaults' single micro-batch on 2 GPUs) each
  runs every micro-batch on its share of the sequences, weighted so that the step's gradient is still
  the mean over the whole global batch: N processes train the model one process would.
* agreement: every process must take the same branch at the same step, or a collective waits forever.
  The loss the blow-up guard judges is averaged over the processes; a stop signal that reaches any
  process stops all of them at the same step; the clock the schedule and train.max_time follow is the
  slowest process's; a failed save or data preparation on one process is everyone's error.
* only rank 0 writes: the console (tinylm.console.QUIET elsewhere), TensorBoard (`NullWriter` elsewhere),
  run files and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tinylm.config import TrainConfig
from tinylm.errors import UserError

T = TypeVar("T")


class NullWriter:
    """Stands in for TensorBoard's SummaryWriter in processes other than rank 0: every call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class Dist:
    """Where this process stands in the run: rank, number of processes, device, strategy."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    backend: str = ""
    host_group: Any = None  # gloo group for agreeing on host-side values (NCCL only moves GPU tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def splits_micro_batches(self, t: TrainConfig) -> bool:
        """True when each process runs whole micro-batches; False when each runs its share of the sequences
        of every micro-batch (train.grad_accum is not a multiple of the number of processes)."""
        return t.grad_accum % self.world == 0

    def describe(self, t: TrainConfig, block_size: int) -> str:
        if self.splits_micro_batches(t):
            each = (f"each runs {t.grad_accum // self.world} of the step's {t.grad_accum} "
                    f"micro-batch{'es' if t.grad_accum > 1 else ''} of {t.batch_size} sequences")
        else:
            fewest, most = t.batch_size // self.world, -(-t.batch_size // self.world)
            share = f"{fewest}" if fewest == most else f"{fewest} or {most}"
            each = (f"each runs {share} of the {t.batch_size} sequences of each of the step's {t.grad_accum} "
                    f"micro-batch{'es' if t.grad_accum > 1 else ''}")
        return (f"{self.world} processes ({self.strategy.upper()} over {self.backend}): {each}; global batch "
                f"{t.batch_size} x {t.grad_accum} x {block_size} tokens, the same with any number of processes")

    # ------------------------------------------------------------ the model

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to this process's device; with FSDP, keep only this process's shard there."""
        if self.strategy != "fsdp":
            return model.to(self.device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in model.blocks:  # one unit per block: its weights are gathered just before it runs
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest, tied embedding and head together
        return model

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DDP's wrapper, which averages gradients in backward."""
        if self.strategy != "ddp":
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, fwd: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """DDP: no gradient all-reduce in a micro-batch's backward except the step's last. (FSDP reduces every
        micro-batch's gradients to their shards: skipping that would hold whole gradients, the memory FSDP saves.)"""
        if self.strategy == "ddp" and not last:
            return fwd.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------ agreeing

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of x over the processes (inf and NaN spread, so every process sees a blow-up)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        x = x.detach().float().clone()
        dist.all_reduce(x)
        return x / self.world

    def agree(self, signal: int, elapsed: float) -> tuple[int, float]:
        """(a stop signal any process received or 0, the slowest process's clock): one decision for all."""
        if self.world == 1:
            return signal, elapsed
        import torch.distributed as dist

        both = torch.tensor([float(signal), elapsed], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(both[0]), float(both[1])

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        x = torch.tensor([int(flag)])
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.host_group)
        return bool(x)

    def from_main(self, value: T) -> T:
        """Rank 0's value (a run directory name, a bool), in every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """fn() in rank 0 only, the others waiting; every process returns its result. A UserError from it is
        raised in rank 0, which reports it, while the others leave quietly with the same exit status."""
        if self.world == 1:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UserError as e:
                error = e
        result, failed = self.from_main((result, error is not None))
        if error is not None:
            raise error
        if failed:
            raise SystemExit(2)
        return result

    def first_on_each_node(self, fn: Callable[[], T]) -> T:
        """fn() in the first process of each machine, then in the others (which then find its work done,
        e.g. the prepared data cache). A UserError there is reported once and ends every process."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        if self.local_rank == 0:
            try:
                result = fn()
            except UserError as e:
                error = e
        failed = [False] * self.world
        dist.all_gather_object(failed, error is not None, group=self.host_group)
        if error is not None:
            raise error
        if any(failed):
            raise SystemExit(2)
        return fn() if self.local_rank != 0 else result

    # ------------------------------------------------------------ checkpoints

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state, optimizer state) in the single-process format. FSDP gathers the shards onto rank 0's
        CPU (every process must call this; the others get empty dicts)."""
        if self.strategy != "fsdp":
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        moments = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.main:
            return {}, {}
        # torch.distributed.checkpoint names parameters by their path; a single process numbers them
        # in param_groups order (what optimizer.state_dict() gives and load_state_dict expects).
        number = {name: i for i, name in enumerate(_names(model, optimizer))}
        return weights, {
            "state": {number[name]: s for name, s in moments["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in moments["param_groups"]],
        }

    def loaders(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Callable, Callable]:
        """Functions that load a full (single-process) model state and optimizer state into this process."""
        if self.strategy != "fsdp":
            return model.load_state_dict, optimizer.load_state_dict
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)

        def load_model(state: dict) -> None:
            set_model_state_dict(model, state, options=options)  # each process keeps its shard of each tensor

        def load_optimizer(state: dict) -> None:
            names = _names(model, optimizer)
            named = {
                "state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
            }
            set_optimizer_state_dict(model, optimizer, named, options=options)

        return load_model, load_optimizer

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.host_group)

    def close(self) -> None:
        """Destroy the process group once nothing holds it any more: a gloo group still alive while Python
        shuts down can abort the process ("terminate called without an active exception")."""
        if self.world > 1:
            import gc

            import torch.distributed as dist

            gc.collect()  # DDP's and FSDP's objects (in reference cycles) hold the group
            if dist.is_initialized():
                dist.destroy_process_group()


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter path of each optimizer parameter, in param_groups order (a tied matrix has its first name)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def plain(x: torch.Tensor) -> torch.Tensor:
    """An FSDP result (a DTensor, e.g. the gradient norm) as an ordinary tensor; others unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def setup(t: TrainConfig, device: torch.device) -> Dist:
    """This process's place in the run, from torchrun's environment; starts the process group if there
    are several processes. One-line errors for what cannot work, before anything is started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device)
    if t.grad_accum % world and t.batch_size < world:
        raise UserError(
            f"the global batch is train.batch_size x train.grad_accum = {t.batch_size} x {t.grad_accum} sequences, "
            f"and {world} processes can share neither its {t.grad_accum} micro-batches evenly nor the "
            f"{t.batch_size} sequences of each; set train.grad_accum to a multiple of {world}, or train.batch_size "
            f"to at least {world}")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"several processes train on CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}; "
                        "use train.device=cuda or cpu")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} of this machine has no GPU of its own "
                            f"({torch.cuda.device_count()} visible); start at most that many per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    strategy = "fsdp" if t.strategy == "fsdp" else "ddp"
    return Dist(device, rank, world, local_rank, strategy, backend, host_group)
