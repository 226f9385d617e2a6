"""Lightning callbacks of ecglm; every name is importable from ``ecglm.callbacks`` (recipes name them so,
e.g. ``class_path: ecglm.callbacks.LRRestartMonitor``). One file per job:

- ``schedule_plot.py``: :class:`LRSchedulePlot` and :func:`log_lr_schedule`, the LR schedule's plot
  (restarts marked) at fit start;
- ``lr_restart.py``: :class:`LRRestartMonitor`, which tests training after each LR restart against the
  baseline before it and logs, stops, lowers the peak or rolls back on an alarm (``docs/training.md``);
- ``stability.py``: its statistics (:func:`window_stats`, :func:`compare`), the cross-rank decision
  (:func:`any_rank`), :func:`grad_norm`, :func:`plot_stability` and :class:`StabilityWarning`;
- ``snapshots.py``: its rollback points (:class:`Snapshot`, :func:`take_snapshot`,
  :func:`restore_snapshot`);
- ``runs.py``: what lets a killed run resume as the same run, which the ``ecglm`` CLI installs on
  every trainer (:class:`AtomicCheckpointIO`, :class:`RunContinuity`, :class:`ResumedMLFlowLogger`);
- ``progress.py``: :class:`ProgressLog`, progress as log lines when the output is not a terminal.
"""

from __future__ import annotations

from ecglm.callbacks.lr_restart import LRRestartMonitor
from ecglm.callbacks.progress import ProgressLog, interactive
from ecglm.callbacks.runs import AtomicCheckpointIO, ResumedMLFlowLogger, RunContinuity
from ecglm.callbacks.schedule_plot import LRSchedulePlot, log_lr_schedule
from ecglm.callbacks.snapshots import Snapshot, restore_snapshot, take_snapshot
from ecglm.callbacks.stability import (
    ACTIONS,
    SIGNALS,
    Action,
    Signal,
    StabilityWarning,
    any_rank,
    compare,
    grad_norm,
    plot_stability,
    window_stats,
)

__all__ = [
    "ACTIONS",
    "SIGNALS",
    "Action",
    "AtomicCheckpointIO",
    "LRRestartMonitor",
    "LRSchedulePlot",
    "ProgressLog",
    "ResumedMLFlowLogger",
    "RunContinuity",
    "Signal",
    "Snapshot",
    "StabilityWarning",
    "any_rank",
    "compare",
    "grad_norm",
    "interactive",
    "log_lr_schedule",
    "plot_stability",
    "restore_snapshot",
    "take_snapshot",
    "window_stats",
]
