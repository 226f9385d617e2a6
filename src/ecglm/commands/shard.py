"""``ecglm shard --config shards/quickstart.yaml``: WebDataset shards and their manifest from any shard
builder (a class with ``build(out_dir) -> manifest``), named by ``class_path`` in the YAML."""

from __future__ import annotations

import time
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from ecglm.commands.lightning import PARSER_MODE, use_recipe_loader
from ecglm.data.datamodule import ShardBuilder
from ecglm.plugins import Registry, discover


def shard_parser(registry: Registry | None = None) -> ArgumentParser:
    """The parser of ``ecglm shard``: a shard builder and its folder."""
    use_recipe_loader(registry or discover())
    parser = ArgumentParser(
        prog="ecglm shard", parser_mode=PARSER_MODE, description=run_shard.__doc__, exit_on_error=False
    )
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


def shard(args: list[str]) -> int:
    """Build WebDataset shards: ``ecglm shard --config shards/quickstart.yaml``."""
    run_shard(args)
    return 0
