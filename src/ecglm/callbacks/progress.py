"""Progress as log lines, for runs whose output is not a terminal (CI, SLURM, output to a file).

Lightning's progress bar draws on a terminal; written to a file it shows nothing until the end (Rich)
or one line rewritten thousands of times (tqdm). :class:`ProgressLog` takes the bar's place there and
writes one line every few steps instead (each after the time of day)::

    train: step 120/4000 (3%) | epoch 0, batch 120/500 | loss 1.234 | lr 2.00e-05 | 0.85 steps/s | ETA 1:16:04
    validation: 40 batches in 11.3 s | val/loss 0.812 | val/acc 0.62

The ``ecglm`` command adds it when :func:`interactive` is false; a recipe may also name it
(``class_path: ecglm.callbacks.ProgressLog``), which replaces the bar on a terminal too.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar

log = logging.getLogger("ecglm.progress")


def interactive(streams: Iterable[TextIO | None] | None = None) -> bool:
    """Whether someone watches a terminal: stdout (Rich's bar) and stderr (tqdm's) are both terminals."""
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return all(stream is not None and stream.isatty() for stream in streams)


def _visible(logger: logging.Logger) -> None:
    """Make INFO lines of ``logger`` reach stderr when nobody configured logging (as Lightning does for
    its own logger); with handlers on the root logger, the lines go there instead."""
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().hasHandlers():
        handler = logging.StreamHandler()  # stderr, flushed after each line
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(round(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} days, {text}" if days else text


def _value(value: Any) -> str:
    value = float(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class ProgressLog(ProgressBar):
    """Training and evaluation progress as log lines on the ``ecglm.progress`` logger, in place of the bar.

    Training: a line every ``every_n_steps`` optimizer steps, and at the end of each epoch, with step
    (of the run's total when known), epoch and batch, training loss (mean over the steps since the
    last line, per optimizer step), learning rate, steps per second since the last line, and the time
    left at the average speed of this process so far (validation included). Validation, test and
    prediction: a line every ``every_n_batches`` batches and one at the end with the loop's time and
    its metrics shown in the progress bar (``self.log(..., prog_bar=True)``). Only the first process
    (global rank 0) writes.

    Args:
        every_n_steps: Optimizer steps between two training lines; ``None``: the trainer's
            ``log_every_n_steps``.
        every_n_batches: Batches between two evaluation lines; ``None``: as ``every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_batches: int | None = None):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("every_n_batches", every_n_batches)):
            if value is not None and value < 1:
                raise ValueError(f"ProgressLog: {name} must be >= 1 (or None), got {value}")
        self.every_n_steps, self.every_n_batches = every_n_steps, every_n_batches
        self._enabled = True
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._logged_step: int | None = None
        self._eval_started = 0.0
        _visible(log)

    # --- the ProgressBar interface -----------------------------------------------------------------

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            log.info(" ".join(map(str, args)))

    @property
    def step_interval(self) -> int:
        every = self.every_n_steps or self.trainer.log_every_n_steps
        return max(1, every)

    @property
    def batch_interval(self) -> int:
        return self.every_n_batches or self.step_interval

    # --- training ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        self._started = self._last_time = time.monotonic()
        self._last_step = trainer.global_step
        self._loss_sum, self._loss_count, self._logged_step = None, 0, None
        total = trainer.estimated_stepping_batches
        if self._enabled:
            of = f" of {int(total)}" if math.isfinite(total) else ""
            log.info(f"train: from step {trainer.global_step}{of}, a line every {self.step_interval} steps")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._enabled:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning hands back the loss divided by accumulate_grad_batches: a step's loss is the sum.
            loss = loss.detach().float() * trainer.accumulate_grad_batches
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        step = trainer.global_step
        # With gradient accumulation several batches end on one step: one line per step.
        if step != self._logged_step and step > self._start_step and step % self.step_interval == 0:
            self._train_line(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.global_step != self._logged_step:
            self._train_line(trainer, None)

    def _train_line(self, trainer: L.Trainer, batch_idx: int | None) -> None:
        step, now = trainer.global_step, time.monotonic()
        parts = [f"train: step {step}"]
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and total > 0:
            parts[0] += f"/{int(total)} ({100 * step / total:.0f}%)"
        batches = trainer.num_training_batches
        if batch_idx is None:
            parts.append(f"epoch {trainer.current_epoch} done")
        elif math.isfinite(batches):
            parts.append(f"epoch {trainer.current_epoch}, batch {batch_idx + 1}/{int(batches)}")
        else:
            parts.append(f"epoch {trainer.current_epoch}, batch {batch_idx + 1}")
        if self._loss_sum is not None and self._loss_count:
            parts.append(f"loss {_value(float(self._loss_sum) / self._loss_count)}")
        if trainer.optimizers:
            parts.append(f"lr {float(trainer.optimizers[0].param_groups[0]['lr']):.2e}")
        elapsed = now - self._last_time
        if step > self._last_step and elapsed > 0:
            parts.append(f"{(step - self._last_step) / elapsed:.3g} steps/s")
        done, spent = step - self._start_step, now - self._started
        if math.isfinite(total) and done > 0 and spent > 0:
            parts.append(f"ETA {duration((total - step) * spent / done)}")
        log.info(" | ".join(parts))
        self._loss_sum, self._loss_count, self._logged_step = None, 0, step
        self._last_step, self._last_time = step, now

    # --- validation, test, prediction ----------------------------------------------------------------

    def _loop_name(self, trainer: L.Trainer) -> str:
        if trainer.sanity_checking:
            return "sanity check"
        if trainer.validating or trainer.training:
            return "validation"
        return "test" if trainer.testing else "predict"

    def _eval_total(self, trainer: L.Trainer) -> float:
        if trainer.predicting:
            batches = trainer.num_predict_batches
        elif trainer.testing:
            batches = trainer.num_test_batches
        else:
            batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        return float(sum(batches))

    def _eval_start(self, trainer: L.Trainer) -> None:
        self._eval_started, self._eval_batches = time.monotonic(), 0

    def _eval_batch(self, trainer: L.Trainer) -> None:
        self._eval_batches += 1
        if not self._enabled or self._eval_batches % self.batch_interval:
            return
        total, spent = self._eval_total(trainer), time.monotonic() - self._eval_started
        parts = [f"{self._loop_name(trainer)}: batch {self._eval_batches}"]
        if math.isfinite(total) and total > 0:
            parts[0] += f"/{int(total)}"
        if spent > 0:
            parts.append(f"{self._eval_batches / spent:.3g} batches/s")
            if math.isfinite(total):
                parts.append(f"ETA {duration((total - self._eval_batches) * spent / self._eval_batches)}")
        log.info(" | ".join(parts))

    def _eval_end(self, trainer: L.Trainer) -> None:
        if not self._enabled:
            return
        spent = time.monotonic() - self._eval_started
        line = f"{self._loop_name(trainer)}: {self._eval_batches} batches in {spent:.1f} s"
        if not trainer.sanity_checking:
            prefix = {"validation": "val/", "test": "test/"}.get(self._loop_name(trainer))
            metrics = trainer.progress_bar_metrics
            shown = [
                f"{k} {_value(v)}" for k, v in sorted(metrics.items()) if prefix and k.startswith(prefix)
            ]
            line = " | ".join([line, *shown])
        log.info(line)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer)
