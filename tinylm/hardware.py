"""The machine a run trains on: which device, which autocast precision, whether to compile, and the
record of it all.

    device = pick_device("auto")              # CUDA, else Apple's MPS, else the CPU
    dtype = autocast_dtype("auto", device)    # bfloat16 where the hardware has it natively, float16 on
                                              # older GPUs (with loss scaling: tinylm/step.py), else None
    with autocast(device, dtype): ...         # matrix products in dtype; weights stay float32
    compile, why = compile_choice("auto", device, max_time, cfg.model, dtype)   # where it pays off

`environment()` is what every run records (TensorBoard's text tab, each checkpoint) so that a result can
be put next to the versions and hardware that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tinylm import __version__, measure
from tinylm.config import ModelConfig, check_device
from tinylm.errors import UserError


def pick_device(name: str, flag: str = "train.device") -> torch.device:
    """'auto' means the fastest thing present: CUDA, then Apple's MPS, then the CPU. `flag` is how the
    user named the device (train.device, or sample's --device), for the message when it is not here."""
    check_device(name, flag)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag}={name} but this torch build sees no CUDA GPU; use {flag}=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"{flag}={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0; use {flag}=cuda:0 or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{flag}=mps but MPS is not available here; use {flag}=cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16() -> bool:
    """True when this CUDA GPU multiplies bf16 in hardware (Ampere, sm_80, and later). torch's plain
    is_bf16_supported() also says True for older GPUs that only emulate it, slowly (a T4 or a V100):
    including_emulation=False asks for the hardware; a torch without that argument, the capability."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability()[0] >= 8


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast matrix products to, or None for plain float32. Weights stay float32.

    auto: bfloat16 on a GPU that has it natively, else float16 (which needs loss scaling, as the training
    step does); on a CPU bfloat16 where it has AVX-512 BF16 or AMX (float16 has no fast path on most
    CPUs), else float32; float32 on Apple's MPS."""
    if setting == "float32":
        return None
    if setting in ("bfloat16", "float16"):
        if device.type == "mps":
            raise UserError(f"train.dtype={setting} is not supported on MPS here; use float32")
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


# torch.compile's expected cost and gain until this machine has measured its own: a first compile of a
# small transformer takes tens of seconds (60 s is on the safe side), and a compiled training step runs
# 1.3x as fast (conservative: nanoGPT's GPT-2 small went from 250 to 135 ms an iteration on an A100).
# A compiled run stores the compile time it observed (`CompileTimer`) and benchmarks/gpu.py the
# speed-up it measured; later decisions on this machine use those (tinylm/measure.py).
COMPILE_SECONDS = 60.0
COMPILE_SPEEDUP = 1.3


def compile_key(m: ModelConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    """What a compile time depends on: the model's shape and architecture and the precision."""
    return {"model": dataclasses.asdict(m), "dtype": str(dtype)}


def compile_choice(setting: str, device: torch.device, max_time: float, m: ModelConfig,
                   dtype: torch.dtype | None) -> tuple[bool, str]:
    """Whether to torch.compile the model, and why, for the log.

    train.compile=true or false decides. auto: never on a CPU or MPS; on a CUDA GPU when the time saved
    within the run's budget, train.max_time * (1 - 1 / speed-up), exceeds the expected compile time
    (this machine's measurement for this model if it has one, else COMPILE_SECONDS), and always when
    the run has no time limit (it ends by steps, and runs without a clock are long ones)."""
    if setting != "auto":
        return setting == "true", f"{'on' if setting == 'true' else 'off'} (train.compile={setting})"
    if device.type != "cuda":
        return False, f"off on {device.type} (auto: compiling pays off on CUDA GPUs; train.compile=true forces it)"
    measured = measure.lookup("compile_seconds", compile_key(m, dtype))
    seconds = float(measured) if measured is not None else COMPILE_SECONDS
    speedup = float(measure.lookup("compile_speedup", {}) or COMPILE_SPEEDUP)
    expected = f"~{seconds:.0f} s to compile ({'measured on this machine' if measured is not None else 'a first guess'})"
    if not max_time:
        return True, f"on (auto: no time limit; {expected})"
    saved = max_time * (1 - 1 / speedup)
    if seconds < saved:
        return True, f"on (auto: {expected} against ~{saved:.0f} s saved at {speedup:.2g}x in {max_time:g} s)"
    return False, (f"off (auto: {expected} would not be repaid: ~{saved:.0f} s saved at {speedup:.2g}x in "
                   f"{max_time:g} s; train.compile=true forces it)")


class CompileTimer:
    """The compile time a compiled run observes: its first training step (which compiles) less its second,
    kept for the next compile_choice on this machine. `start()` and `stop()` around each step; stop()
    says True once it has kept its figure (then it is done)."""

    def __init__(self, m: ModelConfig, dtype: torch.dtype | None, device: torch.device, keep: bool = True):
        self.key, self.device, self.keep = compile_key(m, dtype), device, keep
        self.times: list[float] = []

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # twice per run: the steps' queued GPU work counts
        return time.perf_counter()

    def start(self) -> None:
        self.began = self._sync()

    def stop(self) -> bool:
        self.times.append(self._sync() - self.began)
        if len(self.times) < 2:
            return False
        if self.keep:  # one process of a distributed run keeps it
            measure.store("compile_seconds", self.key, round(max(0.0, self.times[0] - self.times[1]), 1))
        return True


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
