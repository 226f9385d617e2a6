"""How wrong answers go wrong: fallbacks to "normal", near misses, and the most frequent confusions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ecglm.metrics._grouped import check_pairs
from ecglm.metrics.normalize import (
    NORMAL_ANSWERS,
    answer_items,
    answer_text,
    is_normal_answer,
    normalize_answer,
)

# Tokens that do not make two wrong answers "related" in failure_modes(): function words, answer words
# (yes/no/none/not sure/normal/n/a), lead names and words generic to any ECG finding.
_FUNCTION_WORDS = "a an the and or of in on at to for with without by from is are was be there this that than"
_ANSWER_WORDS = "yes no none not sure normal n"
_LEAD_WORDS = "lead leads i ii iii avr avl avf v1 v2 v3 v4 v5 v6"
_GENERIC_WORDS = (
    "ecg ekg non specific change changes abnormal abnormality abnormalities possible probable "
    "borderline otherwise finding findings"
)
RELATED_STOP_TOKENS: frozenset[str] = frozenset(
    f"{_FUNCTION_WORDS} {_ANSWER_WORDS} {_LEAD_WORDS} {_GENERIC_WORDS}".split()
)


def _canonical(answer: str | Sequence[str]) -> str:
    items = answer_items(answer)
    return ", ".join(sorted(items)) if items else "none"


def _content_tokens(answer: str | Sequence[str]) -> set[str]:
    return set(normalize_answer(answer_text(answer)).split()) - RELATED_STOP_TOKENS


def failure_modes(
    preds: Sequence[str | Sequence[str]],
    target: Sequence[str | Sequence[str]],
    normal_answers: Sequence[str] = NORMAL_ANSWERS,
    top_k: int = 10,
) -> dict[str, Any]:
    """How the wrong answers (``answer_items`` differ) go wrong.

    - ``share_wrong_default_none``: wrong answers whose prediction is normal (:func:`is_normal_answer`:
      the empty set or only ``normal_answers``), i.e. the model fell back to "none"/"no".
    - ``share_wrong_related``: wrong answers sharing at least one clinical content token with the reference:
      ``normalize_answer`` tokens minus :data:`RELATED_STOP_TOKENS` (function words, yes/no/none/not
      sure/normal/n/a, lead names, words generic to any finding).
    - ``top_confusions``: ``[reference, prediction, count]``, most frequent first (items sorted, ``"none"``
      for the empty set).
    """
    check_pairs(preds, target)
    wrong = [(p, t) for p, t in zip(preds, target, strict=True) if answer_items(p) != answer_items(t)]
    default_none = sum(is_normal_answer(p, normal_answers) for p, _ in wrong)
    related = sum(bool(_content_tokens(p) & _content_tokens(t)) for p, t in wrong)
    confusions = Counter((_canonical(t), _canonical(p)) for p, t in wrong)
    top = sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {
        "num": len(preds),
        "num_wrong": len(wrong),
        "share_wrong_default_none": default_none / len(wrong) if wrong else 0.0,
        "share_wrong_related": related / len(wrong) if wrong else 0.0,
        "top_confusions": [[ref, pred, count] for (ref, pred), count in top],
    }
