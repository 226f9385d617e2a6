"""The shuffled-ECG control: every question answered with the ECG of another record.

A zeroed signal is out of distribution, so a model can fail on it by format rather than by content
(the quickstart answers nothing at all from it). Answering each question with a real ECG of another
record of the same dataset keeps the input in distribution and changes only its content: the gap
between the real ECG and this control is what the model reads from the signal.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from ecglm.uncertainty import record_of


class ECGDonors:
    """Hands each QA item the ECG(s) of other records of its dataset, drawn reproducibly.

    Lives in the generation collator, once per loader worker: it keeps, per dataset, the ECGs of the
    last ``pool_records`` records it has seen (the current batch's added first, so a batch of several
    records needs no history), and draws from them with a generator seeded by ``seed``. An item
    takes as many donor ECGs as it has ECGs (a comparison question two, from two records), never
    from its own record. Where the same question has been seen about other records (ECG-QA asks
    each template question about many ECGs), a record whose answer to it differs is preferred: the
    control then carries the wrong content for that very question, not just another ECG. Where its
    dataset has no other record yet (a stream whose first batch holds one record), a record of
    another dataset is used; where there is none at all, the item keeps its own ECG and its donor is
    ``None`` (counted in the report, not hidden).

    Records are named by the QA key's record part (``"<record>_qa<i>"``).
    """

    def __init__(self, seed: int = 0, pool_records: int = 256):
        if pool_records < 2:
            raise ValueError(f"pool_records must be at least 2 to draw another record; got {pool_records}")
        self.seed = seed
        self.pool_records = pool_records
        self._rng = np.random.default_rng(seed)
        self._pool: dict[str, OrderedDict[str, np.ndarray]] = {}
        # (dataset, question) -> {record: its answer}, for records still in the pool.
        self._answers: dict[tuple[str, str], dict[str, Any]] = {}

    def _remember(self, dataset: str, record: str, ecgs: np.ndarray) -> None:
        pool = self._pool.setdefault(dataset, OrderedDict())
        pool[record] = ecgs[0]  # one ECG per record: a comparison item's first
        pool.move_to_end(record)
        while len(pool) > self.pool_records:
            pool.popitem(last=False)

    def _draw(
        self, dataset: str, own: str, count: int, question: str | None = None, answer: Any = None
    ) -> list[tuple[str, np.ndarray]] | None:
        pool = self._pool.get(dataset, {})
        known = self._answers.get((dataset, question or ""), {})
        differing = [(r, pool[r]) for r, a in known.items() if r != own and r in pool and a != answer]
        if len(differing) >= count:  # another record whose answer to this question differs
            picks = self._rng.choice(len(differing), size=count, replace=False)
            return [differing[int(i)] for i in picks]
        for source in (dataset, None):  # the item's dataset first, then any other
            candidates = [
                (record, ecg)
                for name, pool in self._pool.items()
                if (name == dataset) == (source is not None)
                for record, ecg in pool.items()
                if record != own
            ]
            if len(candidates) >= count:
                picks = self._rng.choice(len(candidates), size=count, replace=False)
                return [candidates[int(i)] for i in picks]
        return None

    def __call__(self, items: list[dict[str, Any]]) -> tuple[np.ndarray, list[str | None]]:
        """Donor ECGs for ``items`` in their row order (stacked as the batch's ``ecg``), and each
        item's donor record(s) (``"a+b"`` for two; ``None`` where the item kept its own ECG)."""
        ecgs = [np.asarray(it["ecg"]) for it in items]
        ecgs = [e[None] if e.ndim == 2 else e for e in ecgs]
        for item, ecg in zip(items, ecgs, strict=True):
            dataset, record = item.get("dataset", "unknown"), record_of(item["key"])
            self._remember(dataset, record, ecg)
            if item.get("question"):
                self._answers.setdefault((dataset, item["question"]), {})[record] = _answer_key(
                    item.get("answer")
                )
        out, donors = [], []
        for item, ecg in zip(items, ecgs, strict=True):
            drawn = self._draw(
                item.get("dataset", "unknown"),
                record_of(item["key"]),
                len(ecg),
                item.get("question"),
                _answer_key(item.get("answer")),
            )
            if drawn is None:
                out.append(ecg)
                donors.append(None)
                continue
            out.append(np.stack([e for _, e in drawn]).astype(ecg.dtype))
            donors.append("+".join(record for record, _ in drawn))
        return np.concatenate(out), donors


def _answer_key(answer: Any) -> Any:
    """An answer comparable with another: a label set regardless of order and case, or the text."""
    if isinstance(answer, list | tuple):
        return frozenset(str(a).strip().lower() for a in answer)
    return str(answer).strip().lower()
