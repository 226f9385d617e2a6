"""``ecglm shard --config shards/quickstart.yaml``: WebDataset shards and their manifest from any shard
builder (a class with ``build(out_dir) -> manifest``), named by ``class_path`` in the YAML."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from ecglm.commands.lightning import PARSER_MODE, use_recipe_loader
from ecglm.data.datamodule import ShardBuilder
from ecglm.data.publish import publish
from ecglm.data.stream.remote import is_remote
from ecglm.plugins import Registry, discover


def shard_parser(registry: Registry | None = None) -> ArgumentParser:
    """The parser of ``ecglm shard``: a shard builder and its folder."""
    use_recipe_loader(registry or discover())
    parser = ArgumentParser(
        prog="ecglm shard", parser_mode=PARSER_MODE, description=run_shard.__doc__, exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with `builder` and `out_dir`")
    parser.add_argument("--builder", type=ShardBuilder, required=True, help="class_path + init_args")
    parser.add_argument(
        "--out_dir",
        type=str,
        required=True,
        help="folder (or s3://, gs://, ... URL) for the shards and manifest.json",
    )
    parser.add_argument(
        "--staging_dir",
        type=str | None,
        default=None,
        help="with a URL out_dir: local folder to build in first (default: ~/.cache/ecglm-staging/...)",
    )
    parser.add_argument(
        "--storage_options",
        type=dict | None,
        default=None,
        help="fsspec options of a URL out_dir (not credentials)",
    )
    return parser


def run_shard(args: list[str], registry: Registry | None = None) -> dict[str, Any]:
    """Build WebDataset shards and their manifest (idempotent: an up-to-date folder is left as it is)."""
    parser = shard_parser(registry)
    config = parser.instantiate_classes(parser.parse_args(args))
    started = time.perf_counter()
    remote = is_remote(config.out_dir)
    folder = config.out_dir
    if remote:  # built locally (builders write folders), then copied, the manifest last
        folder = config.staging_dir or str(Path.home() / ".cache" / "ecglm-staging" / _slug(config.out_dir))
    manifest = config.builder.build(folder)
    if remote:
        copied = publish(folder, config.out_dir, config.storage_options)
        print(
            f"{config.out_dir}: {copied['written']} shards written, {copied['kept']} already there, "
            "manifest last"
        )
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


def _slug(url: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in url)


def shard(args: list[str]) -> int:
    """Build WebDataset shards: ``ecglm shard --config shards/quickstart.yaml``."""
    run_shard(args)
    return 0
