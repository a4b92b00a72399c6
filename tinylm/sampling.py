"""What `tinylm sample` shows besides the text: each token's probability, and an interactive prompt.

    tinylm sample runs/default --prompt "The" --show_probs    # every token with its probability and rivals
    tinylm sample runs/default -i                              # type a line, read its continuation; repeat

--show_probs prints one line per sampled token: the probability it was drawn with (after temperature,
top_k and top_p: at a low temperature the likely tokens take nearly everything, top_p cuts the tail to
zero) and the TOP most likely alternatives, then the whole text. On a terminal the token is coloured by
its probability (green likely, yellow, red unlikely); piped, the output is plain text.

-i keeps the model loaded and streams a continuation of each line read from standard input (on a
terminal after a "> " prompt), until end of input. With --seed every line is sampled from that seed, so
a line gives what `tinylm sample --prompt LINE --seed S` gives.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, TextIO

import torch

from tinylm.generate import generate_steps, stream_text

TOP = 3  # alternatives shown beside each token
COLOURS = ((0.5, "\033[32m"), (0.1, "\033[33m"), (0.0, "\033[31m"))  # green, yellow, red by probability
RESET = "\033[0m"


@dataclass(frozen=True)
class Choice:
    token: int
    probability: float  # the probability it was drawn with
    alternatives: list[tuple[int, float]]  # the TOP most likely tokens (the chosen one among them, if it is)


def choices(model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
            gen: torch.Generator | None, stop_id: int | None = None) -> Iterable[Choice]:
    """Each sampled token with its probability and the most likely alternatives, as they are chosen."""
    for token, probs in generate_steps(model, ids, max_new_tokens, temperature, top_k, top_p, gen, stop_id=stop_id):
        p, alt = probs.topk(min(TOP, probs.size(-1)))
        yield Choice(token, float(probs[token]), list(zip(alt.tolist(), p.tolist())))


def percent(p: float) -> str:
    """62.1%, or for a small probability its first two digits: 0.021%."""
    return f"{p:.1%}" if p >= 0.001 or p == 0 else f"{p * 100:.2g}%"


def colour(probability: float) -> str:
    return next(code for bound, code in COLOURS if probability >= bound)


def format_choice(c: Choice, decode: Callable[[list[int]], str], coloured: bool) -> str:
    """" sat'    62.1%   ' is' 12.0%  ' was' 5.3%": the token, its probability, the alternatives."""
    shown = f"{decode([c.token])!r:<14} {percent(c.probability):>7}"
    if coloured:
        shown = colour(c.probability) + shown + RESET
    rivals = "  ".join(f"{decode([i])!r} {percent(p)}" for i, p in c.alternatives if i != c.token)
    return f"{shown}   {rivals}"


def show_probs(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
               top_p: float | None, gen: torch.Generator | None, out: TextIO = sys.stdout,
               coloured: bool | None = None) -> list[Choice]:
    """Print each token's line (`format_choice`) as it is chosen, then the whole text; return the choices."""
    coloured = out.isatty() if coloured is None else coloured
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    print(f"{'token':<14} {'p':>7}   top alternatives (temperature {temperature:g}"
          f"{f', top_k {top_k}' if top_k else ''}{f', top_p {top_p:g}' if top_p else ''})", file=out)
    made = []
    for c in choices(model, ids, max_new_tokens, temperature, top_k, top_p, gen):
        made.append(c)
        print(format_choice(c, tok.decode, coloured), file=out, flush=True)
    print("\n" + prompt + tok.decode(c.token for c in made), file=out, flush=True)
    return made


def interactive(model, tok, lines: Iterable[str], max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int | None, device, out: TextIO = sys.stdout, probs: bool = False) -> None:
    """For each line, stream its continuation to `out` (the model stays loaded between lines); with
    `probs`, each token's line as --show_probs prints it."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    ask = sys.stdin.isatty() and out.isatty()
    for line in prompts(lines, ask, out):
        if seed is not None:
            gen.manual_seed(seed)
        if probs:
            show_probs(model, tok, line, max_new_tokens, temperature, top_k, top_p, gen, out)
            continue
        print(line, end="", file=out, flush=True)
        for piece in stream_text(model, tok, line, max_new_tokens, temperature, top_k, top_p, gen):
            print(piece, end="", file=out, flush=True)
        print("\n", file=out, flush=True)


def prompts(lines: Iterable[str], ask: bool, out: TextIO) -> Iterable[str]:
    """The lines without their line ends, after a "> " prompt each when a person types them."""
    it = iter(lines)
    while True:
        if ask:
            print("> ", end="", file=out, flush=True)
        line = next(it, None)
        if line is None:
            return
        yield line.rstrip("\r\n")
