"""The machine a run trains on: which device, which autocast precision, and the record of both.

    device = pick_device("auto")              # CUDA, else Apple's MPS, else the CPU
    dtype = autocast_dtype("auto", device)    # bfloat16 where the hardware multiplies it fast, else None
    with autocast(device, dtype): ...         # matrix products in dtype; weights stay float32

`environment()` is what every run records (TensorBoard's text tab, each checkpoint) so that a result can
be put next to the versions and hardware that produced it.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from tinylm import __version__
from tinylm.errors import UserError


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`, or nothing at all for float32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def environment() -> dict[str, str]:
    """The versions and hardware of this process, as plain strings (a checkpoint's weights_only load reads them)."""
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
