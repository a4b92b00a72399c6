"""`tinylm explain [RUN_DIR] [--neighbors TOKEN ...]`: the seed's one-neuron lesson, then the real model.

    tinylm explain                                   # the default recipe's model, untrained
    tinylm explain runs/default --neighbors the if   # a trained run, and the tokens nearest to ' the', ' if'

The lesson, every number computed by PyTorch as it is printed:

1. One neuron, y = w*x + b, as a real `nn.Linear(1, 1)`: the worked example of the seed document
   (`seeds/000_*.txt`: x = 2, w = 0.5, b = 1, loss 1/2 (y - y_true)^2, learning rate 0.1), autograd's
   gradients and one step of gradient descent, printed beside the seed's own numbers; then through ReLU.
   (The output calls the seed document "the primer": that is what it is to a reader.)
2. The seed's activation functions (sigmoid, ReLU, tanh, softmax): values and slopes by autograd, and
   where each one lives in the model.
3. Every parameter tensor of the model (the same table `train` prints and logs to TensorBoard), what
   each one does, and the parameter-count formula applied to this model, GPT-2 small and GPT-2 XL.
4. One real AdamW step on a real batch: one weight and one bias before, their gradient, and after.
5. With a trained run: the nearest tokens to a few tokens, by cosine similarity of their embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.config import Config, ModelConfig
from tinylm.errors import UserError
from tinylm.model import GPT, ParamRow, format_parameter_table, mlp_width, parameter_summary, parameter_table

# ---------------------------------------------------------------- 1. one neuron

SEED = {  # the seed's worked example and its printed results
    "x": 2.0, "w": 0.5, "b": 1.0, "lr": 0.1,
    "pred": 2.0, "loss_right": 0.0, "loss": 0.5, "grad_w": -2.0, "w_new": 0.7, "pred_new": 2.4, "loss_new": 0.18,
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
    """The seed's example on a real nn.Linear(1, 1), loss 1/2 (y - y_true)^2, one torch.optim.SGD step.

    The seed updates only w and holds b (update_bias=False); with update_bias=True b takes its step too.
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
    s = SEED
    right = neuron_step(y_true=2.0)
    wrong = neuron_step(y_true=3.0)
    both = neuron_step(y_true=3.0, update_bias=True)
    relu = neuron_step(y_true=3.0, activation=torch.relu)
    dead = neuron_step(y_true=3.0, x=-4.0, activation=torch.relu)

    def row(label: str, seed: str, torch_value: float) -> None:
        out(f"  {label:<34} {seed:>9} {num(torch_value):>9}")

    out("1. ONE NEURON: y = w*x + b, computed by PyTorch")
    out("  The worked example of the weights-and-biases primer tinylm grew from, on a real nn.Linear(1, 1):")
    out("  input x = 2, weight w = 0.5, bias b = 1, loss L = 1/2 (y - y_true)^2, gradients by autograd")
    out("  (loss.backward()) and one step of torch.optim.SGD, beside the primer's own numbers.")
    out("")
    out(f"  {'':<34} {'primer':>9} {'PyTorch':>9}")
    out("  y_true = 2")
    row("prediction y = w*x + b", num(s["pred"]), right.pred)
    row("loss", num(s["loss_right"]), right.loss)
    out(f"  {'':<34} (already right: dL/dw = {num(right.grad_w)}, nothing to change)")
    out("  y_true = 3")
    row("prediction", num(s["pred"]), wrong.pred)
    row("loss", num(s["loss"]), wrong.loss)
    row("dL/dw = (y - y_true) * x", num(s["grad_w"]), wrong.grad_w)
    row("dL/db = (y - y_true)", "", wrong.grad_b)
    out(f"  step w <- w - {num(s['lr'])} * dL/dw, b held at 1 (as the primer does):")
    row("new w", num(s["w_new"]), wrong.w_new)
    row("new prediction", num(s["pred_new"]), wrong.pred_new)
    row("new loss", num(s["loss_new"]), wrong.loss_new)
    out(f"  The primer leaves the bias's step out. Its gradient is {num(both.grad_b)}, so b <- 1 - 0.1 * ({num(both.grad_b)})"
        f" = {num(both.b_new)};")
    out(f"  with w = {num(both.w_new)} and b = {num(both.b_new)} the prediction is {num(both.pred_new)}"
        f" and the loss {num(both.loss_new)} (instead of {num(wrong.loss_new)}).")
    out("")
    out("  Through ReLU (the primer's second example): z = w*x + b, y = ReLU(z) = max(0, z)")
    out(f"  z = {num(relu.pred)}, y = {num(relu.pred)}, loss {num(relu.loss)}, "
        f"dL/dw = (y - y_true) * ReLU'(z) * x = {num(relu.grad_w)}, new w {num(relu.w_new)} (the primer: -2 and 0.7)")
    out(f"  With x = -4, z = -1 < 0: y = {num(dead.pred)}, loss {num(dead.loss)}, but ReLU'(z) = 0 so "
        f"dL/dw = {num(dead.grad_w)} and w stays {num(dead.w_new)}:")
    out("  a neuron whose input is negative gets no gradient at all (a 'dead' ReLU).")


# ---------------------------------------------------------------- 2. activation functions

POINTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
SEED_ACTIVATIONS = {"sigmoid": torch.sigmoid, "ReLU": torch.relu, "tanh": torch.tanh}


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


# The MLP's activation for each model.mlp (model.py applies it in MLP.forward), as a function of x.
MLP_ACTIVATIONS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "gelu": ("GELU", lambda x: F.gelu(x, approximate="tanh"),
             "GELU is a smooth ReLU: 0.5 x (1 + tanh(0.798 (x + 0.045 x^3))), about x * sigmoid(1.702 x)."),
    "relu2": ("ReLU squared", lambda x: F.relu(x).square(), "ReLU squared is relu(x)^2: zero below 0, a parabola above."),
    "swiglu": ("SiLU (in SwiGLU)", F.silu,
               "SiLU is x * sigmoid(x); SwiGLU multiplies it, on one half of the MLP's first matrix, by the other half."),
}


def section_activations(model: GPT, out: Callable[[str], None]) -> None:
    out("2. ACTIVATION FUNCTIONS: the bend after y = w*x + b, values and slopes by torch.autograd")
    name, fn, about = MLP_ACTIVATIONS[model.cfg.mlp]
    rows = list(SEED_ACTIVATIONS.items()) + [(f"{name} (this model)", fn)]
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
    out("    Without a bend the stacked layers would collapse into one linear map, as the primer says.")
    out("    softmax: in every attention layer (how much each earlier token counts), in the loss (cross-entropy")
    out("    turns the output head's scores into next-token probabilities) and in sampling (tinylm sample).")


# ---------------------------------------------------------------- 3. parameters

# GPT-2's architectural choices, for whichever of these switches ModelConfig has: the formula below is
# GPT-2's, whatever the default recipe chooses.
GPT2_CHOICES = {"bias": True, "tie_embeddings": True, "pos": "learned", "norm": "layernorm", "mlp": "gelu",
                "mlp_hidden": 0, "qk_norm": False}


def gpt2_config(**fields) -> ModelConfig:
    """A ModelConfig with GPT-2's architecture; `fields` (shape, bias, tie_embeddings) override."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**{k: v for k, v in GPT2_CHOICES.items() if k in known}, **fields})


GPT2_VOCAB = 50257
GPT2_SMALL = gpt2_config(n_layer=12, n_head=12, n_embd=768, block_size=1024)
GPT2_XL = gpt2_config(n_layer=48, n_head=25, n_embd=1600, block_size=1024)


def parameter_formula(cfg: ModelConfig, vocab_size: int) -> int:
    """The parameter count of tinylm's GPT in closed form, for any of its architecture options
    (V vocab, T context, C width, L layers, H the MLP's hidden width, hs = C / n_head).

    token embeddings V*C, learned positions T*C (rotary ones have none); per block: attention qkv 3C^2 and
    proj C^2, an MLP of fc C*H (2*C*H for SwiGLU's gate and up) and proj H*C, two norms of C gains each,
    QK-norm 2*hs; the final norm C; with biases every Linear adds one per output and a LayerNorm one
    per channel; an untied output head another V*C. GPT-2 (H = 4C, biases) makes a block 12C^2 + 13C.
    """
    V, T, C, L, H = vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, mlp_width(cfg)
    fc_out = 2 * H if cfg.mlp == "swiglu" else H
    norm = 2 * C if cfg.norm == "layernorm" and cfg.bias else C
    block = 4 * C * C + (fc_out + H) * C + 2 * norm + (2 * (C // cfg.n_head) if cfg.qk_norm else 0)
    if cfg.bias:
        block += 4 * C + fc_out + C  # qkv 3C and proj C; the MLP's fc and proj
    positions = T * C if cfg.pos == "learned" else 0
    return V * C + positions + L * block + norm + (0 if cfg.tie_embeddings else V * C)


def formula_text(cfg: ModelConfig) -> tuple[str, str]:
    """The formula for this architecture, and its per-block terms spelled out."""
    C, H = cfg.n_embd, mlp_width(cfg)
    up = 2 if cfg.mlp == "swiglu" else 1  # fc's outputs per hidden unit
    norm_c = 2 if cfg.norm == "layernorm" and cfg.bias else 1
    c2, ch, h, c = 4, 0, 0, 2 * norm_c  # coefficients of C^2, C*H, H and C in one block
    if H == 4 * C:
        c2 += 4 * (up + 1)
    else:
        ch = up + 1
    if cfg.bias:
        c += 4 + 1
        if H == 4 * C:
            c += 4 * up
        else:
            h = up
    terms = [f"{c2}*C^2", f"{ch}*C*H" if ch else "", f"{h}*H" if h else "", f"{c}*C", "2*hs" if cfg.qk_norm else ""]
    formula = ("P = V*C" + (" + T*C" if cfg.pos == "learned" else "") + f" + L*({' + '.join(t for t in terms if t)})"
               + f" + {'2*C' if norm_c == 2 else 'C'}" + ("" if cfg.tie_embeddings else " + V*C"))
    if H != 4 * C:
        formula += f", with H = {H} (the MLP's width)"
    if H == 4 * C:
        fc, proj, mlp = f"{4 * up}*C^2", "4*C^2", f"{4 * (up + 1)}*C^2"
    else:
        fc, proj, mlp = (f"{up}*C*H" if up > 1 else "C*H"), "H*C", f"{up + 1}*C*H"
    per_block = (f"per block: attention 4*C^2 (qkv 3*C^2, proj C^2), MLP {mlp} (fc {fc}"
                 + (": gate and up" if up == 2 else "") + f", proj {proj}), norms 2*C"
                 + (", QK-norm 2*hs" if cfg.qk_norm else "")
                 + (f", biases {c - 2}*C" + (f" + {h}*H" if h else "") if cfg.bias else ""))
    return formula, per_block


# What each layer does, by the end of its name: (its title, what its weights do). Biases and norm gains
# are described through their layer; a name not listed here gets the line for its kind.
LAYER_ROLES = {
    "tok_emb": ("token embeddings", "row i is token i's vector, like the primer's \"cat\" -> [0.25, -0.1, ...]"),
    "pos_emb": ("position embeddings", "row t is added to the vector of the token at position t"),
    "attn.qkv": ("attention in", "turns each token's vector into a query, a key and a value"),
    "attn.proj": ("attention out", "mixes the heads' results back into the token's vector"),
    "mlp.fc": ("MLP in", "widens each token's vector from {in} to {out} numbers, before the activation"),
    "mlp.proj": ("MLP out", "brings the activated vector from {in} numbers back to {out}"),
    "norm1": ("norm before attention", "rescales each token's vector to a standard size"),
    "norm2": ("norm before the MLP", "rescales each token's vector to a standard size"),
    "norm_f": ("final norm", "rescales each token's vector before the output head"),
    "head": ("output head", "one row per token, scoring every token as the next one"),
}
KIND_ROLES = {
    "embedding": "a table of learned vectors, one row per id",
    "weight": "a weight matrix: row i holds the w's of output neuron i",
    "bias": "one b per output, added after the weights (the b in y = w*x + b)",
    "norm gain": "one multiplier per channel, applied after normalising",
}


def role(row: ParamRow, tied: bool = False) -> str:
    """One line on what a parameter tensor does."""
    layer = row.name.removesuffix(".weight").removesuffix(".bias")
    short = layer.split(".", 2)[2] if layer.startswith("blocks.") and layer.count(".") >= 2 else layer
    known = next((v for key, v in LAYER_ROLES.items() if short == key or short.endswith("." + key)), None)
    if known is None:
        return KIND_ROLES.get(row.kind, "a learned tensor")
    title, does = known
    if row.kind == "bias":
        after = "one offset per channel, after the gain" if "norm" in title else "one b per output, after the weights"
        return f"{title}: {after} (the b in y = w*x + b)"
    if row.kind == "norm gain":
        return f"{title}: one multiplier per channel (starts at 1)"
    if len(row.shape) == 2:  # a Linear weight is (out, in)
        does = does.format(out=row.shape[0], **{"in": row.shape[1]})
    return f"{title}: {does}" + ("; also the output head (tied)" if short == "tok_emb" and tied else "")


def display_name(name: str, n_layer: int) -> str | None:
    """The name as the parameter table shows it: block 0 stands for all blocks, the others are skipped."""
    if not name.startswith("blocks."):
        return name
    if not name.startswith("blocks.0."):
        return None
    return name.replace("blocks.0.", f"blocks.[0-{n_layer - 1}]." if n_layer > 1 else "blocks.0.")


def section_parameters(model: GPT, title: str, out: Callable[[str], None]) -> None:
    cfg, vocab = model.cfg, model.vocab_size
    rows = parameter_table(model)
    s = parameter_summary(rows)
    out(f"3. FROM ONE NEURON TO THE MODEL: {title}")
    out("  A Linear layer is many neurons side by side: y = W x + b, one row of W (the w's) and one entry of b")
    out("  per output. Every learnable number of the model sits in one of these tensors (the same table")
    out("  `train` prints and logs to TensorBoard):")
    out("")
    out("\n".join("  " + line for line in format_parameter_table(rows, cfg.n_layer, cfg.tie_embeddings).splitlines()))
    out("")
    out("  What each tensor does:")
    width = max(len(display_name(r.name, cfg.n_layer) or "") for r in rows)
    for r in rows:
        shown = display_name(r.name, cfg.n_layer)
        if shown:
            out(f"    {shown:<{width}}  {role(r, cfg.tie_embeddings)}")
    if cfg.tie_embeddings:
        out(f"    {'head.weight':<{width}}  output head: tok_emb.weight again (tied), scores every token as the next one")
    if s["biases"] == 0:
        out("  This recipe has no biases (model.bias=false): every learnable number is a weight, each neuron computes")
        out("  y = w*x with no + b, and the norms have gains only. model.bias=true puts the b's back.")
    else:
        out(f"  Weights {s['weights']:,} and biases {s['biases']:,}: the primer's \"parameters = weights + biases\".")
    out("")
    total, formula = s["total"], parameter_formula(cfg, vocab)
    formula_line, per_block = formula_text(cfg)
    out(f"  The count in closed form (V vocabulary, T context, C width, L layers): {formula_line}")
    out(f"    {per_block}")
    out(f"    {'':<14}{'layers':>7}{'width':>7}{'context':>8}{'vocab':>8}{'parameters':>16}")
    models = [("this model", cfg, vocab), ("GPT-2 small", GPT2_SMALL, GPT2_VOCAB), ("GPT-2 XL", GPT2_XL, GPT2_VOCAB)]
    for label, c, v in models:
        note = {"this model": "= the table's total" if formula == total else "",
                "GPT-2 XL": "the primer's \"GPT-2 -> 1.5B parameters\""}.get(label, "")
        count = parameter_formula(c, v)
        out(f"    {label:<14}{c.n_layer:>7}{c.n_embd:>7}{c.block_size:>8}{v:>8,}{count:>16,}  {note}".rstrip())
    gpt2_formula = formula_text(GPT2_SMALL)[0]
    if formula_line != gpt2_formula:  # the GPT-2 rows count GPT-2's own architecture
        out(f"    (the GPT-2 rows by GPT-2's architecture: {gpt2_formula})")


# ---------------------------------------------------------------- 4. one real optimizer step


@dataclass
class Watched:
    """One entry of a parameter tensor through one AdamW step, with the optimizer's memory of it."""

    name: str  # e.g. "blocks.0.attn.qkv.weight[3, 17]"
    kind: str  # "weight" or "bias"
    before: float
    grad: float  # as AdamW received it: clipped to train.grad_clip, as in training
    after: float
    m: float  # AdamW's running average of the gradient, before this step (0 on the first step)
    v: float  # ... and of the squared gradient
    t: int  # steps AdamW had taken before this one
    weight_decay: float  # of the entry's optimizer group


@dataclass
class StepReport:
    loss_before: float
    loss_after: float  # on the same batch
    weight: Watched
    bias: Watched | None  # None when the model has no biases
    lr: float
    betas: tuple[float, float]
    eps: float
    how: str  # which AdamW: "the run's own state after step N", "fresh, as at step 0", ...


def pick_pair(model: nn.Module) -> tuple[str, str | None]:
    """A weight matrix and the bias of the same layer (the first layer that has both), else any matrix."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dim() == 2 and "emb" not in name and name.endswith(".weight"):
            bias = name.removesuffix(".weight") + ".bias"
            if bias in params:
                return name, bias
    return next(n for n, p in params.items() if p.dim() == 2 and "emb" not in n), None


@torch.no_grad()
def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on (x, y) without dropout, so that before and after compare."""
    model.eval()
    return model(x, y)[1].item()


def optimizer_step(model: GPT, x: torch.Tensor, y: torch.Tensor, train_cfg, lr: float,
                   optimizer_state: dict | None = None, step: int = 0) -> StepReport:
    """One training step on batch (x, y), the training loop's own (tinylm.step.train_step: forward,
    backward, the gradient clipped to train.grad_clip, the update), watching the entry with the largest
    gradient of one weight matrix and of that layer's bias as the optimizer receives them. The optimizer
    is the run's (tinylm.optim.make_optimizer, its state from `optimizer_state` after `step` steps if
    given) when that is AdamW, else a fresh AdamW with the same weight decay on matrices and embeddings:
    the lesson explains AdamW's rule, number by number."""
    from tinylm.distributed import Dist
    from tinylm.optim import make_optimizer
    from tinylm.step import MicroBatch, make_learner, train_step

    device = next(model.parameters()).device
    opt = make_optimizer(model, train_cfg, device)
    if type(opt) is torch.optim.AdamW:
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        how = f"with the run's own state after step {step:,}" if optimizer_state is not None else "fresh, as at step 0"
    else:
        how = f"fresh (this run trains with {type(opt).__name__}; the lesson's step is AdamW's)"
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        others = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": train_cfg.weight_decay},
                                 {"params": others, "weight_decay": 0.0}], betas=(train_cfg.beta1, train_cfg.beta2))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    loss_before = eval_loss(model, x, y)
    model.train()
    params = dict(model.named_parameters())
    weight_name, bias_name = pick_pair(model)
    watched: dict[str, Callable[[], Watched]] = {}

    def watch(name: str) -> Callable[[], Watched]:
        """The entry's gradient and AdamW's memory now, just before the update; its value after, when called."""
        p = params[name]
        index = tuple(int(i) for i in np.unravel_index(int(p.grad.abs().argmax()), tuple(p.shape)))
        memory = opt.state.get(p) or {}
        m, v = (memory[k][index].item() if memory else 0.0 for k in ("exp_avg", "exp_avg_sq"))
        t = int(memory["step"]) if memory else 0
        before, grad = p[index].item(), p.grad[index].item()
        label = f"{name}[{', '.join(map(str, index))}]"
        kind = "bias" if name.endswith(".bias") else "weight"
        return lambda: Watched(label, kind, before, grad, p[index].item(), m, v, t, decay[id(p)])

    def before_update(optimizer, args, kwargs) -> None:  # the gradients are final (clipped) by now
        watched.update({name: watch(name) for name in (weight_name, bias_name) if name})

    hook = opt.register_step_pre_hook(before_update)
    try:
        train_step(make_learner(model, opt, Dist(device), None, compile=False), [MicroBatch(x, y)], lr,
                   train_cfg.grad_clip)
    finally:
        hook.remove()
    return StepReport(loss_before, eval_loss(model, x, y), watched[weight_name](),
                      watched[bias_name]() if bias_name else None, lr, opt.defaults["betas"], opt.defaults["eps"], how)


def adamw_by_hand(w: Watched, lr: float, betas: tuple[float, float], eps: float) -> float:
    """torch.optim.AdamW's update of one number, written out: running averages m and v of the gradient
    and its square, corrected for starting at 0, then w <- w (1 - lr wd) - lr m^ / (sqrt(v^) + eps)."""
    b1, b2 = betas
    t = w.t + 1
    m = b1 * w.m + (1 - b1) * w.grad
    v = b2 * w.v + (1 - b2) * w.grad ** 2
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return w.before * (1 - lr * w.weight_decay) - lr * m_hat / (v_hat ** 0.5 + eps)


def section_step(report: StepReport, how: str, out: Callable[[str], None]) -> None:
    r = report
    b1, b2 = r.betas
    out(f"4. ONE REAL TRAINING STEP: {how}")
    out(f"  loss on this batch: {r.loss_before:.4f} before the step, {r.loss_after:.4f} after it")
    out("  The primer's rule is w <- w - lr*g. AdamW (tinylm's optimizer for embeddings, gains and biases; by default Muon")
    out("  moves the blocks' weight matrices, see tinylm/optim.py) divides a running average of the gradient")
    out(f"  (m <- {b1:g} m + {1 - b1:.2g} g) by a running average of its size (v <- {b2:g} v + {1 - b2:.2g} g^2), so every"
        " number moves")
    out("  by about lr whatever its gradient's scale, and it pulls weights (not biases) towards 0 by lr*wd*w:")
    out("      w <- w (1 - lr*wd) - lr * m^ / (sqrt(v^) + eps)   (m^, v^: m and v corrected for starting at 0)")
    for w in (r.weight, r.bias):
        if w is None:
            continue
        by_hand = adamw_by_hand(w, r.lr, r.betas, r.eps)
        out(f"  {w.kind} {w.name}, the entry with the largest gradient (AdamW step {w.t + 1}):")
        out(f"    before {w.before:+.6f}  gradient {w.grad:+.6f}  after {w.after:+.6f}  (by hand {by_hand:+.6f};"
            f" the primer's rule would give {w.before - r.lr * w.grad:+.6f})")
    out("  Training does this to every parameter at once, step after step: that is all `tinylm train` does.")
    if r.bias is None:
        out("  This recipe has no biases (model.bias=false), so there is no b to watch: every parameter here is a weight.")


# ---------------------------------------------------------------- 5. neighbours


def token_id(tok, word: str) -> int:
    """The id of `word` as one token: ' word' (as it appears mid-sentence) if that is one token, else 'word'."""
    for text in dict.fromkeys([" " + word, word]):
        try:
            ids = tok.encode(text)
        except UserError:  # a character tokenizer that never saw a space
            continue
        if len(ids) == 1:
            return ids[0]
    pieces = " + ".join(repr(tok.decode([i])) for i in tok.encode(word))
    raise UserError(f"{word!r} is not a single token of this run's vocabulary (it splits into {pieces}); "
                    "--neighbors takes single tokens")


def nearest_neighbors(emb: torch.Tensor, query: int, k: int = 8) -> list[tuple[int, float]]:
    """The k rows of emb closest to row `query` by cosine similarity, best first, the query left out."""
    unit = F.normalize(emb.float(), dim=1)
    sims = unit @ unit[query]
    sims[query] = -float("inf")
    best = torch.topk(sims, min(k, len(emb) - 1))
    return list(zip(best.indices.tolist(), best.values.tolist()))


def section_neighbors(emb: torch.Tensor, tok, words: list[str], example: int, trained: bool,
                      out: Callable[[str], None]) -> None:
    """emb: the token embedding matrix; example: a token to show the vector of when no words are given."""
    from tinylm.tblog import token_label

    emb = emb[: tok.vocab_size]
    ids = [token_id(tok, w) for w in words]
    out(f"5. TOKENS AS VECTORS: the token embedding matrix, {emb.shape[0]:,} tokens x {emb.shape[1]} numbers")
    first = ids[0] if ids else example
    vector = ", ".join(f"{v:.2f}" for v in emb[first, :4].tolist())
    out(f"  the primer's \"cat\" -> [0.25, -0.1, 0.4, ...]; here {token_label(tok, first)} -> [{vector}, ...]"
        f" ({emb.shape[1]} numbers, learned)")
    if not trained:
        out("  (this run has not been trained yet: its vectors are still random, and so are their neighbours)")
    if not ids:
        out("  Nearest tokens by cosine similarity: tinylm explain RUN_DIR --neighbors WORD [WORD ...]")
        return
    out("  Nearest tokens by cosine similarity (1 = same direction, 0 = unrelated):")
    for word, i in zip(words, ids):
        near = ", ".join(f"{token_label(tok, j)} {sim:.2f}" for j, sim in nearest_neighbors(emb, i, k=6))
        out(f"    {token_label(tok, i):>12}: {near}")


# ---------------------------------------------------------------- the lesson


def _train_tokens(run_dir: Path, cfg: Config, tok) -> tuple[np.ndarray, str]:
    """The token ids a run trained on: its data cache if still there, else prepared again from its config."""
    from tinylm import rundir
    from tinylm.data import prepare

    info = rundir.read_data(run_dir)  # {} if missing or damaged: prepare the data again
    cache = Path(info.get("cache", ""))
    if info and (cache / "train.bin").is_file():
        return np.memmap(cache / "train.bin", dtype=np.dtype(info["dtype"]), mode="r"), f"the run's training data ({cache})"
    prep = prepare(cfg.data, tokenizer=tok)  # the run's own tokenizer (a fine-tuned GPT-2's, say), not a new one
    return prep.train, f"the run's training data ({prep.dir})"


def explain(run_dir: str | Path | None = None, neighbors: list[str] | None = None,
            out: Callable[[str], None] = print) -> None:
    """Print the lesson: the default recipe's untrained model, or the trained model in run_dir."""
    from tinylm import rundir
    from tinylm.data import get_batch, prepare
    from tinylm.optim import learning_rate, progress

    neighbors = neighbors or []
    if run_dir is None and neighbors:
        raise ValueError("neighbours need a trained run_dir")
    if run_dir is None:
        cfg = Config()
        prep = prepare(cfg.data)
        tok, ids = prep.tokenizer, prep.train
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model, tok.vocab_size)
        title = "the default recipe (configs/default.yaml), untrained"
        source = f"the built-in corpus ({prep.dir})"
        step, elapsed, optimizer_state = 0, 0.0, None
    else:
        run_dir = Path(run_dir)
        cfg, tok, model, state = rundir.load(run_dir, "cpu")
        for w in neighbors:  # a bad word fails now, before the long output
            token_id(tok, w)
        ids, source = _train_tokens(run_dir, cfg, tok)
        step, elapsed, optimizer_state = state.get("step", 0), state.get("elapsed", 0.0), state.get("optimizer")
        title = f"{run_dir}, trained {step:,} steps"

    section_neuron(out)
    out("")
    section_activations(model, out)
    out("")
    section_parameters(model, title, out)
    out("")
    batch = min(cfg.train.batch_size, 8)
    x, y = get_batch(ids, batch, cfg.model.block_size, torch.Generator().manual_seed(0), torch.device("cpu"))
    emb = model.tok_emb.weight.detach().clone()  # as trained: the step below is the lesson's, not the run's
    lr = learning_rate(step, progress(step, elapsed, cfg.train), cfg.train)
    report = optimizer_step(model, x, y, cfg.train, lr, optimizer_state, step)
    section_step(report, f"{batch} windows of {cfg.model.block_size} tokens from {source};\n  AdamW {report.how}, "
                 f"learning rate {lr:.3g} (the schedule's at step {step:,})", out)
    if run_dir is not None:
        out("")
        section_neighbors(emb, tok, neighbors, int(x[0, 0]), step > 0, out)
