"""Machinery shared by the metrics: input checks, named groups, and per-group sums that sync across ranks.

Every metric keeps fixed-size tensor states reduced by sum: slot 0 is "all", slot k is the k-th group
named at construction, so every rank holds the same states whatever its samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def check_pairs(preds: Sequence[Any], target: Sequence[Any]) -> None:
    if isinstance(preds, str) or isinstance(target, str):
        raise TypeError("preds and target must be sequences of answers, not a single string")
    if len(preds) != len(target):
        raise ValueError(f"got {len(preds)} predictions for {len(target)} targets")


@contextmanager
def quiet_if_never_updated() -> Iterator[None]:
    """A rank (or a group, or the optional AUROC) may never have been updated; its states still sync."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        yield


class Groups:
    """Names of the groups fixed at construction; slot 0 is "all", group k is slot k."""

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if isinstance(names, str) or len(set(names)) != len(names) or "all" in names:
            raise ValueError(f"groups must be distinct names other than 'all', got {names!r}")
        self.names = ("all", *names)
        self._slot = {name: slot for slot, name in enumerate(names, start=1)}

    def slots(self, groups: Sequence[str] | None, n: int) -> list[int]:
        if groups is None:
            return [0] * n
        if isinstance(groups, str) or len(groups) != n:
            raise ValueError(f"groups must name one group per sample ({n}), got {groups!r}")
        unknown = sorted({g for g in groups if g not in self._slot})
        if unknown:
            known = list(self._slot) or "none (pass groups=... at construction)"
            raise ValueError(f"unknown group(s) {unknown}; known groups: {known}")
        return [self._slot[g] for g in groups]


class GroupedMean(Metric):
    """Mean of a per-pair score, per group, in two ``[1 + num_groups]`` sum states (slot 0 is "all").

    torchmetrics' MeanMetric keeps scalar states, so per-group means in one synced tensor need this class.
    ``update(..., group_index)`` takes a slot per sample: 0 adds to "all" only, k also to group k.
    ``compute()`` returns a scalar when ``num_groups == 0``, else the ``[1 + num_groups]`` vector
    (NaN for an empty slot). Subclasses define ``_scores(preds, target)``, one score per pair.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_groups: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        # float64: float32 sums drift by ~1e-3 relative over a million samples.
        zeros = torch.zeros(num_groups + 1, dtype=torch.float64)
        self.add_state("total", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", zeros.clone(), dist_reduce_fx="sum")

    def _scores(self, preds: Sequence[Any], target: Sequence[Any]) -> Sequence[float] | Tensor:
        raise NotImplementedError

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        group_index: Sequence[int] | Tensor | None = None,
    ) -> None:
        check_pairs(preds, target)
        if len(preds) == 0:
            return
        scores = torch.as_tensor(self._scores(preds, target), dtype=torch.float64, device=self.total.device)
        slots = torch.as_tensor(
            [0] * len(preds) if group_index is None else group_index, dtype=torch.long, device=scores.device
        )
        if slots.shape != scores.shape or bool(((slots < 0) | (slots > self.num_groups)).any()):
            raise ValueError(f"group_index must hold one slot in 0..{self.num_groups} per sample")
        grouped = slots > 0
        self.total[0] += scores.sum()
        self.count[0] += len(preds)
        self.total.index_add_(0, slots[grouped], scores[grouped])
        self.count.index_add_(0, slots[grouped], torch.ones_like(scores[grouped]))

    def compute(self) -> Tensor:
        mean = self.total / self.count
        return mean[0] if self.num_groups == 0 else mean


class GroupCount(Metric):
    """Samples per slot ``[1 + num_groups]`` (slot 0 is "all"); torchmetrics' SumMetric is scalar-only."""

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", torch.zeros(num_groups + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, slots: Tensor) -> None:
        self.count[0] += len(slots)
        self.count.index_add_(0, slots[slots > 0], torch.ones_like(slots[slots > 0]))

    def compute(self) -> Tensor:
        return self.count
