"""``ECGLM``: an ECG-language model as a plain ``torch.nn.Module``, with no training framework in it.

``backbone(prompt with connector(encoder(ecg)) spliced in)``, with a PEFT policy deciding what
trains. It computes the loss of a collated batch and generates answers; the Lightning task
(:class:`ecglm.module.ECGLanguageModel`) adds optimisation, logging, checkpoints and evaluation
around it, and any other loop (plain PyTorch, a server, a notebook) can use it directly.

Component layer: imports torch and ecglm's components only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ecglm import conditions
from ecglm._deprecation import forward_deprecated, moved_names
from ecglm.backbones import Backbone
from ecglm.batch import ECGQABatch, TokenFields
from ecglm.connectors import Connector
from ecglm.encoders import ECGEncoder
from ecglm.peft import PEFTPolicy, ProjectionOnly, frozen_part_mode
from ecglm.prompts import PromptStyle

PARTS = ("encoder", "connector", "backbone")

# The conditions are registered in ecglm.conditions (CONDITIONS, DEFAULT_CONDITIONS: deprecated, read
# from the registry when asked for); matched_noise moved there with them.
__getattr__ = moved_names(
    __name__,
    {
        "CONDITIONS": conditions._LEGACY_CONSTANTS["CONDITIONS"],
        "DEFAULT_CONDITIONS": conditions._LEGACY_CONSTANTS["DEFAULT_CONDITIONS"],
        "matched_noise": "ecglm.conditions:matched_noise",
    },
)


#: Prefixes that torch's wrappers (FSDP's auto-wrapped units, activation checkpointing) put into
#: parameter names but not into the full state dict a checkpoint holds.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def state_dict_name(name: str) -> str:
    """A parameter's name as the (full) state dict spells it, without wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def randomized_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``module`` whose every weight tensor is redrawn from a Gaussian with that tensor's own
    mean and std: the scale of each layer kept, whatever was learnt (or pretrained) gone.

    Written here rather than calling each layer's ``reset_parameters``: that is not defined for every
    layer a plugin encoder may hold, and on weight-normalised convolutions it writes into a computed
    tensor and leaves the weights as they were. Tensors with a single value (and norm scales of all
    ones) keep their value. Seeded, so every process and run builds the same baseline.
    """
    copy_ = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in copy_.parameters():
            if not param.is_floating_point() or param.numel() < 2:
                continue
            values = param.float()
            noise = torch.randn(param.shape, generator=generator)
            param.copy_((values.mean() + values.std() * noise.to(param.device)).to(param.dtype))
    return copy_


def _printout_spec(printout: Any) -> dict[str, Any] | None:
    """``class_path`` + ``init_args`` of a printout component (what a bundle records), or ``None``."""
    if printout is None:
        return None
    from dataclasses import asdict

    path = f"{type(printout).__module__}.{type(printout).__qualname__}"
    return {"class_path": path, "init_args": asdict(printout)}


def _parts_for(
    encoder: ECGEncoder | None, connector: Connector | None, backbone: Backbone
) -> tuple[ECGEncoder, Connector]:
    """The encoder and connector of a model: as given, or, for a vision-language backbone that reads
    the images with its own tower (``backbone.image_size``), the images passed through unchanged."""
    from ecglm.connectors import PassThroughConnector
    from ecglm.encoders import BackbonePixels

    image_size = getattr(backbone, "image_size", None)
    if image_size is None:
        if encoder is None or connector is None:
            raise ValueError(
                f"{type(backbone).__name__} reads ECG tokens: give an encoder and a connector "
                "(model.encoder, model.connector); only a vision-language backbone reads images itself"
            )
        return encoder, connector
    if not (encoder is None or isinstance(encoder, BackbonePixels)) or not (
        connector is None or isinstance(connector, PassThroughConnector)
    ):
        raise ValueError(
            f"{type(backbone).__name__} reads the ECG images with its own vision tower: leave model.encoder "
            "and model.connector out (null); for an encoder of ecglm's own use a text LLM (hf) as backbone"
        )
    return (
        encoder or BackbonePixels(image_size),
        connector or PassThroughConnector(num_tokens=backbone.image_tokens_per_image),
    )


@dataclass(frozen=True)
class Decoding:
    """Decoding options of every generated answer; recorded in each report.

    Greedy by default. With ``do_sample`` the seed of the protocol also seeds the sampling.
    """

    max_new_tokens: int = 16
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def generation_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


class ECGLM(nn.Module):
    """Encoder + connector + backbone, with ``policy`` applied (projection-only by default).

    The connector is sized from the encoder's ``output_dim`` and the backbone's ``hidden_size``;
    the policy then sets ``requires_grad`` and adds any adapters, once, here. ``prompt`` is the
    prompt style batches were written with (see :mod:`ecglm.prompts`), bound to the backbone.

    Batches are :class:`ecglm.batch.ECGQABatch` (what :class:`ecglm.data.datamodule.QACollator`
    writes): ``ecg`` (every ECG of the batch, in row order), ``input_ids``, ``attention_mask``,
    ``ecg_mask`` and, for training, ``labels``.
    """

    def __init__(
        self,
        encoder: ECGEncoder | None,
        connector: Connector | None,
        backbone: Backbone,
        policy: PEFTPolicy | None = None,
        prompt: PromptStyle | None = None,
    ):
        super().__init__()
        encoder, connector = _parts_for(encoder, connector, backbone)
        # A backbone written for 0.1 may still ask for its own prompt style (deprecated until 0.3.0).
        prompt = prompt or getattr(backbone, "_legacy_prompt", None)
        #: How this model's prompts are written (bound to the backbone's tokenizer); set by
        #: :func:`ecglm.wiring.connect` from the data side when not given.
        self.prompt = (
            prompt.bind(
                backbone.tokenizer, backbone.placeholder_token_id, getattr(backbone, "ecg_frame", ("", ""))
            )
            if prompt
            else None
        )
        self.encoder = encoder
        self.connector = connector
        self.backbone = backbone
        self.connector.configure(encoder.output_dim, backbone.hidden_size)
        self.policy = policy or ProjectionOnly()
        self.policy.apply(encoder, connector, backbone)
        self.train()  # frozen parts start in eval mode (a randomly initialised LLM would not)
        #: How the parts were built (``class_path`` + ``init_args`` per part, and ``prompt``): set by the
        #: ``ecglm`` command and by :meth:`from_pretrained`, written by :meth:`save_pretrained`.
        self.recipe: dict[str, Any] | None = None
        #: Few-shot demonstrations by dataset (the policy renders them into system prompts), if any.
        self.demonstrations: dict[str, list[dict[str, str]]] | None = None
        #: On the image path, how an ECG is drawn for this model (an :class:`ecglm.render.ECGPrintout`):
        #: the data side's, set by :func:`ecglm.wiring.connect` and by :meth:`from_pretrained`.
        self.printout: Any = None
        #: The training stages that produced these weights, oldest first (``[{"stage": "sft"},
        #: {"stage": "grpo", "init_from": ...}]``; :func:`ecglm.objectives.base.training_stages`), as
        #: checkpoints and bundles record them; ``None`` when unknown.
        self.training_stages: list[dict[str, Any]] | None = None

    def system_prompts(self) -> dict[str, str] | None:
        """Per dataset, the prompt style's system prompt with that dataset's few-shot demonstrations
        (the policy writes them); ``None`` without demonstrations."""
        if not self.demonstrations:
            return None
        base = self.prompt.system_prompt if self.prompt is not None else None
        return self.policy.system_prompts(base, self.demonstrations)

    def save_pretrained(
        self,
        directory: str | Path,
        components: dict[str, Any] | None = None,
        prompt: dict[str, Any] | None = None,
        card: str | None = None,
        report: dict[str, Any] | None = None,
    ) -> Path:
        """Write this model as a portable bundle (:mod:`ecglm.bundle`): trained weights in
        safetensors, adapters in PEFT's format, the parts' config, prompt style, preprocessing,
        demonstrations and a model card. ``components`` / ``prompt`` (``class_path`` + ``init_args``)
        default to :attr:`recipe`, which the ``ecglm`` command and :meth:`from_pretrained` set;
        ``report`` (an ``ecglm evaluate`` report.json) puts the headline evaluation in the card."""
        from ecglm.bundle import BundleError, save_bundle

        recipe = self.recipe or {}
        components = components or {
            p: recipe[p] for p in ("encoder", "connector", "backbone", "policy") if p in recipe
        }
        if not components:
            raise BundleError(
                "this model does not know how its parts were built: pass components={'encoder': "
                "{'class_path': ..., 'init_args': {...}}, ...} (a model from the ecglm command or "
                "from_pretrained knows)"
            )
        prompt = prompt or recipe.get("prompt")
        image = recipe.get("image") or _printout_spec(self.printout)
        if image:  # how to draw an ECG for the model to read; training's distortions are not part of it
            image = {**image, "init_args": {**(image.get("init_args") or {}), "augment": None}}
        return save_bundle(
            self,
            directory,
            components,
            prompt,
            self.demonstrations,
            card,
            report,
            image,
            self.training_stages,
        )

    def answer(
        self,
        signal: Any,
        fs: float,
        leads: Sequence[str],
        question: str | Sequence[str],
        decoding: Decoding | None = None,
        window: str = "first",
        dataset: str | None = None,
    ) -> str | list[str]:
        """Deprecated since 0.2.0, removed in 0.3.0: ``ecglm.inference.answer(model, signal, fs, leads,
        question, ...)`` (answering sits above the model, as transformers' pipelines do)."""
        answer = forward_deprecated("ecglm.model.ECGLM.answer", "ecglm.inference:answer")
        return answer(self, signal, fs, leads, question, decoding, window, dataset)

    def answer_image(
        self,
        image: Any,
        question: str | Sequence[str],
        decoding: Decoding | None = None,
        dataset: str | None = None,
    ) -> str | list[str]:
        """Deprecated since 0.2.0, removed in 0.3.0: ``ecglm.inference.answer_image(model, image,
        question, ...)``."""
        answer_image = forward_deprecated("ecglm.model.ECGLM.answer_image", "ecglm.inference:answer_image")
        return answer_image(self, image, question, decoding, dataset)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> ECGLM:
        """The model a bundle holds (:meth:`save_pretrained`, ``ecglm export``), in eval mode.

        A bundle is untrusted input (:mod:`ecglm.bundle`): its files are checked against their
        recorded sha256, it may name only components that installed packages register, and it runs
        no code and reads no file outside its folder; it reads YAML, JSON and safetensors only. The base
        LLM comes from the hub id or ``pkg:`` package the bundle names. ``overrides`` gives what a
        bundle cannot give for you, per part (``{"backbone": {"model": "/models/smollm2"}}``,
        ``{"encoder": {"checkpoint": "ecg-fm.pt"}}``). ``trust_remote_code=True`` lifts the class and
        argument rules (not the digests): only for bundles from authors you trust."""
        from ecglm.bundle import load_bundle

        model = load_bundle(
            directory, device, model_class=cls, trust_remote_code=trust_remote_code, overrides=overrides
        )
        config = model.bundle_config
        model.recipe = {**config["components"], "prompt": config.get("prompt"), "image": config.get("image")}
        return model

    def train(self, mode: bool = True) -> ECGLM:
        """Frozen parts stay in eval mode, so a frozen encoder or LLM never applies dropout."""
        super().train(mode)
        for name in PARTS:
            part = getattr(self, name)
            if not any(p.requires_grad for p in part.parameters()):
                frozen_part_mode(part, mode)  # eval; checkpointed layers still recompute in training
        return self

    @property
    def num_ecg_tokens(self) -> int:
        return self.connector.num_tokens

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the ECG images this model reads (its encoder's, or its
        vision-language backbone's); ``None``: it reads signals."""
        return getattr(self.encoder, "image_size", None)

    def blank_ecg(self, ecg: Tensor) -> Tensor:
        """The no-signal input shaped as ``ecg``: an all-zero signal, or for images a blank (white) page."""
        if self.image_size is not None:
            return torch.full_like(ecg, 255)
        return torch.zeros_like(ecg)

    def ecg_tokens(self, ecg: Tensor) -> Tensor:
        """``(batch, leads, samples)`` -> ``(batch, num_ecg_tokens, hidden_size)``."""
        # Loaders ship ECGs as stored (float16: half the bytes through worker pipes and to the device,
        # no conversion in the workers); the encoder reads them in its own precision.
        return self.connector(self.encoder(ecg.to(self._encoder_dtype())))

    def _encoder_dtype(self) -> torch.dtype:
        return next((t.dtype for t in self.encoder.parameters() if t.is_floating_point()), torch.float32)

    def random_encoder(self) -> nn.Module:
        """The encoder with its learnt weights replaced by noise (:func:`randomized_copy`, seed 0),
        built once and kept out of the state dict: the random-encoder baseline of evaluation."""
        built = getattr(self, "_random_encoder", None)
        if not any(True for _ in self.encoder.parameters()):
            raise ValueError(
                "the random_encoder control needs an encoder with weights; "
                f"{type(self.encoder).__name__} has none (a vision-language backbone reads the images "
                "itself): leave it out of the conditions"
            )
        device = next(self.encoder.parameters()).device
        if built is None or next(built.parameters()).device != device:
            # object.__setattr__: not a submodule, so not in checkpoints, optimizers or .parameters().
            object.__setattr__(self, "_random_encoder", randomized_copy(self.encoder).eval())
        return self._random_encoder

    def forward(self, batch: ECGQABatch, zero_ecg: bool = False) -> Any:
        """The backbone's output for a collated batch: ``loss`` over the answer spans when the batch
        has ``labels``, and ``logits`` (over the answer span, where the backbone can keep only that)."""
        ecg = self.blank_ecg(batch.ecg) if zero_ecg else batch.ecg
        packed: dict[str, Tensor] = {}
        if batch.packed:  # padding-free rows (ecglm.batch.pack); only to a backbone that takes them
            self.check_packing()
            packed["position_ids"] = batch.position_ids
        tokens = self.ecg_tokens(ecg)
        return self.backbone(
            batch.input_ids, batch.attention_mask, batch.ecg_mask, tokens, batch.labels, **packed
        )

    def check_packing(self) -> None:
        """Raise, with the reason, if the backbone cannot take packed rows (:func:`ecglm.batch.pack`)."""
        reason = self.backbone.packing_blocker()
        if reason is not None:
            raise ValueError(f"packed batches (data.init_args.packed: true) cannot run this model: {reason}")

    def condition_inputs(
        self, batch: ECGQABatch, condition: str = "ecg", prompt: TokenFields | None = None
    ) -> tuple[TokenFields, Tensor]:
        """The prompt rows and ECG tokens a generation batch gives the LLM under ``condition``, a name
        in the registry of :mod:`ecglm.conditions` (see :meth:`generate`)."""
        spec = conditions.get(condition)
        if batch.packed or (prompt is not None and prompt.packed):
            raise ValueError("packed rows are for the training loss; generate from padded prompts")
        if spec.needs_donors and batch.shuffled_ecg is None:
            raise ValueError(
                f"a {condition} condition needs generation batches with other records' ECGs "
                "(QACollator(..., for_generation=True, donors=ECGDonors()))"
            )
        if not spec.vision_language and getattr(self.backbone, "image_size", None) is not None:
            raise ValueError(
                f"the {condition} condition does not apply to {type(self.backbone).__name__}, a "
                "vision-language backbone that reads the images with its own tower: leave it out of "
                "model.evaluation.conditions"
            )
        return spec.inputs(self, batch, prompt)

    @torch.no_grad()
    def answer_scores(self, batch: ECGQABatch, answers: Sequence[str], condition: str = "ecg") -> Tensor:
        """``(rows, len(answers))``: the probability of each answer's first token at the start of the
        answer, renormalised over ``answers`` (e.g. ``["yes", "no"]``: P(yes) for a yes/no question).

        Threshold-free scores for AUC. The answers' first tokens are those the prompt style writes
        (:meth:`ecglm.prompts.PromptStyle.answer_token`); they must differ.
        """
        if self.prompt is None:
            raise ValueError("answer scores need the model's prompt style (ecglm.wiring.connect sets it)")
        ids = [self.prompt.answer_token(answer) for answer in answers]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"the answers {list(answers)} start with the same token: they cannot be scored apart"
            )
        fields, ecg_tokens = self.condition_inputs(batch, condition)
        logits = self.backbone.last_logits(
            fields.input_ids, fields.attention_mask, fields.ecg_mask, ecg_tokens
        )
        return logits[:, ids].float().softmax(-1)

    @torch.no_grad()
    def label_scores(self, batch: ECGQABatch, labels: Sequence[str], condition: str = "ecg") -> Tensor:
        """``(rows, len(labels))``: the mean log-probability per token of each label written as the
        whole answer (the prompt style's tokens, end of turn included) after each row's prompt.

        A threshold-free score per label for the macro-AUC of label-set questions (abnormality
        detection over a label vocabulary), where labels may share first tokens. One forward pass per
        label over the batch: the label's tokens follow every left-padded prompt alike.
        """
        if self.prompt is None:
            raise ValueError("label scores need the model's prompt style (ecglm.wiring.connect sets it)")
        fields, ecg_tokens = self.condition_inputs(batch, condition)
        rows, device = fields.rows, fields.input_ids.device
        scores = torch.empty((rows, len(labels)))
        for j, label in enumerate(labels):
            ids = torch.tensor(self.prompt.answer_tokens(label), device=device).expand(rows, -1)
            n = ids.shape[1]
            targets = torch.cat([torch.full_like(fields.input_ids, -100), ids], 1)
            out = self.backbone(
                torch.cat([fields.input_ids, ids], 1),
                torch.cat([fields.attention_mask, torch.ones_like(ids)], 1),
                torch.cat([fields.ecg_mask, torch.zeros_like(ids, dtype=torch.bool)], 1),
                ecg_tokens,
                targets,
            )
            # The logits before each label token predict it (the backbone keeps the answer span's).
            logits = out.logits[:, -(n + 1) : -1].float()
            scores[:, j] = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(-1).cpu()
        return scores

    @torch.no_grad()
    def generate(
        self,
        batch: ECGQABatch,
        decoding: Decoding | None = None,
        condition: str = "ecg",
        prompt: TokenFields | None = None,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Answers for a left-padded prompt batch (``QACollator(..., for_generation=True)``).

        ``condition`` names a registered condition (:mod:`ecglm.conditions`): ``ecg``, ``shuffled_ecg``
        (each question with other records' ECGs, the batch's ``shuffled_ecg``), ``zeroed_ecg`` (ECG
        tokens of an all-zero signal), ``noise_ecg`` (Gaussian noise with each lead's mean and std,
        :func:`ecglm.conditions.matched_noise`), ``random_encoder`` (the real ECG through the encoder
        with random weights, :meth:`random_encoder`, and the trained connector) or ``text_only`` (the
        batch's ``text_only`` prompts, which have no ECG positions). ``prompt`` replaces the batch's
        token fields (validation generates from the prompt part of a training batch).
        Decoding follows ``decoding`` (greedy by default) unless ``generation_kwargs`` say otherwise.
        """
        fields, ecg_tokens = self.condition_inputs(batch, condition, prompt)
        kwargs = {**(decoding or Decoding()).generation_kwargs(), **generation_kwargs}
        new_ids = self.backbone.generate(
            fields.input_ids, fields.attention_mask, fields.ecg_mask, ecg_tokens, **kwargs
        )
        texts = self.backbone.tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def persistent_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: trainable weights and all of non-pretrained parts."""
        keys = {state_dict_name(name) for name, p in self.named_parameters() if p.requires_grad}
        for name in PARTS:
            part = getattr(self, name)
            if not getattr(part, "pretrained", False):
                keys.update(f"{name}.{k}" for k in part.state_dict())
        return keys

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The part of the state dict that :meth:`persistent_keys` names (what checkpoints hold)."""
        keep = self.persistent_keys()
        return {k: v for k, v in self.state_dict().items() if k in keep}
