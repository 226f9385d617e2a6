"""Normal vs abnormal detection from free-text or list answers, per group, and the confusion plot."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)

from ecglm.metrics._grouped import Groups, check_pairs, quiet_if_never_updated
from ecglm.metrics.normalize import NORMAL_ANSWERS, is_normal_answer


def _binary_metrics() -> MetricCollection:
    return MetricCollection(
        {
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "precision": BinaryPrecision(),
            "f1": BinaryF1Score(),
            "confusion": BinaryConfusionMatrix(),
        }
    )


class AbnormalityMetrics(torch.nn.Module):
    """Normal (0) vs abnormal (1) detection from free-text or list answers, overall and per group.

    An answer is normal when :func:`is_normal_answer` holds. Zero divisions (no positives) give 0.
    """

    def __init__(self, normal_answers: Sequence[str] = NORMAL_ANSWERS, groups: Sequence[str] = ()) -> None:
        super().__init__()
        self.normal_answers = tuple(normal_answers)
        self.groups = Groups(groups)
        self.slots = torch.nn.ModuleList([_binary_metrics() for _ in self.groups.names])

    def binary_labels(self, answers: Sequence[str | Sequence[str]]) -> Tensor:
        """1 for an abnormal answer, 0 for a normal one."""
        return torch.tensor([int(not is_normal_answer(a, self.normal_answers)) for a in answers])

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        groups: Sequence[str] | None = None,
    ) -> None:
        check_pairs(preds, target)
        slots = torch.tensor(self.groups.slots(groups, len(preds)))
        device = self.slots[0]["confusion"].device
        pred_labels, target_labels = (
            self.binary_labels(preds).to(device),
            self.binary_labels(target).to(device),
        )
        self.slots[0].update(pred_labels, target_labels)
        for slot in sorted(set(slots.tolist()) - {0}):
            chosen = (slots == slot).to(device)
            self.slots[slot].update(pred_labels[chosen], target_labels[chosen])

    def compute(self) -> dict[str, dict[str, Any]]:
        result = {}
        for slot, group in enumerate(self.groups.names):
            with quiet_if_never_updated():
                confusion = self.slots[slot]["confusion"].compute()
                if slot > 0 and int(confusion.sum()) == 0:
                    continue
                values = self.slots[slot].compute()
            result[group] = {k: float(values[k]) for k in ("sensitivity", "specificity", "precision", "f1")}
            result[group]["n"] = int(confusion.sum())
            result[group]["confusion"] = confusion.tolist()
        return result

    def plot_confusion(self, path: str | Path, group: str = "all") -> Path:
        """Write the group's confusion matrix (rows: reference, columns: prediction) as a PNG."""
        if group not in self.groups.names:
            raise ValueError(f"unknown group {group!r}; known groups: {list(self.groups.names)}")
        metric = self.slots[self.groups.names.index(group)]["confusion"]
        return plot_confusion({f"normal vs abnormal: {group}": metric.compute()}, path)

    def reset(self) -> None:
        for collection in self.slots:
            collection.reset()


def plot_confusion(matrices: Mapping[str, Tensor | Sequence[Sequence[float]]], path: str | Path) -> Path:
    """Binary normal/abnormal confusion matrices (rows: reference, columns: prediction) as one PNG, a panel
    per title, drawn by torchmetrics' confusion-matrix plot. Counts are rounded (sums over seeds may not be).
    """
    # A Figure without pyplot: no global backend to switch, nothing left open; matplotlib is optional.
    from matplotlib.figure import Figure
    from torchmetrics.utilities.plot import plot_confusion_matrix

    fig = Figure(figsize=(3.4 * len(matrices), 3.2))
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (title, matrix) in zip(axes, matrices.items(), strict=True):
        counts = torch.as_tensor(matrix, dtype=torch.float64).round().long()
        with warnings.catch_warnings():
            # torchmetrics hands matplotlib a tensor, whose __array__ lacks numpy 2's copy keyword.
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            plot_confusion_matrix(counts, ax=ax, labels=["normal", "abnormal"])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Path(path)
