"""What lets a killed run resume as the same run (the ``ecglm`` CLI installs them on every trainer):
:class:`AtomicCheckpointIO` (no partial checkpoint, none in the system temp folder), :class:`RunContinuity`
(the MLflow run recorded in each checkpoint, leftovers of killed saves removed) and
:class:`ResumedMLFlowLogger` (a resumed run whose settings changed).
"""

from __future__ import annotations

import time
from typing import Any

import fsspec
import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ecglm.io import atomic_torch_save, remove_stale_partials


def _mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]


class ResumedMLFlowLogger(MLFlowLogger):
    """An MLFlowLogger that continues a run (``run_id``) after a restart with changed settings.

    MLflow refuses to change a logged param, so a resumed fit that logs one with another value (a
    parameter count that changed, a hyper-parameter set elsewhere than in the checkpoint) would fail at
    its start. Such a param keeps its first value; the new one becomes the tag ``resumed/<name>`` (with a
    warning). ``ecglm fit --ckpt_path`` uses it in place of MLFlowLogger when it resumes a run.
    """

    def log_hyperparams(self, params: Any) -> None:
        # Compared as MLFlowLogger logs them: flattened, str(value) cut to 250 characters.
        params = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        before = self.experiment.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if before.get(k, v) != v}
        super().log_hyperparams({k: v for k, v in params.items() if k not in changed})
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"resumed/{key}", value)
        if changed:
            names = ", ".join(f"{k} ({before[k]} -> {v})" for k, v in changed.items())
            rank_zero_warn(f"MLflow run {self.run_id}: changed on resume (now tags resumed/<name>): {names}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each local checkpoint to ``<path>.tmp`` beside it, then renames it into place.

    Lightning's own save stages the file in the system temp folder (fsspec's transaction) and moves it
    over: a kill leaves the partial file there, and a move across filesystems is a copy that a kill can
    interrupt half-way at the target. Remote paths (``s3://`` ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, local_path)


def unlogged_step_metrics(trainer: L.Trainer) -> dict[str, Any] | None:
    """The metrics Lightning logs for the training step being saved, when a checkpoint is written at the
    end of a training batch (``ModelCheckpoint(every_n_train_steps=...)``): ``{"step", "metrics"}``.

    Lightning logs a step's metrics after every callback's ``on_train_batch_end``, so after the
    checkpoint of the step: a kill once the checkpoint is complete and before that log loses them,
    and the run resumed from that checkpoint never trains the step again. ``None`` for a save anywhere
    else, or for a step Lightning would not log (accumulating, off ``log_every_n_steps``). Reads the
    same private state Lightning's ``update_train_step_metrics`` reads (Lightning 2.6); a Lightning
    whose loops differ gives ``None``, which leaves the hole as it was.
    """
    try:
        loop = trainer.fit_loop.epoch_loop
        current = loop.batch_progress.current
        connector = trainer._logger_connector
        in_batch_end = trainer.training and current.processed > current.completed
        if not in_batch_end or trainer.fit_loop._should_accumulate() or not connector.should_update_logs:
            return None
        metrics = dict(connector.metrics["log"])
        step = loop._batches_that_stepped
    except (AttributeError, AssertionError, TypeError):
        return None
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float | torch.Tensor)}
    values.setdefault("epoch", float(trainer.current_epoch))  # as Lightning adds it
    return {"step": int(step), "metrics": values} if values else None


def _latest_steps(logger: MLFlowLogger) -> dict[str, int]:
    """The latest logged step of each metric of the logger's run (one query, not the histories)."""
    run = logger.experiment.get_run(logger.run_id)
    return {metric.key: metric.step for metric in run.data.to_proto().metrics}


class RunContinuity(Callback):
    """Lets a killed or crashed run resume as the same run; the ``ecglm`` CLI adds it to every trainer.

    - Each checkpoint records its MLflow run (``checkpoint["mlflow"]``: ``run_id``, ``experiment_id``,
      ``tracking_uri``), so ``ecglm fit --ckpt_path`` logs into that run again.
    - On resuming into an MLflow run that a kill left ``RUNNING`` or a crash ended ``FAILED``, the run is
      marked ``RUNNING`` again (it ends ``FINISHED`` or ``FAILED`` with this fit).
    - No hole in the run's metrics: a checkpoint written at the end of a training batch also records
      the metrics Lightning logs for that step after the checkpoint (``checkpoint["mlflow"]["unlogged"]``,
      :func:`unlogged_step_metrics`); resuming from it logs those the run lacks (a kill between the
      save and the log), at their step. Steps after the checkpoint are trained, so logged, again.
      Epoch-level training metrics of an epoch-end save are not covered (ecglm logs none).
    - Partial checkpoints (``*.tmp``) that a kill mid-save left in the checkpoint folders are removed
      at fit start (only those written before this process started).
    """

    def __init__(self) -> None:
        self.started = time.time()
        self._resumed: dict[str, Any] | None = None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resumed = checkpoint.get("mlflow")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            for path in remove_stale_partials(callback.dirpath, self.started) if callback.dirpath else []:
                rank_zero_info(f"removed {path}: a partial checkpoint left by a save that was killed")
        if trainer.ckpt_path:
            for logger in _mlflow_loggers(trainer):
                run = logger.experiment.get_run(logger.run_id)
                if run.info.status != "RUNNING":
                    logger.experiment.update_run(logger.run_id, status="RUNNING")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resumed, self._resumed = self._resumed, None
        unlogged = (resumed or {}).get("unlogged")
        if not trainer.is_global_zero or not trainer.ckpt_path or not unlogged:
            return
        step = unlogged["step"]
        for logger in _mlflow_loggers(trainer):
            if logger.run_id != resumed.get("run_id"):
                continue  # a new run (another tracking store) starts after the checkpoint
            latest = _latest_steps(logger)
            missing = {k: v for k, v in unlogged["metrics"].items() if latest.get(k, -1) < step}
            if missing:
                logger.log_metrics(missing, step=step)
                rank_zero_info(
                    f"MLflow run {logger.run_id}: logged step {step} again ({', '.join(sorted(missing))}): "
                    "its checkpoint was saved, its metrics were not (the run was stopped in between)"
                )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        loggers = _mlflow_loggers(trainer)
        if trainer.is_global_zero and loggers and loggers[0].run_id:
            logger = loggers[0]
            checkpoint["mlflow"] = {
                "run_id": logger.run_id,
                "experiment_id": logger.experiment_id,
                "tracking_uri": getattr(logger, "_tracking_uri", None),
            }
            unlogged = unlogged_step_metrics(trainer)
            if unlogged is not None:
                checkpoint["mlflow"]["unlogged"] = unlogged
