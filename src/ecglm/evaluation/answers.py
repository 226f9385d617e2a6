"""Metric states and answer records of one evaluation pass: :class:`AnswerEvaluation`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ecglm import conditions as registry
from ecglm.batch import ECGQABatch
from ecglm.evaluation.config import MetricsConfig
from ecglm.metrics import (
    AbnormalityMetrics,
    LabelSetMetrics,
    TextMetrics,
    answer_items,
    failure_modes,
)
from ecglm.metrics.verify import VerifyAUROC


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every DDP rank's ``rows``, in rank order (this rank's alone outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(rows)
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part or []]


class AnswerEvaluation(nn.Module):
    """Metric states and answer records of one evaluation pass over one or more conditions.

    One metric set per condition, grouped by dataset (and one by question type); groups are fixed at
    construction, so every DDP rank holds the same states. All conditions share one BERTScore model
    (loaded once per process).

    Args:
        config: Metrics and answer mapping.
        datasets: Dataset names the batches carry (``batch.dataset``).
        question_types: Question types for the per-type table; ``None`` skips it.
        conditions: Conditions evaluated (default: ``config.conditions``).
        keep_records: Keep every answer (for the report and failure modes); off in validation.
    """

    def __init__(
        self,
        config: MetricsConfig,
        datasets: Sequence[str],
        question_types: Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        keep_records: bool = True,
    ):
        super().__init__()
        self.config = config
        self.conditions = tuple(conditions or config.conditions)
        for condition in self.conditions:
            registry.get(condition)  # an unknown name fails here, before any answer is generated
        self.datasets = tuple(datasets)
        self.question_types = tuple(question_types) if question_types else ()
        self.text = nn.ModuleDict(
            {
                c: TextMetrics(self.datasets, config.text_metrics, bertscore_model=config.bertscore_model)
                for c in self.conditions
            }
        )
        self.by_type = nn.ModuleDict(
            {
                c: TextMetrics(self.question_types, ("acc", "f1"), bertscore_model=None)
                for c in self.conditions
                if self.question_types
            }
        )
        self.abnormality = nn.ModuleDict(
            {c: AbnormalityMetrics(config.normal_answers, self.datasets) for c in self.conditions}
        )
        vocabularies = {d: config.vocabulary(d) for d in self.datasets}
        # Indexed by position: dataset names may hold characters a ModuleDict key may not (".").
        self.label_set_datasets = [d for d in self.datasets if vocabularies[d]]
        self.label_sets = nn.ModuleDict(
            {
                c: nn.ModuleList([LabelSetMetrics(vocabularies[d]) for d in self.label_set_datasets])
                for c in self.conditions
            }
        )
        self.verify = nn.ModuleDict(
            {c: VerifyAUROC(self.datasets) for c in self.conditions if config.verify_auc}
        )
        self.keep_records = keep_records
        self.records: list[dict[str, Any]] = []

    def wants_scores(self, batch: ECGQABatch) -> bool:
        """Whether the batch has yes/no questions whose P(yes) the AUROC needs."""
        return bool(self.verify) and any(
            t is not None for t in next(iter(self.verify.values())).targets(batch.answer)
        )

    def update_scores(self, condition: str, p_yes: torch.Tensor, batch: ECGQABatch) -> None:
        """P(yes) of each row (:meth:`ecglm.model.ECGLM.answer_scores`); rows that are not yes/no
        questions are ignored."""
        datasets = batch.dataset or ["unknown"] * len(batch.answer)
        self.verify[condition].update(p_yes, batch.answer, datasets)

    def update(
        self,
        condition: str,
        predictions: Sequence[str],
        batch: ECGQABatch,
        label_scores: Callable[[Sequence[str]], torch.Tensor] | None = None,
    ) -> None:
        """Score ``predictions`` against the batch's references under ``condition``. ``label_scores``
        (labels -> ``(rows, len(labels))`` scores) adds the macro-AUC of label-set datasets."""
        references = batch.answer
        datasets = batch.dataset or ["unknown"] * len(references)
        self.text[condition].update(predictions, references, datasets)
        self.abnormality[condition].update(predictions, references, datasets)
        if self.question_types:
            self.by_type[condition].update(predictions, references, batch.question_type)
        for index, dataset in enumerate(self.label_set_datasets):
            rows = [i for i, d in enumerate(datasets) if d == dataset]
            if rows:
                metric = self.label_sets[condition][index]
                scores = label_scores(metric.labels)[rows] if label_scores is not None else None
                metric.update([predictions[i] for i in rows], [references[i] for i in rows], scores)
        if self.keep_records:
            donors = registry.get(condition).needs_donors and getattr(batch, "donor", None) is not None
            for i, prediction in enumerate(predictions):
                self.records.append(
                    {
                        "key": batch.key[i],
                        "dataset": datasets[i],
                        "question_type": batch.question_type[i],
                        "condition": condition,
                        "reference": references[i],
                        "prediction": prediction,
                        "correct": answer_items(prediction) == answer_items(references[i]),
                        **({"question": batch.question[i]} if getattr(batch, "question", None) else {}),
                        **({"donor": batch.donor[i]} if donors else {}),
                    }
                )

    def reset(self) -> None:
        label_sets = [m for metrics in self.label_sets.values() for m in metrics]
        parts = (*self.text.values(), *self.by_type.values(), *self.abnormality.values(), *label_sets)
        for part in (*parts, *self.verify.values()):
            part.reset()
        self.records = []

    def gather_records(self) -> list[dict[str, Any]]:
        """Every rank's records (metric states sync themselves; records are plain Python)."""
        return gather_rows(self.records)

    def compute(self) -> dict[str, Any]:
        """``{"conditions": {condition: {"datasets": {dataset: {metric: value}}, ...}}, "records": [...]}``.

        Values are fractions in [0, 1]; ``n`` counts answers. With several datasets, each section
        also has an ``all`` row over every answer of the condition (BLEU-4 as one corpus).
        """
        records = self.gather_records() if self.keep_records else []
        result: dict[str, Any] = {"conditions": {}, "records": records}
        for c in self.conditions:
            entry: dict[str, Any] = {
                "datasets": _rows(self.text[c].compute()),
                "abnormality": _rows(self.abnormality[c].compute()),
                "question_types": _rows(self.by_type[c].compute(), keep_all=False)
                if self.question_types
                else {},
                "label_sets": {
                    d: {k: _plain(v) for k, v in self.label_sets[c][i].compute().items()}
                    for i, d in enumerate(self.label_set_datasets)
                },
                "verify_auc": _rows(self.verify[c].compute()) if c in self.verify else {},
            }
            if records:
                answered = [r for r in records if r["condition"] == c]
                entry["failure_modes"] = failure_modes(
                    [r["prediction"] for r in answered],
                    [r["reference"] for r in answered],
                    normal_answers=self.config.normal_answers,
                )
            result["conditions"][c] = entry
        return result


def _rows(per_group: dict[str, dict[str, Any]], keep_all: bool = True) -> dict[str, dict[str, Any]]:
    """Plain floats; the ``all`` row only where it adds something (more than one group seen)."""
    rows = {name: {k: _plain(v) for k, v in values.items()} for name, values in per_group.items()}
    overall = rows.pop("all", None)
    if keep_all and overall is not None and len(rows) > 1:
        rows["all"] = overall  # last, below the datasets
    return rows


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return float(value) if value.numel() == 1 else value.tolist()
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
