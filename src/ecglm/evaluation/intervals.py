"""Bootstrap intervals over records and paired gap tests, from the per-answer records of every seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ecglm import conditions as registry
from ecglm.evaluation.summary import distinct_answers
from ecglm.metrics.text import PER_ANSWER_METRICS, pair_scores
from ecglm.uncertainty import bootstrap_mean, paired_gap, record_of


def intervals(per_seed: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Exact-match accuracy with bootstrap intervals, and each gap ``ecg - control`` with its paired
    test, per dataset and per question type, from the per-answer records of every seed; the same for
    every metric with a score per answer (token F1, ROUGE-L: ``metrics``). BLEU-4 (a corpus
    statistic), METEOR and BERTScore have mean ± std over seeds only.

    The questions are the distinct ones answered in any seed (a question drawn in two seeds gets the
    same greedy answer and counts once), so the intervals are over the evaluated questions, not over
    seeds. Records (the ECG a question asks about) are resampled whole: questions about one ECG are
    not independent. The gap's p-value flips the sign of each record's summed difference.
    """
    answers = distinct_answers(per_seed)
    if not answers:
        return {}
    controls = registry.control_names()
    with_donors = {c for c in registry.names() if registry.get(c).needs_donors}
    ecg = {(d, key): r for (condition, d, key), r in answers.items() if condition == "ecg"}
    conditions = list(dict.fromkeys(condition for condition, _, _ in answers))
    groups = {"dataset": sorted({r["dataset"] for r in ecg.values()})}
    types = sorted({r["question_type"] for r in ecg.values()})
    if len(types) > 1:
        groups["question_type"] = types
    out: dict[str, Any] = {"confidence": confidence, "questions": len(ecg), "accuracy": {}, "gaps": {}}
    # Every per-answer score once per (condition, question); ``acc`` is the report's main table.
    ordered = list(answers)
    preds = [answers[k]["prediction"] for k in ordered]
    refs = [answers[k]["reference"] for k in ordered]
    per_answer = {m: dict(zip(ordered, pair_scores(m, preds, refs), strict=True)) for m in PER_ANSWER_METRICS}
    out["metrics"] = {m: {"values": {}, "gaps": {}} for m in PER_ANSWER_METRICS if m != "acc"}
    for kind, names in groups.items():
        for name in names:
            group = f"{kind}: {name}"
            keys = sorted(k for k, r in ecg.items() if r[kind] == name)
            records = [f"{d}/{record_of(k)}" for d, k in keys]  # record ids are per dataset
            for metric, scores in per_answer.items():
                values = {c: [scores[(c, *k)] for k in keys if (c, *k) in scores] for c in conditions}
                complete = [c for c in conditions if len(values[c]) == len(keys)]
                target = out if metric == "acc" else out["metrics"][metric]
                row = (out["accuracy"] if metric == "acc" else target["values"]).setdefault(group, {})
                for c in complete:
                    row[c] = bootstrap_mean(values[c], records, confidence).as_dict()
                for control in (c for c in controls if c in complete):
                    gap = paired_gap(values["ecg"], values[control], records, confidence)
                    target["gaps"].setdefault(f"ecg_minus_{control}", {})[group] = gap.as_dict()
    donors = [r.get("donor", "") for (c, _, _), r in answers.items() if c in with_donors]
    if donors:
        out["shuffled_kept_own_ecg"] = sum(d is None for d in donors)
    return out
