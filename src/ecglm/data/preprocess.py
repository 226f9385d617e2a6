"""Signal preprocessing shared by every ECG source: leads, gaps, rate, windows, normalisation, dtype.

The steps, in order (:func:`preprocess`):

1. **Leads.** The 12 standard leads in canonical order (:data:`LEADS`), matched by name without
   regard to case (PTB-XL's ``AVR``, PTB's ``avr``, MIMIC-IV-ECG's ``aVF`` before ``aVL`` all map by
   name, never by position). Extra leads (PTB's Frank ``vx vy vz``) are dropped. A missing lead raises
   :class:`MissingLeadError` naming the record, unless ``zero_fill_missing`` is set.
2. **NaN / Inf**, at the source rate: a record whose non-finite fraction exceeds
   ``max_nan_fraction``, or with a run of non-finite samples longer than ``max_gap`` samples in
   one lead, is dropped; shorter runs are linearly interpolated per lead (runs at an edge take the
   nearest finite value).
3. **Resampling** to ``sampling_rate`` with :func:`scipy.signal.resample_poly` (a polyphase FIR
   with a Kaiser-windowed anti-aliasing filter), ``up/down`` the reduced ratio of the two rates.
4. **Windows** of ``num_samples`` (10 s at 250 Hz = 2500): ``first`` takes the start of the record,
   ``centre`` the middle, ``all`` every consecutive non-overlapping full window (a shorter trailing
   remainder is discarded, unless it is the whole record). A record shorter than a window is
   padded with zeros at the end, after normalisation, so the padding sits at the normalised
   baseline's zero.
5. **Normalisation** of each window over its real (unpadded) samples: ``zscore`` per lead (constant
   leads become zeros) or ``minmax`` over all leads together to [0, 1] (a constant window becomes
   zeros).
6. **Storage** as float16.

A record that cannot be used comes back as a :class:`Preprocessed` with a ``drop_reason`` (never
silently); the shard builder counts them by reason.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike
from scipy import signal

from ecglm._deprecation import moved_names, warn_deprecated
from ecglm.ecg import LEADS, MANIFEST_KEYS, NORMALIZATIONS, Preprocessing, PreprocessingError

WINDOW_POLICIES = ("first", "centre", "all")
STORAGE_DTYPE = np.float16
#: 0.1's tuple of the normalization names, ``NORMALISATIONS`` until 0.3.0.
_NORMALISATIONS = tuple(NORMALIZATIONS)

__getattr__ = moved_names(
    __name__, {"NORMALISATIONS": (f"{__name__}:_NORMALISATIONS", "ecglm.ecg.NORMALIZATIONS (its keys)")}
)


class MissingLeadError(ValueError):
    """A record lacks one of the 12 standard leads (and zero-filling was not asked for)."""


def _renamed_normalisation(normalization: str, normalisation: str | None, old: str, new: str) -> str:
    """The normalization to use where 0.1's spelling, ``normalisation`` (``old``), may also be given.

    ``normalisation`` wins over a ``normalization`` left at its default, with a
    :class:`DeprecationWarning` naming ``new``; the two giving different values is an error.
    """
    if normalisation is None:
        return normalization
    warn_deprecated(old, new, stacklevel=4)
    if normalization not in (Preprocessing.normalization, normalisation):
        raise PreprocessingError(
            f"normalization={normalization!r} and normalisation={normalisation!r} disagree; "
            f"give normalization only ({new})"
        )
    return normalisation


@dataclass(frozen=True)
class PreprocessConfig(Preprocessing):
    """How every ECG is prepared: the input spec (:class:`~ecglm.ecg.Preprocessing`) and how records
    are brought to it. :meth:`manifest_entry` is what a manifest records.

    Args:
        sampling_rate: Target rate in Hz.
        num_samples: Samples per window (``sampling_rate * seconds``).
        normalization: ``zscore`` (per lead) or ``minmax`` (global, to [0, 1]). 0.1's spelling,
            ``normalisation=``, is accepted with a DeprecationWarning until 0.3.0.
        window: ``first``, ``centre`` or ``all`` (see the module docstring).
        zero_fill_missing: Fill a missing lead with zeros instead of raising.
        max_gap: Longest run of NaN/Inf samples (at the source rate) that is interpolated.
        max_nan_fraction: Records with a larger fraction of NaN/Inf samples are dropped.
    """

    window: str = "first"
    zero_fill_missing: bool = False
    max_gap: int = 250
    max_nan_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window not in WINDOW_POLICIES:
            raise PreprocessingError(f"window must be one of {WINDOW_POLICIES}, got {self.window!r}")
        if self.max_gap < 0 or not 0.0 <= self.max_nan_fraction <= 1.0:
            raise PreprocessingError("max_gap must be >= 0 and max_nan_fraction in [0, 1]")

    @classmethod
    def of(cls, spec: Preprocessing, **options: Any) -> PreprocessConfig:
        """``spec``'s rate, samples and normalization (an encoder's), prepared with ``options``."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(Preprocessing)}, **options)

    @property
    def normalisation(self) -> str:
        """Deprecated: 0.1's spelling of :attr:`normalization`."""
        warn_deprecated("PreprocessConfig.normalisation", "PreprocessConfig.normalization")
        return self.normalization

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``preprocessing`` section (read by :func:`~ecglm.encoders.check_preprocessing`),
        its keys spelled as :data:`~ecglm.ecg.MANIFEST_KEYS` says."""
        spec = {MANIFEST_KEYS.get(name, name): value for name, value in asdict(self).items()}
        return {**spec, "leads": list(LEADS), "dtype": np.dtype(STORAGE_DTYPE).name}


def _accept_normalisation(init: Any) -> Any:
    old, new = "PreprocessConfig(normalisation=...)", "PreprocessConfig(normalization=...)"

    @functools.wraps(init)
    def __init__(self: PreprocessConfig, *args: Any, normalisation: str | None = None, **kwargs: Any) -> None:
        if normalisation is not None:
            given = kwargs.get("normalization", Preprocessing.normalization)
            kwargs["normalization"] = _renamed_normalisation(given, normalisation, old, new)
        init(self, *args, **kwargs)

    return __init__


# 0.1's keyword (until 0.3.0); kept out of the dataclass, so that it is neither a field nor in asdict().
PreprocessConfig.__init__ = _accept_normalisation(PreprocessConfig.__init__)  # type: ignore[method-assign]


@dataclass(frozen=True)
class Preprocessed:
    """The windows of one record, ``(n_windows, 12, num_samples)`` float16, or why it was dropped."""

    record: str
    windows: np.ndarray | None = None
    drop_reason: str | None = None
    detail: str = ""

    @property
    def dropped(self) -> bool:
        return self.windows is None


def select_leads(x: np.ndarray, names: list[str], record: str, zero_fill: bool = False) -> np.ndarray:
    """The canonical 12 leads of ``x`` (``(n, len(names))``, samples by leads) as ``(12, n)``."""
    index = {}
    for i, name in enumerate(names):
        index.setdefault(name.strip().lower(), i)
    missing = [lead for lead in LEADS if lead.lower() not in index]
    if missing and not zero_fill:
        raise MissingLeadError(f"record {record} lacks lead(s) {missing}; it has {list(names)}")
    out = np.zeros((len(LEADS), x.shape[0]), dtype=np.float64)
    for row, lead in enumerate(LEADS):
        if lead.lower() in index:
            out[row] = x[:, index[lead.lower()]]
    return out


def _runs(bad: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], bad.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def repair_nonfinite(x: np.ndarray, max_gap: int, max_fraction: float) -> tuple[np.ndarray | None, str, str]:
    """Interpolate short NaN/Inf runs of ``x`` (12, n) per lead; ``(None, reason, detail)`` if unusable."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return x, "", ""
    fraction = float(bad.mean())
    if fraction > max_fraction:
        return None, "nan_fraction", f"{fraction:.1%} of samples are NaN/Inf (limit {max_fraction:.1%})"
    out = x.copy()
    positions = np.arange(x.shape[1])
    for lead in np.flatnonzero(bad.any(axis=1)):
        longest = max(stop - start for start, stop in _runs(bad[lead]))
        if longest > max_gap:
            return (
                None,
                "nan_gap",
                f"lead {LEADS[lead]} has a NaN/Inf run of {longest} samples (limit {max_gap})",
            )
        good = ~bad[lead]
        out[lead, bad[lead]] = np.interp(positions[bad[lead]], positions[good], x[lead, good])
    return out, "", ""


def resample(x: np.ndarray, rate: float, target: int) -> np.ndarray:
    """Polyphase anti-aliased resampling of ``x`` (leads, n) from ``rate`` to ``target`` Hz."""
    ratio = (
        Fraction(target / rate).limit_denominator(1000) if rate != int(rate) else Fraction(target, int(rate))
    )
    if ratio == 1:
        return x
    return signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=1)


def cut_windows(x: np.ndarray, num_samples: int, policy: str) -> list[np.ndarray]:
    """Windows of ``x`` (leads, n) by ``policy``; windows shorter than ``num_samples`` are left short."""
    n = x.shape[1]
    if n <= num_samples:
        return [x]
    if policy == "first":
        return [x[:, :num_samples]]
    if policy == "centre":
        start = (n - num_samples) // 2
        return [x[:, start : start + num_samples]]
    return [x[:, i : i + num_samples] for i in range(0, n - num_samples + 1, num_samples)]


def zscore(x: np.ndarray, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Per-lead z-score of ``x`` (leads, n) as ``dtype``; a constant lead becomes zeros instead of NaN."""
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return np.where(std > 1e-8, (x - mean) / np.where(std > 1e-8, std, 1.0), 0.0).astype(dtype, copy=False)


def normalise(x: np.ndarray, method: str) -> np.ndarray:
    """Per-lead z-score or global min-max to [0, 1]; constant leads (windows) become zeros."""
    if method == "zscore":
        return zscore(x)
    low, high = float(x.min()), float(x.max())
    if high - low <= 1e-8:
        return np.zeros_like(x)
    return (x - low) / (high - low)


def _pad(x: np.ndarray, num_samples: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, num_samples - x.shape[1]))) if x.shape[1] < num_samples else x


def preprocess(
    x: np.ndarray, names: list[str], rate: float, record: str, config: PreprocessConfig
) -> Preprocessed:
    """Prepare ``x`` (samples by leads, physical units, leads named ``names``) sampled at ``rate`` Hz.

    Raises :class:`MissingLeadError` for a missing lead (unless ``config.zero_fill_missing``); every
    other problem is a drop with a reason.
    """
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"record {record}: signal of shape {x.shape} does not match {len(names)} lead names")
    if x.shape[0] == 0:
        return Preprocessed(record, drop_reason="empty", detail="no samples")
    leads = select_leads(np.asarray(x, dtype=np.float64), names, record, config.zero_fill_missing)
    leads, reason, detail = repair_nonfinite(leads, config.max_gap, config.max_nan_fraction)
    if leads is None:
        return Preprocessed(record, drop_reason=reason, detail=detail)
    resampled = resample(leads, rate, config.sampling_rate)
    windows = [
        _pad(normalise(w, config.normalization), config.num_samples)
        for w in cut_windows(resampled, config.num_samples, config.window)
    ]
    stacked = np.stack(windows)
    if np.abs(stacked).max() > np.finfo(STORAGE_DTYPE).max:
        return Preprocessed(record, drop_reason="float16_overflow", detail="normalised values beyond float16")
    return Preprocessed(record, windows=stacked.astype(STORAGE_DTYPE))


def read_wfdb(path: str | Path) -> tuple[np.ndarray, list[str], float]:
    """The WFDB record ``path`` (no extension): its signal (samples by leads, physical units), lead names
    and sampling rate. A record without a header file is a :class:`FileNotFoundError` naming it."""
    import wfdb

    header = Path(f"{path}.hea")
    if not header.is_file():
        raise FileNotFoundError(f"WFDB record {path} not found: no header file {header}")
    rec = wfdb.rdrecord(str(path))
    return rec.p_signal, list(rec.sig_name), float(rec.fs)


def preprocess_record(path: str | Path, config: PreprocessConfig, record: str | None = None) -> Preprocessed:
    """Read the WFDB record ``path`` (no extension) and :func:`preprocess` it.

    A missing or unreadable record is a drop (``missing_record`` / ``unreadable``), not an error.
    """
    record = record or str(path)
    if not Path(f"{path}.hea").is_file():
        return Preprocessed(record, drop_reason="missing_record", detail=f"no header {path}.hea")
    try:
        x, names, rate = read_wfdb(path)
    except Exception as error:  # wfdb raises many types for corrupt headers and data files
        return Preprocessed(record, drop_reason="unreadable", detail=f"{type(error).__name__}: {error}")
    return preprocess(x, names, rate, record, config)


def preprocess_task(task: tuple[str, str, PreprocessConfig]) -> Preprocessed:
    """:func:`preprocess_record` of ``(path, record name, config)`` for a process pool.

    A missing lead comes back as a ``missing_lead`` drop (its message names the record and file), for
    the caller to raise or count. It lives here, not in the builder, so that pool workers import only
    numpy, scipy and wfdb.
    """
    path, name, config = task
    try:
        return preprocess_record(path, config, record=name)
    except MissingLeadError as error:
        return Preprocessed(name, drop_reason="missing_lead", detail=f"{error} (file {path})")
