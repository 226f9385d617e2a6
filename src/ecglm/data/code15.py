"""CODE-15% (Ribeiro et al., Zenodo record 4916206) as label-set questions about each exam.

The layout as published: one folder with ``exams.csv`` and the parts ``exams_part{0..17}.hdf5``,
each holding ``tracings`` (exams, 4096, 12) at 400 Hz and ``exam_id`` (one per row; a part ends
with a row of zeros). ``exams.csv`` has one row per exam: ``exam_id``, ``age``, ``is_male``,
``nn_predicted_age``, the six abnormality labels ``1dAVb``, ``RBBB``, ``LBBB``, ``SB``, ``ST``,
``AF`` (``True`` / ``False``), ``patient_id``, ``death``, ``timey``, ``normal_ecg`` and
``trace_file`` (the part that holds the exam). Parts may be missing (CODE-15% is downloaded part by
part): their exams are skipped and counted in the manifest.

Each exam becomes one sample: its tracing with the zero padding trimmed
(:func:`ecglm.readers.trim_zero_padding`, as the HDF5 reader does), resampled from 400 Hz with
:func:`scipy.signal.resample_poly` and cut or padded to the encoder's input (12 x 2500 at 250 Hz by
default; :mod:`ecglm.data.preprocess`), with questions written from :data:`TEMPLATES` about its six
labels: which of the six it shows (``single-query``, answered with the list of findings or
``none``) and one yes / no question per label (``single-verify``). Answers are lists, as ECG-QA's.
Splits are by patient: a hash of ``patient_id`` puts all of a patient's exams in one split.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.data.preprocess import PreprocessConfig, preprocess
from ecglm.data.source import PATIENT_SPLIT_RATIOS, ShardSource, SourceRecord, files_fingerprint
from ecglm.data.splits import hash_uniform
from ecglm.errors import EcglmError
from ecglm.readers.hdf5 import CODE15_LEADS, CODE15_RATE, HDF5Reader, trim_zero_padding

log = logging.getLogger(__name__)

DATASET = "code15"
EXAMS_CSV = "exams.csv"
#: The six abnormality columns of ``exams.csv`` and how the questions name them.
LABELS = {
    "1dAVb": "first degree AV block",
    "RBBB": "right bundle branch block",
    "LBBB": "left bundle branch block",
    "SB": "sinus bradycardia",
    "ST": "sinus tachycardia",
    "AF": "atrial fibrillation",
}
REQUIRED_COLUMNS = ("exam_id", "patient_id", "trace_file", *LABELS)
NONE_ANSWER = "none"
#: The question templates of each question type; ``{options}`` is the six findings, ``{label}`` one.
#: One template per question is chosen by a hash of the exam id, so the shards are deterministic.
TEMPLATES: dict[str, list[str]] = {
    "single-query": [
        "Which of the following findings does this ECG show: {options}?",
        "Among {options}, which are present in this ECG?",
        "List the findings of this ECG among {options}.",
    ],
    "single-verify": [
        "Does this ECG show {label}?",
        "Is there {label} in this ECG?",
        "Does this ECG show signs of {label}?",
    ],
}
_TRUE, _FALSE = {"true", "1", "1.0", "yes"}, {"false", "0", "0.0", "no"}


class CODE15Error(EcglmError, ValueError):
    """A CODE-15% folder that is not in the published layout, naming the file, row and column."""


def _flag(value: str, table: Path, where: str, column: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CODE15Error(
        f"{table}: {where} has {column}={value!r}; expected True or False (CODE-15%'s exams.csv): "
        "correct the row or remove it"
    )


class CODE15LabelQA(ShardSource):
    """Builder of CODE-15% label-set QA shards (``{split}-NNNNNN.tar``) from its HDF5 parts and ``exams.csv``.

    Args:
        root: The folder with ``exams.csv`` and the ``exams_partN.hdf5`` files.
        question_types: Which of :data:`TEMPLATES`' question types to write for each exam.
        templates: Question templates by type, replacing :data:`TEMPLATES` (``{options}`` / ``{label}``).
        split_ratios: Train / val / test shares of patients.
        sampling_rate, seconds, normalization, window: Preprocessing
            (:class:`~ecglm.data.preprocess.PreprocessConfig`); 250 Hz x 10 s is the encoders' input.
        limit: Read only the first ``limit`` rows of ``exams.csv`` (a quick subset); ``None``: all.
        max_samples_per_shard: A shard is closed at this many samples; ``None``: no limit.
        shard_size_mb: A shard is closed once it reaches this many MB; ``None``: no limit.
    """

    dataset = DATASET
    version = 1
    question_types = tuple(TEMPLATES)

    def __init__(
        self,
        root: str | Path,
        question_types: tuple[str, ...] = tuple(TEMPLATES),
        templates: dict[str, list[str]] | None = None,
        split_ratios: tuple[float, float, float] = PATIENT_SPLIT_RATIOS,
        sampling_rate: int = 250,
        seconds: float = 10.0,
        normalization: str = "zscore",
        window: str = "first",
        limit: int | None = None,
        max_samples_per_shard: int | None = 1000,
        shard_size_mb: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.templates = {kind: list(texts) for kind, texts in (templates or TEMPLATES).items()}
        self.question_types = tuple(question_types)
        self.split_ratios = tuple(split_ratios)
        self.limit = limit
        self.max_samples_per_shard, self.shard_size_mb = max_samples_per_shard, shard_size_mb
        self.config = PreprocessConfig(
            sampling_rate=sampling_rate,
            num_samples=round(sampling_rate * seconds),
            normalization=normalization,
            window=window,
        )
        #: Exams not written, by reason (``part_not_found:<file>``, ``no_trace_file``, ...).
        self.skipped: Counter[str] = Counter()
        #: Exams whose signal could not be used, by reason (:class:`~ecglm.data.preprocess.Preprocessed`).
        self.dropped: Counter[str] = Counter()
        self._parts: dict[str, tuple[Any, np.ndarray, np.ndarray] | None] = {}
        self._validate()

    def _validate(self) -> None:
        unknown = [kind for kind in self.question_types if kind not in self.templates]
        if unknown or not self.question_types:
            raise CODE15Error(
                f"question_types {list(self.question_types)}: each must be one of the templates' types "
                f"{sorted(self.templates)}"
            )
        for kind, texts in self.templates.items():
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise CODE15Error(f"templates[{kind!r}] must be a non-empty list of question texts")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or sum(self.split_ratios) <= 0:
            raise CODE15Error(
                f"split_ratios must be three shares >= 0 (train, val, test), got {self.split_ratios}"
            )
        if self.limit is not None and self.limit < 1:
            raise CODE15Error(f"limit must be >= 1 (or None), got {self.limit}")
        if self.max_samples_per_shard is None and self.shard_size_mb is None:
            raise CODE15Error("give max_samples_per_shard, shard_size_mb or both (a shard needs a limit)")

    @property
    def table(self) -> Path:
        return self.root / EXAMS_CSV

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def params(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "question_types": list(self.question_types),
            "templates": {kind: self.templates[kind] for kind in self.question_types},
            "split_ratios": list(self.split_ratios),
            "limit": self.limit,
            "max_samples_per_shard": self.max_samples_per_shard,
            "shard_size_mb": self.shard_size_mb,
            "preprocessing": self.config.manifest_entry(),
        }

    def inputs_fingerprint(self) -> str:
        return files_fingerprint(
            [self.table, *sorted(self.root.glob("*.hdf5")), *sorted(self.root.glob("*.h5"))]
        )

    def records(self) -> Iterator[SourceRecord]:
        """The rows of ``exams.csv`` in file order, one at a time; ``location`` is the part file."""
        if not self.table.is_file():
            raise CODE15Error(
                f"CODE-15% table {self.table} not found: give root the folder holding exams.csv and the "
                "exams_partN.hdf5 files (Zenodo record 4916206)"
            )
        with open(self.table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise CODE15Error(
                    f"{self.table} has no column(s) {missing}; CODE-15%'s exams.csv has "
                    f"{', '.join(REQUIRED_COLUMNS)} (and age, is_male, ...)"
                )
            for number, row in enumerate(reader, start=2):  # line 1 is the header
                if self.limit is not None and number - 2 >= self.limit:
                    return
                yield self._record(row, number)

    def _record(self, row: Mapping[str, str], number: int) -> SourceRecord:
        try:
            exam_id, patient_id = int(float(row["exam_id"])), int(float(row["patient_id"]))
        except ValueError:
            raise CODE15Error(
                f"{self.table}: line {number} has exam_id {row['exam_id']!r} / patient_id "
                f"{row['patient_id']!r}; both must be whole numbers"
            ) from None
        where = f"line {number} (exam_id {exam_id})"
        labels = {name: _flag(row[name], self.table, where, name) for name in LABELS}
        return SourceRecord(exam_id, patient_id, location=(row["trace_file"] or "").strip(), labels=labels)

    def items(self, record: SourceRecord) -> list[dict[str, Any]]:
        """The questions about ``record``'s six labels, one template each (chosen by a hash of the exam)."""
        present = [LABELS[name] for name in LABELS if record.labels[name]]
        options = ", ".join(LABELS.values())
        items = []
        for kind in self.question_types:
            if kind == "single-query":
                question = self._template(kind, record.record_id, "").format(options=options)
                items.append(self._item(question, present or [NONE_ANSWER], kind, sorted(record.labels)))
            else:
                for name, label in LABELS.items():
                    template = self._template(kind, record.record_id, name)
                    question = template.format(label=label, options=options)
                    answer = ["yes" if record.labels[name] else "no"]
                    items.append(self._item(question, answer, kind, [name]))
        return items

    def _template(self, kind: str, exam_id: int, label: str) -> str:
        texts = self.templates[kind]
        return texts[int(hash_uniform(f"{DATASET}:{exam_id}:{kind}:{label}") * len(texts))]

    @staticmethod
    def _item(question: str, answer: list[str], kind: str, columns: list[str]) -> dict[str, Any]:
        return {"question": question, "answer": answer, "question_type": kind, "attribute": columns}

    def signal(self, record: SourceRecord) -> np.ndarray | None:
        part = self._part(record.location)
        if part is None:
            return None
        h5, ids, order = part
        position = np.searchsorted(ids, record.record_id, sorter=order)
        if position >= len(ids) or ids[order[position]] != record.record_id:
            self.skipped["exam_not_in_part"] += 1
            log.warning("%s: exam_id %s is not in %s; skipped", self.table, record.record_id, record.location)
            return None
        raw = np.asarray(h5[HDF5Reader.signals][int(order[position])], dtype=np.float64)
        name = f"{self.root / record.location}#{record.record_id}"
        done = preprocess(trim_zero_padding(raw), CODE15_LEADS, CODE15_RATE, name, self.config)
        if done.dropped:
            self.dropped[done.drop_reason] += 1
            log.warning("dropped %s (%s): %s", name, done.drop_reason, done.detail)
            return None
        return done.windows

    def _part(self, trace_file: str) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """The open part file, its ``exam_id`` and their sort order (kept open while a split is written)."""
        if trace_file not in self._parts:
            self._parts[trace_file] = self._open_part(trace_file)
        if self._parts[trace_file] is None:
            self.skipped[f"part_not_found:{trace_file}" if trace_file else "no_trace_file"] += 1
        return self._parts[trace_file]

    def _open_part(self, trace_file: str) -> tuple[Any, np.ndarray, np.ndarray] | None:
        import h5py

        path = self.root / trace_file
        if not trace_file or not path.is_file():
            log.warning("%s: %s not found; its exams are skipped", self.table, path)
            return None
        try:
            h5 = h5py.File(path, "r")
        except OSError as err:
            raise CODE15Error(f"{path}: not a readable HDF5 file ({err}); download the part again") from err
        if HDF5Reader.signals not in h5 or HDF5Reader.ids not in h5:
            h5.close()
            raise CODE15Error(f"{path}: expected datasets 'tracings' and 'exam_id' (the CODE-15% layout)")
        shape = h5[HDF5Reader.signals].shape
        if len(shape) != 3 or shape[2] != len(CODE15_LEADS):
            h5.close()
            raise CODE15Error(f"{path}: tracings has shape {shape}, not (exams, samples, 12)")
        ids = np.asarray(h5[HDF5Reader.ids], dtype=np.int64)
        return h5, ids, np.argsort(ids, kind="stable")

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        """:meth:`ShardSource.samples`, with the part files open while ``split`` is written."""
        try:
            yield from super().samples(split)
        finally:
            for part in self._parts.values():
                if part is not None:
                    with contextlib.suppress(Exception):
                        part[0].close()
            self._parts.clear()

    def _start_build(self) -> None:
        self.skipped.clear()
        self.dropped.clear()

    def manifest_extras(self) -> dict[str, Any]:
        return {
            "preprocessing": self.config.manifest_entry(),
            "labels": dict(LABELS),
            "skipped": dict(sorted(self.skipped.items())),
            "dropped": dict(sorted(self.dropped.items())),
        }
