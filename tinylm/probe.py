"""The probe: one fixed text the model reads at every evaluation, so that a user watches it learn.

At each evaluation the training loop (tinylm/loop.py) calls `log_probe`, which writes to TensorBoard:

* `probe/loss` and `probe/token_loss/NN_<token>`: the loss on each token of the probe (-log of the
  probability the model gave it, reading the tokens before it): one curve per token, falling as it learns.
* the text `probe/predictions`: the model's top next-token candidates with their probabilities at a few
  positions, beside the token that really comes next.
* images `probe/attention/layerL/headH`: each head's attention probabilities over the probe (row t: how
  much token t reads each earlier token; white = 1), recomputed by tinylm.model.attention_maps. Heads
  start out spreading attention evenly and grow structure (the previous token, the start of a word).

The probe is train.probe, or by default a fixed line of the validation split (`default_text`: the same
line for the same data), at most PROBE_TOKENS tokens of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinylm.errors import UserError
from tinylm.model import GPT, attention_maps

PROBE_TOKENS = 32  # the probe's length at most: a readable attention map, a handful of curves
SHOWN_POSITIONS = 4  # positions whose next-token candidates the text shows
TOP = 5  # candidates shown at each
MAX_ATTENTION_IMAGES = 16  # a big model shows an even selection of its layers and heads
PIXELS = 4  # each token is a PIXELS x PIXELS square in an attention image
SEARCHED_TOKENS = 4096  # the default probe is a line from the start of this much of the validation split


@dataclass(frozen=True)
class Probe:
    text: str  # the probe, as its tokens decode
    ids: list[int]
    labels: list[str]  # each token's text, as Python writes it (quotes show spaces)


@dataclass
class Reading:
    """What the model made of the probe, computed by `read`."""

    losses: list[float]  # losses[i]: the loss on token i + 1, predicted from tokens 0..i
    candidates: dict[int, list[tuple[int, float]]]  # position -> its TOP (token id, probability), most likely first
    attention: list[torch.Tensor]  # per layer (n_head, T, T)

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def default_text(tokenizer, val_ids: np.ndarray) -> str:
    """The first whole line of 20 characters or more at the start of the validation split (the split
    starts where a document's held-out part does, possibly mid-line, so its first line is skipped)."""
    ids = [int(i) for i in val_ids[:SEARCHED_TOKENS]]
    # Documents end with the end-of-text token, whose text is no line of the corpus: a line break instead.
    text = "\n".join(tokenizer.decode(piece) for piece in split_at(ids, tokenizer.eot_id))
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines[1:] if len(line) >= 20), text.strip() or text)


def split_at(ids: list[int], separator: int) -> list[list[int]]:
    pieces: list[list[int]] = [[]]
    for i in ids:
        if i == separator:
            pieces.append([])
        else:
            pieces[-1].append(i)
    return pieces


def make_probe(setting: str, tokenizer, val_ids: np.ndarray, block_size: int) -> Probe | None:
    """The probe of train.probe (None for "none"), cut to PROBE_TOKENS tokens and the context length."""
    if setting.strip().lower() == "none":
        return None
    text = setting or default_text(tokenizer, val_ids)
    try:
        ids = tokenizer.encode(text)[: min(PROBE_TOKENS, block_size)]
    except UserError as e:
        raise UserError(f"train.probe: {e}") from None
    if len(ids) < 2 and not setting:  # a context of one token: nothing to probe
        return None
    if len(ids) < 2:
        raise UserError(f"train.probe must be at least 2 tokens long to have a next token to predict, got {text!r}")
    labels = [repr(tokenizer.decode([i])) for i in ids]
    return Probe(tokenizer.decode(ids), ids, labels)


def shown_positions(n_tokens: int, n: int = SHOWN_POSITIONS) -> list[int]:
    """n positions spread evenly over the probe's n_tokens - 1 predictions, the last one included."""
    return sorted({round(x) for x in np.linspace(0, n_tokens - 2, min(n, n_tokens - 1))})


@torch.no_grad()
def read(model: GPT, probe: Probe) -> Reading:
    """The model's losses, top candidates and attention on the probe (float32, eval mode, then as it was)."""
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([probe.ids], device=model.head.weight.device)
        logits = model(idx)[0][0].float()  # (T, V)
        losses = F.cross_entropy(logits[:-1], idx[0, 1:], reduction="none")
        probs = logits.softmax(dim=-1)
        candidates = {}
        for pos in shown_positions(len(probe.ids)):
            p, ids = probs[pos].topk(min(TOP, probs.size(-1)))
            candidates[pos] = list(zip(ids.tolist(), p.tolist()))
        maps = [m[0].cpu() for m in attention_maps(model, idx)]
    finally:
        model.train(was_training)
    return Reading(losses.tolist(), candidates, maps)


def tag_label(label: str) -> str:
    """A token's label as TensorBoard keeps it in a tag (letters, digits, _ . - only)."""
    return re.sub(r"[^\w.-]", "_", label.strip("'\"")) or "_"


def predictions_table(probe: Probe, reading: Reading, tokenizer) -> str:
    """Markdown: at each shown position, the text so far, the real next token and the model's candidates."""
    rows = ["| after | next token | its loss | the model's top candidates |", "|---|---|---|---|"]
    for pos, cands in reading.candidates.items():
        context = tokenizer.decode(probe.ids[max(0, pos - 5): pos + 1])
        shown = ", ".join(f"`{tokenizer.decode([i])!r}` {p:.1%}" for i, p in cands)
        rows.append(f"| `…{context!r}` | `{probe.labels[pos + 1]}` | {reading.losses[pos]:.3f} | {shown} |")
    return f"probe: `{probe.text!r}`, mean loss {reading.loss:.3f}\n\n" + "\n".join(rows)


def attention_selection(n_layer: int, n_head: int, cap: int = MAX_ATTENTION_IMAGES) -> list[tuple[int, int]]:
    """(layer, head) pairs to draw: all of them, or for a big model evenly spaced layers (first and last
    among them) times evenly spaced heads, at most `cap` images."""
    if n_layer * n_head <= cap:
        return [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    per = max(1, int(cap**0.5))
    layers = sorted({round(x) for x in np.linspace(0, n_layer - 1, min(per, n_layer))})
    heads = sorted({round(x) for x in np.linspace(0, n_head - 1, min(cap // len(layers), n_head))})
    return [(layer, head) for layer in layers for head in heads]


def attention_image(weights: torch.Tensor) -> torch.Tensor:
    """A (T, T) map of probabilities as a grey image (T * PIXELS square; 0 black, 1 white)."""
    return weights.float().repeat_interleave(PIXELS, 0).repeat_interleave(PIXELS, 1).clamp(0, 1)


def log_probe(writer, model: GPT, probe: Probe, tokenizer, step: int) -> Reading:
    """Read the probe and write what the model made of it to TensorBoard (see the module's docstring)."""
    reading = read(model, probe)
    writer.add_scalar("probe/loss", reading.loss, step)
    for i, loss in enumerate(reading.losses):
        writer.add_scalar(f"probe/token_loss/{i + 1:02d}_{tag_label(probe.labels[i + 1])}", loss, step)
    writer.add_text("probe/predictions", predictions_table(probe, reading, tokenizer), step)
    for layer, head in attention_selection(len(reading.attention), reading.attention[0].size(0)):
        writer.add_image(f"probe/attention/layer{layer}/head{head}", attention_image(reading.attention[layer][head]),
                         step, dataformats="HW")
    return reading
