"""Verifiable rewards for reinforcement learning (GRPO): entry-point group ``ecglm.rewards``.

A reward scores generated answers, one float per answer, from what a training batch holds: the
question, the reference answer, the dataset and question type. The built-ins compare answers as
the metrics do (:mod:`ecglm.metrics.normalize`), so what RL optimises is what evaluation reports;
a plugin registers a :class:`Reward` subclass under ``ecglm.rewards`` in its ``pyproject.toml``.
A recipe lists several, each with its ``weight``; the objective sums them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ecglm.answers import answer_text
from ecglm.judges import Judge, JudgeItem
from ecglm.metrics.normalize import answer_items, normalize_answer


@dataclass(frozen=True)
class RewardItem:
    """One generated answer to score, with what the data says about its question."""

    question: str
    reference: str | list[str]
    completion: str
    dataset: str = "unknown"
    question_type: str = ""


class Reward(ABC):
    """Base class of every reward (a plugin implements :meth:`score`).

    Args:
        weight: Factor of this reward in the sum the objective optimises.
        name: Name in the logs (``train/reward/<name>``); the entry-point style name by default.
    """

    default_name = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        self.weight = float(weight)
        self.name = name or self.default_name

    @abstractmethod
    def score(self, items: Sequence[RewardItem]) -> list[float]:
        """One reward per item, in order."""

    def __call__(self, items: Sequence[RewardItem]) -> list[float]:
        scores = [float(s) for s in self.score(items)]
        if len(scores) != len(items):
            raise ValueError(f"reward {self.name} returned {len(scores)} scores for {len(items)} answers")
        return scores


class ExactMatchReward(Reward):
    """1 when the answer's normalised item set equals the reference's (the ``acc`` metric), else 0."""

    default_name = "exact_match"

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        return [float(answer_items(it.completion) == answer_items(it.reference)) for it in items]


class LabelF1Reward(Reward):
    """F1 of the answer's label set against the reference's (label-set questions: partial credit).

    Items are split as the metrics split them (``,`` and ``;``); two empty sets (``none``) score 1.
    """

    default_name = "label_f1"

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        return [label_f1(answer_items(it.completion), answer_items(it.reference)) for it in items]


def label_f1(predicted: frozenset[str], reference: frozenset[str]) -> float:
    if not predicted and not reference:
        return 1.0
    hits = len(predicted & reference)
    return 2 * hits / (len(predicted) + len(reference)) if hits else 0.0


#: "a, b or c" / "a or b": the choice list a question offers (ECG-QA's "choose" questions, the
#: quickstart's); the options are the whole-word phrases of the clause that holds it.
_CHOICE = re.compile(r"\bor\b")


def question_options(question: str) -> str | None:
    """The normalised clause of ``question`` that offers its options (after the last ``:`` if any),
    or ``None`` when the question offers none (no ``or``)."""
    clause = question.rsplit(":", 1)[-1] if ":" in question else question
    clause = normalize_answer(clause)
    return clause if _CHOICE.search(clause) else None


class FormatReward(Reward):
    """1 when the answer is one of the question's options, else 0: the answer format, not its truth.

    ``options`` (per question type, or one list for all) names the allowed answers; without it the
    options are read from the question: a short answer (at most ``max_words`` words, not ``or``)
    that occurs as whole words in the question's choice clause (``... regular or irregular?``).
    Label-set answers (several items) count when every item is an option.
    """

    default_name = "format"

    def __init__(
        self,
        options: dict[str, list[str]] | list[str] | None = None,
        max_words: int = 3,
        weight: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(weight, name)
        self.options = options
        self.max_words = max_words

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        return [float(self.parses(it)) for it in items]

    def parses(self, item: RewardItem) -> bool:
        answer = answer_items(item.completion)
        if not answer:
            return normalize_answer(item.completion) in {"none", "no"} and self._allowed(item, "none")
        return all(self._allowed(item, option) for option in answer)

    def _allowed(self, item: RewardItem, option: str) -> bool:
        listed = self.options.get(item.question_type) if isinstance(self.options, dict) else self.options
        if listed is not None:
            return option in {normalize_answer(o) for o in listed}
        clause = question_options(item.question)
        if clause is None or option == "or" or len(option.split()) > self.max_words:
            return False
        return re.search(rf"(?<!\w){re.escape(option)}(?!\w)", clause) is not None


class JudgeReward(Reward):
    """A judge's score in [0, 1] (any ``ecglm.judges`` component); 0 where its reply cannot be read.

    For free-text answers (reports) that no rule checks; slow: the judge runs on every answer.
    """

    default_name = "judge"

    def __init__(self, judge: Judge, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        self.judge = judge

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        verdicts = self.judge.judge(
            [JudgeItem(it.question, answer_text(it.reference), it.completion) for it in items]
        )
        return [v.score if v.score is not None else 0.0 for v in verdicts]
