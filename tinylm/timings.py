"""The planner's measurement: how many tokens a second this machine trains each shape of tinylm/plan.py's
ladder at, timed on the real training step (model, autocast precision, optimizer) and kept per machine
and torch version (tinylm/measure.py), so that only a machine's first run pays for it.

Shapes are timed smallest first, stopping once no larger shape could beat the best so far (a larger
shape is slower, so it trains on fewer tokens: tinylm/plan.py's `floor` bounds its predicted loss from
below), or when the next shape's steps would take the timing past PROBE_SHARE of the budget. (Stopping at
the first shape predicted worse than the one before it missed the best: where small shapes all reach
MAX_PASSES, or a shape's many passes cost it more than its size gains, the loss has several minima.)
Before a new shape's timing is set beside kept ones, the last kept shape is timed again: kept timings from a
machine under another load are dropped, and the ladder timed afresh, so the plan compares like with like.

Two kernel choices are timed here too, once per machine: the number of CPU threads (`choose_threads`)
and, under bfloat16 autocast on a CPU, the precision attention runs in (`choose_attention`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from tinylm import measure, plan
from tinylm.config import ModelConfig, TrainConfig

PROBE_SHARE = 0.05  # at most this share of the budget goes to timing shapes not yet measured
STEPS = 4  # one untimed step (allocations, first-call costs), then the median of three
THREADS_MARGIN = 1.2  # fewer threads than the CPU has only when a step is this many times faster on them


def step_seconds(m: ModelConfig, batch: int, vocab: int, device: torch.device, dtype: torch.dtype | None) -> float:
    """Seconds of one training step (forward, backward, AdamW/Muon update) of model `m` on random tokens.
    torch's random state is left as it was: a run seeded before it is timed must start alike whether its
    machine was timed now or earlier (its weights once depended on it)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _step_seconds(m, batch, vocab, device, dtype)


def _step_seconds(m: ModelConfig, batch: int, vocab: int, device: torch.device, dtype: torch.dtype | None) -> float:
    from tinylm.hardware import autocast
    from tinylm.model import GPT
    from tinylm.optim import make_optimizer

    model = GPT(m, vocab).to(device)
    optimizer = make_optimizer(model, TrainConfig(), device, dtype)
    x = torch.randint(0, vocab, (batch, m.block_size), device=device)

    def step() -> None:
        with autocast(device, dtype):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocations, first-call costs
    times = []
    for _ in range(STEPS - 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    # The median, not the best: on a shared machine a run's steps are slowed as these are.
    return sorted(times)[len(times) // 2]


def shape_config(shape: str, tokenizer: str = "") -> tuple[ModelConfig, int]:
    """(the model of a LADDER shape as the plan builds it for this tokenizer kind, its batch size)."""
    n_layer, n_embd, n_head, block, batch = plan.LADDER[shape]
    arch = {k.split(".")[1]: v for k, v in plan.architecture(tokenizer).items()}
    return ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block, dropout=0.0, **arch), batch


def key(m: ModelConfig, batch: int, vocab: int, device: torch.device, dtype: torch.dtype | None) -> dict:
    """What a step's time depends on besides the machine (measure.machine() adds that)."""
    shape = [m.n_layer, m.n_embd, m.n_head, m.kv_heads, m.block_size, m.mlp, m.mlp_width, m.pos, m.norm,
             m.qk_norm, m.tie_embeddings]
    # The output layer's width in powers of two: one measurement serves every character set of a size.
    return {"shape": shape, "batch": batch, "vocab": 2 ** math.ceil(math.log2(max(vocab, 2))),
            "device": device.type, "dtype": str(dtype)}


def speed(m: ModelConfig, batch: int, vocab: int, device: torch.device, dtype: torch.dtype | None) -> tuple[float, bool]:
    """(tokens/s of a training step of model `m`, whether it came from the cache)."""
    k = key(m, batch, vocab, device, dtype)
    seconds, cached = measure.cached("train_step_seconds", k,
                                     lambda: step_seconds(m, batch, k["vocab"], device, dtype))
    return batch * m.block_size / seconds, cached


def ladder_speeds(budget_s: float, corpus_tokens: int, tokenizer: str, vocab: int, device: torch.device,
                  dtype: torch.dtype | None, say: Callable[[str], None],
                  overhead: plan.Overhead = plan.Overhead()) -> dict[str, float]:
    """tokens/s of the ladder's shapes worth considering for this run, timed where not yet measured."""
    speeds: dict[str, float] = {}
    cap, spent, best, timed, checked = PROBE_SHARE * budget_s, 0.0, math.inf, [], False
    for shape in plan.LADDER:
        m, batch = shape_config(shape, tokenizer)
        new = measure.lookup("train_step_seconds", key(m, batch, vocab, device, dtype)) is None
        if speeds:  # the next step's cost, guessed from the last shape's speed and the parameter ratio
            previous = list(speeds)[-1]
            ratio = plan.block_params(m.n_layer, m.n_embd) / plan.block_params(*plan.LADDER[previous][:2])
            guess = STEPS * batch * m.block_size / speeds[previous] * ratio
            if new and spent + guess > cap:
                break
            if new and not checked and previous not in timed:
                # A shape timed now is about to be compared with kept ones, timed under another load (a burst of
                # other work once made a new shape look 2.5x slower than it trained, and the plan chose it on
                # that figure over a smaller kept one, for a worse run). Re-time the last kept shape: if the
                # machine's speed has moved by STALE, every kept timing goes and the ladder is timed now.
                checked, began = True, time.perf_counter()
                pm, pbatch = shape_config(previous, tokenizer)
                now = pbatch * pm.block_size / step_seconds(pm, pbatch, vocab, device, dtype)
                spent += time.perf_counter() - began
                if max(now / speeds[previous], speeds[previous] / now) >= STALE:
                    measure.forget("train_step_seconds")
                    say(f"plan: shape {previous} now trains at {now:,.0f} tokens/s, its kept timing said "
                        f"{speeds[previous]:,.0f}; the machine's load has changed, so every shape is timed afresh")
                    return ladder_speeds(budget_s, corpus_tokens, tokenizer, vocab, device, dtype, say, overhead)
        began = time.perf_counter()
        speeds[shape], cached = speed(m, batch, vocab, device, dtype)
        if not cached:
            spent += time.perf_counter() - began
            timed.append(shape)
        tokens = min(plan.budget_tokens(speeds[shape], batch * m.block_size, budget_s, overhead),
                     plan.MAX_PASSES * corpus_tokens)  # as plan() caps a timed run
        best = min(best, plan.predicted_loss(shape, tokens, corpus_tokens, tokenizer))
        if plan.floor(tokens, corpus_tokens, tokenizer) >= best:  # no larger (slower) shape can do better
            break
    if timed:
        say(f"plan: timed the training step of shapes {', '.join(timed)} on this machine in {spent:.1f} s "
            f"(kept in {measure.cache_path()}, so later runs skip it)")
    return speeds


STALE = 1.5  # a run whose real speed differs from its shape's kept timing by this factor makes them all stale


def check_kept_speed(m: ModelConfig, batch: int, vocab: int, device: torch.device, dtype: torch.dtype | None,
                     tokens_per_s: float, say: Callable[[str], None]) -> bool:
    """Compare a run's real training speed with the timing kept for its shape. Timings are kept for good, but
    the machine's load changes: one taken while other work ran (or while none did) would plan every later
    run for a machine that no longer exists. Where the two differ by STALE or more, this machine's step and
    thread timings are dropped, so the next run times them afresh (about two seconds). True if dropped."""
    kept = measure.lookup("train_step_seconds", key(m, batch, vocab, device, dtype))
    if kept is None or not tokens_per_s > 0:
        return False
    expected = batch * m.block_size / kept
    if max(expected / tokens_per_s, tokens_per_s / expected) < STALE:
        return False
    measure.forget("train_step_seconds")
    measure.forget("threads")
    say(f"speed: this run trained at {tokens_per_s:,.0f} tokens/s, the timing kept for its shape said {expected:,.0f}; "
        f"the machine is {'busier' if tokens_per_s < expected else 'quieter'} than when it was timed, so the kept "
        f"timings are dropped and the next run times it afresh")
    return True


def choose_threads(device: torch.device, dtype: torch.dtype | None, say: Callable[[str], None]) -> int:
    """Train on all CPU threads unless fewer step clearly faster here (by THREADS_MARGIN): on a busy machine
    threads that wait for each other lose more than they gain (2-10x on a 2-core machine shared with other
    work), while on a quiet one a small model steps about as fast on one thread as on all, and a larger one
    (what the budget may buy) faster on all. Timed on a mid-ladder shape, kept like every measurement."""
    most = torch.get_num_threads()
    if device.type != "cpu" or most == 1:
        return most
    m, batch = shape_config("C")
    candidates = sorted({1, max(1, most // 2), most})

    def time_each() -> dict[str, float]:
        times = {}
        for n in candidates:
            torch.set_num_threads(n)
            times[str(n)] = step_seconds(m, batch, 64, device, dtype)
        torch.set_num_threads(most)
        return times

    times, cached = measure.cached("threads", {"candidates": candidates, "dtype": str(dtype)}, time_each)
    fastest = int(min(times, key=times.get))
    best = fastest if times[str(fastest)] * THREADS_MARGIN < times[str(most)] else most
    if best != most:
        torch.set_num_threads(best)
    if not cached or best != most:
        say(f"threads: {best} of {most} ({', '.join(f'{n}: {t * 1000:.0f} ms' for n, t in times.items())} "
            f"a step{'' if cached else ', measured now'})")
    return best


def attention_seconds(shape: list[int], dtype: torch.dtype) -> float:
    """Seconds of causal attention's forward and backward pass on a CPU at (batch, heads, context, head size)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

    return measure.best_time(step, seconds=0.0, warmup=1)


def choose_attention(model: torch.nn.Module, m: ModelConfig, batch: int, device: torch.device,
                     dtype: torch.dtype | None, say: Callable[[str], None]) -> None:
    """Under bfloat16 autocast on a CPU, run attention in whichever of bfloat16 and float32 is faster for
    this shape on this machine (the forward and backward pass timed once, then kept), and say which."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return
    shape = [batch, m.n_head, m.block_size, m.head_size]
    times, cached = measure.cached("cpu_attention", {"shape": shape}, lambda: {
        "bfloat16": attention_seconds(shape, torch.bfloat16), "float32": attention_seconds(shape, torch.float32)})
    fp32 = times["float32"] <= times["bfloat16"]
    for module in model.modules():
        if hasattr(module, "cpu_attention_fp32"):
            module.cpu_attention_fp32 = fp32
    say(f"attention in {'float32' if fp32 else 'bfloat16'} on this CPU at {'x'.join(map(str, shape))} "
        f"(forward + backward: bfloat16 {times['bfloat16'] * 1000:.1f} ms, float32 {times['float32'] * 1000:.1f} ms"
        f"{', measured now' if not cached else ''})")
