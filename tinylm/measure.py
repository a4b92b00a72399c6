"""This machine's identity, and timings of it made once and kept.

Some choices depend on the hardware more than on anything a user sets: whether attention is faster in
bfloat16 or float32 on this CPU, how many tokens per second each model shape trains at, what the matrix
units can do. Machines of one kind differ (a CPU with AMX multiplies bf16 matrices about 6x faster than
fp32, one with only AVX-512 BF16 about 2x, one with neither not at all), so tinylm decides such things by
timing the candidates on the machine at hand, the first time they are needed, and keeps the result:

    value, cached = measure.cached("attention", {"shape": [16, 6, 256, 64]}, lambda: time_both())

and a figure that only a run can observe (how long torch.compile took) is kept with `store` and read
back with `lookup`.

A result is filed under what it measured (its name and parameters) and under this machine's identity
(`machine()`: the CPU's model and the features that matter for matrix work, the GPU, the thread count,
the torch version), so a different machine, another thread count or a new torch measures afresh.

The file is `measurements.json` in $TINYLM_CACHE_DIR, else $XDG_CACHE_HOME/tinylm, else ~/.cache/tinylm.
It is a cache and nothing else: one that cannot be read is measured again, one that cannot be written
costs the same measurement next time, and deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# The CPU features that decide how fast matrix products and their precisions run (x86 and Arm names as
# /proc/cpuinfo spells them). Everything else in the flags line (sse, cx16, ...) never changes a choice.
MATRIX_FEATURES = (
    "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_fp16",
    "asimd", "sve", "sve2", "bf16", "i8mm",
)
FILE = "measurements.json"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: they are alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def cpu_name() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_features() -> tuple[str, ...]:
    """The matrix-relevant features of this CPU, in MATRIX_FEATURES order (x86 'flags', Arm 'Features')."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return tuple(f for f in MATRIX_FEATURES if f in flags)


def gpu_name() -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)', or '' without a CUDA GPU."""
    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def machine() -> dict[str, str]:
    """What a timing on this machine depends on; also what every benchmark table prints about it."""
    return {
        "cpu": cpu_name(),
        "cpu_features": " ".join(cpu_features()) or "none",
        "cpu_threads": str(torch.get_num_threads()),
        "gpu": gpu_name() or "none",
        "torch": str(torch.__version__),
    }


def cache_path() -> Path:
    root = os.environ.get("TINYLM_CACHE_DIR")
    if root:
        return Path(root) / FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tinylm" / FILE


def key(name: str, params: dict[str, Any]) -> str:
    """The entry of a measurement: its name and parameters on this machine, as one short hash."""
    text = json.dumps({"name": name, "params": params, "machine": machine()}, sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _read(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(path: Path, entries: dict[str, Any]) -> None:
    """Replace the file atomically (a concurrent reader sees the old file or the new, never half)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if "tmp" in locals():
            Path(tmp).unlink(missing_ok=True)


def lookup(name: str, params: dict[str, Any]) -> Any | None:
    """This machine's measurement of (name, params), or None if it has none yet."""
    entry = _read(cache_path()).get(key(name, params))
    return entry["value"] if isinstance(entry, dict) and "value" in entry else None


def store(name: str, params: dict[str, Any], value: Any) -> None:
    """Keep a measurement (plain JSON data) made on this machine, replacing an earlier one: for figures
    that only something else can measure, such as the compile time a run observes."""
    path = cache_path()
    entries = _read(path)  # read just before writing: another process may have added entries
    entries[key(name, params)] = {"value": value, "name": name, "params": params, "machine": machine(),
                                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(path, entries)


def forget(name: str) -> int:
    """Drop this machine's measurements called `name` (every parameter set); returns how many there were."""
    path = cache_path()
    entries, here = _read(path), machine()
    stale = [k for k, e in entries.items() if isinstance(e, dict) and e.get("name") == name and e.get("machine") == here]
    if stale:
        _write(path, {k: e for k, e in entries.items() if k not in stale})
    return len(stale)


def cached(name: str, params: dict[str, Any], measure: Callable[[], Any]) -> tuple[Any, bool]:
    """(the measurement, whether it came from the cache): measure() runs only if this machine has no
    entry for (name, params) yet. Its result must be plain JSON data."""
    value = lookup(name, params)
    if value is not None:
        return value, True
    value = measure()
    store(name, params, value)
    return value, False


def best_time(fn: Callable[[], Any], seconds: float = 0.2, warmup: int = 1, device: torch.device | None = None) -> float:
    """The fastest of repeated calls of fn, in seconds, after `warmup` untimed ones, repeating for about
    `seconds` (at least three timed calls). The best, not the mean: a shared machine only ever makes a
    call slower, so the fastest is the closest to what the hardware does."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    best, calls, deadline = float("inf"), 0, time.perf_counter() + seconds
    while calls < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best
