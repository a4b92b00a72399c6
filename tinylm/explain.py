"""`tinylm explain [RUN_DIR] [--neighbors TOKEN ...]`: the one-neuron lesson, then the real model.

    tinylm explain                                   # the default recipe's model, untrained
    tinylm explain runs/default --neighbors the if   # a trained run, and the tokens nearest to ' the', ' if'

The lesson, every number computed by PyTorch as it is printed:

1. One neuron, y = w*x + b, the worked example of `docs/lesson.md`, and
2. the activation functions: both in tinylm/lesson.py (pure torch, no model).
3. Every parameter tensor of the model (the same table `train` prints and logs to TensorBoard), what
   each one does, and the parameter-count formula applied to this model, GPT-2 small and GPT-2 XL.
4. One real AdamW step on a real batch: one weight and one bias before, their gradient, and after.
5. With a trained run: the nearest tokens to a few tokens, by cosine similarity of their embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.anatomy import (
    GPT2_SMALL,
    GPT2_VOCAB,
    GPT2_XL,
    display_name,
    format_parameter_table,
    formula_text,
    parameter_formula,
    parameter_summary,
    parameter_table,
    role,
)
from tinylm.config import Config
from tinylm.errors import UserError
from tinylm.lesson import section_activations, section_neuron
from tinylm.model import ACTIVATIONS, GPT

# ---------------------------------------------------------------- 3. parameters


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
        out(f"  Weights {s['weights']:,} and biases {s['biases']:,}: the lesson's \"parameters = weights + biases\".")
    out("")
    total, formula = s["total"], parameter_formula(cfg, vocab)
    formula_line, per_block = formula_text(cfg)
    out(f"  The count in closed form (V vocabulary, T context, C width, L layers): {formula_line}")
    out(f"    {per_block}")
    out(f"    {'':<14}{'layers':>7}{'width':>7}{'context':>8}{'vocab':>8}{'parameters':>16}")
    models = [("this model", cfg, vocab), ("GPT-2 small", GPT2_SMALL, GPT2_VOCAB), ("GPT-2 XL", GPT2_XL, GPT2_VOCAB)]
    for label, c, v in models:
        note = {"this model": "= the table's total" if formula == total else "",
                "GPT-2 XL": "the lesson's \"1.5 billion\""}.get(label, "")
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
    out("  The lesson's rule is w <- w - lr*g. AdamW (tinylm's optimizer for embeddings, gains and biases; by default Muon")
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
            f" the lesson's rule would give {w.before - r.lr * w.grad:+.6f})")
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
    out(f"  the lesson's \"cat\" -> [0.25, -0.1, 0.4, ...]; here {token_label(tok, first)} -> [{vector}, ...]"
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
    """The token ids a run trained on: its data cache if still there, else prepared again from its config
    (unless they were texts held in memory: no file keeps those)."""
    from tinylm import rundir
    from tinylm.prepare import prepare

    info = rundir.read_data(run_dir)  # {} if missing or damaged: prepare the data again
    cache = Path(info.get("cache", ""))
    if info and (cache / "train.bin").is_file():
        return np.memmap(cache / "train.bin", dtype=np.dtype(info["dtype"]), mode="r"), f"the run's training data ({cache})"
    if rundir.trained_on_texts(run_dir):
        raise UserError(f"{run_dir} was trained on texts held in memory and its data cache {cache} is gone, so its "
                        "training tokens are not available for the lesson's real training step; train it again to "
                        "explain it")
    prep = prepare(cfg.data, tokenizer=tok)  # the run's own tokenizer (a fine-tuned GPT-2's, say), not a new one
    return prep.train, f"the run's training data ({prep.dir})"


def explain(run_dir: str | Path | None = None, neighbors: list[str] | None = None,
            out: Callable[[str], None] = print) -> None:
    """Print the lesson: the default recipe's untrained model, or the trained model in run_dir."""
    from tinylm import rundir
    from tinylm.batches import get_batch
    from tinylm.optim import learning_rate, progress
    from tinylm.prepare import prepare

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
    section_activations(cfg.model.mlp, ACTIVATIONS[cfg.model.mlp], out)
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
