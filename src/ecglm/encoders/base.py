"""The base class of ECG encoders and the input they expect.

:class:`ECGEncoder` is what every encoder subclasses (plugins too). Its ``preprocessing``, a
:class:`Preprocessing` (the input spec, defined in :mod:`ecglm.ecg`), says which signals it expects;
:func:`check_preprocessing` compares that with what a dataset's manifest declares, warning with a
:class:`PreprocessingMismatchWarning`.
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ecglm.ecg import MANIFEST_KEYS, NORMALIZATIONS, Preprocessing


class PreprocessingMismatchWarning(UserWarning):
    """Data prepared differently from what an encoder expects (``warnings.simplefilter("error", ...)``)."""


#: Names a dataset's manifest may use for each :class:`Preprocessing` field: the field's own, and the
#: spelling manifests are written with (:data:`ecglm.ecg.MANIFEST_KEYS`).
_DATA_KEYS = {name: tuple(dict.fromkeys((name, key))) for name, key in MANIFEST_KEYS.items()}


#: Spellings (lower case, letters only) a manifest may use for each normalisation.
_NORMALIZATION_ALIASES = {
    "zscore": {"zscore", "perleadzscore", "zscoreperlead"},
    "minmax": {"minmax", "globalminmax", "minmaxglobal"},
}


def _canonical_normalization(value: Any) -> str:
    """``"per-lead z-score"``, ``"z_score"``, ``"min-max"`` ... -> ``"zscore"`` / ``"minmax"``; else as is."""
    letters = re.sub(r"[^a-z]", "", str(value).lower())
    return next((name for name, aliases in _NORMALIZATION_ALIASES.items() if letters in aliases), str(value))


def _mismatch_fix(name: str, expected: Preprocessing) -> str:
    if name == "sampling_rate":
        return (
            f"resample the ECGs to {expected.sampling_rate} Hz (e.g. scipy.signal.resample_poly) "
            "or use an encoder trained at the data's rate"
        )
    if name == "num_samples":
        seconds = expected.num_samples / expected.sampling_rate
        return f"crop or pad each record to {expected.num_samples} samples ({seconds:g} s)"
    return f"normalise the ECGs with {expected.normalization!r} ({NORMALIZATIONS[expected.normalization]})"


def check_preprocessing(encoder_pre: Preprocessing, data_pre: Mapping[str, Any], source: str) -> list[str]:
    """Compare an encoder's expected input with a dataset's; warn about, and return, every mismatch.

    ``data_pre`` holds what the data declares (a manifest's ``preprocessing`` section): any of
    ``sampling_rate``, ``num_samples`` and ``normalization`` (or ``normalisation``, free text such
    as ``"per-lead z-score"``). A field the data does not declare is not checked. ``source`` names
    the data in the messages (the manifest's path). Each mismatch is a
    :class:`PreprocessingMismatchWarning` naming the source, both values and the fix.
    """
    messages = []
    for name, keys in _DATA_KEYS.items():
        key = next((k for k in keys if k in data_pre), None)
        if key is None:
            continue
        expected, found = getattr(encoder_pre, name), data_pre[key]
        same = _canonical_normalization(found) == expected if name == "normalization" else found == expected
        if not same:
            messages.append(
                f"{source}: the data has {key}={found!r} but the encoder expects {name}={expected!r}; "
                f"{_mismatch_fix(name, encoder_pre)}"
            )
    for message in messages:
        warnings.warn(message, PreprocessingMismatchWarning, stacklevel=2)
    return messages


class ECGEncoder(nn.Module, ABC):
    """Base class of every ECG encoder.

    Subclasses set ``output_dim`` (the width of each output frame) in ``__init__`` and implement
    :meth:`forward`. ``pretrained`` says whether the weights come from a checkpoint that can be
    loaded again; weights that cannot (a randomly initialised encoder) are saved in ecglm's
    checkpoints even when frozen, so that a resumed or evaluated run sees the same encoder.
    ``preprocessing`` is the input the encoder expects.
    """

    output_dim: int
    pretrained: bool = False
    preprocessing: Preprocessing = Preprocessing()

    @abstractmethod
    def forward(self, ecg: Tensor) -> Tensor:
        """Encode ``ecg`` of shape ``(batch, leads, samples)`` into ``(batch, frames, output_dim)``."""

    def top_layers(self, n: int) -> list[nn.Module]:
        """Optional: the modules that training the top ``n`` layers unfreezes, lowest first.

        Policies call it for ``encoder_top_layers: n``. An encoder without a stack of layers to
        choose from keeps this default, which refuses.
        """
        raise TypeError(
            f"encoder_top_layers needs an encoder that says which its top layers are; "
            f"{type(self).__name__} has neither known layers nor a top_layers(n) -> list[nn.Module] of "
            "its own. Use train_encoder: true to train all of it"
        )
