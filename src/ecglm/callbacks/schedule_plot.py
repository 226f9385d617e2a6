"""The LR schedule's plot: LR against optimizer step over the whole run, restarts marked, at fit start."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ecglm.io import save_run_file
from ecglm.schedules import lr_curve, lr_jumps, plot_schedule, schedule_restarts


def _figure_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def log_lr_schedule(
    trainer: L.Trainer, name: str = "lr_schedule.png", jump_ratio: float = 0.5
) -> Path | None:
    """Plot the first scheduler's LR over the whole run, restarts marked, into the run folder and MLflow.

    Restarts come from the schedule when it is transformers' cosine with hard restarts, else from LR jumps.
    Returns ``None`` (with a warning) when there is nothing to plot: no step-interval scheduler, or a run
    whose length Lightning cannot know.
    """
    configs = [c for c in trainer.lr_scheduler_configs if c.interval == "step"]
    total = trainer.estimated_stepping_batches
    if not configs or not math.isfinite(total):
        rank_zero_warn(f"no LR schedule plot: step-interval schedulers {len(configs)}, run length {total}")
        return None
    scheduler = configs[0].scheduler
    lrs = lr_curve(scheduler, int(total))
    restarts = schedule_restarts(scheduler)
    restarts = lr_jumps(lrs, jump_ratio) if restarts is None else restarts
    fig = plot_schedule(lrs, restarts, title=type(scheduler).__name__)
    return save_run_file(trainer, name, _figure_bytes(fig))


class LRSchedulePlot(Callback):
    """Logs the LR schedule (``lr_schedule.png``: LR against optimizer step, restarts marked) at fit start."""

    def __init__(self, filename: str = "lr_schedule.png", jump_ratio: float = 0.5):
        self.filename = filename
        self.jump_ratio = jump_ratio

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log_lr_schedule(trainer, self.filename, self.jump_ratio)
