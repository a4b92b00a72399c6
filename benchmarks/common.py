"""What every benchmark shares: the two recipes, the machine's matrix peak, a trainer that
takes the training loop's own step (tinylm.step.train_step, blow-up guard included; without the loop's
logging, evaluations and checkpoints), and the loss over the whole validation split.

Nothing here prints; `benchmarks/run.py` runs the benchmarks and prints their table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm import config as config_
from tinylm.config import Config
from tinylm.distributed import Dist
from tinylm.guard import BlowUpGuard
from tinylm.hardware import autocast, autocast_dtype, compile_choice, pick_device
from tinylm.model import GPT
from tinylm.optim import learning_rate, make_optimizer, progress
from tinylm.prepare import Prepared, prepare
from tinylm.speed import matmul_flops
from tinylm.step import draw_batches, make_learner, train_step

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPES = ("baseline", "tuned")
# The two fixed shapes: (n_layer, n_head, n_embd, block_size, batch_size).
SHAPES = {"tiny": (4, 4, 128, 64, 12), "6L": (6, 6, 384, 256, 16)}


def recipe(name: str, corpus: Path, cache_dir: str, overrides: dict[str, Any] | None = None) -> Config:
    """'baseline' is configs/baseline.yaml (nanoGPT's CPU recipe); 'tuned' is tinylm's defaults.

    Both read `corpus` as characters, like nanoGPT's shakespeare_char; `overrides` are
    {"section.field": value} on top (a shape, a budget, one lever).
    """
    path = REPO / "configs" / "baseline.yaml" if name == "baseline" else None
    cfg = config_.load(path)
    config_.apply(cfg, {"data.paths": [str(corpus)], "data.tokenizer": "char", "data.cache_dir": cache_dir})
    # Dropout regularises, it is no speed lever: both recipes train without it, as nanoGPT's baseline does
    # (the default's 0.1 is for its small built-in corpus; configs/shakespeare_char_cpu.yaml has 0 too).
    config_.apply(cfg, {"model.dropout": 0.0})
    config_.apply(cfg, overrides or {})
    return config_.validate(cfg)


def shape_overrides(shape: str) -> dict[str, Any]:
    n_layer, n_head, n_embd, block, batch = SHAPES[shape]
    return {"model.n_layer": n_layer, "model.n_head": n_head, "model.n_embd": n_embd,
            "model.block_size": block, "train.batch_size": batch, "train.grad_accum": 1}


def data(cfg: Config) -> Prepared:
    return prepare(cfg.data)


# ---------------------------------------------------------------- the machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 3.0) -> float:
    """Best FLOP/s of large square matrix products in `dtype` (tinylm.speed.matmul_flops, timed longer
    and up to larger sizes than a training run's quick measurement): this machine's practical ceiling."""
    return matmul_flops(dtype, device, seconds, largest=8192 if device.type == "cuda" else 4096)


# ---------------------------------------------------------------- training


@dataclass
class Trainer:
    """A recipe's model, optimizer and batches; `step` is one step of the training loop (tinylm.step).

    `foreach_adamw=True` swaps in torch's default (multi-tensor, unfused) AdamW: what nanoGPT uses on a
    CPU, for the baseline and to measure the fused optimizer as a lever. As in the loop, a step whose
    loss or gradient is not finite is skipped, and train.max_bad_steps of them in a row raise
    tinylm.guard.Diverged.
    """

    cfg: Config
    prep: Prepared
    foreach_adamw: bool = False
    device: torch.device = field(init=False)
    steps: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        t, m = self.cfg.train, self.cfg.model
        self.device = pick_device(t.device)
        self.dtype = autocast_dtype(t.dtype, self.device)
        torch.manual_seed(t.seed)
        self.model = GPT(m, self.prep.tokenizer.vocab_size).to(self.device)
        optimizer = make_optimizer(self.model, t, self.device, self.dtype)
        if self.foreach_adamw and t.optimizer == "adamw":
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)
        self.compiled, _ = compile_choice(t.compile, self.device, t.max_time, m, self.dtype)
        self.learner = make_learner(self.model, optimizer, Dist(self.device), self.dtype, self.compiled)
        self.guard = BlowUpGuard(t.max_bad_steps, self.device, optimizer, lambda line: None, self.learner.scaler)
        self.batch_gen = torch.Generator().manual_seed(t.seed)
        self.tokens_per_step = t.batch_size * t.grad_accum * m.block_size

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    def step(self, lr: float) -> torch.Tensor:
        """One training step at learning rate lr; returns its mean loss (a tensor on the device)."""
        t = self.cfg.train
        block = self.cfg.model.block_size
        batches = draw_batches(self.prep.train, t, block, self.batch_gen, self.steps, self.learner.dist)
        loss, _ = train_step(self.learner, batches, lr, t.grad_clip, self.guard, number=self.steps + 1)
        self.steps += 1
        self.tokens += self.tokens_per_step
        return loss

    def lr_at(self, elapsed: float) -> float:
        t = self.cfg.train
        return learning_rate(self.steps, progress(self.steps, elapsed, t), t)


@torch.no_grad()
def full_val_loss(trainer: Trainer, batch: int = 32) -> float:
    """Mean next-token loss over the whole validation split, cut into windows of block_size tokens."""
    model, block, ids = trainer.model, trainer.cfg.model.block_size, trainer.prep.val
    n = (len(ids) - 1) // block
    starts = np.arange(n) * block
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        windows = np.stack([ids[s : s + block + 1] for s in starts[i : i + batch]]).astype(np.int64)
        w = torch.from_numpy(windows).to(trainer.device)
        with autocast(trainer.device, trainer.dtype):
            _, loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * len(w)
    model.train(was_training)
    return total / n


def fmt_seconds(s: float | None) -> str:
    return "not reached" if s is None or not math.isfinite(s) else f"{s:.1f} s"
