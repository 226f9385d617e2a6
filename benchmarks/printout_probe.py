"""What an image encoder can read from the quickstart's printouts, without the LLM: a linear probe.

    python benchmarks/printout_probe.py                               # heart rate and rhythm at 128 x 256
    python benchmarks/printout_probe.py --sizes 128x256 256x512 --epochs 2 4

The image quickstart asks a frozen LLM about its CNN's 4 image tokens; when it fails to answer a
question from the pictures, is the picture too small to show the answer, or is the LLM path the
bottleneck? This trains the recipe's CNN (``recipes/image-quickstart.yaml``: its channels, its
distortions, its learning rate, its batch size) with a linear head on each label straight from the
distorted training printouts, for the same number of epochs, and prints the accuracy on the held-out
ECGs' clean printouts (as evaluation draws them) with a 95% bootstrap interval over ECGs, beside
the majority class (what a blank page can reach). Larger sizes are drawn at a proportionally
higher dpi (50 dpi for 128 px), so the traces keep their width in model pixels, and get one CNN
stage more per doubling (the frames keep their receptive field in seconds of paper).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import stats
from torch import nn

from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.encoders import CNNImageEncoder
from ecglm.render import ECGPrintout, PrintoutAugment

REPO = Path(__file__).resolve().parents[1]
LABELS = ("heart_rate_class", "rhythm")


def drawn(view: ECGPrintout, records: list[dict], epoch: int, augment: bool) -> torch.Tensor:
    pictures = [view({"key": f"{r['__key__']}_qa0", "ecg": r["ecg.npy"]}, epoch, augment) for r in records]
    return torch.from_numpy(np.concatenate(pictures))


def probe(recipe: dict, size: tuple[int, int], epochs: int, train: int, test: int, seed: int) -> dict:
    data = recipe["data"]["init_args"]
    drawing = dict(data["image"]["init_args"])
    bounds = drawing.pop("augment")["init_args"]
    builder = SyntheticHeartQA(**data["builder"]["init_args"])
    scale = size[0] / 128
    view = ECGPrintout(
        **{**drawing, "dpi": round(drawing["dpi"] * scale)},
        size=size,
        augment=PrintoutAugment(**bounds),
        fs=builder.sampling_rate,
    )
    channels = list(recipe["model"]["encoder"]["init_args"]["channels"])
    channels = [channels[0]] * round(math.log2(scale)) + channels  # one stage more per doubling
    train_records = [builder.make_record("train", i) for i in range(train)]
    test_records = [builder.make_record("test", i) for i in range(test)]
    started = time.perf_counter()
    epochs_pictures = [drawn(view, train_records, e, augment=True) for e in range(epochs)]
    clean = drawn(view, test_records, 0, augment=False)
    drawing_s = time.perf_counter() - started
    results = {}
    for label in LABELS:
        classes = sorted({r["json"]["labels"][label] for r in train_records})
        y = torch.tensor([classes.index(r["json"]["labels"][label]) for r in train_records])
        y_test = np.array([classes.index(r["json"]["labels"][label]) for r in test_records])
        torch.manual_seed(seed)
        encoder = CNNImageEncoder(size, channels)
        head = nn.Linear(encoder.output_dim, len(classes))
        parameters = [*encoder.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=recipe["model"]["learning_rate"], weight_decay=0.0)
        batch = data["batch_size"]
        started = time.perf_counter()
        for epoch, pictures in enumerate(epochs_pictures):
            order = torch.randperm(train, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for start in range(0, train, batch):
                rows = order[start : start + batch]
                loss = nn.functional.cross_entropy(head(encoder(pictures[rows]).mean(dim=1)), y[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        encoder.eval()
        with torch.no_grad():
            predicted = torch.cat([head(encoder(c).mean(dim=1)).argmax(-1) for c in clean.split(64)]).numpy()
        correct = (predicted == y_test).astype(float)
        interval = stats.bootstrap((correct,), np.mean, n_resamples=2000, random_state=0).confidence_interval
        majority = np.bincount(y.numpy()).argmax()
        results[label] = {
            "accuracy": correct.mean(),
            "low": interval.low,
            "high": interval.high,
            "majority": (y_test == majority).mean(),
            "train_s": time.perf_counter() - started,
        }
    return {"drawing_s": drawing_s, "labels": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "image-quickstart.yaml")
    parser.add_argument("--sizes", nargs="+", default=["128x256"], help="HEIGHTxWIDTH of the model's picture")
    parser.add_argument("--epochs", nargs="+", type=int, default=[2], help="training epochs (the recipe: 2)")
    parser.add_argument("--train", type=int, default=720, help="training ECGs (the recipe's num_train)")
    parser.add_argument("--test", type=int, default=96, help="held-out ECGs (the recipe's num_test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    print(f"linear probe of {args.recipe.name}'s CNN: {args.train} training ECGs, {args.test} held out")
    print("| size | epochs | label | accuracy [95%] | majority class | train s | drawing s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for size_text in args.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for epochs in args.epochs:
            out = probe(recipe, size, epochs, args.train, args.test, args.seed)
            for label, r in out["labels"].items():
                print(
                    f"| {size_text} | {epochs} | {label} | {100 * r['accuracy']:.1f} "
                    f"[{100 * r['low']:.1f}, {100 * r['high']:.1f}] | {100 * r['majority']:.1f} | "
                    f"{r['train_s']:.0f} | {out['drawing_s']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
