"""Reading a recipe as ``ecglm fit`` would: its YAML files merged, overrides applied, plugins resolved."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ecglm.errors import EcglmError


class EstimateError(EcglmError, ValueError):
    """A recipe that cannot be estimated, with what to do about it."""


# --- reading a recipe --------------------------------------------------------------------------------


def read_recipe(path: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe as a dict, entry-point names resolved, ``--a.b.c=value`` overrides applied.

    Several paths merge in order, as several ``--config`` do for ``ecglm fit`` (a recipe, then a
    multi-GPU variant): mappings key by key, anything else replaced. Overrides take YAML values
    (``--trainer.devices=8``, ``--model.policy.init_args.r=32``) and ``--key value`` as well as
    ``--key=value``.
    """
    from ecglm.plugins import discover, resolve_class_paths

    config: dict[str, Any] = {}
    for one in [path] if isinstance(path, str | Path) else path:
        config = merged(config, yaml.safe_load(Path(one).read_text()) or {})
    args = list(overrides)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise EstimateError(f"unexpected argument {flag!r} (overrides read --key=value)")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not args:
                raise EstimateError(f"{flag} has no value")
            value = args.pop(0)
        set_dotted(config, key, yaml.safe_load(value))
    return resolve_class_paths(config, discover())


def merged(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` over ``base``: nested mappings merged, other values (lists too) replaced."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value


def component_class(node: Mapping[str, Any] | None, what: str) -> tuple[type, dict[str, Any]]:
    """The class and ``init_args`` of a ``class_path`` node."""
    if not node or "class_path" not in node:
        raise EstimateError(f"the recipe has no {what}.class_path")
    module, _, name = node["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name), dict(node.get("init_args") or {})
