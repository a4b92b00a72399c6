"""Keeping a training run alive: stop signals and the blow-up guard, used by the loop in tinylm/train.py.

`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM into a request that the loop honours at the end of the
current step, when the weights are whole and a checkpoint can be written. A second signal takes its
usual effect at once (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process); the checkpoint on
disk is then the last one written, which is whole. Under torchrun a repeat is ignored instead: torchrun
forwards the signal it gets to every process, which a cluster's scheduler may already have signalled,
and it ends processes that outlive its shutdown timeout itself.

`BlowUpGuard` does the optimizer step only when the loss and the gradient norm are finite, so that one
bad batch does not turn every weight into NaN, and stops the run after `max_bad_steps` such steps in a
row. On a CPU it reads the verdict at once (a CPU has nothing to wait for). On a CUDA GPU with a fused
optimizer (fused Adam/AdamW) it never makes the host wait: the verdict goes to the optimizer as
`found_inf`, the flag torch's AMP GradScaler uses, and the fused kernel skips the update on the GPU;
the verdicts are read back where the loop syncs anyway (logging, evaluation). Any other optimizer on a
GPU reads the verdict at once, at the cost of one sync per step. That protocol is private to torch:
`honours_found_inf` and `step_unless_found_inf` are the only code that touches it.

With float16 autocast a loss scaler (torch.amp.GradScaler) scales the loss up so that small gradients
survive float16's range; when gradients overflow instead, the step is skipped and the scale halved. The
guard tells that apart from a blow-up (see `BlowUpGuard`).

Test switches: TINYLM_TEST_NAN_STEPS="7", "12-14" or "3,12-14" makes the loss of those steps NaN;
TINYLM_TEST_OVERFLOW_STEPS (same form) makes their gradients inf while the loss stays finite, as a
float16 overflow in the backward pass does.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import torch

from tinylm.errors import UserError


class Diverged(UserError):
    """Too many steps in a row had a non-finite loss or gradient."""


class StopSignals:
    """Between install() and uninstall(), SIGINT and SIGTERM set `.signal` instead of stopping the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, repeat_stops: bool = True) -> None:
        self.signal = 0  # the first signal received, 0 if none
        self.announce = announce  # say so on stderr (only one of a distributed run's processes does)
        self.repeat_stops = repeat_stops  # a second signal stops at once (not under torchrun)
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum: int, frame) -> None:
        if self.signal and not self.repeat_stops:
            return
        if self.signal:  # asked twice: let the signal do what it normally does
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        # os.write, not print: a handler can interrupt a print, and print is not reentrant.
        if self.announce:
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
                        f"{f' ({again} again stops at once)' if self.repeat_stops else ''}\n".encode())

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# ---------------------------------------------------------------- the seam: torch's AMP found_inf protocol


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), told through torch's AMP protocol to leave everything as it is where found_inf is 1
    (a 0-dim float tensor on the parameters' device, as GradScaler passes it). Only for an optimizer that
    `honours_found_inf`."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips a step on its device when `step_unless_found_inf` tells it to.

    Why it is needed: on a GPU, deciding on the host whether to step waits for the GPU once per step;
    handing the verdict to the fused kernel instead lets the host run ahead (BlowUpGuard.step).
    What it relies on: a private protocol between torch's GradScaler (torch/amp/grad_scaler.py) and its
    optimizers: one with `_step_supports_amp_scaling` set (fused Adam, AdamW, SGD) reads a `found_inf`
    attribute during step() and, where it is 1, changes neither the parameters nor their state.
    If a torch release changes it: without the attribute this says False, and the guard reads each
    verdict on the host, as for any other optimizer. An optimizer that still claims the protocol but no
    longer honours it is caught by a probe: a throwaway optimizer of the same class on one number, told
    to skip a step; if the number moved, or the probe fails in any way, this says False too.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        step_unless_found_inf(type(optimizer)([probe], lr=1.0, fused=True), torch.ones((), device=device))
        return bool(probe.detach().eq(0).all())
    except Exception:  # a constructor or step that no longer fits: the host path is always correct
        return False


# The loss scale below which float16 training is given up (fairseq's --min-loss-scale, 1e-4): the scale
# starts at 65,536 and halves at every step whose gradients overflow, so it falls this low only after some
# thirty such halvings with too few clean steps between them to grow back: gradients that overflow float16
# even scaled far down, which a smaller scale no longer cures.
SCALE_FLOOR = 1e-4


class BlowUpGuard:
    """Makes each optimizer update: optimizer.step(), unless the loss or the gradient is not finite.

    With float16 loss scaling (a torch.amp.GradScaler, `scaler`), gradients that overflow are the
    scaler's to handle: the step is skipped and the scale halved, which is no blow-up (it happens a few
    times at the start of any float16 run, while the scale comes down to what the gradients allow). Only
    a loss that is not finite counts towards max_bad_steps, and a scale that collapses below SCALE_FLOOR
    stops the run. The guard then also makes the scaler's update after each step."""

    def __init__(self, max_bad_steps: int, device: torch.device, optimizer: torch.optim.Optimizer,
                 out: Callable[[str], None], scaler: torch.amp.GradScaler | None = None):
        self.max_bad_steps = max_bad_steps
        self.out = out
        self.scaler = scaler
        self.on_device = device.type == "cuda" and honours_found_inf(optimizer)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, verdicts still on the GPU)
        self.streak: list[int] = []  # the steps of the current run of bad steps
        self.skipped = 0  # steps skipped as blow-ups
        self.overflows = 0  # steps the loss scaler skipped (float16 gradients that overflowed)
        self.overflow_streak = 0

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> None:
        """optimizer.step(), unless the loss or the gradient norm is inf or NaN (a NaN anywhere in the
        gradient makes its norm NaN, and any micro-batch's NaN loss reaches the gradient); then the
        scaler's update, if any (the gradients were unscaled before clipping: tinylm/step.py)."""
        finite_loss = torch.isfinite(loss.detach())
        skip = ~(finite_loss & torch.isfinite(grad_norm))
        blowup = ~finite_loss if self.scaler is not None else skip  # overflowing gradients: the scaler's
        if self.on_device:
            # 0-dim, as GradScaler's: the fused step subtracts it from each parameter's 0-dim step count.
            step_unless_found_inf(optimizer, skip.float())
            self.pending.append((step, torch.stack((blowup, skip))))
        elif not bool(skip):
            optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after inf/NaN gradients, doubles it after 2,000 clean steps
        if not self.on_device:
            self._record(step, bool(blowup), bool(skip))

    def poll(self) -> None:
        """Take in the verdicts still on the GPU (one transfer; call it where the loop syncs anyway)."""
        if self.pending:
            verdicts = torch.stack([v for _, v in self.pending]).tolist()
            steps = [step for step, _ in self.pending]
            self.pending = []
            for step, (blowup, skip) in zip(steps, verdicts):
                self._record(step, blowup, skip)

    def _record(self, step: int, blowup: bool, skipped: bool) -> None:
        if blowup:
            self._blowup(step)
        elif skipped:  # only with a scaler: its business, unless the scale has collapsed
            self.overflows += 1
            self.overflow_streak += 1
            self._check_scale(step)
        else:
            self.streak = []
            self.overflow_streak = 0

    def _blowup(self, step: int) -> None:
        self.streak.append(step)
        self.skipped += 1
        self.out(f"warning: step {step}: the loss or the gradient is not finite; the update was skipped "
                 f"({len(self.streak)} in a row; {self.max_bad_steps} in a row stop the run)")
        if len(self.streak) >= self.max_bad_steps:
            first, last = self.streak[0], self.streak[-1]
            raise Diverged(f"training diverged: the loss or the gradient was not finite for {len(self.streak)} "
                           f"steps in a row (steps {first}-{last}), each skipped")

    def _check_scale(self, step: int) -> None:
        scale = self.scaler.get_scale()
        if scale < SCALE_FLOOR:
            raise Diverged(f"training diverged: the float16 loss scale fell to {scale:.2g} (below {SCALE_FLOOR:g}) "
                           f"at step {step}: the gradients overflowed float16 at {self.overflow_streak} steps in a "
                           f"row however far they were scaled down; train in bfloat16 or float32 (train.dtype)")


def params_finite(model: torch.nn.Module) -> bool:
    """True when no weight is inf or NaN (a finite gradient with a huge step can still overflow one).
    A sharded (FSDP) model checks the shard this process holds."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return bool(torch.stack([p.isfinite().all() for p in local]).all())


def injected_steps(variable: str) -> set[int]:
    """The steps a fault-injection variable (TINYLM_TEST_NAN_STEPS, TINYLM_TEST_OVERFLOW_STEPS) names."""
    steps: set[int] = set()
    for part in filter(None, os.environ.get(variable, "").replace(" ", "").split(",")):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps
