"""Prefix reuse: the prompt prefix that rows share (system prompt, few-shot demonstrations), computed
once by a frozen LM and spliced into every row's cache.

This file is ecglm's one reliance on transformers' cache internals (cache layer classes found by
name, their state attributes, a recurrent-state update swapped per layer). Whatever a transformers
release changes there makes :class:`PrefixReuseUnsupported` name it, and the backbone then runs the
whole sequence, with a warning; ``tests/test_few_shot.py`` checks both paths give the same loss.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import cache_utils


class PrefixReuseUnsupported(Exception):
    """The LM's cache holds a kind of state that cannot be copied into the rows of a batch."""


def _cache_classes(*names: str) -> tuple[type, ...]:
    # By name: older transformers releases lack some of these classes.
    return tuple(getattr(cache_utils, n) for n in names if hasattr(cache_utils, n))


#: Cache layers whose state copies into batch rows: attention keys and values (full or sliding
#: window), linear-attention conv and recurrent states, and empty KV-sharing consumers. Exact types.
REUSABLE_CACHE_LAYERS = _cache_classes(
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "LinearAttentionLayer",
    "LinearAttentionAndFullAttentionLayer",
    "LinearAttentionAndSlidingWindowAttentionLayer",
    "DummyLayer",
)
_LINEAR_LAYERS = _cache_classes("LinearAttentionCacheLayerMixin")
_SLIDING_LAYERS = _cache_classes("DynamicSlidingWindowLayer")


@dataclass
class PrefixState:
    """One prompt prefix's LM state: per layer, ``keys`` / ``values`` ``(1, heads, n, dim)`` and/or the
    linear-attention ``conv`` and ``recurrent`` states by state index (absent where a layer holds none)."""

    length: int
    layers: list[dict[str, Any]]


def prefix_state(cache: Any, length: int) -> PrefixState:
    """The per-layer tensors of a batch-of-one ``DynamicCache`` after a prefix of ``length`` tokens."""
    if not hasattr(cache, "layers"):
        raise PrefixReuseUnsupported(f"a {type(cache).__name__} instead of a DynamicCache")
    layers = []
    for layer in cache.layers:
        if type(layer) not in REUSABLE_CACHE_LAYERS or getattr(layer, "record_past", False):
            raise PrefixReuseUnsupported(f"cache layer {type(layer).__name__}")
        state: dict[str, Any] = {}
        if isinstance(layer, _LINEAR_LAYERS):
            state["conv"] = {i: t for i, t in layer.conv_states.items() if t is not None}
            state["recurrent"] = {i: t for i, t in layer.recurrent_states.items() if t is not None}
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            state["keys"], state["values"] = layer.keys, layer.values
        layers.append(state)
    return PrefixState(length, layers)


def _left_pad(states: list[Tensor], length: int) -> Tensor:
    """``(1, heads, n_i, dim)`` tensors zero-padded on the left of the sequence to ``length``, stacked."""
    return torch.cat([F.pad(t, (0, 0, length - t.shape[-2], 0)) for t in states])


def _replace_recurrent_state(
    self: Any, recurrent_states: Tensor, state_idx: int = 0, **kwargs: Any
) -> Tensor:
    self.recurrent_states[state_idx] = recurrent_states
    self.is_recurrent_states_initialized[state_idx] = True
    return recurrent_states


@functools.cache
def _replacing_recurrent_state(cls: type) -> type:
    """``cls`` storing a new recurrent state by reference instead of copying it into the old one.

    transformers copies in place (a static address for CUDA graphs), but autograd saved the old state
    for the gradient of the queries that read it: with a prefix state, the backward pass would fail.
    """
    return type(cls.__name__, (cls,), {"update_recurrent_state": _replace_recurrent_state})


def batch_cache(config: Any, rows: list[PrefixState]) -> cache_utils.DynamicCache:
    """A ``DynamicCache`` holding row ``i``'s prefix state, right-aligned over the longest prefix.

    Positions before a shorter prefix are zeros that the attention mask hides. A sliding-window layer
    counts the longest prefix as seen, so the window keeps its distances in the aligned index space.
    """
    cache = cache_utils.DynamicCache(config=config)
    if len(cache.layers) != len(rows[0].layers):
        raise PrefixReuseUnsupported(
            f"{len(rows[0].layers)} cached layers, but the config builds {len(cache.layers)}"
        )
    longest = max(r.length for r in rows)
    for index, layer in enumerate(cache.layers):
        parts = [r.layers[index] for r in rows]
        for i, conv in parts[0].get("conv", {}).items():
            layer.update_conv_state(
                torch.cat([p["conv"][i] for p in parts]), i, conv_kernel_size=conv.shape[-1]
            )
        if isinstance(layer, _LINEAR_LAYERS):
            layer.__class__ = _replacing_recurrent_state(type(layer))
        for i in parts[0].get("recurrent", {}):
            layer.update_recurrent_state(torch.cat([p["recurrent"][i] for p in parts]), i)
        if "keys" in parts[0]:
            n = max(p["keys"].shape[-2] for p in parts)
            layer.update(_left_pad([p["keys"] for p in parts], n), _left_pad([p["values"] for p in parts], n))
            if isinstance(layer, _SLIDING_LAYERS):
                layer.cumulative_length = longest
    return cache


@dataclass
class SuffixLayout:
    """A left-padded batch split into each row's prefix (its tokens before its first ECG position) and
    the rest, the *suffix*, right-padded; ``attention_mask`` covers the prefixes right-aligned over
    the longest one, then the suffixes, and ``position_ids`` continue after each row's prefix."""

    prefixes: list[tuple[int, ...]]
    input_ids: Tensor
    ecg_mask: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: Tensor  # suffix tokens per row

    @classmethod
    def of(cls, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, pad_id: int) -> SuffixLayout:
        batch, length = input_ids.shape
        first, ecg_start = attention_mask.long().argmax(1), ecg_mask.long().argmax(1)
        ids, starts, ends = input_ids.tolist(), first.tolist(), ecg_start.tolist()
        prefix_lengths, lengths = ecg_start - first, length - ecg_start
        steps = torch.arange(int(lengths.max()), device=input_ids.device)
        source = (ecg_start[:, None] + steps).clamp(max=length - 1)
        valid = steps < lengths[:, None]
        longest = int(prefix_lengths.max())
        prefix_mask = torch.arange(longest, device=input_ids.device) >= longest - prefix_lengths[:, None]
        return cls(
            prefixes=[tuple(ids[i][starts[i] : ends[i]]) for i in range(batch)],
            input_ids=torch.where(valid, input_ids.gather(1, source), pad_id),
            ecg_mask=ecg_mask.gather(1, source) & valid,
            attention_mask=torch.cat([prefix_mask, valid], 1).long(),
            position_ids=prefix_lengths[:, None] + steps,
            lengths=lengths,
        )


class PrefixCache:
    """Prefix states of a frozen LM by prefix token ids, reused across rows and steps.

    Emptied when the fingerprint changes (the LM's weights — every parameter's storage and version
    counter, so an in-place load counts —, its device, or the autocast dtype). Holds at most
    ``max_entries`` prefixes, dropping the least recently used.
    """

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], PrefixState] = OrderedDict()
        self.fingerprint: Any = None
        self.hits = self.misses = 0

    def get(
        self, ids: tuple[int, ...], fingerprint: Any, compute: Callable[[tuple[int, ...]], PrefixState]
    ) -> PrefixState:
        if fingerprint != self.fingerprint:
            self.entries.clear()
            self.fingerprint = fingerprint
        state = self.entries.get(ids)
        if state is not None:
            self.hits += 1
            self.entries.move_to_end(ids)
            return state
        self.misses += 1
        state = self.entries[ids] = compute(ids)
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return state
