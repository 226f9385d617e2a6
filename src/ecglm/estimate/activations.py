"""Activations traced, not guessed: one training forward pass on meta tensors, every tensor autograd
saves for the backward pass counted, layer by layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ecglm.estimate.meta import MetaParts

#: The attention implementations the activation trace registers, by ``--attention`` choice.
TRACE_ATTENTION = {"sdpa": "ecglm_estimate_fused", "eager": "ecglm_estimate_eager"}


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
