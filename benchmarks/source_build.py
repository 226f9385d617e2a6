"""Read rate per ECG format, and shard-build rate and peak memory of a CODE-15%-layout HDF5 source
against the PTB-XL-layout WFDB build, at two sizes.

1. Read rate (records/s) of ``ecglm.records.read_recording`` per format: ``benchmarks/readers.py``'s
   records (12 leads x 10.2 s; WFDB, EDF, .npy, CSV, DICOM, HL7 aECG, HDF5, the plugin's JSON).
2. Build rate (records/s) and the builder's peak RSS, each build in a fresh process:
   - ``CODE15LabelQA`` over ``exams.csv`` and ``exams_partN.hdf5`` parts in the published layout
     (float32 ``tracings`` (rows, 4096, 12), 400 Hz exams of 7.3-10.2 s zero-padded and centred, a
     closing row of zeros; ``--part-size`` exams per part, real CODE-15% has ~20K); 7 questions per exam;
   - ``ECGQAMixture`` over PTB-XL-layout inputs (``benchmarks/shard_build.py``: ``ptbxl_database.csv``
     rows pointing at a pool of real-format 500 Hz WFDB records, ECG-QA JSON), 7 questions per ECG.
   Both write 12 x 2500 windows at 250 Hz, z-scored, float16, into 1000-sample shards.

    nice -n 15 .venv/bin/python benchmarks/source_build.py [--records 1000 10000] [--read-records 50]

Wall-clock rates depend on what else the machine runs; the rates per CPU second (the process's user
+ system time) much less. The point to read off: peak RSS does not grow from 1K to 10K records
(records, labels and signals are streamed; an HDF5 part is read row by row, never whole).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
import shard_build  # noqa: E402 - the PTB-XL-layout writers, beside this script

CODE15_COLUMNS = [
    "exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB", "LBBB", "SB", "ST", "AF",
    "patient_id", "death", "timey", "normal_ecg", "trace_file",
]  # fmt: skip
LABELS = ["1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"]
SOURCES = {"code15": "CODE-15% HDF5", "ptbxl": "PTB-XL WFDB (ECG-QA)"}
QUESTIONS_PER_RECORD = 7  # CODE15LabelQA: one label-set question and six yes / no questions


def write_code15(root: Path, count: int, part_size: int, pool: int = 16) -> None:
    """``exams.csv`` and parts of ``part_size`` exams (a pool of ``pool`` distinct signals, repeated)."""
    import h5py

    rng = np.random.default_rng(0)
    signals = []
    for k in range(pool):
        samples = int(rng.integers(2920, 4081))  # 7.3 to 10.2 s at 400 Hz
        t = np.arange(samples) / 400.0
        lead = np.arange(12)
        x = 0.1 * (lead + 1) + 0.5 * np.sin(2 * np.pi * (1.0 + 0.2 * lead + k % 5) * t[:, None] + lead)
        padded = np.zeros((4096, 12), dtype=np.float32)
        start = (4096 - samples) // 2
        padded[start : start + samples] = x + 0.02 * rng.standard_normal(x.shape)
        signals.append(padded)
    root.mkdir(parents=True, exist_ok=True)
    first = None
    with open(root / "exams.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CODE15_COLUMNS)
        writer.writeheader()
        for part_start in range(0, count, part_size):
            ids = list(range(part_start + 1, min(count, part_start + part_size) + 1))
            name = f"exams_part{part_start // part_size}.hdf5"
            if first is not None and len(ids) == part_size:
                # The same tracings as the first part, its exam_id rewritten: a file copy, not a rewrite.
                shutil.copyfile(root / first, root / name)
                with h5py.File(root / name, "r+") as h5:
                    h5["exam_id"][...] = np.array([*ids, 0], dtype=np.int64)
            else:
                with h5py.File(root / name, "w") as h5:
                    tracings = h5.create_dataset("tracings", (len(ids) + 1, 4096, 12), dtype="float32")
                    for row in range(0, len(ids), 256):
                        block = ids[row : row + 256]
                        tracings[row : row + len(block)] = np.stack([signals[i % pool] for i in block])
                    h5["exam_id"] = np.array([*ids, 0], dtype=np.int64)
                first = first or name
            for exam_id in ids:
                flags = {label: str(bool(rng.random() < 0.05)) for label in LABELS}
                common = {"age": 60, "is_male": "True", "nn_predicted_age": 61.0, "normal_ecg": "False"}
                ids_ = {"exam_id": exam_id, "patient_id": exam_id // 2, "trace_file": name}
                writer.writerow({**common, **flags, **ids_, "death": "", "timey": ""})


def child(kind: str, inputs: Path, out: Path) -> None:
    """One build in this process; prints its JSON summary (wall time, samples, peak RSS)."""
    if kind == "code15":
        from ecglm.data.code15 import CODE15LabelQA

        builder = CODE15LabelQA(inputs, max_samples_per_shard=1000)
    else:
        from ecglm.data.mixture import ECGQAMixture

        builder = ECGQAMixture(
            ptbxl_root=inputs,
            ecgqa_root=inputs / "ecgqa",
            ecgqa_sources=("ptbxl",),
            include_comparison=False,
            shard_size_mb=None,
            max_samples_per_shard=1000,
        )
    start, cpu = time.perf_counter(), time.process_time()
    manifest = builder.build(out)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    splits = manifest["splits"].values()
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "records": sum(s["num_ecgs"] for s in splits),
                "qa": sum(s["num_qa"] for s in splits),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "shard_mb": sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6,
            }
        )
    )


def build(kind: str, inputs: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(inputs), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} build failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_rates(count: int) -> None:
    import readers  # benchmarks/readers.py
    from ecglm.records import RecordError, installed_readers, read_recording

    found = installed_readers()
    with tempfile.TemporaryDirectory() as tmp:
        paths = readers.write_all(Path(tmp), count)
        print(f"read rate, {count} records per format, 12 leads x 10.2 s (500 Hz; HDF5 400 Hz):")
        print(f"  {'format':<14} {'records/s':>10} {'per CPU s':>10}")
        for kind, items in paths.items():
            try:
                read_recording(items[0], fs=500, leads=readers.LEADS, readers=found)  # imports warmed
            except RecordError as err:  # the example plugin's format, when the plugin is not installed
                print(f"  {kind:<14} not read: {str(err)[-60:]}")
                continue
            start, cpu = time.perf_counter(), time.process_time()
            for item in items:
                read_recording(item, fs=500, leads=readers.LEADS, readers=found)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(f"  {kind:<14} {len(items) / wall:10.1f} {len(items) / cpu:10.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 10000], help="records per build")
    parser.add_argument("--read-records", type=int, default=50, help="records per format for the read rate")
    parser.add_argument("--part-size", type=int, default=2000, help="exams per CODE-15%% HDF5 part")
    parser.add_argument("--pool", type=int, default=16, help="distinct WFDB records of the PTB-XL layout")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    parser.add_argument("--skip-read", action="store_true", help="build rates only")
    parser.add_argument("--skip-build", action="store_true", help="read rates only")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    if not args.skip_read:
        read_rates(args.read_records)
    if args.skip_build:
        return
    print("shard build, each in a fresh process (7 questions per record, 12 x 2500 at 250 Hz):")
    header = f"{'records':>8} {'wall s':>8} {'records/s':>10} {'CPU s':>8} {'per CPU s':>10}"
    header += f" {'peak RSS MiB':>13} {'shards MB':>10}"
    print(f"  {'source':<22} {header}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for count in args.records:
            for name in args.sources:
                inputs = tmp / f"{name}-{count}"
                if name == "code15":
                    write_code15(inputs, count, args.part_size)
                else:
                    inputs.mkdir()
                    pool = shard_build.write_pool(inputs, args.pool)
                    num_qa = count * QUESTIONS_PER_RECORD
                    shard_build.write_inputs(inputs, num_qa, QUESTIONS_PER_RECORD, 10**9, pool)
                row = build(name, inputs, tmp / f"out-{name}-{count}")
                shutil.rmtree(inputs)
                shutil.rmtree(tmp / f"out-{name}-{count}")
                speed, per_cpu = row["records"] / row["wall"], row["records"] / row["cpu"]
                print(
                    f"  {SOURCES[name]:<22} {row['records']:>8} {row['wall']:>8.1f} {speed:>10.1f}"
                    f" {row['cpu']:>8.1f} {per_cpu:>10.1f} {row['peak_rss_mib']:>13.0f}"
                    f" {row['shard_mb']:>10.0f}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
