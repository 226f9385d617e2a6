"""Which QA pairs a run reads, drawn by key hash: the seeded evaluation subsets and the few-shot
demonstrations.

A hash of ``(seed, key)`` rather than a stream RNG: the same seed and shards give the same pairs
however the stream is split across loader workers and DDP ranks, and without a pass over the ECGs.
"""

from __future__ import annotations

import heapq
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

from ecglm.answers import answer_text
from ecglm.data.splits import hash_uniform


def subset_fraction(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, key)``: the evaluation subset keeps keys below a rate.

    Hashing the key (not drawing from a stream RNG) gives the same subset for a seed however the
    stream is split across loader workers and DDP ranks, without a pass over the data.
    """
    return hash_uniform(f"{seed}:{key}")


def read_qa_text(path: str | Path | BinaryIO) -> Iterator[dict[str, Any]]:
    """The QA pairs of one shard as :func:`expand_qa` yields them, without the ECG.

    Only the ``json`` members are read: tarfile seeks over the ECG arrays, so a pass over a split
    costs its headers and metadata, not its signals.
    """
    # An open file (a remote shard's stream) is read in tarfile's stream mode, members in order.
    opened = tarfile.open(fileobj=path, mode="r|") if hasattr(path, "read") else tarfile.open(path)  # noqa: SIM115
    with opened as tar:
        for member in tar:
            key, field = base_plus_ext(member.name) if member.isfile() else (None, None)
            if field != "json":
                continue
            meta = json.loads(tar.extractfile(member).read())
            for i, qa in enumerate(meta["qa"]):
                yield {
                    "key": f"{key}_qa{i}",
                    "question": qa["question"],
                    "answer": qa["answer"],
                    "question_type": qa.get("question_type", "unknown"),
                    "dataset": meta.get("dataset", "unknown"),
                }


def select_demonstrations(
    items: Iterable[dict[str, Any]], seed: int, per_dataset: int, max_chars: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """Per dataset, the ``per_dataset`` QA pairs with the smallest :func:`subset_fraction` of ``(seed, key)``.

    A hash rank, not a stream RNG: the draw does not depend on the order of the pairs (shard order,
    shuffling, loader workers, DDP ranks), and the first of ``n + 1`` draws are the ``n`` draws.
    ``max_chars`` skips pairs whose question and answer text are longer together. Demonstrations
    are plain strings, the answer as the model reads it (lists joined with ", "), best rank first.
    """
    heaps: dict[str, list[tuple[float, str]]] = {}
    kept: dict[str, dict[str, str]] = {}
    for item in items:
        answer = answer_text(item["answer"])
        if max_chars is not None and len(item["question"]) + len(answer) > max_chars:
            continue
        entry = (-subset_fraction(seed, item["key"]), item["key"])
        heap = heaps.setdefault(item["dataset"], [])
        if len(heap) < per_dataset:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            kept.pop(heapq.heapreplace(heap, entry)[1], None)
        else:
            continue
        kept[item["key"]] = {
            "key": item["key"],
            "dataset": item["dataset"],
            "question": item["question"],
            "answer": answer,
            "question_type": item["question_type"],
        }
    return {
        dataset: [kept[key] for _, key in sorted(heaps[dataset], reverse=True)] for dataset in sorted(heaps)
    }


class SubsetFilter:
    """Keeps a QA pair of dataset ``d`` with probability ``rates[d]`` (Bernoulli by key hash); picklable."""

    def __init__(self, rates: dict[str, float], seed: int):
        self.rates, self.seed = rates, seed

    def __call__(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            rate = self.rates.get(item["dataset"], 1.0)
            if rate >= 1.0 or subset_fraction(self.seed, item["key"]) < rate:
                yield item
