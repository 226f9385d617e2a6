"""Read rate per ECG format (records/s): ``ecglm.records.read_recording`` on 12-lead 10.2 s records.

Writes ``--records`` records of each format into a temporary folder with the writers the reader
tests use (tests/ecg_exports.py: WFDB, EDF, .npy, CSV, DICOM, HL7 aECG, CODE-15%-layout HDF5 and the
example plugin's JSON), then reads each set through ``read_recording`` (reader discovery included,
and with the readers found once, as ``ecglm ask`` does) and prints records/s per format, and the
cost of discovering the readers.

    .venv/bin/python benchmarks/readers.py [--records 50]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import wfdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ecg_exports import (  # the test writers, beside the tests
    LEADS,
    aecg_xml,
    code15_h5,
    dicom_group,
    ecg_json,
    ecg_signal,
    to_raw,
    write_dicom,
)
from ecglm.records import installed_readers, read_recording


def write_all(folder: Path, count: int) -> dict[str, list[str]]:
    """``count`` records of each format: format -> the paths ``read_recording`` takes."""
    from wfdb.io.convert.edf import wfdb_to_edf

    paths: dict[str, list[str]] = {}
    exams = {}
    for k in range(count):
        signal = ecg_signal(10.2, 500, seed=k)
        name = f"r{k:04d}"
        wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=LEADS, p_signal=signal, fmt=["16"] * 12,
                    write_dir=str(folder))  # fmt: skip
        paths.setdefault("wfdb", []).append(str(folder / name))
        with contextlib.redirect_stdout(io.StringIO()):  # wfdb_to_edf prints each block
            wfdb_to_edf(str(folder / name), output_filename=str(folder / f"{name}.edf"))
        paths.setdefault("edf", []).append(str(folder / f"{name}.edf"))
        np.save(folder / f"{name}.npy", signal)
        paths.setdefault("numpy", []).append(str(folder / f"{name}.npy"))
        np.savetxt(folder / f"{name}.csv", signal, delimiter=",", header=",".join(LEADS), comments="")
        paths.setdefault("csv", []).append(str(folder / f"{name}.csv"))
        write_dicom(folder / f"{name}.dcm", [dicom_group(to_raw(signal, 2.5), LEADS, 500)])
        paths.setdefault("dicom", []).append(str(folder / f"{name}.dcm"))
        (folder / f"{name}.xml").write_text(aecg_xml(to_raw(signal, 5), LEADS, 0.002, 0, 5))
        paths.setdefault("aecg", []).append(str(folder / f"{name}.xml"))
        ecg_json(folder / f"{name}.ecg.json", signal, 500)
        paths.setdefault("json (plugin)", []).append(str(folder / f"{name}.ecg.json"))
        exams[k + 1] = ecg_signal(10.2, 400, seed=k)
    code15_h5(folder / "exams.hdf5", exams)
    paths["hdf5"] = [f"{folder / 'exams.hdf5'}#{exam_id}" for exam_id in exams]
    return paths


def rate(read, items: list[str]) -> float:
    read(items[0])  # imports and caches warmed
    start = time.perf_counter()
    for item in items:
        read(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50)
    args = parser.parse_args()
    start = time.perf_counter()
    for _ in range(20):
        readers = installed_readers()
    discovery = (time.perf_counter() - start) / 20 * 1e3
    print(f"reader discovery (the ecglm.readers entry points, once per read_recording): {discovery:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_all(Path(tmp), args.records)
        print(f"{args.records} records per format, 12 leads x 10.2 s (500 Hz; the HDF5 exams 400 Hz)")
        print(f"  {'format':<14} {'read_recording':>16} {'readers found once':>19}   (records/s)")
        for kind, items in paths.items():
            dispatched = rate(lambda item: read_recording(item, fs=500, leads=LEADS), items)
            once = rate(lambda item: read_recording(item, fs=500, leads=LEADS, readers=readers), items)
            print(f"  {kind:<14} {dispatched:16.1f} {once:19.1f}")


if __name__ == "__main__":
    main()
