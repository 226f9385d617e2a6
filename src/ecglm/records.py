"""ECG files as a model reads them, to the windows an encoder expects.

Readers are plugins of the ``ecglm.readers`` entry-point group (:class:`ecglm.readers.ECGReader`):
ecglm's own read WFDB, EDF/BDF, NumPy ``.npy`` and CSV (with a stated sampling rate and lead order),
DICOM waveforms, HL7 aECG XML and HDF5 in the CODE-15% layout (``FILE.h5#EXAM_ID``); the first
reader that claims a file reads it, ecglm's own before plugins (docs/records.md). :func:`prepare`
then applies the encoder's preprocessing with the same code the shard builder uses
(:func:`ecglm.data.preprocess.preprocess`): the 12 standard leads by name, NaN gaps interpolated or
the record refused, polyphase resampling, windows of the encoder's length, per-lead normalisation.

Windows: ``first`` answers from the first ``num_samples`` of the record (what the ECG-QA datasets'
10 s records give); ``all`` cuts the record into consecutive windows and answers each (a longer Holter
or the 38 s PTB records); the last partial window is left out. A record shorter than one window is
refused rather than zero-padded: the model was not trained on padded ECGs.

Every error names the file and says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecglm.data.preprocess import MissingLeadError, PreprocessConfig, preprocess
from ecglm.ecg import LEADS, Preprocessing
from ecglm.errors import EcglmError

#: File suffixes of the formats ecglm read before readers were plugins (a WFDB record is named by its
#: header or without a suffix); :func:`reader_suffixes` gives every installed reader's.
FORMATS = {"wfdb": (".hea",), "edf": (".edf", ".bdf"), "numpy": (".npy",), "csv": (".csv",)}
WINDOWS = ("first", "all")


class RecordError(EcglmError, ValueError):
    """An ECG file that cannot be read or prepared; the message names it and what to do."""


@dataclass(frozen=True)
class Recording:
    """A read ECG: ``signal`` (samples by leads, physical units), lead names, rate in Hz, its file (or
    ``FILE#KEY``), the signal's units (``mV`` unless the file says otherwise) and what else the file
    states about the record (``metadata``: patient/exam ids, the waveform group read, ...)."""

    signal: np.ndarray
    leads: list[str]
    fs: float
    source: str
    units: str = "mV"
    metadata: Mapping[str, object] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.signal.shape[0] / self.fs


#: The entry-point group of ECG file readers.
READERS_GROUP = "ecglm.readers"


def installed_readers() -> dict[str, object]:
    """Entry-point name -> reader (an :class:`ecglm.readers.ECGReader`), in the order files are offered
    to them: ecglm's own first, then plugins by name. Re-read on each call, so a reader installed after
    start-up is seen."""
    from ecglm.plugins import discover, import_object

    plugins = discover(groups=[READERS_GROUP]).plugins[READERS_GROUP].values()
    ordered = sorted(plugins, key=lambda p: (not p.is_builtin, p.name))
    return {p.name: import_object(p.class_path)() for p in ordered}


def reader_suffixes(readers: Mapping[str, object] | None = None) -> list[str]:
    """Every suffix an installed reader claims, sorted."""
    readers = installed_readers() if readers is None else readers
    return sorted({s for reader in readers.values() for s in reader.suffixes})


def _reader(path: Path, readers: Mapping[str, object] | None = None) -> tuple[str, object]:
    readers = installed_readers() if readers is None else readers
    for name, reader in readers.items():
        if reader.claims(path):
            return name, reader
    supported = ", ".join(reader_suffixes(readers))
    raise RecordError(
        f"{path}: unknown ECG format (supported: {supported}; a WFDB record by its .hea; "
        "`ecglm plugins` lists the readers installed)"
    )


def record_format(path: str | Path) -> str:
    """The name of the reader ``path`` needs; a WFDB record may be given with or without ``.hea``."""
    return _reader(Path(path))[0]


def check_readable(
    path: str | Path,
    fs: float | None = None,
    leads: list[str] | None = None,
    readers: Mapping[str, object] | None = None,
) -> str:
    """The reader ``path`` needs, once it is known that the file exists and that what that format does
    not state (rate, lead names) is given: a check as cheap as a ``stat``, made before a model loads.
    ``readers``: :func:`installed_readers`, found once for many files (default: found for this one)."""
    name, reader = _reader(Path(path), readers)
    reader.check(Path(path), fs, leads)
    return name


def read_recording(
    path: str | Path,
    fs: float | None = None,
    leads: list[str] | None = None,
    readers: Mapping[str, object] | None = None,
) -> Recording:
    """Read an ECG file (or ``FILE#KEY``, a record in a file of many). NumPy and CSV files carry no
    rate: give ``fs``; a ``.npy`` carries no lead names: give ``leads`` (a CSV's header row names them
    unless ``leads`` is given). ``readers``: :func:`installed_readers`, found once for many files
    (finding them takes milliseconds; default: found for this file)."""
    _, reader = _reader(Path(path), readers)
    return reader.read(Path(path), fs, leads)


def records_in(path: str | Path, readers: Mapping[str, object] | None = None) -> list[Path]:
    """The records a file holds as :func:`read_recording` takes them (one per exam of an HDF5 file);
    none when no reader claims it."""
    readers = installed_readers() if readers is None else readers
    try:
        _, reader = _reader(Path(path), readers)
    except RecordError:
        return []
    try:
        return list(reader.records(Path(path)))
    except RecordError:
        return [Path(path)]  # listed as it is, so that reading it reports why it is skipped


def samples_by_leads(array: np.ndarray, num_leads: int, path: str | Path) -> np.ndarray:
    """``array`` as samples by leads, whichever way round it holds ``num_leads`` leads."""
    if array.ndim != 2 or num_leads not in array.shape:
        raise RecordError(f"{path}: array of shape {array.shape} does not hold {num_leads} leads")
    out = array.T if array.shape[0] == num_leads and array.shape[1] != num_leads else array
    return np.asarray(out, dtype=np.float64)


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
