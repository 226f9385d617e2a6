"""Encoders of ECG images, the image-ECG path.

They read the printouts the data side draws (:class:`ecglm.render.ECGPrintout`), ``(batch, 3, height,
width)`` uint8, and give frames like any encoder, so a connector and any text LLM read ECG images as
they read signals (the LLaVA composition): :class:`CNNImageEncoder` and :class:`ViTImageEncoder` train
from scratch, :class:`HFVisionEncoder` wraps a transformers vision tower, and :class:`BackbonePixels`
hands the images to a vision-language backbone's own tower.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ecglm.encoders.base import ECGEncoder, Preprocessing
from ecglm.encoders.wav2vec2 import TransformerEncoder


def pixels_to_unit(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> Tensor:
    """uint8 (or 0-255 float) images as ``(x / 255 - mean) / std`` per channel, in ``dtype``."""
    x = images.to(dtype) / 255.0
    mean_ = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_) / std_


class ImageECGEncoder(ECGEncoder):
    """Base class of the encoders that read ECG images, ``(batch, 3, height, width)`` uint8.

    ``image_size`` is the ``(height, width)`` they read: the DataModule's printouts are drawn at it
    (:func:`ecglm.wiring.connect`). ``preprocessing`` is that of the signals the printouts are
    drawn from (checked against the shards' manifest as for signal encoders).
    """

    image_size: tuple[int, int]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != tuple(self.image_size):
            raise ValueError(
                f"{type(self).__name__} reads ECG images of shape (batch, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(images.shape)}: draw them with data.init_args.image "
                "(ecglm.render.ECGPrintout) at this size"
            )

    def pixels(self, images: Tensor) -> Tensor:
        """The images checked and normalised, in the encoder's precision."""
        self.check_images(images)
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        return pixels_to_unit(images, self.image_mean, self.image_std, dtype)


class ViTImageEncoder(ImageECGEncoder):
    """A small vision transformer over ECG images: square patches, learnt positions, pre-LN layers.

    ``(batch, 3, H, W)`` -> ``(batch, (H / patch) * (W / patch), embed_dim)``. For training from scratch
    on printouts (a pretrained SigLIP / CLIP tower is :class:`HFVisionEncoder`).

    Args:
        image_size: ``(height, width)`` of the images, multiples of ``patch_size``.
        patch_size: Side of the square patches, pixels.
        embed_dim: Width of every frame (``output_dim``).
        num_layers, num_heads, ffn_dim, dropout: The transformer's layers.
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (224, 448),
        patch_size: int = 16,
        embed_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image_size {tuple(image_size)} is not a multiple of patch_size {patch_size}")
        self.image_size = (height, width)
        self.output_dim = embed_dim
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        patches = (height // patch_size) * (width // patch_size)
        self.position = nn.Parameter(torch.zeros(1, patches, embed_dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.encoder = TransformerEncoder(embed_dim, num_layers, num_heads, ffn_dim, dropout, True)

    def top_layers(self, n: int) -> list[nn.Module]:
        return [*self.encoder.layers[-n:], self.encoder.layer_norm]

    def forward(self, ecg: Tensor) -> Tensor:
        x = self.patch_embed(self.pixels(ecg)).flatten(2).transpose(1, 2)
        return self.encoder(x + self.position)


class CNNImageEncoder(ImageECGEncoder):
    """A small convolutional encoder of ECG images: stride-2 3x3 convolutions with batch norm and GELU,
    each cell of the last feature map one frame, ``(batch, cells, channels[-1])``. Fast on a CPU.

    Args:
        image_size: ``(height, width)`` of the images.
        channels: Output channels of each stride-2 stage (the map shrinks 2x per stage).
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (128, 256),
        channels: Sequence[int] = (16, 32, 64, 64, 128),
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        if not channels:
            raise ValueError("channels is empty: give at least one stage")
        self.image_size = tuple(image_size)
        self.output_dim = channels[-1]
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        stages, width = [], 3
        for out in channels:
            stages.append(
                nn.Sequential(nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.GELU())
            )
            width = out
        self.stages = nn.ModuleList(stages)

    def top_layers(self, n: int) -> list[nn.Module]:
        return list(self.stages[-n:])

    def forward(self, ecg: Tensor) -> Tensor:
        x = self.pixels(ecg)
        for stage in self.stages:
            x = stage(x)
        return x.flatten(2).transpose(1, 2)


class HFVisionEncoder(ImageECGEncoder):
    """Any transformers vision tower (SigLIP, CLIP, ViT, DINOv2, ...) over ECG images: its last hidden
    states are the frames.

    Args:
        model: Hub id or folder of a vision model (``google/siglip-base-patch16-224``); with
            ``random_init``, a ``model_type`` such as ``siglip_vision_model``.
        image_size: ``(height, width)`` to feed it (default: the config's square ``image_size``).
        image_mean, image_std: Per-channel normalisation (default: the model's image processor's,
            else 0.5, SigLIP's).
        dtype: Weight dtype.
        random_init: Build the architecture with random weights (tests, training from scratch).
        config_overrides: Config fields to change (a tiny ``hidden_size`` for tests).
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        model: str,
        image_size: tuple[int, int] | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        dtype: str = "float32",
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        from transformers import AutoConfig, AutoModel

        super().__init__()
        overrides = dict(config_overrides or {})
        torch_dtype = getattr(torch, dtype)
        config = (
            AutoConfig.from_pretrained(model, **overrides)
            if os.path.isdir(model) or "/" in model
            else AutoConfig.for_model(model, **overrides)
        )
        if hasattr(config, "vision_use_head") and "vision_use_head" not in overrides:
            config.vision_use_head = False  # SigLIP's pooling head: the frames are read, not the pool
        if random_init:
            self.tower = AutoModel.from_config(config, dtype=torch_dtype)
        else:
            self.tower = AutoModel.from_pretrained(model, config=config, dtype=torch_dtype)
            mean, std = _processor_normalisation(model)
            image_mean, image_std = image_mean or mean, image_std or std
        config = self.tower.config
        side = getattr(config, "image_size", 224)
        self.image_size = tuple(image_size) if image_size is not None else (side, side)
        self.image_mean = tuple(image_mean or (0.5, 0.5, 0.5))
        self.image_std = tuple(image_std or (0.5, 0.5, 0.5))
        self.output_dim = config.hidden_size
        self.pretrained = not random_init
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        # A SigLIP / CLIP tower interpolates its position embeddings to a non-square printout.
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.tower.forward).parameters

    def top_layers(self, n: int) -> list[nn.Module]:
        encoder = getattr(self.tower, "encoder", None)
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if layers is None:
            return super().top_layers(n)
        return list(layers[-n:])

    def forward(self, ecg: Tensor) -> Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.tower(pixel_values=self.pixels(ecg), **kwargs).last_hidden_state


def _processor_normalisation(model: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The image mean and std of ``model``'s image processor, or ``(None, None)`` without one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError):
        return None, None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


class BackbonePixels(ImageECGEncoder):
    """No encoder of ecglm's own: the images as they are, for a vision-language backbone whose own
    vision tower reads them (:class:`ecglm.backbones.VisionLanguageBackbone`). No parameters.

    :class:`ecglm.model.ECGLM` puts it in the encoder's place when a recipe gives such a backbone and
    no encoder; the images pass the ``passthrough`` connector unchanged.
    """

    def __init__(self, image_size: tuple[int, int], preprocessing: Preprocessing | None = None):
        super().__init__()
        self.image_size = tuple(image_size)
        self.output_dim = 3
        self.pretrained = True  # nothing to save
        self.preprocessing = preprocessing or Preprocessing()

    def forward(self, ecg: Tensor) -> Tensor:
        self.check_images(ecg)
        return ecg
