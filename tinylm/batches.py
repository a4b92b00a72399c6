"""Training batches: random windows of prepared token ids (tinylm.prepare), inputs and targets shifted by one.

The starts are drawn apart from reading the windows, so that every process of a distributed run draws
the whole global batch alike (one seeded generator, saved in checkpoints) and reads only its share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tinylm.errors import UserError

if TYPE_CHECKING:
    import torch


def check_window(split_name: str, n_tokens: int, block_size: int) -> None:
    if n_tokens < block_size + 1:
        raise UserError(
            f"the {split_name} split has {n_tokens} tokens, fewer than one training window "
            f"(model.block_size + 1 = {block_size + 1}); use more text or a smaller model.block_size"
        )


def get_batch(
    ids: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size + 1` tokens: inputs and the same shifted by one."""
    return batch_windows(ids, batch_starts(len(ids), batch_size, block_size, gen), block_size, device)


def batch_starts(n_ids: int, batch_size: int, block_size: int, gen: torch.Generator) -> list[int]:
    """Where `batch_size` random windows of `block_size + 1` tokens start, among `n_ids` token ids."""
    import torch  # here, not at the top: preparing data needs no torch (and its 200 MB)

    return torch.randint(n_ids - block_size, (batch_size,), generator=gen).tolist()


def batch_windows(
    ids: np.ndarray, starts: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `block_size + 1` tokens at `starts`: inputs and the same shifted by one."""
    import torch

    windows = torch.from_numpy(np.stack([ids[s : s + block_size + 1] for s in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]
