"""How fast a run trains against how fast its hardware could: FLOPs per token, the device's peak FLOP/s,
and their ratio, model FLOPs utilisation (MFU).

    flops = flops_per_token(cfg.model, vocab_size)   # training FLOPs per token, forward and backward
    peak = device_peak(device, dtype)                # a Peak (FLOP/s and where the figure comes from) or None
    mfu = tokens_per_s * flops / (peak.flops * processes)

A GPU's peak is its vendor's datasheet figure for dense matrix products in the run's precision (the
tensor cores' bf16 or fp16 rate; sparsity figures are twice these and never reached by a dense model),
from the table below. A GPU not in the table has no known peak, and the run says MFU is not known rather
than guess. A CPU has no datasheet figure worth the name (its clock, cores and matrix units vary too
much), so its peak is measured: the best rate of square matrix products in the run's precision on this
machine, timed at its first few runs and kept (tinylm/measure.py).

nanoGPT prints MFU against an A100's 312 TFLOP/s whatever the GPU; this knows the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tinylm import measure
from tinylm.config import ModelConfig


def matrix_weights(m: ModelConfig, vocab_size: int) -> int:
    """The weights of every matrix product, the output head included (an untied one's embedding is as large)."""
    C, H, K = m.n_embd, m.mlp_width, m.kv_heads * m.head_size
    per_block = C * (C + 2 * K) + C * C + (3 if m.mlp == "swiglu" else 2) * C * H
    return m.n_layer * per_block + vocab_size * C


def flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token, the usual way (PaLM's appendix B, nanoGPT's estimate_mfu): 6 per weight of
    every matrix product (2 forward, 4 backward), the output head included, plus the attention scores and
    their weighted sum, 12 * n_layer * n_embd * block_size (causal masking not discounted). A block's
    matrices: qkv C*(C + 2K) and proj C^2 (K = n_kv_head * head size: C unless grouped-query attention),
    and the MLP's 2 (3 for SwiGLU) matrices of C*H."""
    return 6 * matrix_weights(m, vocab_size) + 12 * m.n_layer * m.n_embd * m.block_size


# ---------------------------------------------------------------- GPUs: the vendors' figures

# Dense TFLOP/s from NVIDIA's datasheets and architecture whitepapers: (pattern of the name torch reports,
# name, bf16 tensor cores, fp16 tensor cores, fp32 without tensor cores). None: no such units (Turing and
# Volta have no bf16 tensor cores). GeForce cards: the rate with fp32 accumulation, which PyTorch uses.
# A name is matched in this order, so the more specific patterns come first.
GPU_PEAKS: list[tuple[str, str, float | None, float | None, float]] = [
    (r"\bGH200\b", "GH200", 989.4, 989.4, 67.0),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5, 835.5, 60.0),
    (r"\bH200\b", "H200 SXM", 989.4, 989.4, 67.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5, 835.5, 60.0),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", 756.5, 756.5, 51.0),
    (r"\bH100\b", "H100 SXM", 989.4, 989.4, 67.0),
    (r"\bA100\b", "A100", 312.0, 312.0, 19.5),
    (r"\bA40\b", "A40", 149.7, 149.7, 37.4),
    (r"\bA30\b", "A30", 165.0, 165.0, 10.3),
    (r"\bA10\b", "A10", 125.0, 125.0, 31.2),  # not the A10G (AWS's variant has no public datasheet)
    (r"\bL40S\b", "L40S", 362.05, 362.05, 91.6),
    (r"\bL40\b", "L40", 181.05, 181.05, 90.5),
    (r"\bL4\b", "L4", 121.0, 121.0, 30.3),
    (r"\bT4\b", "T4", None, 65.0, 8.1),
    (r"\bV100S\b", "V100S PCIe", None, 130.0, 16.4),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", None, 112.0, 14.0),
    (r"\bV100\b", "V100 SXM2", None, 125.0, 15.7),
    (r"\bRTX 4090$", "GeForce RTX 4090", 165.2, 165.2, 82.6),
    (r"\bRTX 3090$", "GeForce RTX 3090", 71.0, 71.0, 35.6),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # where the figure comes from, for the log: "datasheet: A100, bfloat16 tensor cores"


def gpu_peak(name: str, dtype: torch.dtype | None, tf32: bool = False) -> Peak | None:
    """The datasheet peak of the GPU torch calls `name` for matrix products in `dtype` (None: float32),
    or None where the GPU or its rate in that precision is not known. tf32: float32 matrix products run
    on TF32 tensor cores (torch.set_float32_matmul_precision below "highest"), at half the bf16 rate on
    every GPU here that has them."""
    key = re.sub(r"[-_]", " ", name.upper())
    row = next((row for row in GPU_PEAKS if re.search(row[0], key)), None)
    if row is None:
        return None
    _, label, bf16, fp16, fp32 = row
    if dtype is None:
        figure, what = ((bf16 / 2, "tf32 tensor cores") if tf32 and bf16 else (fp32, "float32"))
    else:
        figure, what = {torch.bfloat16: (bf16, "bfloat16 tensor cores"), torch.float16: (fp16, "float16 tensor cores")}[dtype]
    return Peak(figure * 1e12, f"datasheet: {label}, {what}") if figure else None


# ---------------------------------------------------------------- CPUs: measured


def matmul_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.3, largest: int = 4096) -> float:
    """The best FLOP/s of square matrix products in `dtype` on `device`: sizes from 256 doubling up to
    `largest`, each timed for seconds/3, until one product takes seconds/10 (a CPU without fast fp16
    multiplies about 1 GFLOP/s: a large product would take minutes)."""
    best, n = 0.0, 256
    gen = torch.Generator(device).manual_seed(0)  # not torch's own random state, which a run has seeded
    while True:
        a, b = (torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2))
        took = measure.best_time(lambda: a @ b, seconds=seconds / 3, device=device)
        best = max(best, 2 * n**3 / took)
        if took > seconds / 10 or n * 2 > largest:
            return best
        n *= 2


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


# A CPU's peak is timed at the first PEAK_TIMINGS runs on the machine and the best kept: a timing made
# while other programs compete for the cores comes out low (on a busy 2-core machine even 50x low), and
# a ceiling is never over-measured, so the best of a few is the figure and the later runs pay nothing.
PEAK_TIMINGS = 3


def cpu_peak(dtype: torch.dtype | None) -> Peak:
    """This CPU's matrix-product peak in `dtype`: the best of its first PEAK_TIMINGS timings on this
    machine (each a fraction of a second), kept in the measurement cache (tinylm/measure.py)."""
    name = dtype_name(dtype)
    params = {"dtype": name, "device": "cpu"}
    kept = measure.lookup("matmul_peak", params)
    if not (isinstance(kept, dict) and {"flops", "timings"} <= kept.keys()):
        kept = {"flops": 0.0, "timings": 0}
    if kept["timings"] < PEAK_TIMINGS:
        flops = matmul_flops(dtype or torch.float32, torch.device("cpu"))
        kept = {"flops": max(kept["flops"], flops), "timings": kept["timings"] + 1}
        measure.store("matmul_peak", params, kept)
    timings = f"the best of {kept['timings']} timings" if kept["timings"] > 1 else "timed"
    return Peak(kept["flops"], f"measured: this CPU's {name} matrix products, {timings} on this machine")


def device_peak(device: torch.device, dtype: torch.dtype | None) -> Peak | None:
    """The peak FLOP/s a run's matrix products can reach on `device` in `dtype`, or None if not known."""
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        return gpu_peak(torch.cuda.get_device_name(device), dtype, tf32)
    if device.type == "cpu":
        return cpu_peak(dtype)
    return None  # Apple's GPUs publish no such figures


def describe(flops: float, peak: Peak | None, device: torch.device) -> str:
    """The run's line about its speed accounting, e.g. "MFU against 312 TFLOP/s (datasheet: A100, ...)"."""
    per_token = f"{flops / 1e6:,.1f} MFLOP per token"
    if peak is None:
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"speed: {per_token}; MFU not known: no peak figure for {what} in tinylm.speed.GPU_PEAKS"
    return f"speed: {per_token}; MFU against a peak of {peak.flops / 1e12:,.3g} TFLOP/s ({peak.source})"
