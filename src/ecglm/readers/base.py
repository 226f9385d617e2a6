"""What an ECG file reader is: the files it claims, and the :class:`~ecglm.records.Recording` it reads.

Readers are components of the ``ecglm.readers`` entry-point group: ecglm's own (WFDB, EDF/BDF,
NumPy, CSV, DICOM, HL7 aECG, HDF5) register there exactly as a third-party package registers its
own, and :mod:`ecglm.records` asks each in turn whether it claims a file (ecglm's own first).

A record inside a file that holds many (an HDF5 file of exams) is addressed ``FILE#KEY``:
:func:`split_address` parts the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from ecglm.records import RecordError, Recording


def split_address(path: str | Path) -> tuple[Path, str | None]:
    """``(file, key)`` of ``FILE#KEY``; ``(path, None)`` when ``path`` names an existing file or has no
    ``#`` (a file name may itself hold one)."""
    path = Path(path)
    if "#" not in path.name or path.exists():
        return path, None
    name, _, key = path.name.rpartition("#")
    return path.with_name(name), key


def file_head(path: Path, size: int = 512) -> bytes:
    """The first ``size`` bytes of ``path`` (for a content sniff), empty when it cannot be read."""
    try:
        with path.open("rb") as f:
            return f.read(size)
    except OSError:
        return b""


class ECGReader(ABC):
    """A reader of one ECG file format.

    Required: :meth:`read`. Optional: ``suffixes`` (the file suffixes it claims, lower case, with the
    dot), :meth:`claims` (default: the suffix; override to sniff the content), :meth:`check` (a check
    as cheap as a ``stat``, run before a model loads; default: the file exists), :meth:`records` (the
    records a file found in a folder holds; default: the file itself).

    A reader is built with no arguments; each error it raises is a :class:`~ecglm.records.RecordError`
    naming the file, the reason and what to do.
    """

    #: File suffixes this reader claims (lower case, with the dot).
    suffixes: tuple[str, ...] = ()

    def claims(self, path: Path) -> bool:
        """Whether ``path`` (a file, or ``FILE#KEY``) is this reader's to read."""
        file, _ = split_address(path)
        return file.suffix.lower() in self.suffixes

    def check(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> None:
        """Refuse, before any model loads, what :meth:`read` would refuse without reading the samples."""
        file, _ = split_address(path)
        if not file.is_file():
            raise RecordError(f"{file}: no such file")

    def records(self, path: Path) -> list[Path]:
        """The records ``path`` holds, each as :meth:`read` takes it (``FILE#KEY`` for a container)."""
        return [path]

    @abstractmethod
    def read(self, path: Path, fs: float | None = None, leads: list[str] | None = None) -> Recording:
        """The recording at ``path``; ``fs`` and ``leads`` are what the user gave for formats that do not
        state them (ignored by formats that do)."""
