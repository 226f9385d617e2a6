"""A judge's scores of the generated answers: building the protocol's judge and summarising its verdicts."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from ecglm import conditions as registry
from ecglm.evaluation.summary import distinct_answers
from ecglm.judges import Judge, JudgeItem
from ecglm.metrics import answer_text
from ecglm.uncertainty import bootstrap_mean, paired_gap, record_of


def build_judge(spec: Judge | dict[str, Any] | None) -> Judge | None:
    """The protocol's judge from its recipe node (``class_path`` + ``init_args``), or as given."""
    if spec is None or isinstance(spec, Judge):
        return spec
    spec = dict(spec)
    module, _, name = str(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise TypeError(f"evaluate.judge.class_path {spec['class_path']} is not an ecglm.judges.Judge")
    return cls(**dict(spec.get("init_args") or {}))


def judge_answers(judge: Judge, per_seed: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict]]:
    """Judge each distinct answer of the judge's datasets and conditions once; per dataset and condition,
    the mean score with a bootstrap interval over records, and parse failures (never scored 0); the
    gap ``ecg - control`` of each control judged, paired on the questions both have a score for."""
    answers = {
        k: r for k, r in distinct_answers(per_seed).items() if judge.wants(r["dataset"], r["condition"])
    }
    keys = sorted(answers)
    items = [
        JudgeItem(r.get("question", ""), answer_text(r["reference"]), r["prediction"])
        for r in (answers[k] for k in keys)
    ]
    verdicts = judge.judge(items) if items else []
    if len(verdicts) != len(items):
        raise RuntimeError(f"{type(judge).__name__} gave {len(verdicts)} verdicts for {len(items)} answers")
    scored = {k: v for k, v in zip(keys, verdicts, strict=True)}
    controls = registry.control_names()
    summary: dict[str, Any] = {
        "judge": type(judge).__name__,
        "model": getattr(judge, "model_name", None),
        "scores": {},
        "gaps": {},
    }
    for condition, dataset in sorted({(c, d) for c, d, _ in keys}):
        ours = [(k, v) for k, v in scored.items() if k[:2] == (condition, dataset)]
        valid = [(k, v) for k, v in ours if v.score is not None]
        entry: dict[str, Any] = {}
        if valid:
            records = [f"{dataset}/{record_of(k[2])}" for k, _ in valid]
            entry = bootstrap_mean([v.score for _, v in valid], records).as_dict()  # n: scored answers
        entry.update(answers=len(ours), parse_failures=len(ours) - len(valid))
        summary["scores"].setdefault(dataset, {})[condition] = entry
        if condition in controls:
            pairs = [
                (scored[("ecg", dataset, k[2])].score, v.score, f"{dataset}/{record_of(k[2])}")
                for k, v in valid
                if ("ecg", dataset, k[2]) in scored and scored[("ecg", dataset, k[2])].score is not None
            ]
            if pairs:
                a, b, records = zip(*pairs, strict=True)
                gap = paired_gap(a, b, records).as_dict()
                summary["gaps"].setdefault(f"ecg_minus_{condition}", {})[dataset] = gap
    rows = [{"condition": c, "dataset": d, "key": k, **scored[(c, d, k)].as_dict()} for c, d, k in keys]
    return summary, rows
