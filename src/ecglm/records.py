"""ECG files as a model reads them: WFDB, EDF/BDF, NumPy and CSV, to the windows an encoder expects.

Readers: WFDB (``.hea`` + data files) and EDF/BDF through ``wfdb`` (its EDF reader), NumPy ``.npy``
and CSV with a stated sampling rate and lead order. :func:`prepare` then applies the encoder's
preprocessing with the same code the shard builder uses (:func:`ecglm.data.preprocess.preprocess`):
the 12 standard leads by name, NaN gaps interpolated or the record refused, polyphase resampling,
windows of the encoder's length, per-lead normalisation.

Windows: ``first`` answers from the first ``num_samples`` of the record (what the ECG-QA datasets'
10 s records give); ``all`` cuts the record into consecutive windows and answers each (a longer Holter
or the 38 s PTB records); the last partial window is left out. A record shorter than one window is
refused rather than zero-padded: the model was not trained on padded ECGs.

Every error names the file and says what to do.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecglm.data.preprocess import MissingLeadError, PreprocessConfig, preprocess, read_wfdb
from ecglm.ecg import LEADS, Preprocessing
from ecglm.errors import EcglmError

#: File suffixes each reader takes (a WFDB record is named by its header or without a suffix).
FORMATS = {"wfdb": (".hea",), "edf": (".edf", ".bdf"), "numpy": (".npy",), "csv": (".csv",)}
WINDOWS = ("first", "all")


class RecordError(EcglmError, ValueError):
    """An ECG file that cannot be read or prepared; the message names it and what to do."""


@dataclass(frozen=True)
class Recording:
    """A read ECG: ``signal`` (samples by leads, physical units), lead names, rate in Hz, its file."""

    signal: np.ndarray
    leads: list[str]
    fs: float
    source: str

    @property
    def seconds(self) -> float:
        return self.signal.shape[0] / self.fs


def record_format(path: str | Path) -> str:
    """Which reader ``path`` needs; a WFDB record may be given with or without ``.hea``."""
    path = Path(path)
    for name, suffixes in FORMATS.items():
        if path.suffix.lower() in suffixes:
            return name
    if path.with_name(path.name + ".hea").is_file():
        return "wfdb"
    supported = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
    raise RecordError(f"{path}: unknown ECG format (supported: {supported}; a WFDB record by its .hea)")


def check_readable(path: str | Path, fs: float | None = None, leads: list[str] | None = None) -> str:
    """The reader ``path`` needs, once it is known that the file exists and that what that format does
    not state (rate, lead names) is given: a check as cheap as a ``stat``, made before a model loads."""
    path = Path(path)
    kind = record_format(path)
    if kind == "wfdb":
        header = path if path.suffix.lower() == ".hea" else path.with_name(path.name + ".hea")
        if not header.is_file():
            raise RecordError(f"{header}: no such file (a WFDB record needs its .hea and data files)")
        return kind
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    if kind in ("numpy", "csv") and (fs is None or fs <= 0):
        raise RecordError(f"{path}: a {kind} file does not state its sampling rate: give it (--fs HZ)")
    if kind == "numpy" and not leads:
        raise RecordError(
            f"{path}: a .npy file does not name its leads: give them in order (--leads I,II,...)"
        )
    return kind


def read_recording(path: str | Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
    """Read an ECG file. NumPy and CSV files carry no rate: give ``fs``; a ``.npy`` carries no lead
    names: give ``leads`` (a CSV's header row names them unless ``leads`` is given)."""
    path = Path(path)
    kind = record_format(path)
    if kind == "wfdb":
        stem = path.with_suffix("") if path.suffix.lower() == ".hea" else path
        try:
            signal, names, rate = read_wfdb(stem)
        except FileNotFoundError as err:
            raise RecordError(
                f"{stem}: {err} (a WFDB record needs its .hea and the data files it names)"
            ) from err
        except Exception as err:  # wfdb raises many types for corrupt headers and data files
            raise RecordError(f"{stem}.hea: unreadable WFDB record ({type(err).__name__}: {err})") from err
        return Recording(np.asarray(signal, dtype=np.float64), names, rate, str(stem))
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    if kind == "edf":
        return _read_edf(path)
    if fs is None or fs <= 0:
        raise RecordError(f"{path}: a {kind} file does not state its sampling rate: give it (--fs HZ)")
    if kind == "numpy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise RecordError(f"{path}: not a plain numeric .npy array ({err})") from err
        if not leads:
            raise RecordError(
                f"{path}: a .npy file does not name its leads: give them in order (--leads I,II,...)"
            )
        return Recording(samples_by_leads(array, len(leads), path), list(leads), float(fs), str(path))
    return _read_csv(path, float(fs), leads)


def samples_by_leads(array: np.ndarray, num_leads: int, path: str | Path) -> np.ndarray:
    """``array`` as samples by leads, whichever way round it holds ``num_leads`` leads."""
    if array.ndim != 2 or num_leads not in array.shape:
        raise RecordError(f"{path}: array of shape {array.shape} does not hold {num_leads} leads")
    out = array.T if array.shape[0] == num_leads and array.shape[1] != num_leads else array
    return np.asarray(out, dtype=np.float64)


def _read_csv(path: Path, fs: float, leads: list[str] | None) -> Recording:
    with path.open(newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise RecordError(f"{path}: empty CSV")
    has_header = any(not _is_number(cell) for cell in header)
    names = list(leads) if leads else header if has_header else None
    if names is None:
        raise RecordError(f"{path}: the CSV has no header row naming its leads: give them (--leads I,II,...)")
    try:
        values = np.loadtxt(path, delimiter=",", skiprows=int(has_header), ndmin=2)
    except ValueError as err:
        raise RecordError(f"{path}: non-numeric sample ({err})") from err
    return Recording(samples_by_leads(values, len(names), path), [n.strip() for n in names], fs, str(path))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_edf(path: Path) -> Recording:
    from wfdb.io.convert.edf import read_edf

    try:
        record = read_edf(str(path))
    except Exception as err:  # the EDF reader raises many types for malformed files
        raise RecordError(f"{path}: unreadable EDF/BDF file ({type(err).__name__}: {err})") from err
    rates = {float(f) for f in np.atleast_1d(record.fs)}
    if len(rates) != 1:
        raise RecordError(
            f"{path}: leads sampled at different rates {sorted(rates)}; resample them to one rate"
        )
    return Recording(
        np.asarray(record.p_signal, dtype=np.float64), list(record.sig_name), rates.pop(), str(path)
    )


def prepare(recording: Recording, preprocessing: Preprocessing, window: str = "first") -> np.ndarray:
    """The encoder's input windows of ``recording``, ``(n_windows, 12, num_samples)`` float16."""
    if window not in WINDOWS:
        raise RecordError(f"window must be one of {WINDOWS}, got {window!r}")
    needed = preprocessing.num_samples / preprocessing.sampling_rate
    if recording.seconds < needed - 1e-9:
        raise RecordError(
            f"{recording.source}: {recording.seconds:.2f} s long, shorter than the encoder's window of "
            f"{needed:g} s ({preprocessing.num_samples} samples at {preprocessing.sampling_rate} Hz)"
        )
    config = PreprocessConfig.of(preprocessing, window=window)
    try:
        prepared = preprocess(recording.signal, recording.leads, recording.fs, recording.source, config)
    except MissingLeadError as err:
        raise RecordError(f"{err}; the encoder reads the 12 standard leads {list(LEADS)}") from err
    if prepared.dropped:
        raise RecordError(f"{recording.source}: {prepared.drop_reason.replace('_', ' ')} ({prepared.detail})")
    return prepared.windows
