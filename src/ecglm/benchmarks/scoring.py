"""ECGBench scored two ways: ``pulse`` (exactly as PULSE's ``evaluate_ecgbench.py`` scores it, so the
numbers sit beside the published tables) and ``strict`` (what they should be: unparsable answers wrong
and counted, labels as whole tokens, AUROC from label scores, bootstrap intervals, paired gaps against
the controls). Metrics are fractions (0-1); docs/benchmarks.md says how each subset is scored.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, roc_auc_score
from sklearn.preprocessing import MultiLabelBinarizer

import ecglm.benchmarks.parsing as parsing
from ecglm.benchmarks.ecgbench import (
    SCORED,
    BenchmarkError,
    Item,
    Subset,
    prediction_id,
    prediction_text,
    subset,
)
from ecglm.uncertainty import bootstrap_mean, paired_gap

Scoring = Literal["pulse", "strict"]
#: The seed PULSE's script gives Python's ``random`` before drawing letters for unparsable answers.
PULSE_SEED = 42
N_RESAMPLES = 1000


def pulse_rng() -> random.Random:
    """The generator of PULSE's fallback letters: one per scoring of all subsets (drawn from in
    :data:`~ecglm.benchmarks.ecgbench.SCORED` order), seeded as the published script seeds it."""
    return random.Random(PULSE_SEED)


def score_subset(
    name: str,
    items: Sequence[Item],
    rows: Sequence[dict[str, Any]],
    scoring: Scoring = "pulse",
    rng: random.Random | None = None,
    label_scores: bool = True,
    controls: dict[str, Sequence[dict[str, Any]]] | None = None,
    confidence: float = 0.95,
    spec: Subset | None = None,
) -> dict[str, Any]:
    """Subset ``name``'s metrics from the prediction ``rows`` (JSON lines in PULSE's layout) against
    ``items``; ``controls`` (condition -> rows) are scored alike, with paired gaps under ``strict``.
    ``spec``: how to score a subset of another suite (default: ECGBench's subset ``name``)."""
    spec = spec or subset(name)
    if spec.kind == "judge":
        raise BenchmarkError(f"{name} is scored by a judge model, not by rules (see docs/benchmarks.md)")
    if scoring not in ("pulse", "strict"):
        raise BenchmarkError(f"unknown scoring {scoring!r}: pulse or strict")
    gold = {item.id: item for item in items}
    if scoring == "pulse":
        out, per_item = _pulse(spec, gold, rows, rng or pulse_rng())
    else:
        out, per_item = _strict(spec, items, rows, label_scores, confidence)
    out = {"subset": name, "scoring": scoring, "items": len(items), **out}
    if spec.size is not None:
        out["published_items"] = spec.size
    for condition, control_rows in (controls or {}).items():
        if scoring == "pulse":
            scored, control_items = _pulse(spec, gold, control_rows, pulse_rng())  # a run of its own
        else:
            scored, control_items = _strict(spec, items, control_rows, False, confidence)
            ids = [i for i in per_item if i in control_items]
            a, b = [per_item[i] for i in ids], [control_items[i] for i in ids]
            out.setdefault("gaps", {})[f"model_minus_{condition}"] = paired_gap(
                a, b, None, confidence
            ).as_dict()
        out.setdefault("controls", {})[condition] = scored
    return out


def _gold_of(name: str, gold: dict[str, Item], ident: str) -> Item:
    if ident not in gold:
        raise BenchmarkError(f"{name}: prediction for {ident!r}, which the subset does not hold")
    return gold[ident]


# --- pulse ---------------------------------------------------------------------------------------------


def _pulse(
    spec: Subset, gold: dict[str, Item], rows: Sequence[dict[str, Any]], rng: random.Random
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every line scored in file order (duplicates included, as the published script reads them)."""
    name = spec.name
    ids = [str(prediction_id(row)) for row in rows]
    texts = [prediction_text(row) for row in rows]
    items = [_gold_of(name, gold, i) for i in ids]
    out: dict[str, Any] = {"answers": len(rows)}
    if spec.size is not None:
        # The published script prints no score for a choice file of another length.
        out["complete"] = len(rows) == spec.size
    if spec.kind == "choice":
        fallback = "ABCD" if name == "mmmu-ecg" else parsing.LETTERS
        letters = [parsing.pulse_letter(t) for t in texts]
        out["unparsable"] = sum(letter is None for letter in letters)
        preds = [letter or rng.choice(fallback) for letter in letters]
        # csn / g12 compare the first character of the gold value; mmmu-ecg the whole value.
        golds = [str(i.gold) if name == "mmmu-ecg" else str(i.gold)[:1] for i in items]
        correct = [float(p == g) for p, g in zip(preds, golds, strict=True)]
        out["accuracy"] = float(accuracy_score(golds, preds)) if rows else float("nan")
    elif spec.kind == "ecgqa":
        correct = []
        for row, text, item in zip(rows, texts, items, strict=True):
            prompt = row.get("prompt", item.question)
            prompt = prompt.get("prompt", "") if isinstance(prompt, dict) else str(prompt)
            found = parsing.pulse_options(text, parsing.options_of(prompt))
            correct.append(float(found == parsing.gold_options(item.gold)))
        out["accuracy"] = float(np.mean(correct)) if correct else float("nan")
    else:
        if name == "code15-test":
            golds = [parsing.pulse_code15_gold(str(i.gold), spec.labels) for i in items]
            preds = [parsing.pulse_code15_labels(t, spec.labels) for t in texts]
        else:
            golds = [parsing.pulse_labels(str(i.gold), spec.labels) for i in items]
            preds = [parsing.pulse_labels(t, spec.labels) for t in texts]
        out |= pulse_multilabel(preds, golds)
        correct = [float(set(p) == set(g)) for p, g in zip(preds, golds, strict=True)]
    return out, dict(zip(ids, correct, strict=True))


def pulse_multilabel(preds: Sequence[Sequence[str]], golds: Sequence[Sequence[str]]) -> dict[str, Any]:
    """PULSE's multi-label metrics: classes are the labels seen in the gold sets (a predicted label
    outside them is dropped); macro F1 the mean of per-class F1 (0 where undefined); "AUC" the mean
    per-class ROC AUC of the 0/1 predictions (NaN, and so a NaN mean, for a class every item or no
    item has); Hamming loss over those classes."""
    binarizer = MultiLabelBinarizer()
    y_true = binarizer.fit_transform(golds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown predicted labels; undefined F1 counted as 0
        y_pred = binarizer.transform(preds)
        per_f1 = f1_score(y_true, y_pred, average=None, zero_division=0)
    per_auc = [_auc(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])]
    return {
        "f1": float(np.mean(per_f1)),
        "auc": _finite(float(np.mean(per_auc))),  # NaN (a class all or no items have): null
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "classes": [str(c) for c in binarizer.classes_],
        "per_class": {
            str(c): {"f1": float(f), "auc": _finite(a), "positives": int(y_true[:, j].sum())}
            for j, (c, f, a) in enumerate(zip(binarizer.classes_, per_f1, per_auc, strict=True))
        },
    }


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, NaN when the gold column holds one class (sklearn raises or warns, by version)."""
    if len(np.unique(truth)) < 2:
        return float("nan")
    return float(roc_auc_score(truth, score))


# --- strict --------------------------------------------------------------------------------------------


def _strict(
    spec: Subset, items: Sequence[Item], rows: Sequence[dict[str, Any]], use_scores: bool, confidence: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every item of the subset scored once (the last answer to it): an item without an answer, or
    with one that states no option / label, counts as wrong. The per-item scores returned (for paired
    gaps) are those of the answered items."""
    name = spec.name
    gold = {item.id: item for item in items}
    latest = {}
    for row in rows:
        latest[_gold_of(name, gold, str(prediction_id(row))).id] = row
    ids = [item.id for item in items]
    texts = [prediction_text(latest[i]) if i in latest else None for i in ids]
    out: dict[str, Any] = {"answers": len(latest), "missing": sum(t is None for t in texts)}
    if spec.kind in ("choice", "ecgqa"):
        if spec.kind == "choice":
            preds = [None if t is None else parsing.strict_letter(t) for t in texts]
            golds = [parsing.strict_letter(str(gold[i].gold).strip()) for i in ids]
        else:
            options = [parsing.options_of(gold[i].question) for i in ids]
            preds = [
                None if t is None else parsing.strict_options(t, o)
                for t, o in zip(texts, options, strict=True)
            ]
            golds = [{g.lower() for g in parsing.gold_options(gold[i].gold)} for i in ids]
        out["unparsable"] = sum(p is None for t, p in zip(texts, preds, strict=True) if t is not None)
        correct = [float(p is not None and p == g) for p, g in zip(preds, golds, strict=True)]
        out["accuracy_interval"] = bootstrap_mean(correct, None, confidence).as_dict()
        out["accuracy"] = out["accuracy_interval"]["estimate"]
        return out, {i: c for i, c in zip(ids, correct, strict=True) if i in latest}
    code15 = name == "code15-test"
    space = ("NORM", "ABNORMAL", *spec.labels) if code15 else spec.labels
    read = parsing.strict_code15_labels if code15 else parsing.strict_labels
    golds = [read(str(gold[i].gold), spec.labels if code15 else space) for i in ids]
    preds = [[] if t is None else read(t, spec.labels if code15 else space) for t in texts]
    out["unparsable"] = sum(not p for t, p in zip(texts, preds, strict=True) if t is not None)
    binarizer = MultiLabelBinarizer(classes=list(space))
    y_true, y_pred = binarizer.fit_transform(golds), binarizer.transform(preds)
    y_score = _label_scores([latest.get(i) for i in ids], space) if use_scores else None
    out |= strict_multilabel(y_true, y_pred, y_score, list(space), confidence)
    per_item = 1.0 - (y_true != y_pred).mean(axis=1)  # each item's share of labels decided right
    return out, {i: c for i, c in zip(ids, per_item.tolist(), strict=True) if i in latest}


def _label_scores(rows: Sequence[dict[str, Any] | None], space: Sequence[str]) -> np.ndarray | None:
    """Each item's ``label_scores`` (label -> score) as a matrix, or ``None`` unless every item has one
    for every label."""
    matrix = []
    for row in rows:
        scores = (row or {}).get("label_scores")
        if not isinstance(scores, dict) or any(label not in scores for label in space):
            return None
        matrix.append([float(scores[label]) for label in space])
    return np.asarray(matrix)


def strict_multilabel(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_score: np.ndarray | None,
    classes: Sequence[str],
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
) -> dict[str, Any]:
    """Macro F1 and macro AUROC over the classes the gold sets hold both ways (positives and
    negatives), AUROC from ``y_score`` (``None`` without label scores; the AUROC of the 0/1 decisions
    is ``auc_of_decisions``), Hamming loss over every class of the label space, each with a bootstrap
    interval over items."""
    scored = [j for j in range(y_true.shape[1]) if 0 < y_true[:, j].sum() < len(y_true)]
    t, p = y_true[:, scored], y_pred[:, scored]
    f1 = f1_score(t, p, average="macro", zero_division=0) if scored else np.nan
    decided = roc_auc_score(t, p, average="macro") if scored else np.nan
    auc = roc_auc_score(t, y_score[:, scored], average="macro") if scored and y_score is not None else np.nan
    names = ("f1", "auc", "auc_of_decisions", "hamming_loss")
    estimate = (f1, auc, decided, hamming_loss(y_true, y_pred))
    out: dict[str, Any] = {k: _finite(v) for k, v in zip(names, estimate, strict=True)}
    out["classes"] = list(classes)
    out["classes_scored"] = [classes[j] for j in scored]
    out["auc_from"] = "label_scores" if y_score is not None else None
    if len(y_true) > 1 and scored:
        draws = _resampled(y_true, y_pred, y_score, scored, n_resamples)
        tail = (1 - confidence) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN columns (no label scores)
            low, high = np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)
        out["intervals"] = {
            k: {"low": _finite(lo), "high": _finite(hi)} for k, lo, hi in zip(names, low, high, strict=True)
        }
    return out


def _resampled(
    y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None, scored: list[int], n_resamples: int
) -> np.ndarray:
    """``(n_resamples, 4)``: F1, AUROC, AUROC of decisions and Hamming loss of bootstrap resamples of
    the items, each resample as the number of times it draws each item (its multinomial weights).

    Written by hand, not with scipy.stats.bootstrap over sklearn calls: the confusion counts of all
    resamples are one matrix product (10,000 items: seconds, not minutes), and a resample that loses
    every positive (or negative) of a class leaves that class out instead of making the interval NaN.
    """
    n = len(y_true)
    weights = np.random.default_rng(0).multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(np.float64)
    t, p = y_true.astype(np.float64), y_pred.astype(np.float64)
    tp, fp = weights @ (t * p), weights @ ((1 - t) * p)
    fn, tn = weights @ (t * (1 - p)), weights @ ((1 - t) * (1 - p))
    hamming = (fp + fn).sum(1) / (n * t.shape[1])
    tp, fp, fn, tn = (m[:, scored] for m in (tp, fp, fn, tn))
    valid = (tp + fn > 0) & (fp + tn > 0)
    with np.errstate(all="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        decided = (tp / (tp + fn) + tn / (tn + fp)) / 2  # the AUROC of 0/1 scores is balanced accuracy
    f1, decided = (np.where(valid, m, np.nan) for m in (f1, decided))
    auc = np.full(n_resamples, np.nan)
    if y_score is not None:
        for r in range(n_resamples):
            columns = [j for k, j in enumerate(scored) if valid[r, k]]
            if columns:
                auc[r] = roc_auc_score(
                    y_true[:, columns], y_score[:, columns], average="macro", sample_weight=weights[r]
                )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample with no valid class: NaN, left out of the interval
        return np.stack([np.nanmean(f1, 1), auc, np.nanmean(decided, 1), hamming], 1)


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def score_ecgbench(
    items: dict[str, Sequence[Item]],
    predictions: dict[str, Sequence[dict[str, Any]]],
    scoring: Scoring = "pulse",
    controls: dict[str, dict[str, Sequence[dict[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Every subset of ``predictions`` scored, in the order PULSE scores them (its fallback letters come
    from one seeded generator across subsets)."""
    rng = pulse_rng()
    order = [n for n in SCORED if n in predictions] + [n for n in predictions if n not in SCORED]
    return {
        name: score_subset(
            name, items[name], predictions[name], scoring, rng, controls=(controls or {}).get(name)
        )
        for name in order
    }
