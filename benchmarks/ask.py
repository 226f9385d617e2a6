"""Answers per second on a folder of ECG records: batched against one by one, same model, one run.

Writes ``--records`` random 12-lead .npy records (10.4 s at 250 Hz) into a temporary folder and runs
``ecglm.inference.ask`` over them twice with one question each, ``--batch-size`` answers per
generation batch and then 1, interleaved per half so both see the same machine state. Run with a
bundle, e.g. the quickstart's:

    .venv/bin/ecglm export --config recipes/quickstart.yaml --ckpt_path last --out quickstart-bundle
    .venv/bin/python benchmarks/ask.py --model quickstart-bundle [--records 32] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ecglm import ECGLM
from ecglm.inference import ask
from ecglm.model import Decoding

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ECGLM.from_pretrained(args.model)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    question = ["What is the heart rate category of this ECG?"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.records):
            path = Path(tmp) / f"r{i:04d}.npy"
            np.save(path, rng.standard_normal((12, 2600)))
            paths.append(path)
        ask(model, paths[:2], question, fs=250, leads=LEADS, decoding=decoding, batch_size=2)  # warm-up
        times = {args.batch_size: 0.0, 1: 0.0}
        answers = {args.batch_size: [], 1: []}
        half = len(paths) // 2
        for part in (paths[:half], paths[half:]):
            for size in times:
                start = time.perf_counter()
                rows, _ = ask(model, part, question, fs=250, leads=LEADS, decoding=decoding, batch_size=size)
                times[size] += time.perf_counter() - start
                answers[size] += [r["answer"] for r in rows]
    rates = {size: len(paths) / seconds for size, seconds in times.items()}
    same = answers[args.batch_size] == answers[1]
    print(
        f"{len(paths)} records x 1 question, {args.max_new_tokens} new tokens, {args.threads} threads: "
        f"batch {args.batch_size}: {rates[args.batch_size]:.2f} answers/s, batch 1: {rates[1]:.2f} answers/s "
        f"(ratio {rates[args.batch_size] / rates[1]:.2f}); same answers: {same}"
    )


if __name__ == "__main__":
    main()
