"""Seconds to score 10,000 ECGBench predictions (``ecglm benchmark score``'s work, files read aside),
per subset kind and scoring: ptb-test (multi-label), csn-test-no-cot (multiple choice), ecgqa-test.

Random gold answers and answers (a fifth unparsable), seeded. Under ``strict`` the multi-label time is
mostly its 1,000 bootstrap resamples. Run:

    .venv/bin/python benchmarks/ecgbench_scoring.py [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ecglm.benchmarks import Item, score_subset
from ecglm.benchmarks.parsing import ONLY_OPTIONS

PTB = ["NORM", "MI", "STTC", "CD", "HYP"]
OPTIONS = "Question: Which leads?\nOptions: v1, v2, lead i, none\n\n" + ONLY_OPTIONS


def fixtures(n: int) -> dict[str, tuple[list[Item], list[dict]]]:
    rng = np.random.default_rng(0)

    def labels() -> str:
        return "; ".join(label for label in PTB if rng.random() < 0.3) or "NORM"

    ptb = [Item(f"{i}", "x.png", "Which classes?", labels()) for i in range(n)]
    csn = [Item(f"{i}", "x.png", "Which?", f"{'ABCDEFGH'[rng.integers(8)]}) rhythm") for i in range(n)]
    ecgqa = [
        Item(f"{i}", "x.png", OPTIONS, [["v1"], ["v2"], ["lead i"], ["none"]][rng.integers(4)])
        for i in range(n)
    ]

    def answer(i: int, text: str) -> dict:
        return {"question_id": f"{i}", "prompt": OPTIONS, "text": text if rng.random() > 0.2 else "unclear"}

    return {
        "ptb-test": (ptb, [answer(i, labels()) for i in range(n)]),
        "csn-test-no-cot": (csn, [answer(i, f"Answer: {'ABCDEFGH'[rng.integers(8)]}") for i in range(n)]),
        "ecgqa-test": (ecgqa, [answer(i, ["v1", "v2", "lead i", "none"][rng.integers(4)]) for i in range(n)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    for name, (items, rows) in fixtures(args.n).items():
        for scoring in ("pulse", "strict"):
            start = time.perf_counter()
            score_subset(name, items, rows, scoring)
            seconds = time.perf_counter() - start
            print(
                f"{name:16s} {scoring:6s} {args.n} predictions: {seconds:6.2f} s ({args.n / seconds:,.0f}/s)"
            )


if __name__ == "__main__":
    main()
