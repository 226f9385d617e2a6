"""The ``ecglm`` command: Lightning's CLI (``fit``, ``validate``, ``test``, ``predict``) and our own
``evaluate``, ``shard`` and ``plugins``.

``ecglm shard --config shards/quickstart.yaml`` builds WebDataset shards with any shard builder.

``ecglm evaluate --config recipe.yaml --ckpt_path PATH`` runs the evaluation protocol
(:class:`ecglm.evaluation.EvaluationProtocol`): several seeds, the no-signal ablations, a report.
Its settings are the recipe's ``evaluate:`` section (every subcommand accepts and ignores it).

Plugins are discovered before the parser is built, so a recipe may name a component by its
entry-point name (``class_path: hf``) as well as by its import path.

A ``--ckpt_path`` is checked before the model is built (the LLM may take minutes to load): ``last`` is
resolved to the furthest-trained complete checkpoint of the run's checkpoint folders, a partial or unsafe
file is refused with its reason, and ``fit`` logs into the MLflow run the checkpoint was written by.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ecglm.callbacks import AtomicCheckpointIO, ResumedMLFlowLogger, RunContinuity
from ecglm.data.datamodule import ShardBuilder
from ecglm.evaluation import EvaluationProtocol
from ecglm.io import save_run_file
from ecglm.module import ECGLanguageModel
from ecglm.plugins import (
    Registry,
    UnknownComponentError,
    discover,
    format_registry,
    resolve_class_paths,
    resolve_cli_args,
)

PARSER_MODE = "ecglm_yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: MLflow on an embedded SQLite store in the working directory; recipes may point elsewhere.
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": "ecglm", "tracking_uri": "sqlite:///mlflow.db"},
    },
}


class MLflowSaveConfig(SaveConfigCallback):
    """Writes the resolved config next to the run and logs it to MLflow as an artifact.

    Lightning's default asserts a ``log_dir``, which a database-backed MLflow store does not have;
    this callback writes to ``trainer.default_root_dir`` instead and uploads from there.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        name = f"config_{getattr(stage, 'value', stage)}.yaml"  # stage is a TrainerFn
        save_run_file(trainer, name, self.parser.dump(self.config, skip_none=False))


def _make_loader(registry: Registry):
    def load(text: str) -> Any:
        return resolve_class_paths(yaml.safe_load(text), registry)

    return load


class CheckpointError(RuntimeError):
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
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
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
    if path is not None and Path(path).is_file():
        ckpt = peek_checkpoint(path)
        if fit:
            resume_mlflow_run(config.trainer, ckpt.get("mlflow"))
    return path


class ECGLMCLI(LightningCLI):
    """LightningCLI over :class:`ECGLanguageModel` and any LightningDataModule.

    ``ckpt_key``: the config key of the checkpoint when no subcommand runs (``evaluate.ckpt_path``).
    """

    def __init__(self, *args: Any, ckpt_key: str | None = None, **kwargs: Any):
        self.ckpt_key = ckpt_key
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # A recipe carries its evaluation protocol; only `ecglm evaluate` acts on it.
        parser.add_class_arguments(EvaluationProtocol, "evaluate", instantiate=False)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Here, before Lightning reads the checkpoint's hyper-parameters (a plain torch.load that fails
        # with torch's raw error) and before the model is built.
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        key = "ckpt_path" if subcommand else self.ckpt_key
        if key is not None and config.get(key):
            config[key] = prepare_ckpt_path(config, key, fit=subcommand == "fit")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        trainer = super()._instantiate_trainer(config, [*callbacks, RunContinuity()])
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a strategy's or user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def run_evaluate(args: list[str] | None, registry: Registry | None = None) -> dict[str, Any]:
    """``ecglm evaluate``: build model, data and trainer from the recipe, then run the protocol.

    ``args`` are the flags after ``evaluate`` (``None``: ``sys.argv[1:]``, as the console script sets it).
    """
    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    args = ["--evaluate.ckpt_path" if a == "--ckpt_path" else a for a in args]
    args = [f"--evaluate.ckpt_path={a.split('=', 1)[1]}" if a.startswith("--ckpt_path=") else a for a in args]
    if from_argv:
        sys.argv[1:] = args
    cli = run_cli(None if from_argv else args, registry=registry, run=False, ckpt_key="evaluate.ckpt_path")
    protocol = EvaluationProtocol(**cli.config["evaluate"].as_dict())
    config_text = cli.parser.dump(cli.config, skip_none=False)
    return protocol.run(cli.trainer, cli.model, cli.datamodule, config_text)


def run_cli(
    args: list[str] | None, registry: Registry | None = None, run: bool = True, ckpt_key: str | None = None
) -> ECGLMCLI:
    registry = registry or discover()
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both): resolve in place
        sys.argv[1:] = resolve_cli_args(sys.argv[1:], registry)
    else:
        args = resolve_cli_args(args, registry)
    set_loader(PARSER_MODE, _make_loader(registry), exceptions=(yaml.YAMLError, UnknownComponentError))
    parser_kwargs = {"parser_mode": PARSER_MODE}
    if run:
        parser_kwargs.update({cmd: {"parser_mode": PARSER_MODE} for cmd in SUBCOMMANDS})
    return ECGLMCLI(
        ECGLanguageModel,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=MLflowSaveConfig,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
        ckpt_key=ckpt_key,
    )


def shard_parser(registry: Registry | None = None) -> ArgumentParser:
    """``ecglm shard``: a shard builder (any class with ``build(out_dir) -> manifest``) and its folder."""
    set_loader(
        PARSER_MODE, _make_loader(registry or discover()), exceptions=(yaml.YAMLError, UnknownComponentError)
    )
    parser = ArgumentParser(prog="ecglm shard", parser_mode=PARSER_MODE, description=run_shard.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with `builder` and `out_dir`")
    parser.add_argument("--builder", type=ShardBuilder, required=True, help="class_path + init_args")
    parser.add_argument("--out_dir", type=str, required=True, help="folder for the shards and manifest.json")
    return parser


def run_shard(args: list[str], registry: Registry | None = None) -> dict[str, Any]:
    """Build WebDataset shards and their manifest (idempotent: an up-to-date folder is left as it is)."""
    parser = shard_parser(registry)
    config = parser.instantiate_classes(parser.parse_args(args))
    started = time.perf_counter()
    manifest = config.builder.build(config.out_dir)
    print(f"{config.out_dir}: {manifest.get('dataset', '?')} in {time.perf_counter() - started:.1f} s")
    for split, info in manifest.get("splits", {}).items():
        datasets = ", ".join(f"{d} {n}" for d, n in (info.get("datasets") or {}).items())
        print(
            f"  {split:<5} {info.get('num_ecgs', '?')} ECGs, {info.get('num_qa', '?')} QA pairs"
            f" in {len(info.get('shards', []))} shards" + (f" ({datasets})" if datasets else "")
        )
    if manifest.get("dropped"):
        print(f"  dropped: {manifest['dropped']}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plugins"]:
        registry = discover()
        print(format_registry(registry))
        return 1 if registry.failures else 0
    if args[:1] == ["shard"]:
        run_shard(args[1:])
        return 0
    if args[:1] == ["evaluate"]:
        if argv is None:
            sys.argv[1:] = args[1:]  # LightningCLI then reads the flags from sys.argv
        run_evaluate(None if argv is None else args[1:])
        return 0
    # LightningCLI reads sys.argv itself when args is None (and warns when given both).
    run_cli(args if argv is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
