"""Summaries over seeds: mean ± std of every metric per condition and dataset, and each gap
``ecg - control`` for every control of the registry (:mod:`ecglm.conditions`) that was run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ecglm import conditions as registry


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value) over seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n_seeds": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n_seeds": len(values)}


def summarize(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every metric, per condition and dataset, plus the ablation gaps."""
    summary: dict[str, Any] = {"conditions": {}, "gaps": {}}
    conditions = per_seed[0]["conditions"]
    for c, entry in conditions.items():
        out: dict[str, Any] = {}
        for section in ("datasets", "abnormality", "question_types", "label_sets", "verify_auc"):
            out[section] = {}
            for name, values in entry.get(section, {}).items():
                out[section][name] = {
                    metric: mean_std(
                        [r["conditions"][c][section].get(name, {}).get(metric) for r in per_seed]
                    )
                    for metric, v in values.items()
                    if isinstance(v, float)
                }
        summary["conditions"][c] = out
    for ablation in registry.control_names():
        if ablation not in conditions:
            continue
        gaps: dict[str, Any] = {}
        for dataset, values in conditions["ecg"]["datasets"].items():
            gaps[dataset] = {
                metric: mean_std(
                    [
                        r["conditions"]["ecg"]["datasets"][dataset][metric]
                        - r["conditions"][ablation]["datasets"][dataset][metric]
                        for r in per_seed
                    ]
                )
                for metric in values
                if metric != "n" and metric in conditions[ablation]["datasets"].get(dataset, {})
            }
        summary["gaps"][f"ecg_minus_{ablation}"] = gaps
    return summary


def distinct_answers(per_seed: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Each answer record once, by ``(condition, dataset, key)``: a question drawn by several seeds gets
    the same greedy answer, so it counts once."""
    answers: dict[tuple[str, str, str], dict[str, Any]] = {}
    for result in per_seed:
        for r in result.get("records", []):
            answers.setdefault((r["condition"], r["dataset"], r["key"]), r)
    return answers
