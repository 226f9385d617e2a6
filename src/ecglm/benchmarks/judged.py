"""ECGBench's report subset (``ptb-test-report``) scored by a judge of ``ecglm.judges``: each generated
report against the reference, with the judge's rubric (a file the user may replace). PULSE scored it
with GPT-4o and its own JSON rubric (``evaluation/prompts.py``); a score from another judge or rubric
is not comparable with the published "Report Score" (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ecglm.benchmarks.ecgbench import BenchmarkError, Item, prediction_id, prediction_text
from ecglm.judges import Judge, JudgeItem
from ecglm.uncertainty import bootstrap_mean

JUDGED = ("ptb-test-report",)


def judge_subset(
    name: str, items: Sequence[Item], rows: Sequence[dict[str, Any]], judge: Judge, confidence: float = 0.95
) -> dict[str, Any]:
    """``report_score``: the mean of the judge's scores (fractions of its scale) over the answered
    items whose verdict it could read, with a bootstrap interval; unreadable verdicts are counted."""
    if name not in JUDGED:
        raise BenchmarkError(f"{name} is not judged by ecglm yet; judged subsets: {', '.join(JUDGED)}")
    from ecglm.benchmarks.running import question_text

    gold = {item.id: item for item in items}
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        ident = str(prediction_id(row))
        if ident not in gold:
            raise BenchmarkError(f"{name}: prediction for {ident!r}, which the subset does not hold")
        latest[ident] = row
    ids = [item.id for item in items if item.id in latest]
    asked = [
        JudgeItem(question_text(gold[i].question), str(gold[i].gold), prediction_text(latest[i])) for i in ids
    ]
    verdicts = judge.judge(asked)
    read = [v.score for v in verdicts if v.score is not None]
    interval = bootstrap_mean(read, None, confidence).as_dict() if read else None
    return {
        "subset": name,
        "scoring": "judge",
        "judge": type(judge).__name__,
        "items": len(items),
        "answers": len(ids),
        "missing": len(items) - len(ids),
        "unreadable": len(verdicts) - len(read),
        "report_score": interval["estimate"] if interval else None,
        "report_score_interval": interval,
        "verdicts": [{"question_id": i, **v.as_dict()} for i, v in zip(ids, verdicts, strict=True)],
    }
