"""`tinylm explain`: the parameter section, one AdamW step by hand, neighbours, the CLI."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tinylm.anatomy import gpt2_config
from tinylm.config import Config, TrainConfig
from tinylm.errors import UserError
from tinylm.explain import (
    adamw_by_hand,
    explain,
    nearest_neighbors,
    optimizer_step,
    section_parameters,
    section_step,
    token_id,
)
from tinylm.model import GPT
from tinylm.optim import make_optimizer
from tinylm.tokenizer import train_bpe, train_char


def test_a_recipe_without_biases_says_so():
    torch.manual_seed(0)
    model = GPT(gpt2_config(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=False), 20)
    lines: list[str] = []
    section_parameters(model, "no-bias model", lines.append)
    text = "\n".join(lines)
    assert "This recipe has no biases (model.bias=false)" in text and "biases 0" in text
    x = torch.randint(20, (2, 8))
    report = optimizer_step(model, x, x, TrainConfig(), lr=1e-3)
    assert report.bias is None and report.weight.kind == "weight"
    lines.clear()
    section_step(report, "a batch", lines.append)
    assert "no biases (model.bias=false), so there is no b to watch" in "\n".join(lines)


@pytest.mark.parametrize("earlier_steps", [0, 3])
def test_one_adamw_step_by_hand_matches_torch(earlier_steps):
    torch.manual_seed(0)
    model = GPT(gpt2_config(n_layer=1, n_head=2, n_embd=16, block_size=8), 30)
    t = TrainConfig(weight_decay=0.1, optimizer="adamw")  # the run's own AdamW state is what is explained
    x, y = torch.randint(30, (4, 8)), torch.randint(30, (4, 8))
    opt = make_optimizer(model, t, torch.device("cpu"))  # some real training first, so m and v are not 0
    for _ in range(earlier_steps):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    report = optimizer_step(model, x, y, t, lr=3e-3, optimizer_state=opt.state_dict() if earlier_steps else None)
    assert report.loss_after < report.loss_before
    for w in (report.weight, report.bias):
        assert w.t == earlier_steps and w.grad != 0 and w.after != w.before
        assert adamw_by_hand(w, 3e-3, report.betas, report.eps) == pytest.approx(w.after, abs=1e-7)
    assert report.weight.weight_decay == 0.1 and report.bias.weight_decay == 0.0
    assert report.weight.name.startswith("blocks.0.attn.qkv.weight[") and report.bias.name.startswith("blocks.0.attn.qkv.bias[")


def test_a_run_trained_by_another_optimizer_gets_a_fresh_adamw_step(monkeypatch):
    import tinylm.optim

    monkeypatch.setattr(tinylm.optim, "make_optimizer", lambda model, t, device: torch.optim.SGD(model.parameters()))
    torch.manual_seed(0)
    model = GPT(gpt2_config(n_layer=1, n_head=2, n_embd=16, block_size=8), 30)
    x = torch.randint(30, (4, 8))
    report = optimizer_step(model, x, x, TrainConfig(weight_decay=0.1), lr=3e-3, optimizer_state={"ignored": 1})
    assert report.how == "fresh (this run trains with SGD; the lesson's step is AdamW's)"
    for w in (report.weight, report.bias):
        assert w.t == 0 and adamw_by_hand(w, 3e-3, report.betas, report.eps) == pytest.approx(w.after, abs=1e-7)
    assert report.weight.weight_decay == 0.1 and report.bias.weight_decay == 0.0


def test_nearest_neighbours_in_a_hand_built_table():
    emb = torch.tensor([
        [1.0, 0.0, 0.0],   # 0 cat
        [0.9, 0.1, 0.0],   # 1 dog: almost the same direction as cat
        [0.0, 1.0, 0.0],   # 2 king
        [0.1, 0.9, 0.05],  # 3 queen: almost the same direction as king
        [-2.0, 0.0, 0.0],  # 4 the opposite of cat (length does not matter, only direction)
    ])
    near = nearest_neighbors(emb, 0, k=4)
    assert [i for i, _ in near] == [1, 3, 2, 4]
    assert near[0][1] == pytest.approx(0.9 / math.sqrt(0.82)) and near[2][1] == pytest.approx(0.0, abs=1e-7)
    assert near[3][1] == pytest.approx(-1.0)
    assert [i for i, _ in nearest_neighbors(emb, 2, k=1)] == [3]


def test_words_map_to_single_tokens_or_fail_with_one_line():
    tok = train_bpe(["the cat sat on the mat with the dog " * 50], vocab_size=280)
    assert tok.decode([token_id(tok, "cat")]) == " cat"  # the word as it appears inside a sentence
    with pytest.raises(UserError, match=r"'zebra' is not a single token .*splits into 'z' \+"):
        token_id(tok, "zebra")
    chars = train_char(["abc abc"])
    assert chars.decode([token_id(chars, "b")]) == "b"
    with pytest.raises(UserError, match="never saw 'q'"):
        token_id(chars, "q")


def test_explain_prints_the_same_parameter_table_as_tensorboard(trained_run):
    lines: list[str] = []
    explain(trained_run["run_dir"], ["cat"], out=lines.append)
    text = "\n".join(lines)
    acc = EventAccumulator(trained_run["run_dir"]).Reload()
    table = acc.Tensors("parameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "\n".join("  " + line for line in table.splitlines()) in text
    assert "= the table's total" in text
    assert "' cat': " in text and "run's own state after step 100" in text


def run_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinylm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_explain_a_trained_run(trained_run, tmp_path):
    result = run_cli(["explain", trained_run["run_dir"], "--neighbors", "cat", "dog"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading in ("1. ONE NEURON", "2. ACTIVATION FUNCTIONS", "3. FROM ONE NEURON TO THE MODEL",
                    "4. ONE REAL TRAINING STEP", "5. TOKENS AS VECTORS"):
        assert heading in out
    assert re.search(r"new loss +0\.18 +0\.18\n", out) and re.search(r"dL/dw = \(y - y_true\) \* x +-2 +-2\n", out)
    assert "124,439,808" in out and "1,557,611,200" in out
    assert "' cat': " in out and "' dog': " in out


def test_cli_explain_without_a_run_uses_the_default_recipe(tmp_path):
    result = run_cli(["explain"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "the default recipe (configs/default.yaml), untrained" in result.stdout
    cfg = Config()
    with torch.device("meta"):
        total = sum(p.numel() for p in GPT(cfg.model, cfg.data.vocab_size).parameters())
    assert f"total {total:,} = weights" in result.stdout and "5. TOKENS" not in result.stdout
    # The default recipe trains with Muon; the lesson still shows one AdamW step, fresh.
    assert "AdamW fresh (this run trains with Muon; the lesson's step is AdamW's)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--neighbors", "cat"], "--neighbors needs a trained run"),
    (["RUN", "--neighbors", "cat", "qzxjv"], "'qzxjv' is not a single token"),
    (["nowhere"], "run directory not found: nowhere"),
])
def test_cli_explain_bad_input_is_one_line(args, message, trained_run, tmp_path):
    args = [trained_run["run_dir"] if a == "RUN" else a for a in args]
    result = run_cli(["explain", *args], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""  # a bad word is caught before the lesson starts
