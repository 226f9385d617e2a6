"""What the model side and the data side need from each other, handed over once, in one place.

The data side needs from the model: the backbone's tokenizer and ECG placeholder id (bound into the
DataModule's prompt style), how many positions each ECG takes, the encoder's preprocessing, and the
few-shot system prompts. The model side needs from the data: few-shot demonstrations drawn from the
training split, and the datasets and question types evaluation reports on. Neither reads the other
through the Trainer (``trainer.datamodule``, ``trainer.lightning_module``).
"""

from __future__ import annotations

from typing import Any

from ecglm.module import ECGLanguageModel


def connect(model: ECGLanguageModel, data: Any) -> None:
    """Connect ``model`` and ``data`` (an :class:`~ecglm.data.datamodule.ECGQADataModule`, or any
    DataModule with the same optional methods), before ``fit``, ``validate``, ``test`` or ``evaluate``.

    The ``ecglm`` command calls it once both are built; code that builds them itself calls it too.
    """
    backbone = model.backbone
    prompt = getattr(data, "prompt", None)
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
