"""PEFT policies: which parameters of encoder, connector and backbone train, and how the backbone is adapted.

Component layer: imports torch, transformers and peft only. A policy is one object applied to any
backbone — never a model subclass or a training script of its own — so every strategy runs through
the same training path. Options every policy has (encoder fine-tuning, gradient checkpointing) live
on :class:`PEFTPolicy`; QLoRA is :class:`LoRA` with ``kbit=True`` over a 4-bit backbone.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from string import Formatter
from typing import TYPE_CHECKING

import torch
from torch import nn

from ecglm.backbones import Backbone
from ecglm.connectors import Connector
from ecglm.encoders import ECGEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# peft and transformers' model modules are imported where they are used: together they take seconds
# to import, and every ecglm command imports every registered policy at start-up.

log = logging.getLogger(__name__)

#: The attention projections of Llama, Qwen3 / Qwen3.5 (full-attention layers) and Gemma 3 / 4.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Where the recipe sets the backbone's 4-bit loading (named in QLoRA's errors).
QUANTIZATION_KEY = "model.backbone.init_args.quantization"


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts its original elements.

    bitsandbytes packs two 4-bit values per stored element, so ``numel()`` of a quantised weight is
    half its parameter count; its ``quant_state.shape`` is the original shape.
    """
    total = trainable = 0
    for p in module.parameters():
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def hf_model(backbone: Backbone, what: str) -> PreTrainedModel:
    """The backbone's transformers model (:attr:`Backbone.transformers_model`), which ``what`` acts on."""
    model = getattr(backbone, "transformers_model", None)  # a stand-in need not derive from Backbone
    if model is None:
        raise TypeError(
            f"{what} needs a backbone that wraps a transformers PreTrainedModel "
            f"(Backbone.transformers_model, as HFBackbone's does); {type(backbone).__name__} wraps none"
        )
    return model


def is_4bit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        getattr(p, "quant_state", None) is not None for p in model.parameters()
    )


# --- encoder fine-tuning ----------------------------------------------------------------------------


def encoder_top_layers(encoder: ECGEncoder, n: int) -> list[nn.Module]:
    """The modules that training the top ``n`` layers of ``encoder`` unfreezes, lowest first.

    The encoder says which they are (:meth:`ECGEncoder.top_layers`; for
    :class:`~ecglm.encoders.Wav2Vec2ECGEncoder` its last ``n`` transformer layers).
    """
    return list(encoder.top_layers(n))


# --- gradient checkpointing -------------------------------------------------------------------------


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing passes gradients through a layer whatever its inputs, so they reach
    the ECG tokens and LoRA weights even when no input of the LLM requires a gradient (a frozen
    connector); transformers adds the input-embedding hook as well.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen_part_mode(part: nn.Module, training: bool) -> None:
    """Mode for a part with no trainable parameter: eval, but checkpointed layers recompute in training.

    transformers checkpoints a layer only while ``layer.training`` is set, and a frozen LLM still
    back-propagates into the ECG tokens. In training, only the layer wrappers go back to training
    mode: dropout and attention modules read their own flag, so no dropout runs; out of training
    (validation, generation) everything is in eval mode and the KV cache works.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    part.eval()
    if not training:
        return
    for module in part.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


# --- policies -------------------------------------------------------------------------------------


class PEFTPolicy(ABC):
    """Base class of every PEFT policy, and the options every policy has.

    :meth:`apply` runs once, before the optimizer is built: it sets ``requires_grad`` on every
    parameter of the three parts (the encoder from the options below, the rest in :meth:`adapt`),
    lets the subclass replace modules inside the backbone (adapters), then turns on gradient
    checkpointing if asked.

    Args:
        train_encoder: Train the whole encoder (default: frozen).
        encoder_top_layers: Train only the top ``n`` layers of the encoder (see
            :func:`encoder_top_layers`); implies encoder training.
        gradient_checkpointing: Recompute the LLM's layer activations in the backward pass
            (less memory, about one more forward pass of time).

    Few-shot prompting is an optional capability, declared here with its defaults (none):
    ``demos_per_dataset`` demonstrations per dataset drawn from the training split by ``seed``
    (pairs longer than ``max_demo_chars`` skipped) and rendered by :meth:`system_prompts`.
    """

    demos_per_dataset: int = 0
    seed: int = 0
    max_demo_chars: int | None = None

    def __init__(
        self,
        train_encoder: bool = False,
        encoder_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        if encoder_top_layers is not None and encoder_top_layers < 1:
            raise ValueError(
                f"encoder_top_layers must be at least 1 (null trains all or none); got {encoder_top_layers}"
            )
        self.train_encoder = train_encoder
        self.encoder_top_layers = encoder_top_layers
        self.gradient_checkpointing = gradient_checkpointing

    def apply(self, encoder: ECGEncoder, connector: Connector, backbone: Backbone) -> None:
        """Freeze, unfreeze or adapt the parts in place."""
        set_trainable(encoder, self.train_encoder and self.encoder_top_layers is None)
        if self.encoder_top_layers is not None:
            for module in encoder_top_layers(encoder, self.encoder_top_layers):
                set_trainable(module, True)
        self.adapt(connector, backbone)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(hf_model(backbone, "gradient_checkpointing"))

    @abstractmethod
    def adapt(self, connector: Connector, backbone: Backbone) -> None:
        """Set which connector and backbone parameters train; add adapters to the backbone."""

    def system_prompts(
        self, base: str | None, demonstrations: dict[str, list[dict[str, str]]]
    ) -> dict[str, str]:
        """Per dataset, the system prompt with its demonstrations (needed when ``demos_per_dataset`` > 0)."""
        raise NotImplementedError(
            f"{type(self).__name__} asks for {self.demos_per_dataset} demonstrations per dataset but does "
            "not say how they are written: define system_prompts(base, demonstrations)"
        )


class ProjectionOnly(PEFTPolicy):
    """Train the connector only; the language model stays frozen.

    Args:
        train_encoder: Train the encoder too (for an encoder without pretrained weights, as in
            the quickstart).
        encoder_top_layers: Train only the top ``n`` encoder layers.
        gradient_checkpointing: Recompute the frozen LLM's activations in the backward pass, which
            still runs through it to reach the ECG tokens.
    """

    def __init__(
        self,
        train_encoder: bool = False,
        encoder_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(train_encoder, encoder_top_layers, gradient_checkpointing)

    def adapt(self, connector: Connector, backbone: Backbone) -> None:
        set_trainable(connector, True)
        set_trainable(backbone, False)
        train_projector(backbone, True)


def projector_modules(backbone: Backbone) -> dict[str, nn.Module]:
    """A vision-language backbone's own vision-to-text projection (empty for a text LLM): the part that
    plays the connector's role, and trains where a policy trains the connector."""
    modules = getattr(backbone, "projector_modules", None)
    return modules() if callable(modules) else {}


def train_projector(backbone: Backbone, trainable: bool) -> None:
    for module in projector_modules(backbone).values():
        train_in_full(module) if trainable else set_trainable(module, False)


def train_in_full(module: nn.Module) -> None:
    """Train every weight of a backbone module; in a 16-bit model, with float32 weights.

    AdamW's small updates round away in bf16 / fp16 weights (as for LoRA adapters, which peft keeps
    in float32). The module computes in float32 on inputs cast up, and hands the model back its own
    dtype, so it fits a 16-bit model with or without autocast. 4-bit modules are left as they are.
    """
    set_trainable(module, True)
    params = [p for p in module.parameters() if p.is_floating_point()]
    low = {p.dtype for p in params} & {torch.float16, torch.bfloat16}
    if not low or any(getattr(p, "quant_state", None) is not None for p in module.parameters()):
        return
    module.float()
    model_dtype = low.pop()
    module.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
    module.register_forward_hook(lambda _, __, output: _cast(output, model_dtype))


def _inputs_to_float32(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}


def _cast(value: object, dtype: torch.dtype) -> object:
    """Floating-point tensors in ``value`` (a tensor, a tuple / list, or a transformers ``ModelOutput``,
    whose fields are cast in place) as ``dtype``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):  # ModelOutput is a dict subclass
        for key, field_value in value.items():
            value[key] = _cast(field_value, dtype)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def named_backbone_modules(backbone: Backbone, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """Modules of the backbone's transformers model whose full name equals or ends with ``"." + name``
    for one of ``names``; a name that matches nothing is an error listing what there is."""
    model = hf_model(backbone, what)
    found: dict[str, nn.Module] = {}
    for target in names:
        matched = {n: m for n, m in model.named_modules() if n == target or n.endswith("." + target)}
        if not matched:
            names = (n.rsplit(".", 1)[-1] for n, _ in model.named_modules())
            known = sorted({n for n in names if n and not n.isdigit()})
            raise ValueError(
                f"{what}: {target!r} names no module of {type(model).__name__}; its module names end in "
                f"{', '.join(known[:60])}"
            )
        found.update(matched)
    return found


class PartialFineTuning(PEFTPolicy):
    """Named backbone modules train in full, everything else frozen: the "partial" baseline of the
    Llama 3.2 Vision ECG study (projector plus cross-attention layers), or any module list.

    Args:
        modules: Module names in the backbone's transformers model (a full name, or its dotted
            suffix: ``cross_attn``, ``layers.3``). Default: the cross-attention decoder layers of a
            cross-attention model (``mllama``); other backbones must name theirs.
        train_connector: Train the connector, and a vision-language model's own projector.
        train_encoder, encoder_top_layers, gradient_checkpointing: As for every policy.
    """

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        train_connector: bool = True,
        train_encoder: bool = False,
        encoder_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(train_encoder, encoder_top_layers, gradient_checkpointing)
        self.modules = list(modules) if modules is not None else None
        self.train_connector = train_connector
        self.trained: list[str] = []  # full names of the modules trained in full, set by apply

    def adapt(self, connector: Connector, backbone: Backbone) -> None:
        set_trainable(connector, self.train_connector)
        set_trainable(backbone, False)
        train_projector(backbone, self.train_connector)
        if self.modules is None:
            cross = getattr(backbone, "cross_attention_modules", None)
            chosen = cross() if callable(cross) else {}
            if not chosen:
                raise ValueError(
                    f"{type(backbone).__name__} has no cross-attention layers: name the modules to train "
                    "(model.policy.init_args.modules)"
                )
        else:
            chosen = named_backbone_modules(backbone, self.modules, "partial fine-tuning")
        for module in chosen.values():
            train_in_full(module)
        self.trained = sorted(chosen)


class LoRA(PEFTPolicy):
    """Connector plus low-rank adapters on the LLM's linear layers (peft); with ``kbit``, QLoRA.

    Adapters go into the text decoder only (the module ``get_decoder()`` returns): never into
    ``lm_head``, the embeddings, or a vision or audio tower. They are injected into the
    transformers model in place (``peft.inject_adapter_in_model``), so ``backbone.model`` keeps its
    class, forward, ``generate`` and hooks; the adapted layers' weights move to ``<layer>.base_layer``
    and the adapters are ``<layer>.lora_A.default`` / ``lora_B.default`` (and
    ``lora_magnitude_vector.default`` with DoRA). Only the adapters (and the connector) train.

    Args:
        r: Rank of the adapters.
        alpha: Scale numerator: the update is ``(alpha / r) * B A x``.
        dropout: Dropout on the adapters' input (passed to ``LoraConfig.lora_dropout``).
        target_modules: Linear layers to adapt, each name matching a layer's full name or its
            dotted suffix (``q_proj``, ``self_attn.q_proj``), or ``"all-linear"``: every linear
            layer of the decoder.
        use_dora: Weight-decomposed adapters (DoRA): a trained magnitude per output feature.
        kbit: QLoRA over a 4-bit backbone: peft's k-bit preparation (everything frozen, the
            non-quantised weights cast to float32) before the adapters. Required with, and only with,
            a 4-bit backbone (``model.backbone.init_args.quantization``).
        train_connector: Train the connector (default), and a vision-language model's own projector;
            ``False`` trains the adapters only.
        vision_tower: Adapters on a vision-language model's vision tower too (its linear layers but
            the projector's; the studies' "all linear layers"). Default: the language model only.
        train_modules: Backbone modules trained in full beside the adapters (names as
            :class:`PartialFineTuning`'s, e.g. ``cross_attn`` of Llama 3.2 Vision).
        train_encoder: Train the whole encoder.
        encoder_top_layers: Train only the top ``n`` encoder layers.
        gradient_checkpointing: Recompute the LLM's layer activations in the backward pass.
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: Sequence[str] | str = ATTENTION_PROJECTIONS,
        use_dora: bool = False,
        kbit: bool = False,
        train_connector: bool = True,
        train_encoder: bool = False,
        encoder_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
        vision_tower: bool = False,
        train_modules: Sequence[str] = (),
    ):
        super().__init__(train_encoder, encoder_top_layers, gradient_checkpointing)
        self.vision_tower = vision_tower
        self.train_modules = list(train_modules)
        if r < 1:
            raise ValueError(f"r must be at least 1; got {r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [target_modules]
        if not isinstance(target_modules, str) and not target_modules:
            raise ValueError('target_modules is empty; name linear layers or use "all-linear"')
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.use_dora = use_dora
        self.kbit = kbit
        self.train_connector = train_connector
        self.targets: list[str] = []  # full names of the adapted layers, set by apply
        self.lora_config: object = None  # the peft LoraConfig of the injected adapters, set by apply

    def adapt(self, connector: Connector, backbone: Backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model, prepare_model_for_kbit_training

        model = hf_model(backbone, "LoRA")
        set_trainable(connector, self.train_connector)
        set_trainable(backbone, False)
        check_kbit(model, self.kbit)
        if self.kbit:
            # Checkpointing is turned on by apply, from this policy's own option.
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        self.targets = lora_targets(model, self.target_modules)
        if self.vision_tower:
            self.targets = sorted({*self.targets, *vision_linear_layers(backbone)})
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            # Exact full names: peft's own matching would also reach lm_head or a vision tower.
            target_modules="|".join(re.escape(name) for name in self.targets),
            use_dora=self.use_dora,
            bias="none",
        )
        inject_adapter_in_model(config, model)  # in place; leaves only the adapters trainable
        self.lora_config = config  # what a bundle writes as the adapters' adapter_config.json
        train_projector(backbone, self.train_connector)
        for module in named_backbone_modules(backbone, self.train_modules, "train_modules").values():
            train_in_full(module)
        for p in model.parameters():
            # Float32 adapters over a bf16 / fp16 base, as get_peft_model makes them: AdamW's small
            # updates would round away in 16-bit weights.
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        log.info(
            "%s r=%d alpha=%s dropout=%s on %d layers (%s)",
            "DoRA" if self.use_dora else "LoRA",
            *(self.r, self.alpha, self.dropout, len(self.targets)),
            ", ".join(sorted({name.rsplit(".", 1)[-1] for name in self.targets})),
        )


def check_kbit(model: PreTrainedModel, kbit: bool) -> None:
    """QLoRA (``kbit``) with, and only with, a 4-bit model, so that a recipe always says which it is."""
    quantized = is_4bit(model)
    if kbit and not quantized:
        raise ValueError(
            f"kbit (QLoRA) needs a 4-bit backbone, and {type(model).__name__} is not quantised: set "
            f"{QUANTIZATION_KEY}: nf4, or kbit: false for LoRA over full-precision weights"
        )
    if quantized and not kbit:
        raise ValueError(
            f"the backbone is 4-bit ({QUANTIZATION_KEY}); LoRA over 4-bit weights is QLoRA: set "
            "model.policy.init_args.kbit: true"
        )


def decoder_linear_layers(model: PreTrainedModel) -> dict[str, nn.Module]:
    """``full name -> module`` of every linear layer of the text decoder, embeddings and LM head excluded."""
    from transformers.pytorch_utils import Conv1D

    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return {
        f"{prefix}.{name}" if prefix else name: module
        for name, module in decoder.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in skip
    }


def vision_linear_layers(backbone: Backbone) -> list[str]:
    """Full names of a vision-language backbone's vision-tower linear layers, its projector's excluded."""
    towers = getattr(backbone, "vision_modules", None)
    if not callable(towers) or not towers():
        raise ValueError(f"vision_tower: {type(backbone).__name__} has no vision tower of its own")
    projector = tuple(f"{name}." for name in projector_modules(backbone))
    return sorted(
        f"{tower}.{name}"
        for tower, module in towers().items()
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and not f"{tower}.{name}.".startswith(projector)
    )


def lora_targets(model: PreTrainedModel, target_modules: Sequence[str] | str) -> list[str]:
    """Full names of the decoder's linear layers that ``target_modules`` selects.

    A name matches a layer whose full name equals it or ends with ``"." + name``. A name that
    matches no linear layer of the decoder — a typo, a module of another family, an embedding,
    ``lm_head`` — is an error that lists the decoder's linear layer names.
    """
    linear = decoder_linear_layers(model)
    if target_modules == "all-linear":
        return sorted(linear)

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    chosen, unmatched = set(), []
    for target in target_modules:
        found = {name for name in linear if matches(name, target)}
        if not found:
            unmatched.append(target)
        chosen |= found
    if unmatched:
        others = {
            f"{name} ({type(module).__name__})"
            for name, module in model.named_modules()
            if any(matches(name, t) for t in unmatched)
        }
        available = sorted({re.sub(r"\.\d+\.", ".N.", name) for name in linear})
        raise ValueError(
            f"target_modules {unmatched} match no linear layer of the {type(model).__name__} decoder"
            + (f" (they name {', '.join(sorted(others))}, which LoRA never adapts)" if others else "")
            + f". Its linear layers: {', '.join(available)}"
        )
    return sorted(chosen)


# --- few-shot connector PEFT --------------------------------------------------------------------------
# Projection-only training with in-context QA demonstrations. The policy only declares what it wants
# (how many demonstrations per dataset type, drawn by which seed) and renders them;
# ECGQADataModule.sample_demonstrations draws them from the training split, ECGLanguageModel records
# them with the run (checkpoint and demonstrations.json), and QACollator writes each item's prompt with
# the demonstrations of its dataset. See docs/few-shot.md.

DEFAULT_TEMPLATE = "Example:\nQuestion: {question}\nAnswer: {answer}"

#: One demonstration: ``key``, ``dataset``, ``question``, ``answer`` (as the model reads it, lists
#: joined with ", ") and ``question_type``, all strings.
Demonstration = dict[str, str]


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` uses exactly the fields ``{question}`` and ``{answer}``."""
    fields = {field for _, field, _, _ in Formatter().parse(template) if field is not None}
    if fields != {"question", "answer"}:
        raise ValueError(
            f"demonstration template {template!r} must use the fields {{question}} and {{answer}} and no "
            f"other; it uses {sorted(fields)} (write literal braces as {{{{ and }}}})"
        )


class FewShotConnector(ProjectionOnly):
    """Projection-only training plus in-context QA demonstrations in the system prompt.

    Each dataset type (a QA pair's ``dataset``: ``ecgqa-ptbxl``, ``pulse-ecg-instruct``, ...) gets
    ``demos_per_dataset`` question-answer pairs from the training split, chosen by ``seed`` and fixed
    for the whole run; its system prompt becomes the prompt style's, a blank line, then the
    demonstrations rendered with ``template`` (separated by blank lines). Demonstrations are text
    only: no ECG goes with them. They are recorded in every checkpoint and in
    ``demonstrations.json``, and ``ecglm test`` / ``ecglm evaluate`` use the recorded ones.

    Args:
        demos_per_dataset: Demonstrations per dataset type (the paper: 1).
        seed: Seed of the draw (independent of ``seed_everything`` and of the data shuffle).
        template: How one demonstration is written, with ``{question}`` and ``{answer}``.
        max_demo_chars: Draw only among pairs whose question and answer together are at most this
            many characters (long free-text reports make long prompts); ``None``: any pair.
        prefix_reuse: Compute each dataset's prompt prefix (system prompt and demonstrations) once
            without gradients and reuse it in the training loss (``HFBackbone.forward_reusing_prefix``);
            same loss and gradients, less compute.
        train_encoder, encoder_top_layers, gradient_checkpointing: As for every policy.
    """

    def __init__(
        self,
        demos_per_dataset: int = 1,
        seed: int = 0,
        template: str = DEFAULT_TEMPLATE,
        max_demo_chars: int | None = None,
        prefix_reuse: bool = True,
        train_encoder: bool = False,
        encoder_top_layers: int | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(train_encoder, encoder_top_layers, gradient_checkpointing)
        if demos_per_dataset < 1:
            raise ValueError(f"demos_per_dataset must be at least 1, got {demos_per_dataset}")
        check_template(template)
        self.demos_per_dataset = demos_per_dataset
        self.seed = seed
        self.template = template
        self.max_demo_chars = max_demo_chars
        self.prefix_reuse = prefix_reuse

    def apply(self, encoder: ECGEncoder, connector: Connector, backbone: Backbone) -> None:
        super().apply(encoder, connector, backbone)
        backbone.prefix_reuse = self.prefix_reuse

    def render(self, demonstrations: list[Demonstration]) -> str:
        """The demonstrations of one dataset as text, separated by blank lines."""
        return "\n\n".join(
            self.template.format(question=d["question"], answer=d["answer"]) for d in demonstrations
        )

    def system_prompts(
        self, base: str | None, demonstrations: dict[str, list[Demonstration]]
    ) -> dict[str, str]:
        """Per dataset: ``base``, a blank line, then that dataset's demonstrations."""
        return {
            dataset: f"{base}\n\n{self.render(demos)}" if base else self.render(demos)
            for dataset, demos in demonstrations.items()
        }
