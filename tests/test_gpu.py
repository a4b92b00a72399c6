"""What only a CUDA GPU can check: the device-side paths that the CPU tests reach only by construction.

Skipped without a GPU; `python -m pytest -m gpu` (benchmarks/gpu.py runs it) takes them, and
test_resume.py's guard test, on one. Only torch, numpy and tinylm are needed (no transformers, no
datasets: the GPU check's machine may lack them).
"""

import math

import pytest
import torch
from conftest import markov_text, tiny_config

from tinylm import guard, hardware, speed
from tinylm.config import ModelConfig
from tinylm.console import Console
from tinylm.model import GPT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "markov.txt"
    path.write_text(markov_text(30_000))
    return path


def test_auto_precision_follows_the_gpus_own_bf16(tmp_path):
    native = torch.cuda.get_device_capability()[0] >= 8  # Ampere (sm_80) and later
    assert hardware.autocast_dtype("auto", CUDA) == (torch.bfloat16 if native else torch.float16)


def test_the_datasheet_peak_is_a_ceiling_the_gpu_does_not_pass():
    dtype = torch.bfloat16 if hardware.cuda_has_native_bf16() else torch.float16
    peak = speed.device_peak(CUDA, dtype)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in tinylm.speed.GPU_PEAKS")
    measured = speed.matmul_flops(dtype, CUDA, seconds=1.0, largest=8192)
    assert 0.3 * peak.flops < measured < 1.05 * peak.flops, (measured, peak)


def test_a_run_learns_on_the_gpu_in_its_auto_precision(tmp_path, corpus):
    cfg = tiny_config(tmp_path, [corpus], data={"tokenizer": "char"},
                      train={"device": "cuda", "dtype": "auto", "compile": "false", "max_steps": 150,
                             "eval_interval": 150, "eval_batches": 20, "lr": 1e-2, "min_lr": 1e-3})
    from tinylm.loop import train

    result = train(cfg, run_dir=tmp_path / "run", console=Console(lambda line: None))
    assert math.log(2) - 0.01 < result.metrics["val_loss"] < math.log(2) + 0.08


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_float16_overflows_are_skipped_on_the_device(tmp_path, corpus, monkeypatch, optimizer):
    """With fused AdamW the guard hands the verdict to the kernel (no host sync per step) and the scaler
    backs off; Muon reads it on the host. Either way the overflows are no blow-up."""
    monkeypatch.setenv("TINYLM_TEST_OVERFLOW_STEPS", "3,7-10")
    cfg = tiny_config(tmp_path, [corpus], data={"tokenizer": "char"},
                      train={"device": "cuda", "dtype": "float16", "compile": "false", "optimizer": optimizer,
                             "max_steps": 30, "eval_interval": 30, "sample_tokens": 0})
    from tinylm import checkpoint, rundir
    from tinylm.loop import train

    lines: list[str] = []
    result = train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert result.step == 30 and math.isfinite(result.metrics["val_loss"])
    assert not [line for line in lines if line.startswith("warning")]
    state = checkpoint.load(tmp_path / "run" / rundir.CHECKPOINT)
    assert state["scaler"]["scale"] <= 65536 / 2**5
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {25}


def test_a_collapsing_float16_scale_stops_the_run_on_the_device(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("TINYLM_TEST_OVERFLOW_STEPS", "2-200")
    cfg = tiny_config(tmp_path, [corpus], data={"tokenizer": "char"},
                      train={"device": "cuda", "dtype": "float16", "compile": "false", "optimizer": "adamw",
                             "max_steps": 60, "eval_interval": 60, "log_interval": 5, "sample_tokens": 0})
    from tinylm.errors import UserError
    from tinylm.loop import train

    with pytest.raises(UserError, match="the float16 loss scale fell to"):
        train(cfg, run_dir=tmp_path / "run", console=Console(lambda line: None))


def test_a_compiled_run_samples_through_the_kv_cache(tmp_path, corpus):
    cfg = tiny_config(tmp_path, [corpus], data={"tokenizer": "char"},
                      train={"device": "cuda", "dtype": "auto", "compile": "true", "max_steps": 6,
                             "eval_interval": 6, "sample_tokens": 20})
    from tinylm.loop import train

    lines: list[str] = []
    train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert any("torch.compile on" in line for line in lines)
    assert "\n".join(lines).count("--- sample ---") == 2


def test_grouped_query_attention_on_the_gpu_kernels():
    """SDPA's enable_gqa on the GPU's attention kernels, in bf16, equals repeating the key/value heads,
    with and without the KV cache."""
    from tinylm import model as model_module

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=8, n_kv_head=2, n_embd=256, block_size=64), 100).to(CUDA).eval()
    idx = torch.randint(100, (2, 64), device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        shared = model(idx)[0].float()
        flag = model_module.SDPA_GQA
        try:
            model_module.SDPA_GQA = not flag
            repeated = model(idx)[0].float()
        finally:
            model_module.SDPA_GQA = flag
        cache = model.new_cache(batch=2)
        stepped = torch.cat([model(idx[:, :40], cache=cache)[0], *(model(idx[:, i : i + 1], cache=cache)[0]
                                                                  for i in range(40, 64))], 1).float()
    assert (shared - repeated).abs().max().item() < 0.05
    assert (shared - stepped).abs().max().item() < 0.05


def test_guard_verdicts_wait_for_the_poll_with_a_scaler():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    g = guard.BlowUpGuard(3, CUDA, opt, lambda line: None, scaler)
    assert g.on_device
    loss = scaler.scale(lin(torch.ones(3, 4, device=CUDA)).pow(2).mean())
    loss.backward()
    lin.weight.grad[0, 0] = float("inf")  # an overflow
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
    before = lin.weight.detach().clone()
    g.step(opt, loss / scaler.get_scale(), norm, 1)
    assert torch.equal(lin.weight, before) and g.overflows == 0  # skipped on the GPU, not yet read
    g.poll()
    assert g.overflows == 1 and g.skipped == 0 and scaler.get_scale() == 32768.0
