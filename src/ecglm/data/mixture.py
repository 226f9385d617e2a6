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
building (:class:`ecglm.data.mixture_index.QAIndex`), not in Python dicts: the full mixture has ~800K
records and ~1.9M QA pairs, and the builder's memory should not grow with them. That grouping (QA pairs
about two ECGs, PULSE conversations about records of either source) is why the mixture keeps a build of
its own rather than :class:`~ecglm.data.source.ShardSource`'s; its records, items and split rule are
the source's (entry point ``ecgqa-mixture`` of ``ecglm.sources``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from itertools import combinations, dropwhile, islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.data.mixture_index import Group, QAIndex
from ecglm.data.preprocess import (
    MissingLeadError,
    PreprocessConfig,
    Preprocessed,
    _renamed_normalisation,
    preprocess_task,
)
from ecglm.data.shards import (
    MANIFEST_NAME,
    check_build,
    last_sample,
    refuse_foreign_shards,
    repair_shards,
    shards_built,
    write_manifest,
    write_shards,
)
from ecglm.data.source import ShardSource, files_fingerprint
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


class ECGQAMixture(ShardSource):
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

    dataset = DATASET
    version = VERSION

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
        return files_fingerprint(self._metadata_files())

    def is_built(self, out_dir: str | Path) -> bool:
        """True when ``out_dir`` holds a manifest of these params and inputs with intact shards (sha256)."""
        return shards_built(
            out_dir, params=self.params, version=VERSION, inputs_fingerprint=self.inputs_fingerprint()
        )

    def build(self, out_dir: str | Path) -> dict[str, Any]:
        """Write train/val/test shards and ``manifest.json`` to ``out_dir``, unless already built."""
        out_dir = Path(out_dir)
        expected = {
            "params": self.params,
            "version": VERSION,
            "inputs_fingerprint": self.inputs_fingerprint(),
        }
        built, damage = check_build(out_dir, **expected)
        if built is not None and not damage:
            log.info("%s already built in %s", DATASET, out_dir)
            return built
        if built is not None and self._repair(out_dir, built, damage):
            return built
        refuse_foreign_shards(out_dir, DATASET)
        started = time.perf_counter()
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        dropped_qa: Counter = Counter()
        dropped: Counter = Counter()
        dropped_records: dict[str, dict[str, str]] = {}
        splits = {}
        # The pool forks before the index is opened, so workers inherit no SQLite connection.
        with self._pool() as pool, QAIndex(out_dir / INDEX_NAME) as index:
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

    def _repair(self, out_dir: Path, manifest: dict[str, Any], damage: dict[str, str]) -> bool:
        """Write the damaged shards again alone (:func:`repair_shards`). The record tables and QA pairs are
        indexed again (metadata only); a shard's samples resume after the last sample of the intact
        shard before it, so only the damaged shards' own records are preprocessed."""
        with self._pool() as pool, QAIndex(out_dir / INDEX_NAME) as index:
            self._index_records(index)
            self._index_qa(index, Counter())

            def run_samples(prefix: str, start: int, previous: Path | None) -> Iterator[dict]:
                split, _, rest = prefix.partition("-")
                pair = rest.startswith("comparison-")
                dataset = rest.removeprefix("comparison-") if pair else rest
                state = _SplitState(split, index, Counter(), {}, Counter())
                state.start()
                last = last_sample(previous) if previous is not None else None
                return self._samples(pool, index, state, dataset, pair, last)

            return repair_shards(out_dir, manifest, damage, run_samples, DATASET)

    def records(self) -> Iterator[ECGRecord]:
        """PTB-XL's and MIMIC-IV-ECG's records (of the roots given), each with its split: PTB-XL's
        ``strat_fold`` rule, MIMIC-IV-ECG's hash of ``subject_id`` (:mod:`ecglm.data.sources`)."""
        if self.ptbxl_root:
            yield from iter_ptbxl(self.ptbxl_root)
        if self.mimic_root:
            yield from iter_mimic(self.mimic_root, self.mimic_split_ratios, reports=False)

    def items(self, record: ECGRecord) -> list[dict[str, Any]]:
        """The ECG-QA pairs about ``record`` alone and the first turn of each PULSE conversation about it,
        by one pass over the QA files: for a look at one record (the build groups every item at once)."""
        items = []
        if record.source in self.ecgqa_sources:
            for _, sample in read_ecgqa(self.ecgqa_root, record.source, self.ecgqa_variant):
                if [int(i) for i in sample["ecg_id"]] == [record.record_id]:
                    items.append(ecgqa_pair(sample))
        if self.pulse_json:
            for sample in read_pulse(self.pulse_json):
                if (sample.source, sample.record_id) == (record.source, record.record_id):
                    items.append({**sample.conversation[0], "question_type": PULSE_QUESTION_TYPE})
        return items

    def _index_records(self, index: QAIndex) -> None:
        index.add_records(self.records())

    def _index_qa(self, index: QAIndex, dropped_qa: Counter) -> None:
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
            # The split is the record's, filled in from the record table (QAIndex.finish_items).
            yield PULSE_DATASET, None, item.source, item.record_id, None, True, json.dumps(item.conversation)

    def _pool(self):
        if self.num_workers == 0:
            return nullcontext(None)
        # fork starts workers in milliseconds; spawn re-imports the caller's __main__ (torch, Lightning:
        # seconds per worker). The workers run only numpy, scipy and wfdb, nothing that fork breaks.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        return get_context(method).Pool(self.num_workers)

    def _write_shard_set(self, out_dir: Path, pool, index: QAIndex, state: _SplitState, pair: bool) -> dict:
        """The single-ECG (or comparison) shards of one split: one run of shards per dataset."""
        summary = state.start()
        shards = []
        for dataset in index.datasets(state.split, pair):
            prefix = f"{state.split}-comparison-{dataset}" if pair else f"{state.split}-{dataset}"
            samples = self._samples(pool, index, state, dataset, pair)
            shards += write_shards(samples, out_dir, prefix, self.max_samples_per_shard, self.shard_size_mb)
        return {**summary.finish(), "shards": shards}

    def _samples(
        self,
        pool,
        index: QAIndex,
        state: _SplitState,
        dataset: str,
        pair: bool,
        after: tuple[str, dict] | None = None,
    ) -> Iterator[dict]:
        """Shard samples of one dataset in one split: ECGs by id, windows in time order; with ``after``
        (a sample's key and json), those after that sample only, preprocessing no record before it."""
        groups = index.groups(state.split, dataset, pair)
        total = index.num_records(state.split, dataset, pair) if self.progress else None
        rest_of_group = False
        if after is not None:
            key, meta = after
            target = key if pair else key.rpartition("_w")[0]  # a window's key ends in _w<index>
            groups = dropwhile(lambda g: _group_key(dataset, g) != target, groups)
            rest_of_group = not pair and meta.get("window", 0) + 1 < meta.get("num_windows", 1)
            if not rest_of_group:
                groups = islice(groups, 1, None)  # ``after`` ends its group
        samples = (
            sample
            for group, windows in self._with_signals(pool, state, dataset, groups, total)
            for sample in self._make_samples(state, dataset, group, windows)
        )
        if rest_of_group:  # the later windows of the record that ``after`` is a window of
            samples = islice(dropwhile(lambda s: s["__key__"] != after[0], samples), 1, None)
        yield from samples

    def _with_signals(
        self, pool, state: _SplitState, dataset: str, groups: Iterator[Group], total: int | None
    ) -> Iterator[tuple[Group, list[np.ndarray]]]:
        """``(group, windows)`` in the order of ``groups``, without groups that lost a record.

        Groups are read from the index as the pool asks for work, so only the look-ahead is in memory.
        """
        waiting: deque[Group] = deque()

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
        self, state: _SplitState, dataset: str, group: Group, windows: list[np.ndarray]
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
            key = _group_key(dataset, group)
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
            key = f"{_group_key(dataset, group)}_w{index}"
            yield {"__key__": key, "ecg.npy": window, "json": meta}

    def _progress(self, iterable: Iterable, total: int | None, desc: str) -> Iterator:
        if not self.progress:
            return iter(iterable)
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, unit="rec"))


def _group_key(dataset: str, group: Group) -> str:
    """The key of a comparison group's sample; for one ECG, what its windows' keys start with."""
    if group.pair:
        first, second = group.records
        return f"{dataset}_{first.record_id:08d}_{second.record_id:08d}"
    (record,) = group.records
    return f"{dataset}_{record.source}_{record.record_id:08d}"


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
