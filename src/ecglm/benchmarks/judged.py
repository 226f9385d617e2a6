"""ECGBench's judged subsets, scored by a judge of ``ecglm.judges``: ``ptb-test-report`` (each generated
report against the reference, with the judge's rubric) and ``arena`` (each conversation's answers
against the gold ones, with :data:`ARENA_RUBRIC` or a rubric file the user gives). PULSE scored both
with GPT-4o and its own rubrics (``evaluation/prompts.py``); a score from another judge or rubric is
not comparable with the published "Report Score" and "Arena Score" (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from ecglm.benchmarks.ecgbench import BenchmarkError, Conversation, Item, prediction_id, prediction_text
from ecglm.judges import Judge, JudgeItem, Verdict
from ecglm.uncertainty import bootstrap_mean, paired_gap

JUDGED = ("ptb-test-report", "arena")

#: The highest score of each arena category (PULSE's rubric scores each from 0 to 10).
ARENA_SCALE = 10
#: The turns of each conversation that PULSE's ``eval_arena.py`` shows its judge (``--scoring pulse``);
#: ``strict`` shows every turn.
PULSE_ARENA_TURNS = 2

#: The arena rubric: the three categories of PULSE's ``eval_arena.py`` (accuracy, completeness,
#: instruction adherence), each scored from 0 to 10, asked for as one JSON object. Replace it with
#: ``ecglm benchmark score --arena_rubric FILE``; a reply is read by :func:`arena_categories`.
ARENA_RUBRIC = """\
You grade how well a model answered a conversation of questions about one ECG, against the ground-truth \
answers to the same questions. Grade the model's answers as a whole on three categories, each an integer \
from 0 to 10. Be precise and objective, especially about errors in medical terminology, and do not let \
the length of an answer sway you.

Accuracy: does the model's interpretation and diagnosis agree with the ground truth (waveforms, \
intervals, rhythm, clinical diagnoses)? 10: fully accurate. 5: partly accurate, with notable errors or \
omissions. 0: largely wrong or misleading.

Completeness: does the model cover the essential points of the ground truth (rhythm, axis, waveforms, \
clinical causes)? 10: covers every key point. 5: important points missing. 0: lacks critical information.

Instruction Adherence: does the model do what each question asks (list features, suggest a diagnosis), \
whether or not its content is right? 10: follows every instruction. 5: partly, with deviations. 0: ignores \
the instructions or answers something else.

Reply with a JSON object only, with the keys "Accuracy", "Completeness" and "Instruction Adherence"; the \
value of each is an object with the keys "Score" (the integer) and "Explanation" (one sentence)."""


def _latest(name: str, ids: set[str], rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each item's last prediction; a prediction for an item the subset lacks is refused."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        ident = str(prediction_id(row))
        if ident not in ids:
            raise BenchmarkError(f"{name}: prediction for {ident!r}, which the subset does not hold")
        latest[ident] = row
    return latest


def judge_subset(
    name: str,
    items: Sequence[Item],
    rows: Sequence[dict[str, Any]],
    judge: Judge,
    confidence: float = 0.95,
    controls: dict[str, Sequence[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``report_score``: the mean of the judge's scores (fractions of its scale) over the answered
    items whose verdict it could read, with a bootstrap interval; unreadable verdicts are counted.
    ``controls`` (condition -> rows: the reports written from another item's image or a blank page)
    are judged alike, with the paired gap against each (:func:`with_controls`)."""
    if name != "ptb-test-report":
        raise BenchmarkError(f"{name} is not judged as a report; judged subsets: {', '.join(JUDGED)}")
    from ecglm.benchmarks.running import question_text

    gold = {item.id: item for item in items}

    def judged(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[Verdict], dict[str, float]]:
        latest = _latest(name, set(gold), rows)
        ids = [item.id for item in items if item.id in latest]
        asked = [
            JudgeItem(question_text(gold[i].question), str(gold[i].gold), prediction_text(latest[i]))
            for i in ids
        ]
        verdicts = judge.judge(asked)
        return ids, verdicts, {i: v.score for i, v in zip(ids, verdicts, strict=True) if v.score is not None}

    ids, verdicts, scores = judged(rows)
    out = {
        "subset": name,
        "scoring": "judge",
        "judge": type(judge).__name__,
        "items": len(items),
        "answers": len(ids),
        "missing": len(items) - len(ids),
        **_judged_score("report_score", ids, verdicts, scores, confidence),
        "verdicts": [{"question_id": i, **v.as_dict()} for i, v in zip(ids, verdicts, strict=True)],
    }
    return with_controls(out, "report_score", scores, controls, judged, confidence)


def _judged_score(
    key: str, ids: Sequence[str], verdicts: Sequence[Verdict], scores: dict[str, float], confidence: float
) -> dict[str, Any]:
    """``key`` (the mean of the read scores) with its bootstrap interval, and the unreadable count."""
    interval = bootstrap_mean(list(scores.values()), None, confidence).as_dict() if scores else None
    return {
        "unreadable": len(verdicts) - len(scores),
        key: interval["estimate"] if interval else None,
        f"{key}_interval": interval,
    }


def with_controls(
    out: dict[str, Any],
    key: str,
    scores: dict[str, float],
    controls: dict[str, Sequence[dict[str, Any]]] | None,
    judged: Callable[[Sequence[dict[str, Any]]], tuple[list[str], list[Verdict], dict[str, float]]],
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``out`` with each control judged as the model's answers were (``judged(rows)`` -> ids, verdicts,
    per-item scores): under ``controls`` its ``key`` with interval and its verdicts, under ``gaps``
    ``model_minus_<control>``, the paired gap of the per-item scores on the items both were scored on
    (bootstrap interval, sign-flip p-value, ``n``). What the judge gives an answer written without the
    ECG is the floor a report score should be read against: a judge rewards fluent, plausible text."""
    for condition, rows in (controls or {}).items():
        ids, verdicts, control = judged(rows)
        out.setdefault("controls", {})[condition] = {
            "answers": len(ids),
            **_judged_score(key, ids, verdicts, control, confidence),
            "verdicts": [{"question_id": i, **v.as_dict()} for i, v in zip(ids, verdicts, strict=True)],
        }
        both = [i for i in scores if i in control]
        if both:
            gap = paired_gap([scores[i] for i in both], [control[i] for i in both], None, confidence)
            out.setdefault("gaps", {})[f"model_minus_{condition}"] = gap.as_dict()
    return out


def read_arena_rubric(path: str | Path | None = None) -> str:
    """The text of the arena rubric file ``path`` (default: :data:`ARENA_RUBRIC`)."""
    if path is None:
        return ARENA_RUBRIC
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise BenchmarkError(f"--arena_rubric {path}: cannot read it ({err.strerror or err})") from None


def arena_categories(reply: str) -> dict[str, float]:
    """The category scores of a judge's reply, as fractions of :data:`ARENA_SCALE`: the first JSON
    object in the reply, each key whose value is a number or an object with a ``Score`` (any case),
    named in lower case with ``_`` for spaces (``instruction_adherence``). A score that is not a
    number from 0 to 10 is left out; a reply without any gives ``{}``."""
    start = reply.find("{")
    try:
        found = json.JSONDecoder().raw_decode(reply[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        return {}
    scores = {}
    for key, value in found.items():
        if isinstance(value, dict):
            value = next((v for k, v in value.items() if str(k).lower() == "score"), None)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= ARENA_SCALE:
            scores[str(key).strip().lower().replace(" ", "_")] = value / ARENA_SCALE
    return scores


def _answers(name: str, row: dict[str, Any]) -> list[str]:
    """The model's answer to each turn: PULSE's ``predict_convs`` (``[{question, answer}]``) or its
    baseline scripts' ``response`` (``[{response}]``)."""
    if isinstance(row.get("predict_convs"), list):
        return [str(turn.get("answer", "")) for turn in row["predict_convs"]]
    if isinstance(row.get("response"), list):
        return [str(turn.get("response", "")) for turn in row["response"]]
    raise BenchmarkError(
        f"{name}: the prediction for {prediction_id(row)!r} has no 'predict_convs' list of "
        "{question, answer} turns (as ecglm benchmark run and PULSE's model_ecg_arena.py write it)"
    )


def _transcript(questions: Sequence[str], answers: Sequence[str], label: str) -> str:
    return "\n\n".join(
        f"Question {i}: {q}\n{label}: {a}" for i, (q, a) in enumerate(zip(questions, answers, strict=True), 1)
    )


def arena_item(conversation: Conversation, answers: Sequence[str], turns: int | None = None) -> JudgeItem:
    """What the judge is shown of one conversation: its first ``turns`` questions (all by default),
    the gold answers as the reference and the model's as the prediction (a turn it did not answer as
    an empty answer)."""
    from ecglm.benchmarks.running import question_text

    shown = conversation.turns[:turns]
    questions = [question_text(t["question"]) for t in shown]
    given = [*answers[: len(shown)], *[""] * (len(shown) - len(answers))]
    return JudgeItem(
        f"A conversation of {len(shown)} turn(s) about one ECG image; each transcript repeats its questions.",
        _transcript(questions, [t["answer"] for t in shown], "Ground-truth answer"),
        _transcript(questions, given, "Model's response"),
    )


def _scored(verdict: Verdict) -> dict[str, float]:
    # A replaced rubric may ask for one "Score: N" instead of categories: the judge reads that itself.
    categories = arena_categories(verdict.reply)
    return categories or ({} if verdict.score is None else {"score": verdict.score})


def judge_conversations(
    name: str,
    conversations: Sequence[Conversation],
    rows: Sequence[dict[str, Any]],
    judge: Judge,
    scoring: str = "pulse",
    confidence: float = 0.95,
    controls: dict[str, Sequence[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``arena_score``: the mean over conversations of the mean of their category scores (fractions of
    :data:`ARENA_SCALE`), as PULSE's ``eval_arena.py`` averages every category score of every
    conversation, with a bootstrap interval over conversations; per category its mean under
    ``categories``. Under ``pulse`` the judge sees the first :data:`PULSE_ARENA_TURNS` turns, as
    PULSE's script shows it; under ``strict`` every turn. Replies without a score are counted
    (``unreadable``), never scored as zero. ``controls`` (the conversations answered with another
    conversation's image or a blank page) are judged alike, with paired gaps (:func:`with_controls`)."""
    gold = {c.id: c for c in conversations}
    turns = PULSE_ARENA_TURNS if scoring == "pulse" else None

    def judged(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[Verdict], dict[str, float]]:
        latest = _latest(name, set(gold), rows)
        ids = [c.id for c in conversations if c.id in latest]
        verdicts = judge.judge([arena_item(gold[i], _answers(name, latest[i]), turns) for i in ids])
        scored = {i: _scored(v) for i, v in zip(ids, verdicts, strict=True)}
        return ids, verdicts, {i: mean(s.values()) for i, s in scored.items() if s}

    ids, verdicts, scores = judged(rows)
    scored = [_scored(v) for v in verdicts]
    names = sorted({category for s in scored for category in s})
    out = {
        "subset": name,
        "scoring": "judge",
        "judge": type(judge).__name__,
        "turns_judged": "all" if turns is None else turns,
        "items": len(conversations),
        "answers": len(ids),
        "missing": len(conversations) - len(ids),
        **_judged_score("arena_score", ids, verdicts, scores, confidence),
        "categories": {c: mean(s[c] for s in scored if c in s) for c in names},
        "category_counts": {c: sum(c in s for s in scored) for c in names},
        "verdicts": [
            {"question_id": i, "categories": s, **v.as_dict()}
            for i, s, v in zip(ids, scored, verdicts, strict=True)
        ],
    }
    return with_controls(out, "arena_score", scores, controls, judged, confidence)
