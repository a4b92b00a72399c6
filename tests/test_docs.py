"""The documentation runs: docs/python.md's examples in order (their shown output compared with what they
print), and the README's quick-start commands, shortened by overrides, in a scratch folder. Neither page
can drift from the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

VARIES = "<!-- example output: varies with the machine -->"  # before an output the test does not compare
QUICK_START = "<!-- quick start: tests/test_docs.py runs these commands -->"
FENCE = re.compile(r"^(<!--.*?-->\n+)?```(\w*)\n(.*?)^```", re.M | re.S)
SEPARATOR = "----- end of block -----"
# Runs the blocks one after the other in one namespace, as a notebook would, marking where each one ends.
DRIVER = f"""
import json, sys
ns = {{"__name__": "__main__"}}
for i, code in enumerate(json.load(open(sys.argv[1]))):
    exec(compile(code, f"docs/python.md, block {{i + 1}}", "exec"), ns)
    print({SEPARATOR!r}, flush=True)
"""


def env() -> dict[str, str]:
    # One thread: the tests share two cores, and oversubscribed threads make tiny models crawl.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fences(markdown: str) -> list[tuple[str, str, str]]:
    """(comment before it, language, code) of every fenced block, in order."""
    return [((m.group(1) or "").strip(), m.group(2), m.group(3)) for m in FENCE.finditer(markdown)]


def mask(text: str) -> str:
    """Output with its decimal fractions hidden (losses and seconds differ between machines)."""
    return re.sub(r"\d+\.\d+", "#", text).rstrip()


def test_the_python_page_runs_and_prints_what_it_shows(tmp_path):
    blocks = fences((ROOT / "docs" / "python.md").read_text())
    code = [body for _, lang, body in blocks if lang == "python"]
    assert len(code) >= 6
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json")], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    printed = done.stdout.split(SEPARATOR + "\n")
    assert len(printed) == len(code) + 1 and printed[-1] == ""
    compared = 0
    outputs = iter(printed)
    for (comment, lang, body), following in zip(blocks, [*blocks[1:], ("", "", "")]):
        if lang != "python":
            continue
        out = next(outputs)
        if following[1] == "text" and following[0] != VARIES:
            assert mask(out) == mask(following[2]), f"docs/python.md shows for\n{body}\n{following[2]}\nbut it printed\n{out}"
            compared += 1
    assert compared >= 5
    assert (tmp_path / "runs" / "cats" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "default-book" / "checkpoint.pt").is_file()


def quick_start() -> list[list[str]]:
    """The commands of the README's quick-start block, as argument lists (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    (body,) = [body for comment, lang, body in fences(readme) if comment == QUICK_START]
    return [shlex.split(line, comments=True) for line in body.splitlines() if shlex.split(line, comments=True)]


def test_the_readme_quick_start_runs(tmp_path):
    """`tinylm train`, `tinylm sample` and `tensorboard` as the README writes them, run for real in a scratch
    folder: training shortened by overrides, sampling to a few tokens; TensorBoard reads the run's events."""
    commands = quick_start()
    assert [c[:2] for c in commands] == [["tinylm", "train"], ["tinylm", "sample"], ["tensorboard", "--logdir"]]
    train, sample, board = commands
    short = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
             "--data.vocab_size=300", "--train.batch_size=8", "--train.max_steps=3", "--train.max_time=0",
             "--train.eval_batches=1", "--train.sample_tokens=5", "--train.device=cpu"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    trained = run(["tinylm", *train[1:], *short])
    # The run goes where the sample command looks, and the training log says the next two commands itself.
    run_dir = tmp_path / sample[2]
    assert (run_dir / "checkpoint.pt").is_file()
    assert shlex.join(sample[:3]) in trained.stdout and shlex.join(board) in trained.stdout
    sampled = run(["tinylm", *sample[1:], "--max_new_tokens", "5", "--seed", "0"])
    prompt = sample[sample.index("--prompt") + 1]
    assert sampled.stdout.startswith(prompt) and len(sampled.stdout.strip()) > len(prompt)

    # tensorboard --logdir X: X holds the run's event files, and TensorBoard's own reader finds its curves.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    logdir = tmp_path / board[board.index("--logdir") + 1]
    runs = EventMultiplexer().AddRunsFromDirectory(str(logdir)).Reload().Runs()
    assert list(runs) == [str(run_dir.relative_to(logdir))]
    assert {"train/loss", "val/loss"} <= set(runs[str(run_dir.relative_to(logdir))]["scalars"])
    inspected = subprocess.run([sys.executable, "-m", "tensorboard.main", *board[1:], "--inspect"], cwd=tmp_path,
                               env=env(), capture_output=True, text=True, timeout=300)
    assert inspected.returncode == 0 and "val/loss" in inspected.stdout + inspected.stderr


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")) + ["../README.md"])
def test_links_between_the_pages_lead_somewhere(page):
    path = ROOT / "docs" / page
    for target in re.findall(r"\]\(([^)#:]+?)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"
