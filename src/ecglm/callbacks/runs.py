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


class RunContinuity(Callback):
    """Lets a killed or crashed run resume as the same run; the ``ecglm`` CLI adds it to every trainer.

    - Each checkpoint records its MLflow run (``checkpoint["mlflow"]``: ``run_id``, ``experiment_id``,
      ``tracking_uri``), so ``ecglm fit --ckpt_path`` logs into that run again.
    - On resuming into an MLflow run that a kill left ``RUNNING`` or a crash ended ``FAILED``, the run is
      marked ``RUNNING`` again (it ends ``FINISHED`` or ``FAILED`` with this fit).
    - Partial checkpoints (``*.tmp``) that a kill mid-save left in the checkpoint folders are removed
      at fit start (only those written before this process started).
    """

    def __init__(self) -> None:
        self.started = time.time()

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
