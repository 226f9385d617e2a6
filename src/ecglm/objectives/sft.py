"""Supervised fine-tuning: the next-token loss of the reference answers (the default objective)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ecglm.batch import ECGQABatch
from ecglm.objectives.base import Objective

if TYPE_CHECKING:
    from ecglm.module import ECGLanguageModel


class SFT(Objective):
    """The mean cross-entropy of the answer tokens (teacher forcing), logged as ``train/loss``."""

    stage = "sft"

    def training_step(self, task: ECGLanguageModel, batch: ECGQABatch, batch_idx: int) -> Tensor:
        loss = task(batch).loss
        task.log("train/loss", loss, prog_bar=True, batch_size=len(batch.key))
        return loss
