"""tinylm.measure: a measurement runs once per machine and parameters, and the cache never breaks a run."""

from __future__ import annotations

import json

import pytest
import torch

from tinylm import measure


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(value):
    calls = []

    def fn():
        calls.append(1)
        return value

    return fn, calls


def test_a_measurement_runs_once_then_comes_from_the_file(cache_dir):
    fn, calls = counting({"tokens_per_s": 1234.5})
    assert measure.cached("probe", {"shape": [2, 64]}, fn) == ({"tokens_per_s": 1234.5}, False)
    assert measure.cached("probe", {"shape": [2, 64]}, fn) == ({"tokens_per_s": 1234.5}, True)
    assert len(calls) == 1
    entry = next(iter(json.loads((cache_dir / "measurements.json").read_text()).values()))
    assert entry["machine"] == measure.machine() and entry["params"] == {"shape": [2, 64]}


def test_other_parameters_or_another_thread_count_measure_afresh(cache_dir):
    fn, calls = counting(1.0)
    measure.cached("probe", {"shape": [2, 64]}, fn)
    measure.cached("probe", {"shape": [4, 64]}, fn)
    measure.cached("other", {"shape": [2, 64]}, fn)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        measure.cached("probe", {"shape": [2, 64]}, fn)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4
    assert len(json.loads((cache_dir / "measurements.json").read_text())) == 4


def test_a_damaged_cache_is_measured_again_and_repaired(cache_dir):
    cache_dir.mkdir()
    (cache_dir / "measurements.json").write_text("{not json")
    fn, calls = counting(7)
    assert measure.cached("probe", {}, fn) == (7, False)
    assert measure.cached("probe", {}, fn) == (7, True)
    assert len(calls) == 1


def test_an_unwritable_cache_costs_only_the_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(blocker / "cache"))
    fn, calls = counting(3)
    assert measure.cached("probe", {}, fn) == (3, False)
    assert measure.cached("probe", {}, fn) == (3, False)
    assert len(calls) == 2


def test_cpu_features_are_read_from_the_flags_line(monkeypatch):
    fake = {"model name": "Test CPU", "flags": "fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 cx16"}
    monkeypatch.setattr(measure, "_cpuinfo", lambda: fake)
    measure.cpu_features.cache_clear()
    measure.cpu_name.cache_clear()
    try:
        assert measure.cpu_features() == ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
        assert measure.cpu_name() == "Test CPU"
        assert measure.machine()["cpu_features"] == "avx2 fma avx512f avx512_bf16 amx_tile amx_bf16"
    finally:
        measure.cpu_features.cache_clear()
        measure.cpu_name.cache_clear()


def test_best_time_is_the_fastest_call():
    durations = iter([0.03, 0.01, 0.02, 0.05])

    def fn():
        import time
        time.sleep(next(durations, 0.04))

    best = measure.best_time(fn, seconds=0.0, warmup=0)
    assert 0.009 < best < 0.019  # the 0.01 call, not the mean (~0.03)
