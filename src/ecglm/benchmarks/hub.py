"""ECGBench from the Hugging Face hub (``PULSE-ECG/ECGBench``), written in the layout its authors
distribute and ``ecglm benchmark run`` / ``score`` read: ``<subset>.json`` (a JSON list of ``{id, image,
conversations}``) and the pictures under ``images/``, as the code in PULSE's README writes them.

Read with ``datasets.load_dataset(repo, name=<subset>, split="test")``: each row's ``id``,
``image_path``, ``image`` (decoded by ``datasets``) and ``conversations``. ``repo`` may also be a local
copy of the dataset repository (``huggingface-cli download PULSE-ECG/ECGBench --repo-type dataset
--local-dir DIR`` where the hub is reachable). Pictures already on disk are kept, so a fetch cut short
is resumed by running it again; every file is written beside its target and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from ecglm.benchmarks.ecgbench import SUBSETS, BenchmarkError
from ecglm.io import atomic_write_bytes, staged

#: The dataset's repository on the Hugging Face hub.
HUB_REPO = "PULSE-ECG/ECGBench"


def fetch_ecgbench(
    out: str | Path,
    subsets: Sequence[str] | None = None,
    repo: str = HUB_REPO,
    revision: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write ``subsets`` (default: all nine) of ``repo`` into ``out``; returns each subset's item count."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise BenchmarkError(
            "reading ECGBench from the hub needs the datasets package: pip install 'ecglm[hub]'"
        ) from None
    out = Path(out)
    counts = {}
    for name in subsets or list(SUBSETS):
        if name not in SUBSETS:
            raise BenchmarkError(f"unknown ECGBench subset {name!r}; subsets: {', '.join(SUBSETS)}")
        try:
            rows = load_dataset(repo, name=name, split="test", revision=revision)
        except (OSError, ValueError, ConnectionError) as err:  # no hub, no such repo or config
            raise BenchmarkError(
                f"{repo} ({name}): cannot load it with datasets ({type(err).__name__}: {err}); where no hub"
                " is reachable, download the repository elsewhere and give its folder as --repo"
            ) from None
        items = []
        for row in tqdm(rows, desc=name, unit="item", disable=not progress):
            items.append(_write_item(out, name, row))
        atomic_write_bytes(out / f"{name}.json", json.dumps(items, indent=1, ensure_ascii=False).encode())
        counts[name] = len(items)
        print(f"{name}: {len(items)} items in {out / f'{name}.json'}")
    return counts


def _write_item(out: Path, name: str, row: dict[str, Any]) -> dict[str, Any]:
    """The item's ``{id, image, conversations}``, its picture saved under ``out/images`` unless there."""
    missing = [key for key in ("id", "image_path", "image", "conversations") if key not in row]
    if missing:
        raise BenchmarkError(f"{name}: a row without {missing} (columns: {sorted(row)}); is this ECGBench?")
    relative = PurePosixPath(str(row["image_path"]))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        # A path from a downloaded dataset is input like any other: it never writes outside images/.
        raise BenchmarkError(f"{name}: item {row['id']!r} has image_path {str(relative)!r}, outside images/")
    path = out / "images" / relative
    if not path.is_file():
        image = row["image"]
        if not hasattr(image, "save"):
            kind = type(image).__name__
            raise BenchmarkError(f"{name}: item {row['id']!r}: its image is not a picture ({kind})")
        from PIL import Image

        image_format = Image.registered_extensions().get(path.suffix.lower())
        if image_format is None:
            raise BenchmarkError(f"{name}: item {row['id']!r}: image_path {str(relative)!r} names no picture")
        with staged(path) as tmp:
            image.save(tmp, format=image_format)
    return {"id": row["id"], "image": str(relative), "conversations": row["conversations"]}
