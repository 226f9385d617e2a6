"""ECG-QA's published test splits (Oh et al., "ECG-QA: A Comprehensive Question Answering Dataset
Combined With Electrocardiogram", NeurIPS 2023 Datasets and Benchmarks) asked of a model about the
signals, and scored as the paper scores them: exact match of the answer set, per question type.

The questions are ECG-QA's own files (``ecgqa/{ptbxl,mimic-iv-ecg}/{paraphrased,template}/test/*.json``,
read by :func:`ecglm.data.sources.read_ecgqa`); the signals are PTB-XL's or MIMIC-IV-ECG's WFDB
records, found through their tables (:func:`ecglm.data.sources.read_ptbxl` / ``read_mimic``). An
answer is right when its items (split on ``,`` and ``;``, normalised, ``none`` the empty set:
:func:`ecglm.metrics.normalize.answer_items`, as ``ecglm evaluate`` compares them) are the gold
items.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecglm.benchmarks.ecgbench import BenchmarkError, Subset, prediction_id, prediction_text
from ecglm.benchmarks.signals import SignalItem
from ecglm.metrics.normalize import answer_items
from ecglm.uncertainty import bootstrap_mean, paired_gap

SOURCES = ("ptbxl", "mimic-iv-ecg")
VARIANTS = ("paraphrased", "template")


def subset_of(source: str, variant: str) -> Subset:
    """The suite's subset for one source and variant, e.g. ``ecgqa-ptbxl-paraphrased``."""
    if source not in SOURCES or variant not in VARIANTS:
        raise BenchmarkError(f"ECG-QA source {source!r} / variant {variant!r}: one of {SOURCES} / {VARIANTS}")
    return Subset(f"ecgqa-{source}-{variant}", "ecgqa")


def read_ecgqa_items(
    data: str | Path,
    signals: str | Path,
    source: str = "ptbxl",
    variant: str = "paraphrased",
    split: str = "test",
) -> tuple[list[SignalItem], Counter]:
    """The questions of ``split`` whose records ``signals`` holds, in file order, and the ones left out
    by reason (``unknown_ecg_id``: a record the signals' table does not list)."""
    from ecglm.data.sources import ECGQA_SPLITS, MIMIC, read_ecgqa, read_mimic, read_ptbxl

    subset_of(source, variant)
    wanted = ECGQA_SPLITS.get(split, split)
    try:
        records = read_ptbxl(signals) if source == "ptbxl" else read_mimic(signals)
        folder = MIMIC if source != "ptbxl" else source
        samples = [sample for name, sample in read_ecgqa(data, folder, variant) if name == wanted]
    except (FileNotFoundError, ValueError) as err:
        raise BenchmarkError(str(err)) from None
    root, items, left_out = Path(signals), [], Counter()
    for sample in samples:
        ids = sample.get("ecg_id") or []
        if any(i not in records for i in ids) or not ids:
            left_out["unknown_ecg_id"] += 1
            continue
        paths = tuple(str(records[i].path.relative_to(root)) for i in ids)
        ident = sample.get("sample_id", sample.get("question_id"))
        items.append(
            SignalItem(
                str(ident), paths, sample["question"], tuple(sample["answer"]), sample["question_type"]
            )
        )
    if not items:
        raise BenchmarkError(f"{data}: no {split} question of {source}/{variant} about a record in {signals}")
    return items, left_out


def _correct(items: Sequence[SignalItem], rows: Sequence[dict[str, Any]]) -> tuple[dict[str, float], int]:
    """Each answered item's exact match (the last answer to it), and how many answers name no item."""
    gold = {item.id: item for item in items}
    latest = {}
    for row in rows:
        ident = str(prediction_id(row))
        if ident not in gold:
            raise BenchmarkError(f"prediction for {ident!r}, which the ECG-QA split does not hold")
        latest[ident] = prediction_text(row)
    correct = {i: float(answer_items(text) == answer_items(list(gold[i].gold))) for i, text in latest.items()}
    return correct, sum(not text.strip() for text in latest.values())


def score_ecgqa(
    spec: Subset,
    items: Sequence[SignalItem],
    rows: Sequence[dict[str, Any]],
    controls: dict[str, Sequence[dict[str, Any]]] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Exact match overall and per question type with bootstrap intervals over questions (a missing
    answer counts as wrong), the controls alike, and paired gaps against them."""
    correct, empty = _correct(items, rows)
    types = defaultdict(list)
    for item in items:
        types[item.question_type].append(item.id)

    def accuracy(scores: dict[str, float], ids: list[str]) -> dict[str, Any]:
        return _valid_json(bootstrap_mean([scores.get(i, 0.0) for i in ids], None, confidence).as_dict())

    def gap(a: dict[str, float], b: dict[str, float], ids: list[str]) -> dict[str, Any] | None:
        pair = [i for i in ids if i in a and i in b]
        if len(pair) < 2:  # no interval nor test from one question
            return None
        return _valid_json(paired_gap([a[i] for i in pair], [b[i] for i in pair], None, confidence).as_dict())

    every = [item.id for item in items]
    out: dict[str, Any] = {
        "subset": spec.name,
        "scoring": "strict",
        "items": len(items),
        "answers": len(correct),
    }
    out |= {"missing": len(items) - len(correct), "empty_answers": empty}
    out["accuracy_interval"] = accuracy(correct, every)
    out["accuracy"] = out["accuracy_interval"]["estimate"]
    out["question_types"] = {t: accuracy(correct, ids) | {"n": len(ids)} for t, ids in sorted(types.items())}
    for condition, control_rows in (controls or {}).items():
        scored, _ = _correct(items, control_rows)
        out.setdefault("controls", {})[condition] = {
            "accuracy": accuracy(scored, every)["estimate"],
            "question_types": {t: accuracy(scored, ids)["estimate"] for t, ids in sorted(types.items())},
        }
        gaps = {"all": gap(correct, scored, every)}
        gaps |= {t: gap(correct, scored, ids) for t, ids in sorted(types.items())}
        out.setdefault("gaps", {})[f"model_minus_{condition}"] = gaps
    return out


def _valid_json(values: dict[str, Any]) -> dict[str, Any]:
    """An interval's fields with NaN (no interval from one question) as ``None``: valid JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in values.items()}
