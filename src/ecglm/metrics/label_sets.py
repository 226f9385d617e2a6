"""Multi-label scores for answers drawn from a fixed vocabulary (ECG-QA's per-template answer classes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MultilabelAUROC, MultilabelF1Score, MultilabelHammingDistance

from ecglm.metrics._grouped import check_pairs, quiet_if_never_updated
from ecglm.metrics.normalize import answer_items, normalize_answer

# Binned (constant-memory) AUROC; scores that fall between grid points give the exact AUROC.
AUROC_THRESHOLDS = 201


class LabelSetMetrics(torch.nn.Module):
    """Multi-label scores for answers drawn from a fixed vocabulary (ECG-QA's per-template classes).

    Answers become multi-hot vectors over ``labels`` via :func:`answer_items`; a ``"none"`` label, if the
    vocabulary has one, is set for the empty answer. Predicted items outside the vocabulary are counted
    (``"out_of_vocabulary"``: their share of predicted items); target items outside it are an error.
    Macro averages give a label absent from both predictions and targets an F1 of 0 (scikit-learn's
    ``zero_division=0``). AUROC (binned, constant memory) needs ``scores [N, len(labels)]`` in every update.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        super().__init__()
        self.labels = tuple(normalize_answer(label) for label in labels)
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels must be at least two distinct answers, got {list(labels)}")
        self._index = {label: i for i, label in enumerate(self.labels)}
        n = len(self.labels)
        self.f1 = MultilabelF1Score(num_labels=n, average="macro")
        self.hamming = MultilabelHammingDistance(num_labels=n, average="micro")
        self.auroc = MultilabelAUROC(num_labels=n, average="macro", thresholds=AUROC_THRESHOLDS)
        self.samples, self.scored = SumMetric(), SumMetric()
        self.pred_items, self.oov_items = SumMetric(), SumMetric()

    def encode(self, answers: Sequence[str | Sequence[str]], strict: bool) -> tuple[Tensor, int, int]:
        """Multi-hot ``[N, L]``, the number of items, and how many fell outside the vocabulary."""
        hot = torch.zeros(len(answers), len(self.labels), dtype=torch.long)
        num_items = num_oov = 0
        for row, answer in enumerate(answers):
            items = answer_items(answer) or ({"none"} if "none" in self._index else set())
            for item in items:
                num_items += 1
                if item in self._index:
                    hot[row, self._index[item]] = 1
                elif strict:
                    raise ValueError(
                        f"target item {item!r} is not in the label vocabulary {list(self.labels)}"
                    )
                else:
                    num_oov += 1
        return hot, num_items, num_oov

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        scores: Tensor | None = None,
    ) -> None:
        check_pairs(preds, target)
        device = self.f1.device
        pred_hot, num_items, num_oov = self.encode(preds, strict=False)
        target_hot = self.encode(target, strict=True)[0].to(device)
        self.f1.update(pred_hot.to(device), target_hot)
        self.hamming.update(pred_hot.to(device), target_hot)
        self.samples.update(float(len(preds)))
        self.pred_items.update(float(num_items))
        self.oov_items.update(float(num_oov))
        if scores is not None:
            if scores.shape != pred_hot.shape:
                raise ValueError(
                    f"scores must be [{len(preds)}, {len(self.labels)}], got {list(scores.shape)}"
                )
            self.auroc.update(scores.to(device).float(), target_hot)
            self.scored.update(float(len(preds)))

    def compute(self) -> dict[str, float]:
        with quiet_if_never_updated():
            samples, scored = int(self.samples.compute()), int(self.scored.compute())
        pred_items = float(self.pred_items.compute())
        result = {
            "macro_f1": float(self.f1.compute()),
            "hamming_loss": float(self.hamming.compute()),
            "out_of_vocabulary": float(self.oov_items.compute()) / pred_items if pred_items else 0.0,
            "n": samples,
        }
        if scored and scored != samples:
            raise ValueError(
                f"scores were given for {scored} of {samples} samples; give them for all or none"
            )
        if scored:
            result["auc"] = float(self.auroc.compute())
        return result

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
