"""The worked example tinylm's story is built on, computed by PyTorch: one neuron, and the bend after it.

`tinylm explain` opens with these two sections before it turns to the real model (tinylm/explain.py):

1. One neuron, y = w*x + b, as a real `nn.Linear(1, 1)`: the worked example of `docs/lesson.md`
   (x = 2, w = 0.5, b = 1, loss 1/2 (y - y_true)^2, learning rate 0.1), autograd's gradients and one
   step of gradient descent, printed beside the lesson's own numbers; then the same through ReLU.
2. Activation functions (sigmoid, ReLU, tanh, softmax, and the model's own): values and slopes by
   autograd, and where each one lives in the model.

Pure torch: nothing here builds or reads the model (explain passes in the model's own activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- 1. one neuron

LESSON_PATH = "docs/lesson.md"  # in tinylm's repository
LESSON = {  # the worked example of docs/lesson.md and the numbers it works out by hand
    "x": 2.0, "w": 0.5, "b": 1.0, "lr": 0.1,
    "pred": 2.0, "loss_right": 0.0, "loss": 0.5, "grad_w": -2.0, "grad_b": -1.0,
    "w_new": 0.7, "pred_new": 2.4, "loss_new": 0.18,  # after w's step alone
    "b_new": 1.1, "pred_both": 2.5, "loss_both": 0.125,  # after b's step too
}


@dataclass
class NeuronStep:
    """One forward pass, backward pass and gradient-descent step of y = act(w*x + b)."""

    pred: float  # prediction before the step
    loss: float
    grad_w: float  # dL/dw, by autograd
    grad_b: float  # dL/db
    w_new: float
    b_new: float
    pred_new: float  # prediction and loss after the step, same x and y_true
    loss_new: float


def neuron_step(y_true: float, x: float = 2.0, w: float = 0.5, b: float = 1.0, lr: float = 0.1,
                activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                update_bias: bool = False) -> NeuronStep:
    """The lesson's example on a real nn.Linear(1, 1), loss 1/2 (y - y_true)^2, one torch.optim.SGD step.

    The lesson first steps w alone, holding b (update_bias=False); with update_bias=True b steps too.
    """
    neuron = nn.Linear(1, 1, dtype=torch.float64)  # float64, so 0.7 prints as 0.7
    with torch.no_grad():
        neuron.weight.fill_(w)
        neuron.bias.fill_(b)
    act = activation or (lambda z: z)
    inp = torch.tensor([[x]], dtype=torch.float64)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        pred = act(neuron(inp))
        return pred, 0.5 * (pred - y_true).pow(2).sum()

    pred, loss = forward()
    loss.backward()
    grad_w, grad_b = neuron.weight.grad.item(), neuron.bias.grad.item()
    params = [neuron.weight, neuron.bias] if update_bias else [neuron.weight]
    torch.optim.SGD(params, lr=lr).step()  # w <- w - lr * dL/dw
    with torch.no_grad():
        pred_new, loss_new = forward()
    return NeuronStep(pred.item(), loss.item(), grad_w, grad_b, neuron.weight.item(), neuron.bias.item(),
                      pred_new.item(), loss_new.item())


def num(v: float) -> str:
    """A number as short as it is exact to six digits: 0.7, 2.4, 0.18, -2 (never '-0')."""
    text = f"{v:.6g}"
    return "0" if text == "-0" else text


def section_neuron(out: Callable[[str], None]) -> None:
    s = LESSON
    right = neuron_step(y_true=2.0)
    wrong = neuron_step(y_true=3.0)
    both = neuron_step(y_true=3.0, update_bias=True)
    relu = neuron_step(y_true=3.0, activation=torch.relu)
    dead = neuron_step(y_true=3.0, x=-4.0, activation=torch.relu)

    def row(label: str, by_hand: str, torch_value: float) -> None:
        out(f"  {label:<34} {by_hand:>9} {num(torch_value):>9}")

    out("1. ONE NEURON: y = w*x + b, computed by PyTorch")
    out(f"  The worked example tinylm's story is built on ({LESSON_PATH} in tinylm's repository: one neuron,")
    out("  worked by hand), here on a real nn.Linear(1, 1): input x = 2, weight w = 0.5, bias b = 1, loss")
    out("  L = 1/2 (y - y_true)^2, gradients by autograd (loss.backward()) and one step of torch.optim.SGD,")
    out("  beside the lesson's numbers.")
    out("")
    out(f"  {'':<34} {'lesson':>9} {'PyTorch':>9}")
    out("  y_true = 2")
    row("prediction y = w*x + b", num(s["pred"]), right.pred)
    row("loss", num(s["loss_right"]), right.loss)
    out(f"  {'':<34} (already right: dL/dw = {num(right.grad_w)}, nothing to change)")
    out("  y_true = 3")
    row("prediction", num(s["pred"]), wrong.pred)
    row("loss", num(s["loss"]), wrong.loss)
    row("dL/dw = (y - y_true) * x", num(s["grad_w"]), wrong.grad_w)
    row("dL/db = (y - y_true)", num(s["grad_b"]), wrong.grad_b)
    out(f"  step w <- w - {num(s['lr'])} * dL/dw, b held at 1 (the lesson's first step):")
    row("new w", num(s["w_new"]), wrong.w_new)
    row("new prediction", num(s["pred_new"]), wrong.pred_new)
    row("new loss", num(s["loss_new"]), wrong.loss_new)
    out(f"  b takes its step too, b <- b - {num(s['lr'])} * dL/db (in training every parameter moves at once):")
    row("new b", num(s["b_new"]), both.b_new)
    row("new prediction", num(s["pred_both"]), both.pred_new)
    row("new loss", num(s["loss_both"]), both.loss_new)
    out("")
    out("  Through ReLU (the lesson's bend): z = w*x + b, y = ReLU(z) = max(0, z)")
    out(f"  z = {num(relu.pred)}, y = {num(relu.pred)}, loss {num(relu.loss)}, "
        f"dL/dw = (y - y_true) * ReLU'(z) * x = {num(relu.grad_w)}, new w {num(relu.w_new)} (as without ReLU)")
    out(f"  With x = -4, z = -1 < 0: y = {num(dead.pred)}, loss {num(dead.loss)}, but ReLU'(z) = 0 so "
        f"dL/dw = {num(dead.grad_w)} and w stays {num(dead.w_new)}:")
    out("  a neuron whose input is negative gets no gradient at all (a 'dead' ReLU).")


# ---------------------------------------------------------------- 2. activation functions

POINTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
CLASSIC_ACTIVATIONS = {"sigmoid": torch.sigmoid, "ReLU": torch.relu, "tanh": torch.tanh}


def values_and_slopes(fn: Callable[[torch.Tensor], torch.Tensor], points=POINTS) -> tuple[list[float], list[float]]:
    """fn(x) and dfn/dx at each point, the slope by autograd (ReLU's slope at 0 is torch's choice: 0)."""
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    (slope,) = torch.autograd.grad(y.sum(), x)  # elementwise fn: d(sum y)/dx_i = dy_i/dx_i
    return y.tolist(), slope.tolist()


def softmax_example(scores=(2.0, 1.0, 0.1), target: int = 0) -> tuple[list[float], list[float]]:
    """softmax(scores), and the gradient of the next-token loss -log p[target] w.r.t. the scores."""
    s = torch.tensor([scores], dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(s, torch.tensor([target]))
    (grad,) = torch.autograd.grad(loss, s)
    return torch.softmax(s, dim=-1)[0].tolist(), grad[0].tolist()


# The name and a description of the MLP's activation for each model.mlp (the function itself is the
# model's own, tinylm.model.ACTIVATIONS, which explain passes in).
MLP_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "gelu": ("GELU", "GELU is a smooth ReLU: 0.5 x (1 + tanh(0.798 (x + 0.045 x^3))), about x * sigmoid(1.702 x)."),
    "relu2": ("ReLU squared", "ReLU squared is relu(x)^2: zero below 0, a parabola above."),
    "swiglu": ("SiLU (in SwiGLU)",
               "SiLU is x * sigmoid(x); SwiGLU multiplies it, on one half of the MLP's first matrix, by the other half."),
}


def section_activations(mlp: str, fn: Callable[[torch.Tensor], torch.Tensor], out: Callable[[str], None]) -> None:
    """The classic activations and the model's own (`fn`, for its config's `mlp`), values and slopes."""
    out("2. ACTIVATION FUNCTIONS: the bend after y = w*x + b, values and slopes by torch.autograd")
    name, about = MLP_ACTIVATIONS[mlp]
    rows = list(CLASSIC_ACTIVATIONS.items()) + [(f"{name} (this model)", fn)]
    width = max(len(label) for label, _ in rows) + 2
    out("  " + f"{'x':<{width}}" + "".join(f"{num(p):>8}" for p in POINTS))
    for label, f in rows:
        values, slopes = values_and_slopes(f)
        out("  " + f"{label:<{width}}" + "".join(f"{v:>8.3f}" for v in values))
        out("  " + f"{'  slope':<{width}}" + "".join(f"{v:>8.3f}" for v in slopes))
    probs, grad = softmax_example()
    out("  softmax turns scores into probabilities that add up to 1:")
    out(f"    softmax([2, 1, 0.1]) = [{', '.join(f'{p:.3f}' for p in probs)}]; the slope of the loss -log p[0]")
    out(f"    with respect to the scores is p - [1, 0, 0] = [{', '.join(f'{g:.3f}' for g in grad)}]")
    out("  Where they live in the model:")
    out(f"    {name}: between the two weight matrices of every block's MLP (MLP.forward in tinylm/model.py),")
    out(f"    the only bend there. {about}")
    out(f"    Without a bend the stacked layers would collapse into one linear map ({LESSON_PATH}).")
    out("    softmax: in every attention layer (how much each earlier token counts), in the loss (cross-entropy")
    out("    turns the output head's scores into next-token probabilities) and in sampling (tinylm sample).")
