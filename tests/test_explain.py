"""`tinylm explain`: the seed's numbers, the parameter formula, one AdamW step by hand, neighbours, the CLI."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT
from tinylm.config import Config, TrainConfig
from tinylm.errors import UserError
from tinylm.explain import (
    GPT2_SMALL, GPT2_VOCAB, GPT2_XL, KIND_ROLES, adamw_by_hand, explain, gpt2_config, nearest_neighbors,
    neuron_step,
    optimizer_step, parameter_formula, role, section_parameters, section_step, softmax_example, token_id,
    values_and_slopes,
)
from tinylm.model import GPT, ParamRow, parameter_table
from tinylm.tokenizer import train_bpe, train_char
from tinylm.optim import make_optimizer


def approx(v):
    return pytest.approx(v, abs=1e-12)


def test_the_seeds_worked_example():
    right = neuron_step(y_true=2.0)  # x = 2, w = 0.5, b = 1
    assert (right.pred, right.loss, right.grad_w, right.grad_b) == (approx(2), approx(0), approx(0), approx(0))
    wrong = neuron_step(y_true=3.0)
    assert wrong.pred == approx(2) and wrong.loss == approx(0.5)
    assert wrong.grad_w == approx(-2) and wrong.grad_b == approx(-1)  # (y - y_true) * x and (y - y_true)
    assert wrong.w_new == approx(0.7) and wrong.b_new == approx(1)  # the seed holds b at 1
    assert wrong.pred_new == approx(2.4) and wrong.loss_new == approx(0.18)
    both = neuron_step(y_true=3.0, update_bias=True)
    assert both.w_new == approx(0.7) and both.b_new == approx(1.1)
    assert both.pred_new == approx(0.7 * 2 + 1.1) and both.loss_new == approx(0.5 * (2.5 - 3) ** 2)


def test_the_seeds_relu_example():
    relu = neuron_step(y_true=3.0, activation=torch.relu)
    assert (relu.pred, relu.loss, relu.grad_w, relu.w_new) == (approx(2), approx(0.5), approx(-2), approx(0.7))
    dead = neuron_step(y_true=3.0, x=-4.0, activation=torch.relu)  # z = 0.5 * -4 + 1 = -1 < 0
    assert dead.pred == approx(0) and dead.loss == approx(4.5)
    assert dead.grad_w == 0 and dead.w_new == approx(0.5)


def test_activation_slopes_match_their_formulas():
    points = (-2.0, -0.5, 0.0, 0.5, 2.0)
    values, slopes = values_and_slopes(torch.sigmoid, points)
    for x, v, s in zip(points, values, slopes):
        assert v == approx(1 / (1 + math.exp(-x))) and s == approx(v * (1 - v))
    values, slopes = values_and_slopes(torch.tanh, points)
    assert slopes == [approx(1 - math.tanh(x) ** 2) for x in points]
    values, slopes = values_and_slopes(torch.relu, points)
    assert values == [0, 0, 0, 0.5, 2] and slopes == [0, 0, 0, 1, 1]
    probs, grad = softmax_example((2.0, 1.0, 0.1), target=0)
    e = [math.exp(v) for v in (2.0, 1.0, 0.1)]
    assert probs == [approx(v / sum(e)) for v in e]
    assert grad == [approx(probs[0] - 1), approx(probs[1]), approx(probs[2])]  # p - one_hot(target)


@pytest.mark.parametrize("mlp, name, formula", [
    ("swiglu", "SiLU (in SwiGLU)", lambda x: x / (1 + math.exp(-x))),
    ("gelu", "GELU", lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    ("relu2", "ReLU squared", lambda x: max(x, 0.0) ** 2),
])
def test_the_models_own_activation_is_shown_with_its_values(mlp, name, formula):
    from tinylm.config import ModelConfig
    from tinylm.explain import POINTS, section_activations

    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, mlp=mlp), 20)
    lines: list[str] = []
    section_activations(model, lines.append)
    (row,) = [line for line in lines if line.strip().startswith(f"{name} (this model)")]
    values = [float(v) for v in row.split()[-len(POINTS):]]
    assert values == [pytest.approx(formula(x), abs=1e-3) for x in POINTS]
    assert any(line.strip().startswith(f"{name}: between the two weight matrices") for line in lines)


@pytest.mark.parametrize("shape", [(1, 1, 8, 4, 11), (2, 2, 32, 16, 50), (3, 4, 64, 40, 300), (5, 3, 48, 7, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_formula_counts_the_built_model(shape, bias, tied):
    n_layer, n_head, n_embd, block_size, vocab = shape
    cfg = gpt2_config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, tie_embeddings=tied)
    with torch.device("meta"):
        model = GPT(cfg, vocab)
    assert parameter_formula(cfg, vocab) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", [
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},  # the default (Llama)
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True, "qk_norm": True},
    {"pos": "learned", "norm": "rmsnorm", "mlp": "relu2", "bias": True},
    {"pos": "rope", "norm": "layernorm", "mlp": "gelu", "bias": True, "mlp_hidden": 100},
    {"pos": "learned", "norm": "layernorm", "mlp": "swiglu", "bias": False, "qk_norm": True, "mlp_hidden": 96},
])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_formula_counts_every_architecture(arch, tied):
    from tinylm.config import ModelConfig
    from tinylm.explain import formula_text

    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=40, tie_embeddings=tied, **arch)
    with torch.device("meta"):
        model = GPT(cfg, 300)
    assert parameter_formula(cfg, 300) == sum(p.numel() for p in model.parameters())
    # The text is the same formula: evaluate it with this model's numbers.
    text = formula_text(cfg)[0].removeprefix("P = ").split(", with")[0]
    names = {"V": 300, "T": 40, "C": 64, "L": 3, "H": model.blocks[0].mlp.proj.in_features, "hs": 16}
    assert eval(text.replace("^", "**"), {}, names) == parameter_formula(cfg, 300)


def test_parameter_formula_gives_gpt2_small_and_xl():
    assert parameter_formula(GPT2_SMALL, GPT2_VOCAB) == 124_439_808
    assert parameter_formula(GPT2_XL, GPT2_VOCAB) == 1_557_611_200  # the seed's "GPT-2 -> 1.5B parameters"
    with torch.device("meta"):
        xl = GPT(GPT2_XL, GPT2_VOCAB)
    assert sum(p.numel() for p in xl.parameters()) == 1_557_611_200


def test_every_parameter_gets_a_role_and_unknown_names_fall_back_to_their_kind():
    model = GPT(gpt2_config(n_layer=2, n_head=2, n_embd=16, block_size=8), 20)
    roles = {r.name: role(r, tied=True) for r in parameter_table(model)}
    assert all(text not in KIND_ROLES.values() for text in roles.values())  # every name is known
    assert "tied" in roles["tok_emb.weight"] and "query, a key and a value" in roles["blocks.1.attn.qkv.weight"]
    assert roles["blocks.0.mlp.fc.bias"].startswith("MLP in: one b per output")
    assert roles["blocks.0.norm2.weight"].startswith("norm before the MLP: one multiplier")
    assert roles["blocks.1.mlp.fc.weight"] == "MLP in: widens each token's vector from 16 to 64 numbers, before the activation"
    assert role(ParamRow("blocks.0.mlp.gate.weight", (4, 4), 16, "weight")) == KIND_ROLES["weight"]
    assert role(ParamRow("blocks.3.attn.q_norm.weight", (4,), 4, "norm gain")) == KIND_ROLES["norm gain"]
    assert role(ParamRow("blocks.0.mlp.gate.bias", (4,), 4, "bias")) == KIND_ROLES["bias"]


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
