"""DPO (Rafailov et al., 2023): preference optimisation on chosen / rejected answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ecglm.batch import ECGQABatch, TokenFields
from ecglm.model import ECGLM
from ecglm.objectives.base import Objective
from ecglm.objectives.losses import dpo_loss
from ecglm.objectives.sequences import (
    answer_rows,
    completion_logprobs,
    prompt_fields,
    reference_policy,
    snapshot_trainable,
)

if TYPE_CHECKING:
    from ecglm.module import ECGLanguageModel


class DPO(Objective):
    """Direct Preference Optimization on QA pairs that carry ``chosen`` and ``rejected`` answers.

    The policy's and the reference's summed log-probabilities of both answers after the same prompt
    and ECG go into DPO's sigmoid loss. The reference is the policy at the start of the run (LoRA
    adapters off, the other trainable weights as they were), as in :class:`~ecglm.objectives.GRPO`.

    The loss is TRL's ``sigmoid`` DPO loss (checked against ``trl.DPOTrainer`` in the tests); TRL's
    trainer itself is not used because it owns the model, the data collator and the training loop,
    which here are ecglm's (ECG tokens spliced into the prompt, trainable-only checkpoints).

    Args:
        beta: Strength of the implicit KL constraint (DPO's beta).
        label_smoothing: Assumed probability that a preference label is flipped (cDPO; 0: plain DPO).
        sft_weight: Weight of the next-token loss of the chosen answers added to the DPO loss (RPO).
        init_from, reference: See :class:`~ecglm.objectives.base.Objective`.
    """

    stage = "dpo"
    needs_reference = True

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        init_from: str | None = None,
        reference: str = "start",
    ):
        super().__init__(init_from, reference)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"model.objective.init_args.label_smoothing is {label_smoothing}: use [0, 0.5)")
        self.beta, self.label_smoothing, self.sft_weight = beta, label_smoothing, sft_weight

    def logprobs(self, model: ECGLM, batch: ECGQABatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(policy, reference, tokens)``: per row of ``[chosen rows; rejected rows]``, the summed
        log-probabilities of the answer, and the answer token counts."""
        if batch.chosen is None or batch.rejected is None:
            raise ValueError(
                f"DPO needs preference pairs: the QA pairs of this batch ({batch.key[:3]} ...) have no "
                "'chosen' and 'rejected' answers (build the shards from pairs: docs/training.md)"
            )
        prompt = prompt_fields(batch)
        both = TokenFields(
            *(torch.cat([t, t]) for t in (prompt.input_ids, prompt.attention_mask, prompt.ecg_mask))
        )
        ecg = torch.cat([batch.ecg, batch.ecg])
        tokens, mask = answer_rows(model, both, [*batch.chosen, *batch.rejected])
        policy = completion_logprobs(model, both, model.ecg_tokens(ecg), tokens, mask).sum(1)
        with torch.no_grad(), reference_policy(model, self.reference or {}, self.adapters_off):
            reference = completion_logprobs(model, both, model.ecg_tokens(ecg), tokens, mask).sum(1)
        return policy, reference, mask.sum(1)

    def training_step(self, task: ECGLanguageModel, batch: ECGQABatch, batch_idx: int) -> Tensor:
        if self.reference is None:
            self.reference = snapshot_trainable(task.model)
        policy, reference, lengths = self.logprobs(task.model, batch)
        n = len(batch.key)
        losses, chosen, rejected = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.label_smoothing
        )
        loss = losses.mean()
        if self.sft_weight:
            loss = loss - self.sft_weight * (policy[:n] / lengths[:n]).mean()
        log = {
            "loss": loss,
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracy": (chosen > rejected).float().mean(),
            "rewards/margin": (chosen - rejected).mean(),
        }
        for name, value in log.items():
            task.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=n)
        return loss
