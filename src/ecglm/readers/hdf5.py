"""HDF5 files in the CODE-15% layout, through h5py: ``tracings`` of shape (exams, samples, 12) at
400 Hz, leads in the order I, II, III, aVR, aVL, aVF, V1-V6, and ``exam_id``, one per row.

A record is ``FILE.h5#EXAM_ID`` (the ``exam_id`` of ``exams.csv``) or ``FILE.h5#index:N`` (row ``N``);
a folder lists one record per row whose ``exam_id`` is not 0 (CODE-15%'s part files end with a row of
zeros, exam_id 0). CODE-15% stores its 7.3 to 10.2 s recordings zero-padded to 4096 samples,
centred: the padding is trimmed by keeping the samples from the first to the last one where any
lead is non-zero (a recording's own samples are never all exactly 0.0 across the 12 leads at once,
so nothing of the recording is cut). The values are read unchanged and reported as mV: the file
states no unit; preprocessing normalises each lead, so only a printout's scale depends on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecglm.readers.base import ECGReader, split_address
from ecglm.records import RecordError, Recording

#: CODE-15%'s lead order (its DI, DII, DIII, AVR, AVL, AVF, V1-V6) by ecglm's names.
CODE15_LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
CODE15_RATE = 400.0


def trim_zero_padding(signal: np.ndarray) -> np.ndarray:
    """``signal`` (samples by leads) from its first to its last sample where any lead is non-zero."""
    active = np.flatnonzero(np.any(signal != 0, axis=1))
    if active.size == 0:
        return signal[:0]
    return signal[active[0] : active[-1] + 1]


class HDF5Reader(ECGReader):
    """One exam of a CODE-15%-layout HDF5 file (``FILE.h5#EXAM_ID``, ``FILE.h5#index:N``), unpadded."""

    suffixes = (".h5", ".hdf5", ".hdf")
    signals, ids = "tracings", "exam_id"

    def check(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> None:
        file, key = split_address(path)
        super().check(path)
        if key is None:
            raise RecordError(
                f"{file}: an HDF5 file holds many exams: name one as {file}#EXAM_ID or {file}#index:N "
                "(or give the folder, which lists every exam)"
            )

    def records(self, path: Path) -> list[Path]:
        file, key = split_address(path)
        if key is not None:
            return [path]
        with self._open(file) as h5:
            ids = np.asarray(h5[self.ids]) if self.ids in h5 else None
        if ids is None:
            raise RecordError(f"{file}: no {self.ids!r} dataset: name exams by position, {file}#index:N")
        return [file.with_name(f"{file.name}#{int(i)}") for i in ids if int(i) != 0]

    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        file, key = split_address(path)
        self.check(path)
        with self._open(file) as h5:
            if self.signals not in h5:
                raise RecordError(
                    f"{file}: no {self.signals!r} dataset (the CODE-15% layout: tracings, exam_id)"
                )
            tracings = h5[self.signals]
            if tracings.ndim != 3 or tracings.shape[2] != len(CODE15_LEADS):
                raise RecordError(
                    f"{file}: {self.signals} has shape {tracings.shape}, not (exams, samples, 12)"
                )
            row, exam_id = self._row(file, h5, key)
            signal = trim_zero_padding(np.asarray(tracings[row], dtype=np.float64))
        if signal.shape[0] == 0:
            raise RecordError(f"{path}: every sample is 0 (a padding row, not an exam)")
        metadata = {
            "exam_id": exam_id,
            "row": row,
            "padded_samples": int(tracings.shape[1] - signal.shape[0]),
        }
        return Recording(signal, list(CODE15_LEADS), CODE15_RATE, str(path), units="mV", metadata=metadata)

    def _row(self, file: Path, h5, key: str) -> tuple[int, int | None]:
        size = h5[self.signals].shape[0]
        ids = np.asarray(h5[self.ids]) if self.ids in h5 else None
        if key.startswith("index:"):
            try:
                row = int(key.removeprefix("index:"))
            except ValueError:
                raise RecordError(f"{file}#{key}: write #index:N with N a whole number") from None
            if not 0 <= row < size:
                raise RecordError(
                    f"{file}#{key}: no row {row}; the file holds {size} exams (rows 0-{size - 1})"
                )
            return row, None if ids is None else int(ids[row])
        if ids is None:
            raise RecordError(f"{file}: no {self.ids!r} dataset: name the exam by position, {file}#index:N")
        try:
            wanted = int(key)
        except ValueError:
            raise RecordError(f"{file}#{key}: give an exam_id (#1234567) or a row (#index:N)") from None
        rows = np.flatnonzero(ids == wanted)
        if rows.size == 0:
            raise RecordError(f"{file}: no exam_id {wanted} in it (name a row instead: {file}#index:N)")
        return int(rows[0]), wanted

    @staticmethod
    def _open(file: Path):
        import h5py

        try:
            return h5py.File(file, "r")
        except OSError as err:
            raise RecordError(f"{file}: not a readable HDF5 file ({err})") from err
