"""What a data set must provide to become ecglm shards: :class:`ShardSource`, the base class of the
``ecglm.sources`` entry-point group.

A source names its records (each with an id and a patient id), the QA or label items about each
record, and its split rule; :meth:`ShardSource.build` writes them as the deterministic WebDataset
shards and ``manifest.json`` every ecglm data set has (:mod:`ecglm.data.shards`), reuses a build of
the same params whose shards are intact, and writes a damaged shard again alone. A simple source (one
ECG per record, items from its own labels: :class:`~ecglm.data.code15.CODE15LabelQA`) implements
:meth:`~ShardSource.records`, :meth:`~ShardSource.items`, :meth:`~ShardSource.signal` and
:attr:`~ShardSource.params`; a source with other needs overrides :meth:`~ShardSource.samples` (the
synthetic set, image shards) or :meth:`~ShardSource.build` itself (the ECG-QA mixture, which groups
QA pairs about two ECGs in a SQLite index). ``docs/data.md`` walks through one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ecglm.data.shards import (
    MANIFEST_NAME,
    check_build,
    refuse_foreign_shards,
    repair_shards,
    write_manifest,
    write_shards,
)
from ecglm.data.splits import SPLITS, hash_uniform
from ecglm.ecg import LEADS

log = logging.getLogger(__name__)

#: Train / val / test shares of patients for a source without a split of its own.
PATIENT_SPLIT_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class SourceRecord:
    """One record of a source: its id (unique in the source), its patient's id, and where its signal is.

    ``split`` is set when the data set fixes it (a published split); ``None`` leaves it to the
    source's :meth:`ShardSource.split_of` (by patient). ``labels`` is what the items are made from.
    """

    record_id: str | int
    patient_id: str | int
    location: Any = None
    split: str | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)


def patient_split(name: str, patient_id: str | int, ratios: tuple[float, float, float]) -> str:
    """The split of a patient of data set ``name``, fixed by a hash of ``name:patient_id`` (not by row
    order), so that all of a patient's records land in one split."""
    u = hash_uniform(f"{name}:{patient_id}")
    total = sum(ratios)
    return "train" if u < ratios[0] / total else "val" if u < (ratios[0] + ratios[1]) / total else "test"


def files_fingerprint(paths: Iterable[Path]) -> str:
    """A digest of the files' names, sizes and modification times (not their contents)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat() if path.is_file() else None
        digest.update(f"{path}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()


class ShardSource(ABC):
    """A data set as train / val / test WebDataset shards with a ``manifest.json``.

    Required: :attr:`dataset` (a class attribute: the name a manifest and each sample's JSON record),
    :attr:`params` (what the shards depend on), :meth:`records` and :meth:`items`; and :meth:`signal`
    and ``sampling_rate`` (the stored ECGs' rate) unless :meth:`samples` is overridden. Optional:
    :attr:`version`, :attr:`question_types`, :meth:`split_of` (default: by patient,
    :data:`PATIENT_SPLIT_RATIOS`), :meth:`inputs_fingerprint`, :meth:`manifest_extras`,
    :meth:`samples`, :meth:`build`.

    A source is built from typed ``__init__`` arguments (a recipe's ``builder.init_args``), and its
    samples must depend only on them and the input files, so that a build is byte-identical to the
    last one and a damaged shard can be written again alone.
    """

    #: The data set's name (manifest ``dataset``, each sample's ``json["dataset"]``, shard keys).
    dataset: ClassVar[str]
    #: Raised when the shards change for the same params, so that older builds are rebuilt.
    version: ClassVar[int] = 1
    #: The question types of its items, listed in each split's summary.
    question_types: tuple[str, ...] = ()
    #: Share of patients per split for :meth:`split_of`'s default rule.
    split_ratios: tuple[float, float, float] = PATIENT_SPLIT_RATIOS
    #: A shard is closed at this many samples, or at this many MB (10**6 bytes); ``None``: no limit.
    max_samples_per_shard: int | None = 1000
    shard_size_mb: float | None = None

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The arguments the shards depend on (the manifest's ``params``: other params, another build)."""

    @abstractmethod
    def records(self) -> Iterator[Any]:
        """Every record, in a fixed order: :class:`SourceRecord` or any object with ``record_id`` and
        ``patient_id`` (and ``split`` where the data set fixes it)."""

    @abstractmethod
    def items(self, record: Any) -> list[dict[str, Any]]:
        """The QA or label items about ``record``: dicts with ``question``, ``answer`` and ``question_type``
        (an empty list: the record is not written)."""

    def split_of(self, record: Any) -> str:
        """The split of ``record``: its own ``split`` when set, else by a hash of its patient id."""
        split = getattr(record, "split", None)
        if split is not None:
            return split
        return patient_split(self.dataset, record.patient_id, self.split_ratios)

    def signal(self, record: Any) -> np.ndarray | None:
        """The windows of ``record``'s ECG, ``(windows, 12, num_samples)``, or ``None`` to drop it (a source
        counts why, for its manifest). Needed by the default :meth:`samples` only."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement signal(record), or override samples(split)"
        )

    def inputs_fingerprint(self) -> str | None:
        """A digest of the input files (:func:`files_fingerprint`), recorded in the manifest so that a
        build from changed inputs is built anew; ``None``: the params say it all."""
        return None

    def manifest_extras(self) -> dict[str, Any]:
        """Entries of the manifest beside ``dataset``, ``params``, ``version`` and ``splits`` (its
        ``preprocessing``, what was dropped), known once every split is written."""
        return {}

    def key(self, record: Any) -> str:
        """The ``__key__`` of ``record``'s samples (before ``_w<window>``): no dots."""
        return f"{self.dataset}_{record.record_id}".replace(".", "_")

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        """The shard samples of ``split``, in record order: one per window of each record that has items
        and a signal. Its JSON has the record's ids, split, window, rate, leads and items (``qa``)."""
        for record in self.records():
            if self.split_of(record) != split:
                continue
            items = self.items(record)
            if not items:
                continue
            windows = self.signal(record)
            if windows is None:
                continue
            for index, window in enumerate(windows):
                meta = {
                    "dataset": self.dataset,
                    "record_id": record.record_id,
                    "patient_id": record.patient_id,
                    "split": split,
                    "window": index,
                    "num_windows": len(windows),
                    "sampling_rate": self.sampling_rate,
                    "leads": list(LEADS),
                    "qa": items,
                }
                yield {"__key__": f"{self.key(record)}_w{index}", "ecg.npy": window, "json": meta}

    def _expected(self) -> dict[str, Any]:
        expected = {"params": self.params, "version": self.version}
        fingerprint = self.inputs_fingerprint()
        return expected if fingerprint is None else {**expected, "inputs_fingerprint": fingerprint}

    def is_built(self, out_dir: str | Path) -> bool:
        """True when ``out_dir`` holds a manifest of these params (and inputs) with intact shards (sha256)."""
        built, damage = check_build(out_dir, **self._expected())
        return built is not None and not damage

    def _run_samples(self, split: str, start: int, previous: Path | None) -> Iterable[dict[str, Any]]:
        """Samples ``start, start + 1, ...`` of ``split`` (a run of shards is a split), for writing a
        damaged shard again (:func:`~ecglm.data.shards.repair_shards`)."""
        return islice(self.samples(split), start, None)

    def _split_summary(self, shards: list[dict[str, Any]]) -> dict[str, Any]:
        num_qa = sum(shard["num_qa"] for shard in shards)
        return {
            "num_ecgs": sum(shard["num_samples"] for shard in shards),
            "num_qa": num_qa,
            "datasets": {self.dataset: num_qa},
            "question_types": sorted(self.question_types),
            "shards": shards,
        }

    def _start_build(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Reset what a build counts (called before the first split is written)."""

    def build(self, out_dir: str | Path) -> dict[str, Any]:
        """Write train / val / test shards (``{split}-NNNNNN.tar``) and ``manifest.json`` to ``out_dir``,
        unless built there with these params; damaged shards of such a build are written again alone."""
        out_dir = Path(out_dir)
        expected = self._expected()
        built, damage = check_build(out_dir, **expected)
        if built is not None and not damage:
            log.info("%s already built in %s", self.dataset, out_dir)
            return built
        if built is not None and repair_shards(out_dir, built, damage, self._run_samples, self.dataset):
            return built
        refuse_foreign_shards(out_dir, self.dataset)
        started = time.perf_counter()
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._start_build()
        splits = {}
        for split in SPLITS:
            for stale in out_dir.glob(f"{split}-??????.tar*"):
                stale.unlink()
            samples = self.samples(split)
            shards = write_shards(samples, out_dir, split, self.max_samples_per_shard, self.shard_size_mb)
            splits[split] = self._split_summary(shards)
        manifest = {"dataset": self.dataset, **expected, "splits": splits, **self.manifest_extras()}
        write_manifest(out_dir, manifest)
        log.info("built %s in %s in %.1f s", self.dataset, out_dir, time.perf_counter() - started)
        return manifest
