"""The readers of the formats ecglm read before readers were plugins: WFDB, EDF/BDF, NumPy and CSV.

WFDB (``.hea`` + data files) and EDF/BDF are read by ``wfdb`` (its EDF reader); a ``.npy`` carries
neither rate nor lead names, a CSV no rate (its header row may name the leads): the user gives them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ecglm.data.preprocess import read_wfdb
from ecglm.readers.base import ECGReader
from ecglm.records import RecordError, Recording, samples_by_leads


def _need_rate(path: Path, kind: str, fs: float | None) -> float:
    if fs is None or fs <= 0:
        raise RecordError(f"{path}: a {kind} file does not state its sampling rate: give it (--fs HZ)")
    return float(fs)


def _need_leads(path: Path, leads: list[str] | None) -> list[str]:
    if not leads:
        raise RecordError(
            f"{path}: a .npy file does not name its leads: give them in order (--leads I,II,...)"
        )
    return list(leads)


class WFDBReader(ECGReader):
    """A WFDB record, named by its ``.hea`` or without a suffix; samples in the header's units."""

    suffixes = (".hea",)

    def claims(self, path: Path) -> bool:
        return super().claims(path) or Path(path).with_name(Path(path).name + ".hea").is_file()

    @staticmethod
    def _stem(path: Path) -> Path:
        return path.with_suffix("") if path.suffix.lower() == ".hea" else path

    def check(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> None:
        header = self._stem(path).with_name(self._stem(path).name + ".hea")
        if not header.is_file():
            raise RecordError(f"{header}: no such file (a WFDB record needs its .hea and data files)")

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        stem = self._stem(Path(path))
        try:
            signal, names, rate = read_wfdb(stem)
        except FileNotFoundError as err:
            raise RecordError(
                f"{stem}: {err} (a WFDB record needs its .hea and the data files it names)"
            ) from err
        except Exception as err:  # wfdb raises many types for corrupt headers and data files
            raise RecordError(f"{stem}.hea: unreadable WFDB record ({type(err).__name__}: {err})") from err
        return Recording(np.asarray(signal, dtype=np.float64), names, rate, str(stem))


class EDFReader(ECGReader):
    """An EDF or BDF file (``wfdb``'s EDF reader): physical units, one rate for every lead."""

    suffixes = (".edf", ".bdf")

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        from wfdb.io.convert.edf import read_edf

        self.check(path)
        try:
            record = read_edf(str(path))
        except Exception as err:  # the EDF reader raises many types for malformed files
            raise RecordError(f"{path}: unreadable EDF/BDF file ({type(err).__name__}: {err})") from err
        rates = {float(f) for f in np.atleast_1d(record.fs)}
        if len(rates) != 1:
            raise RecordError(
                f"{path}: leads sampled at different rates {sorted(rates)}; resample them to one rate"
            )
        units = {str(u) for u in record.units or []}
        return Recording(
            np.asarray(record.p_signal, dtype=np.float64),
            list(record.sig_name),
            rates.pop(),
            str(path),
            units=units.pop() if len(units) == 1 else "mV",
        )


class NumpyReader(ECGReader):
    """A plain numeric ``.npy`` array (leads by samples or samples by leads); rate and leads given."""

    suffixes = (".npy",)

    def check(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> None:
        super().check(path)
        _need_rate(path, "numpy", fs)
        _need_leads(path, leads)

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        super().check(path)
        rate = _need_rate(path, "numpy", fs)
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise RecordError(f"{path}: not a plain numeric .npy array ({err})") from err
        names = _need_leads(path, leads)
        return Recording(samples_by_leads(array, len(names), path), names, rate, str(path))


class CSVReader(ECGReader):
    """A CSV of samples, one column per lead, named by its header row or by ``leads``; rate given."""

    suffixes = (".csv",)

    def check(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> None:
        super().check(path)
        _need_rate(path, "csv", fs)

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        super().check(path)
        rate = _need_rate(path, "csv", fs)
        with Path(path).open(newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise RecordError(f"{path}: empty CSV")
        has_header = any(not _is_number(cell) for cell in header)
        names = list(leads) if leads else header if has_header else None
        if names is None:
            raise RecordError(
                f"{path}: the CSV has no header row naming its leads: give them (--leads I,II,...)"
            )
        try:
            values = np.loadtxt(path, delimiter=",", skiprows=int(has_header), ndmin=2)
        except ValueError as err:
            raise RecordError(f"{path}: non-numeric sample ({err})") from err
        signal = samples_by_leads(values, len(names), path)
        return Recording(signal, [n.strip() for n in names], rate, str(path))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
