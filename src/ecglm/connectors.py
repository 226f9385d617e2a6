"""Connectors: map encoder frames to a few embeddings in the language model's input space.

Component layer: imports torch only. A connector is told its input and output widths by
:class:`~ecglm.module.ECGLanguageModel` (``configure``) once the encoder and backbone exist, so a
recipe only states what is a real choice (number of tokens, hidden width, pooling).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.nn.functional as F
from torch import Tensor, nn


class Connector(nn.Module, ABC):
    """Base class of every connector: ``(batch, frames, input_dim) -> (batch, num_tokens, output_dim)``.

    Subclasses build their layers in :meth:`build`; pass ``input_dim`` and ``output_dim`` to the
    constructor to build at once, or leave them out and let the model call :meth:`configure`.
    """

    def __init__(self, num_tokens: int = 1, input_dim: int | None = None, output_dim: int | None = None):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.input_dim: int | None = None
        self.output_dim: int | None = None
        if input_dim is not None and output_dim is not None:
            self.configure(input_dim, output_dim)

    def configure(self, input_dim: int, output_dim: int) -> None:
        """Build the layers for these widths (once; a second call with other widths is an error)."""
        if self.input_dim is not None:
            if (self.input_dim, self.output_dim) != (input_dim, output_dim):
                raise ValueError(
                    f"{type(self).__name__} was built for {self.input_dim} -> {self.output_dim}, "
                    f"not {input_dim} -> {output_dim}"
                )
            return
        self.input_dim, self.output_dim = input_dim, output_dim
        self.build(input_dim, output_dim)

    @abstractmethod
    def build(self, input_dim: int, output_dim: int) -> None:
        """Create the parameters for these widths."""

    @abstractmethod
    def forward(self, frames: Tensor) -> Tensor:
        """Map ``(batch, frames, input_dim)`` to ``(batch, num_tokens, output_dim)``."""


def adaptive_average_pool(frames: Tensor, num_tokens: int) -> Tensor:
    """Average consecutive frames into ``num_tokens`` groups (``num_tokens=1`` is the mean)."""
    return F.adaptive_avg_pool1d(frames.transpose(1, 2), num_tokens).transpose(1, 2)


class MLPConnector(Connector):
    """Pool the frames into ``num_tokens`` groups, then a 2-layer MLP with GELU.

    Args:
        num_tokens: ECG tokens given to the language model (k).
        hidden_dim: Width of the MLP's hidden layer; defaults to the output width.
        input_norm: ``"batch"`` standardises the pooled features across the batch (BatchNorm)
            before the MLP. Features of an encoder without pretraining vary little from ECG to ECG
            beside what all ECGs share, and the connector learns far faster from standardised
            ones (the quickstart does not learn its questions in budget without it).
    """

    def __init__(
        self,
        num_tokens: int = 1,
        hidden_dim: int | None = None,
        input_norm: str | None = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
    ):
        if input_norm not in (None, "batch"):
            raise ValueError(f"input_norm must be None or 'batch', got {input_norm!r}")
        self.hidden_dim = hidden_dim
        self.input_norm = input_norm
        super().__init__(num_tokens, input_dim, output_dim)

    def build(self, input_dim: int, output_dim: int) -> None:
        hidden = self.hidden_dim or output_dim
        self.norm = nn.BatchNorm1d(input_dim) if self.input_norm == "batch" else None
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim))

    def forward(self, frames: Tensor) -> Tensor:
        pooled = adaptive_average_pool(frames, self.num_tokens)
        if self.norm is not None:
            pooled = self.norm(pooled.transpose(1, 2)).transpose(1, 2)
        return self.mlp(pooled)


class LinearConnector(Connector):
    """Pool the frames into ``num_tokens`` groups, then one linear projection."""

    def build(self, input_dim: int, output_dim: int) -> None:
        self.proj = nn.Linear(input_dim, output_dim)

    def forward(self, frames: Tensor) -> Tensor:
        return self.proj(adaptive_average_pool(frames, self.num_tokens))
