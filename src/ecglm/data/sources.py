"""Readers for the real ECG sources in their PhysioNet / GitHub layouts: PTB-XL, MIMIC-IV-ECG, ECG-QA, PULSE.

They read metadata only (CSV and JSON); signals are read later, one record at a time, by
:func:`ecglm.data.preprocess.preprocess_record` from the paths found here. ``docs/data.md``
describes each layout and the split policy:

- PTB-XL by ``strat_fold`` (1-8 train, 9 val, 10 test), the dataset's recommendation; its folds
  keep every patient in one fold, so splits are patient-disjoint by construction.
- MIMIC-IV-ECG by patient: a hash of ``subject_id`` places all of a patient's ECGs in one split
  (80 / 10 / 10 by default).
- ECG-QA by its own split folders (``valid`` is ``val``).
- PULSE ECG-Instruct by the split of the ECG it refers to (the rules above).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ijson

SPLITS = ("train", "val", "test")
PTBXL, MIMIC = "ptbxl", "mimic-iv-ecg"  # ECG-QA's folder names for the two signal sources
ECGQA_SPLITS = {"train": "train", "valid": "val", "test": "test"}
ECGQA_VARIANTS = ("paraphrased", "template")
MIMIC_SPLIT_RATIOS = (0.8, 0.1, 0.1)
MIMIC_REPORT_COLUMNS = tuple(f"report_{i}" for i in range(18))
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ECGRecord:
    """One signal record: where its WFDB files are and what is known about it."""

    source: str  # PTBXL or MIMIC
    record_id: int  # PTB-XL ecg_id or MIMIC-IV-ECG study_id (what ECG-QA's ecg_id holds)
    patient_id: int
    path: Path  # WFDB record path without extension
    split: str
    report: str = ""
    labels: dict[str, float] = field(default_factory=dict)  # PTB-XL scp_codes (likelihood %)

    @property
    def name(self) -> str:
        """A readable unique name, e.g. ``ptbxl/00001`` or ``mimic-iv-ecg/40689238``."""
        return f"{self.source}/{self.record_id:05d}"


def ptbxl_split(strat_fold: int) -> str:
    """PTB-XL's recommended split: folds 1-8 train, 9 validation, 10 test."""
    if not 1 <= strat_fold <= 10:
        raise ValueError(f"PTB-XL strat_fold must be in 1..10, got {strat_fold}")
    return "train" if strat_fold <= 8 else "val" if strat_fold == 9 else "test"


def ptbxl_record_path(ecg_id: int) -> str:
    """``records500/{1000 * (ecg_id // 1000):05d}/{ecg_id:05d}_hr`` (the 500 Hz record)."""
    return f"records500/{1000 * (ecg_id // 1000):05d}/{ecg_id:05d}_hr"


def iter_ptbxl(root: str | Path) -> Iterator[ECGRecord]:
    """PTB-XL's ``ptbxl_database.csv`` as records of the 500 Hz signals, one row at a time."""
    root = Path(root)
    table = root / "ptbxl_database.csv"
    if not table.is_file():
        raise FileNotFoundError(f"PTB-XL table {table} not found (expected the PhysioNet 1.0.3 layout)")
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ecg_id = int(row["ecg_id"])
            try:
                labels = ast.literal_eval(row["scp_codes"]) if row.get("scp_codes") else {}
            except (ValueError, SyntaxError) as error:
                raise ValueError(
                    f"{table}: ecg_id {ecg_id} has invalid scp_codes {row['scp_codes']!r}"
                ) from error
            yield ECGRecord(
                source=PTBXL,
                record_id=ecg_id,
                patient_id=int(float(row["patient_id"])),
                path=root / (row.get("filename_hr") or ptbxl_record_path(ecg_id)),
                split=ptbxl_split(int(row["strat_fold"])),
                report=row.get("report", ""),
                labels={str(k): float(v) for k, v in labels.items()},
            )


def read_ptbxl(root: str | Path) -> dict[int, ECGRecord]:
    """:func:`iter_ptbxl` as a dict by ``ecg_id`` (a later row with the same id wins)."""
    return {record.record_id: record for record in iter_ptbxl(root)}


def mimic_split(subject_id: int, ratios: tuple[float, float, float] = MIMIC_SPLIT_RATIOS) -> str:
    """The split of a MIMIC-IV-ECG patient, fixed by a hash of ``subject_id`` (not by row order)."""
    digest = hashlib.blake2b(f"mimic-iv-ecg:{subject_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    total = sum(ratios)
    return "train" if u < ratios[0] / total else "val" if u < (ratios[0] + ratios[1]) / total else "test"


def _mimic_reports(root: Path) -> dict[int, str]:
    table = root / "machine_measurements.csv"
    if not table.is_file():
        return {}
    reports = {}
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            lines = [row[c].strip() for c in MIMIC_REPORT_COLUMNS if (row.get(c) or "").strip()]
            reports[int(row["study_id"])] = "; ".join(lines)
    return reports


def iter_mimic(
    root: str | Path, ratios: tuple[float, float, float] = MIMIC_SPLIT_RATIOS, reports: bool = True
) -> Iterator[ECGRecord]:
    """MIMIC-IV-ECG's ``record_list.csv``, one row at a time.

    With ``reports``, ``machine_measurements.csv`` (when present) is read first into a dict of
    report text by ``study_id`` (about 800K strings for the full dataset); the shard builder, which
    stores no reports, passes ``reports=False`` and keeps nothing per record in memory.
    """
    root = Path(root)
    table = root / "record_list.csv"
    if not table.is_file():
        raise FileNotFoundError(f"MIMIC-IV-ECG table {table} not found (expected the PhysioNet 1.0 layout)")
    texts = _mimic_reports(root) if reports else {}
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            study_id, subject_id = int(row["study_id"]), int(row["subject_id"])
            yield ECGRecord(
                source=MIMIC,
                record_id=study_id,
                patient_id=subject_id,
                path=root / row["path"],
                split=mimic_split(subject_id, ratios),
                report=texts.get(study_id, ""),
            )


def read_mimic(
    root: str | Path, ratios: tuple[float, float, float] = MIMIC_SPLIT_RATIOS
) -> dict[int, ECGRecord]:
    """:func:`iter_mimic` (with machine reports) as a dict by ``study_id``."""
    return {record.record_id: record for record in iter_mimic(root, ratios)}


def read_ecgqa(root: str | Path, source: str, variant: str = "paraphrased") -> Iterator[tuple[str, dict]]:
    """``(split, sample)`` for every ECG-QA sample of ``source`` (``ptbxl`` / ``mimic-iv-ecg``).

    Files are read in sorted order from ``root/{source}/{variant}/{train,valid,test}/*.json``.
    """
    if source not in (PTBXL, MIMIC) or variant not in ECGQA_VARIANTS:
        raise ValueError(f"ECG-QA source must be {PTBXL!r} or {MIMIC!r} and variant one of {ECGQA_VARIANTS}")
    folder = Path(root) / source / variant
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ECG-QA folder {folder} not found (expected ecgqa/<source>/<variant>/<split>)"
        )
    for name, split in ECGQA_SPLITS.items():
        for path in sorted((folder / name).glob("*.json")):
            samples = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(samples, list):
                raise ValueError(f"{path} must hold a JSON list of ECG-QA samples")
            for sample in samples:
                yield split, sample


def ecgqa_pair(sample: dict) -> dict[str, Any]:
    """The QA pair of an ECG-QA sample as stored in a shard (answer kept as ECG-QA's list)."""
    return {
        "question": sample["question"],
        "answer": list(sample["answer"]),
        "question_type": sample["question_type"],
        "attribute_type": sample.get("attribute_type"),
        "template_id": sample.get("template_id"),
        "sample_id": sample.get("sample_id"),
    }


_MIMIC_IMAGE = re.compile(r"^(\d+)(?:-\d+)?\.\w+$")
_PTBXL_IMAGE = re.compile(r"^(\d+)_")


def pulse_image_record(image: str) -> tuple[str, int] | None:
    """``(source, record_id)`` of a PULSE image path, or ``None`` for sources without signals here.

    ``mimic_v4/.../40689238-0.png`` is MIMIC-IV-ECG study 40689238; ``ptb-xl/00001_hr-0.png`` (any
    folder below ``ptb-xl``) is PTB-XL ecg_id 1.
    """
    parts = Path(image).parts
    if not parts:
        return None
    top, base = parts[0].lower(), parts[-1]
    if top.startswith("mimic") and (match := _MIMIC_IMAGE.match(base)):
        return MIMIC, int(match.group(1))
    if top.replace("-", "").replace("_", "").startswith("ptbxl") and (match := _PTBXL_IMAGE.match(base)):
        return PTBXL, int(match.group(1))
    return None


def pulse_conversation(turns: list[dict]) -> list[dict[str, str]]:
    """Human/gpt turns as ``[{"question", "answer"}, ...]``, the ``<image>`` placeholder removed."""
    pairs, question = [], None
    for turn in turns:
        text = str(turn.get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
        if turn.get("from") == "human":
            question = text
        elif turn.get("from") == "gpt" and question is not None:
            pairs.append({"question": question, "answer": text})
            question = None
    return [p for p in pairs if p["question"] and p["answer"]]


@dataclass
class PulseSample:
    source: str
    record_id: int
    image: str
    conversation: list[dict[str, str]]


def read_pulse(path: str | Path, skipped: Counter | None = None) -> Iterator[PulseSample]:
    """PULSE ``ECGInstruct.json`` samples whose image maps to a PTB-XL or MIMIC-IV-ECG record.

    The file (about 1 GB) is parsed incrementally with ``ijson``, one list item at a time. The
    others are counted in ``skipped`` by reason: ``pulse_no_signal_source:<top folder>`` (CODE-15,
    images without raw signals) or ``pulse_no_conversation`` (no complete human/gpt turn).
    """
    skipped = Counter() if skipped is None else skipped
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4096).lstrip()[:1] != b"[":
            raise ValueError(f"{path} must hold a JSON list of ECG-Instruct samples")
        f.seek(0)
        try:
            for index, item in enumerate(ijson.items(f, "item", use_float=True)):
                if not isinstance(item, dict):
                    raise ValueError(f"{path}: item {index} is a {type(item).__name__}, not an object")
                if (sample := _pulse_sample(item, skipped)) is not None:
                    yield sample
        except ijson.JSONError as error:
            raise ValueError(f"{path}: invalid JSON ({error})") from error


def _pulse_sample(item: dict, skipped: Counter) -> PulseSample | None:
    image = str(item.get("image", ""))
    target = pulse_image_record(image)
    if target is None:
        top = Path(image).parts[0] if Path(image).parts else "none"
        skipped[f"pulse_no_signal_source:{top}"] += 1
        return None
    conversation = pulse_conversation(item.get("conversations", []))
    if not conversation:
        skipped["pulse_no_conversation"] += 1
        return None
    return PulseSample(target[0], target[1], image, conversation)
