"""Hand-written (prediction, reference) pairs for the metric reference tests (tests/test_metrics.py).

In the repository so that the reference comparisons run, and can fail, without ``../shared/data``. The
reference implementations (the SQuAD v1.1 F1 logic, sacrebleu, nltk, rouge-score, torchmetrics'
BERTScore) give the expected values; nothing here is a precomputed score.

- :data:`REPORT_PAIRS`: free-text ECG findings, worded as generated reports and cardiologists write them.
- :data:`ECGQA_PAIRS`: list answers as ECG-QA gives them (items of its PTB-XL answer classes, ``["none"]``
  for the empty set), in the mix the shared-data variant draws from the real classes: a third of the
  predictions are the reference reordered, a third drop one item and add a wrong one, a third answer
  ``["none"]``. The items keep the classes' punctuation (``st/t``, ``qt-interval``, parentheses,
  ``lead aVR``) that the normalisers must agree on.
"""

from __future__ import annotations

REPORT_PAIRS: list[tuple[str, str]] = [
    ("sinus rhythm, left ventricular hypertrophy", "sinus tachycardia with left ventricular hypertrophy"),
    ("Sinus rhythm. Normal ECG.", "sinus rhythm, normal ecg"),
    (
        "atrial fibrillation with rapid ventricular response",
        "atrial fibrillation with rapid ventricular response, st depression in lateral leads",
    ),
    (
        "sinus bradycardia, first degree av block",
        "sinus bradycardia with first degree atrioventricular block",
    ),
    ("left bundle branch block", "complete left bundle branch block"),
    ("inferior myocardial infarction, age undetermined", "old inferior myocardial infarction"),
    ("normal sinus rhythm", "sinus rhythm with premature ventricular contractions"),
    (
        "st elevation in anterior leads consistent with acute anterior infarction",
        "acute anterior st elevation myocardial infarction",
    ),
    (
        "right bundle branch block and left anterior fascicular block",
        "bifascicular block: right bundle branch block with left anterior fascicular block",
    ),
    ("non-specific T wave abnormalities", "nonspecific ST-T changes"),
    ("sinus rhythm, prolonged QT interval", "sinus rhythm with long qt interval"),
    ("atrial flutter with 2:1 block", "atrial flutter with variable av block"),
    ("low QRS voltages in the limb leads", "low voltage qrs in limb leads"),
    ("sinus tachycardia", "sinus tachycardia"),
    ("paced rhythm", "ventricular paced rhythm with underlying atrial fibrillation"),
    ("no acute changes", "normal ecg"),
]

_REORDERED: list[tuple[list[str], list[str]]] = [
    (["yes"], ["yes"]),
    (["hypertrophy", "conduction disturbance"], ["conduction disturbance", "hypertrophy"]),
    (
        ["first degree av block", "complete left bundle branch block"],
        ["complete left bundle branch block", "first degree av block"],
    ),
    (["lead V2", "lead V1", "lead aVR"], ["lead V1", "lead aVR", "lead V2"]),
    (["st/t change", "myocardial infarction"], ["myocardial infarction", "st/t change"]),
    (["long qt-interval"], ["long qt-interval"]),
    (["sinus rhythm", "atrial premature complex"], ["atrial premature complex", "sinus rhythm"]),
    (["left axis deviation"], ["left axis deviation"]),
    (
        ["ventricular extrasystoles", "supraventricular extrasystoles"],
        ["supraventricular extrasystoles", "ventricular extrasystoles"],
    ),
    (["static noise", "baseline drift"], ["baseline drift", "static noise"]),
    (["within the normal range"], ["within the normal range"]),
    (
        ["inverted t-waves", "low qrs voltages in the frontal and horizontal leads", "high qrs voltage"],
        ["high qrs voltage", "inverted t-waves", "low qrs voltages in the frontal and horizontal leads"],
    ),
]

_ONE_SWAPPED: list[tuple[list[str], list[str]]] = [
    (["yes"], ["no"]),
    (["myocardial infarction", "hypertrophy"], ["conduction disturbance", "myocardial infarction"]),
    (
        ["incomplete right bundle branch block", "left posterior fascicular block"],
        ["complete right bundle branch block", "incomplete right bundle branch block"],
    ),
    (["lead V3", "lead V5"], ["lead V4", "lead V3"]),
    (["sinus bradycardia", "sinus arrhythmia"], ["sinus tachycardia", "sinus bradycardia"]),
    (["right axis deviation"], ["normal heart axis"]),
    (
        ["myocardial infarction in inferior leads", "ischemic in lateral leads"],
        ["left ventricular hypertrophy", "myocardial infarction in inferior leads"],
    ),
    (
        ["atrial fibrillation", "bigeminal pattern (unknown origin, supraventricular, or ventricular)"],
        ["atrial flutter", "atrial fibrillation"],
    ),
    (["old stage of myocardial infarction"], ["early stage of myocardial infarction"]),
    (["qt interval", "qrs duration"], ["pr interval", "qt interval"]),
    (["above the normal range"], ["below the normal range"]),
    (
        ["non-specific st changes", "digitalis effect"],
        ["non-diagnostic t abnormalities", "non-specific st changes"],
    ),
]

_NONE: list[tuple[list[str], list[str]]] = [
    (["none"], ["yes"]),
    (["none"], ["conduction disturbance"]),
    (["none"], ["complete left bundle branch block", "left anterior fascicular block"]),
    (["none"], ["lead II", "lead III", "lead aVF"]),
    (["none"], ["st/t change"]),
    (["none"], ["sinus rhythm"]),
    (["none"], ["electrodes problems", "burst noise"]),
    (["none"], ["subendocardial injury in anterolateral leads"]),
    (["none"], ["extrasystoles"]),
    (["none"], ["none"]),
    (["none"], ["p duration", "rr interval"]),
    (["none"], ["normal functioning artificial pacemaker"]),
]

#: Interleaved as the shared-data variant orders them (reordered, one swapped, none, ...).
ECGQA_PAIRS: list[tuple[list[str], list[str]]] = [
    pair for triple in zip(_REORDERED, _ONE_SWAPPED, _NONE, strict=True) for pair in triple
]
