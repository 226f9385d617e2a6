"""Shard-building throughput and peak memory of ECGQAMixture as the number of QA pairs grows.

Writes PTB-XL-layout inputs for each size: ``ptbxl_database.csv`` (the real columns) and ECG-QA's
``ecgqa/ptbxl/paraphrased/{train,valid,test}/*.json`` with ``--qa-per-ecg`` single-ECG questions per
ECG and a comparison question for every ``--comparison-every``-th ECG. To keep disk and time small,
the CSV rows point (``filename_hr``) to a pool of ``--pool`` real WFDB records (500 Hz, 5000
samples, PTB-XL's lead names and gain) written once; the builder still reads and preprocesses each
row's record. Every build runs in a fresh process, which reports its own peak RSS and that of its
pool workers. Run:

    .venv/bin/python benchmarks/shard_build.py [--qa 10000 100000] [--workers 0 2] [--keep DIR]
    .venv/bin/python benchmarks/shard_build.py --index-only --qa 100000 1900000 --qa-per-ecg 2

``--index-only`` times the metadata side at full-mixture sizes without touching a signal: read the
tables and ECG-QA, build the SQLite index and read every group back in shard order (no shards).

The point to read off: peak memory does not grow with the number of QA pairs (the builder keeps its
record tables and QA grouping in a SQLite file, not in RAM); throughput is bound by reading and
resampling records (``wfdb.rdrecord``, ``scipy.signal.resample_poly``).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ecglm.data.sources import PTBXL_COLUMNS, PTBXL_LEADS

ECGQA_FOLDERS = {"train": "train", "val": "valid", "test": "test"}
SAMPLES_PER_JSON = 5000  # ECG-QA splits each folder into numbered files
QUESTIONS = [
    ("single-verify", "Does this ECG show first degree av block?", ["no"]),
    ("single-verify", "Is there evidence of non-diagnostic t abnormalities on this ECG?", ["yes"]),
    ("single-query", "What kind of conduction disturbance does this ECG show?", ["none"]),
    ("single-query", "Which diagnostic superclasses does this ECG show?", ["normal ecg"]),
    ("single-choose", "Which noise does this ECG show, baseline drift or static noise?", ["none"]),
]


def write_pool(root: Path, size: int) -> list[str]:
    """``size`` 10 s, 500 Hz, 12-lead format-16 WFDB records (gain 1000/mV); their ``filename_hr``."""
    import wfdb

    folder = root / "records500" / "pool"
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(5000) / 500
    names = []
    for k in range(size):
        rng = np.random.default_rng(k)
        phases = rng.uniform(0, 2 * np.pi, (12, 1))
        x = (rng.uniform(0.2, 1.0, (12, 1)) * np.sin(2 * np.pi * 1.2 * t + phases)).T
        wfdb.wrsamp(
            f"{k:05d}_hr",
            fs=500,
            units=["mV"] * 12,
            sig_name=list(PTBXL_LEADS),
            p_signal=x + 0.01 * rng.standard_normal(x.shape),
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(folder),
        )
        names.append(f"records500/pool/{k:05d}_hr")
    return names


def split_of(fold: int) -> str:
    return "train" if fold <= 8 else "val" if fold == 9 else "test"


def write_inputs(root: Path, num_qa: int, qa_per_ecg: int, comparison_every: int, pool: list[str]) -> None:
    """``ptbxl_database.csv`` and ECG-QA JSON for about ``num_qa`` QA pairs."""
    num_ecgs = max(1, num_qa // qa_per_ecg)
    folds = {ecg_id: 1 + (ecg_id // 2) % 10 for ecg_id in range(1, num_ecgs + 1)}  # 2 ECGs per patient
    with open(root / "ptbxl_database.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PTBXL_COLUMNS, restval="")
        writer.writeheader()
        for ecg_id, fold in folds.items():
            writer.writerow(
                {
                    "ecg_id": ecg_id,
                    "patient_id": f"{ecg_id // 2}.0",
                    "age": 56.0,
                    "report": "sinusrhythmus normales ekg",
                    "scp_codes": "{'NORM': 100.0, 'SR': 0.0}",
                    "strat_fold": fold,
                    "filename_lr": pool[ecg_id % len(pool)].replace("500", "100").replace("_hr", "_lr"),
                    "filename_hr": pool[ecg_id % len(pool)],
                }
            )
    files = {
        split: _JsonParts(root / "ecgqa" / "ptbxl" / "paraphrased" / name)
        for split, name in ECGQA_FOLDERS.items()
    }
    previous: dict[str, int] = {}
    for ecg_id, fold in folds.items():
        split = split_of(fold)
        for j in range(qa_per_ecg):
            files[split].add(*QUESTIONS[(ecg_id + j) % len(QUESTIONS)], [ecg_id])
        if ecg_id % comparison_every == 0 and split in previous:
            question = "Does this ECG show inferior myocardial infarction compared to the previous ECG?"
            files[split].add("comparison_consecutive-verify", question, ["no"], [previous[split], ecg_id])
        previous[split] = ecg_id
    for parts in files.values():
        parts.flush()


class _JsonParts:
    """ECG-QA's numbered JSON lists in one split folder, written as they fill (not held in memory)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.items, self.count, self.part = folder, [], 0, 0

    def add(self, qtype: str, question: str, answer: list[str], ecg_id: list[int]) -> None:
        self.items.append(_qa(self.count, qtype, question, answer, ecg_id))
        self.count += 1
        if len(self.items) == SAMPLES_PER_JSON:
            self.flush()

    def flush(self) -> None:
        if self.items:
            text = json.dumps(self.items, indent=4)
            (self.folder / f"{self.part:05d}.json").write_text(text, encoding="utf-8")
            self.items, self.part = [], self.part + 1


def _qa(index: int, qtype: str, question: str, answer: list[str], ecg_id: list[int]) -> dict:
    return {
        "template_id": 1 + index % 40,
        "question_id": index % 70,
        "sample_id": index,
        "question_type": qtype,
        "attribute_type": "scp_code",
        "question": question,
        "answer": answer,
        "ecg_id": ecg_id,
        "attribute": None,
    }


def child(inputs: Path, out: Path, workers: int, index_only: bool) -> None:
    """One build in this (fresh) process; prints its figures as one JSON line."""
    from ecglm.data.mixture import INDEX_NAME, ECGQAMixture

    rss_before = _status_mb("VmRSS")
    index, index_peak = out / INDEX_NAME, [0]
    done = threading.Event()

    def watch() -> None:  # the SQLite file's largest size, sampled
        while not done.wait(0.05):
            if index.is_file():
                index_peak[0] = max(index_peak[0], index.stat().st_size)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    builder = ECGQAMixture(
        ptbxl_root=inputs,
        ecgqa_root=inputs / "ecgqa",
        ecgqa_sources=("ptbxl",),
        num_workers=workers,
    )
    started = time.perf_counter()
    manifest = index_groups(builder, out) if index_only else builder.build(out)
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    splits = manifest["splits"].values()
    shards = [s for info in splits for s in info["shards"] + info["comparison"]["shards"]]
    figures = {
        "wall_s": wall,
        # window="first": a record is read once per single-ECG sample and twice per comparison sample
        "num_records": sum(info["num_ecgs"] + 2 * info["comparison"]["num_ecgs"] for info in splits),
        "num_qa": sum(info["num_qa"] + info["comparison"]["num_qa"] for info in splits),
        "num_shards": len(shards),
        "shard_bytes": sum(s["bytes"] for s in shards),
        "rss_before_mb": rss_before,
        # VmHWM, not RUSAGE_SELF: after exec, ru_maxrss still counts the parent's RSS at fork time.
        # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN: the largest reaped pool worker.
        "peak_rss_mb": _status_mb("VmHWM"),
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "index_peak_mb": index_peak[0] / 1e6,
    }
    print(json.dumps(figures))


def index_groups(builder, out: Path) -> dict:
    """What build() does before and around preprocessing: the index, and every group read back."""
    from collections import Counter

    from ecglm.data.mixture import INDEX_NAME, _QAIndex
    from ecglm.data.splits import SPLITS

    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    with _QAIndex(out / INDEX_NAME) as index:
        builder._index_records(index)
        builder._index_qa(index, Counter())
        for split in SPLITS:
            counts = {}
            for pair in (False, True):
                counts[pair] = {"num_ecgs": 0, "num_qa": 0, "shards": []}
                for dataset in index.datasets(split, pair):
                    for group in index.groups(split, dataset, pair):  # streamed, as build() does
                        counts[pair]["num_ecgs"] += 1
                        counts[pair]["num_qa"] += len(group.qa)
                        index.add_patients(split, group.records)
            splits[split] = {**counts[False], "comparison": counts[True]}
        index.patient_overlap("train", "test")
    return {"splits": splits}


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(inputs: Path, out: Path, workers: int, index_only: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(inputs), str(out), "--workers", str(workers)]
    command += ["--index-only"] if index_only else []
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"build of {inputs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qa", type=int, nargs="+", default=[10_000, 100_000], help="QA pairs per build")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="builder num_workers")
    parser.add_argument("--qa-per-ecg", type=int, default=8)
    parser.add_argument("--comparison-every", type=int, default=20, help="a comparison question per N ECGs")
    parser.add_argument("--pool", type=int, default=16, help="distinct WFDB records on disk")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write inputs and shards here (else a tempdir)"
    )
    parser.add_argument("--index-only", action="store_true", help="metadata and index only, no signals")
    parser.add_argument("--child", nargs=2, type=Path, metavar=("INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.workers[0], args.index_only)
        return

    workers = [0] if args.index_only else args.workers  # no signals, no pool
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        header = (
            f"{'QA pairs':>9} {'records':>7} {'workers':>7} {'wall s':>7} {'rec/s':>6} {'QA/s':>6} "
            f"{'RSS import MiB':>14} {'peak RSS MiB':>12} {'worker RSS MiB':>14} {'index MB':>8} "
            f"{'shards':>6} {'shard MB':>8} {'KB/QA':>6}"
        )
        print(header)
        for num_qa in args.qa:
            inputs = work / f"inputs-{num_qa}"
            inputs.mkdir(parents=True, exist_ok=True)
            write_inputs(
                inputs, num_qa, args.qa_per_ecg, args.comparison_every, write_pool(inputs, args.pool)
            )
            for num_workers in workers:
                out = work / f"shards-{num_qa}-w{num_workers}"
                r = run_child(inputs, out, num_workers, args.index_only)
                worker_rss = f"{r['worker_peak_rss_mb']:.0f}" if num_workers else "-"
                print(
                    f"{r['num_qa']:>9} {r['num_records']:>7} {num_workers:>7} {r['wall_s']:>7.1f} "
                    f"{r['num_records'] / r['wall_s']:>6.0f} {r['num_qa'] / r['wall_s']:>6.0f} "
                    f"{r['rss_before_mb']:>14.0f} {r['peak_rss_mb']:>12.0f} {worker_rss:>14} "
                    f"{r['index_peak_mb']:>8.1f} {r['num_shards']:>6} {r['shard_bytes'] / 1e6:>8.0f} "
                    f"{r['shard_bytes'] / r['num_qa'] / 1e3:>6.1f}",
                    flush=True,
                )
                if args.keep is None:
                    shutil.rmtree(out)  # the next build's disk


if __name__ == "__main__":
    main()
