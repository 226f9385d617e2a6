"""The evaluation conditions: one registry of the ways a model is shown each question.

Every evaluation answers each question with the real ECG (``ecg``) and under controls that take the
signal away in different ways; the gap between ``ecg`` and each control is the evidence that a model
reads the signal. A :class:`Condition` says what it is called, how it changes the model's inputs,
what it needs, and whether it runs by default. :meth:`ecglm.model.ECGLM.condition_inputs` dispatches
through this registry, and evaluation (:mod:`ecglm.evaluation`) derives its controls, every table
and every gap from it: a condition registered here is run, tabled and compared with no other list
to update.

Conditions are kept in the order reports show their gaps: the real ECG first, then the controls
from the closest to the real input (another record's ECG, in distribution) to the farthest (no ECG
positions at all).

Component layer: imports torch only.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ecglm.errors import EcglmError

if TYPE_CHECKING:
    from ecglm.batch import ECGQABatch, TokenFields
    from ecglm.model import ECGLM

#: ``inputs(model, batch, prompt)``: the prompt rows and ECG tokens the LLM is given; ``prompt``
#: (``None``: the batch's own token fields) replaces the batch's prompt rows where the condition keeps them.
Inputs = Callable[["ECGLM", "ECGQABatch", "TokenFields | None"], "tuple[TokenFields, Tensor]"]


class UnknownConditionError(EcglmError, ValueError):
    """A condition name that is not registered."""


@dataclass(frozen=True)
class Condition:
    """One way of showing a model each question.

    Args:
        name: What recipes (``model.evaluation.conditions``), records and reports call it.
        description: What the LLM sees, in one line.
        inputs: ``inputs(model, batch, prompt)`` -> ``(prompt rows, ECG tokens)`` (see :data:`Inputs`).
        needs_donors: It reads other records' ECGs (``batch.shuffled_ecg``, drawn by
            :class:`ecglm.data.controls.ECGDonors`): generation batches must carry them, and each
            answer records its donor.
        control: A control, compared with ``ecg`` in every gap (everything but ``ecg`` itself).
        default: Run by every evaluation unless ``model.evaluation.conditions`` says otherwise.
        vision_language: Applies to a model whose vision-language backbone reads the images with its
            own tower (``False`` where the condition needs an encoder of ecglm's own).
    """

    name: str
    description: str
    inputs: Inputs
    needs_donors: bool = False
    control: bool = True
    default: bool = False
    vision_language: bool = True


_REGISTRY: dict[str, Condition] = {}


def register(condition: Condition, replace: bool = False) -> Condition:
    """Add ``condition`` after those registered; ``replace`` swaps one of the same name in place."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", condition.name):
        raise ValueError(
            f"condition name {condition.name!r}: use lower-case letters, digits and _ (it names metric "
            "collections, MLflow metrics and report columns)"
        )
    if condition.name in _REGISTRY and not replace:
        raise ValueError(f"condition {condition.name!r} is already registered (pass replace=True to swap it)")
    _REGISTRY[condition.name] = condition
    return condition


def unregister(name: str) -> Condition:
    """Remove a registered condition (``ecg`` stays: every gap is taken against it)."""
    if name == "ecg":
        raise ValueError("the ecg condition cannot be removed: every gap is taken against it")
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> Condition:
    """The registered condition called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownConditionError(
            f"unknown condition {name!r}; choose from {', '.join(_REGISTRY)} (ecglm.conditions)"
        ) from None


def names() -> tuple[str, ...]:
    """Every registered condition, in report order."""
    return tuple(_REGISTRY)


def default_names() -> tuple[str, ...]:
    """The conditions every evaluation runs unless told otherwise."""
    return tuple(name for name, c in _REGISTRY.items() if c.default)


def control_names() -> tuple[str, ...]:
    """The conditions every gap is taken against (``ecg - control``), in report order."""
    return tuple(name for name, c in _REGISTRY.items() if c.control)


# --- what each condition gives the LLM -------------------------------------------------------------------


def matched_noise(ecg: Tensor, keys: list[str]) -> Tensor:
    """Gaussian noise with each ECG lead's own mean and std: the signal's scale, none of its content.

    For ECGs normalised per lead (z-score) that is standard normal noise, the encoder's input
    distribution without a heartbeat in it. Seeded by the QA keys, so a question gets the same noise
    in every run and on every device.
    """
    values = ecg.float()
    mean, std = values.mean(-1, keepdim=True), values.std(-1, keepdim=True)
    generator = torch.Generator().manual_seed(zlib.crc32("|".join(keys).encode()))
    noise = torch.randn(values.shape, generator=generator).to(ecg.device)
    noisy = mean + std * noise
    if not ecg.is_floating_point():  # images: 0-255 pixels
        noisy = noisy.round().clamp(0, 255)
    return noisy.to(ecg.dtype)


def _real_ecg(model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None) -> tuple[TokenFields, Tensor]:
    return prompt or batch, model.ecg_tokens(batch.ecg)


def _shuffled_ecg(model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None) -> tuple[TokenFields, Tensor]:
    return prompt or batch, model.ecg_tokens(batch.shuffled_ecg)


def _random_encoder(
    model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None
) -> tuple[TokenFields, Tensor]:
    encoder = model.random_encoder()
    return prompt or batch, model.connector(encoder(batch.ecg.to(model._encoder_dtype())))


def _noise_ecg(model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None) -> tuple[TokenFields, Tensor]:
    return prompt or batch, model.ecg_tokens(matched_noise(batch.ecg, batch.key))


def _zeroed_ecg(model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None) -> tuple[TokenFields, Tensor]:
    return prompt or batch, model.ecg_tokens(model.blank_ecg(batch.ecg))


def _text_only(model: ECGLM, batch: ECGQABatch, prompt: TokenFields | None) -> tuple[TokenFields, Tensor]:
    fields = batch.text_only
    if fields is None:
        raise ValueError(
            "a text_only condition needs generation batches (QACollator(..., for_generation=True))"
        )
    size = (fields.rows, 0, model.backbone.hidden_size)
    return fields, torch.zeros(size, device=fields.input_ids.device)


for _condition in (
    Condition(
        "ecg", "the prompt with the ECG tokens of the real signal", _real_ecg, control=False, default=True
    ),
    Condition(
        "shuffled_ecg",
        "the same prompt with the ECG of another record of the same dataset (in distribution, wrong content)",
        _shuffled_ecg,
        needs_donors=True,
        default=True,
    ),
    Condition(
        "random_encoder",
        "the real ECG through the encoder with its weights redrawn at random, then the trained connector",
        _random_encoder,
        vision_language=False,
    ),
    Condition(
        "noise_ecg", "Gaussian noise with each lead's own mean and std (the signal's scale)", _noise_ecg
    ),
    Condition(
        "zeroed_ecg",
        "the same prompt; the ECG tokens of an all-zero signal (a blank page on the image path)",
        _zeroed_ecg,
        default=True,
    ),
    Condition("text_only", "the prompt with no ECG positions at all", _text_only, default=True),
):
    register(_condition)
del _condition


# --- the module constants these replace --------------------------------------------------------------------

#: What ``ecglm.model.CONDITIONS``, ``DEFAULT_CONDITIONS`` and ``ecglm.evaluation.CONTROLS`` (deprecated
#: in 0.2.0) return: the registry read when asked, served as ``_CONDITIONS`` etc. to their module
#: ``__getattr__`` (:func:`ecglm._deprecation.moved_names`), which warns naming the function to use.
_LEGACY: dict[str, Callable[[], tuple[str, ...]]] = {
    "_CONDITIONS": names,
    "_DEFAULT_CONDITIONS": default_names,
    "_CONTROLS": control_names,
}
#: The ``moved_names`` entries of those constants, for the modules that had them.
_LEGACY_CONSTANTS = {
    "CONDITIONS": ("ecglm.conditions:_CONDITIONS", "ecglm.conditions.names()"),
    "DEFAULT_CONDITIONS": ("ecglm.conditions:_DEFAULT_CONDITIONS", "ecglm.conditions.default_names()"),
    "CONTROLS": ("ecglm.conditions:_CONTROLS", "ecglm.conditions.control_names()"),
}


def __getattr__(name: str) -> Any:
    if name in _LEGACY:
        return _LEGACY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Condition",
    "Inputs",
    "UnknownConditionError",
    "control_names",
    "default_names",
    "get",
    "matched_noise",
    "names",
    "register",
    "unregister",
]
