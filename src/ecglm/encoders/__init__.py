"""ECG encoders: modules that turn a batch of 12-lead signals (or ECG images) into frame embeddings.

Component layer: imports torch (and transformers, for :class:`HFVisionEncoder`) only. Subclass
:class:`ECGEncoder` to add an encoder and register it under the ``ecglm.encoders`` entry-point group.
Every encoder states the input it expects as a :class:`Preprocessing`; :func:`check_preprocessing`
compares it with what a dataset declares. Import every name from ``ecglm.encoders``; the files are:

- ``base.py``: :class:`ECGEncoder`, the expected-input contract (:class:`Preprocessing`, defined in
  :mod:`ecglm.ecg`; :func:`check_preprocessing`, :class:`PreprocessingMismatchWarning`);
- ``wav2vec2.py``: :class:`Wav2Vec2ECGEncoder` and its layers (``ConvFeatureExtractor``,
  ``ConvPositionalEmbedding``, ``SelfAttention``, ``TransformerLayer``, ``TransformerEncoder``);
- ``fairseq.py``: reading fairseq-signals / ECG-FM checkpoints (:func:`load_fairseq_checkpoint`,
  :func:`explain_unpickling_error`, :data:`SAFE_GLOBALS`, the architecture a file states and the
  renaming of its state dict); ``docs/encoders.md`` describes the formats;
- ``raw.py``: :class:`RawECGEncoder`, the signal itself;
- ``image.py``: the encoders of ECG images (:class:`ImageECGEncoder`, :class:`CNNImageEncoder`,
  :class:`ViTImageEncoder`, :class:`HFVisionEncoder`, :class:`BackbonePixels`).
"""

from __future__ import annotations

from ecglm.ecg import NORMALIZATIONS
from ecglm.encoders.base import ECGEncoder, Preprocessing, PreprocessingMismatchWarning, check_preprocessing
from ecglm.encoders.fairseq import (
    ARCHITECTURE_DEFAULTS,
    FAIRSEQ_ARCHITECTURE_FIELDS,
    FINETUNING_HEADS,
    PRETRAINED_CONFIG_KEYS,
    PRETRAINING_ONLY,
    SAFE_GLOBALS,
    CheckpointImportError,
    FairseqLayout,
    architecture_from_fairseq,
    convert_fairseq_state_dict,
    explain_unpickling_error,
    fairseq_model_config,
    fairseq_sample_rate,
    find_fairseq_model_config,
    load_fairseq_checkpoint,
    parse_conv_layers,
    stated_architecture,
)
from ecglm.encoders.image import (
    BackbonePixels,
    CNNImageEncoder,
    HFVisionEncoder,
    ImageECGEncoder,
    ViTImageEncoder,
    pixels_to_unit,
)
from ecglm.encoders.raw import RawECGEncoder
from ecglm.encoders.wav2vec2 import (
    ConvFeatureExtractor,
    ConvPositionalEmbedding,
    SelfAttention,
    TransformerEncoder,
    TransformerLayer,
    Wav2Vec2ECGEncoder,
)

__all__ = [
    "ARCHITECTURE_DEFAULTS",
    "FAIRSEQ_ARCHITECTURE_FIELDS",
    "FINETUNING_HEADS",
    "NORMALIZATIONS",
    "PRETRAINED_CONFIG_KEYS",
    "PRETRAINING_ONLY",
    "SAFE_GLOBALS",
    "BackbonePixels",
    "CNNImageEncoder",
    "CheckpointImportError",
    "ConvFeatureExtractor",
    "ConvPositionalEmbedding",
    "ECGEncoder",
    "FairseqLayout",
    "HFVisionEncoder",
    "ImageECGEncoder",
    "Preprocessing",
    "PreprocessingMismatchWarning",
    "RawECGEncoder",
    "SelfAttention",
    "TransformerEncoder",
    "TransformerLayer",
    "ViTImageEncoder",
    "Wav2Vec2ECGEncoder",
    "architecture_from_fairseq",
    "check_preprocessing",
    "convert_fairseq_state_dict",
    "explain_unpickling_error",
    "fairseq_model_config",
    "fairseq_sample_rate",
    "find_fairseq_model_config",
    "load_fairseq_checkpoint",
    "parse_conv_layers",
    "pixels_to_unit",
    "stated_architecture",
]
