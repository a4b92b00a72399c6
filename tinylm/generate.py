"""Sampling text from a trained model, one token at a time, with a KV cache.

`generate` yields token ids as they are chosen, so a caller can print them while the model works.
With the cache each new token runs the model on that one token only. The model sees at most
`block_size` tokens; when the window is full it keeps the most recent half and recomputes their
keys and values once, which keeps the average cost per token flat however long the output grows.
Without the cache (`use_cache=False`) every step re-runs the model on the same window: slower, same
tokens, for every position scheme.

Why recompute rather than keep rolling the cache? With learned positions each slot has a fixed
position, so old keys cannot be shifted. With rotary positions attention depends only on distances,
so old keys could stay, but the result would no longer be the model run on the window: from the
second layer on, a cached key was computed from tokens that have since left the window, and a rolling
cache silently becomes sliding-window attention. Recomputing keeps both paths the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from tinylm.errors import UserError
from tinylm.model import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with probability >= top_p."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # after the nucleus is complete
        drop_sorted[..., 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The probabilities the next token is drawn with: softmax(logits / temperature), zero outside top_k
    and top_p. At temperature 0 (always the most likely token) the model's own softmax, for showing."""
    if temperature == 0:
        return logits.float().softmax(dim=-1)
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator | None,
         probs: torch.Tensor | None = None) -> int:
    """One token id from the last position's logits (or their `distribution`, probs, if already computed);
    temperature 0 means always the most likely."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = distribution(logits, temperature, top_k, top_p) if probs is None else probs
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, gen: torch.Generator | None = None, use_cache: bool = True,
             stop_id: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt` (which must not be empty)."""
    steps = generate_steps(model, prompt, max_new_tokens, temperature, top_k, top_p, gen, use_cache, stop_id)
    try:
        for token, _ in steps:
            yield token
    finally:
        steps.close()  # puts the model back in its mode now, not when collected


@torch.no_grad()  # not inference_mode: FSDP2 in older torch fails to unshard under it
def generate_steps(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    gen: torch.Generator | None = None,
    use_cache: bool = True,
    stop_id: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """`generate`'s tokens, each with the `distribution` it was drawn from (V probabilities)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    block = model.cfg.block_size
    keep = max(1, block // 2)
    tokens = list(prompt)
    start = max(0, len(tokens) - block)  # the window the model sees is tokens[start:]
    cache = model.new_cache() if use_cache else None

    def run(ids: list[int]) -> torch.Tensor:
        logits, _ = model(torch.tensor([ids], device=device), cache=cache)
        return logits[0, -1]

    try:
        logits = run(tokens[start:])
        for _ in range(max_new_tokens):
            probs = distribution(logits, temperature, top_k, top_p)
            nxt = pick(logits, temperature, top_k, top_p, gen, probs)
            yield nxt, probs
            if nxt == stop_id:
                return
            tokens.append(nxt)
            if len(tokens) - start > block:  # window full: slide it by half and recompute once
                start = len(tokens) - keep
                if cache is not None:
                    cache.length = 0
                logits = run(tokens[start:])
            elif cache is not None:
                logits = run([nxt])
            else:
                logits = run(tokens[start:])
    finally:
        model.train(was_training)


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                  flag: str = "") -> None:
    """A UserError for a sampling option out of range, named as the caller spells it (`flag` "--" on the
    command line, "" in Python)."""
    if max_new_tokens < 1:
        raise UserError(f"{flag}max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserError(f"{flag}temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"{flag}top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"{flag}top_p must be in (0, 1], got {top_p}")


def stream_text(model: GPT, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None,
                gen: torch.Generator | None = None) -> Iterator[str]:
    """The text that continues `prompt` (not the prompt itself), in pieces as the tokens are chosen; a
    piece comes once its bytes form whole characters. With no prompt the text starts a document. The
    prompt is encoded now, so one the tokenizer cannot read fails before any text is shown."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    stream = tokenizer.stream_decoder()
    tokens = generate(model, ids, max_new_tokens, temperature, top_k, top_p, gen)
    return (piece for piece in (stream.step(tokenizer.tok, token) for token in tokens) if piece)
