"""Connectors: map encoder frames to a few embeddings in the language model's input space.

Component layer: imports torch only. A connector is told its input and output widths by
:class:`~ecglm.module.ECGLanguageModel` (``configure``) once the encoder and backbone exist, so a
recipe only states what is a real choice (number of tokens, hidden width, pooling).

Connectors compute in their own (full) precision; the backbone casts their output to its embedding
dtype where it splices the ECG tokens in (:meth:`ecglm.backbones.Backbone.splice`), so a bf16 or
4-bit LM takes an fp32 connector as it is. ``docs/connectors.md`` describes every option.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: How a connector pools a sequence into ``num_tokens`` tokens.
Pooling = Literal["adaptive_avg", "mean", "attention"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


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

    @property
    def num_parameters(self) -> int:
        """Number of parameters (0 until the connector is built)."""
        return sum(p.numel() for p in self.parameters())

    @abstractmethod
    def build(self, input_dim: int, output_dim: int) -> None:
        """Create the parameters for these widths."""

    @abstractmethod
    def forward(self, frames: Tensor) -> Tensor:
        """Map ``(batch, frames, input_dim)`` to ``(batch, num_tokens, output_dim)``."""


# --- pooling -----------------------------------------------------------------------------------------


def adaptive_average_pool(frames: Tensor, num_tokens: int) -> Tensor:
    """Average consecutive frames into ``num_tokens`` groups (``num_tokens=1`` is the mean).

    Group ``i`` of ``T`` frames spans ``[floor(i T / k), ceil((i + 1) T / k))``; groups overlap by a
    frame when ``k`` does not divide ``T``.
    """
    return F.adaptive_avg_pool1d(frames.transpose(1, 2), num_tokens).transpose(1, 2)


class AdaptiveAvgPool(nn.Module):
    """``k`` averages of consecutive frames (keeps coarse temporal order); no parameters."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, frames: Tensor) -> Tensor:
        return adaptive_average_pool(frames, self.num_tokens)


class MeanPool(nn.Module):
    """The mean over all frames: one token; no parameters."""

    def forward(self, frames: Tensor) -> Tensor:
        return frames.mean(dim=1, keepdim=True)


class AttentionPool(nn.Module):
    """``k`` learned queries cross-attend over the frames (a Perceiver / Q-Former-lite pooler).

    ``pooled = MultiheadAttention(query=Q, key=LayerNorm(frames), value=LayerNorm(frames))``, with
    ``Q`` a learned ``(k, width)`` matrix. Attention runs at the frames' own width (the heads split
    it); the connector's projection to the LM's width comes after. The frames carry no position
    here: the pooler is invariant to their order, so temporal order must come from the encoder
    (wav2vec2's convolutional positional embedding gives it) or from a position embedding added
    beforehand (:class:`EncoderFreeConnector`).
    """

    def __init__(self, num_tokens: int, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attention pooling: num_heads={num_heads} must divide the pooled width {width}")
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)

    def forward(self, frames: Tensor) -> Tensor:
        keys = self.norm(frames)
        queries = self.queries.unsqueeze(0).expand(frames.shape[0], -1, -1)
        return self.attn(queries, keys, keys, need_weights=False)[0]


def check_pooling(pooling: str, num_tokens: int) -> None:
    """Refuse an unknown pooling, and ``mean`` with more than one token, before anything is built."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if pooling == "mean" and num_tokens != 1:
        raise ValueError(
            f"pooling='mean' gives one token (the mean over all frames), not num_tokens={num_tokens}; "
            "use 'adaptive_avg' (k groups of consecutive frames) or 'attention' (k learned queries)"
        )


def make_pooling(pooling: str, num_tokens: int, width: int, num_heads: int) -> nn.Module:
    """The pooling module for :data:`Pooling` ``pooling`` over sequences of ``width`` features."""
    check_pooling(pooling, num_tokens)
    if pooling == "attention":
        return AttentionPool(num_tokens, width, num_heads)
    return MeanPool() if pooling == "mean" else AdaptiveAvgPool(num_tokens)


# --- connectors over encoder frames --------------------------------------------------------------------


class MLPConnector(Connector):
    """Pool the frames into ``num_tokens`` tokens, then a 2-layer MLP with GELU.

    Args:
        num_tokens: ECG tokens given to the language model (k).
        hidden_dim: Width of the MLP's hidden layer; defaults to the output width.
        input_norm: ``"batch"`` standardises the pooled features across the batch (BatchNorm)
            before the MLP. Features of an encoder without pretraining vary little from ECG to ECG
            beside what all ECGs share, and the connector learns far faster from standardised
            ones (the quickstart does not learn its questions in budget without it).
        input_dim: Encoder width (set by ``ECGLanguageModel``; give it with ``output_dim`` to build now).
        output_dim: LM width (set by ``ECGLanguageModel``).
        pooling: ``"adaptive_avg"`` (k averages of consecutive frames), ``"mean"`` (one token, the
            mean over all frames) or ``"attention"`` (k learned queries, :class:`AttentionPool`).
        num_heads: Heads of attention pooling; must divide the encoder width.
    """

    def __init__(
        self,
        num_tokens: int = 1,
        hidden_dim: int | None = None,
        input_norm: str | None = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
        pooling: Pooling = "adaptive_avg",
        num_heads: int = 4,
    ):
        if input_norm not in (None, "batch"):
            raise ValueError(f"input_norm must be None or 'batch', got {input_norm!r}")
        check_pooling(pooling, num_tokens)
        self.hidden_dim = hidden_dim
        self.input_norm = input_norm
        self.pooling = pooling
        self.num_heads = num_heads
        super().__init__(num_tokens, input_dim, output_dim)

    def build(self, input_dim: int, output_dim: int) -> None:
        hidden = self.hidden_dim or output_dim
        self.pool = make_pooling(self.pooling, self.num_tokens, input_dim, self.num_heads)
        self.norm = nn.BatchNorm1d(input_dim) if self.input_norm == "batch" else None
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim))

    def forward(self, frames: Tensor) -> Tensor:
        pooled = self.pool(frames)
        if self.norm is not None:
            pooled = self.norm(pooled.transpose(1, 2)).transpose(1, 2)
        return self.mlp(pooled)


class LinearConnector(Connector):
    """Pool the frames into ``num_tokens`` tokens, then one linear projection.

    Args:
        num_tokens: ECG tokens given to the language model (k).
        input_dim: Encoder width (set by ``ECGLanguageModel``).
        output_dim: LM width (set by ``ECGLanguageModel``).
        pooling: As in :class:`MLPConnector`.
        num_heads: Heads of attention pooling; must divide the encoder width.
    """

    def __init__(
        self,
        num_tokens: int = 1,
        input_dim: int | None = None,
        output_dim: int | None = None,
        pooling: Pooling = "adaptive_avg",
        num_heads: int = 4,
    ):
        check_pooling(pooling, num_tokens)
        self.pooling = pooling
        self.num_heads = num_heads
        super().__init__(num_tokens, input_dim, output_dim)

    def build(self, input_dim: int, output_dim: int) -> None:
        self.pool = make_pooling(self.pooling, self.num_tokens, input_dim, self.num_heads)
        self.proj = nn.Linear(input_dim, output_dim)

    def forward(self, frames: Tensor) -> Tensor:
        return self.proj(self.pool(frames))


# --- encoder-free --------------------------------------------------------------------------------------


class EncoderFreeConnector(Connector):
    """The raw signal straight to LM tokens, with no ECG encoder (the ELF line of work).

    Use it with the identity encoder ``raw`` (:class:`~ecglm.encoders.RawECGEncoder`), whose frames
    are the samples themselves, ``(batch, num_samples, leads)``. The signal is cut into
    ``num_samples / patch_size`` patches of ``patch_size`` consecutive samples over all leads, each
    flattened to ``patch_size * leads`` values (time-major), then::

        patch token = GELU(Linear(patch) + position)       # (batch, patches, hidden)
        tokens      = Linear(pool(patch tokens))            # (batch, k, output_dim)

    a 2-layer GELU MLP whose hidden layer is pooled into ``k`` tokens; ``position`` is a learned
    embedding per patch, so attention pooling knows where each patch lies in time.
    ``patch_size=None`` makes the whole signal one patch (the flattened ``leads * num_samples``
    input of ELF); there is then one patch, and ``num_tokens`` must be 1.

    Args:
        num_tokens: ECG tokens given to the language model (k); at most the number of patches.
        patch_size: Samples per patch; must divide ``num_samples``. ``None``: the whole signal.
        num_samples: Samples per lead of every input (the encoder's ``preprocessing.num_samples``).
        hidden_dim: Width of the patch tokens; defaults to the output width.
        pooling: How patch tokens become k tokens, as in :class:`MLPConnector`.
        num_heads: Heads of attention pooling; must divide ``hidden_dim``.
        input_dim: Leads (set by ``ECGLanguageModel`` from the ``raw`` encoder's ``output_dim``).
        output_dim: LM width (set by ``ECGLanguageModel``).
    """

    def __init__(
        self,
        num_tokens: int = 1,
        patch_size: int | None = 50,
        num_samples: int = 2500,
        hidden_dim: int | None = None,
        pooling: Pooling = "adaptive_avg",
        num_heads: int = 4,
        input_dim: int | None = None,
        output_dim: int | None = None,
    ):
        patch_size = num_samples if patch_size is None else patch_size
        if patch_size < 1 or num_samples % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide num_samples={num_samples}")
        num_patches = num_samples // patch_size
        if num_tokens > num_patches:
            raise ValueError(
                f"num_tokens={num_tokens} is more than the {num_patches} patch(es) of {patch_size} samples; "
                "use smaller patches or fewer tokens"
            )
        check_pooling(pooling, num_tokens)
        self.patch_size = patch_size
        self.num_samples = num_samples
        self.num_patches = num_patches
        self.hidden_dim = hidden_dim
        self.pooling = pooling
        self.num_heads = num_heads
        super().__init__(num_tokens, input_dim, output_dim)

    def build(self, input_dim: int, output_dim: int) -> None:
        hidden = self.hidden_dim or output_dim
        self.patch_embed = nn.Linear(self.patch_size * input_dim, hidden)
        self.position = nn.Parameter(torch.randn(self.num_patches, hidden) * 0.02)
        self.pool = make_pooling(self.pooling, self.num_tokens, hidden, self.num_heads)
        self.proj = nn.Linear(hidden, output_dim)

    def patches(self, signal: Tensor) -> Tensor:
        """``(batch, num_samples, leads)`` -> ``(batch, patches, patch_size * leads)``."""
        batch, samples, leads = signal.shape
        if (samples, leads) != (self.num_samples, self.input_dim):
            raise ValueError(
                f"EncoderFreeConnector expects the raw signal, (batch, {self.num_samples}, {self.input_dim}) "
                f"as the `raw` encoder gives it; got {tuple(signal.shape)}"
            )
        return signal.reshape(batch, self.num_patches, self.patch_size * leads)

    def forward(self, frames: Tensor) -> Tensor:
        tokens = F.gelu(self.patch_embed(self.patches(frames)) + self.position)
        return self.proj(self.pool(tokens))


class PassThroughConnector(Connector):
    """No connector: the encoder's output goes to the backbone as it is. For a vision-language
    backbone, whose own projector maps its vision tower's features (:class:`ecglm.encoders.BackbonePixels`
    hands it the images); ``num_tokens`` is then the positions the backbone gives each image."""

    def build(self, input_dim: int, output_dim: int) -> None:
        pass

    def forward(self, frames: Tensor) -> Tensor:
        return frames
