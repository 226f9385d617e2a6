"""The ``ecglm`` command: Lightning's CLI (``fit``, ``validate``, ``test``, ``predict``) and our own
``evaluate``, ``shard`` and ``plugins``.

``ecglm shard --config shards/quickstart.yaml`` builds WebDataset shards with any shard builder.

``ecglm evaluate --config recipe.yaml --ckpt_path PATH`` runs the evaluation protocol
(:class:`ecglm.evaluation.EvaluationProtocol`): several seeds, the controls, intervals, a report.
Its settings are the recipe's ``evaluate:`` section (every subcommand accepts and ignores it).

Plugins are discovered before the parser is built, so a recipe may name a component by its
entry-point name (``class_path: hf``) as well as by its import path.

A ``--ckpt_path`` is checked before the model is built (:mod:`ecglm.resume`): ``last`` is
resolved to the furthest-trained complete checkpoint of the run's checkpoint folders, a partial or unsafe
file is refused with its reason, and ``fit`` logs into the MLflow run the checkpoint was written by.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_loader
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ecglm.callbacks import AtomicCheckpointIO, RunContinuity
from ecglm.data.datamodule import ShardBuilder
from ecglm.data.monitor import SkippedInputLogger
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
from ecglm.resume import prepare_ckpt_path
from ecglm.wiring import connect

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

    def before_instantiate_classes(self) -> None:
        # A strategy that cannot run this recipe (FSDP over uint8 4-bit weights, ...) fails here, with
        # the reason, before the LLM loads rather than mid-run.
        from ecglm.estimate import check_recipe

        subcommand = self.config.get("subcommand")
        check_recipe(self.config.get(subcommand) if subcommand else self.config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.datamodule is not None:
            connect(self.model, self.datamodule)  # what each side needs from the other, once
        self.model.model.recipe = self.model_recipe()

    def model_recipe(self) -> dict[str, Any]:
        """How the model's parts and prompt style were built (``class_path`` + ``init_args``, entry-point
        names resolved): what a bundle records (``ECGLM.save_pretrained``)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        model = config["model"].as_dict()
        recipe = {p: model[p] for p in ("encoder", "connector", "backbone", "policy") if model.get(p)}
        data = config.get("data")
        prompt = data.get("init_args", {}).get("prompt") if data is not None else None
        prompt = prompt.as_dict() if hasattr(prompt, "as_dict") else prompt
        # The DataModule's default prompt style when the recipe names none.
        recipe["prompt"] = prompt or {"class_path": "ecglm.prompts.ChatTemplate", "init_args": {}}
        image = data.get("init_args", {}).get("image") if data is not None else None
        if image:  # the image path: how each ECG is drawn for the model (ecglm.render.ECGPrintout)
            recipe["image"] = image.as_dict() if hasattr(image, "as_dict") else image
        return recipe

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
        extra: list[L.Callback] = [RunContinuity()]
        if not any(isinstance(c, SkippedInputLogger) for c in callbacks):
            extra.append(SkippedInputLogger())  # QA pairs lost to bad input, logged during training
        trainer = super()._instantiate_trainer(config, [*callbacks, *extra])
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


def run_export(args: list[str], registry: Registry | None = None) -> Path:
    """``ecglm export --config recipe.yaml --ckpt_path PATH --out DIR``: a training checkpoint as a
    portable bundle (:mod:`ecglm.bundle`); ``--ckpt_path last`` takes the run's furthest-trained one.
    The recipe's evaluation report (``evaluate.out_dir``/report.json), when there is one, goes into
    the model card."""
    from ecglm.bundle import BundleError
    from ecglm.resume import peek_checkpoint

    args, out = _pop_flag(list(args), "--out")
    args, ckpt = _pop_flag(args, "--ckpt_path")
    if not out or not ckpt:
        raise BundleError("give --config RECIPE, --ckpt_path PATH (or last) and --out NEW_DIR")
    cli = run_cli([*args, f"--evaluate.ckpt_path={ckpt}"], registry, run=False, ckpt_key="evaluate.ckpt_path")
    path = cli.config["evaluate"]["ckpt_path"]
    if not path or not Path(path).is_file():
        raise BundleError(f"--ckpt_path {ckpt}: no checkpoint file (give a path, or last)")
    checkpoint = peek_checkpoint(path)
    task = cli.model
    task.on_load_checkpoint(checkpoint)  # the key check, and the run's few-shot demonstrations
    task.load_state_dict(checkpoint["state_dict"], strict=False)
    evaluate = cli.config["evaluate"]
    report_dir = Path(evaluate.get("out_dir") or Path(cli.trainer.default_root_dir) / "evaluation")
    report_file = report_dir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    written = task.model.save_pretrained(out, report=report)
    print(f"bundle: {written} (from {path}{'; card with ' + str(report_file) if report else ''})")
    return written


def _pop_flag(args: list[str], flag: str) -> tuple[list[str], str | None]:
    """``args`` without ``flag VALUE`` / ``flag=VALUE``, and the value."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[:i] + args[i + 2 :], args[i + 1]
        if arg.startswith(flag + "="):
            return args[:i] + args[i + 1 :], arg.split("=", 1)[1]
    return args, None


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
    if args[:1] == ["compare"]:
        from ecglm.evaluation import run_compare

        try:
            print(f"comparison: {run_compare(args[1:])}")
        except ValueError as err:
            print(f"ecglm compare: {err}", file=sys.stderr)
            return 2
        return 0
    if args[:1] == ["render"]:
        from ecglm.records import RecordError
        from ecglm.render import run_render

        try:
            print(f"printout: {run_render(args[1:])}")
        except (RecordError, ValueError) as err:
            print(f"ecglm render: {err}", file=sys.stderr)
            return 2
        return 0
    if args[:1] == ["ask"]:
        from ecglm.bundle import BundleError
        from ecglm.inference import run_ask
        from ecglm.records import RecordError

        try:
            return run_ask(args[1:])
        except (BundleError, RecordError, ValueError) as err:
            print(f"ecglm ask: {err}", file=sys.stderr)
            return 2
    if args[:1] == ["export"]:
        from ecglm.bundle import BundleError

        try:
            run_export(args[1:])
        except BundleError as err:
            print(f"ecglm export: {err}", file=sys.stderr)
            return 2
        return 0
    if args[:1] == ["estimate"]:
        from ecglm.estimate import EstimateError, StrategyError, run_estimate

        try:
            run_estimate(args[1:])
        except (EstimateError, StrategyError) as err:
            print(f"ecglm estimate: {err}", file=sys.stderr)
            return 2
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
