"""Devices and distribution strategies: the layout a recipe's trainer asks for, and the checks that
refuse, before any weight loads, settings that cannot work (each with its reason and fix)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ecglm.errors import EcglmError


class StrategyError(EcglmError, ValueError):
    """A distribution setting that cannot work with the recipe, found before the model loads."""


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
