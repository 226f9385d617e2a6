"""Answers per second of ``ecglm benchmark run`` against ``ecglm ask --image`` on the same model, the
same pictures and the same question, one process, model loading included in both.

Draws ``--n`` random 12-lead ECGs as printouts (PNG), writes them as an ECGBench ``mmmu-ecg`` subset,
and times both commands, each twice (the second timing printed, so neither pays the first imports),
``benchmark run`` with ``--label_scores false`` (multiple choice has no label scores). Without
``--model``, a tiny random image bundle (CNN encoder + 2-layer Llama) is built, so the figure is the
commands' overhead, not a real model's speed. Run:

    .venv/bin/python benchmarks/ecgbench_run.py [--n 64] [--batch-size 8] [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ecglm.commands import main as ecglm
from ecglm.render import render_ecg, save_png


def tiny_bundle(root: Path) -> tuple[str, list[str]]:
    """A tiny random image bundle and the flag that gives its LLM back (:func:`saved_image_bundle`)."""
    from ecglm.testing import saved_image_bundle

    bundle, llm = saved_image_bundle(root)
    return bundle, ["--override", f"backbone.model={llm}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, extra = (args.model, []) if args.model else tiny_bundle(root)
        (root / "data" / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        question = "Which rhythm does this ECG show? A. sinus B. AF C. flutter D. block"
        items = []
        for i in range(args.n):
            save_png(
                render_ecg(rng.standard_normal((12, 2500)).cumsum(1) * 0.02, 250, dpi=40),
                root / "data" / "images" / f"{i}.png",
            )
            turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "A"}]
            items.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
        (root / "data" / "mmmu-ecg.json").write_text(json.dumps(items))
        common = [
            "--model",
            model,
            "--batch_size",
            str(args.batch_size),
            "--max_new_tokens",
            str(args.max_new_tokens),
        ]
        common += ["--device", "cpu", *extra]
        pictures = [x for i in range(args.n) for x in ("--image", str(root / "data" / "images" / f"{i}.png"))]
        seconds = {}
        for attempt in range(2):  # the second of each, so that neither pays the first imports
            out = root / f"preds{attempt}"
            run = ["benchmark", "run", *common, "--data", str(root / "data"), "--out", str(out)]
            start = time.perf_counter()
            assert ecglm([*run, "--label_scores", "false"]) == 0
            seconds["benchmark run"] = time.perf_counter() - start
            asked = ["ask", *common, "--question", question, *pictures, "--out", str(out / "ask.jsonl")]
            start = time.perf_counter()
            assert ecglm(asked) == 0
            seconds["ecglm ask --image"] = time.perf_counter() - start
    for name, took in seconds.items():
        print(f"{name}: {args.n} answers in {took:.2f} s ({args.n / took:.1f}/s)")


if __name__ == "__main__":
    main()
