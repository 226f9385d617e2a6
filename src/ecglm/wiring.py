"""What the model side and the data side need from each other, handed over once, in one place.

The data side needs from the model: the backbone's tokenizer and ECG placeholder id (bound into the
DataModule's prompt style), how many positions each ECG takes, the encoder's preprocessing, and the
few-shot system prompts. The model side needs from the data: few-shot demonstrations drawn from the
training split, and the datasets and question types evaluation reports on. Neither reads the other
through the Trainer (``trainer.datamodule``, ``trainer.lightning_module``).
"""

from __future__ import annotations

import warnings
from typing import Any

from ecglm.module import ECGLanguageModel
from ecglm.prompts import ChatTemplate, PromptStyle


def connect(model: ECGLanguageModel, data: Any) -> None:
    """Connect ``model`` and ``data`` (an :class:`~ecglm.data.datamodule.ECGQADataModule`, or any
    DataModule with the same optional methods), before ``fit``, ``validate``, ``test`` or ``evaluate``.

    The ``ecglm`` command calls it once both are built; code that builds them itself calls it too.
    """
    backbone = model.backbone
    prompt = _prompt_style(data, backbone)
    if prompt is not None:
        model.model.prompt = prompt.bind(
            backbone.tokenizer, backbone.placeholder_token_id, getattr(backbone, "ecg_frame", ("", ""))
        )
    if hasattr(data, "attach") and prompt is not None:
        data.attach(
            prompt,
            model.num_ecg_tokens,
            system_prompts=model.system_prompts,
            preprocessing=getattr(model.encoder, "preprocessing", None),
            image_size=model.model.image_size,
        )
        model.model.printout = getattr(data, "image", None)  # as resized for this model by attach
    if getattr(data, "packed", False):
        model.model.check_packing()  # before any weight trains, not at the first batch
    model.connect_data(
        sample_demonstrations=getattr(data, "sample_demonstrations", None),
        eval_groups=getattr(data, "eval_groups", None),
    )


def _prompt_style(data: Any, backbone: Any) -> PromptStyle | None:
    """The data side's prompt style, or, where the recipe names none, the one a backbone written for
    ecglm 0.1 asks for (its ``system_prompt`` / ``max_length`` or ``build_formatter``; deprecated,
    warned about when the backbone was built), which then becomes the data side's too."""
    prompt = getattr(data, "prompt", None)
    legacy = getattr(backbone, "_legacy_prompt", None)
    if legacy is None or prompt is legacy:
        return prompt
    if prompt is not None and not _is_default(prompt):
        warnings.warn(
            f"{type(backbone).__name__}'s own prompt settings (system_prompt, max_length, min_answer_tokens "
            "or build_formatter; deprecated) are not used: the recipe names a prompt style in "
            "data.init_args.prompt, which writes the prompts. Move those settings there",
            UserWarning,
            stacklevel=3,
        )
        return prompt
    if prompt is not None:
        data.prompt = legacy
    return legacy


def _is_default(prompt: PromptStyle) -> bool:
    """Whether ``prompt`` is what a DataModule holds when the recipe names none: a plain ``chat``."""
    default = ChatTemplate()
    settings = ("system_prompt", "max_length", "min_answer_tokens", "prompt_cache_size")
    return type(prompt) is ChatTemplate and all(getattr(prompt, s) == getattr(default, s) for s in settings)
