"""What an ECG is to ecglm: the 12 standard leads in their canonical order, the normalizations a signal
can carry, and :class:`Preprocessing`, the input spec (rate, samples per lead, normalization).

An encoder states the input it expects as a :class:`Preprocessing`; the data builders prepare records
with :class:`ecglm.data.preprocess.PreprocessConfig`, the same spec plus how to get there (windows,
gaps, missing leads), and write it into every manifest. Both layers import the spec from here
(standard library only), so its fields and their checks are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecglm.errors import EcglmError

#: The 12 standard leads in the order of every ECG array's lead axis.
LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

#: Normalizations an ECG can carry (and an encoder can expect), and what each means.
NORMALIZATIONS: dict[str, str] = {
    "zscore": "per lead: subtract each lead's mean and divide by its standard deviation",
    "minmax": "global: map the record's minimum over all leads to 0 and its maximum to 1",
}

#: How a manifest's ``preprocessing`` section spells each :class:`Preprocessing` field. Manifests have
#: spelled the normalization ``normalisation`` since 0.1, and still do: a shard builder compares its
#: manifest key by key to tell whether a folder is up to date, so a new spelling would rebuild every
#: shard set. Readers (:func:`ecglm.encoders.check_preprocessing`) accept both spellings.
MANIFEST_KEYS: dict[str, str] = {
    "sampling_rate": "sampling_rate",
    "num_samples": "num_samples",
    "normalization": "normalisation",
}


class PreprocessingError(EcglmError, ValueError):
    """An input spec with a value out of range; the message names the field and what it may be."""


@dataclass(frozen=True)
class Preprocessing:
    """An ECG input: ``num_samples`` per lead at ``sampling_rate`` Hz, normalised by ``normalization``.

    What an encoder expects (``ECGEncoder.preprocessing``), and the first three fields of the data
    side's :class:`~ecglm.data.preprocess.PreprocessConfig`. fairseq-signals' preprocessing (ECG-FM,
    the CMSC encoders) resamples to 500 Hz, cuts 5 s segments (2,500 samples) and z-scores each lead;
    ecglm's own default is 10 s at 250 Hz.

    Args:
        sampling_rate: Samples per second, Hz.
        num_samples: Samples per lead (``sampling_rate * seconds``).
        normalization: One of :data:`NORMALIZATIONS`: ``zscore`` (per lead) or ``minmax`` (global, to
            [0, 1]).
    """

    sampling_rate: int = 250
    num_samples: int = 2500
    normalization: str = "zscore"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise PreprocessingError(
                f"normalization must be one of {sorted(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.sampling_rate <= 0 or self.num_samples <= 0:
            raise PreprocessingError(
                f"sampling_rate and num_samples must be positive, got {self.sampling_rate}, "
                f"{self.num_samples}"
            )
