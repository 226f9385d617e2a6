"""Which model answered a benchmark: ``run.json`` beside the predictions (``{"model": {name,
zero_shot, recipe, ...}}``), written by ``ecglm benchmark run`` and read by ``ecglm benchmark score``
into the report, so a number never loses the model it belongs to (a bundle, or a recipe's untrained
model answering zero-shot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecglm.benchmarks.ecgbench import BenchmarkError
from ecglm.io import atomic_write_bytes

RUN_FILE = "run.json"
#: What makes two runs the same model: answers of another model are never appended to a run's files.
IDENTITY = ("name", "zero_shot", "recipe")


def write_run_record(out: str | Path, model: dict[str, Any]) -> Path:
    """``out/run.json`` recording ``model``; a folder holding another model's answers is refused."""
    path = Path(out) / RUN_FILE
    if path.is_file():
        before = read_run_record(path.parent) or {}
        if any(before.get(k) != model.get(k) for k in IDENTITY):
            raise BenchmarkError(
                f"{out} holds the answers of another model ({path}: {before.get('name')}"
                f"{', zero-shot' if before.get('zero_shot') else ''}): give a new --out folder"
            )
    return atomic_write_bytes(path, json.dumps({"model": model}, indent=2).encode())


def read_run_record(predictions: str | Path) -> dict[str, Any] | None:
    """The model recorded beside ``predictions`` (a folder, or a file in one), or ``None``."""
    folder = Path(predictions)
    path = (folder if folder.is_dir() else folder.parent) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BenchmarkError(
            f"{path} is not the run.json of ecglm benchmark run ({err}): remove it to score without it"
        ) from None
