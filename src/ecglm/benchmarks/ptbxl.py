"""PTB-XL's diagnostic superclasses from the signal: the task of the PTB-XL benchmark (Strodthoff et al.,
"Deep learning for ECG analysis: benchmarks and insights from PTB-XL", 2021), asked of an ECG-language
model as a label-set question and scored as ECGBench's multi-label subsets are (macro AUROC from label
scores, F1, Hamming loss; :mod:`ecglm.benchmarks.scoring`).

The data is PTB-XL 1.0.3 as PhysioNet distributes it: ``ptbxl_database.csv`` (read by
:func:`ecglm.data.sources.iter_ptbxl`), ``scp_statements.csv`` and the WFDB records. The gold set of a
record is the ``diagnostic_class`` of each of its SCP codes that ``scp_statements.csv`` marks
``diagnostic`` (whatever the code's likelihood, as the benchmark's ``compute_label_aggregations``
does); records without any diagnostic code are left out, as the benchmark leaves them out. The test
set is the recommended fold 10 (fold 9 validates).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ecglm.benchmarks.ecgbench import BenchmarkError, Subset
from ecglm.benchmarks.signals import SignalItem

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
#: The one subset of the ``ptbxl`` suite: scored as ECGBench's ``ptb-test`` (the same task from images).
SUPERCLASS = Subset("ptbxl-superclass", "labels", SUPERCLASSES)
SUBSETS = {SUPERCLASS.name: SUPERCLASS}
QUESTION = (
    "Which diagnostic superclasses does this ECG show? Options: NORM (normal), MI (myocardial "
    "infarction), STTC (ST/T change), CD (conduction disturbance), HYP (hypertrophy)."
)
#: PTB-XL's recommended folds: 9 validation, 10 test.
FOLDS = {"val": 9, "test": 10}


def diagnostic_classes(data: str | Path) -> dict[str, str]:
    """SCP code -> diagnostic superclass, for the codes ``scp_statements.csv`` marks diagnostic."""
    path = Path(data) / "scp_statements.csv"
    if not path.is_file():
        raise BenchmarkError(
            f"{path}: no such file; --data is PTB-XL 1.0.3 as PhysioNet distributes it "
            "(ptbxl_database.csv, scp_statements.csv, records500/)"
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("diagnostic", "diagnostic_class") if c not in columns]
        if missing or not columns:
            raise BenchmarkError(
                f"{path}: no column(s) {missing}; expected PTB-XL 1.0.3's scp_statements.csv"
            )
        code = columns[0]  # the unnamed index column holds the SCP code
        out = {}
        for row in reader:
            if (row["diagnostic"] or "").strip() in ("1", "1.0") and row["diagnostic_class"].strip():
                out[row[code].strip()] = row["diagnostic_class"].strip()
    return out


def read_superclass_items(
    data: str | Path, split: str = "test", question: str = QUESTION
) -> list[SignalItem]:
    """The records of ``split``'s fold with at least one diagnostic superclass, in ``ecg_id`` order."""
    from ecglm.data.sources import iter_ptbxl

    if split not in FOLDS:
        raise BenchmarkError(f"split {split!r}: PTB-XL's recommended folds are {FOLDS}")
    root = Path(data)
    classes = diagnostic_classes(root)
    items = []
    try:
        records = sorted((r for r in iter_ptbxl(root) if r.split == split), key=lambda r: r.record_id)
    except (FileNotFoundError, ValueError) as err:
        raise BenchmarkError(str(err)) from None
    for record in records:
        gold = {classes[code] for code in record.labels if code in classes}
        if gold:
            ordered = [c for c in SUPERCLASSES if c in gold] + sorted(gold - set(SUPERCLASSES))
            relative = record.path.relative_to(root) if record.path.is_relative_to(root) else record.path
            items.append(SignalItem(str(record.record_id), (str(relative),), question, ", ".join(ordered)))
    if not items:
        raise BenchmarkError(f"{root}: no record of fold {FOLDS[split]} has a diagnostic superclass")
    return items
