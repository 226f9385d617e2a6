"""What ``ecglm benchmark run`` and ``ecglm benchmark score`` report for a bundle, end to end, on fixtures
written here: a dozen synthetic 12-lead ECGs (the quickstart's generator) as PTB-XL 1.0.3 (fold 10),
ECG-QA's test files about them and, for an image bundle, ECGBench's rule-scored subsets about their
printouts (:func:`ecglm.testing.benchmark_fixtures.write_example_benchmarks`).

The suites the bundle can read are answered with the shuffled and blank controls (a signal bundle:
``ptbxl`` and ``ecgqa``; an image bundle: ``ecgbench`` too), scored under ``--scoring pulse`` and
``strict`` (ECG-QA: strict only, exact match as its paper scores it), and one markdown table printed:
per subset the metric under both scorings, strict's 95% interval, the controls and the model's gap
over each with its interval, and the unparsable answers. The fixtures are tiny and synthetic: the
figures show the harness working, not how good a model is. Run:

    .venv/bin/python benchmarks/benchmark_example.py --model BUNDLE [--out DIR] [--records 12]
        [--override backbone.model=LLM]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ecglm.commands import main as ecglm
from ecglm.testing.benchmark_fixtures import write_example_benchmarks

CONTROLS = ("shuffled", "blank")
COLUMNS = (
    "suite / subset", "n", "metric", "pulse", "strict [95% CI]", "shuffled", "blank",
    "model - shuffled [95% CI]", "model - blank [95% CI]", "unparsable",
)  # fmt: skip


def pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}"


def interval(estimate: Any, low: Any, high: Any, signed: bool = False) -> str:
    if estimate is None:
        return "—"
    head = f"{100 * float(estimate):+.1f}" if signed else pct(estimate)
    return head if low is None or high is None else f"{head} [{pct(low)}, {pct(high)}]"


def gap(found: dict | None) -> str:
    return "—" if not found else interval(found["estimate"], found["low"], found["high"], signed=True)


def rows(label: str, pulse: dict | None, strict: dict) -> list[list[str]]:
    """The table's rows of one subset: its metrics under both scorings, the controls and the gaps."""
    pulse = pulse or {}
    controls, gaps = strict.get("controls", {}), strict.get("gaps", {})
    unparsable = strict.get("unparsable", strict.get("empty_answers", ""))
    if "f1" in strict:  # multi-label: the gaps are over each item's share of labels decided right
        spread = strict.get("intervals", {})

        def bounds(key: str) -> tuple[Any, Any]:
            found = spread.get(key, {})
            return found.get("low"), found.get("high")

        low, high = bounds("hamming_loss")
        kept = [
            "labels right per item (1 - Hamming)",
            pct(None if "hamming_loss" not in pulse else 1 - pulse["hamming_loss"]),
            interval(
                1 - strict["hamming_loss"],
                None if high is None else 1 - high,
                None if low is None else 1 - low,
            ),
            *(pct(1 - controls[c]["hamming_loss"]) if c in controls else "—" for c in CONTROLS),
            *(gap(gaps.get(f"model_minus_{c}")) for c in CONTROLS),
        ]
        f1 = ["macro F1", pct(pulse.get("f1")), interval(strict["f1"], *bounds("f1"))]
        f1 += [pct(controls.get(c, {}).get("f1")) for c in CONTROLS] + ["", ""]
        auc = ["AUROC (pulse: of 0/1 answers; strict: of label scores)", pct(pulse.get("auc"))]
        auc += [interval(strict["auc"], *bounds("auc")), "—", "—", "", ""]
        return [
            [label, str(strict["items"]), *f1, str(unparsable)],
            [label, "", *auc, ""],
            [label, "", *kept, ""],
        ]
    overall = strict["accuracy_interval"]
    name = "exact match" if "question_types" in strict else "accuracy"
    first = [label, str(strict["items"]), name, pct(pulse.get("accuracy"))]
    first += [interval(overall["estimate"], overall["low"], overall["high"])]
    first += [pct(controls[c]["accuracy"]) if c in controls else "—" for c in CONTROLS]
    per_type = "question_types" in strict  # ECG-QA: gaps per question type, "all" the whole subset
    first += [gap(gaps.get(f"model_minus_{c}", {}).get("all") if per_type else gaps.get(f"model_minus_{c}"))
              for c in CONTROLS]  # fmt: skip
    out = [[*first, str(unparsable)]]
    for kind, found in strict.get("question_types", {}).items():
        row = [
            f"{label}: {kind}",
            str(found["n"]),
            name,
            "—",
            interval(found["estimate"], found["low"], found["high"]),
        ]
        row += [pct(controls[c]["question_types"][kind]) if c in controls else "—" for c in CONTROLS]
        row += [gap(gaps.get(f"model_minus_{c}", {}).get(kind)) for c in CONTROLS]
        out.append([*row, ""])
    return out


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def is_image_bundle(model: str, override: list[str]) -> bool:
    from ecglm.bundle import check_bundle, parse_overrides

    return bool(check_bundle(model, overrides=parse_overrides(override)).get("image"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bundle folder (ecglm export)")
    parser.add_argument("--out", help="where the fixtures, answers and scores go (default: a temp dir)")
    parser.add_argument("--records", type=int, default=12, help="synthetic ECGs in the fixtures")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda (default: CUDA when available)")
    parser.add_argument("--override", action="append", default=[], help="PART.KEY=VALUE, as ecglm's")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ecglm-benchmark-example-") as tmp:
        root = Path(args.out or tmp)
        image = is_image_bundle(args.model, args.override)
        fixtures = write_example_benchmarks(root / "data", args.records, ecgbench=image)
        suites = {
            "ptbxl": ["--suite", "ptbxl", "--data", str(fixtures.ptbxl)],
            "ecgqa": ["--suite", "ecgqa", "--data", str(fixtures.ecgqa), "--signals", str(fixtures.ptbxl)],
        }
        if image:
            suites["ecgbench"] = ["--suite", "ecgbench", "--data", str(fixtures.ecgbench)]
        model = ["--model", args.model, *(x for o in args.override for x in ("--override", o))]
        model += ["--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size)]
        model += ["--device", args.device] if args.device else []
        table = []
        for suite, data in suites.items():
            answers = root / "answers" / suite
            controls = [x for c in CONTROLS for x in ("--controls", c)]
            assert ecglm(["benchmark", "run", *data, *model, "--out", str(answers), *controls]) == 0
            scores = {}
            for scoring in ("pulse", "strict"):
                if suite == "ecgqa" and scoring == "pulse":
                    continue  # exact match of the answer set only, as ECG-QA's paper scores it
                out = root / "scores" / f"{suite}.{scoring}.json"
                score = ["benchmark", "score", *data, "--predictions", str(answers), "--scoring", scoring]
                assert ecglm([*score, "--out", str(out)]) == 0
                scores[scoring] = json.loads(out.read_text())["subsets"]
            for name, strict in scores["strict"].items():
                label = f"ecgbench {name}" if suite == "ecgbench" else name
                table += rows(label, scores.get("pulse", {}).get(name), strict)
        took = time.perf_counter() - start
        kind = "image" if image else "signal"
        print(f"\n{args.model} ({kind} bundle), {args.records} synthetic records, {took:.0f} s in all")
        print(f"fixtures, answers and scores in {root}" + ("" if args.out else " (deleted)") + "\n")
        print(markdown(table))
        print(
            "\nPercentages. pulse: as PULSE's script scores it; strict: unparsable answers wrong, AUROC"
            " from label scores, bootstrap intervals over items; the controls answer with another record"
            " (shuffled) or none (blank); multi-label gaps are over each item's share of labels decided"
            " right. unparsable: strict's answers that name no label or option (ECG-QA: empty answers)."
        )


if __name__ == "__main__":
    main()
