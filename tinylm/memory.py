"""Will a run fit? The memory a training run needs, against what the machine has, before anything starts.

`check` refuses, in one line and before a byte is written, a run whose settings cannot fit
(train.batch_size=1000000000, model.n_embd=1048576): without it such a run made its folder, prepared its
data and died minutes later in a `MemoryError` deep inside PyTorch.

The estimate is a lower bound, so that a run refused is a run that could not have trained: every weight
in float32 four times over (the weights, their gradients and AdamW's two moments; Muon keeps less, but
its matrices are the minority of the bytes only in tiny models), and the activations the backward pass
keeps, counted low: 16 bytes per token, layer and embedding dimension (a transformer block keeps
several tensors of that size, in float32 or half precision), plus the logits and their gradient
(2 x 4 bytes per token and vocabulary entry). What the machine has: on a CUDA GPU the free memory
torch reports, elsewhere the memory the OS says is available (MemAvailable plus free swap in
/proc/meminfo; without /proc, the physical memory os.sysconf reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from tinylm.config import Config
from tinylm.errors import UserError
from tinylm.speed import matrix_weights

GIB = 2**30


class Need(NamedTuple):
    weights: int  # bytes of the weights, their gradients and the optimizer's state
    activations: int  # bytes the forward pass keeps for the backward pass, and the logits
    vocab_size: int  # the vocabulary the estimate assumed

    @property
    def total(self) -> int:
        return self.weights + self.activations


def estimate(cfg: Config, vocab_size: int | None = None) -> Need:
    """A lower bound of the memory a training process of cfg needs. `vocab_size`: the tokenizer's, where
    known; else data.vocab_size for BPE and 256 for characters (a character corpus has at least a few dozen)."""
    m, t = cfg.model, cfg.train
    vocab = vocab_size or (cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256)
    weights = matrix_weights(m, vocab) + (0 if m.tie_embeddings else vocab * m.n_embd)
    tokens = t.batch_size * m.block_size  # one micro-batch: gradients accumulate, activations do not
    activations = tokens * (16 * m.n_layer * m.n_embd + 8 * vocab)
    return Need(16 * weights, activations, vocab)


def available(device: torch.device) -> int | None:
    """Bytes this process may still allocate on `device`, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check(cfg: Config, device: torch.device, vocab_size: int | None = None) -> None:
    """One line if a run of cfg on `device` cannot fit in its memory, naming what takes the most."""
    need, have = estimate(cfg, vocab_size), available(device)
    if have is None or need.total <= have:
        return
    m, t = cfg.model, cfg.train
    where = f"{device.type.upper()} memory" if device.type == "cuda" else "memory"
    if need.activations >= need.weights:
        what = (f"the activations of train.batch_size={t.batch_size:,} sequences of model.block_size={m.block_size:,} "
                f"tokens through model.n_layer={m.n_layer} layers of model.n_embd={m.n_embd:,} "
                f"(and a vocabulary of {need.vocab_size:,}) need {need.activations / GIB:,.1f} GiB")
        fix = "lower train.batch_size (raise train.grad_accum to keep the global batch) or model.block_size"
    else:
        what = (f"the model's weights, gradients and optimizer state (model.n_layer={m.n_layer}, "
                f"model.n_embd={m.n_embd:,}) need {need.weights / GIB:,.1f} GiB")
        fix = "make the model smaller (model.n_layer, model.n_embd)"
    raise UserError(f"this run cannot fit: {what}, at least {need.total / GIB:,.1f} GiB in all, and this machine "
                    f"has {have / GIB:,.1f} GiB of {where} available; {fix}")
