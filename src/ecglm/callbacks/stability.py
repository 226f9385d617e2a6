"""The LR-restart monitor's statistics: baseline windows, the ratio and sigma tests, the cross-rank
decision, the gradient norm, and the stability plot (see :class:`~ecglm.callbacks.LRRestartMonitor`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

Action = Literal["log", "stop", "lower_peak", "rollback"]
Signal = Literal["loss", "grad_norm"]
ACTIONS = ("log", "stop", "lower_peak", "rollback")
SIGNALS = ("loss", "grad_norm")


class StabilityWarning(UserWarning):
    """A learning-rate restart was followed by a loss, gradient-norm or validation-metric blow-up."""


def window_stats(values: Iterable[float]) -> dict[str, float] | None:
    """Mean, sample standard deviation and count of the finite ``values``; ``None`` for fewer than two."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return None
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite), "n": len(finite)}


def compare(
    baseline: Mapping[str, float], post: Sequence[float], ratio_threshold: float, sigma_threshold: float
) -> dict[str, Any]:
    """The ratio and sigma tests of ``post`` values against a pre-restart ``baseline`` (:func:`window_stats`).

    ``ratio = post_mean / pre_mean`` and ``sigma = (post_mean - pre_mean) / pre_std``; the alarm needs both
    over their thresholds (the ratio guards against near-constant baselines, the sigma test against noisy
    ones). A non-finite post value (NaN or inf loss) is an alarm by itself.
    """
    post_mean = sum(post) / len(post)
    pre_mean, pre_std = baseline["mean"], baseline["std"]
    if not math.isfinite(post_mean):
        ratio = sigma = math.inf
    else:
        gap = post_mean - pre_mean
        ratio = post_mean / pre_mean if pre_mean > 0 else (math.inf if gap > 0 else 1.0)
        sigma = gap / pre_std if pre_std > 0 else (math.inf if gap > 0 else 0.0)
    alarm = ratio > ratio_threshold and sigma > sigma_threshold
    stats = {"pre_mean": pre_mean, "pre_std": pre_std, "post_mean": post_mean, "post_n": len(post)}
    return {**stats, "ratio": ratio, "sigma": sigma, "alarm": alarm}


def _json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats (an infinite ratio, a NaN loss) become the strings ``inf``, ``nan``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def any_rank(flag: bool, strategy: Any) -> bool:
    """Whether ``flag`` is true on any process: a sum all-reduce through the Lightning strategy.

    Every rank must call it at the same point (the monitor decides at fixed steps). On one device the
    strategy's ``reduce`` is the identity.
    """
    device = getattr(strategy, "root_device", torch.device("cpu"))
    total = strategy.reduce(torch.tensor(float(flag), device=device), reduce_op="sum")
    return bool(float(total) > 0)


def grad_norm(parameters: Iterable[Tensor]) -> float:
    """Global L2 norm of the gradients of ``parameters`` (those without a gradient are skipped)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def plot_stability(
    history: Mapping[str, Sequence[float]], restarts: Sequence[int], alarms: Sequence[int]
) -> Any:
    """Training loss and LR against optimizer step; restarts as dashed lines, alarms as red markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True)
    steps = history["step"]
    loss_ax.plot(steps, history["loss"], lw=0.8, color="tab:blue")
    lr_ax.plot(steps, history["lr"], lw=1.0, color="tab:green")
    for ax in (loss_ax, lr_ax):
        for step in restarts:
            ax.axvline(step, color="grey", lw=0.7, ls="--", alpha=0.6)
        for step in alarms:
            ax.axvline(step, color="tab:red", lw=1.2, alpha=0.8)
    loss_ax.set(ylabel="training loss", title=f"{len(restarts)} LR restarts, {len(alarms)} alarms (red)")
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig
