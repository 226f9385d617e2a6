"""The learning-rate schedule: where a cosine-with-hard-restarts schedule restarts, its LR curve, a plot.

The paper trains at LR 2e-5 with 2,000 linear warm-up steps, then cosine with hard restarts, 25 cycles
over the run, stepped every optimizer step: transformers' ``get_scheduler("cosine_with_restarts", ...,
scheduler_specific_kwargs={"num_cycles": 25})``. Its ``num_cycles`` counts cosine cycles, not restarts
(its docstring says "hard restarts", which is wrong): 25 cycles are 24 restarts.

Steps are scheduler steps, which are optimizer steps, counted from 0: step ``s`` is the optimizer step
taken when ``trainer.global_step == s``, at ``base_lr * lr_lambda(s)``. Component layer: torch and
transformers only (matplotlib is imported by :func:`plot_schedule` alone).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

#: transformers' cosine-with-hard-restarts LR lambda, recognised by name (it is private to transformers).
_HARD_RESTARTS_LAMBDA = "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda"


def cycle_position(
    step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: int
) -> tuple[int, float]:
    """``(cycle, fraction)`` of ``step`` in transformers' cosine-with-hard-restarts schedule.

    ``cycle`` is -1 in the warm-up (``fraction``: warm-up progress), ``0 .. num_cycles - 1`` in the cosine
    cycles (``fraction`` 0 at a cycle's peak, towards 1 at its trough), and ``num_cycles`` once the run is
    over. The arithmetic is transformers' own, so the cycle boundaries fall where the scheduler's do.
    """
    if step < num_warmup_steps:
        return -1, float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    if progress >= 1.0:
        return num_cycles, 0.0
    position = float(num_cycles) * progress
    return math.floor(position), position % 1.0


def restart_steps(num_warmup_steps: int, num_training_steps: int, num_cycles: int) -> list[int]:
    """Optimizer steps at which a new cosine cycle starts: the LR jumps from a trough back to (near) its peak.

    ``num_cycles - 1`` steps (25 cycles: 24 restarts); the end of the warm-up is not a restart (the LR is
    continuous there). Cycles shorter than one step merge, so a very short run may have fewer.
    """
    warmup, total = num_warmup_steps, num_training_steps

    def cycle(step: int) -> int:
        return cycle_position(step, warmup, total, num_cycles)[0]

    steps: list[int] = []
    for k in range(1, num_cycles):
        step = warmup + -(-k * (total - warmup) // num_cycles)  # first s with k * (T - w) <= n * (s - w)
        # The scheduler's floating-point progress may cross k one step earlier or later than exact arithmetic.
        while step > warmup and cycle(step - 1) >= k:
            step -= 1
        while step < total and cycle(step) < k:
            step += 1
        if step < total and (not steps or step > steps[-1]):
            steps.append(step)
    return steps


def hard_restarts_config(scheduler: Any) -> dict[str, int] | None:
    """``num_warmup_steps``, ``num_training_steps`` and ``num_cycles`` of transformers' cosine with hard
    restarts (``get_scheduler("cosine_with_restarts", ...)``); ``None`` for any other scheduler."""
    lambdas = getattr(scheduler, "lr_lambdas", None) if isinstance(scheduler, LambdaLR) else None
    if not lambdas:
        return None
    fn = lambdas[0]
    if isinstance(fn, functools.partial) and getattr(fn.func, "__name__", "") == _HARD_RESTARTS_LAMBDA:
        keys = ("num_warmup_steps", "num_training_steps", "num_cycles")
        return {k: int(fn.keywords[k]) for k in keys}
    return None


def schedule_restarts(scheduler: Any) -> list[int] | None:
    """Restart steps of a transformers cosine-with-hard-restarts scheduler; ``None`` for other schedulers."""
    config = hard_restarts_config(scheduler)
    return None if config is None else restart_steps(**config)


@dataclass
class LRJumpDetector:
    """Flags a restart wherever the LR rises by more than ``jump_ratio`` after it had come down from a peak.

    Works for any scheduler. The warm-up never counts: there the LR has not yet fallen below its running
    maximum (it rises from step to step by far more than any sensible ratio at its start).
    """

    jump_ratio: float = 0.5
    last: float | None = None
    peak: float = 0.0

    def update(self, lr: float) -> bool:
        jump = self.last is not None and self.last < self.peak and lr > self.last * (1.0 + self.jump_ratio)
        self.last, self.peak = lr, max(self.peak, lr)
        return jump


def lr_jumps(lrs: Iterable[float], jump_ratio: float = 0.5) -> list[int]:
    """Indices of ``lrs`` where :class:`LRJumpDetector` flags a restart."""
    detector = LRJumpDetector(jump_ratio)
    return [i for i, lr in enumerate(lrs) if detector.update(lr)]


def lr_curve(scheduler: LRScheduler, num_steps: int) -> list[float]:
    """LR of the first parameter group at ``num_steps`` scheduler steps, leaving the scheduler untouched.

    A ``LambdaLR`` (every transformers schedule) is evaluated in closed form from step 0. Any other
    scheduler is replayed from its current step on a copy bound to a stand-in optimizer.
    """
    if isinstance(scheduler, LambdaLR):
        base, fn = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
        return [base * fn(step) for step in range(num_steps)]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in scheduler.optimizer.param_groups]
    stand_in = torch.optim.SGD([{**g, "params": [torch.zeros(1)]} for g in groups])
    # The memo binds the copy (and any scheduler nested in it) to the stand-in, never the real optimizer.
    clone = copy.deepcopy(scheduler, memo={id(scheduler.optimizer): stand_in})
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing is trained here
        for _ in range(num_steps):
            lrs.append(clone.optimizer.param_groups[0]["lr"])
            clone.step()
    return lrs


def scale_lr(optimizers: Sequence[Optimizer], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply the schedule by ``factor`` from the next optimizer step on: current LR and every later peak.

    Scales each group's ``lr`` and ``initial_lr`` and each scheduler's ``base_lrs``; all three are in the
    optimizer's and scheduler's state dicts, so a resumed run keeps the lower schedule.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if getattr(scheduler, "_last_lr", None) is not None:
            scheduler._last_lr = [lr * factor for lr in scheduler._last_lr]


def plot_schedule(lrs: Sequence[float], restarts: Sequence[int] = (), title: str = "Learning-rate schedule"):
    """A matplotlib ``Figure`` (Agg, no pyplot state) of LR against optimizer step, restarts marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(len(lrs)), lrs, lw=1.0, color="tab:blue")
    for i, step in enumerate(restarts):
        ax.axvline(step, color="tab:red", lw=0.7, alpha=0.5, ls="--", label="restart" if i == 0 else None)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=f"{title}: {len(restarts)} restarts")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if restarts:
        ax.legend(loc="upper right")
    return fig
