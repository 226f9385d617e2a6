"""Rendered-and-tokenised image QA pairs per second: what the image-ECG loader feeds a vision model.

Each pair's 10 s 12-lead ECG (250 Hz) is drawn as a printout (``ecglm.render.ECGPrintout``), optionally
distorted (``PrintoutAugment``, training batches), resized to the model's input, and its question and
answer tokenised with SmolLM2's real chat template (``QACollator``), in ``--workers`` loader processes
(the work a training loader does per pair; reading shards is measured by ``benchmarks/streaming.py``).
Prints pairs/s per setting. Run:

    .venv/bin/python benchmarks/image_loader.py [--pairs 1024] [--workers 2] [--dpi 50] [--size 224 448]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from torch.utils.data import DataLoader

from ecglm.data.collate import QACollator
from ecglm.prompts import ChatTemplate
from ecglm.render import ECGPrintout, PrintoutAugment
from ecglm.testing.tiny import smollm2_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dpi", type=int, default=50)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 448], metavar=("HEIGHT", "WIDTH"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    signals = [(rng.standard_normal((12, 2500)).cumsum(axis=1) * 0.05).astype(np.float16) for _ in range(64)]
    items = [
        {
            "key": f"rec{i}_qa0",
            "ecg": signals[i % len(signals)],
            "question": "What is the heart rate category of this ECG?",
            "answer": "normal",
            "question_type": "single-query",
            "dataset": "synthetic",
            "epoch": 0,
        }
        for i in range(args.pairs)
    ]
    prompt = ChatTemplate(system_prompt="You read ECGs.").bind(smollm2_tokenizer())
    for augment in (None, PrintoutAugment()):
        view = ECGPrintout(dpi=args.dpi, size=tuple(args.size), augment=augment, fs=250, mv_per_unit=0.25)
        collate = QACollator(prompt, 4, images=view)
        loader = DataLoader(items, batch_size=args.batch, num_workers=args.workers, collate_fn=collate)
        start = time.perf_counter()
        pairs = sum(len(batch.key) for batch in loader)
        rate = pairs / (time.perf_counter() - start)
        kind = "distorted" if augment else "clean"
        print(
            f"{pairs} {kind} printouts drawn at {args.dpi} dpi, resized to {args.size[0]} x {args.size[1]}, "
            f"tokenised: {rate:.0f} pairs/s with {args.workers} workers"
        )


if __name__ == "__main__":
    main()
