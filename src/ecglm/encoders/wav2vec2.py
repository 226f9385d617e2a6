"""The wav2vec 2.0 architecture over 12-lead ECGs (fairseq-signals' ``ecg_transformer``): its layers and
:class:`Wav2Vec2ECGEncoder`, which also imports fairseq-signals / ECG-FM checkpoints (the file format
itself is read in :mod:`ecglm.encoders.fairseq`).

The layers keep fairseq-signals' parameter names, so that a checkpoint's weights load by name.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecglm.encoders.base import ECGEncoder, Preprocessing, PreprocessingMismatchWarning
from ecglm.encoders.fairseq import (
    ARCHITECTURE_DEFAULTS,
    CheckpointImportError,
    FairseqLayout,
    _describe_ignored,
    _key_list,
    _no_architecture_message,
    _size_conflict,
    architecture_from_fairseq,
    convert_fairseq_state_dict,
    fairseq_sample_rate,
    find_fairseq_model_config,
    load_fairseq_checkpoint,
    parse_conv_layers,
    stated_architecture,
)

log = logging.getLogger(__name__)


class _SamePad(nn.Module):
    """Drops the extra frame that an even-sized, centre-padded convolution produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : -self.remove] if self.remove else x


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's strided convolution stack over the leads (GroupNorm on the first layer only)."""

    def __init__(
        self,
        in_channels: int,
        conv_layers: Sequence[Sequence[int]],
        dropout: float = 0.0,
        conv_bias: bool = False,
    ):
        super().__init__()
        layers = []
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            block = [nn.Conv1d(in_channels, dim, kernel, stride=stride, bias=conv_bias), nn.Dropout(dropout)]
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
    into 156 frames, projected to 768 and fed through 12 post-LN transformer layers. With
    ``checkpoint``, the architecture comes from the file's config (:func:`find_fairseq_model_config`:
    ``cfg['model']``, ``args``, or the pretrained model's config a fine-tuned file keeps in them) and
    its weights are loaded (``pretrained`` is then True); size arguments may be left out, and one that
    contradicts the file is an error. A file that states no architecture needs every size argument.
    An imported encoder is returned in eval mode (no dropout); ``.train()`` turns dropout back on, as
    :class:`ecglm.module.ECGLanguageModel` does for an encoder that trains.

    Args:
        in_channels: Number of leads (default 12).
        conv_layers: ``(channels, kernel, stride)`` of each convolution (default ``((256, 2, 2),) * 4``).
        embed_dim: Transformer width and ``output_dim`` (default 768).
        num_layers: Transformer layers (default 12).
        num_heads: Attention heads (default 12).
        ffn_dim: Feed-forward width (default 3072).
        dropout: Dropout in the feature extractor and transformer.
        conv_pos_kernel: Kernel of the convolutional positional embedding (default 128).
        conv_pos_groups: Groups of the convolutional positional embedding (default 16).
        layer_norm_first: Pre-LN layers instead of fairseq-signals' post-LN (default False).
        conv_bias: Biases in the feature extractor's convolutions (default False).
        sampling_rate: Expected sampling rate in Hz (default: the checkpoint's ``cfg['task']['sample_rate']``,
            else 250).
        num_samples: Expected samples per lead.
        normalization: Expected normalisation, one of :data:`NORMALIZATIONS`.
        checkpoint: A fairseq-signals / ECG-FM ``.pt`` file to import.
        strict: With ``checkpoint``, refuse keys the encoder does not know (missing keys and shape
            mismatches are always refused).
        trust_pickle: With ``checkpoint``, unpickle any object in the file (runs arbitrary code).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        conv_layers: Sequence[tuple[int, int, int]] | None = None,
        embed_dim: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        conv_pos_kernel: int | None = None,
        conv_pos_groups: int | None = None,
        layer_norm_first: bool | None = None,
        conv_bias: bool | None = None,
        sampling_rate: int | None = None,
        num_samples: int = 2500,
        normalization: str = "zscore",
        checkpoint: str | None = None,
        strict: bool = True,
        trust_pickle: bool = False,
    ):
        super().__init__()
        given = {
            "in_channels": in_channels,
            "conv_layers": conv_layers,
            "embed_dim": embed_dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
            "conv_pos_kernel": conv_pos_kernel,
            "conv_pos_groups": conv_pos_groups,
            "layer_norm_first": layer_norm_first,
            "conv_bias": conv_bias,
        }
        given = {k: v for k, v in given.items() if v is not None}
        ckpt = load_fairseq_checkpoint(checkpoint, trust_pickle=trust_pickle) if checkpoint else None
        arch = self._architecture(given, ckpt, checkpoint)
        rate = self._sampling_rate(sampling_rate, ckpt, checkpoint)
        self.preprocessing = Preprocessing(rate, num_samples, normalization)
        self._build(dropout=dropout, **arch)
        self.checkpoint = os.fspath(checkpoint) if checkpoint else None
        if ckpt is not None:
            self.load_fairseq_state_dict(ckpt["model"], strict=strict, source=self.checkpoint)
            self.pretrained = True
            # Imported weights are mostly used as they are (frozen, or to encode); whatever trains them
            # calls .train() (ECGLanguageModel does), so eval is the mode that cannot silently add dropout.
            self.eval()

    @staticmethod
    def _architecture(given: dict[str, Any], ckpt: Mapping | None, path: str | None) -> dict[str, Any]:
        if "conv_layers" in given:
            given["conv_layers"] = parse_conv_layers(given["conv_layers"])
        if ckpt is None:
            return {**ARCHITECTURE_DEFAULTS, **given}
        config, where, looked = find_fairseq_model_config(ckpt)
        if config is None:
            missing = [k for k in ARCHITECTURE_DEFAULTS if k not in given]
            if missing:
                raise CheckpointImportError(_no_architecture_message(f"checkpoint {path}", looked, missing))
            return given
        stated = stated_architecture(config)
        arch = architecture_from_fairseq(config)
        conflicts = [_size_conflict(k, v, stated) for k, v in given.items() if v != arch[k]]
        if conflicts:
            raise ValueError(
                f"the architecture comes from {where} of checkpoint {path}, and these arguments contradict "
                f"it: {'; '.join(conflicts)}. Leave them out, or use a checkpoint of that size."
            )
        return arch

    @staticmethod
    def _sampling_rate(given: int | None, ckpt: Mapping | None, path: str | None) -> int:
        trained = fairseq_sample_rate(ckpt) if ckpt is not None else None
        if given is None:
            return trained or Preprocessing.sampling_rate
        if trained is not None and given != trained:
            warnings.warn(
                f"checkpoint {path} was trained on {trained} Hz ECGs (cfg['task']['sample_rate']) but "
                f"sampling_rate={given} was given: the encoder will expect {given} Hz input. Leave "
                "sampling_rate out to use the rate it was trained at.",
                PreprocessingMismatchWarning,
                stacklevel=3,
            )
        return given

    def _build(
        self,
        *,
        in_channels: int,
        conv_layers: Sequence[tuple[int, int, int]],
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        conv_pos_kernel: int,
        conv_pos_groups: int,
        layer_norm_first: bool,
        conv_bias: bool,
    ) -> None:
        self.output_dim = embed_dim
        self.in_channels = in_channels
        self.conv_layers = tuple(conv_layers)
        feature_dim = conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(in_channels, conv_layers, dropout, conv_bias)
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.post_extract_proj = (
            nn.Linear(feature_dim, embed_dim) if feature_dim != embed_dim else nn.Identity()
        )
        self.dropout_input = nn.Dropout(dropout)
        self.conv_pos = ConvPositionalEmbedding(embed_dim, conv_pos_kernel, conv_pos_groups)
        self.encoder = TransformerEncoder(
            embed_dim, num_layers, num_heads, ffn_dim, dropout, layer_norm_first
        )

    @classmethod
    def from_fairseq_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        strict: bool = True,
        map_location: str | torch.device = "cpu",
        trust_pickle: bool = False,
        **overrides: Any,
    ) -> Wav2Vec2ECGEncoder:
        """Import a fairseq-signals / ECG-FM checkpoint (pretrained or fine-tuned), in eval mode.

        The architecture comes from the file; ``overrides`` may set the other constructor arguments
        (``dropout``, ``sampling_rate``, ``num_samples``, ``normalization``) and repeat size arguments
        that agree with the file (or give all of them, for a file that states none). The encoder is
        moved to ``map_location`` after loading; call ``.train()`` to train it with dropout.
        """
        encoder = cls(checkpoint=os.fspath(path), strict=strict, trust_pickle=trust_pickle, **overrides)
        return encoder.to(map_location)

    def load_fairseq_state_dict(
        self, state: Mapping[str, Tensor], *, strict: bool = True, source: str = "state dict"
    ) -> list[str]:
        """Load fairseq-signals weights exactly; return the file's keys that were left out on purpose.

        Missing keys and shape mismatches always raise :class:`CheckpointImportError` listing them;
        unknown keys raise too unless ``strict=False`` (then they are listed in a warning). Every key is
        named as the file spells it (its prefix, its weight-norm names), missing ones included.
        """
        converted, keys_in_file, ignored = convert_fairseq_state_dict(state)
        layout = FairseqLayout.of(state)
        expected = self.state_dict()
        missing = sorted(layout.file_key(k) for k in set(expected) - set(converted))
        unknown = sorted(keys_in_file[k] for k in set(converted) - set(expected))
        if missing or (unknown and strict):
            raise CheckpointImportError(
                f"{source} does not fit this Wav2Vec2ECGEncoder (nothing was loaded).\n"
                f"  missing from the file ({len(missing)}): {_key_list(missing)}\n"
                f"  unknown to the encoder ({len(unknown)}): {_key_list(unknown)}"
            )
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys unknown to the encoder (strict=False): {unknown}", stacklevel=2
            )
        shapes = [
            f"{keys_in_file[k]}: file {tuple(converted[k].shape)} vs encoder {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(converted[k].shape) != tuple(v.shape)
        ]
        if shapes:
            raise CheckpointImportError(f"{source}: shape mismatch (nothing was loaded): {'; '.join(shapes)}")
        self.load_state_dict({k: converted[k] for k in expected}, strict=True)
        if ignored:
            described = _describe_ignored(ignored, layout.prefix)
            log.info("%s: left out %d unused keys (%s)", source, len(ignored), described)
        return ignored

    def top_layers(self, n: int) -> list[nn.Module]:
        """The last ``n`` transformer layers and, in a pre-LN encoder (``layer_norm_first``), the norm
        applied after them; in the post-LN layout of fairseq-signals that norm comes before the first
        layer and stays frozen, as do the convolutions, projection and positional convolution."""
        layers = self.encoder.layers
        if not 1 <= n <= len(layers):
            raise ValueError(f"encoder_top_layers must be between 1 and {len(layers)} (its layers); got {n}")
        top: list[nn.Module] = list(layers[len(layers) - n :])
        if self.encoder.layer_norm_first:
            top.append(self.encoder.layer_norm)
        return top

    def num_frames(self, num_samples: int) -> int:
        """Frames returned for ``num_samples`` input samples: ``floor((n - k) / s) + 1`` per convolution."""
        for _, kernel, stride in self.conv_layers:
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples

    def forward(self, ecg: Tensor) -> Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        features = self.layer_norm(self.feature_extractor(ecg).transpose(1, 2))
        x = self.dropout_input(self.post_extract_proj(features))
        return self.encoder(x + self.conv_pos(x))
