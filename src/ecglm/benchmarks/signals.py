"""What the signal suites (``ptbxl``, ``ecgqa``) ask: a question about one or two records."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SignalItem:
    """One question about its records (WFDB paths relative to the signals' folder; two for ECG-QA's
    comparison questions), with its gold answer: a string (the gold labels joined by ``, ``) or, for
    ECG-QA, its list of answer items. ``question_type``: ECG-QA's type, scored one by one."""

    id: str
    records: tuple[str, ...]
    question: str
    gold: str | tuple[str, ...]
    question_type: str = ""
