"""Atomic file writes: what ecglm writes is either complete on disk or absent, never half-written.

Also the run-folder helpers shared by the module, the callbacks and the evaluation protocol: write a
file into ``trainer.default_root_dir`` and attach it to every logger's run that stores artifacts
(MLflow). They take the trainer duck-typed, so this module imports no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def log_artifacts(trainer: Any, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    """Attach files to the run of every logger that stores artifacts (MLflow), under ``artifact_path``."""
    paths = [str(p) for p in paths]
    for logger in trainer.loggers:
        run_id = getattr(logger, "run_id", None)
        if run_id and hasattr(logger.experiment, "log_artifact"):
            for path in paths:
                logger.experiment.log_artifact(run_id, path, artifact_path=artifact_path)


def save_run_file(trainer: Any, name: str, data: str | bytes) -> Path:
    """Write ``data`` atomically into the run's folder and attach it to every logger's run (MLflow)."""
    raw = data.encode() if isinstance(data, str) else data
    path = atomic_write_bytes(Path(trainer.default_root_dir) / name, raw)
    log_artifacts(trainer, [path])
    return path
