"""Logging the QA pairs the training stream loses to bad input while the epoch runs.

A callback rather than the model: it reads the DataModule's counts, which a LightningModule should
not need to know about.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ecglm.data.stream import REASONS


def metric_name(reason: str) -> str:
    """``data/pairs_lost/<reason>``, the reason as a slug: "sha256 mismatch" -> "sha256_mismatch"."""
    return "data/pairs_lost/" + re.sub(r"[^0-9A-Za-z]+", "_", reason).strip("_")


class SkippedInputLogger(L.Callback):
    """Logs the training pairs lost to bad input so far this epoch, summed over ranks.

    ``data/pairs_lost`` and, for each reason that lost any, ``data/pairs_lost/<reason>`` (see
    :func:`metric_name`), every ``log_every_n_steps`` optimizer steps and at the end of each training
    epoch. The counts are the DataModule's ``train_skipped`` (an :class:`ECGQADataModule` gathers them
    from its loader workers as their batches arrive), so a value lags the workers by the batches
    they hold ready. They restart at zero each epoch; a run resumed mid-epoch counts the epoch's
    first part again (its workers read past it to the resume point).
    """

    def __init__(self) -> None:
        self._logged_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.datamodule, "train_skipped"):
            rank_zero_warn(
                f"SkippedInputLogger logs nothing: the datamodule ({type(trainer.datamodule).__name__}) "
                "has no train_skipped counts (ECGQADataModule has them)"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        # With gradient accumulation several batches end on one step: log it once.
        if every > 0 and step % every == 0 and step != self._logged_step:
            self._logged_step = step
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = getattr(trainer.datamodule, "train_skipped", None)
        if counts is None:
            return
        # Every rank reduces the same vector (all REASONS, in order), whichever reasons it met.
        local = torch.tensor([float(counts.get(r, 0)) for r in REASONS], device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        metrics = {"data/pairs_lost": float(sum(total))}
        metrics.update({metric_name(r): n for r, n in zip(REASONS, total, strict=True) if n})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
