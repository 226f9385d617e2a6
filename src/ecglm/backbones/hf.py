"""Any Hugging Face causal LM as a backbone (:class:`HFBackbone`): loading (config, tokenizer, weights,
4 bits), the loss on padded or packed rows, and generation from spliced ECG tokens.

Component layer: torch and transformers only (bitsandbytes through transformers, for 4-bit).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ecglm._deprecation import warn_deprecated
from ecglm.backbones._compat import PROMPT_STYLE, ChatFormatter, legacy_prompt
from ecglm.backbones.base import Backbone, answer_loss, answer_span, positions_from_mask
from ecglm.backbones.loading import (
    BackboneConfigError,
    DType,
    Quantization,
    load_hf_config,
    resolve_model_path,
    torch_dtype,
)
from ecglm.backbones.prefix_forward import PrefixReuseMixin
from ecglm.backbones.quantization import bnb_4bit_config, keep_4bit_layout_on_cpu, quantized_device_map
from ecglm.kernels import kernel_bindings, log_kernels
from ecglm.prefix_reuse import PrefixCache
from ecglm.prompts import IGNORE_INDEX, PromptStyle

#: Layer types (``config.layer_types``) that transformers masks per packed QA pair.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
#: Config fields of recurrent and hybrid architectures that do not list their layers in ``layer_types``.
RECURRENT_CONFIG_FIELDS = ("layers_block_type", "hybrid_override_pattern", "mamba_d_state", "state_size")


class HFBackbone(PrefixReuseMixin, Backbone):
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
        system_prompt, max_length, min_answer_tokens: Deprecated (ecglm 0.1; removed in 0.3.0): the
            prompt style's, ``data.init_args.prompt.init_args.*``. Given here, they apply (with a
            DeprecationWarning) when the recipe names no prompt style.
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
        *,
        system_prompt: str | None = None,
        max_length: int | None = None,
        min_answer_tokens: int | None = None,
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
        # 0.1's prompt settings (deprecated): the prompt style ecglm.wiring.connect falls back to.
        self._legacy_prompt = legacy_prompt(
            self,
            HFBackbone.build_formatter,
            system_prompt=system_prompt,
            max_length=max_length,
            min_answer_tokens=min_answer_tokens,
        )
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

    @classmethod
    def load_config(
        cls,
        model: str,
        gguf_file: str | None = None,
        random_init: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> PreTrainedConfig:
        """The transformers config this backbone builds its LM from, read without any weights: the one
        place :meth:`load_model` reads it, and what ``ecglm estimate`` reads (through :meth:`config_for`).

        The arguments mean what :class:`HFBackbone`'s do: a hub id (read from the local Hugging Face
        cache when offline), a folder, ``pkg:NAME``, a GGUF file inside ``model``, or with
        ``random_init`` a ``model_type`` such as ``"llama"`` (nothing read); ``config_overrides`` are
        applied. A backbone that loads its LM another way overrides this too, so that what is estimated
        is what it builds. Raises ``FileNotFoundError`` for a local path that does not exist, ``OSError``
        when the config cannot be read (a hub id offline and not cached), and
        :class:`~ecglm.backbones.loading.BackboneConfigError` for an override the config has no field for.
        """
        return load_hf_config(model, gguf_file, random_init, config_overrides, trust_remote_code)

    @classmethod
    def config_for(cls, init_args: Mapping[str, Any]) -> PreTrainedConfig:
        """:meth:`load_config` of a recipe's ``model.backbone.init_args`` (a mapping): the arguments
        :meth:`load_config` takes are passed on, the others (dtype, tokenizer, quantization, ...) ignored."""
        parameters = inspect.signature(cls.load_config).parameters.values()
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names = {p.name for p in named}
        if any(p.kind is p.VAR_KEYWORD for p in parameters):  # an override that passes **kwargs on
            names |= set(inspect.signature(HFBackbone.load_config).parameters)
        arguments = {k: v for k, v in init_args.items() if k in names}
        missing = [p.name for p in named if p.default is p.empty and p.name not in arguments]
        if missing:
            raise BackboneConfigError(
                f"{cls.__name__}'s config needs model.backbone.init_args.{missing[0]}, which is not given"
            )
        return cls.load_config(**arguments)

    def load_model(self, config_overrides: dict[str, Any]) -> nn.Module:
        config = self.load_config(
            self.model_name,
            gguf_file=self.gguf_file,
            random_init=not self.pretrained,
            config_overrides=config_overrides,
            trust_remote_code=self.trust_remote_code,
        )
        if not self.pretrained:
            return self.auto_class.from_config(
                config, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        quantized = {}
        if self.quantization:
            quantized = {
                "quantization_config": self.quantization_config(),
                "device_map": quantized_device_map(),
            }
        model = self.auto_class.from_pretrained(
            resolve_model_path(self.model_name),
            config=config,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            **quantized,
        )
        if self.quantization:
            keep_4bit_layout_on_cpu(model)
        return model

    def build_formatter(self, system_prompt: str | None, max_length: int | None) -> PromptStyle:
        """Deprecated (ecglm 0.1's hook; removed in 0.3.0): prompts are the data side's prompt style,
        ``data.init_args.prompt``. A subclass that overrides it still has its formatter used where the
        recipe names no prompt style (:func:`ecglm.wiring.connect`)."""
        warn_deprecated(f"{type(self).__name__}.build_formatter", PROMPT_STYLE)
        return ChatFormatter(self.tokenizer, system_prompt, max_length=max_length)

    def quantization_config(self) -> BitsAndBytesConfig:
        return bnb_4bit_config(
            self.quantization, self.bnb_double_quant, self.bnb_compute_dtype, self.bnb_quant_storage
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
