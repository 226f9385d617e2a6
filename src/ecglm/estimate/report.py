"""The estimate itself (parameters, per-device peak memory, the assumptions it rests on), its table,
and ``ecglm estimate``'s parser."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecglm.backbones import torch_dtype
from ecglm.estimate.activations import ActivationProfile, decoder_layers, trace_activations
from ecglm.estimate.meta import (
    QUANT_BLOCK,
    MetaParts,
    build_meta_parts,
    parameter_bytes,
    quantized_bytes,
    quantized_weights,
)
from ecglm.estimate.recipe import EstimateError, read_recipe
from ecglm.estimate.strategies import Layout, check_recipe, layout

GIB = 2**30
#: CUDA context, cuBLAS workspaces and allocator fragmentation: a flat allowance per device.
RUNTIME_OVERHEAD = 1 * GIB
#: Answer tokens whose vocabulary logits the loss computes (HFBackbone keeps only the answer span).
DEFAULT_ANSWER_TOKENS = 64


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
