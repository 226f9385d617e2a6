"""Which checkpoint a run resumes from, and into which MLflow run: checked before the model is built.

``--ckpt_path last`` is resolved to the furthest-trained complete checkpoint of the run's checkpoint
folders; a partial or unsafe file is refused with its reason (the LLM may take minutes to load
first otherwise); a resumed ``fit`` logs into the MLflow run its checkpoint was written by. Used by
the CLI (:class:`ecglm.cli.ECGLMCLI`) on the parsed config, before anything is instantiated.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ecglm.callbacks import ResumedMLFlowLogger
from ecglm.errors import EcglmError


class CheckpointError(EcglmError, RuntimeError):
    """A ``--ckpt_path`` that cannot be used: partial, not a checkpoint, or unsafe to unpickle."""


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, tensors memory-mapped (not read): cheap for a checkpoint of any size.

    Refuses, with the reason, what Lightning's loads would fail on with torch's raw error (for
    ``evaluate``, after the LLM has loaded): a pickle naming globals other than tensors and plain
    containers, and a partial or unreadable file. (LightningCLI reads every ``--ckpt_path`` with
    ``weights_only=True`` whatever ``--weights_only`` says, so this check is no stricter.)
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        from ecglm.encoders import explain_unpickling_error

        origin = " ecglm fit writes checkpoints of tensors and plain containers only; this one was not."
        raise CheckpointError(explain_unpickling_error(str(path), err) + origin) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        text = str(err).strip()
        # The first sentence: torch's messages go on to general advice over several lines.
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise CheckpointError(f"{path} is not a complete checkpoint: {reason}") from err


def _config_class(node: Any) -> type | None:
    """The class a ``class_path`` config node names (``None`` for anything else)."""
    class_path = node.get("class_path") if isinstance(node, Namespace | dict) else None
    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _nodes_of(value: Any, base: type) -> list[Namespace]:
    nodes = value if isinstance(value, list) else [value]
    return [n for n in nodes if isinstance(cls := _config_class(n), type) and issubclass(cls, base)]


def checkpoint_folders(trainer: Namespace) -> list[Path]:
    """Folders the configured ModelCheckpoints write to; Lightning's default places for one without a
    ``dirpath`` (``<default_root_dir>/checkpoints``, ``<default_root_dir>/<name>/<version>/checkpoints``)."""
    configs = _nodes_of(trainer.get("callbacks"), ModelCheckpoint)
    folders = [Path(c.get("init_args.dirpath")).expanduser() for c in configs if c.get("init_args.dirpath")]
    if not configs or len(folders) < len(configs):
        root = Path(trainer.get("default_root_dir") or os.getcwd()).expanduser()
        folders += [root / "checkpoints", *sorted(root.glob("*/*/checkpoints"))]
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def newest_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The complete ``*.ckpt`` with the most training steps in ``folders``, by the ``global_step``
    recorded inside (a kill between two saves can leave ``last.ckpt`` older than a step checkpoint, and
    copies change modification times). Partial and unreadable files are skipped with a warning."""
    folders = list(folders)
    found = []
    for path in sorted({p for folder in folders for p in folder.glob("*.ckpt")}):
        try:
            ckpt = peek_checkpoint(path)
        except CheckpointError as err:
            rank_zero_warn(f"ckpt_path=last: skipped: {err}")
            continue
        found.append((ckpt.get("global_step", -1), ckpt.get("epoch", -1), path.stat().st_mtime, path))
    if not found:
        return None
    step, epoch, _, path = max(found)
    rank_zero_info(
        f"ckpt_path=last: {path} (global step {step}, epoch {epoch}), the furthest-trained of "
        f"{len(found)} complete checkpoint(s) in {', '.join(map(str, folders))}"
    )
    return path


def _mlflow_run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def resume_mlflow_run(trainer: Namespace, record: dict[str, Any] | None) -> None:
    """Point each configured MLFlowLogger without a ``run_id`` at the run that wrote the checkpoint
    (``record``: its ``checkpoint["mlflow"]``). A tracking store without that run gets a new run
    tagged ``ecglm.resumed_from_run``."""
    old = (record or {}).get("run_id")
    for logger in _nodes_of(trainer.get("logger"), MLFlowLogger) if old else []:
        args = logger.get("init_args")
        if args is None or args.get("run_id"):
            continue
        uri = args.get("tracking_uri") or f"file:{args.get('save_dir') or './mlruns'}"
        if _mlflow_run_exists(uri, old):
            args.run_id = old
            if _config_class(logger) is MLFlowLogger:  # one whose params may differ from the run's
                logger.class_path = f"{ResumedMLFlowLogger.__module__}.{ResumedMLFlowLogger.__name__}"
            rank_zero_info(f"MLflow: resuming run {old} in {uri}")
            continue
        args.tags = {**(args.get("tags") or {}), "ecglm.resumed_from_run": old}
        rank_zero_info(
            f"MLflow: the tracking store {uri} has no run {old} (the checkpoint's, written to "
            f"{record.get('tracking_uri')}); logging to a new run tagged ecglm.resumed_from_run={old}"
        )


def prepare_ckpt_path(config: Namespace, key: str, fit: bool) -> str | None:
    """Resolve ``last``, refuse a checkpoint Lightning would fail on, and (``fit``) resume its MLflow run."""
    path = config.get(key)
    if path == "last":
        folders = checkpoint_folders(config.trainer)
        found = newest_checkpoint(folders)
        if found is None and not fit:
            raise CheckpointError(f"{key}=last: no complete checkpoint in {[str(f) for f in folders]}")
        if found is None:
            rank_zero_warn(f"{key}=last: no complete checkpoint found; training starts from scratch")
        path = None if found is None else str(found)
    if path is not None and "://" not in str(path) and not Path(path).is_file():
        raise CheckpointError(f"{key} {path}: no such checkpoint file (give a path, or last)")
    if path is not None:
        ckpt = peek_checkpoint(path)
        if fit:
            resume_mlflow_run(config.trainer, ckpt.get("mlflow"))
    return path
