"""AUROC of yes/no questions from the model's probability of answering "yes", per group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAUROC

from ecglm.metrics._grouped import Groups, quiet_if_never_updated
from ecglm.metrics.normalize import answer_items


class VerifyAUROC(torch.nn.Module):
    """Threshold-free discrimination on yes/no (verify) questions: AUROC of P(yes) against the reference.

    Rows whose reference is exactly ``yes`` or ``no`` count (ECG-QA's ``["yes"]`` / ``["no"]`` too);
    the rest are ignored. Exact, not binned: it keeps one score per yes/no question (160 kB for 40,000),
    synced across ranks like every metric here; a group whose answers are all ``yes`` or all ``no``
    has no AUROC and is left out.
    """

    def __init__(self, groups: Sequence[str] = (), positive: str = "yes", negative: str = "no") -> None:
        super().__init__()
        self.groups = Groups(groups)
        self.positive, self.negative = positive, negative
        self.slots = torch.nn.ModuleList([BinaryAUROC(thresholds=None) for _ in self.groups.names])
        self.register_buffer("counts", torch.zeros((len(self.groups.names), 2), dtype=torch.long))

    def targets(self, references: Sequence[Any]) -> list[int | None]:
        """1 for a ``yes`` reference, 0 for ``no``, ``None`` for anything else."""
        labels = {frozenset({self.positive}): 1, frozenset({self.negative}): 0}
        return [labels.get(frozenset(answer_items(r))) for r in references]

    def update(self, p_yes: Tensor, references: Sequence[Any], groups: Sequence[str] | None = None) -> None:
        targets = self.targets(references)
        slots = self.groups.slots(groups, len(targets))
        rows = [i for i, t in enumerate(targets) if t is not None]
        if not rows:
            return
        device = self.counts.device
        scores = p_yes.detach().float().to(device)[rows]
        target = torch.tensor([targets[i] for i in rows], device=device)
        chosen = torch.tensor([slots[i] for i in rows], device=device)
        self.slots[0].update(scores, target)
        self.counts[0] += torch.stack([(target == 0).sum(), (target == 1).sum()])
        for slot in sorted(set(chosen.tolist()) - {0}):
            mask = chosen == slot
            self.slots[slot].update(scores[mask], target[mask])
            self.counts[slot] += torch.stack([(target[mask] == 0).sum(), (target[mask] == 1).sum()])

    def compute(self) -> dict[str, dict[str, float]]:
        counts = self.counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        result = {}
        for slot, group in enumerate(self.groups.names):
            negatives, positives = counts[slot].tolist()
            if negatives == 0 or positives == 0:
                continue
            with quiet_if_never_updated():
                result[group] = {"auc": float(self.slots[slot].compute()), "n": float(negatives + positives)}
        return result

    def reset(self) -> None:
        for metric in self.slots:
            metric.reset()
        self.counts.zero_()
