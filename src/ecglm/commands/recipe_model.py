"""The untrained model a recipe describes, for ``ecglm benchmark run --config``: built by Lightning's CLI
exactly as ``ecglm fit`` builds it before its first step (:func:`ecglm.commands.lightning.run_cli`: the
recipe's parts with their own pretrained weights, its prompt style and printout), with no training and
no checkpoint. A vision-language backbone (``hf-vision-language``) reads the pictures with its own
tower, so the model is that Hugging Face model zero-shot; in a recipe with an encoder and connector of
ecglm's own, the connector (and an encoder without pretrained weights) keeps its initial random
weights: an untrained baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecglm.model import ECGLM

#: Lightning's Trainer is built with the recipe but never runs: no logger, one process on the CPU (the
#: model is moved to the device asked for; a recipe for eight GPUs still answers on one).
NO_TRAINER = (
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
)


def recipe_args(configs: list[str], overrides: list[str]) -> list[str]:
    """The CLI arguments of ``configs`` (merged in order) with each ``PART.KEY=VALUE`` of ``overrides``
    (as for a bundle, :func:`ecglm.bundle.parse_overrides`) given as ``--model.PART.init_args.KEY=VALUE``,
    the value read as YAML by the recipe's own parser."""
    from ecglm.bundle import parse_overrides

    parse_overrides(overrides)  # refused here, naming the item, when not PART.KEY=VALUE
    args = [arg for config in configs for arg in ("--config", config)]
    for item in overrides:
        part, _, rest = item.partition(".")
        args.append(f"--model.{part}.init_args.{rest}")
    return args


def model_from_recipe(configs: list[str], overrides: list[str], device: str) -> tuple[ECGLM, dict[str, Any]]:
    """The recipe's model on ``device`` in eval mode, untrained, and what ``run.json`` records of it
    (``name``: the backbone's model; ``zero_shot``; ``recipe``; the parts as built; ``decoding``: the
    recipe's ``model.decoding``, with which its answers are generated)."""
    from ecglm.commands.lightning import ConfigError, run_cli
    from ecglm.encoders import BackbonePixels

    for config in configs:
        if not Path(config).is_file():
            raise ConfigError(f"--config {config}: no such recipe file (give a recipe, e.g. under recipes/)")
    cli = run_cli([*recipe_args(configs, overrides), *NO_TRAINER], run=False, check_data=False)
    model = cli.model.model.to(device).eval()
    parts = model.recipe or {}
    backbone = (parts.get("backbone") or {}).get("init_args") or {}
    record = {
        "name": str(backbone.get("model") or type(model.backbone).__name__),
        "zero_shot": True,
        "recipe": " + ".join(configs),
        "components": json.loads(json.dumps(parts, default=str)),
        "reads_images_itself": isinstance(model.encoder, BackbonePixels),
        "decoding": asdict(cli.model.decoding),
    }
    if not record["reads_images_itself"]:
        print(
            f"note: {record['recipe']} gives the model a connector of ecglm's own, which starts from its"
            " initial random weights here (as may its encoder): its answers are an untrained baseline"
        )
    return model, record
