"""ECGQAMixture: ECG-QA (PTB-XL, MIMIC-IV-ECG) and PULSE ECG-Instruct as one set of WebDataset shards.

A shard sample is one ECG window with every QA pair of one dataset that refers to it; the
DataModule expands the pairs while streaming (:func:`ecglm.data.datamodule.expand_qa`). The same
ECG used by two datasets (ECG-QA and PULSE) is stored once per dataset, since a sample names one
dataset. Each shard holds one dataset, ``{split}-{dataset}-NNNNNN.tar``, so that the streaming
DataModule can mix datasets by weight shard by shard. Comparison questions (two ECGs) go to their
own shards, ``{split}-comparison-{dataset}-NNNNNN.tar``, whose ``ecg.npy`` stacks both ECGs as
``(2, 12, num_samples)``; the manifest lists them under ``splits[split]["comparison"]``, and the
DataModule streams them with their dataset (``include_comparison``, on by default).
``docs/data.md`` describes the sample and manifest formats.

The record tables and the grouping of QA pairs by ECG live in a SQLite file in ``out_dir`` while
building (:class:`_QAIndex`), not in Python dicts: the full mixture has ~800K records and ~1.9M QA
pairs, and the builder's memory should not grow with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import combinations, groupby, islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.data.preprocess import (
    MissingLeadError,
    PreprocessConfig,
    Preprocessed,
    _renamed_normalisation,
    preprocess_task,
)
from ecglm.data.shards import MANIFEST_NAME, read_manifest, shards_built, write_manifest, write_shards
from ecglm.data.sources import (
    MIMIC,
    MIMIC_SPLIT_RATIOS,
    PTBXL,
    ECGRecord,
    ecgqa_pair,
    iter_mimic,
    iter_ptbxl,
    read_ecgqa,
    read_pulse,
)
from ecglm.data.splits import SPLITS
from ecglm.ecg import LEADS

log = logging.getLogger(__name__)

VERSION = 2  # 2: one dataset per shard ({split}-{dataset}-NNNNNN.tar), shards closed by size in MB
DATASET = "ecgqa-mixture"
ECGQA_DATASETS = {PTBXL: "ecgqa-ptbxl", MIMIC: "ecgqa-mimic-iv-ecg"}
PULSE_DATASET = "pulse-ecg-instruct"
PULSE_QUESTION_TYPE = "instruct"
MISSING_LEADS = ("error", "drop", "zero")
INDEX_NAME = ".index.sqlite"  # in out_dir while building, removed afterwards
#: 0.1's spelling of the ``normalization`` argument, and the key that replaces it (for the warning).
_OLD_NEW_KEY = (
    "ECGQAMixture(normalisation=...) (in a shard config: builder.init_args.normalisation)",
    "normalization",
)


@dataclass
class _Group:
    """Everything one dataset asks about one ECG (or one pair of ECGs) in one split."""

    records: tuple[ECGRecord, ...]  # one, or two for a comparison question
    qa: list[dict[str, Any]]
    conversations: list[list[dict[str, str]]]

    @property
    def pair(self) -> bool:
        return len(self.records) == 2


class ECGQAMixture:
    """Builder of the PTB-XL + MIMIC-IV-ECG (via ECG-QA) + PULSE ECG-Instruct shard set.

    Args:
        ptbxl_root: PTB-XL 1.0.3 folder (``ptbxl_database.csv``, ``records500/``).
        mimic_root: MIMIC-IV-ECG 1.0 folder (``record_list.csv``, ``files/``).
        ecgqa_root: ECG-QA's ``ecgqa/`` folder (``{ptbxl,mimic-iv-ecg}/{paraphrased,template}/...``).
        pulse_json: PULSE's ``ECGInstruct.json``.
        ecgqa_sources: Which ECG-QA parts to include (``ptbxl``, ``mimic-iv-ecg``); each needs its root.
        ecgqa_variant: ``paraphrased`` or ``template`` questions.
        include_comparison: Write comparison (two-ECG) questions to ``{split}-comparison-*.tar``;
            without it they are counted under ``dropped_qa["comparison_excluded"]``.
        sampling_rate, seconds, normalization, window, max_gap, max_nan_fraction: Preprocessing
            (:class:`~ecglm.data.preprocess.PreprocessConfig`).
        normalisation: Deprecated (until 0.3.0): 0.1's spelling of ``normalization``.
        missing_leads: ``error`` (raise, naming the record), ``drop`` (count) or ``zero`` (zero-fill).
        mimic_split_ratios: Train / val / test shares of MIMIC patients (PULSE's MIMIC records).
        shard_size_mb: A shard is closed once it reaches this many MB (10**6 bytes); ``None``: no limit.
        max_samples_per_shard: A shard is closed at this many ECG samples; ``None``: no limit.
        num_workers: Processes that preprocess signals (0: in this process).
        progress: Show a progress bar per split and dataset.
    """

    def __init__(
        self,
        ptbxl_root: str | Path | None = None,
        mimic_root: str | Path | None = None,
        ecgqa_root: str | Path | None = None,
        pulse_json: str | Path | None = None,
        ecgqa_sources: tuple[str, ...] = (PTBXL, MIMIC),
        ecgqa_variant: str = "paraphrased",
        include_comparison: bool = True,
        sampling_rate: int = 250,
        seconds: float = 10.0,
        normalization: str = "zscore",
        window: str = "first",
        max_gap: int = 250,
        max_nan_fraction: float = 0.05,
        missing_leads: str = "error",
        mimic_split_ratios: tuple[float, float, float] = MIMIC_SPLIT_RATIOS,
        shard_size_mb: float | None = 256.0,
        max_samples_per_shard: int | None = None,
        num_workers: int = 0,
        progress: bool = False,
        normalisation: str | None = None,
    ) -> None:
        self.ptbxl_root = Path(ptbxl_root) if ptbxl_root else None
        self.mimic_root = Path(mimic_root) if mimic_root else None
        self.ecgqa_root = Path(ecgqa_root) if ecgqa_root else None
        self.pulse_json = Path(pulse_json) if pulse_json else None
        self.ecgqa_sources = tuple(ecgqa_sources) if self.ecgqa_root else ()
        self.ecgqa_variant = ecgqa_variant
        self.include_comparison = include_comparison
        self.missing_leads = missing_leads
        self.mimic_split_ratios = tuple(mimic_split_ratios)
        self.shard_size_mb = shard_size_mb
        self.max_samples_per_shard = max_samples_per_shard
        self.num_workers = num_workers
        self.progress = progress
        self.config = PreprocessConfig(
            sampling_rate=sampling_rate,
            num_samples=round(sampling_rate * seconds),
            normalization=_renamed_normalisation(normalization, normalisation, *_OLD_NEW_KEY),
            window=window,
            zero_fill_missing=missing_leads == "zero",
            max_gap=max_gap,
            max_nan_fraction=max_nan_fraction,
        )
        self._validate()

    def _validate(self) -> None:
        if self.missing_leads not in MISSING_LEADS:
            raise ValueError(f"missing_leads must be one of {MISSING_LEADS}, got {self.missing_leads!r}")
        roots = {PTBXL: self.ptbxl_root, MIMIC: self.mimic_root}
        for source in self.ecgqa_sources:
            if source not in roots:
                raise ValueError(f"unknown ECG-QA source {source!r}; choose from {sorted(roots)}")
            if roots[source] is None:
                raise ValueError(f"ECG-QA source {source!r} needs its signal root ({source} root not given)")
        if not (self.ecgqa_sources or self.pulse_json):
            raise ValueError("nothing to build: give ecgqa_root (with a signal root) and/or pulse_json")
        if self.shard_size_mb is None and self.max_samples_per_shard is None:
            raise ValueError("give shard_size_mb, max_samples_per_shard or both (a shard needs a limit)")
        if self.shard_size_mb is not None and self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0 (or None), got {self.shard_size_mb}")
        if self.max_samples_per_shard is not None and self.max_samples_per_shard < 1:
            raise ValueError(
                f"max_samples_per_shard must be >= 1 (or None), got {self.max_samples_per_shard}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @property
    def params(self) -> dict[str, Any]:
        paths = {
            "ptbxl_root": self.ptbxl_root,
            "mimic_root": self.mimic_root,
            "ecgqa_root": self.ecgqa_root,
            "pulse_json": self.pulse_json,
        }
        return {
            **{k: str(v) if v else None for k, v in paths.items()},
            "ecgqa_sources": list(self.ecgqa_sources),
            "ecgqa_variant": self.ecgqa_variant,
            "include_comparison": self.include_comparison,
            "missing_leads": self.missing_leads,
            "mimic_split_ratios": list(self.mimic_split_ratios),
            "shard_size_mb": self.shard_size_mb,
            "max_samples_per_shard": self.max_samples_per_shard,
            "preprocessing": self.config.manifest_entry(),
        }

    def _metadata_files(self) -> list[Path]:
        files = []
        if self.ptbxl_root:
            files.append(self.ptbxl_root / "ptbxl_database.csv")
        if self.mimic_root:
            files += [self.mimic_root / "record_list.csv", self.mimic_root / "machine_measurements.csv"]
        for source in self.ecgqa_sources:
            files += sorted((self.ecgqa_root / source / self.ecgqa_variant).glob("*/*.json"))
        if self.pulse_json:
            files.append(self.pulse_json)
        return files

    def inputs_fingerprint(self) -> str:
        """A digest of the metadata files' names, sizes and modification times (not of the signals)."""
        digest = hashlib.sha256()
        for path in self._metadata_files():
            stat = path.stat() if path.is_file() else None
            digest.update(
                f"{path}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}\n".encode()
            )
        return digest.hexdigest()

    def is_built(self, out_dir: str | Path) -> bool:
        """True when ``out_dir`` holds a manifest of these params and inputs with intact shards (sha256)."""
        return shards_built(
            out_dir, params=self.params, version=VERSION, inputs_fingerprint=self.inputs_fingerprint()
        )

    def build(self, out_dir: str | Path) -> dict[str, Any]:
        """Write train/val/test shards and ``manifest.json`` to ``out_dir``, unless already built."""
        out_dir = Path(out_dir)
        if self.is_built(out_dir):
            log.info("%s already built in %s", DATASET, out_dir)
            return read_manifest(out_dir)
        started = time.perf_counter()
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        dropped_qa: Counter = Counter()
        dropped: Counter = Counter()
        dropped_records: dict[str, dict[str, str]] = {}
        splits = {}
        # The pool forks before the index is opened, so workers inherit no SQLite connection.
        with self._pool() as pool, _QAIndex(out_dir / INDEX_NAME) as index:
            self._index_records(index)
            self._index_qa(index, dropped_qa)
            for split in SPLITS:
                for stale in out_dir.glob(f"{split}-*.tar*"):
                    stale.unlink()
                state = _SplitState(split, index, dropped, dropped_records, dropped_qa)
                splits[split] = self._write_shard_set(out_dir, pool, index, state, pair=False)
                if self.include_comparison:
                    splits[split]["comparison"] = self._write_shard_set(
                        out_dir, pool, index, state, pair=True
                    )
            overlap = {f"{a}-{b}": index.patient_overlap(a, b) for a, b in combinations(SPLITS, 2)}
        manifest = {
            "dataset": DATASET,
            "version": VERSION,
            "params": self.params,
            "inputs_fingerprint": self.inputs_fingerprint(),
            "splits": splits,
            "preprocessing": self.config.manifest_entry(),
            "dropped": dict(sorted(dropped.items())),
            "dropped_qa": dict(sorted((reason, n) for reason, n in dropped_qa.items() if n)),
            "dropped_records": dict(sorted(dropped_records.items())),
            "patient_overlap": overlap,
        }
        write_manifest(out_dir, manifest)
        log.info("built %s in %s in %.1f s", DATASET, out_dir, time.perf_counter() - started)
        return manifest

    def _index_records(self, index: _QAIndex) -> None:
        if self.ptbxl_root:
            index.add_records(iter_ptbxl(self.ptbxl_root))
        if self.mimic_root:
            index.add_records(iter_mimic(self.mimic_root, self.mimic_split_ratios, reports=False))

    def _index_qa(self, index: _QAIndex, dropped_qa: Counter) -> None:
        """Every QA pair and conversation into ``index``, those that cannot be written counted instead."""
        odd: list[tuple[str, list[int]]] = []  # neither one nor two ECGs: none in the real ECG-QA
        index.add_items(self._ecgqa_items(odd))
        dropped_qa["unknown_ecg_id"] += index.drop_unknown(ECGQA_DATASETS.values())
        for source, ids in odd:
            known = all(index.has_record(source, i) for i in ids)
            dropped_qa["bad_ecg_id" if known else "unknown_ecg_id"] += 1
        if not self.include_comparison:
            dropped_qa["comparison_excluded"] += index.drop_pairs()
        if self.pulse_json:
            skipped: Counter = Counter()
            index.add_items(self._pulse_items(skipped, dropped_qa))
            dropped_qa["pulse_unknown_record"] += index.drop_unknown([PULSE_DATASET])
            dropped_qa.update(skipped)
        index.finish_items()

    def _ecgqa_items(self, odd: list[tuple[str, list[int]]]) -> Iterator[tuple]:
        for source in self.ecgqa_sources:
            dataset = ECGQA_DATASETS[source]
            for split, sample in read_ecgqa(self.ecgqa_root, source, self.ecgqa_variant):
                ids = [int(i) for i in sample["ecg_id"]]
                if len(ids) not in (1, 2):
                    odd.append((source, ids))
                    continue
                payload = json.dumps(ecgqa_pair(sample))
                yield dataset, split, source, ids[0], ids[1] if len(ids) == 2 else None, False, payload

    def _pulse_items(self, skipped: Counter, dropped_qa: Counter) -> Iterator[tuple]:
        given = {source for source, root in ((PTBXL, self.ptbxl_root), (MIMIC, self.mimic_root)) if root}
        for item in read_pulse(self.pulse_json, skipped):
            if item.source not in given:
                dropped_qa[f"pulse_source_not_given:{item.source}"] += 1
                continue
            # The split is the record's, filled in from the record table (_QAIndex.finish_items).
            yield PULSE_DATASET, None, item.source, item.record_id, None, True, json.dumps(item.conversation)

    def _pool(self):
        if self.num_workers == 0:
            return nullcontext(None)
        # fork starts workers in milliseconds; spawn re-imports the caller's __main__ (torch, Lightning:
        # seconds per worker). The workers run only numpy, scipy and wfdb, nothing that fork breaks.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        return get_context(method).Pool(self.num_workers)

    def _write_shard_set(self, out_dir: Path, pool, index: _QAIndex, state: _SplitState, pair: bool) -> dict:
        """The single-ECG (or comparison) shards of one split: one run of shards per dataset."""
        summary = state.start()
        shards = []
        for dataset in index.datasets(state.split, pair):
            prefix = f"{state.split}-comparison-{dataset}" if pair else f"{state.split}-{dataset}"
            samples = self._samples(pool, index, state, dataset, pair)
            shards += write_shards(samples, out_dir, prefix, self.max_samples_per_shard, self.shard_size_mb)
        return {**summary.finish(), "shards": shards}

    def _samples(self, pool, index: _QAIndex, state: _SplitState, dataset: str, pair: bool) -> Iterator[dict]:
        """Shard samples of one dataset in one split: ECGs by id, windows in time order."""
        groups = index.groups(state.split, dataset, pair)
        total = index.num_records(state.split, dataset, pair) if self.progress else None
        for group, windows in self._with_signals(pool, state, dataset, groups, total):
            yield from self._make_samples(state, dataset, group, windows)

    def _with_signals(
        self, pool, state: _SplitState, dataset: str, groups: Iterator[_Group], total: int | None
    ) -> Iterator[tuple[_Group, list[np.ndarray]]]:
        """``(group, windows)`` in the order of ``groups``, without groups that lost a record.

        Groups are read from the index as the pool asks for work, so only the look-ahead is in memory.
        """
        waiting: deque[_Group] = deque()

        def tasks() -> Iterator[tuple[str, str, PreprocessConfig]]:
            for group in groups:
                waiting.append(group)
                for record in group.records:
                    yield str(record.path), record.name, self.config

        results = _imap(pool, tasks(), ahead=4 * self.num_workers)
        results = self._progress(results, total, f"{state.split} {dataset}")
        for first in results:  # a result exists only once its group's tasks were taken
            group = waiting.popleft()
            parts = [first] + [next(results) for _ in group.records[1:]]
            bad = [p for p in parts if p.dropped]
            for part in bad:
                self._drop(state, part)
            if bad:
                state.dropped_qa[f"record_{bad[0].drop_reason}"] += len(group.qa) + len(group.conversations)
                continue
            yield group, [p.windows for p in parts]

    def _drop(self, state: _SplitState, part: Preprocessed) -> None:
        if part.drop_reason == "missing_lead" and self.missing_leads == "error":
            raise MissingLeadError(part.detail)
        if part.record in state.dropped_records:  # an ECG used by several datasets or pairs
            return
        state.dropped[part.drop_reason] += 1
        state.dropped_records[part.record] = {"reason": part.drop_reason, "detail": part.detail}
        log.warning("dropped %s (%s): %s", part.record, part.drop_reason, part.detail)

    def _make_samples(
        self, state: _SplitState, dataset: str, group: _Group, windows: list[np.ndarray]
    ) -> Iterator[dict[str, Any]]:
        if group.pair:
            first, second = group.records
            meta = {
                "dataset": dataset,
                "ecg_ids": [first.record_id, second.record_id],
                "record_id": f"{first.name}_{second.name}",
                "patient_ids": [first.patient_id, second.patient_id],
                "split": state.split,
                "qa": group.qa,
            }
            state.add(meta, group.records)
            key = f"{dataset}_{first.record_id:08d}_{second.record_id:08d}"
            ecg = np.stack([w[0] for w in windows])  # the first window of each record
            yield {"__key__": key, "ecg.npy": ecg, "json": meta}
            return
        (record,), (record_windows,) = group.records, windows
        qa = group.qa + [
            {**conversation[0], "question_type": PULSE_QUESTION_TYPE} for conversation in group.conversations
        ]
        for index, window in enumerate(record_windows):
            meta = {
                "dataset": dataset,
                "source": record.source,
                "record_id": record.name,
                "patient_id": record.patient_id,
                "split": state.split,
                "window": index,
                "num_windows": len(record_windows),
                "sampling_rate": self.config.sampling_rate,
                "leads": list(LEADS),
                "qa": qa,
            }
            if group.conversations:
                meta["conversations"] = group.conversations
            state.add(meta, group.records)
            key = f"{dataset}_{record.source}_{record.record_id:08d}_w{index}"
            yield {"__key__": key, "ecg.npy": window, "json": meta}

    def _progress(self, iterable: Iterable, total: int | None, desc: str) -> Iterator:
        if not self.progress:
            return iter(iterable)
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, unit="rec"))


_SCHEMA = """
CREATE TABLE records (
    source TEXT NOT NULL, record_id INTEGER NOT NULL, patient_id INTEGER NOT NULL,
    path TEXT NOT NULL, split TEXT NOT NULL, PRIMARY KEY (source, record_id)
) WITHOUT ROWID;
CREATE TABLE items (
    seq INTEGER PRIMARY KEY, dataset TEXT NOT NULL, split TEXT, source TEXT NOT NULL,
    id1 INTEGER NOT NULL, id2 INTEGER, pair INTEGER NOT NULL, conversation INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE patients (
    split TEXT NOT NULL, source TEXT NOT NULL, patient_id INTEGER NOT NULL,
    PRIMARY KEY (split, source, patient_id)
) WITHOUT ROWID;
"""
_MATCHES = "r.source = items.source AND r.record_id = {}"
_UNKNOWN = "NOT EXISTS (SELECT 1 FROM records AS r WHERE {})"
_UNKNOWN_ID1 = _UNKNOWN.format(_MATCHES.format("items.id1"))
_UNKNOWN_ID2 = f"(id2 IS NOT NULL AND {_UNKNOWN.format(_MATCHES.format('items.id2'))})"
_GROUP_ROWS = """
SELECT i.source, i.id1, i.id2, i.conversation, i.payload,
       a.patient_id, a.path, a.split, b.patient_id, b.path, b.split
FROM items AS i
JOIN records AS a ON a.source = i.source AND a.record_id = i.id1
LEFT JOIN records AS b ON b.source = i.source AND b.record_id = i.id2
WHERE i.split = ? AND i.dataset = ? AND i.pair = ?
ORDER BY i.source, i.id1, i.id2, i.conversation, i.seq
"""


class _QAIndex:
    """The record tables and every QA pair / conversation of one build, in a temporary SQLite file.

    ``items`` holds one row per QA pair (ECG-QA) or conversation (PULSE) in the order read, its
    payload as JSON; :meth:`groups` reads them back grouped by ECG (or ECG pair) in sorted order,
    the rows of a group in the order read, so the shards do not depend on how SQLite stores them.
    SQLite's page cache is capped (``cache_size``), so memory stays flat whatever the data size.
    """

    CACHE_KIB = 32 * 1024
    BATCH = 10_000

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)  # left by a build that was killed
        self.path = path
        # Autocommit; bulk loads open their own transactions. No journal, no fsync: the file is
        # scratch space, rebuilt from the sources if a build fails.
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{self.CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self._patients: list[tuple[str, str, int]] = []

    def __enter__(self) -> _QAIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def _insert_many(self, sql: str, rows: Iterable[tuple]) -> None:
        rows = iter(rows)
        while batch := list(islice(rows, self.BATCH)):
            self.db.execute("BEGIN")
            self.db.executemany(sql, batch)
            self.db.execute("COMMIT")

    def add_records(self, records: Iterable[ECGRecord]) -> None:
        # OR REPLACE: a later row with the same id wins, as in read_ptbxl / read_mimic's dicts.
        rows = ((r.source, r.record_id, r.patient_id, str(r.path), r.split) for r in records)
        self._insert_many("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)", rows)

    def add_items(self, items: Iterable[tuple]) -> None:
        """``(dataset, split or None, source, id1, id2 or None, conversation, payload)`` rows."""
        rows = ((d, s, src, a, b, b is not None, c, p) for d, s, src, a, b, c, p in items)
        sql = "INSERT INTO items (dataset, split, source, id1, id2, pair, conversation, payload) VALUES "
        self._insert_many(sql + "(?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def has_record(self, source: str, record_id: int) -> bool:
        query = "SELECT 1 FROM records WHERE source = ? AND record_id = ?"
        return self.db.execute(query, (source, record_id)).fetchone() is not None

    def drop_unknown(self, datasets: Iterable[str]) -> int:
        """Delete the items of ``datasets`` naming a record (either of a pair) not in the tables."""
        datasets = list(datasets)
        where = f"dataset IN ({', '.join('?' * len(datasets))}) AND ({_UNKNOWN_ID1} OR {_UNKNOWN_ID2})"
        return self.db.execute(f"DELETE FROM items WHERE {where}", datasets).rowcount

    def drop_pairs(self) -> int:
        return self.db.execute("DELETE FROM items WHERE pair = 1").rowcount

    def finish_items(self) -> None:
        """Give PULSE items their record's split and index items in the order :meth:`groups` reads."""
        record_split = f"SELECT r.split FROM records AS r WHERE {_MATCHES.format('items.id1')}"
        self.db.execute(f"UPDATE items SET split = ({record_split}) WHERE split IS NULL")
        # seq (the rowid) ends every index entry, so rows of one group come back in insertion order.
        self.db.execute(
            "CREATE INDEX items_by_group ON items (split, dataset, pair, source, id1, id2, conversation)"
        )

    def datasets(self, split: str, pair: bool) -> list[str]:
        query = "SELECT DISTINCT dataset FROM items WHERE split = ? AND pair = ? ORDER BY dataset"
        return [row[0] for row in self.db.execute(query, (split, pair))]

    def num_records(self, split: str, dataset: str, pair: bool) -> int:
        """Records to preprocess for one dataset in one split (for a progress bar)."""
        query = (
            "SELECT count(*) FROM (SELECT DISTINCT source, id1, id2 FROM items"
            " WHERE split = ? AND dataset = ? AND pair = ?)"
        )
        return self.db.execute(query, (split, dataset, pair)).fetchone()[0] * (2 if pair else 1)

    def groups(self, split: str, dataset: str, pair: bool) -> Iterator[_Group]:
        """The groups of one dataset in one split by ``(source, id1, id2)``, read as they are consumed."""
        rows = self.db.execute(_GROUP_ROWS, (split, dataset, pair))
        for _, group_rows in groupby(rows, key=lambda row: row[:3]):
            group_rows = list(group_rows)
            source, id1, id2 = group_rows[0][:3]
            first = group_rows[0][5:]
            records = [ECGRecord(source, id1, first[0], Path(first[1]), first[2])]
            if id2 is not None:
                records.append(ECGRecord(source, id2, first[3], Path(first[4]), first[5]))
            group = _Group(tuple(records), [], [])
            for row in group_rows:
                (group.conversations if row[3] else group.qa).append(json.loads(row[4]))
            yield group

    def add_patients(self, split: str, records: Iterable[ECGRecord]) -> None:
        self._patients += [(split, r.source, r.patient_id) for r in records]
        if len(self._patients) >= self.BATCH:
            self._flush_patients()

    def _flush_patients(self) -> None:
        self.db.executemany("INSERT OR IGNORE INTO patients VALUES (?, ?, ?)", self._patients)
        self._patients = []

    def patient_overlap(self, a: str, b: str) -> int:
        """Patients (per source) with written samples in both splits."""
        self._flush_patients()
        query = (
            "SELECT count(*) FROM patients AS p JOIN patients AS q ON q.split = ?"
            " AND q.source = p.source AND q.patient_id = p.patient_id WHERE p.split = ?"
        )
        return self.db.execute(query, (b, a)).fetchone()[0]


def _imap(pool, tasks: Iterable, ahead: int, chunk: int = 16) -> Iterator[Preprocessed]:
    """:func:`preprocess_task` over ``tasks`` in order, in chunks, with at most ``ahead`` chunks waiting.

    ``Pool.imap`` has no such bound: with a slower shard writer, finished signals would pile up.
    ``tasks`` is consumed lazily, a chunk at a time.
    """
    if pool is None:
        yield from map(preprocess_task, tasks)
        return
    tasks = iter(tasks)
    pending: deque = deque()
    while part := list(islice(tasks, chunk)):
        pending.append(pool.map_async(preprocess_task, part, chunksize=len(part)))
        if len(pending) >= ahead:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


class _SplitState:
    """Counters shared while one split is written; :meth:`start` opens the summary of one shard set."""

    def __init__(self, split, index, dropped, dropped_records, dropped_qa):
        self.split, self.index, self.dropped = split, index, dropped
        self.dropped_records, self.dropped_qa = dropped_records, dropped_qa
        self.summary: _Summary | None = None

    def start(self) -> _Summary:
        self.summary = _Summary()
        return self.summary

    def add(self, meta: dict[str, Any], records: Iterable[ECGRecord]) -> None:
        self.summary.add(meta)
        self.index.add_patients(self.split, records)


class _Summary:
    def __init__(self) -> None:
        self.num_ecgs = 0
        self.num_conversations = 0
        self.datasets: Counter = Counter()
        self.question_types: set[str] = set()

    def add(self, meta: dict[str, Any]) -> None:
        self.num_ecgs += 1
        self.num_conversations += len(meta.get("conversations", ()))
        self.datasets[meta["dataset"]] += len(meta["qa"])
        self.question_types.update(qa["question_type"] for qa in meta["qa"])

    def finish(self) -> dict[str, Any]:
        return {
            "num_ecgs": self.num_ecgs,
            "num_qa": sum(self.datasets.values()),
            "num_conversations": self.num_conversations,
            "datasets": dict(sorted(self.datasets.items())),
            "question_types": sorted(self.question_types),
        }
