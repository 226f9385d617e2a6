"""Answers read as ECGBench's scorers read them: option letters, label sets, ECG-QA candidate sets.

``pulse_*`` functions follow PULSE's ``evaluation/evaluate_ecgbench.py`` (substrings, its letter
extractor); ``strict_*`` functions read only what the answer states (whole tokens, an explicit letter)
and return ``None`` when nothing can be read, so the scorer counts it as wrong and reports it.
docs/benchmarks.md sets the two side by side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGH"
#: The sentence ECG-QA's prompts end with; PULSE removes it before splitting the options.
ONLY_OPTIONS = "Only answer based on the given Options without any explanation."


def pulse_letter(text: str) -> str | None:
    """PULSE's extractor: the whole answer a letter; else the first of ``A.`` ... ``H.`` (in letter
    order) found anywhere; else the character after the last "The correct option is "; else the first
    letter (in letter order) found anywhere after the last "Answer:"; else ``None``."""
    if text in LETTERS and len(text) == 1:
        return text
    for letter in LETTERS:
        if f"{letter}." in text:
            return letter
    marker = "The correct option is "
    if marker in text:
        after = text.split(marker)[-1][:1]
        return after if after and after in LETTERS else None
    if "Answer:" in text:
        after = text.split("Answer:")[-1].strip()
        return next((letter for letter in LETTERS if letter in after), None)
    return None


# An option letter stated as such: alone, "(C)", "C.", "C)", "C:", after "Answer:" / "option".
_STATED = re.compile(
    r"^\s*\(?([A-H])\)?\s*(?:[.):]|$)|(?i:answer|option)(?:\s+is)?\s*[:\-]?\s*\(?([A-H])\b(?![-'])"
)


def strict_letter(text: str) -> str | None:
    """The option letter the answer states (alone or first, as ``C``, ``(C)``, ``C.``, or after
    "answer" / "option"); ``None`` when it states none."""
    match = _STATED.search(text)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def pulse_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The labels found as case-sensitive substrings of ``text`` (so "NORM" is found in "ABNORMAL")."""
    return [label for label in labels if label in text]


def _token(label: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])")


def strict_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The labels found as whole tokens of ``text`` (not inside a longer word: "NORM" is not in
    "ABNORMAL", "ST" not in "STTC"); case-sensitive, as the label codes are."""
    return [label for label in labels if _token(label).search(text)]


def pulse_code15_gold(value: str, labels: Sequence[str]) -> list[str]:
    """CODE-15's gold set as PULSE builds it: the answer exactly "NORM" or "ABNORMAL" is that one
    label; else the labels found as substrings."""
    return [value] if value in ("NORM", "ABNORMAL") else pulse_labels(value, labels)


def pulse_code15_labels(text: str, labels: Sequence[str]) -> list[str]:
    """CODE-15's predicted set as PULSE reads it: the text after the last "Answer:", "NORM" when it
    holds "NORM" and not "ABNORMAL", "ABNORMAL" when it holds "ABNORMAL", plus the labels found."""
    text = text.split("Answer:")[-1]
    head = (
        ["NORM"] if "NORM" in text and "ABNORMAL" not in text else ["ABNORMAL"] if "ABNORMAL" in text else []
    )
    return head + pulse_labels(text, labels)


def strict_code15_labels(text: str, labels: Sequence[str]) -> list[str]:
    """CODE-15 read as whole tokens, NORM and ABNORMAL among the labels."""
    return strict_labels(text.split("Answer:")[-1], ("NORM", "ABNORMAL", *labels))


def options_of(prompt: str) -> list[str]:
    """ECG-QA's candidate answers, as PULSE splits them from the prompt: the text after the last
    "Options:", the closing sentence removed, split at commas, stripped (case kept)."""
    tail = prompt.split("Options:")[-1].replace(ONLY_OPTIONS, "")
    return [option.strip() for option in tail.split(",")]


def pulse_options(text: str, candidates: Sequence[str]) -> set[str]:
    """The candidates found as substrings of the lower-cased answer (a candidate keeps its case, so
    one with a capital, "None", is never found)."""
    lowered = text.lower()
    return {c for c in candidates if c in lowered}


def strict_options(text: str, candidates: Sequence[str]) -> set[str] | None:
    """The candidates the answer names as whole phrases, case-folded; ``None`` when it names none."""
    lowered = text.lower()
    found = {c.lower() for c in candidates if c and _token(c.lower()).search(lowered)}
    # A longer candidate named ("st-t change") hides the shorter ones inside it ("st").
    found = {c for c in found if not any(c != other and _token(c).search(other) for other in found)}
    return found or None


def gold_options(gold: object) -> set[str]:
    """ECG-QA's gold answer as a set: a list (the hub's type) is its strings; a string is one answer
    (PULSE's ``set(string)`` would make a set of characters — see docs/benchmarks.md)."""
    return {str(g) for g in gold} if isinstance(gold, list) else {str(gold)}
