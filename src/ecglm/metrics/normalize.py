"""Answers as the metrics compare them: normalised text, sets of items, and what counts as "normal"."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ecglm.answers import answer_text  # noqa: F401  (re-exported: metrics read answers as text)

NORMAL_ANSWERS: tuple[str, ...] = ("none", "no", "normal", "n/a")


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation (and ``_``) into spaces, collapse whitespace."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def answer_items(answer: str | Sequence[str]) -> frozenset[str]:
    """The answer as a set of normalised items; ``"none"``, ``""`` and ``["none"]`` are the empty set.

    A string is split on ``,`` and ``;``; list items (ECG-QA's answers) are kept whole.
    """
    parts = re.split(r"[,;]", answer) if isinstance(answer, str) else answer
    items = frozenset(item for item in map(normalize_answer, parts) if item)
    return frozenset() if items == {"none"} else items


def is_normal_answer(answer: str | Sequence[str], normal_answers: Sequence[str] = NORMAL_ANSWERS) -> bool:
    """True when the answer is the empty set or every item is one of ``normal_answers``."""
    return answer_items(answer) <= {normalize_answer(a) for a in normal_answers}
