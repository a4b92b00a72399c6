"""`tinylm sample --show_probs` against a separately computed softmax, and `tinylm sample -i` fed by a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tinylm import rundir
from tinylm.generate import generate, stream_text
from tinylm.sampling import format_choice, show_probs


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, None), (1.3, None, 0.8), (0.0, None, None)])
def test_show_probs_are_the_softmax_the_tokens_were_drawn_from(trained_run, temperature, top_k, top_p):
    _, tok, model, _ = rundir.load(trained_run["run_dir"])
    prompt, n = "The cat", 12
    out = io.StringIO()
    made = show_probs(model, tok, prompt, n, temperature, top_k, top_p, torch.Generator().manual_seed(5), out, False)
    # The same tokens as plain sampling with the same seed.
    ids = tok.encode(prompt)
    assert [c.token for c in made] == list(generate(model, ids, n, temperature, top_k, top_p,
                                                    torch.Generator().manual_seed(5)))
    for c in made:  # each probability from a forward pass over the whole text so far, by hand, in float64
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0, -1].double()
        if temperature:
            logits = logits / temperature
            if top_k:
                logits[logits < logits.topk(top_k).values[-1]] = -torch.inf
            if top_p:
                order = logits.argsort(descending=True)
                before = logits[order].softmax(-1).cumsum(-1) - logits[order].softmax(-1)
                logits[order[before >= top_p]] = -torch.inf
        p = logits.softmax(-1)
        assert c.probability == pytest.approx(float(p[c.token]), rel=1e-4, abs=1e-7)
        top = p.argsort(descending=True)[:3]
        assert [i for i, _ in c.alternatives] == top.tolist()
        assert [q for _, q in c.alternatives] == pytest.approx(p[top].tolist(), rel=1e-4, abs=1e-7)
        ids.append(c.token)
    lines = out.getvalue().splitlines()
    assert lines[n + 1] == "" and out.getvalue().endswith("\n\n" + prompt + tok.decode([c.token for c in made]) + "\n")
    assert lines[1] == format_choice(made[0], tok.decode, coloured=False) and "\033" not in out.getvalue()
    assert format_choice(made[0], tok.decode, coloured=True).startswith("\033[")


def test_interactive_mode_continues_each_line_piped_in(trained_run):
    run_dir = trained_run["run_dir"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tinylm", "sample", run_dir, "-i", "--seed", "3", "--max_new_tokens",
                           "6"], input="The cat\nA dog\n", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    _, tok, model, _ = rundir.load(run_dir)
    expected = ""
    for line in ("The cat", "A dog"):  # each line from the seed: what `sample --prompt LINE --seed 3` prints
        pieces = stream_text(model, tok, line, 6, 0.8, None, None, torch.Generator().manual_seed(3))
        expected += line + "".join(pieces) + "\n\n"
    assert done.stdout == expected and "> " not in done.stdout  # no prompt when piped
