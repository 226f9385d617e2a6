"""A contact sheet of an image recipe's training pictures, exactly as its encoder reads them.

    python scripts/printout_sheet.py                                   # recipes/image-quickstart.yaml
    python scripts/printout_sheet.py --recipe R.yaml --records 4 --epochs 3 --out sheet.png  # or .jpg

Each row is one training ECG of the recipe's synthetic data: first the clean printout that
evaluation reads, then the distorted printouts of its first ``--epochs`` training epochs (the
seeds the loader uses, :func:`ecglm.render.augment_seed`), all at the encoder's ``image_size`` and
enlarged ``--zoom`` times without smoothing, so every model pixel shows. docs/image-ecg.md shows
the quickstart's sheet; look at one before trusting a change to the distortions (issue 28: they
once made the training pictures unlike the evaluation ones, and nothing but a training run showed it).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import yaml

from ecglm.render import ECGPrintout, PrintoutAugment

REPO = Path(__file__).resolve().parents[1]


def _builder(spec: dict):
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def sheet(recipe: Path, records: int, epochs: int, zoom: int) -> np.ndarray:
    config = yaml.safe_load(recipe.read_text())
    data = config["data"]["init_args"]
    drawing = dict(data["image"]["init_args"])
    augment = drawing.pop("augment", None)
    size = tuple(config["model"]["encoder"]["init_args"]["image_size"])
    builder = _builder(data["builder"])
    view = ECGPrintout(
        **drawing,
        size=size,
        augment=PrintoutAugment(**augment["init_args"]) if augment else None,
        fs=builder.sampling_rate,
    )
    gap = np.full((size[0], 4, 3), 255, dtype=np.uint8)
    rows = []
    for index in range(records):
        record = builder.make_record("train", index)
        # The key the stream gives the record's first QA pair (the seed of its distortions).
        item = {"key": f"{record['__key__']}_qa0", "ecg": record["ecg.npy"]}
        pictures = [view(item, 0, augment=False)[0]] + [view(item, e)[0] for e in range(epochs)]
        cells = [p.transpose(1, 2, 0) for p in pictures]
        rows.append(np.concatenate([c for cell in cells for c in (cell, gap)][:-1], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    image = np.concatenate(rows[:-1], axis=0)
    return image.repeat(zoom, axis=0).repeat(zoom, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "image-quickstart.yaml")
    parser.add_argument("--records", type=int, default=4, help="training ECGs, one per row")
    parser.add_argument("--epochs", type=int, default=3, help="distorted pictures per ECG, one per epoch")
    parser.add_argument("--zoom", type=int, default=1, help="each model pixel drawn as zoom x zoom")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "images" / "image-quickstart-training.jpg"
    )
    args = parser.parse_args()
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet(args.recipe, args.records, args.epochs, args.zoom)).save(args.out, quality=90)
    print(f"sheet: {args.out}")


if __name__ == "__main__":
    main()
