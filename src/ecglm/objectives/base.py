"""The objective of the training task: what a training step optimises (SFT, GRPO, DPO, ...).

:class:`ecglm.module.ECGLanguageModel` hands each training batch to its objective; everything else
(components, PEFT policy, data, checkpoints, schedules, evaluation) is the task's and stays the
same whatever the objective. Objectives are registered under the entry-point group
``ecglm.objectives``; a recipe names one at ``model.objective``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ecglm.batch import ECGQABatch
from ecglm.objectives.sequences import snapshot_trainable

if TYPE_CHECKING:
    from ecglm.module import ECGLanguageModel


def training_stages(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The training stages that produced a checkpoint's weights, oldest first: what it records, else
    its objective's stage, else SFT (checkpoints of SFT runs record none)."""
    record = checkpoint.get("ecglm", {})
    if record.get("stages"):
        return [dict(stage) for stage in record["stages"]]
    objective = record.get("objective")
    if objective:
        return [{"stage": objective["stage"], "init_from": objective.get("init_from")}]
    return [{"stage": "sft"}]


class Objective(ABC):
    """Base class of every training objective.

    Args:
        init_from: A checkpoint (``ecglm fit``'s ``.ckpt``) whose trained weights the run starts from,
            e.g. the SFT model that RL then improves; ignored when a fit resumes (``--ckpt_path``),
            whose checkpoint then holds the weights.
        reference: The reference policy of objectives that have one (KL penalty, DPO): ``start``, the
            model as this run starts (its trainable weights copied; nothing else is), or ``base``,
            the same weights with LoRA adapters switched off (the base LLM; no copy of adapters).
    """

    #: The training stage this objective produces, recorded in checkpoints and reports.
    stage = "sft"

    def __init__(self, init_from: str | None = None, reference: str = "start"):
        if reference not in ("start", "base"):
            raise ValueError(f"model.objective.init_args.reference is {reference!r}: use start or base")
        self.init_from = init_from
        self.reference_kind = reference

    @property
    def adapters_off(self) -> bool:
        """Whether the reference policy is the base LLM with LoRA adapters switched off."""
        return self.reference_kind == "base"

    @abstractmethod
    def training_step(self, task: ECGLanguageModel, batch: ECGQABatch, batch_idx: int) -> Tensor:
        """The loss of one optimisation step (logged through ``task.log``)."""

    def setup(self, task: ECGLanguageModel) -> None:
        """At fit: load :attr:`init_from` into the task (its checkpoint checked as a resume checks it)."""
        if self.init_from is None:
            task.model.training_stages = [{"stage": self.stage}]
            return
        checkpoint = torch.load(self.init_from, map_location="cpu", weights_only=True)
        if "state_dict" not in checkpoint:
            raise ValueError(
                f"{self.init_from} (model.objective.init_args.init_from) holds no state_dict: give a "
                "checkpoint that `ecglm fit` wrote (runs/<name>/checkpoints/last.ckpt)"
            )
        task.on_load_checkpoint(checkpoint)
        task.load_state_dict(checkpoint["state_dict"], strict=False)
        self.reference = None  # a new stage compares with the model it starts from
        task.model.training_stages = [
            *training_stages(checkpoint),
            {"stage": self.stage, "init_from": str(self.init_from)},
        ]

    def on_train_start(self, task: ECGLanguageModel) -> None:
        """Before the first step (after any checkpoint a resumed fit restores): an objective with a
        reference policy (:attr:`needs_reference`) takes it here, unless the checkpoint held it."""
        if self.needs_reference and self.reference is None:
            self.reference = snapshot_trainable(task.model)

    #: Whether the objective compares the policy with the reference policy of the run's start.
    needs_reference = False
    #: The reference policy's own weights (:func:`~ecglm.objectives.sequences.snapshot_trainable`).
    reference: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the objective (written into checkpoints): the reference."""
        return {"reference": self.reference} if self.needs_reference else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.needs_reference:
            self.reference = state.get("reference")
