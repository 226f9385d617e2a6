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

One module per job: :mod:`~ecglm.estimate.recipe` (reading the recipe), :mod:`~ecglm.estimate.meta`
(the meta model and parameter bytes), :mod:`~ecglm.estimate.activations` (the traced activations),
:mod:`~ecglm.estimate.strategies` (layouts and strategy checks), :mod:`~ecglm.estimate.report` (the
estimate, its table and the command's parser); every name is importable from here, as before 0.2.
"""

from __future__ import annotations

from ecglm.estimate.activations import (
    TRACE_ATTENTION,
    ActivationProfile,
    decoder_layers,
    eager_like_attention,
    flash_like_attention,
    trace_activations,
    trace_ecg,
)
from ecglm.estimate.meta import (
    NESTED_BLOCK,
    QUANT_BLOCK,
    MetaBackbone,
    MetaParts,
    ParameterBytes,
    backbone_config,
    build_meta_parts,
    meta_backbone,
    parameter_bytes,
    quantized_bytes,
    quantized_linear_names,
    quantized_weights,
)
from ecglm.estimate.recipe import (
    EstimateError,
    component_class,
    merged,
    read_recipe,
    set_dotted,
)
from ecglm.estimate.report import (
    DEFAULT_ANSWER_TOKENS,
    GIB,
    RUNTIME_OVERHEAD,
    Settings,
    assumptions,
    compute_dtype,
    estimate,
    estimate_parser,
    find_key,
    format_report,
    fsdp_working_set,
    run_estimate,
    settings_from_recipe,
)
from ecglm.estimate.strategies import (
    Layout,
    StrategyError,
    check_recipe,
    check_strategy,
    device_count,
    layout,
    strategy_kind,
)

__all__ = [
    "DEFAULT_ANSWER_TOKENS",
    "GIB",
    "NESTED_BLOCK",
    "QUANT_BLOCK",
    "RUNTIME_OVERHEAD",
    "TRACE_ATTENTION",
    "ActivationProfile",
    "EstimateError",
    "Layout",
    "MetaBackbone",
    "MetaParts",
    "ParameterBytes",
    "Settings",
    "StrategyError",
    "assumptions",
    "backbone_config",
    "build_meta_parts",
    "check_recipe",
    "check_strategy",
    "component_class",
    "compute_dtype",
    "decoder_layers",
    "device_count",
    "eager_like_attention",
    "estimate",
    "estimate_parser",
    "find_key",
    "flash_like_attention",
    "format_report",
    "fsdp_working_set",
    "layout",
    "merged",
    "meta_backbone",
    "parameter_bytes",
    "quantized_bytes",
    "quantized_linear_names",
    "quantized_weights",
    "read_recipe",
    "run_estimate",
    "set_dotted",
    "settings_from_recipe",
    "strategy_kind",
    "trace_activations",
    "trace_ecg",
]
