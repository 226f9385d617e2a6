"""The epoch plan: which QA positions of which shards each (DDP rank, loader worker) slot reads.

Why not ``webdataset.split_by_node`` / ``split_by_worker``: they deal whole shards round-robin, so
ranks get unequal numbers of QA pairs whenever shards differ in size (a rank that runs out first
leaves the others waiting in an all-reduce: a hang), and a shard can only be used by one worker.
:class:`EpochPlan` instead cuts every dataset's stream of QA pairs into contiguous ranges by QA
*position* (the manifest records each shard's ``num_qa``), one range per (rank, worker) "slot",
sized so that every rank yields the same number of full batches. A slot reads only the shards its
ranges touch; at most the two at its ends are read in part. No per-sample index is held anywhere:
the plan needs the shard list and its counts, nothing that grows with the number of samples.

Positions count every entry of a sample's ``json["qa"]`` in shard order; a shard's pairs are
``0 .. num_qa - 1``. A dataset's *stream* is its shards' pairs, pass after pass, each pass in its
own seeded shard order; epoch ``e`` of a dataset with quota ``Q`` is positions ``[e Q, (e + 1) Q)``.
Without weights ``Q`` is the dataset's size, so an epoch is one pass over every pair.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it: where it is, which dataset it holds and how many pairs."""

    url: str
    dataset: str
    num_qa: int
    num_samples: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Segment:
    """QA positions ``[start, stop)`` of one shard."""

    shard: ShardInfo
    start: int
    stop: int

    @property
    def complete(self) -> bool:
        """Whether the segment runs to the shard's end (then the shard's sample count is checked)."""
        return self.stop == self.shard.num_qa


def _largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` as integers that sum to ``total`` (Hamilton's method)."""
    norm = sum(weights.values())
    exact = {name: total * w / norm for name, w in weights.items()}
    shares = {name: math.floor(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: (shares[n] - exact[n], n))[: total - sum(shares.values())]:
        shares[name] += 1
    return shares


class EpochPlan:
    """Which QA positions each (rank, loader worker) slot reads in an epoch (see the module docstring).

    Args:
        shards: Every shard of the split.
        world_size: DDP ranks.
        num_workers: Loader workers per rank (0 counts as 1: the main process).
        batch_size: Pairs per batch; a worker's share is whole batches.
        seed: Seed of the per-pass shard orders.
        shuffle: Shuffle shard order per pass (training); otherwise manifest order.
        drop_last: Every rank gets the same number of full batches and the epoch's last
            ``< world_size * batch_size`` pairs wait for the next pass (training). Without it every
            pair is read once and ranks differ by at most one pair (evaluation).
        weights: Dataset name -> relative share of the epoch's pairs. A dataset whose share is
            larger than its size is read more than once per epoch (each pass in a new order), a
            smaller one partly, continuing next epoch where it stopped. ``None``: each pair once.
        samples_per_epoch: Pairs per epoch with ``weights`` (default: all pairs of the split).
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        world_size: int = 1,
        num_workers: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        weights: Mapping[str, float] | None = None,
        samples_per_epoch: int | None = None,
    ):
        if world_size < 1 or batch_size < 1:
            raise ValueError(f"world_size and batch_size must be >= 1, got {world_size} and {batch_size}")
        self.world_size, self.num_workers = world_size, max(1, num_workers)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.shards: dict[str, list[ShardInfo]] = {}
        for shard in sorted(shards, key=lambda s: s.url):
            if shard.num_qa > 0:
                self.shards.setdefault(shard.dataset, []).append(shard)
        self.sizes = {d: sum(s.num_qa for s in group) for d, group in self.shards.items()}
        self.quotas = self._quotas(weights, samples_per_epoch)
        self.total = sum(self.quotas.values())
        self.targets = [self._target(slot) for slot in range(self.world_size * self.num_workers)]
        self.allocation = self._allocate()

    def _quotas(self, weights: Mapping[str, float] | None, samples_per_epoch: int | None) -> dict[str, int]:
        if weights is None:
            if samples_per_epoch is None:
                return dict(self.sizes)
            weights = self.sizes
        unknown, missing = sorted(set(weights) - set(self.sizes)), sorted(set(self.sizes) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"dataset weights must name exactly the datasets of the split, {sorted(self.sizes)}: "
                + (f"unknown {unknown}" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"missing {missing} (give 0 to leave one out)" if missing else "")
            )
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"dataset weights must be >= 0 with one > 0, got {dict(weights)}")
        total = sum(self.sizes.values()) if samples_per_epoch is None else samples_per_epoch
        return _largest_remainder(total, {d: float(weights[d]) for d in sorted(self.sizes)})

    def _target(self, slot: int) -> int:
        """Pairs slot ``slot`` yields: whole batches; with ``drop_last`` the same number per rank."""
        rank, worker = divmod(slot, self.num_workers)
        if self.drop_last:
            rank_items = self.total // (self.world_size * self.batch_size) * self.batch_size
        else:
            rank_items = self.total // self.world_size + (rank < self.total % self.world_size)
        batches = math.ceil(rank_items / self.batch_size)
        # The loader takes batches from its workers round-robin: worker w makes batches w, w + W, ...
        mine = batches // self.num_workers + (worker < batches % self.num_workers)
        items = mine * self.batch_size
        if batches and worker == (batches - 1) % self.num_workers:
            items -= batches * self.batch_size - rank_items  # the rank's last, partial batch
        return items

    def _allocate(self) -> dict[str, list[tuple[int, int]]]:
        """Per dataset, the ``[start, stop)`` offsets into its epoch quota that each slot reads.

        Each slot takes every dataset in proportion to the dataset's quota (so every worker mixes
        all datasets), rounded by largest remainder; where a dataset has fewer pairs left than that,
        the rest comes from the datasets with pairs to spare. Pairs left over after all slots are
        full (``drop_last``) are not read this epoch.
        """
        left = dict(self.quotas)
        counts: dict[str, list[int]] = {d: [] for d in self.quotas}
        for slot, target in enumerate(self.targets):
            share = _largest_remainder(target, self.quotas) if target else dict.fromkeys(self.quotas, 0)
            taken = {d: min(n, left[d]) for d, n in share.items()}
            short = target - sum(taken.values())
            for d in sorted(taken):
                extra = min(short, left[d] - taken[d])
                taken[d] += extra
                short -= extra
            if short:  # cannot happen: the quotas hold at least the sum of the targets
                raise AssertionError(f"epoch plan: slot {slot} is {short} pairs short")
            for d, n in taken.items():
                counts[d].append(n)
                left[d] -= n
        return {d: list(pairwise([0, *accumulate(ns)])) for d, ns in counts.items()}

    def rank_length(self, rank: int) -> int:
        """Pairs rank ``rank`` yields in an epoch (the loader's length in pairs)."""
        w = self.num_workers
        return sum(self.targets[rank * w : (rank + 1) * w])

    def slot_counts(self, rank: int, worker: int) -> dict[str, int]:
        """Pairs per dataset that slot (``rank``, ``worker``) reads in an epoch."""
        slot = rank * self.num_workers + worker
        return {d: ranges[slot][1] - ranges[slot][0] for d, ranges in self.allocation.items()}

    def pass_order(self, dataset: str, index: int) -> list[ShardInfo]:
        """The shards of ``dataset`` in the order of pass ``index`` over it."""
        order = list(self.shards[dataset])
        if self.shuffle:
            random.Random(f"{self.seed}:{dataset}:{index}").shuffle(order)  # str seeds: same in every process
        return order

    def segments(self, epoch: int, rank: int, worker: int) -> dict[str, list[Segment]]:
        """The shard segments slot (``rank``, ``worker``) reads in ``epoch``, per dataset, in order."""
        out = {}
        for dataset, quota in self.quotas.items():
            a, b = self.allocation[dataset][rank * self.num_workers + worker]
            out[dataset] = self._segments(dataset, epoch * quota + a, epoch * quota + b)
        return out

    def _segments(self, dataset: str, begin: int, end: int) -> list[Segment]:
        size, segments = self.sizes[dataset], []
        for index in range(begin // size, math.ceil(end / size)) if end > begin else ():
            lo, hi = max(begin, index * size) - index * size, min(end, (index + 1) * size) - index * size
            offset = 0
            for shard in self.pass_order(dataset, index):
                start, stop = max(lo, offset), min(hi, offset + shard.num_qa)
                if start < stop:
                    segments.append(Segment(shard, start - offset, stop - offset))
                offset += shard.num_qa
        return segments

    def worker_batches_done(self, batches: int, worker: int) -> int:
        """Batches worker ``worker`` has made once the loader has handed out ``batches`` (round-robin)."""
        return batches // self.num_workers + (worker < batches % self.num_workers)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records to check that a resumed run plans the same epochs."""
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "quotas": dict(self.quotas),
            "sizes": dict(self.sizes),
        }
