"""``ecglm benchmark run`` / ``ecglm benchmark score``: the field's benchmarks (ECGBench) answered by a
bundle and scored as the published tables were (``--scoring pulse``) or as they should be (``strict``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ecglm.errors import EcglmError


class BenchmarkUsageError(EcglmError, ValueError):
    """Options of ``ecglm benchmark`` that do not fit together."""


CONTROLS = ("shuffled", "blank")


def _subsets(subsets: list[str] | None) -> list[str]:
    from ecglm.benchmarks.ecgbench import SCORED, subset

    names = subsets or list(SCORED)
    for name in names:
        subset(name)
    return names


def score(
    data: str,
    predictions: str,
    suite: Literal["ecgbench"] = "ecgbench",
    scoring: Literal["pulse", "strict"] = "pulse",
    subsets: list[str] | None = None,
    out: str | None = None,
) -> int:
    """Score ECGBench predictions (JSON lines in PULSE's layout, from any tool) against the gold answers.

    Args:
        data: The ECGBench folder: ``<subset>.json`` per subset (and ``images/``).
        predictions: A folder with ``<subset>.jsonl`` (or PULSE's ``<subset>/step-final.jsonl``) per
            subset, or one ``.jsonl`` file (give one subset with --subsets).
        suite: The benchmark (``ecgbench``).
        scoring: ``pulse``: as PULSE's evaluate_ecgbench.py scores it (comparable with the published
            tables); ``strict``: unparsable answers wrong, whole-token labels, AUROC from label scores,
            intervals and gaps against the controls (docs/benchmarks.md).
        subsets: The subsets to score (default: every rule-scored one that has predictions).
        out: scores.json to write (default: printed only).
    """
    from ecglm.benchmarks.ecgbench import predictions_file, read_predictions, read_subset
    from ecglm.benchmarks.scoring import score_ecgbench

    if Path(predictions).is_file() and (not subsets or len(subsets) != 1):
        raise BenchmarkUsageError(
            f"--predictions {predictions} is one file: name its subset (--subsets NAME)"
        )
    found, controls = {}, {}
    for name in _subsets(subsets):
        path = predictions_file(predictions, name)
        if path is None:
            if subsets:
                raise BenchmarkUsageError(f"{predictions}: no predictions for {name} ({name}.jsonl)")
            continue
        found[name] = read_predictions(path)
        for control in CONTROLS:
            control_path = path.with_name(f"{path.stem}.{control}.jsonl")
            if control_path.is_file():
                controls.setdefault(name, {})[control] = read_predictions(control_path)
    if not found:
        raise BenchmarkUsageError(f"{predictions}: no <subset>.jsonl predictions file of ECGBench")
    items = {name: read_subset(data, name) for name in found}
    scores = score_ecgbench(items, found, scoring, controls)
    print(summary_table(scores))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"suite": suite, "scoring": scoring, "subsets": scores}, indent=2))
        print(f"scores written to {out}")
    return 0


def summary_table(scores: dict[str, dict]) -> str:
    """The scores as a markdown table: one row per subset, metrics as percentages."""
    lines = [
        "| subset | scoring | answers | unparsable | accuracy | F1 | AUC | Hamming loss |",
        "|" + "---|" * 8,
    ]

    def cell(value: object) -> str:
        return "" if value is None else f"{100 * float(value):.1f}"

    for name, row in scores.items():
        metrics = [cell(row.get(k)) for k in ("accuracy", "f1", "auc", "hamming_loss")]
        lines.append(
            f"| {name} | {row['scoring']} | {row['answers']} | {row.get('unparsable', '')} | "
            + " | ".join(metrics)
            + " |"
        )
    return "\n".join(lines)


def benchmark(args: list[str]) -> int:
    """``ecglm benchmark (run | score) ARGS``."""
    from ecglm.commands.arguments import call

    actions = {"score": score}
    if not args or args[0] not in actions:
        print("usage: ecglm benchmark {" + " | ".join(actions) + "} --help")
        return 0 if args and args[0] in ("-h", "--help") else 2
    return call(actions[args[0]], args[1:], prog=f"ecglm benchmark {args[0]}")
