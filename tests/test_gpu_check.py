"""benchmarks/gpu.py, the prepared GPU check: its arguments, and a dry run of every part on the CPU
(--device cpu --quick), so that the script is known to work before a GPU is lent to run it."""

import json

import pytest
from conftest import markov_text

from benchmarks import gpu


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(markov_text(20_000))
    return path


@pytest.mark.parametrize("args, message", [
    (["--corpus", "missing.txt", "--device", "cpu", "--quick"], "corpus not found: missing.txt"),
    (["--device", "cpu", "--quick"], "the following arguments are required: --corpus"),
    (["--skip", "tests,speed", "--device", "cpu", "--quick"], "unknown part speed; parts are tests, throughput"),
    (["--device", "cpu"], "--device cpu runs only as a dry run: add --quick"),
])
def test_bad_arguments_are_one_line_and_status_2(corpus, capsys, args, message):
    argv = args if "--corpus" in args or "required" in message else ["--corpus", str(corpus), *args]
    with pytest.raises(SystemExit) as stopped:
        gpu.parse_args(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_without_a_gpu_the_default_device_is_refused(corpus, capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--corpus", str(corpus)])
    assert "this torch sees no CUDA GPU (use --device cpu --quick for a dry run)" in capsys.readouterr().err


def test_the_pytest_summary_line_is_read_into_counts():
    assert gpu._summary_words("==== 7 passed, 2 skipped, 1 deselected in 41.20s ====") == ["7 passed", "2 skipped", "1 deselected"]
    assert gpu._summary_words("1 failed, 8 passed, 1 error in 3.1s") == ["1 failed", "8 passed", "1 error"]


@pytest.mark.usefixtures("one_thread")
def test_a_dry_run_on_the_cpu_fills_every_part_of_the_table(corpus, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--corpus", str(corpus), "--device", "cpu", "--quick", "--skip", "tests", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert "errors" not in results and results["machine"]["gpu"] == "none"
    assert results["throughput"]["eager"]["tokens_per_s"] > 0 and "compiled" not in results["throughput"]  # CUDA only
    bf16, fp16 = results["shakespeare"], results["float16"]
    assert bf16["steps"] == 4 and fp16["steps"] == 2  # the float16 run stops after its step-2 evaluation
    assert fp16["loss_scale"] == 65536 and fp16["overflow_steps"] == 0
    assert {0, 2, 4} <= dict(bf16["curve"]).keys()
    for label in ("GPT-2 small ctx1024 bf16, eager", "shakespeare_char, bf16", "float16 against bf16 at the same step",
                  f"{gpu.TARGET} not reached"):
        assert label in printed
    assert f"fp16 {fp16['curve'][-1][1]:.4f}, bf16 {dict(bf16['curve'])[2]:.4f} at step 2" in printed
