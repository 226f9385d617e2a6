"""The report in the experiment tracker: summary metrics to the Trainer's loggers, files to MLflow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from ecglm.io import log_artifacts


def _log_to_mlflow(trainer: L.Trainer, summary: dict[str, Any], files: Sequence[Path]) -> None:
    """Each metric's mean and std over seeds as ``eval/{condition}/{dataset}/{metric}[_std]`` to every
    logger of the Trainer, and the report's files as artifacts (folder ``evaluation``)."""
    metrics = {}
    for c, entry in summary["conditions"].items():
        for dataset, values in entry["datasets"].items():
            for metric, stat in values.items():
                if metric != "n" and not math.isnan(stat["mean"]):
                    metrics[f"eval/{c}/{dataset}/{metric}"] = stat["mean"]
                    metrics[f"eval/{c}/{dataset}/{metric}_std"] = stat["std"]
    for logger in trainer.loggers:
        logger.log_metrics(metrics)
    log_artifacts(trainer, files, artifact_path="evaluation")
