"""Language-model backbones: a causal LM, its tokenizer, and the splice of ECG tokens into its input.

:class:`Backbone` is the interface the rest of ecglm uses; :class:`HFBackbone` wraps any
``AutoModelForCausalLM``, including what some families need beyond ``inputs_embeds`` (Gemma 4's
per-layer embeddings); :class:`VisionLanguageBackbone` a model that reads the ECG as an image. Prompts
are the data side's (:mod:`ecglm.prompts`); the cache surgery of prefix reuse is
:mod:`ecglm.prefix_reuse` and the fast-kernel report :mod:`ecglm.kernels`.

Which file holds what:

- ``base.py``: :class:`Backbone`, and the answer-span helpers of left-padded batches
  (:func:`positions_from_mask`, :func:`answer_span`, :func:`answer_loss`);
- ``loading.py``: where files come from and what they are read as (:func:`resolve_model_path`,
  :func:`load_hf_config`, :func:`torch_dtype`, ``DType``);
- ``quantization.py``: 4-bit loading through bitsandbytes (:func:`keep_4bit_layout_on_cpu`,
  :func:`quantized_device_map`), and the silenced ``kernels`` lookup message;
- ``hf.py``: :class:`HFBackbone` (loading, the loss on padded and packed rows, generation);
- ``prefix_forward.py``: its loss path with prefix reuse (:class:`PrefixReuseMixin`);
- ``vision_language.py``: :class:`VisionLanguageBackbone` and the families it knows;
- ``_compat.py``: ecglm 0.1's backbone-side prompt API (``ChatFormatter``, ``build_formatter``,
  ``system_prompt``), deprecated, and the names that moved out of this module (``__getattr__``).

Component layer: imports torch and transformers (bitsandbytes through transformers, for 4-bit) only.
"""

from __future__ import annotations

from ecglm._deprecation import moved_names
from ecglm.backbones._compat import PROMPT_STYLE
from ecglm.backbones.base import Backbone, answer_loss, answer_span, positions_from_mask
from ecglm.backbones.hf import ATTENTION_LAYER_TYPES, RECURRENT_CONFIG_FIELDS, HFBackbone
from ecglm.backbones.loading import (
    BackboneConfigError,
    DType,
    Quantization,
    load_hf_config,
    resolve_model_path,
    torch_dtype,
)
from ecglm.backbones.prefix_forward import PrefixReuseMixin
from ecglm.backbones.quantization import keep_4bit_layout_on_cpu, quantized_device_map
from ecglm.backbones.vision_language import (
    CROSS_ATTENTION_FAMILIES,
    IMAGE_TOKEN_FAMILIES,
    MULTIMODAL_ROPE_FAMILIES,
    VISION_MODULES,
    VisionLanguageBackbone,
    processor_chat_template,
)

__all__ = [
    "ATTENTION_LAYER_TYPES",
    "CROSS_ATTENTION_FAMILIES",
    "IMAGE_TOKEN_FAMILIES",
    "MULTIMODAL_ROPE_FAMILIES",
    "RECURRENT_CONFIG_FIELDS",
    "VISION_MODULES",
    "Backbone",
    "BackboneConfigError",
    "DType",
    "HFBackbone",
    "PrefixReuseMixin",
    "Quantization",
    "VisionLanguageBackbone",
    "answer_loss",
    "answer_span",
    "keep_4bit_layout_on_cpu",
    "load_hf_config",
    "positions_from_mask",
    "processor_chat_template",
    "quantized_device_map",
    "resolve_model_path",
    "torch_dtype",
]

#: Names ecglm 0.1 had here, and their places since 0.2 (each warns on use until 0.3.0).
MOVED = {
    "ECG_MARKER": "ecglm.prompts:ECG_MARKER",
    "ChatFormatter": ("ecglm.backbones._compat:ChatFormatter", PROMPT_STYLE),
    "EncodedChat": "ecglm.prompts:EncodedChat",
    "IGNORE_INDEX": "ecglm.batch:IGNORE_INDEX",
    "KERNEL_DISTRIBUTIONS": "ecglm.kernels:KERNEL_DISTRIBUTIONS",
    "kernel_bindings": "ecglm.kernels:kernel_bindings",
    "log_kernels": "ecglm.kernels:log_kernels",
    "PrefixCache": "ecglm.prefix_reuse:PrefixCache",
    "PrefixReuseUnsupported": "ecglm.prefix_reuse:PrefixReuseUnsupported",
    "PrefixState": "ecglm.prefix_reuse:PrefixState",
    "REUSABLE_CACHE_LAYERS": "ecglm.prefix_reuse:REUSABLE_CACHE_LAYERS",
    "SuffixLayout": "ecglm.prefix_reuse:SuffixLayout",
    "batch_cache": "ecglm.prefix_reuse:batch_cache",
    "prefix_state": "ecglm.prefix_reuse:prefix_state",
}

__getattr__ = moved_names(__name__, MOVED)
