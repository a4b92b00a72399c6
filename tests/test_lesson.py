"""The one-neuron lesson (tinylm/lesson.py) against hand computations, and docs/lesson.md kept in step with it."""

import math
import re

import pytest
import torch
from conftest import ROOT

from tinylm.anatomy import GPT2_SMALL, GPT2_VOCAB, GPT2_XL, parameter_formula
from tinylm.config import Config, ModelConfig
from tinylm.lesson import (
    LESSON_PATH,
    POINTS,
    neuron_step,
    section_activations,
    section_neuron,
    softmax_example,
    values_and_slopes,
)
from tinylm.model import ACTIVATIONS, GPT, MLP

DOC = ROOT / LESSON_PATH


def approx(v):
    return pytest.approx(v, abs=1e-12)


def test_the_lessons_worked_example():
    right = neuron_step(y_true=2.0)  # x = 2, w = 0.5, b = 1
    assert (right.pred, right.loss, right.grad_w, right.grad_b) == (approx(2), approx(0), approx(0), approx(0))
    wrong = neuron_step(y_true=3.0)
    assert wrong.pred == approx(2) and wrong.loss == approx(0.5)
    assert wrong.grad_w == approx(-2) and wrong.grad_b == approx(-1)  # (y - y_true) * x and (y - y_true)
    assert wrong.w_new == approx(0.7) and wrong.b_new == approx(1)  # w's step alone holds b at 1
    assert wrong.pred_new == approx(2.4) and wrong.loss_new == approx(0.18)
    both = neuron_step(y_true=3.0, update_bias=True)
    assert both.w_new == approx(0.7) and both.b_new == approx(1.1)
    assert both.pred_new == approx(0.7 * 2 + 1.1) and both.loss_new == approx(0.5 * (2.5 - 3) ** 2)


def test_the_lessons_relu_example():
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
    ("swiglu", "SiLU (in SwiGLU)", lambda x: x / (1 + torch.exp(-x))),
    ("gelu", "GELU", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    ("relu2", "ReLU squared", lambda x: x.clamp(min=0) ** 2),
])
def test_the_models_own_activation_is_shown_with_its_values(mlp, name, formula):
    # The model's MLP applies this formula...
    torch.manual_seed(0)
    block = MLP(ModelConfig(n_embd=8, n_head=2, mlp=mlp, bias=True, dropout=0.0))
    x = torch.randn(3, 8)
    h = block.fc(x)
    if mlp == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = formula(gate) * up
    else:
        h = formula(h)
    assert torch.allclose(block(x), block.proj(h), atol=1e-6)
    # ...and explain shows the model's own function (what explain passes in) with the formula's values.
    lines: list[str] = []
    section_activations(mlp, ACTIVATIONS[mlp], lines.append)
    (row,) = [line for line in lines if line.strip().startswith(f"{name} (this model)")]
    values = [float(v) for v in row.split()[-len(POINTS):]]
    assert values == [pytest.approx(formula(torch.tensor(p)).item(), abs=1e-3) for p in POINTS]
    assert any(line.strip().startswith(f"{name}: between the two weight matrices") for line in lines)


def test_explain_cites_the_lesson_which_is_in_the_repository():
    lines: list[str] = []
    section_neuron(lines.append)
    assert DOC.is_file() and LESSON_PATH in "\n".join(lines)


def test_the_lesson_shows_the_numbers_explain_prints():
    lines: list[str] = []
    section_neuron(lines.append)
    start = next(i for i, line in enumerate(lines) if line.endswith("lesson   PyTorch"))
    table = "\n".join(lines[start:lines.index("", start)])  # up to the blank line after the table
    assert "new loss                               0.125     0.125" in table  # the whole table, bias step included
    assert f"```\n{table}\n```" in DOC.read_text(encoding="utf-8")


def test_what_explain_quotes_from_the_lesson_is_in_it():
    quoted = {q for path in (ROOT / "tinylm").glob("*.py")
              for q in re.findall(r"the lesson's \\\"(.+?)\\\"", path.read_text(encoding="utf-8"))}
    assert {"cat", "parameters = weights + biases", "1.5 billion"} <= quoted
    doc = DOC.read_text(encoding="utf-8")
    assert all(q in doc for q in quoted)
    cfg = Config()
    with torch.device("meta"):
        default = sum(p.numel() for p in GPT(cfg.model, cfg.data.vocab_size).parameters())
    for count in (default, parameter_formula(GPT2_SMALL, GPT2_VOCAB), parameter_formula(GPT2_XL, GPT2_VOCAB)):
        assert f"{count:,}" in doc  # the sizes the lesson gives are the ones explain prints
