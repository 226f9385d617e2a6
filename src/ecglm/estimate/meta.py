"""The recipe's parts on the meta device: the LLM's config, the meta model with its PEFT policy applied, and
the bytes each parameter takes in each precision (4-bit blocks included)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecglm.backbones import resolve_model_path, torch_dtype
from ecglm.estimate.recipe import EstimateError, component_class

#: NF4 / FP4 quantise weights in blocks of 64, each with an absmax scale (bitsandbytes' default).
QUANT_BLOCK = 64
#: Double quantisation stores the absmax scales in 8 bits, in second-level blocks of 256.
NESTED_BLOCK = 256


# --- the LLM's config and the meta model -------------------------------------------------------------


def backbone_config(init_args: Mapping[str, Any]) -> Any:
    """The transformers config ``HFBackbone(**init_args)`` would build its LM from (read, not downloaded).

    Raises :class:`EstimateError` naming what to pass when the config is not at hand (a hub id
    offline and not cached).
    """
    from transformers import AutoConfig

    model = init_args["model"]
    overrides = dict(init_args.get("config_overrides") or {})
    trust = bool(init_args.get("trust_remote_code", False))
    try:
        path = resolve_model_path(model)
    except FileNotFoundError as err:
        raise EstimateError(str(err)) from err
    if init_args.get("random_init") and not Path(path).exists() and "/" not in path:
        return AutoConfig.for_model(path, **overrides)
    try:
        return AutoConfig.from_pretrained(
            path, gguf_file=init_args.get("gguf_file"), trust_remote_code=trust, **overrides
        )
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EstimateError(
            f"the estimate needs the config.json of {model!r} and could not read it ({reason}). A hub id "
            "is read from the local Hugging Face cache when offline (HF_HUB_OFFLINE=1 or no network): "
            f"fetch it once (`hf download {model} config.json`), or pass a folder that holds its "
            "config.json: --model.backbone.init_args.model=/path/to/folder. A random architecture "
            "needs no file: --model.backbone.init_args.model=llama "
            "--model.backbone.init_args.random_init=true --model.backbone.init_args.config_overrides="
            "'{hidden_size: 4096, num_hidden_layers: 32}'"
        ) from err


class MetaBackbone(nn.Module):
    """A transformers LM on the meta device, which PEFT policies act on as on a backbone's; it cannot run.

    Not a :class:`~ecglm.backbones.Backbone`: it has no tokenizer and no prompts, only what policies
    read (``transformers_model``) and what the estimate needs.
    """

    def __init__(self, model: nn.Module, quantized: set[str]):
        super().__init__()
        self.model = model
        self.hidden_size = model.get_input_embeddings().embedding_dim
        #: Full names of the linear layers loading would quantise (before any adapter moved them).
        self.quantized = quantized

    @property
    def transformers_model(self) -> nn.Module:
        return self.model


def meta_backbone(init_args: Mapping[str, Any]) -> MetaBackbone:
    """``HFBackbone(**init_args)``'s LM built on the meta device, with the layers 4-bit loading quantises."""
    from transformers import AutoModelForCausalLM

    config = backbone_config(init_args)
    dtype = torch_dtype(init_args.get("dtype", "float32"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=bool(init_args.get("trust_remote_code", False))
        )
    quantized = quantized_linear_names(model) if init_args.get("quantization") else set()
    if quantized:
        model.is_loaded_in_4bit = True  # what from_pretrained sets; QLoRA's checks read it
    return MetaBackbone(model, quantized)


def quantized_linear_names(model: nn.Module) -> set[str]:
    """The linear layers transformers' bitsandbytes loading replaces by 4-bit ones.

    Every ``nn.Linear`` except the output embedding, tied weights, the last module and the
    model's ``_keep_in_fp32_modules`` (transformers' own rule, ``get_keys_to_not_convert``).
    """
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    return {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


@dataclass
class MetaParts:
    """The recipe's three parts on the meta device, with its policy applied."""

    encoder: nn.Module
    connector: nn.Module
    backbone: MetaBackbone
    policy: Any
    double_quant: bool = True
    notes: list[str] = field(default_factory=list)

    def named_parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "connector": self.connector, "backbone": self.backbone}


def build_meta_parts(model_config: Mapping[str, Any]) -> MetaParts:
    """Encoder, connector, LLM and policy of a recipe's ``model:`` section, on the meta device."""
    notes = []
    backbone_cls, _ = component_class(model_config.get("backbone"), "model.backbone")
    from ecglm.backbones import VisionLanguageBackbone

    if issubclass(backbone_cls, VisionLanguageBackbone):
        raise EstimateError(
            "ecglm estimate models text backbones with ecglm's encoder and connector; a vision-language "
            "backbone (hf-vision-language: its vision tower, image tokens or cross-attention) is not "
            "modelled yet. Measure one training step on the device instead"
        )
    encoder_cls, encoder_args = component_class(model_config.get("encoder"), "model.encoder")
    if encoder_args.pop("checkpoint", None):
        notes.append("encoder checkpoint not read: its architecture is taken from init_args")
    with torch.device("meta"):
        encoder = encoder_cls(**encoder_args)
    connector_cls, connector_args = component_class(model_config.get("connector"), "model.connector")
    backbone_node = model_config.get("backbone") or {}
    _, backbone_args = component_class(backbone_node, "model.backbone")
    backbone = meta_backbone(backbone_args)
    with torch.device("meta"):
        connector = connector_cls(**connector_args)
        connector.configure(encoder.output_dim, backbone.hidden_size)
    policy_node = model_config.get("policy") or {"class_path": "ecglm.peft.ProjectionOnly"}
    policy_cls, policy_args = component_class(policy_node, "model.policy")
    policy = policy_cls(**policy_args)
    policy.apply(encoder, connector, backbone)
    return MetaParts(
        encoder, connector, backbone, policy, bool(backbone_args.get("bnb_double_quant", True)), notes
    )


# --- parameters and their bytes ----------------------------------------------------------------------


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one 4-bit (NF4 / FP4) weight as bitsandbytes stores it.

    Two weights per byte; an absmax scale per block of 64 (float32, or with double quantisation a
    uint8 plus a float32 per 256 blocks, an offset and a 256-entry code); the 16-entry code.
    """
    blocks = math.ceil(numel / QUANT_BLOCK)
    packed = math.ceil(numel / 2) + 16 * 4
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 256 * 4


@dataclass
class ParameterBytes:
    """Counts and bytes of one part's parameters (4-bit weights counted unpacked in ``total``)."""

    total: int = 0
    trainable: int = 0
    quantized: int = 0
    frozen_bytes: int = 0
    trainable_bytes: int = 0


def parameter_bytes(parts: MetaParts, precision: str) -> dict[str, ParameterBytes]:
    """Per part: parameter counts and the bytes of frozen and trainable weights on the device.

    ``*-true`` precisions (Lightning converts the module) store every floating-point weight in that
    dtype; otherwise weights keep the dtype they were built and adapted in.
    """
    true_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    quantized = quantized_weights(parts.backbone)
    seen: set[int] = set()
    out = {}
    for name, part in parts.named_parts().items():
        counts = ParameterBytes()
        for param in part.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            numel = param.numel()
            if id(param) in quantized:
                size = quantized_bytes(numel, parts.double_quant)
                counts.quantized += numel
            else:
                dtype = true_dtype if true_dtype and param.is_floating_point() else param.dtype
                size = numel * dtype.itemsize
            counts.total += numel
            if param.requires_grad:
                counts.trainable += numel
                counts.trainable_bytes += size
            else:
                counts.frozen_bytes += size
        out[name] = counts
    return out


def quantized_weights(backbone: MetaBackbone) -> set[int]:
    """``id``s of the weights 4-bit loading quantises (an adapted layer's is at ``<layer>.base_layer``)."""
    ids = set()
    for name in backbone.quantized:
        module = backbone.model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        ids.add(id(base.weight))
    return ids
