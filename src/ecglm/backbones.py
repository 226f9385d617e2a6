"""Language-model backbones: a causal LM, its tokenizer and chat template, and the splice of ECG tokens.

Component layer: imports torch and transformers (bitsandbytes through transformers, for 4-bit) only.
:class:`Backbone` is the interface the rest of ecglm uses; :class:`HFBackbone` wraps any
``AutoModelForCausalLM``, including what some families need beyond ``inputs_embeds`` (Gemma 4's
per-layer embeddings). Prompts are rendered by :mod:`ecglm.prompts`; prefix reuse lives in
:mod:`ecglm.prefix_reuse` and the fast-kernel report in :mod:`ecglm.kernels`.
"""

from __future__ import annotations

import inspect
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ecglm.io import resolve_pkg
from ecglm.kernels import kernel_bindings, log_kernels
from ecglm.prefix_reuse import (
    PrefixCache,
    PrefixReuseUnsupported,
    PrefixState,
    SuffixLayout,
    batch_cache,
    prefix_state,
)
from ecglm.prompts import IGNORE_INDEX, default_placeholder_id

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["nf4", "fp4"]


class Backbone(nn.Module, ABC):
    """Base class of every language-model backbone.

    Subclasses set ``hidden_size`` and ``tokenizer`` and implement :meth:`embed_tokens`,
    :meth:`forward` and :meth:`generate`. ``pretrained`` says whether the weights can be loaded
    again from their source; frozen weights that cannot are saved in checkpoints.
    ``prefix_reuse`` (set by a policy that keeps the LM frozen) lets :meth:`forward` compute the
    prompt prefix that rows share once, without gradients; a backbone that cannot ignores it.
    """

    hidden_size: int
    tokenizer: PreTrainedTokenizerBase
    pretrained: bool = True
    prefix_reuse: bool = False

    #: What a subclass must set in ``__init__``, and why (named when it is missing).
    REQUIRED_ATTRIBUTES = {
        "hidden_size": "the width of its token embeddings, which the connector projects the ECG to",
        "tokenizer": "the tokenizer its prompts are written with (the data side's prompt style binds it)",
    }

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__ runs only for attributes not found the usual way; its message names
        # neither the contract nor the class that broke it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in self.REQUIRED_ATTRIBUTES:
                raise
        raise AttributeError(
            f"{type(self).__name__} has no {name}: a Backbone must set self.{name} in __init__ "
            f"({self.REQUIRED_ATTRIBUTES[name]})"
        )

    @property
    def placeholder_token_id(self) -> int:
        """The token id written at the ECG positions (their embeddings are overwritten). Only its
        position matters, except for models that look ids up beside the embeddings (Gemma 4's
        per-layer embeddings see it at the ECG positions). Default: pad, else end of sequence."""
        return default_placeholder_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return default_placeholder_id(self.tokenizer)

    #: ``(height, width)`` of the ECG images a backbone with a vision tower of its own reads
    #: (:class:`VisionLanguageBackbone`); ``None``: it reads ECG tokens from ecglm's encoder.
    image_size: tuple[int, int] | None = None

    @property
    def ecg_frame(self) -> tuple[str, str]:
        """Text the prompt writes before and after each ECG's positions (default: none). A
        vision-language model's processor frames an image with delimiters of its own."""
        return "", ""

    @property
    def transformers_model(self) -> PreTrainedModel | None:
        """Optional: the wrapped ``transformers`` model, which adapters (LoRA, DoRA, QLoRA) and gradient
        checkpointing act on. ``None`` (the default) for a backbone that wraps none: those policy
        options then refuse it, naming the backbone."""
        return None

    @abstractmethod
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Input embeddings of ``input_ids``, ``(batch, seq, hidden_size)``."""

    def splice(self, input_ids: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor) -> Tensor:
        """Token embeddings with the ECG tokens written over the positions where ``ecg_mask`` is set."""
        embeds = self.embed_tokens(input_ids)
        expected = ecg_tokens.shape[0] * ecg_tokens.shape[1]
        if int(ecg_mask.sum()) != expected:
            raise ValueError(f"{int(ecg_mask.sum())} ECG positions in the batch for {expected} ECG tokens")
        return embeds.masked_scatter(ecg_mask.unsqueeze(-1), ecg_tokens.to(embeds.dtype))

    @abstractmethod
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Run the LM on the spliced sequence; with ``labels``, ``loss`` is the mean answer-token loss.

        ``position_ids`` comes with packed rows only (:func:`ecglm.batch.pack`), and only to a
        backbone whose :meth:`packing_blocker` is ``None``.
        """

    def last_logits(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor
    ) -> Tensor:
        """Vocabulary logits at the last position of left-padded prompts, ``(rows, vocab)``: the
        distribution of each answer's first token. Default: from :meth:`forward`'s logits."""
        return self.forward(input_ids, attention_mask, ecg_mask, ecg_tokens).logits[:, -1]

    def packing_blocker(self) -> str | None:
        """Why this backbone cannot take packed rows (:func:`ecglm.batch.pack`); ``None`` if it can.

        A backbone that can takes ``position_ids`` in :meth:`forward` (each QA pair numbered from 0)
        and attends within each pair only, so that the loss is the padded batch's.
        """
        return f"{type(self).__name__} does not take packed rows (it does not override packing_blocker)"

    @abstractmethod
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        **generation_kwargs: Any,
    ) -> Tensor:
        """Continue left-padded prompts; returns only the new token ids, ``(batch, new_tokens)``."""


#: Layer types (``config.layer_types``) that transformers masks per packed QA pair.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
#: Config fields of recurrent and hybrid architectures that do not list their layers in ``layer_types``.
RECURRENT_CONFIG_FIELDS = ("layers_block_type", "hybrid_override_pattern", "mamba_d_state", "state_size")


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (rows are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_span(labels: Tensor) -> int:
    """Length of the trailing span that holds every supervised position of left-padded ``labels``."""
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        raise ValueError("no supervised token in the batch (every label is ignored)")
    return labels.shape[1] - int(supervised[0])


def answer_loss(logits: Tensor, labels: Tensor, span: int) -> Tensor:
    """Mean loss of the answer tokens from the logits of the last ``span + 1`` positions (left-padded)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, -span:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def resolve_model_path(model: str) -> str:
    """``pkg:NAME`` names the model files of an installed Python package (:func:`ecglm.io.resolve_pkg`).

    A value that can only be a local path (``/abs``, ``./rel``, ``../rel``, ``~/...``, or more than
    one ``/``; a hub id is ``org/name``) must exist: transformers would call it a malformed repo id.
    """
    if not model.startswith("pkg:"):
        return _local_path(model) if _is_local_path(model) else model
    return resolve_pkg(model)


def _is_local_path(model: str) -> bool:
    relative = model in (".", "..") or model.startswith(("./", "../", "~"))
    return relative or os.path.isabs(model) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def _local_path(model: str) -> str:
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (a local folder; a hub id reads org/name)"
        )
    return path


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, for the floating-point dtypes a backbone runs in."""
    allowed = ("float32", "bfloat16", "float16")
    if name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return getattr(torch, name)


class HFBackbone(Backbone):
    """Any Hugging Face ``AutoModelForCausalLM`` with its tokenizer and chat template.

    Handles, beyond plain ``inputs_embeds``: Gemma 4's per-layer embeddings (looked up from the token
    ids, with the placeholder id at the ECG positions — as Gemma itself does for image tokens), 4-bit
    loading through bitsandbytes (the LM only), and the fast-kernel report of Qwen3.5-style hybrid
    models (logged at INFO; ``self.kernels`` maps each kernel to what runs it, ``"torch"`` for the
    PyTorch reference).

    With ``prefix_reuse`` set and the LM frozen and in eval mode, the loss path computes each distinct
    prompt prefix (the tokens before a row's first ECG position: system prompt, few-shot
    demonstrations, the user turn's opening) once without gradients, keeps its cache in
    ``self.prefix_cache`` and runs the LM on the rest only (see :meth:`forward`). It covers attention
    layers (full and sliding window), KV sharing and linear-attention layers (conv and recurrent
    state); where it cannot run it logs why once and runs the whole sequence.

    Args:
        model: Hub id or local folder (``pkg:NAME`` for the folder of an installed package); with
            ``random_init``, a ``model_type`` such as ``"llama"`` or ``"qwen3_5_text"`` also works.
        tokenizer: Where to load the tokenizer from, if not from ``model``.
        gguf_file: GGUF file inside ``model`` to load (transformers de-quantises it).
        dtype: Weight dtype of the LM (with ``quantization``: of the parts left unquantised).
        quantization: ``"nf4"`` or ``"fp4"`` loads the LM's linear layers in 4 bits (bitsandbytes);
            embeddings and the LM head stay in ``dtype``. Needs pretrained weights.
        bnb_double_quant: Quantise the 4-bit scales as well (saves ~0.4 bit per weight).
        bnb_compute_dtype: Dtype the 4-bit layers compute in.
        bnb_quant_storage: Dtype the packed 4-bit weights are stored in (default uint8). FSDP shards
            only floating-point tensors: under FSDP store them in the other weights' dtype
            (``docs/scaling.md``).
        random_init: Build the architecture with random weights instead of loading them
            (for smoke tests; such weights are saved in checkpoints).
        config_overrides: Config fields to change, e.g. a tiny ``hidden_size`` for tests.
        trust_remote_code: Allow code from the model's repository to run.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        dtype: DType = "float32",
        quantization: Quantization | None = None,
        bnb_double_quant: bool = True,
        bnb_compute_dtype: DType = "bfloat16",
        bnb_quant_storage: DType | None = None,
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.model_name = model
        self.gguf_file = gguf_file
        self.dtype = torch_dtype(dtype)
        self.quantization = quantization
        self.bnb_double_quant = bnb_double_quant
        self.bnb_compute_dtype = torch_dtype(bnb_compute_dtype, "bnb_compute_dtype")
        self.bnb_quant_storage = (
            torch_dtype(bnb_quant_storage, "bnb_quant_storage") if bnb_quant_storage else None
        )
        self.pretrained = not random_init
        self.trust_remote_code = trust_remote_code
        if quantization not in (None, "nf4", "fp4"):
            raise ValueError(f"quantization must be nf4, fp4 or None; got {quantization!r}")
        if quantization and random_init:
            raise ValueError("quantization applies to pretrained weights: save the model first, or drop it")
        self.tokenizer = self.load_tokenizer(tokenizer)
        self.model = self.load_model(config_overrides or {})
        self.hidden_size = self.model.get_input_embeddings().embedding_dim
        self._check_vocab()
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._per_layer_path = self._find_per_layer_embeddings()
        bindings = kernel_bindings(self.model)
        self.kernels = {name: impl or "torch" for name, _, impl in bindings}
        log_kernels(self.model.config.model_type, bindings)
        self.prefix_cache = PrefixCache()
        self._prefix_unsupported: str | None = None  # why this LM's cache cannot be shared, once found
        self._prefix_warned: set[str] = set()

    @property
    def transformers_model(self) -> PreTrainedModel:
        return self.model

    def load_tokenizer(self, source: str | None) -> PreTrainedTokenizerBase:
        path = resolve_model_path(source or self.model_name)
        gguf = self.gguf_file if source is None else None
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=self.trust_remote_code)

    @property
    def auto_class(self) -> Any:
        """The transformers auto class the model is loaded with."""
        return AutoModelForCausalLM

    def load_model(self, config_overrides: dict[str, Any]) -> nn.Module:
        path = resolve_model_path(self.model_name)
        if not self.pretrained:
            if Path(path).exists() or "/" in path:
                config = AutoConfig.from_pretrained(
                    path, trust_remote_code=self.trust_remote_code, **config_overrides
                )
            else:
                config = AutoConfig.for_model(path, **config_overrides)
            return self.auto_class.from_config(config, dtype=self.dtype)
        quantized = {}
        if self.quantization:
            quantized = {
                "quantization_config": self.quantization_config(),
                "device_map": quantized_device_map(),
            }
        model = self.auto_class.from_pretrained(
            path,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            **quantized,
            **config_overrides,
        )
        if self.quantization:
            keep_4bit_layout_on_cpu(model)
        return model

    def quantization_config(self) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quantization,
            bnb_4bit_use_double_quant=self.bnb_double_quant,
            bnb_4bit_compute_dtype=self.bnb_compute_dtype,
            **({"bnb_4bit_quant_storage": self.bnb_quant_storage} if self.bnb_quant_storage else {}),
        )

    def _check_vocab(self) -> None:
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but {self.model_name!r} embeds only {vocab}; "
                "use the model's own tokenizer (or a larger vocab_size in config_overrides)"
            )

    def _find_per_layer_embeddings(self) -> str | None:
        # A path, not the module: a second reference would register it twice in the state dict.
        for name, module in self.model.named_modules():
            if callable(getattr(module, "get_per_layer_inputs", None)) and getattr(
                module, "hidden_size_per_layer_input", None
            ):
                return name
        return None

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def token_inputs(self, input_ids: Tensor) -> dict[str, Tensor]:
        """What the LM needs from the token ids besides the spliced embeddings.

        Gemma 4 (E2B/E4B) adds per-layer embeddings looked up from the token ids; from embeddings
        alone it must invert the embedding matrix, which fails for ECG tokens. They are looked up
        here with the placeholder id at the ECG positions; the model adds the part it projects from
        the spliced embeddings itself.
        """
        if self._per_layer_path is None:
            return {}
        text_model = self.model.get_submodule(self._per_layer_path)
        return {"per_layer_inputs": text_model.get_per_layer_inputs(input_ids, None)}

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits (with ``labels``: of the answer span only, and the answer loss) of a left-padded batch.

        With ``prefix_reuse`` the loss path may run :meth:`forward_reusing_prefix`: same loss, and the
        same logits at every supervised position, from less compute. With ``position_ids`` the rows
        are packed (:meth:`forward_packed`).
        """
        if position_ids is not None:
            return self.forward_packed(input_ids, ecg_mask, ecg_tokens, labels, position_ids)
        if labels is not None and self._keeps_logits and self.prefix_reuse:
            out = self.forward_reusing_prefix(input_ids, attention_mask, ecg_mask, ecg_tokens, labels)
            if out is not None:
                return out
        inputs = self._lm_inputs(input_ids, ecg_mask, ecg_tokens, attention_mask=attention_mask)
        return self._answer_forward(inputs, labels)

    def _answer_forward(self, inputs: dict[str, Any], labels: Tensor | None) -> CausalLMOutputWithPast:
        """The model on ``inputs``; with ``labels``, logits of the answer span and the answer loss."""
        if labels is None or not self._keeps_logits:
            return self.model(**inputs, labels=labels)
        # Left-padded answers end at the last position: computing the vocabulary logits for that span
        # alone saves most of the LM head's time and memory, and gives the same loss.
        span = answer_span(labels)
        out = self.model(**inputs, logits_to_keep=span + 1)
        out.loss = answer_loss(out.logits, labels, span)
        return out

    def last_logits(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor
    ) -> Tensor:
        if not self._keeps_logits:
            return super().last_logits(input_ids, attention_mask, ecg_mask, ecg_tokens)
        inputs = self._lm_inputs(input_ids, ecg_mask, ecg_tokens, attention_mask=attention_mask)
        # The vocabulary logits of the last position only.
        return self.model(**inputs, logits_to_keep=1).logits[:, -1]

    def _lm_inputs(
        self,
        input_ids: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> dict[str, Any]:
        """The LM's keyword inputs without a cache: the spliced embeddings, and either a left-padded
        batch's mask (positions from it) or packed rows' position ids with no mask (transformers
        then masks each packed pair apart; with a cache it would not look for them)."""
        if attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        return {
            "inputs_embeds": self.splice(input_ids, ecg_mask, ecg_tokens),
            **({"attention_mask": attention_mask} if attention_mask is not None else {}),
            "position_ids": position_ids,
            "use_cache": False,
            **self.token_inputs(input_ids),
        }

    def packing_blocker(self) -> str | None:
        """Packed rows need every layer to be attention that transformers masks per packed pair: its
        mask builders read the pairs from position ids that restart at 0 when no attention mask is
        given (``masking_utils.find_packed_sequence_indices``), and flash-attention kernels read the
        same ids. Recurrent and linear-attention layers (Qwen3.5's Gated DeltaNet, Mamba) carry
        their state from one pair into the next."""
        config = self.model.config.get_text_config()
        recurrent = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
        if not recurrent and any(hasattr(config, a) for a in RECURRENT_CONFIG_FIELDS):
            recurrent = ["recurrent"]
        if recurrent:
            return (
                f"{config.model_type} has {', '.join(recurrent)} layers, whose state runs from one packed "
                "QA pair into the next; train it on padded batches (data.init_args.packed: false)"
            )
        if self.prefix_reuse:
            return (
                "the policy's prefix_reuse computes each row's shared prompt prefix once, on padded "
                "rows; use one (model.policy.init_args.prefix_reuse: false, or data.init_args.packed: false)"
            )
        return None

    def forward_packed(
        self,
        input_ids: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None,
        position_ids: Tensor,
    ) -> CausalLMOutputWithPast:
        """The loss of packed rows: no attention mask (transformers builds a block-diagonal causal
        mask from the position ids), vocabulary logits only where the next token is supervised."""
        inputs = self._lm_inputs(input_ids, ecg_mask, ecg_tokens, position_ids=position_ids)
        if labels is None or not self._keeps_logits:
            return self.model(**inputs, labels=labels)
        # Answers sit inside the row, not at its end: keep the logits of the positions before each
        # supervised token (logits_to_keep takes their indices).
        keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        if keep.numel() == 0:
            raise ValueError("no supervised token in the batch (every label is ignored)")
        out = self.model(**inputs, logits_to_keep=keep)
        logits = out.logits.float()
        out.loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, keep + 1].reshape(-1), ignore_index=IGNORE_INDEX
        )
        return out

    def forward_reusing_prefix(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor, labels: Tensor
    ) -> CausalLMOutputWithPast | None:
        """The loss path with each row's prefix state from :attr:`prefix_cache`; ``None`` where it cannot run.

        A row's prefix is its tokens before its first ECG position, the same for every row that shares
        a system prompt. The LM runs on the suffixes only, laid out so that each row's tokens stay
        contiguous: the prefix states right-aligned over the longest prefix (zeros before a shorter
        one, masked), then each row's suffix directly after, right-padded to the longest suffix;
        position ids continue after each row's own prefix. Attention, sliding windows and recurrent
        states thus see what the left-padded batch shows them. The logits are put back in the
        left-padded layout of the answer span (positions before a row's suffix, never supervised,
        hold that row's first suffix logits).
        """
        blocker = self._prefix_blocker(attention_mask, ecg_mask)
        if blocker is not None:
            self._warn_prefix_once(blocker)
            return None
        layout = SuffixLayout.of(input_ids, attention_mask, ecg_mask, self.pad_token_id)
        fingerprint = self._lm_fingerprint(input_ids.device.type)
        try:
            states = {
                p: self.prefix_cache.get(p, fingerprint, lambda p: self._prefix_state(p, input_ids.device))
                for p in dict.fromkeys(layout.prefixes)
            }
            cache = batch_cache(self.model.config, [states[p] for p in layout.prefixes])
        except PrefixReuseUnsupported as err:
            self._prefix_unsupported = (
                f"{self.model.config.model_type}'s cache cannot be shared by rows: {err}"
            )
            self._warn_prefix_once(self._prefix_unsupported)
            return None
        width = layout.input_ids.shape[1]
        span = answer_span(labels)
        # Row i's part of the left-padded answer window starts at this suffix position.
        window = layout.lengths - span - 1
        keep_from = max(0, int(window.min()))
        index = ((window - keep_from)[:, None] + torch.arange(span + 1, device=input_ids.device)).clamp(min=0)
        with self._lm_head_rows(index, width - keep_from) as gathered:
            out = self.model(
                inputs_embeds=self.splice(layout.input_ids, layout.ecg_mask, ecg_tokens),
                attention_mask=layout.attention_mask,
                position_ids=layout.position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=width - keep_from,
                **self.token_inputs(layout.input_ids),
            )
        logits = out.logits
        if not gathered:  # the head ran without the hook: pick the rows' windows from its logits
            logits = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
        return CausalLMOutputWithPast(loss=answer_loss(logits, labels, span), logits=logits)

    @contextmanager
    def _lm_head_rows(self, index: Tensor, kept: int) -> Iterator[list[bool]]:
        """Feed the LM head only each row's answer window (``index`` into the ``kept`` last positions).

        Right-padded suffixes end at different positions, so the kept positions cover every row's
        window and more; gathering before the head (a forward pre-hook) keeps the vocabulary
        projection, often the largest single matmul, at the naive path's size. Yields a list that
        is non-empty once the hook has gathered.
        """
        head = self.model.get_output_embeddings()
        gathered: list[bool] = []

        def gather(module: nn.Module, args: tuple) -> tuple | None:
            hidden = args[0] if args else None
            if gathered or hidden is None or hidden.ndim != 3 or hidden.shape[1] != kept:
                return None
            gathered.append(True)
            return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

        handle = head.register_forward_pre_hook(gather) if head is not None else None
        try:
            yield gathered
        finally:
            if handle is not None:
                handle.remove()

    def _prefix_blocker(self, attention_mask: Tensor, ecg_mask: Tensor) -> str | None:
        """Why prefix reuse cannot run on this batch, or ``None``."""
        if self._prefix_unsupported:
            return self._prefix_unsupported
        if self.model.training:
            return "the LM is in training mode (dropout would differ between the prefix and the rest)"
        if any(getattr(m, "gradient_checkpointing", False) and m.training for m in self.model.modules()):
            return "gradient checkpointing is on (transformers drops the cache in checkpointed layers)"
        if any(p.requires_grad for p in self.model.parameters()):
            return "the LM has trainable parameters (LoRA or unfrozen layers): its prefix needs gradients"
        first = attention_mask.long().argmax(1)
        if not bool(ecg_mask.any(1).all()) or bool((ecg_mask.long().argmax(1) <= first).any()):
            return "a row has no ECG position or no prompt before it"
        return None

    def _warn_prefix_once(self, reason: str) -> None:
        if reason not in self._prefix_warned:
            self._prefix_warned.add(reason)
            log.warning("prefix reuse off, the whole sequence runs: %s", reason)

    def _lm_fingerprint(self, device_type: str) -> tuple:
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return autocast, tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    @torch.no_grad()
    def _prefix_state(self, prefix: tuple[int, ...], device: torch.device) -> PrefixState:
        ids = torch.tensor([prefix], device=device)
        out = self.model(
            inputs_embeds=self.embed_tokens(ids),
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(len(prefix), device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **self.token_inputs(ids),
        )
        return prefix_state(out.past_key_values, len(prefix))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        **generation_kwargs: Any,
    ) -> Tensor:
        prefill = {
            "inputs_embeds": self.splice(input_ids, ecg_mask, ecg_tokens),
            **self.token_inputs(input_ids),
        }
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        # generate runs from the token ids, which every model class supports (Gemma4ForConditionalGeneration
        # refuses inputs_embeds); only its first forward call, the prefill, sees the spliced embeddings.
        with self._prefill_with(input_ids, prefill):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
        # The output starts with the prompt.
        return out[:, input_ids.shape[1] :]

    @contextmanager
    def _prefill_with(self, input_ids: Tensor, inputs: dict[str, Tensor]) -> Iterator[None]:
        """Inside ``generate``, run the prefill from ``inputs`` instead of ``input_ids``.

        A forward pre-hook swaps the prompt's ids for ``inputs`` (the spliced embeddings, and Gemma 4's
        per-layer inputs) in the model's first call, then lets the decoding steps run from the
        generated ids and the cache. Passing them as ``generate`` keyword arguments instead would hand
        them to every step. Rows that ``generate`` repeats (beams, several sequences) get theirs repeated.
        """
        pending = dict(inputs)

        def hook(
            module: nn.Module, args: tuple, kwargs: dict[str, Any]
        ) -> tuple[tuple, dict[str, Any]] | None:
            if not pending:
                return None
            ids = kwargs.get("input_ids")
            copies = 0 if ids is None or args else ids.shape[0] // input_ids.shape[0]
            if not copies or not torch.equal(ids, input_ids.repeat_interleave(copies, 0)):
                raise RuntimeError(
                    "generate's first forward call is not the prefill of the whole prompt; prefill "
                    "chunking and assisted decoding do not work with spliced ECG tokens"
                )
            kwargs.update(input_ids=None, **{k: v.repeat_interleave(copies, 0) for k, v in pending.items()})
            pending.clear()
            return args, kwargs

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def keep_4bit_layout_on_cpu(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (0.49 and later, AVX512-BF16 CPUs).

    In eval mode without gradients, ``Linear4bit`` repacks its weight in place for a bf16-only kernel,
    which (bitsandbytes 0.49-0.50) computes in bf16 whatever ``bnb_compute_dtype`` says, asserts that
    ``out_features`` is a multiple of 32 (Gemma 4's per-layer inputs and Qwen3.5's linear-attention gates
    are not), and keeps the repacked layout when training resumes: the kernel has no backward, so after
    a validation pass the input gradients of QLoRA are silently lost. The flag is read per forward.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantized_device_map() -> dict[str, Any]:
    """bitsandbytes quantises weights as they reach their device: load onto this process's GPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


# --- vision-language models ----------------------------------------------------------------------------

#: Model types whose vision path :class:`VisionLanguageBackbone` knows, by how the image reaches the LM.
#: Qwen-VL families: image tokens by resolution, multimodal rotary positions the model computes itself.
MULTIMODAL_ROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN_FAMILIES = ("gemma3", *MULTIMODAL_ROPE_FAMILIES)  # image tokens in the sequence
CROSS_ATTENTION_FAMILIES = ("mllama",)  # one <|image|> token; the LM's cross-attention layers read it
#: Modules of these models that 4-bit loading leaves unquantised: vision towers and projectors.
VISION_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "lm_head")


class VisionLanguageBackbone(HFBackbone):
    """A vision-language model (``AutoModelForImageTextToText``) that reads the ECG as an image with its
    own vision tower and image processor: Llama 3.2 Vision (``mllama``: one ``<|image|>`` token, the
    image through cross-attention layers), Gemma 3 / MedGemma (``gemma3``: the image's
    ``mm_tokens_per_image`` soft tokens in the sequence, attending to each other both ways) and
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL (image tokens by resolution, multimodal rotary positions).

    The model's own forward and ``generate`` put the image in (as with its processor's output), so
    nothing of its vision path is re-implemented here. ecglm's prompt style writes the image's
    positions where the ``<ecg>`` marker is, framed as the model's processor frames them
    (:attr:`ecg_frame`), with :attr:`placeholder_token_id` (the image token) on each; the model
    takes no encoder or connector of ecglm's (``model.encoder`` / ``model.connector`` left out:
    :class:`~ecglm.encoders.BackbonePixels` and the ``passthrough`` connector hand it the images).

    Images are drawn at :attr:`image_size` (``data.init_args.image``) and go through the model's
    image processor (its PIL backend: torchvision is not needed). Packed rows and prefix reuse are
    not supported. 4-bit loading quantises the language model only (:data:`VISION_MODULES` stay in
    ``dtype``).

    Args:
        image_size: ``(height, width)`` the printouts are drawn at. Default: the vision tower's
            square input for Gemma 3, two tiles side by side for Llama 3.2 Vision (a printout is
            about twice as wide as high), 448 x 896 for Qwen-VL.
        Other arguments: as :class:`HFBackbone`'s (``model`` with ``random_init`` may be a
        ``model_type`` such as ``"gemma3"``, with ``config_overrides`` for its sub-configs).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        image_size: tuple[int, int] | None = None,
        dtype: DType = "float32",
        quantization: Quantization | None = None,
        bnb_double_quant: bool = True,
        bnb_compute_dtype: DType = "bfloat16",
        bnb_quant_storage: DType | None = None,
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(
            model,
            tokenizer=tokenizer,
            dtype=dtype,
            quantization=quantization,
            bnb_double_quant=bnb_double_quant,
            bnb_compute_dtype=bnb_compute_dtype,
            bnb_quant_storage=bnb_quant_storage,
            random_init=random_init,
            config_overrides=config_overrides,
            trust_remote_code=trust_remote_code,
        )
        config = self.model.config
        self.family = config.model_type
        if self.family not in IMAGE_TOKEN_FAMILIES + CROSS_ATTENTION_FAMILIES:
            raise ValueError(
                f"{model!r} is a {self.family} model; VisionLanguageBackbone knows "
                f"{', '.join(IMAGE_TOKEN_FAMILIES + CROSS_ATTENTION_FAMILIES)}"
            )
        self.image_token_id = _config_value(config, "image_token_id", "image_token_index")
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = processor_chat_template(resolve_model_path(tokenizer or model))
        self.image_processor = self.load_image_processor()
        # A path, not the module: a second reference would register the tower twice in the state dict.
        self._vision_tower = min(self.vision_modules(), key=len)
        self.image_size = tuple(image_size) if image_size is not None else self._default_image_size()
        self.image_tokens_per_image = self._tokens_per_image()

    # -- loading -------------------------------------------------------------------------------------

    @property
    def auto_class(self) -> Any:
        return AutoModelForImageTextToText

    def quantization_config(self) -> BitsAndBytesConfig:
        config = super().quantization_config()
        # The vision path stays in dtype. transformers matches these from the name's start or as its
        # suffix, so each module is written as a pattern that may follow any prefix.
        config.llm_int8_skip_modules = [f".*{name}" for name in VISION_MODULES]
        return config

    def load_image_processor(self) -> Any:
        """The model's image processor (PIL backend); for random weights, the family's, from the config."""
        from transformers import AutoImageProcessor

        path = resolve_model_path(self.model_name)
        if Path(path).exists() or self.pretrained:
            try:
                return AutoImageProcessor.from_pretrained(path, backend="pil")
            except (OSError, ValueError):
                if self.pretrained:
                    raise
        vision = self.model.config.vision_config
        if self.family == "gemma3":
            from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

            side = vision.image_size
            return Gemma3ImageProcessorPil(size={"height": side, "width": side})
        if self.family == "mllama":
            from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

            side = vision.image_size
            return MllamaImageProcessorPil(
                size={"height": side, "width": side}, max_image_tiles=vision.max_num_tiles
            )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )

    def _default_image_size(self) -> tuple[int, int]:
        if self.family == "gemma3":
            side = self.model.config.vision_config.image_size
            return (side, side)
        if self.family == "mllama":
            side = self.model.config.vision_config.image_size
            return (side, 2 * side)
        return (448, 896)

    def _tokens_per_image(self) -> int:
        """Positions each image takes in the prompt: the processor's output for a blank page."""
        if self.family == "mllama":
            return 1
        if self.family == "gemma3":
            return int(self.model.config.mm_tokens_per_image)
        blank = torch.full((1, 3, *self.image_size), 255, dtype=torch.uint8)
        grid = self._processed(blank)["image_grid_thw"][0]
        return int(grid.prod()) // self.image_processor.merge_size**2

    # -- parts that policies train ---------------------------------------------------------------------

    def projector_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the vision-to-text projection (Gemma 3's and Llama 3.2 Vision's
        ``multi_modal_projector``, Qwen-VL's patch ``merger``): what projection-only training trains."""
        names = ("multi_modal_projector", "visual.merger", "visual.deepstack_merger_list")
        return {n: m for n, m in self.model.named_modules() if n.endswith(names)}

    def vision_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the vision tower (its projection included)."""
        names = ("vision_tower", "vision_model", "visual")
        return {n: m for n, m in self.model.named_modules() if n.endswith(names)}

    def cross_attention_modules(self) -> dict[str, nn.Module]:
        """``name -> module`` of the language model's cross-attention decoder layers (Llama 3.2 Vision's,
        with their gates); empty for models that put image tokens in the sequence."""
        if self.family not in CROSS_ATTENTION_FAMILIES:
            return {}
        layers = set(self.model.config.text_config.cross_attention_layers)
        decoder = self.model.get_decoder()
        prefix = next(name for name, module in self.model.named_modules() if module is decoder)
        return {f"{prefix}.layers.{i}": decoder.layers[i] for i in sorted(layers)}

    # -- what the data side needs ----------------------------------------------------------------------

    @property
    def placeholder_token_id(self) -> int:
        return self.image_token_id

    @property
    def ecg_frame(self) -> tuple[str, str]:
        """Text before and after an image's positions, as the model's processor writes them."""
        config = self.model.config
        token = self.tokenizer.convert_ids_to_tokens
        if self.family == "gemma3":
            return f"\n\n{token(config.boi_token_id)}", f"{token(config.eoi_token_id)}\n\n"
        if self.family in IMAGE_TOKEN_FAMILIES:
            return token(config.vision_start_token_id), token(config.vision_end_token_id)
        return "", ""

    # -- the model's inputs -----------------------------------------------------------------------------

    def _processed(self, images: Tensor) -> dict[str, Any]:
        """The image processor's output for ``(n, 3, H, W)`` images (0-255, any dtype)."""
        if tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"{self.model_name} reads ECG images of {self.image_size[0]} x {self.image_size[1]} px "
                f"(image_size), got {tuple(images.shape[2:])}: draw them at that size (data.init_args.image)"
            )
        arrays = [
            a.transpose(1, 2, 0) for a in images.detach().float().clamp(0, 255).round().byte().cpu().numpy()
        ]
        if self.family == "mllama":  # one image per row, nested as the processor takes them
            return dict(self.image_processor(images=[[a] for a in arrays], return_tensors="pt"))
        return dict(self.image_processor(images=arrays, return_tensors="pt"))

    def image_inputs(self, input_ids: Tensor, ecg_mask: Tensor, images: Tensor) -> dict[str, Any]:
        """What the model takes besides the token ids for these ``images`` (none: a text-only prompt)."""
        if not bool(ecg_mask.any()):  # a text-only prompt (its "images" are an empty placeholder)
            return {}
        device = input_ids.device
        processed = self._processed(images)
        inputs: dict[str, Any] = {"pixel_values": processed["pixel_values"].to(device, self._vision_dtype())}
        if self.family == "gemma3":
            # Gemma 3's image tokens attend to each other both ways (its token type 1).
            inputs["token_type_ids"] = ecg_mask.long()
        elif self.family == "mllama":
            from transformers.models.mllama.processing_mllama import (
                convert_sparse_cross_attention_mask_to_dense,
                get_cross_attention_token_mask,
            )

            if images.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"{self.family} takes one image per prompt here; the batch has {images.shape[0]} images "
                    f"for {input_ids.shape[0]} rows (comparison questions need an image-token model)"
                )
            sparse = [get_cross_attention_token_mask(row.tolist(), self.image_token_id) for row in input_ids]
            dense = convert_sparse_cross_attention_mask_to_dense(
                sparse,
                num_tiles=processed["num_tiles"],
                max_num_tiles=self.image_processor.max_image_tiles,
                length=input_ids.shape[1],
            )
            inputs["cross_attention_mask"] = torch.as_tensor(dense, device=device)
            inputs["aspect_ratio_ids"] = processed["aspect_ratio_ids"].to(device)
            inputs["aspect_ratio_mask"] = processed["aspect_ratio_mask"].to(device)
        else:
            inputs["image_grid_thw"] = processed["image_grid_thw"].to(device)
            if self.family == "qwen3_vl":  # its multimodal positions read which tokens are the image's
                inputs["mm_token_type_ids"] = ecg_mask.long()
        return inputs

    def _vision_dtype(self) -> torch.dtype:
        """The dtype the vision tower computes in: its first floating-point weight's (read per call, as
        a policy or Lightning's precision may cast the tower after loading)."""
        tower = self.model.get_submodule(self._vision_tower)
        return next(p.dtype for p in tower.parameters() if p.is_floating_point())

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, images: Tensor) -> dict:
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **self.image_inputs(input_ids, ecg_mask, images),
        }
        if self.family not in MULTIMODAL_ROPE_FAMILIES:
            # Left-padded rows count positions from their first real token (Qwen-VL's multimodal
            # positions are computed by the model itself from the ids, the mask and the image grid).
            inputs["position_ids"] = positions_from_mask(attention_mask)
        return inputs

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """As :meth:`HFBackbone.forward`, with ``ecg_tokens`` the ECG images ``(n, 3, H, W)``, which the
        model's own vision path reads."""
        if position_ids is not None:
            raise ValueError(self.packing_blocker())
        inputs = {**self._inputs(input_ids, attention_mask, ecg_mask, ecg_tokens), "use_cache": False}
        return self._answer_forward(inputs, labels)

    def last_logits(
        self, input_ids: Tensor, attention_mask: Tensor, ecg_mask: Tensor, ecg_tokens: Tensor
    ) -> Tensor:
        inputs = {**self._inputs(input_ids, attention_mask, ecg_mask, ecg_tokens), "use_cache": False}
        return self.model(**inputs, logits_to_keep=1).logits[:, -1]

    def packing_blocker(self) -> str | None:
        return (
            f"{self.family} reads images through its own processor and positions; train it on padded "
            "batches (data.init_args.packed: false)"
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        **generation_kwargs: Any,
    ) -> Tensor:
        inputs = self._inputs(input_ids, attention_mask, ecg_mask, ecg_tokens)
        inputs.pop("position_ids", None)  # generate derives them from the mask at every step
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        out = self.model.generate(**inputs, **generation_kwargs)
        return out[:, input_ids.shape[1] :]


def processor_chat_template(path: str) -> str | None:
    """The chat template a vision-language model's processor keeps beside the tokenizer
    (``chat_template.jinja``, or ``chat_template.json``'s ``chat_template``), where the tokenizer has none."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found:
            text = Path(found).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"the {config.model_type} config has none of {', '.join(names)}")
