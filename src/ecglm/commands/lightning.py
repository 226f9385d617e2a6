"""The recipe commands, on Lightning's CLI: ``fit``, ``validate``, ``test``, ``predict``, ``evaluate``
(the evaluation protocol) and ``export`` (a checkpoint as a bundle).

Plugins are discovered before the parser is built, so a recipe may name a component by its
entry-point name (``class_path: hf``) as well as by its import path; recipe keys of earlier releases
are migrated as the recipe is read (:mod:`ecglm.commands.recipe_keys`).

Everything a recipe names is checked before the LLM loads: a ``--ckpt_path`` (:mod:`ecglm.resume`:
``last`` is the furthest-trained complete checkpoint; a partial or unsafe file is refused), the
data folder, and whether the strategy can run the recipe (:func:`ecglm.estimate.check_recipe`).
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import set_loader
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ecglm.callbacks import AtomicCheckpointIO, ProgressLog, RunContinuity, interactive
from ecglm.commands.recipe_keys import migrate_recipe
from ecglm.data.monitor import SkippedInputLogger
from ecglm.errors import EcglmError
from ecglm.evaluation import EvaluationProtocol
from ecglm.io import save_run_file
from ecglm.module import ECGLanguageModel
from ecglm.plugins import Registry, UnknownComponentError, discover, resolve_class_paths, resolve_cli_args
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


class ConfigError(EcglmError, ValueError):
    """A recipe whose values a component refused as it was built, or whose data folder is unusable."""


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


def recipe_loader(registry: Registry):
    """The YAML loader of recipes: entry-point names resolved, keys of earlier releases migrated."""

    def load(text: str) -> Any:
        return migrate_recipe(resolve_class_paths(yaml.safe_load(text), registry))

    return load


def use_recipe_loader(registry: Registry) -> None:
    set_loader(PARSER_MODE, recipe_loader(registry), exceptions=(yaml.YAMLError, UnknownComponentError))


class ECGLMCLI(LightningCLI):
    """LightningCLI over :class:`ECGLanguageModel` and any LightningDataModule.

    ``ckpt_key``: the config key of the checkpoint when no subcommand runs (``evaluate.ckpt_path``).
    ``check_data``: refuse a data folder without shards (``False`` where no data is read: a recipe's
    model answering a benchmark, :mod:`ecglm.commands.recipe_model`).
    """

    def __init__(self, *args: Any, ckpt_key: str | None = None, check_data: bool = True, **kwargs: Any):
        self.ckpt_key = ckpt_key
        self.check_data = check_data
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # A recipe carries its evaluation protocol; only `ecglm evaluate` acts on it.
        parser.add_class_arguments(EvaluationProtocol, "evaluate", instantiate=False)

    def _stage_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand) if subcommand else self.config

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if isinstance(err, EcglmError):
                raise
            # A component refused a value of the recipe (its constructor's own check).
            raise ConfigError(f"the recipe's values were refused while building it: {err}") from err
        if self.datamodule is not None:
            connect(self.model, self.datamodule)  # what each side needs from the other, once
        self.model.model.recipe = self.model_recipe()

    def model_recipe(self) -> dict[str, Any]:
        """How the model's parts, prompt style and printout were built (``class_path`` + ``init_args``,
        entry-point names resolved): what a bundle records (``ECGLM.save_pretrained``)."""
        config = self._stage_config()
        model = config["model"].as_dict()
        recipe = {p: model[p] for p in ("encoder", "connector", "backbone", "policy") if model.get(p)}
        data = config.get("data")
        init_args = data.get("init_args", {}) if data is not None else {}
        prompt = _plain(init_args.get("prompt"))
        # The DataModule's default prompt style when the recipe names none; none for a backbone written
        # for 0.1 whose own prompt settings write the prompts (deprecated): the backbone rebuilds them.
        legacy = getattr(self.model.backbone, "_legacy_prompt", None)
        if legacy is not None and self.datamodule is not None and self.datamodule.prompt is legacy:
            recipe["prompt"] = None
        else:
            recipe["prompt"] = prompt or {"class_path": "ecglm.prompts.ChatTemplate", "init_args": {}}
        image = _plain(init_args.get("image"))
        if image:  # the image path: how each ECG is drawn for the model (ecglm.render.ECGPrintout)
            if "class_path" not in image:  # the DataModule's type, given by its arguments alone
                image = {"class_path": "ecglm.render.ECGPrintout", "init_args": image}
            recipe["image"] = image
        return recipe

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Here, before Lightning reads the checkpoint's hyper-parameters (a plain torch.load that fails
        # with torch's raw error) and before the model is built.
        subcommand = self.config.get("subcommand")
        config = self._stage_config()
        key = "ckpt_path" if subcommand else self.ckpt_key
        if key is not None and config.get(key):
            config[key] = prepare_ckpt_path(config, key, fit=subcommand == "fit")
        # A strategy that cannot run this recipe (FSDP over uint8 4-bit weights, ...) and a data folder
        # that holds no shards fail here, with the reason, before anything is built or seeded.
        from ecglm.estimate import check_recipe

        check_recipe(config)
        if self.check_data:
            check_data_folder(config.get("data"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        extra: list[L.Callback] = [RunContinuity()]
        given = [*callbacks, *(config.get("callbacks") or [])]  # the CLI's and the recipe's own
        if not any(isinstance(c, SkippedInputLogger) for c in given):
            extra.append(SkippedInputLogger())  # QA pairs lost to bad input, logged during training
        bar = config.get("enable_progress_bar", True) is not False
        if bar and not interactive() and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(ProgressLog())  # CI, SLURM, a log file: progress as lines, not a bar nobody sees
        trainer = super()._instantiate_trainer(config, [*callbacks, *extra])
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a strategy's or user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _plain(node: Any) -> Any:
    return node.as_dict() if hasattr(node, "as_dict") else node


def check_data_folder(data: Any) -> None:
    """A shard DataModule needs a ``data_dir`` that holds a manifest, or a builder that writes one."""
    if data is None:
        return
    from ecglm.data.datamodule import ECGQADataModule

    cls = _class_named(data)
    if not (isinstance(cls, type) and issubclass(cls, ECGQADataModule)):
        return
    init_args = data.get("init_args") or {}
    data_dir = init_args.get("data_dir")
    if not data_dir:
        raise ConfigError(
            "data.init_args.data_dir is not set: give the folder of the shards (ecglm shard writes one; "
            "with data.init_args.builder the shards are built there on first use)"
        )
    from ecglm.data.stream.remote import is_remote, local_path

    if is_remote(data_dir):
        return  # read through fsspec in setup, which names the URL if there is no manifest there
    manifest = local_path(data_dir) / "manifest.json"
    builder = init_args.get("builder")
    if builder is None and not manifest.is_file():
        raise ConfigError(
            f"data.init_args.data_dir {data_dir}: no manifest.json there; build the shards first "
            "(ecglm shard --config ...) or name a builder (data.init_args.builder) to build them"
        )
    # The builder's own refusal, before the LLM loads rather than at prepare_data.
    dataset = getattr(_class_named(builder), "dataset", None)
    if isinstance(dataset, str):
        from ecglm.data.shards import refuse_foreign_shards

        refuse_foreign_shards(local_path(data_dir), dataset)


def _class_named(spec: Any) -> type | None:
    """The class a recipe's ``{class_path, init_args}`` names, or None: none named, or one that does not
    import (jsonargparse has checked it; a failure here is not the data folder's)."""
    from ecglm.plugins import import_object

    class_path = spec.get("class_path") if hasattr(spec, "get") else None  # a dict or a Namespace
    try:
        return import_object(class_path) if class_path else None
    except UnknownComponentError:
        return None


def run_cli(
    args: list[str] | None,
    registry: Registry | None = None,
    run: bool = True,
    ckpt_key: str | None = None,
    check_data: bool = True,
) -> ECGLMCLI:
    """Lightning's CLI over a recipe: with ``run``, ``args`` start with the subcommand (``fit``, ...);
    without, the model, data and trainer are built and returned (``evaluate``, ``export``, and with
    ``check_data=False``, which reads no shards, ``benchmark run --config``)."""
    registry = registry or discover()
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both): resolve in place
        sys.argv[1:] = resolve_cli_args(sys.argv[1:], registry)
    else:
        args = resolve_cli_args(args, registry)
    args = _data_for_prompt_help(args)
    use_recipe_loader(registry)
    # The arguments always travel explicitly (ecglm.commands.main empties sys.argv; tests have their own).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # exit_on_error=False: a bad value raises (ecglm.commands.main prints one line) instead of printing
    # the whole usage before the error.
    parser_kwargs: dict[str, Any] = {"parser_mode": PARSER_MODE, "exit_on_error": False}
    if run:
        parser_kwargs.update({cmd: dict(parser_kwargs) for cmd in SUBCOMMANDS})
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
        check_data=check_data,
    )


def _data_for_prompt_help(args: list[str] | None) -> list[str] | None:
    """``--data.prompt.help NAME`` asks for the help of a prompt style, an argument of ecglm's shard
    DataModule: name that DataModule first when nothing before it did (jsonargparse needs the class)."""
    if args is None:
        return args
    for i, arg in enumerate(args):
        if arg.startswith(("--data.prompt.help", "--data.init_args.prompt.help")):
            before = args[:i]
            if not any(a.startswith(("--data=", "--config")) or a == "--data" for a in before):
                return [*before, "--data=ecglm.data.datamodule.ECGQADataModule", *args[i:]]
    return args


def fit(args: list[str]) -> int:
    """Train a recipe: ``ecglm fit --config recipe.yaml [--ckpt_path last]``."""
    run_cli(["fit", *args])
    return 0


def validate(args: list[str]) -> int:
    """Validate a recipe's model: ``ecglm validate --config recipe.yaml --ckpt_path PATH``."""
    run_cli(["validate", *args])
    return 0


def test(args: list[str]) -> int:
    """Test a recipe's model under the controls: ``ecglm test --config recipe.yaml --ckpt_path PATH``."""
    run_cli(["test", *args])
    return 0


def predict(args: list[str]) -> int:
    """Run a recipe's predict loop: ``ecglm predict --config recipe.yaml --ckpt_path PATH``."""
    run_cli(["predict", *args])
    return 0


def _ckpt_flag(args: list[str]) -> list[str]:
    args = ["--evaluate.ckpt_path" if a == "--ckpt_path" else a for a in args]
    return [f"--evaluate.ckpt_path={a.split('=', 1)[1]}" if a.startswith("--ckpt_path=") else a for a in args]


def run_evaluate(args: list[str], registry: Registry | None = None) -> dict[str, Any]:
    """``ecglm evaluate``: build model, data and trainer from the recipe, then run the protocol
    (:class:`ecglm.evaluation.EvaluationProtocol`: seeds, controls, intervals, a report). Its settings
    are the recipe's ``evaluate:`` section (every subcommand accepts and ignores it)."""
    cli = run_cli(_ckpt_flag(list(args)), registry=registry, run=False, ckpt_key="evaluate.ckpt_path")
    protocol = EvaluationProtocol(**cli.config["evaluate"].as_dict())
    if cli.datamodule is not None:
        cli.datamodule.prepare_data()  # a recipe's builder builds its shards on first use, as fit does
    config_text = cli.parser.dump(cli.config, skip_none=False)
    return protocol.run(cli.trainer, cli.model, cli.datamodule, config_text)


def evaluate(args: list[str]) -> int:
    """Evaluate a checkpoint under every control: ``ecglm evaluate --config recipe.yaml --ckpt_path last``."""
    run_evaluate(args)
    return 0


def run_export(args: list[str], registry: Registry | None = None) -> Path:
    """``ecglm export --config recipe.yaml --ckpt_path PATH --out DIR``: a training checkpoint as a
    portable bundle (:mod:`ecglm.bundle`); ``--ckpt_path last`` takes the run's furthest-trained one.
    The recipe's evaluation report (``evaluate.out_dir``/report.json), when there is one, goes into
    the model card."""
    from ecglm.bundle import BundleError
    from ecglm.resume import peek_checkpoint

    if "-h" in args or "--help" in args:
        print("usage: ecglm export --config RECIPE [--config VARIANT] --ckpt_path PATH|last --out NEW_DIR\n")
        print(inspect.getdoc(run_export))
        raise SystemExit(0)
    args, out = _pop_flag(list(args), "--out")
    args, ckpt = _pop_flag(args, "--ckpt_path")
    if not out or not ckpt:
        raise BundleError("give --config RECIPE, --ckpt_path PATH (or last) and --out NEW_DIR")
    if Path(out).exists():
        raise BundleError(f"--out {out} exists: give a new folder (a bundle is never written over another)")
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


def export(args: list[str]) -> int:
    """Write a checkpoint as a portable bundle: ``ecglm export --config R --ckpt_path last --out DIR``."""
    run_export(args)
    return 0


def _pop_flag(args: list[str], flag: str) -> tuple[list[str], str | None]:
    """``args`` without ``flag VALUE`` / ``flag=VALUE``, and the value."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[:i] + args[i + 2 :], args[i + 1]
        if arg.startswith(flag + "="):
            return args[:i] + args[i + 1 :], arg.split("=", 1)[1]
    return args, None
