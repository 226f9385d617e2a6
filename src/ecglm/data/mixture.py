"""ECGQAMixture: ECG-QA (PTB-XL, MIMIC-IV-ECG) and PULSE ECG-Instruct as one set of WebDataset shards.

A shard sample is one ECG window with every QA pair of one dataset that refers to it; the
DataModule expands the pairs while streaming (:func:`ecglm.data.datamodule.expand_qa`). The same
ECG used by two datasets (ECG-QA and PULSE) is stored once per dataset, since a sample names one
dataset. Comparison questions (two ECGs) go to their own shards, ``{split}-comparison-*.tar``, whose
``ecg.npy`` stacks both ECGs as ``(2, 12, num_samples)``; the manifest lists them under
``splits[split]["comparison"]`` and the single-ECG DataModule does not read them. ``docs/data.md``
describes the sample and manifest formats.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import combinations
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.data.preprocess import (
    LEADS,
    MissingLeadError,
    PreprocessConfig,
    Preprocessed,
    preprocess_task,
)
from ecglm.data.shards import MANIFEST_NAME, read_manifest, shards_intact, write_manifest, write_shards
from ecglm.data.sources import (
    MIMIC,
    MIMIC_SPLIT_RATIOS,
    PTBXL,
    SPLITS,
    ECGRecord,
    ecgqa_pair,
    read_ecgqa,
    read_mimic,
    read_ptbxl,
    read_pulse,
)

log = logging.getLogger(__name__)

VERSION = 1
DATASET = "ecgqa-mixture"
ECGQA_DATASETS = {PTBXL: "ecgqa-ptbxl", MIMIC: "ecgqa-mimic-iv-ecg"}
PULSE_DATASET = "pulse-ecg-instruct"
PULSE_QUESTION_TYPE = "instruct"
MISSING_LEADS = ("error", "drop", "zero")


class _Group:
    """Everything one dataset asks about one ECG (or one pair of ECGs) in one split."""

    __slots__ = ("conversations", "qa")

    def __init__(self) -> None:
        self.qa: list[dict[str, Any]] = []
        self.conversations: list[list[dict[str, str]]] = []


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
        sampling_rate, seconds, normalisation, window, max_gap, max_nan_fraction: Preprocessing
            (:class:`~ecglm.data.preprocess.PreprocessConfig`).
        missing_leads: ``error`` (raise, naming the record), ``drop`` (count) or ``zero`` (zero-fill).
        mimic_split_ratios: Train / val / test shares of MIMIC patients (PULSE's MIMIC records).
        max_samples_per_shard: ECG samples per tar shard.
        num_workers: Processes that preprocess signals (0: in this process).
        progress: Show a progress bar per split.
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
        normalisation: str = "zscore",
        window: str = "first",
        max_gap: int = 250,
        max_nan_fraction: float = 0.05,
        missing_leads: str = "error",
        mimic_split_ratios: tuple[float, float, float] = MIMIC_SPLIT_RATIOS,
        max_samples_per_shard: int = 1000,
        num_workers: int = 0,
        progress: bool = False,
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
        self.max_samples_per_shard = max_samples_per_shard
        self.num_workers = num_workers
        self.progress = progress
        self.config = PreprocessConfig(
            sampling_rate=sampling_rate,
            num_samples=round(sampling_rate * seconds),
            normalisation=normalisation,
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
        if self.max_samples_per_shard < 1 or self.num_workers < 0:
            raise ValueError("max_samples_per_shard must be >= 1 and num_workers >= 0")

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
        out_dir = Path(out_dir)
        try:
            manifest = read_manifest(out_dir)
            current = (
                manifest["params"] == self.params
                and manifest["version"] == VERSION
                and manifest["inputs_fingerprint"] == self.inputs_fingerprint()
            )
            shards = [s for info in manifest["splits"].values() for s in _all_shards(info)]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return current and shards_intact(out_dir, shards)

    def build(self, out_dir: str | Path) -> dict[str, Any]:
        """Write train/val/test shards and ``manifest.json`` to ``out_dir``, unless already built."""
        out_dir = Path(out_dir)
        if self.is_built(out_dir):
            log.info("%s already built in %s", DATASET, out_dir)
            return read_manifest(out_dir)
        started = time.perf_counter()
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        records = self._records()
        dropped_qa: Counter = Counter()
        single, pairs = self._collect(records, dropped_qa)
        dropped: Counter = Counter()
        dropped_records: dict[str, dict[str, str]] = {}
        patients: dict[str, set[str]] = {split: set() for split in SPLITS}
        splits = {}
        with self._pool() as pool:
            for split in SPLITS:
                for stale in out_dir.glob(f"{split}-*.tar*"):
                    stale.unlink()
                state = _SplitState(split, dropped, dropped_records, dropped_qa, patients[split])
                splits[split] = self._write_split(out_dir, pool, state, records, single, write_pairs=False)
                if self.include_comparison:
                    splits[split]["comparison"] = self._write_split(
                        out_dir, pool, state, records, pairs, write_pairs=True
                    )
        manifest = {
            "dataset": DATASET,
            "version": VERSION,
            "params": self.params,
            "inputs_fingerprint": self.inputs_fingerprint(),
            "splits": splits,
            "preprocessing": self.config.manifest_entry(),
            "dropped": dict(sorted(dropped.items())),
            "dropped_qa": dict(sorted(dropped_qa.items())),
            "dropped_records": dict(sorted(dropped_records.items())),
            "patient_overlap": {
                f"{a}-{b}": len(patients[a] & patients[b]) for a, b in combinations(SPLITS, 2)
            },
        }
        write_manifest(out_dir, manifest)
        log.info("built %s in %s in %.1f s", DATASET, out_dir, time.perf_counter() - started)
        return manifest

    def _records(self) -> dict[str, dict[int, ECGRecord]]:
        records = {}
        if self.ptbxl_root:
            records[PTBXL] = read_ptbxl(self.ptbxl_root)
        if self.mimic_root:
            records[MIMIC] = read_mimic(self.mimic_root, self.mimic_split_ratios)
        return records

    def _collect(
        self, records: dict[str, dict[int, ECGRecord]], dropped_qa: Counter
    ) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], dict]]:
        """QA grouped by (dataset, split) then by ECG id (single) or id pair (comparison)."""
        single: dict[tuple[str, str], dict[Any, _Group]] = defaultdict(lambda: defaultdict(_Group))
        pairs: dict[tuple[str, str], dict[Any, _Group]] = defaultdict(lambda: defaultdict(_Group))
        for source in self.ecgqa_sources:
            dataset = ECGQA_DATASETS[source]
            for split, sample in read_ecgqa(self.ecgqa_root, source, self.ecgqa_variant):
                ids = tuple((source, int(i)) for i in sample["ecg_id"])
                if any(i not in records[source] for _, i in ids):
                    dropped_qa["unknown_ecg_id"] += 1
                elif len(ids) == 1:
                    single[dataset, split][ids[0]].qa.append(ecgqa_pair(sample))
                elif len(ids) == 2 and self.include_comparison:
                    pairs[dataset, split][ids].qa.append(ecgqa_pair(sample))
                else:
                    dropped_qa["comparison_excluded" if len(ids) == 2 else "bad_ecg_id"] += 1
        if self.pulse_json:
            skipped: Counter = Counter()
            for item in read_pulse(self.pulse_json, skipped):
                record = records.get(item.source, {}).get(item.record_id)
                if record is None:
                    reason = "unknown_record" if item.source in records else f"source_not_given:{item.source}"
                    dropped_qa[f"pulse_{reason}"] += 1
                    continue
                key = (item.source, item.record_id)
                single[PULSE_DATASET, record.split][key].conversations.append(item.conversation)
            dropped_qa.update(skipped)
        return single, pairs

    def _pool(self):
        if self.num_workers == 0:
            return nullcontext(None)
        # fork starts workers in milliseconds; spawn re-imports the caller's __main__ (torch, Lightning:
        # seconds per worker). The workers run only numpy, scipy and wfdb, nothing that fork breaks.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        return get_context(method).Pool(self.num_workers)

    def _write_split(self, out_dir, pool, state, records, groups, write_pairs: bool) -> dict[str, Any]:
        prefix = f"{state.split}-comparison" if write_pairs else state.split
        samples = self._samples(pool, state, records, groups, write_pairs)
        summary = state.start()
        shards = write_shards(samples, out_dir, prefix, self.max_samples_per_shard)
        return {**summary.finish(), "shards": shards}

    def _samples(self, pool, state, records, groups, write_pairs: bool) -> Iterator[dict[str, Any]]:
        """Shard samples of one split: datasets in sorted order, ECGs by id, windows in time order."""
        for dataset, split in sorted(k for k in groups if k[1] == state.split):
            entries = sorted(groups[dataset, split].items())
            signals = self._with_signals(pool, state, records, dataset, entries, write_pairs)
            for ids, group, windows in signals:
                yield from self._make_samples(state, records, dataset, ids, group, windows, write_pairs)

    def _with_signals(self, pool, state, records, dataset, entries, write_pairs):
        """``(ids, group, windows)`` in the order of ``entries``, without groups that lost a record."""
        tasks = []
        for ids, _ in entries:
            for source, record_id in ids if write_pairs else (ids,):
                record = records[source][record_id]
                tasks.append((str(record.path), record.name, self.config))
        results = _imap(pool, tasks, ahead=4 * self.num_workers)
        results = self._progress(results, len(tasks), f"{state.split} {dataset}")
        for ids, group in entries:
            parts = [next(results) for _ in (ids if write_pairs else (ids,))]
            bad = [p for p in parts if p.dropped]
            for part in bad:
                self._drop(state, dataset, part)
            if bad:
                state.dropped_qa[f"record_{bad[0].drop_reason}"] += len(group.qa) + len(group.conversations)
                continue
            yield ids, group, [p.windows for p in parts]

    def _drop(self, state, dataset: str, part: Preprocessed) -> None:
        if part.drop_reason == "missing_lead" and self.missing_leads == "error":
            raise MissingLeadError(part.detail)
        if part.record in state.dropped_records:  # an ECG used by several datasets or pairs
            return
        state.dropped[part.drop_reason] += 1
        state.dropped_records[part.record] = {"reason": part.drop_reason, "detail": part.detail}
        log.warning("dropped %s (%s): %s", part.record, part.drop_reason, part.detail)

    def _make_samples(
        self, state, records, dataset, ids, group, windows, write_pairs
    ) -> Iterator[dict[str, Any]]:
        if write_pairs:
            chosen = [records[source][i] for source, i in ids]
            ecg = np.stack([w[0] for w in windows])  # the first window of each record
            meta = {
                "dataset": dataset,
                "ecg_ids": [i for _, i in ids],
                "record_id": "_".join(r.name for r in chosen),
                "patient_ids": [r.patient_id for r in chosen],
                "split": state.split,
                "qa": group.qa,
            }
            key = f"{dataset}_{ids[0][1]:08d}_{ids[1][1]:08d}"
            state.add(meta, [f"{r.source}:{r.patient_id}" for r in chosen])
            yield {"__key__": key, "ecg.npy": ecg, "json": meta}
            return
        record = records[ids[0]][ids[1]]
        windows = windows[0]
        qa = list(group.qa) + [
            {**conversation[0], "question_type": PULSE_QUESTION_TYPE} for conversation in group.conversations
        ]
        for index, window in enumerate(windows):
            meta = {
                "dataset": dataset,
                "source": record.source,
                "record_id": record.name,
                "patient_id": record.patient_id,
                "split": state.split,
                "window": index,
                "num_windows": len(windows),
                "sampling_rate": self.config.sampling_rate,
                "leads": list(LEADS),
                "qa": qa,
            }
            if group.conversations:
                meta["conversations"] = group.conversations
            state.add(meta, [f"{record.source}:{record.patient_id}"])
            key = f"{dataset}_{record.source}_{record.record_id:08d}_w{index}"
            yield {"__key__": key, "ecg.npy": window, "json": meta}

    def _progress(self, iterable, total: int, desc: str):
        if not self.progress:
            return iter(iterable)
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, unit="rec"))


def _all_shards(info: dict[str, Any]) -> list[dict[str, Any]]:
    return info["shards"] + info.get("comparison", {}).get("shards", [])


def _imap(pool, tasks: list, ahead: int, chunk: int = 16) -> Iterator[Preprocessed]:
    """:func:`preprocess_task` over ``tasks`` in order, in chunks, with at most ``ahead`` chunks waiting.

    ``Pool.imap`` has no such bound: with a slower shard writer, finished signals would pile up.
    """
    if pool is None:
        yield from map(preprocess_task, tasks)
        return
    pending: deque = deque()
    for start in range(0, len(tasks), chunk):
        part = tasks[start : start + chunk]
        pending.append(pool.map_async(preprocess_task, part, chunksize=len(part)))
        if len(pending) >= ahead:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


class _SplitState:
    """Counters shared while one split is written; :meth:`start` opens the summary of one shard set."""

    def __init__(self, split, dropped, dropped_records, dropped_qa, patients):
        self.split, self.dropped, self.dropped_records = split, dropped, dropped_records
        self.dropped_qa, self.patients = dropped_qa, patients
        self.summary: _Summary | None = None

    def start(self) -> _Summary:
        self.summary = _Summary()
        return self.summary

    def add(self, meta: dict[str, Any], patients: list[str]) -> None:
        self.summary.add(meta)
        self.patients.update(patients)


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
