"""tinylm.hardware's choices for a machine, with its capability queries patched to play the GPUs this
machine does not have: the autocast precision and whether to torch.compile."""

import time

import pytest
import torch

from tinylm import hardware, measure
from tinylm.config import ModelConfig
from tinylm.errors import UserError

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def fake_gpu(monkeypatch, native_bf16: bool, capability: tuple[int, int], old_torch: bool = False) -> None:
    """torch.cuda answering as a GPU would: a T4 (sm_75) only emulates bf16, an A100 (sm_80) has it.
    torch's plain is_bf16_supported() says True for both; an old torch knows no including_emulation."""
    if old_torch:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("old_torch", [False, True], ids=["including_emulation", "capability"])
@pytest.mark.parametrize("gpu, native, capability, expected", [
    ("T4", False, (7, 5), torch.float16),
    ("V100", False, (7, 0), torch.float16),
    ("A100", True, (8, 0), torch.bfloat16),
    ("H100", True, (9, 0), torch.bfloat16),
])
def test_auto_picks_bfloat16_only_where_the_gpu_has_it_natively(monkeypatch, gpu, native, capability, expected, old_torch):
    fake_gpu(monkeypatch, native, capability, old_torch)
    assert hardware.autocast_dtype("auto", CUDA) == expected
    assert hardware.autocast_dtype("float32", CUDA) is None
    assert hardware.autocast_dtype("float16", CUDA) == torch.float16  # asked for, whatever the GPU


@pytest.mark.parametrize("fast_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_on_a_cpu_auto_is_bfloat16_with_avx512_bf16_or_amx_else_float32(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert hardware.autocast_dtype("auto", CPU) == expected
    assert hardware.autocast_dtype("float16", CPU) == torch.float16


def test_16_bits_on_mps_is_refused():
    with pytest.raises(UserError, match="train.dtype=float16 is not supported on MPS"):
        hardware.autocast_dtype("float16", torch.device("mps"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))


MODEL = ModelConfig()


def test_compile_is_what_the_user_says_and_off_on_a_cpu_by_default(cache):
    assert hardware.compile_choice("true", CPU, 180, MODEL, None)[0] is True
    assert hardware.compile_choice("false", CUDA, 0, MODEL, torch.bfloat16)[0] is False
    on, why = hardware.compile_choice("auto", CPU, 0, MODEL, None)
    assert not on and why.startswith("off on cpu")


def test_on_cuda_auto_compiles_when_the_budget_repays_the_compile_time(cache):
    bf16 = torch.bfloat16
    # No time limit: the run ends by its steps, and is compiled.
    assert hardware.compile_choice("auto", CUDA, 0, MODEL, bf16)[0] is True
    # Before this machine measured anything: 60 s of compiling against 180 s * (1 - 1/1.3) = 42 s saved.
    on, why = hardware.compile_choice("auto", CUDA, 180, MODEL, bf16)
    assert not on and "~60 s to compile (a first guess) would not be repaid: ~42 s saved at 1.3x in 180 s" in why
    assert hardware.compile_choice("auto", CUDA, 600, MODEL, bf16)[0] is True  # 138 s saved
    # This machine measured 15 s for this model: 180 s now repays it; another model still has no figure.
    measure.store("compile_seconds", hardware.compile_key(MODEL, bf16), 15.0)
    on, why = hardware.compile_choice("auto", CUDA, 180, MODEL, bf16)
    assert on and "~15 s to compile (measured on this machine)" in why
    other = ModelConfig(n_layer=12)
    assert hardware.compile_choice("auto", CUDA, 180, other, bf16)[0] is False
    # A measured speed-up (benchmarks/gpu.py) replaces the guess: at 1.05x, 180 s saves only 9 s.
    measure.store("compile_speedup", {}, 1.05)
    assert hardware.compile_choice("auto", CUDA, 180, MODEL, bf16)[0] is False


def test_a_compiled_run_keeps_its_first_step_less_its_second_as_the_compile_time(cache):
    timer = hardware.CompileTimer(MODEL, torch.bfloat16, CPU)
    timer.start()
    time.sleep(0.5)  # the first step: compiling, then the step itself
    assert timer.stop() is False
    timer.start()
    time.sleep(0.1)  # a step
    assert timer.stop() is True
    kept = measure.lookup("compile_seconds", hardware.compile_key(MODEL, torch.bfloat16))
    assert kept == round(timer.times[0] - timer.times[1], 1) and 0.2 <= kept <= 0.6


@pytest.mark.usefixtures("one_thread")
def test_a_compiled_run_trains_samples_with_the_kv_cache_and_keeps_its_compile_time(tmp_path, markov_file, monkeypatch):
    """The loop trains and evaluates through the compiled module and samples from the plain one (a
    compiled module takes no KV cache). Dynamo's "eager" backend stands in for Inductor, whose code
    generation takes most of a minute on a small CPU: the tracing and the wiring are the real ones."""
    import functools

    from conftest import tiny_config

    from tinylm.console import Console
    from tinylm.loop import train

    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = tiny_config(tmp_path, [markov_file], data={"tokenizer": "char"},
                      train={"compile": "true", "max_steps": 4, "eval_interval": 4, "sample_tokens": 12})
    lines: list[str] = []
    result = train(cfg, run_dir=tmp_path / "run", console=Console(lines.append))
    assert result.step == 4 and any("torch.compile on (train.compile=true)" in line for line in lines)
    assert "\n".join(lines).count("--- sample ---") == 2  # at steps 0 and 4, through the KV cache
    assert measure.lookup("compile_seconds", hardware.compile_key(cfg.model, None)) is not None
