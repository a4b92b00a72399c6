"""When a training run logs, evaluates and saves: the loop's one decision of when, by steps, by the run's
progress and by its clock (tinylm/loop.py asks `due` after every step and tells `mark_done` what it did).
Pure functions of the loop's state and the train config, so tests can run a whole run's decisions alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinylm.config import TrainConfig
from tinylm.optim import progress
from tinylm.start import LoopState

LOG_POINTS = 100  # logged training losses at least per run (every step where it has fewer steps)


@dataclass(frozen=True)
class Due:
    log: bool
    evaluate: bool
    save: bool


def marks(progress_: float, n: int) -> int:
    """How many of n evenly spaced marks (1/n, 2/n, ..., 1) a run `progress_` of the way has passed."""
    return min(n, math.floor(progress_ * n + 1e-9)) if n > 0 else 0


def due(state: LoopState, t: TrainConfig) -> Due:
    """What the step just taken calls for besides itself: the loop's one decision of when.

    Evaluations come at each of train.evals marks spread over the run's progress (its share of max_steps
    or of max_time, whichever is nearer, as the learning rate's decay counts it), so a slow machine that
    manages 37 steps in 3 minutes still draws eight points of every validation curve, and every
    eval_interval steps, except where a mark's evaluation is less than half a spacing away (`near_a_mark`):
    the two cadences merge instead of evaluating twice in a row. Checkpoints come with every evaluation
    and at least every train.save_interval seconds of training, so a kill loses at most that much work.
    Losses are logged every log_interval steps and at LOG_POINTS marks."""
    p = progress(state.step, state.elapsed, t)
    log = state.step % t.log_interval == 0 or marks(p, LOG_POINTS) > state.log_mark
    at_mark = marks(p, t.evals) > state.eval_mark
    by_steps = state.step % t.eval_interval == 0 and not near_a_mark(state, t, p)
    by_time = bool(t.save_interval) and state.elapsed - state.saved_at >= t.save_interval
    return Due(log=log, evaluate=at_mark or by_steps, save=at_mark or by_steps or by_time)


def near_a_mark(state: LoopState, t: TrainConfig, p: float) -> bool:
    """Whether an eval_interval evaluation at progress p would come within half a spacing of a mark's
    evaluation, the last one or the next one; the spacing is the finer of the marks' and eval_interval's
    (converted to progress at the run's pace so far), so a fine eval_interval keeps its evaluations."""
    if not t.evals:
        return False
    spacing = min(1 / t.evals, t.eval_interval * p / state.step) if state.step else 1 / t.evals
    next_mark = (state.eval_mark + 1) / t.evals
    return p - state.mark_evaluated < spacing / 2 or next_mark - p < spacing / 2


def mark_done(state: LoopState, t: TrainConfig, when: Due) -> None:
    """Note in state what `when` asked for and the loop did, so that `due` asks for it again only when due."""
    p = progress(state.step, state.elapsed, t)
    if when.log:
        state.log_mark = marks(p, LOG_POINTS)
    if when.evaluate:
        if marks(p, t.evals) > state.eval_mark:
            state.mark_evaluated = p
        state.eval_mark = marks(p, t.evals)
    if when.save:
        state.saved_at = state.elapsed


def finished(state: LoopState, t: TrainConfig) -> bool:
    """True once the run has reached train.max_steps or, if set, train.max_time seconds."""
    return state.step >= t.max_steps or bool(t.max_time and state.elapsed >= t.max_time)
