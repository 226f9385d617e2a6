"""ECG encoders: modules that turn a batch of 12-lead signals into a sequence of frame embeddings.

Component layer: imports torch only. Subclass :class:`ECGEncoder` to add an encoder and register it
under the ``ecglm.encoders`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class ECGEncoder(nn.Module, ABC):
    """Base class of every ECG encoder.

    Subclasses set ``output_dim`` (the width of each output frame) in ``__init__`` and implement
    :meth:`forward`. ``pretrained`` says whether the weights come from a checkpoint that can be
    loaded again; weights that cannot (a randomly initialised encoder) are saved in ecglm's
    checkpoints even when frozen, so that a resumed or evaluated run sees the same encoder.
    """

    output_dim: int
    pretrained: bool = False

    @abstractmethod
    def forward(self, ecg: Tensor) -> Tensor:
        """Encode ``ecg`` of shape ``(batch, leads, samples)`` into ``(batch, frames, output_dim)``."""


class _SamePad(nn.Module):
    """Drops the extra frame that an even-sized, centre-padded convolution produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : -self.remove] if self.remove else x


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's strided convolution stack over the leads (GroupNorm on the first layer only)."""

    def __init__(self, in_channels: int, conv_layers: Sequence[Sequence[int]], dropout: float = 0.0):
        super().__init__()
        layers = []
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            block = [nn.Conv1d(in_channels, dim, kernel, stride=stride, bias=False), nn.Dropout(dropout)]
            if i == 0:
                block.append(nn.GroupNorm(dim, dim, affine=True))
            block.append(nn.GELU())
            layers.append(nn.Sequential(*block))
            in_channels = dim
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.conv_layers:
            x = layer(x)
        return x


class ConvPositionalEmbedding(nn.Module):
    """Grouped, weight-normalised convolution that gives wav2vec 2.0 its relative positions."""

    def __init__(self, dim: int, kernel_size: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, _SamePad(kernel_size), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fairseq's parameter names (``q_proj`` ... ``out_proj``).

    Written out rather than taken from ``nn.MultiheadAttention`` so that fairseq-signals'
    attention and feed-forward weights keep their names here.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    """One wav2vec 2.0 encoder layer, post-LN by default (as in fairseq-signals' ECG models)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, layer_norm_first: bool):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.self_attn = SelfAttention(dim, num_heads, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        return self.final_layer_norm(x + self._ffn(x))


class TransformerEncoder(nn.Module):
    def __init__(
        self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float, layer_norm_first: bool
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, ffn_dim, dropout, layer_norm_first) for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm_first else x


class Wav2Vec2ECGEncoder(ECGEncoder):
    """The wav2vec 2.0 architecture over 12-lead ECGs, as in fairseq-signals' ``ecg_transformer``.

    The defaults are the CMSC / ECG-FM size: four ``(256, 2, 2)`` convolutions turn 2,500 samples
    into 156 frames, projected to 768 and fed through 12 post-LN transformer layers.

    Args:
        in_channels: Number of leads.
        conv_layers: ``(channels, kernel, stride)`` of each convolution.
        embed_dim: Transformer width (and ``output_dim``).
        num_layers: Transformer layers.
        num_heads: Attention heads.
        ffn_dim: Feed-forward width.
        dropout: Dropout in the feature extractor and transformer.
        conv_pos_kernel: Kernel of the convolutional positional embedding.
        conv_pos_groups: Groups of the convolutional positional embedding.
        layer_norm_first: Pre-LN layers instead of fairseq-signals' post-LN.
    """

    def __init__(
        self,
        in_channels: int = 12,
        conv_layers: Sequence[tuple[int, int, int]] = ((256, 2, 2),) * 4,
        embed_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        dropout: float = 0.1,
        conv_pos_kernel: int = 128,
        conv_pos_groups: int = 16,
        layer_norm_first: bool = False,
    ):
        super().__init__()
        self.output_dim = embed_dim
        self.in_channels = in_channels
        feature_dim = conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(in_channels, conv_layers, dropout)
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.post_extract_proj = (
            nn.Linear(feature_dim, embed_dim) if feature_dim != embed_dim else nn.Identity()
        )
        self.dropout_input = nn.Dropout(dropout)
        self.conv_pos = ConvPositionalEmbedding(embed_dim, conv_pos_kernel, conv_pos_groups)
        self.encoder = TransformerEncoder(
            embed_dim, num_layers, num_heads, ffn_dim, dropout, layer_norm_first
        )

    def forward(self, ecg: Tensor) -> Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        features = self.layer_norm(self.feature_extractor(ecg).transpose(1, 2))
        x = self.dropout_input(self.post_extract_proj(features))
        return self.encoder(x + self.conv_pos(x))
