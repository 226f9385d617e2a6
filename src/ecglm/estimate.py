"""Knowing before running: a recipe's size and peak GPU memory, and the strategy checks made at start.

``ecglm estimate --config recipe.yaml`` builds the recipe's encoder, connector and LLM on the meta
device (shapes and dtypes, no weights: nothing is downloaded or allocated), applies its PEFT policy
there (LoRA adapters are injected, QLoRA's k-bit preparation casts what it casts), and reports the
parameters of each part, what trains, and an estimate of each device's peak memory under the
recipe's batch, ``max_length``, gradient checkpointing, precision and strategy. Activations are not
guessed from a formula but traced: one training forward pass of the LLM runs on meta tensors and
every tensor autograd saves for the backward pass is counted, layer by layer (see
:func:`trace_activations`). ``docs/scaling.md`` states every assumption and compares the estimate
with measured peaks and with the studies' runs.

:func:`check_strategy` refuses, before any weight is loaded, distribution settings that cannot work
(FSDP over 4-bit weights stored as integers, FSDP with gradient clipping by norm, ...), each with
the reason and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ecglm.backbones import resolve_model_path, torch_dtype
from ecglm.errors import EcglmError

GIB = 2**30
#: NF4 / FP4 quantise weights in blocks of 64, each with an absmax scale (bitsandbytes' default).
QUANT_BLOCK = 64
#: Double quantisation stores the absmax scales in 8 bits, in second-level blocks of 256.
NESTED_BLOCK = 256
#: CUDA context, cuBLAS workspaces and allocator fragmentation: a flat allowance per device.
RUNTIME_OVERHEAD = 1 * GIB
#: Answer tokens whose vocabulary logits the loss computes (HFBackbone keeps only the answer span).
DEFAULT_ANSWER_TOKENS = 64
#: The attention implementations the activation trace registers, by ``--attention`` choice.
TRACE_ATTENTION = {"sdpa": "ecglm_estimate_fused", "eager": "ecglm_estimate_eager"}


class EstimateError(EcglmError, ValueError):
    """A recipe that cannot be estimated, with what to do about it."""


class StrategyError(EcglmError, ValueError):
    """A distribution setting that cannot work with the recipe, found before the model loads."""


# --- reading a recipe --------------------------------------------------------------------------------


def read_recipe(path: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The recipe as a dict, entry-point names resolved, ``--a.b.c=value`` overrides applied.

    Several paths merge in order, as several ``--config`` do for ``ecglm fit`` (a recipe, then a
    multi-GPU variant): mappings key by key, anything else replaced. Overrides take YAML values
    (``--trainer.devices=8``, ``--model.policy.init_args.r=32``) and ``--key value`` as well as
    ``--key=value``.
    """
    from ecglm.plugins import discover, resolve_class_paths

    config: dict[str, Any] = {}
    for one in [path] if isinstance(path, str | Path) else path:
        config = merged(config, yaml.safe_load(Path(one).read_text()) or {})
    args = list(overrides)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise EstimateError(f"unexpected argument {flag!r} (overrides read --key=value)")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not args:
                raise EstimateError(f"{flag} has no value")
            value = args.pop(0)
        set_dotted(config, key, yaml.safe_load(value))
    return resolve_class_paths(config, discover())


def merged(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` over ``base``: nested mappings merged, other values (lists too) replaced."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value


def component_class(node: Mapping[str, Any] | None, what: str) -> tuple[type, dict[str, Any]]:
    """The class and ``init_args`` of a ``class_path`` node."""
    if not node or "class_path" not in node:
        raise EstimateError(f"the recipe has no {what}.class_path")
    module, _, name = node["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name), dict(node.get("init_args") or {})


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


# --- activations ------------------------------------------------------------------------------------


class _FlashLikeAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _repeat_kv(module: nn.Module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return key, value


def flash_like_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, None]:
    """A transformers attention function for the trace: the memory of SDPA's fused kernels.

    Keys and values are repeated to the query heads, as transformers' SDPA path does when a padding
    mask is given (every left-padded batch); no ``seq x seq`` matrix is kept, as with the
    flash / memory-efficient kernels on GPU (SDPA's math kernel, which CPUs run for masked
    attention, keeps one).
    """
    key, value = _repeat_kv(module, key, value)
    out = _FlashLikeAttention.apply(query, key, value[..., : query.shape[-1]])
    return out.transpose(1, 2).contiguous(), None


def eager_like_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, None]:
    """transformers' eager attention for the trace: ``seq x seq`` scores, float32 softmax, probabilities."""
    key, value = _repeat_kv(module, key, value)
    scores = torch.matmul(query, key.transpose(2, 3)) * (kwargs.get("scaling") or 1.0)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@dataclass
class ActivationProfile:
    """Bytes autograd keeps for backward during one training forward pass of the LLM.

    ``layers``: per decoder layer; ``layer_inputs``: the hidden states entering each layer (what
    gradient checkpointing keeps); ``rest``: embeddings, final norm, logits of the answer span and
    the loss; ``ecg``: encoder and connector; ``transient``: gradients in flight during backward,
    taken as twice the largest saved tensor (an op's output gradient and its input gradient).
    """

    layers: list[int]
    layer_inputs: list[int]
    rest: int
    ecg: int = 0
    transient: int = 0
    dtype: str = "bfloat16"

    def total(self, checkpointing: bool) -> int:
        """Peak activation bytes: all layers' saved tensors, or (checkpointed) each layer's input
        plus one layer recomputed in backward."""
        if not self.layers:
            return self.rest + self.ecg + self.transient
        stored = sum(self.layer_inputs) + max(self.layers) if checkpointing else sum(self.layers)
        return stored + self.rest + self.ecg + self.transient

    def k(self, hidden: int, tokens: int) -> float:
        """Mean saved bytes per layer as a multiple of ``hidden * tokens * bytes(dtype)``."""
        unit = hidden * tokens * getattr(torch, self.dtype).itemsize
        return sum(self.layers) / len(self.layers) / unit if self.layers else 0.0


class _SavedTensors:
    """``saved_tensors_hooks`` that add up the distinct storages autograd keeps, by current bucket."""

    def __init__(self, exclude: Iterator[Tensor]):
        self.excluded = {_storage_key(t) for t in exclude}
        self.seen: set[int] = set()
        self.bucket = "rest"
        self.bytes: dict[Any, int] = {}
        self.largest = 0

    def pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            size = tensor.untyped_storage().nbytes()
            self.bytes[self.bucket] = self.bytes.get(self.bucket, 0) + size
            self.largest = max(self.largest, size)
        return tensor

    @staticmethod
    def unpack(tensor: Tensor) -> Tensor:
        return tensor


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's layers: the longest ``nn.ModuleList`` of the text decoder."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def _trace_attention(model: nn.Module, attention: str) -> Iterator[None]:
    """Run the trace with fused-kernel attention (``sdpa``) or the model's own ``eager`` attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(TRACE_ATTENTION["sdpa"], flash_like_attention)
    AttentionInterface.register(TRACE_ATTENTION["eager"], eager_like_attention)
    name = TRACE_ATTENTION[attention]
    configs = [
        m.config
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]
    before = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, value in zip(configs, before, strict=True):
            config._attn_implementation = value


def trace_activations(
    parts: MetaParts,
    batch_size: int,
    seq_len: int,
    answer_tokens: int,
    dtype: torch.dtype,
    num_samples: int = 2500,
    attention: str = "sdpa",
) -> ActivationProfile:
    """Run one training forward pass on meta tensors and count what autograd keeps for backward.

    The LM runs in ``dtype`` on ``batch_size`` full rows of ``seq_len`` tokens (no padding: the
    worst batch) with gradients flowing to its input embeddings (the ECG tokens always need them)
    and to any trainable weight; gradient checkpointing is off for the trace, so each layer's own
    footprint is seen (:meth:`ActivationProfile.total` applies checkpointing). Distinct storages are
    counted once; parameters are not counted. ``attention``: ``sdpa`` keeps what fused kernels keep
    (:func:`flash_like_attention`), ``eager`` runs the model's own eager attention (``seq x seq``
    scores and probabilities kept).
    """
    model = parts.backbone.model
    model.to(dtype)
    trains = any(p.requires_grad for p in model.parameters())
    model.train(trains)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    layers = decoder_layers(model)
    params = [*model.parameters(), *model.buffers()]
    saved = _SavedTensors(iter(params))
    inputs: list[int] = []

    def enter(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs.append(hidden.untyped_storage().nbytes() if torch.is_tensor(hidden) else 0)
            saved.bucket = index

        return hook

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(
        layers[-1].register_forward_hook(lambda *a: setattr(saved, "bucket", "rest")) if layers else None
    )
    embedding = model.get_input_embeddings()
    handles.append(embedding.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    span = min(answer_tokens, seq_len - 1)
    try:
        with (
            _trace_attention(model, attention),
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
        ):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=span + 1).logits
            labels = torch.zeros((batch_size, span), dtype=torch.long, device="meta")
            torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
    finally:
        for handle in handles:
            if handle is not None:
                handle.remove()
    per_layer = [saved.bytes.get(i, 0) for i in range(len(layers))]
    ecg = trace_ecg(parts, batch_size, num_samples)
    rest = saved.bytes.get("rest", 0)
    return ActivationProfile(per_layer, inputs[: len(layers)], rest, ecg, 2 * saved.largest, str(dtype)[6:])


def trace_ecg(parts: MetaParts, batch_size: int, num_samples: int) -> int:
    """Saved bytes of encoder and connector for ``batch_size`` ECGs (0 when neither trains)."""
    if not any(p.requires_grad for m in (parts.encoder, parts.connector) for p in m.parameters()):
        return 0
    saved = _SavedTensors(iter([*parts.encoder.parameters(), *parts.connector.parameters()]))
    ecg = torch.zeros((batch_size, 12, num_samples), device="meta")
    parts.encoder.train(any(p.requires_grad for p in parts.encoder.parameters()))
    parts.connector.train()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        parts.connector(parts.encoder(ecg))
    return sum(saved.bytes.values())


# --- devices and strategies --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a strategy spreads a run over ``world`` devices: divisors of weights, gradients, optimizer."""

    strategy: str
    world: int
    shard_weights: int = 1
    shard_grads: int = 1
    shard_optimizer: int = 1
    gradient_buckets: bool = False


def strategy_kind(strategy: Any) -> tuple[str, dict[str, Any]]:
    """``(kind, options)`` of a strategy given as name, ``class_path`` node or object.

    ``kind`` is ``single``, ``ddp``, ``fsdp``, ``deepspeed`` or ``other``; ``options`` holds what the
    estimate and the checks read (``sharding_strategy``, ``stage``, ``state_dict_type``, ...).
    """
    if strategy is None or strategy == "auto":
        return "auto", {}
    if isinstance(strategy, str):
        name = strategy.lower()
        if name.startswith("fsdp"):
            return "fsdp", {"cpu_offload": "offload" in name}
        if name.startswith("deepspeed"):
            stage = next((int(c) for c in name if c.isdigit()), 2)
            return "deepspeed", {"stage": stage, "offload": "offload" in name}
        if name.startswith("ddp"):
            return "ddp", {}
        return ("single", {}) if name.startswith("single") else ("other", {})
    if isinstance(strategy, Mapping) or hasattr(strategy, "class_path"):
        path = strategy.get("class_path", "") if isinstance(strategy, Mapping) else strategy.class_path
        options = dict(
            (strategy.get("init_args") if isinstance(strategy, Mapping) else strategy.init_args) or {}
        )
        return _kind_from_class_name(path.rpartition(".")[2]), options
    options = dict(getattr(strategy, "kwargs", {}) or {})
    for name in ("sharding_strategy", "_state_dict_type", "cpu_offload", "config"):
        if hasattr(strategy, name):
            options[name.lstrip("_")] = getattr(strategy, name)
    if isinstance(options.get("config"), Mapping):
        options["stage"] = options["config"].get("zero_optimization", {}).get("stage")
    return _kind_from_class_name(type(strategy).__name__), options


def _kind_from_class_name(name: str) -> str:
    lowered = name.lower()
    for kind in ("fsdp", "deepspeed", "ddp"):
        if kind in lowered:
            return kind
    return "single" if "single" in lowered else "other"


def device_count(devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        devices = devices.strip()
        if devices in ("auto", "-1"):
            return 1
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return 1 if devices in (None, -1) else int(devices)


def layout(trainer: Mapping[str, Any]) -> Layout:
    """The device layout of a recipe's ``trainer:`` section (``devices: auto`` counts as one)."""
    per_node = device_count(trainer.get("devices", 1))
    world = per_node * int(trainer.get("num_nodes", 1) or 1)
    kind, options = strategy_kind(trainer.get("strategy"))
    if kind == "auto":
        kind = "ddp" if world > 1 else "single"
    if kind == "fsdp":
        sharding = str(options.get("sharding_strategy", "FULL_SHARD")).rpartition(".")[2].upper()
        group = per_node if sharding.startswith("HYBRID") else world
        return Layout(
            f"fsdp {sharding}",
            world,
            shard_weights=group if sharding in ("FULL_SHARD", "HYBRID_SHARD") else 1,
            shard_grads=1 if sharding == "NO_SHARD" else group,
            shard_optimizer=1 if sharding == "NO_SHARD" else group,
        )
    if kind == "deepspeed":
        stage = int(options.get("stage") or 2)
        return Layout(
            f"deepspeed stage {stage}",
            world,
            shard_weights=world if stage >= 3 else 1,
            shard_grads=world if stage >= 2 else 1,
            shard_optimizer=world if stage >= 1 else 1,
        )
    return Layout(kind, world, gradient_buckets=kind == "ddp" and world > 1)


# --- the estimate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the estimate reads from a recipe besides the model."""

    batch_size: int
    seq_len: int
    precision: str
    layout: Layout
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    overhead: int = RUNTIME_OVERHEAD
    attention: str = "sdpa"
    activation_dtype: str | None = None  # None: from precision and policy (compute_dtype)


def compute_dtype(precision: str, kbit: bool) -> torch.dtype:
    """The dtype of the LLM's activations: the autocast or ``-true`` dtype; float32 in ``32-true``
    and under QLoRA, whose k-bit preparation leaves embeddings and norms (the residual stream) in
    float32 and whose 4-bit layers return their input's dtype."""
    if kbit or precision.startswith("32") or precision == "64-true":
        return torch.float32
    return torch.float16 if precision.startswith("16") else torch.bfloat16


def estimate(parts: MetaParts, settings: Settings) -> dict[str, Any]:
    """Parameter counts and per-device peak memory of a training step, with the assumptions made."""
    counts = parameter_bytes(parts, settings.precision)
    frozen = sum(c.frozen_bytes for c in counts.values())
    trainable = sum(c.trainable_bytes for c in counts.values())
    kbit = bool(getattr(parts.policy, "kbit", False))
    checkpointing = bool(getattr(parts.policy, "gradient_checkpointing", False))
    gathered = fsdp_working_set(parts, settings.layout) if settings.layout.shard_weights > 1 else 0
    dtype = (
        torch_dtype(settings.activation_dtype)
        if settings.activation_dtype
        else compute_dtype(settings.precision, kbit)
    )
    profile = trace_activations(
        parts,
        settings.batch_size,
        settings.seq_len,
        settings.answer_tokens,
        dtype,
        attention=settings.attention,
    )
    lay = settings.layout
    memory = {
        "weights_frozen": frozen // lay.shard_weights,
        "weights_trainable": trainable // lay.shard_weights,
        "fsdp_gathered": gathered,
        "gradients": trainable // lay.shard_grads * (2 if lay.gradient_buckets else 1),
        "optimizer": 2 * trainable // lay.shard_optimizer,
        "activations": profile.total(checkpointing),
        "runtime_overhead": settings.overhead,
    }
    memory["total"] = sum(memory.values())
    hidden = parts.backbone.hidden_size
    tokens = settings.batch_size * settings.seq_len
    return {
        "parameters": {name: asdict(c) for name, c in counts.items()},
        "trainable": sum(c.trainable for c in counts.values()),
        "total_parameters": sum(c.total for c in counts.values()),
        "memory_per_device": memory,
        "activations": {
            "checkpointing": checkpointing,
            "dtype": profile.dtype,
            "per_layer": profile.layers,
            "layer_inputs": sum(profile.layer_inputs),
            "rest": profile.rest,
            "ecg": profile.ecg,
            "transient": profile.transient,
            "k": round(profile.k(hidden, tokens), 2),
            "hidden_size": hidden,
            "num_layers": len(profile.layers),
        },
        "settings": {**asdict(settings), "layout": asdict(settings.layout)},
        "assumptions": assumptions(parts, settings, profile, checkpointing),
    }


def fsdp_working_set(parts: MetaParts, lay: Layout) -> int:
    """Bytes FSDP holds unsharded: the root unit (everything outside the decoder layers) through the
    step, plus two decoder layers (the one computing and the one prefetched), as stored."""
    model = parts.backbone.model
    quantized = quantized_weights(parts.backbone)

    def size(module: nn.Module) -> int:
        return sum(
            quantized_bytes(p.numel(), parts.double_quant)
            if id(p) in quantized
            else p.numel() * p.dtype.itemsize
            for p in module.parameters()
        )

    layers = decoder_layers(model)
    biggest = max((size(layer) for layer in layers), default=0)
    total = sum(size(part) for part in parts.named_parts().values())
    rest = total - sum(size(layer) for layer in layers)
    return rest - rest // lay.shard_weights + 2 * biggest


def assumptions(
    parts: MetaParts, settings: Settings, profile: ActivationProfile, checkpointing: bool
) -> list[str]:
    lay = settings.layout
    lines = [
        f"every micro-batch holds {settings.batch_size} row(s) of the full {settings.seq_len} tokens "
        "(the longest batch; shorter rows only lower activations)",
        f"activations traced on the meta device in {profile.dtype}: every tensor autograd keeps for "
        "backward, counted once per storage, plus twice the largest one for the gradients in flight; "
        + (
            "attention as SDPA's fused kernels keep it (q, k, v, output, log-sum-exp; no seq x seq matrix)"
            if settings.attention == "sdpa"
            else "the model's eager attention (seq x seq scores and probabilities kept per layer)"
        ),
        f"the loss computes vocabulary logits for {settings.answer_tokens} answer positions (HFBackbone "
        "keeps the answer span only; longer answers add 14 bytes x vocabulary per position)",
        "AdamW keeps two moments per trainable weight, in its dtype (float32 for adapters and connector); "
        "its step counters live on the host",
        f"a flat {settings.overhead / GIB:.1f} GiB per device for the CUDA context, cuBLAS workspaces and "
        "allocator fragmentation",
    ]
    if checkpointing:
        lines.append(
            "gradient checkpointing keeps each decoder layer's input and recomputes one layer at a time "
            "in backward: layer inputs + the largest layer's saved tensors"
        )
    if parts.backbone.quantized:
        lines.append(
            f"{len(parts.backbone.quantized)} linear layers in 4 bits: 0.5 byte per weight plus absmax "
            f"scales per block of {QUANT_BLOCK}"
            + (
                " (double-quantised: ~0.127 bit per weight)"
                if parts.double_quant
                else " (float32: 0.5 bit per weight)"
            )
        )
    if getattr(parts.policy, "kbit", False):
        lines.append(
            "QLoRA's k-bit preparation casts every weight left unquantised (embeddings, norms, LM head) "
            "to float32"
        )
    if lay.gradient_buckets:
        lines.append("DDP's reducer keeps a second copy of the gradients in its buckets")
    if lay.shard_weights > 1 or lay.shard_grads > 1 or lay.shard_optimizer > 1:
        lines.append(
            f"{lay.strategy} over {lay.world} devices: weights / {lay.shard_weights}, gradients / "
            f"{lay.shard_grads}, optimizer state / {lay.shard_optimizer}"
            + (
                "; the root unit (all but the decoder layers) stays unsharded through the step and two "
                "decoder layers are gathered at a time (the auto-wrap policy wraps each decoder layer)"
                if lay.shard_weights > 1
                else ""
            )
        )
    return lines + parts.notes


# --- the command -------------------------------------------------------------------------------------


def settings_from_recipe(
    config: Mapping[str, Any],
    seq_len: int | None = None,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    overhead_gib: float = RUNTIME_OVERHEAD / GIB,
    attention: str = "sdpa",
    activation_dtype: str | None = None,
) -> Settings:
    """Batch, sequence length, precision and layout of a recipe.

    ``max_length`` (``llm_input_len``) is looked up in the data section (its prompt style) first,
    then in the backbone's arguments; ``seq_len`` overrides it.
    """
    trainer = config.get("trainer") or {}
    data = config.get("data") or {}
    data_args = data.get("init_args") or {}
    backbone = (config.get("model") or {}).get("backbone") or {}
    seq_len = seq_len or find_key(data, "max_length") or find_key(backbone, "max_length")
    if not seq_len:
        raise EstimateError("the recipe sets no max_length (llm_input_len) for the prompts: give --seq_len N")
    return Settings(
        batch_size=int(data_args.get("batch_size", 1)),
        seq_len=int(seq_len),
        precision=str(trainer.get("precision", "32-true")),
        layout=layout(trainer),
        answer_tokens=answer_tokens,
        overhead=int(overhead_gib * GIB),
        attention=attention,
        activation_dtype=activation_dtype,
    )


def find_key(node: Any, key: str) -> Any:
    """The first value of ``key`` in a nested dict / list, depth first; ``None`` if absent."""
    if isinstance(node, Mapping):
        if node.get(key) is not None:
            return node[key]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    return next((found for child in children if (found := find_key(child, key)) is not None), None)


def format_report(report: Mapping[str, Any]) -> str:
    """The estimate as text: parameters per part, memory per device, the formula and the assumptions."""

    def gib(value: int) -> str:
        return f"{value / GIB:8.2f} GiB"

    lines = ["parameters:"]
    for name, c in report["parameters"].items():
        quantized = f", {c['quantized']:,} in 4 bits" if c["quantized"] else ""
        lines.append(f"  {name:<10} {c['total']:>16,} total, {c['trainable']:>14,} trainable{quantized}")
    total = report["total_parameters"]
    share = 100 * report["trainable"] / total if total else 0.0
    lines.append(f"  {'all':<10} {total:>16,} total, {report['trainable']:>14,} trainable ({share:.3f}%)")
    s = report["settings"]
    lines.append(
        f"peak memory per device ({s['layout']['strategy']}, {s['layout']['world']} device(s), batch "
        f"{s['batch_size']} x {s['seq_len']} tokens, {s['precision']}):"
    )
    for name, value in report["memory_per_device"].items():
        lines.append(f"  {name:<18} {gib(value)}")
    act = report["activations"]
    unit = act["hidden_size"] * s["batch_size"] * s["seq_len"]
    lines.append(
        f"activations: {act['num_layers']} layers x k x hidden {act['hidden_size']} x batch x seq x "
        f"bytes({act['dtype']}), k = {act['k']} (traced; {unit:,} elements per unit)"
        + (", checkpointed: layer inputs + one layer recomputed" if act["checkpointing"] else "")
    )
    lines.append("assumptions:")
    lines.extend(f"  - {line}" for line in report["assumptions"])
    return "\n".join(lines)


def estimate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecglm estimate",
        description="Parameters and per-device peak GPU memory of a recipe, without loading weights. "
        "Any --section.key=value changes the recipe (e.g. --trainer.devices=8).",
    )
    parser.add_argument(
        "--config", required=True, action="append", help="the recipe (YAML); again: a variant merged over it"
    )
    parser.add_argument("--seq_len", type=int, help="tokens per row (default: the recipe's max_length)")
    parser.add_argument("--answer_tokens", type=int, default=DEFAULT_ANSWER_TOKENS, help="answer span length")
    parser.add_argument(
        "--overhead_gib", type=float, default=RUNTIME_OVERHEAD / GIB, help="per-device allowance"
    )
    parser.add_argument(
        "--attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="sdpa: fused kernels; eager: seq x seq kept",
    )
    parser.add_argument(
        "--activation_dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the traced activations (default: the compute dtype; float32 under QLoRA)",
    )
    parser.add_argument("--json", help="also write the estimate to this JSON file")
    return parser


def run_estimate(args: list[str]) -> dict[str, Any]:
    """``ecglm estimate --config recipe.yaml [--section.key=value ...] [--json out.json]``: print and
    return the estimate."""
    options, overrides = estimate_parser().parse_known_args(args)
    config = read_recipe(options.config, overrides)
    settings = settings_from_recipe(
        config,
        options.seq_len,
        options.answer_tokens,
        options.overhead_gib,
        options.attention,
        options.activation_dtype,
    )
    check_recipe(config)
    report = estimate(build_meta_parts(config.get("model") or {}), settings)
    report["recipe"] = " + ".join(options.config)
    print(format_report(report))
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2))
    return report


# --- strategy checks --------------------------------------------------------------------------------


def check_strategy(
    strategy: Any,
    quantization: str | None = None,
    quant_storage: str | None = None,
    backbone_dtype: str = "float32",
    kbit: bool = False,
    precision: str | None = None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
    rollback_monitor: bool = False,
) -> None:
    """Raise :class:`StrategyError` for a distribution setting that cannot work, before weights load.

    ``strategy``: a Trainer's ``strategy`` (name, ``class_path`` node or object). The other arguments
    are the backbone's 4-bit settings and dtype, whether QLoRA's k-bit preparation runs (it leaves
    every unquantised weight in float32), the Trainer's precision and gradient clipping, and whether
    an ``LRRestartMonitor`` with ``action: rollback`` is configured.
    """
    kind, options = strategy_kind(strategy)
    if kind == "fsdp":
        _check_fsdp(options, quantization, quant_storage, backbone_dtype, kbit, precision)
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            raise StrategyError(
                "Lightning's FSDPStrategy cannot clip gradients by norm (its FSDPPrecision raises at the "
                "first optimizer step): drop gradient_clip_val, or clip by value "
                "(gradient_clip_algorithm: value)"
            )
    if (
        kind == "deepspeed"
        and quantization
        and int(options.get("stage") or 2) >= 3
        and _is_integer(quant_storage)
    ):
        raise StrategyError(
            "DeepSpeed ZeRO-3 partitions every weight, and 4-bit weights stored as uint8 cannot be "
            "partitioned with the floating-point ones: store them in the other weights' dtype "
            "(bnb_4bit_quant_storage), or use ZeRO stage 2 / DDP, which keep a whole 4-bit model on "
            "each device"
        )
    if rollback_monitor and kind in ("fsdp", "deepspeed"):
        raise StrategyError(
            f"LRRestartMonitor(action=rollback) snapshots whole optimizer state dicts, which {kind} "
            "shards: use action log, stop or lower_peak under sharded strategies (docs/training.md, "
            "Limits)"
        )


def _is_integer(storage: str | None) -> bool:
    return storage in (None, "uint8", "int8", "torch.uint8", "torch.int8")


def _check_fsdp(
    options: Mapping[str, Any],
    quantization: str | None,
    quant_storage: str | None,
    backbone_dtype: str,
    kbit: bool,
    precision: str | None,
) -> None:
    others = "float32" if kbit else backbone_dtype
    if quantization and _is_integer(quant_storage):
        raise StrategyError(
            "FSDP cannot shard 4-bit weights stored as uint8: it flattens each unit's weights into one "
            "floating-point tensor and fails with 'Must flatten tensors with uniform dtype' or "
            f"'Cannot flatten integer dtype tensors'. Store them as {others}, the dtype of the "
            "backbone's other weights (bnb_4bit_quant_storage; with QLoRA's k-bit preparation that is "
            "float32), or train the 4-bit model with DDP, one whole copy per device"
        )
    if quantization and str(quant_storage).removeprefix("torch.") != others:
        raise StrategyError(
            "FSDP flattens each wrapped unit's weights into one tensor of one dtype: 4-bit weights "
            f"stored as {quant_storage} sit beside {others} weights. Store them as {others} "
            "(bnb_4bit_quant_storage)"
        )
    mixed = precision is None or not precision.endswith("-true") or precision.startswith("32")
    if mixed and backbone_dtype != "float32" and not quantization:
        raise StrategyError(
            f"FSDP flattens each wrapped unit's weights into one tensor of one dtype, and the backbone is "
            f"{backbone_dtype} while encoder, connector and LoRA adapters are float32. Load the backbone in "
            "float32 (dtype: float32; FSDP's mixed precision still computes in bf16 under bf16-mixed, "
            "and the weights are sharded) or train in precision bf16-true"
        )
    if str(options.get("state_dict_type", "full")) != "full":
        raise StrategyError(
            "ecglm checkpoints hold the trainable weights only and are single files (`--ckpt_path last` "
            "reads them): use FSDPStrategy's state_dict_type full, the default"
        )
    if options.get("use_orig_params") is False:
        raise StrategyError(
            "FSDP with use_orig_params false needs every weight of a wrapped unit to train or none; PEFT "
            "mixes frozen and trainable weights: keep use_orig_params true (Lightning's default)"
        )


def check_recipe(config: Mapping[str, Any]) -> None:
    """:func:`check_strategy` on a parsed recipe (a dict or jsonargparse ``Namespace`` of the
    ``trainer`` and ``model`` sections; a subcommand's config, not the root with ``fit`` in it)."""
    trainer = _plain(config.get("trainer")) or {}
    model = _plain(config.get("model")) or {}
    backbone = (model.get("backbone") or {}).get("init_args") or {}
    policy = (model.get("policy") or {}).get("init_args") or {}
    callbacks = trainer.get("callbacks") or []
    rollback = any(
        isinstance(c, Mapping)
        and str(c.get("class_path", "")).endswith("LRRestartMonitor")
        and (c.get("init_args") or {}).get("action") == "rollback"
        for c in (callbacks if isinstance(callbacks, list) else [callbacks])
    )
    check_strategy(
        trainer.get("strategy"),
        quantization=backbone.get("quantization"),
        quant_storage=backbone.get("bnb_quant_storage"),
        backbone_dtype=backbone.get("dtype", "float32"),
        kbit=bool(policy.get("kbit", False)),
        precision=None if trainer.get("precision") is None else str(trainer.get("precision")),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=trainer.get("gradient_clip_algorithm"),
        rollback_monitor=rollback,
    )


def _plain(node: Any) -> Any:
    if hasattr(node, "as_dict"):
        return node.as_dict()
    return node
