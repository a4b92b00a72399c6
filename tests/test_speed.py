"""tinylm.speed: FLOPs per token by hand, the GPU datasheet table, the CPU's measured peak, and the MFU a
run logs."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm import measure, speed
from tinylm.config import ModelConfig


def test_flops_per_token_by_hand():
    gpt2 = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, pos="learned", norm="layernorm", mlp="gelu")
    # per block: qkv 3C^2 + proj C^2 + fc 4C^2 + proj 4C^2 = 12 C^2; head V*C; attention 12 * L * C * T
    assert speed.flops_per_token(gpt2, 65) == 6 * (4 * 12 * 128**2 + 65 * 128) + 12 * 4 * 128 * 64
    swiglu = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, mlp="swiglu")  # 3 matrices of 384
    assert speed.flops_per_token(swiglu, 65) == 6 * (4 * (4 * 128**2 + 3 * 128 * 384) + 65 * 128) + 12 * 4 * 128 * 64
    # Grouped-query attention, 1 key/value head of 32: qkv is 128 x (128 + 2 * 32), the rest as before.
    gqa = ModelConfig(n_layer=4, n_head=4, n_kv_head=1, n_embd=128, block_size=64, mlp="swiglu")
    assert speed.flops_per_token(gqa, 65) == 6 * (4 * (128 * 192 + 128**2 + 3 * 128 * 384) + 65 * 128) + 12 * 4 * 128 * 64


def test_every_weight_matrix_is_counted_once_per_token():
    """6 FLOPs per weight of every matrix product: the model's matrices (biases, norms and the embedding
    lookup excluded, the output head included) counted from the built model, not from a formula."""
    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, block_size=32, tie_embeddings=False)
    from tinylm.model import GPT

    with torch.device("meta"):
        model = GPT(cfg, 100)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n)
    assert speed.flops_per_token(cfg, 100) == 6 * matrices + 12 * 3 * 64 * 32


@pytest.mark.parametrize("name, dtype, tflops, label", [
    ("Tesla T4", torch.float16, 65.0, "T4"),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0, "A100"),
    ("NVIDIA A100 80GB PCIe", None, 19.5, "A100"),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4, "H100 SXM"),
    ("NVIDIA H100 PCIe", torch.float16, 756.5, "H100 PCIe"),
    ("NVIDIA H200", torch.bfloat16, 989.4, "H200 SXM"),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.4, "GH200"),
    ("NVIDIA L4", torch.bfloat16, 121.0, "L4"),
    ("NVIDIA L40S", torch.bfloat16, 362.05, "L40S"),
    ("NVIDIA A10", torch.bfloat16, 125.0, "A10"),
    ("Tesla V100-SXM2-16GB", torch.float16, 125.0, "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", torch.float16, 112.0, "V100 PCIe"),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2, "GeForce RTX 4090"),
    ("NVIDIA GeForce RTX 3090", torch.float16, 71.0, "GeForce RTX 3090"),
])
def test_known_gpus_get_their_datasheet_peak(name, dtype, tflops, label):
    peak = speed.gpu_peak(name, dtype)
    assert peak.flops == pytest.approx(tflops * 1e12) and peak.source.startswith(f"datasheet: {label},")


@pytest.mark.parametrize("name, dtype", [
    ("NVIDIA A10G", torch.bfloat16),  # AWS's A10 variant: no public datasheet, so no guess
    ("NVIDIA GeForce RTX 4090 Laptop GPU", torch.bfloat16),
    ("NVIDIA RTX A6000", torch.bfloat16),
    ("Tesla T4", torch.bfloat16),  # no bf16 tensor cores: emulated, no peak worth the name
    ("Tesla V100-SXM2-32GB", torch.bfloat16),
])
def test_unknown_gpus_and_precisions_have_no_peak(name, dtype):
    assert speed.gpu_peak(name, dtype) is None


def test_tf32_is_half_the_bf16_rate_and_only_where_there_are_tensor_cores():
    assert speed.gpu_peak("NVIDIA A100-SXM4-40GB", None, tf32=True).flops == pytest.approx(156e12)
    assert speed.gpu_peak("Tesla T4", None, tf32=True).flops == pytest.approx(8.1e12)  # plain fp32


def test_an_unknown_gpu_says_mfu_is_not_known(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    line = speed.describe(1e9, speed.device_peak(torch.device("cuda"), torch.bfloat16), torch.device("cuda"))
    assert "MFU not known" in line and "NVIDIA A10G" in line


def test_the_cpu_peak_is_the_best_of_its_first_timings_then_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    rates = iter([3e9, 9e9, 5e9, 99e9])  # a busy machine times low: the best of the first three is kept
    monkeypatch.setattr(speed, "matmul_flops", lambda *a, **k: next(rates))
    peaks = [speed.cpu_peak(torch.bfloat16) for _ in range(5)]
    assert [p.flops for p in peaks] == [3e9, 9e9, 9e9, 9e9, 9e9]
    assert peaks[0].source == "measured: this CPU's bfloat16 matrix products, timed on this machine"
    assert peaks[-1].source.endswith("the best of 3 timings on this machine")
    assert next(rates) == 99e9  # the fourth and fifth runs timed nothing
    assert measure.lookup("matmul_peak", {"dtype": "bfloat16", "device": "cpu"}) == {"flops": 9e9, "timings": 3}


def test_a_real_cpu_timing_is_a_plausible_rate():
    assert 1e8 < speed.matmul_flops(torch.float32, torch.device("cpu"), seconds=0.1) < 1e14


def test_matmul_flops_is_the_best_rate_of_the_products_it_times(monkeypatch):
    """Each size's rate is 2 n^3 over its best time, and sizes stop doubling once a product is slow."""
    times = {256: 0.001, 512: 0.004, 1024: 0.05}
    monkeypatch.setattr(measure, "best_time", lambda fn, seconds, device=None: times[len(fn())])
    assert speed.matmul_flops(torch.float32, torch.device("cpu"), seconds=0.3) == 2 * 512**3 / 0.004


def test_a_run_logs_tokens_per_second_and_mfu_against_the_measured_peak(trained_run):
    acc = EventAccumulator(trained_run["run_dir"]).Reload()
    rates = {e.step: e.value for e in acc.Scalars("speed/tokens_per_sec")}
    mfu = {e.step: e.value for e in acc.Scalars("speed/mfu_percent")}
    assert rates.keys() == mfu.keys() and len(rates) > 5
    flops = speed.flops_per_token(trained_run["cfg"].model, trained_run["model"].vocab_size)
    (peak,) = [e.value * 1e12 for e in acc.Scalars("speed/peak_tflops")]  # the run's measured CPU peak
    for step, rate in rates.items():
        assert mfu[step] == pytest.approx(100 * rate * flops / peak, rel=1e-5)


def test_docs_hardware_shows_the_table_of_peaks():
    from conftest import ROOT

    page = (ROOT / "docs" / "hardware.md").read_text()
    show = lambda x: "-" if x is None else f"{x}"  # noqa: E731
    for _, label, bf16, fp16, fp32 in speed.GPU_PEAKS:
        assert f"| {label} | {show(bf16)} | {show(fp16)} | {fp32} |" in page, label
