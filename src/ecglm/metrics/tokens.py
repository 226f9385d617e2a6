"""Statistics of the answer tokens under teacher forcing: greedy token accuracy and predictive entropy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class AnswerTokenStats(Metric):
    """Greedy token accuracy and mean predictive entropy (nats) at answer positions (torchmetrics has none).

    ``logits[..., V]`` at position i predicts ``labels[...]`` at i (already shifted); positions whose label
    is ``ignore_index`` are skipped. Entropy is taken over the full vocabulary in float32.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entropy", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor, ignore_index: int = -100) -> None:
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {list(logits.shape)} must be labels {list(labels.shape)} + a vocab dim")
        keep = labels != ignore_index
        picked = logits.detach()[keep].float()
        log_probs = torch.log_softmax(picked, dim=-1)
        self.correct += (picked.argmax(-1) == labels[keep]).sum()
        self.entropy += -(log_probs.exp() * log_probs).sum(-1).double().sum()
        self.tokens += keep.sum()

    def compute(self) -> dict[str, Tensor]:
        return {"token_accuracy": self.correct / self.tokens, "mean_entropy": self.entropy / self.tokens}
