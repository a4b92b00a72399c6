"""The run planner: the model shape, batch, warmup and dropout that the budget, the corpus and this machine's
speed call for. Pure arithmetic: the speeds come from tinylm/timings.py, the rule from benchmarks/sweep.py.

    p = plan(budget_s=60, max_steps=10**6, corpus_tokens=1_003_837, tokenizer="char", speeds={...})
    p.values   # {"model.n_layer": 3, ..., "model.dropout": 0.0, "train.warmup_steps": 30}
    p.lines    # ["plan: budget 60 s; this machine trains ...", "plan: ..."]

The rule. A model of N parameters (in its blocks, embeddings not counted) that trains on D tokens drawn
from a corpus of U tokens reaches a validation loss of about

    L(N, D, U) = E + A / N^alpha + B / D_eff^beta + C (N / U)^gamma (D / U)^delta,   D_eff = U R (1 - exp(-D / (U R)))

after the data-constrained scaling law of Muennighoff et al. (2023): repeated tokens are worth less than
fresh ones, and after R passes hardly anything (D_eff saturates at U * R); the last term is what a model
loses to memorising its corpus, growing with the passes over it (D / U, held at MAX_PASSES) and faster
for a model large for the corpus. The constants are fitted (benchmarks/fit.py) per tokenizer kind (a
character's loss and a BPE token's are on different scales; see LAWS for the data behind each), the
memorising term's shared. E is where a corpus's own difficulty goes, and no choice depends on it, so a
corpus never measured is planned alike.

With a time limit, each shape of the LADDER gets the tokens its measured tokens/s buy in the budget, less
what evaluations and samples take (`budget_tokens`), and the shape with the lowest L wins. With a step
limit only, D = steps x the shape's tokens per step, and a larger shape wins only by MIN_GAIN (no clock:
a bigger model costs time the rule cannot see). Dropout follows the passes over the corpus that choice
makes; warmup is a tenth of the expected steps, at most 30; evaluations use fewer batches where 20 would
take more than EVAL_SHARE of the budget; a planned shape comes with QK-norm, and for characters an untied
output head (ARCHITECTURE); character models take a higher learning rate for their embeddings
(EMBEDDING_LR); with a time limit and no max_steps of the user's, the step limit
is lifted to twice the expected steps, so the clock ends the run, unless that would take it past
MAX_PASSES over its corpus: then it ends there, before its time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# (n_layer, n_embd, n_head, block_size, batch_size), smallest first. A-E are the shapes the sweep trained;
# F and G (for fast machines: a GPU, a big CPU) are predicted by the fitted law beyond its data.
# C, D and E read twice the context the sweep trained them at, at half the batch (the same tokens per step):
# on tiny Shakespeare's characters, in 180 s 3L/128 reached 1.4881 and 1.4798 (two seeds) at context 128
# against 1.4947 and 1.5013 at 64; in 600 s 4L/192 (dropout 0.1) 1.4539 and 1.4583 at 256 against 1.4591
# and 1.4691 at 128, though 15-25% fewer tokens a second. A longer context learns more per token than the
# tokens it costs; the law, fitted at the shorter one, is a little pessimistic for them. A and B keep 64:
# at 2L/96, 128 lost (docs/planner.md).
LADDER: dict[str, tuple[int, int, int, int, int]] = {
    "A": (1, 64, 2, 64, 32), "B": (2, 96, 3, 64, 32), "C": (3, 128, 4, 128, 16), "D": (4, 192, 4, 256, 16),
    "E": (4, 256, 4, 256, 16), "F": (6, 384, 6, 256, 16), "G": (8, 512, 8, 256, 16),
}
SHAPE_KEYS = ("model.n_layer", "model.n_embd", "model.n_head", "model.block_size")
# Setting any of these makes the shape the user's: the plan then keeps the whole shape (and batch) as set.
OWN_SHAPE = (*SHAPE_KEYS, "model.n_kv_head", "model.mlp_hidden", "train.init_from")
TRAIN_SHARE = 0.95  # of the budget, the share left to training steps by logging and checkpoints
UNLIMITED = 10**12  # steps: no step limit
MIN_GAIN = 0.01  # by steps: a larger shape must predict at least this much lower loss to be chosen

# The fitted law, per tokenizer kind: (E, A, alpha, B, beta, R). BPE's is the sweep's fit (benchmarks/fit.py on
# benchmarks/results/sweep.csv, 2 + 1 tokenizer kinds, runs of up to 1.5 M tokens at the default AdamW lr 3e-3).
# The characters' is refitted to the current recipe (its planned lr 2e-2) on tiny Shakespeare's whole
# validation split, 7 runs of 2-33 M tokens (`python -m benchmarks.fit benchmarks/results/char_recipe.csv`):
# the sweep's law had the model's size matter too little (alpha 1.0), so at 600 s it planned the 2-layer model
# for 33 passes, which ended worse (1.5682) than the same plan at 180 s (1.5297).
LAWS = {
    "char": (1.36598, 5071.88, 0.9, 82044.0, 0.9, 8.0),
    "bpe": (3.66782, 12354.6, 1.0, 2346.01, 0.6, 8.0),
}
GAMMA, DELTA = 0.5, 2.0  # the memorising term's exponents, shared (the sweep's fit)
# The most passes over a corpus the sweep measured: the memorising term is held there beyond, rather than
# extrapolated to absurd losses, and a run the clock ends is planned for at most this many (plan()).
MAX_PASSES = 17.0
MEMORISING = 0.000531868  # C: one for both kinds (only character runs on a small corpus measured it)
# The AdamW part's peak learning rate (the token embeddings, which the output layer shares, and the norm
# gains; Muon's stays 0.02) for character models of the swept shapes A-E: on tiny Shakespeare's characters
# at fixed steps, 3e-3 (the default, tuned on BPE) -> 2e-2 took the validation loss from 1.6485 to 1.6058
# (2L/96, 1,300 steps; 1.6520 -> 1.6369 on another seed; 4e-2 1.5977, 8e-2 1.6192), 1.6015 -> 1.5939
# (3L/128, 1,000 steps) and 1.5466 -> 1.5381 (4L/192, 600 steps; 4e-2 1.5441). On BPE tokens it hurt (the
# built-in corpus, 2L/96, 800 steps: 3e-3 4.722, 1e-2 4.993, 2e-2 5.103), so BPE models keep the default.
# min_lr stays 3e-4: the cosine then ends at 1.5% of the peak (2L/96 at 2e-2 with min_lr 2e-3: 1.6217, not
# 1.6058). docs/planner.md has the table.
EMBEDDING_LR = {"char": 2e-2}
LR_SHAPES = ("A", "B", "C", "D", "E")
# The architecture planned with the shape, per tokenizer kind. QK-norm (RMSNorm on each head's queries and keys,
# as Qwen3 and OLMo 2 do) measured better on both kinds at fixed steps, whole validation split: characters of
# tiny Shakespeare 1.5939 -> 1.5647 (3L/128, 1,000 steps), the built-in corpus's BPE tokens 4.7221 -> 4.6398
# (2L/96, 800 steps). An output head of its own (not the embedding matrix) helps characters further, where it
# costs 65 x n_embd weights (QK-norm with it: 1.5536 at 3L/128; 1.6058 -> 1.5939 at 2L/96; 1.5381 -> 1.5223 at
# 4L/192), but not BPE, whose head would add vocab_size x n_embd weights to memorise a small corpus with (4.7221
# -> 4.8579). Both cost speed, 10-15% on 2 CPU cores; the timings (tinylm/timings.py) measure the shapes with
# them. Output projections (and an untied head) started at zero, on both kinds: on top of Muon orthogonalising
# q, k, v apart (tinylm/optim.py), 3L/128 characters 1.5289 -> 1.5192 (1.5395 -> 1.5427 on another seed), BPE
# 4.7039 -> 4.6542 (2L/96, 800 steps). Planned only for the default (Llama) family: a model.pos, norm, mlp or bias
# of the user's keeps theirs.
ARCHITECTURE = {"char": {"model.qk_norm": True, "model.tie_embeddings": False, "model.zero_init": True},
                "bpe": {"model.qk_norm": True, "model.zero_init": True}}
FAMILY_KEYS = ("model.pos", "model.norm", "model.mlp", "model.bias")


def architecture(tokenizer: str, explicit: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The ARCHITECTURE settings a planned shape gets, unless the user chose the model's family."""
    return {} if any(k in explicit for k in FAMILY_KEYS) else dict(ARCHITECTURE.get(tokenizer, {}))
# Dropout by passes over the corpus, (below this many passes, this dropout): in the sweep 0.1 lost to none up
# to 10 passes (4 layers, 192 wide, on 60 k characters), tied at 8 and won from 12 on (3 layers, 128 wide);
# the default recipe's 0.1 won at 10 passes of the built-in corpus (4 layers, 256 wide: config.py).
DROPOUT = ((10.0, 0.0), (math.inf, 0.1))
# With QK-norm and an untied head (ARCHITECTURE) a model memorises sooner: the 600 s plan on tiny Shakespeare (4L/256,
# 6.7 passes planned) ended at 1.5437 without dropout (train loss 1.05, its validation best 1.50 midway) and at
# 1.4611 with 0.1 (1.4591 for 4L/192 with 0.1 once dropout left the attention weights, 1.4835 with 0.2).
# So dropout also comes where the law's memorising term (a model large for its corpus, seen
# several times) reaches this: 0.043 there, 0.012 for the 180 s plan (3L/128, 5.2 passes), which ended at its best.
MEMORISING_DROPOUT = 0.02


def block_params(n_layer: int, n_embd: int) -> int:
    """Parameters in the transformer blocks of the default (Llama) architecture: attention's 4 C^2 and
    SwiGLU's 3 C H, H = 8/3 C rounded up to a multiple of 64 (tinylm/config.py's mlp_width)."""
    hidden = 64 * math.ceil(8 * n_embd / 3 / 64)
    return n_layer * (4 * n_embd * n_embd + 3 * n_embd * hidden)


def effective_tokens(tokens: float, corpus_tokens: float, repeats: float) -> float:
    """What `tokens` drawn from a corpus of corpus_tokens are worth as fresh tokens (Muennighoff et al.), when
    after about `repeats` passes hardly anything more is learnt."""
    limit = corpus_tokens * repeats
    return limit * -math.expm1(-tokens / limit)


def predicted_loss(shape: str, tokens: float, corpus_tokens: float, tokenizer: str) -> float:
    """The law's validation loss for a LADDER shape trained on `tokens` from a corpus of corpus_tokens."""
    e, a, alpha, b, beta, repeats = LAWS[tokenizer]
    n = block_params(*LADDER[shape][:2])
    d = effective_tokens(max(tokens, 1.0), corpus_tokens, repeats)
    passes = min(tokens / corpus_tokens, MAX_PASSES)  # not extrapolated past the sweep's data
    return e + a / n**alpha + b / d**beta + MEMORISING * (n / corpus_tokens) ** GAMMA * passes**DELTA


def floor(tokens: float, corpus_tokens: float, tokenizer: str) -> float:
    """A lower bound of the predicted loss of any LADDER shape trained on at most `tokens`: the largest shape's
    size term, the data term at `tokens`, no memorising."""
    e, a, alpha, b, beta, repeats = LAWS[tokenizer]
    largest = max(block_params(*shape[:2]) for shape in LADDER.values())
    return e + a / largest**alpha + b / effective_tokens(max(tokens, 1.0), corpus_tokens, repeats) ** beta


def tokens_per_step(shape: str) -> int:
    *_, block, batch = LADDER[shape]
    return block * batch


def dropout_for(passes: float, params: float = 0.0, corpus_tokens: float = 1.0) -> float:
    """DROPOUT's value for this many passes, or its last where the law's memorising term for a model of `params`
    block parameters reaches MEMORISING_DROPOUT."""
    memorising = MEMORISING * (params / max(corpus_tokens, 1.0)) ** GAMMA * min(passes, MAX_PASSES) ** DELTA
    return DROPOUT[-1][1] if memorising >= MEMORISING_DROPOUT else next(p for bound, p in DROPOUT if passes < bound)


@dataclass(frozen=True)
class Plan:
    values: dict[str, Any]  # config key -> planned value (the keys the user set explicitly left out)
    lines: list[str] = field(default_factory=list)  # what was chosen and why, for the log


@dataclass(frozen=True)
class Overhead:
    """What a run's evaluations cost out of its time budget: `evaluations` of up to `eval_batches` batches
    of each split, validation and training (a batch's forward pass is about a third of a training step),
    and `seconds` of sampling."""

    evaluations: int = 0
    eval_batches: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, evals: int, eval_batches: int, sample_tokens: int) -> Overhead:
        # One evaluation at step 0 and `evals` more; a sampled token costs about SAMPLE_SECONDS.
        return cls(evals + 1, eval_batches, (evals + 1) * sample_tokens * SAMPLE_SECONDS)

    def batches(self, speed: float, tokens_per_step: int, budget_s: float) -> int:
        """Batches per evaluation: eval_batches, fewer (down to MIN_EVAL_BATCHES) where evaluating would
        take more than EVAL_SHARE of the budget."""
        if not self.evaluations:
            return self.eval_batches
        affordable = EVAL_SHARE * budget_s * speed / (self.evaluations * SPLITS * tokens_per_step / 3)
        return int(max(MIN_EVAL_BATCHES, min(self.eval_batches, affordable)))


SAMPLE_SECONDS = 0.003  # seconds per sampled token of a small model on a CPU (its KV cache makes it cheap)
# Evaluations take at most EVAL_SHARE of the budget: on 2 cores a 60 s run that spent 8% of it evaluating
# (its val loss 1.648) reached 1.617 when it spent half that. SPLITS: each evaluation measures both splits.
EVAL_SHARE, MIN_EVAL_BATCHES, SPLITS = 0.05, 4, 2


def budget_tokens(speed: float, tokens_per_step: int, budget_s: float, overhead: Overhead) -> float:
    """The tokens a shape training at `speed` tokens/s trains on in budget_s, evaluations taken out."""
    eval_steps = overhead.evaluations * SPLITS * overhead.batches(speed, tokens_per_step, budget_s) / 3
    seconds = budget_s * TRAIN_SHARE - overhead.seconds - eval_steps * tokens_per_step / speed
    return max(seconds, 0.0) * speed


def choose(budget_s: float, max_steps: int, corpus_tokens: int, tokenizer: str,
           speeds: dict[str, float] | None, max_block: int = 10**9,
           overhead: Overhead = Overhead(), max_passes: float = math.inf) -> tuple[str, float]:
    """(the LADDER shape with the lowest predicted loss, the tokens it will train on). speeds: tokens/s
    of each shape on this machine (those missing are not candidates); None plans by max_steps alone.
    max_block: the longest context the corpus holds a window of ("" if no shape fits). max_passes: the
    most passes over the corpus a shape is planned to train for, whatever the budget would buy."""
    def tokens(shape: str) -> float:
        by_steps = min(max_steps * tokens_per_step(shape), max_passes * corpus_tokens)
        return by_steps if speeds is None else min(by_steps, budget_tokens(speeds[shape], tokens_per_step(shape),
                                                                          budget_s, overhead))

    candidates = [s for s in LADDER if (speeds is None or s in speeds) and LADDER[s][3] <= max_block]
    if not candidates:
        return "", 0.0
    best = candidates[0]
    for shape in candidates[1:]:
        gain = predicted_loss(best, tokens(best), corpus_tokens, tokenizer) - predicted_loss(
            shape, tokens(shape), corpus_tokens, tokenizer)
        if gain > (MIN_GAIN if speeds is None else 0.0):
            best = shape
    return best, tokens(best)


def plan(budget_s: float, max_steps: int, corpus_tokens: int, tokenizer: str, speeds: dict[str, float] | None,
         explicit: frozenset[str] | set[str] = frozenset(), set_tokens_per_step: int = 0,
         max_block: int = 10**9, overhead: Overhead = Overhead()) -> Plan:
    """The planned settings for a run, leaving out every key in `explicit` (the user's).

    budget_s: train.max_time (0: none, then speeds is ignored and the run is planned by max_steps);
    speeds: tokens/s per LADDER shape on this machine (tinylm/timings.py), needed only with a time limit
    and a shape to choose. set_tokens_per_step: the user's own shape's tokens per step, when the shape is
    theirs (then only dropout and warmup are planned, from max_steps or their shape's speed in speeds["own"]).
    max_block: the longest context the corpus holds a window of (shapes with a longer one are left out).
    overhead: what the run's evaluations take out of the budget."""
    by_time = bool(budget_s) and speeds is not None
    # With a time limit the clock ends the run: a step limit the user did not set (the default 3,000) would
    # otherwise cut a fast machine's run short and end its learning-rate decay early.
    steps_free = by_time and "train.max_steps" not in explicit
    max_steps = UNLIMITED if steps_free else max_steps
    # Nor does a run the clock ends go on past MAX_PASSES over its corpus: beyond, the sweep measured nothing
    # and a small corpus is memorised (the built-in one's 100 k tokens: 4.72 at 16 passes, 5.01 at 29).
    cap = MAX_PASSES if steps_free else math.inf
    shape, tokens = "", 0.0
    if not any(k in explicit for k in OWN_SHAPE):
        shape, tokens = choose(budget_s, max_steps, corpus_tokens, tokenizer, speeds if by_time else None, max_block,
                               overhead, cap)
    if not shape:
        per_step = max(set_tokens_per_step, 1)
        speed = (speeds or {}).get("own")
        tokens = min(max_steps * per_step, cap * corpus_tokens)
        if budget_s and speed:
            tokens = min(tokens, budget_tokens(speed, per_step, budget_s, overhead))
        values: dict[str, Any] = {}
    else:
        n_layer, n_embd, n_head, block, batch = LADDER[shape]
        per_step = block * batch
        values = {"model.n_layer": n_layer, "model.n_embd": n_embd, "model.n_head": n_head,
                  "model.block_size": block, "train.batch_size": batch, **architecture(tokenizer, explicit)}
        if tokenizer in EMBEDDING_LR and shape in LR_SHAPES and not {"train.lr", "train.min_lr"} & set(explicit):
            values["train.lr"] = EMBEDDING_LR[tokenizer]
    passes = tokens / max(corpus_tokens, 1)
    steps = tokens / per_step
    speed = (speeds or {}).get(shape or "own")
    if budget_s and speed and overhead.evaluations:
        values["train.eval_batches"] = overhead.batches(speed, per_step, budget_s)
    params = block_params(*LADDER[shape][:2]) if shape else 0.0
    values["model.dropout"] = dropout_for(passes, params, corpus_tokens)
    values["train.warmup_steps"] = int(min(30, max(1, steps // 10)))
    capped = steps_free and tokens >= cap * corpus_tokens * 0.999
    last_step = math.ceil(cap * corpus_tokens / per_step) if math.isfinite(cap) else UNLIMITED  # at MAX_PASSES
    if capped:  # the run ends after MAX_PASSES passes, before its time is up
        values["train.max_steps"] = last_step
    elif steps_free and math.isfinite(steps):
        # Twice the expected steps, so a machine faster than its timing still ends by the clock, but never past
        # MAX_PASSES: timed during a burst of other work (10 k tokens/s, then 23 k in the run), the built-in
        # corpus's 180 s plan ran its 2 x 8 passes to 32 and ended at val loss 5.32 instead of about 4.7.
        values["train.max_steps"] = min(round_up(2 * steps + 1), last_step)
    values = {k: v for k, v in values.items() if k not in explicit}
    lines = describe(budget_s, max_steps, shape, tokens, corpus_tokens, speeds, values)
    if capped:
        lines[0] += (f"; at most {cap:g} passes, since more would only memorise it: the run ends at step "
                     f"{last_step:,}, before its time is up")
    return Plan(values, lines)


def round_up(n: float) -> int:
    """n rounded up to two significant figures (4,817 -> 4,900), for a limit that reads as chosen, not computed."""
    scale = 10 ** max(0, math.floor(math.log10(max(n, 1))) - 1)
    return int(math.ceil(n / scale) * scale)


def describe(budget_s: float, max_steps: int, shape: str, tokens: float, corpus_tokens: int,
             speeds: dict[str, float] | None, values: dict[str, Any]) -> list[str]:
    """The `plan:` lines: what the budget buys on this machine, and what was chosen."""
    limit = f"budget {budget_s:g} s" if budget_s and speeds is not None else f"budget {max_steps:,} steps"
    if shape:
        n_layer, n_embd, *_ = LADDER[shape]
        what = f"a {n_layer}-layer {n_embd}-wide model"
        rate = f"this machine trains {what} at {speeds[shape]:,.0f} tokens/s; " if speeds and budget_s else f"{what}: "
    else:
        rate = "the model's shape is yours; "
    passes = tokens / max(corpus_tokens, 1)
    chosen = ", ".join(f"{k.split('.')[1]}={v}" for k, v in values.items()) or "nothing (every setting is yours)"
    return [f"plan: {limit}; {rate}{count(tokens)} tokens = {passes:.2g} passes over the corpus "
            f"({corpus_tokens:,} tokens)",
            f"plan: {chosen} (train.plan=off or --plan off for the fixed defaults)"]


def count(tokens: float) -> str:
    """A token count for the log: "2.4 M" from 100,000 on, else the number ("12,288")."""
    return f"{tokens / 1e6:.2g} M" if tokens >= 1e5 else f"{tokens:,.0f}"
