"""Language-model backbones: a causal LM, its tokenizer and chat template, and the splice of ECG tokens.

Component layer: imports torch and transformers (bitsandbytes through transformers, for 4-bit) only.
:class:`Backbone` is the interface the rest of ecglm uses; :class:`HFBackbone` wraps any
``AutoModelForCausalLM``, including what some families need beyond ``inputs_embeds`` (Gemma 4's
per-layer embeddings). Prompts are rendered by a :class:`ChatFormatter`, a small picklable object that
data-loader workers use to tokenise.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jinja2 import TemplateError
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
    cache_utils,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ECG_MARKER = "<ecg>"

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["nf4", "fp4"]

#: Python packages of optional fast kernels, and the distributions that ship them.
KERNEL_DISTRIBUTIONS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


@dataclass
class EncodedChat:
    """One tokenised conversation: ECG placeholders at ``ecg_start``, loss only where ``labels`` is set."""

    input_ids: list[int]
    labels: list[int]
    ecg_start: int
    prompt_length: int
    ecg_starts: tuple[int, ...] = ()  # every ECG's first position, when the prompt holds several


class ChatFormatter:
    """Renders an ECG question (and its answer) with the tokenizer's chat template and tokenises it.

    The ECG goes where the first user turn says ``<ecg>``; it is replaced by ``num_ecg_tokens``
    copies of ``placeholder_token_id`` whose embeddings the backbone overwrites. The answer span is
    found by rendering the conversation with and without the answer — never from hard-coded token
    ids — so that it is right for any chat template. A template without a system role (one that
    raises on it or leaves it out, found by rendering a probe) gets the system prompt at the start
    of the first user turn instead.

    Sequences longer than ``max_length`` lose the end of the question first (wherever the template
    puts it, before or after the ECG) — never the ECG, the template's tokens or the start of the
    answer — until the prompt leaves room for the first
    ``min_answer_tokens`` answer tokens (all of a shorter answer; for a generation prompt,
    ``min_answer_tokens`` new tokens); only then is the end of the answer cut.

    :meth:`encode` takes a ``system_prompt`` for one pair, which replaces the formatter's own (few-shot
    prompts carry each dataset's demonstrations there); it takes the same path as the formatter's
    own, so on a template without a system role the demonstrations start the user turn.

    Args:
        tokenizer: The backbone's tokenizer (with a chat template).
        system_prompt: System turn, if any.
        placeholder_token_id: Token id at the ECG positions (default: the pad token, else end of
            sequence). Only its position matters, except for models that look token ids up beside
            the embeddings (Gemma 4's per-layer embeddings see this id at the ECG positions).
        max_length: Longest sequence (``llm_input_len``); ``None`` for no limit.
        min_answer_tokens: Answer tokens that truncation keeps before it cuts into the answer.
        prompt_cache_size: Prompts (question and system prompt) whose rendering and tokens are kept,
            least recently used out first; ECG-QA asks the same questions of many ECGs, so a hit
            saves one of the two chat-template renders of a pair (the other is saved by the
            answer frame, see ``_answer_text``). 0 turns both off: every pair rendered in full.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        placeholder_token_id: int | None = None,
        max_length: int | None = None,
        min_answer_tokens: int = 16,
        prompt_cache_size: int = 4096,
    ):
        self.tokenizer = tokenizer
        self.prompt_cache_size = prompt_cache_size
        # (question, system prompt, ECGs) -> (prompt text, ids before each ECG, text and ids after the last)
        self._prompts: OrderedDict[tuple, tuple[str, list[list[int]], str, list[int]]] = OrderedDict()
        self._frames: dict[str | None, tuple[str, str] | None] = {}  # system prompt -> answer frame
        self.system_prompt = system_prompt
        if placeholder_token_id is None:
            placeholder_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        self.placeholder_token_id = placeholder_token_id
        self.max_length = max_length
        self.min_answer_tokens = min_answer_tokens
        self._template_has_system: bool | None = None  # found on first use: subclasses render
        self._warned_truncation = False
        self._warned_turns = False

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def template_has_system(self) -> bool:
        """Whether :meth:`render` writes a system turn (else the system prompt joins the user turn)."""
        if self._template_has_system is None:
            probe = "ecglm-system-probe"
            turns = [{"role": "system", "content": probe}, {"role": "user", "content": "q"}]
            try:
                self._template_has_system = probe in self.render(turns, add_generation_prompt=True)
            except TemplateError:  # e.g. Gemma 2's raise_exception('System role not supported')
                self._template_has_system = False
            if not self._template_has_system:
                log.info("the chat template has no system role: the system prompt starts the user turn")
        return self._template_has_system

    def messages(
        self, question: str, answer: str | None = None, system_prompt: str | None = None, num_ecgs: int = 1
    ) -> list[dict[str, str]]:
        """The conversation; a ``system_prompt`` replaces the formatter's own for this call.

        Several ECGs (comparison questions) are introduced as ``ECG 1: <ecg>``, ``ECG 2: <ecg>``, ...
        """
        system = self.system_prompt if system_prompt is None else system_prompt
        ecgs = (
            ECG_MARKER if num_ecgs == 1 else "\n".join(f"ECG {i + 1}: {ECG_MARKER}" for i in range(num_ecgs))
        )
        user = f"{ecgs}\n{question}"
        turns = []
        if system and self.template_has_system:
            turns.append({"role": "system", "content": system})
        elif system:
            user = f"{system}\n\n{user}"
        turns.append({"role": "user", "content": user})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
        return turns

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text; subclasses override this for models without a chat template."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _tokens(self, text: str) -> list[int]:
        # Special-token strings in the rendered template are parsed; none is added on top. A fast
        # tokenizer's Rust backend gives the same ids as calling the tokenizer, without the Python
        # wrapper's per-call work (a third of the loader workers' time on short QA pairs).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(
        self,
        question: str,
        answer: str | None,
        num_ecg_tokens: int,
        system_prompt: str | None = None,
        num_ecgs: int = 1,
    ) -> EncodedChat:
        """Tokenise one QA pair; with ``answer=None`` the result ends with the generation prompt.

        ``system_prompt`` replaces the formatter's own for this pair (few-shot prompts differ by dataset).
        ``num_ecgs`` ECGs (2 for comparison questions) each get ``num_ecg_tokens`` positions.
        """
        prompt_text, pieces, _, tail = self._prompt(question, system_prompt, num_ecgs)
        answer_ids = (
            self._tokens(self._answer_text(question, answer, prompt_text, system_prompt, num_ecgs))
            if answer is not None
            else []
        )
        segments = [*pieces, tail]
        if self.max_length is not None:
            wanted = (
                self.min_answer_tokens if answer is None else min(self.min_answer_tokens, len(answer_ids))
            )
            if sum(map(len, segments)) + num_ecgs * num_ecg_tokens + wanted > self.max_length:
                segments = self._shorten_question(question, prompt_text, segments, wanted, num_ecg_tokens)
        prompt, starts = [], []
        for segment in segments[:-1]:
            prompt += segment
            starts.append(len(prompt))
            prompt += [self.placeholder_token_id] * num_ecg_tokens
        prompt += segments[-1]
        if self.max_length is not None:
            answer_ids = answer_ids[: self.max_length - len(prompt)]
        labels = [IGNORE_INDEX] * len(prompt) + answer_ids
        return EncodedChat(prompt + answer_ids, labels, starts[0], len(prompt), tuple(starts))

    def encode_turns(
        self, turns: list[dict[str, str]], num_ecg_tokens: int, system_prompt: str | None = None
    ) -> EncodedChat:
        """Tokenise a multi-turn conversation about one ECG, ``[{question, answer}, ...]``, for training.

        The ECG goes into the first question; every answer is supervised. The text between answers
        (the next user turn, the template's turn markers) is found by rendering the conversation up to
        each turn, as :meth:`encode` does for one. Whole turns are dropped from the end to fit
        ``max_length``; a conversation that fits with its first turn only is encoded by :meth:`encode`.
        A template that renders earlier turns differently once later ones follow cannot be split into
        spans: the first turn alone is then used, with a warning (once).
        """
        first = turns[0]
        if len(turns) == 1:
            return self.encode(first["question"], first["answer"], num_ecg_tokens, system_prompt)
        prompt_text, (before_ids,), _, tail = self._prompt(first["question"], system_prompt, 1)
        head = before_ids + [self.placeholder_token_id] * num_ecg_tokens
        messages = self.messages(first["question"], system_prompt=system_prompt)
        ids, labels = head + tail, [IGNORE_INDEX] * (len(head) + len(tail))
        rendered, kept = prompt_text, 0
        for i, turn in enumerate(turns):
            if i:
                messages = [*messages, {"role": "user", "content": turn["question"]}]
                prompt = self.render(messages, add_generation_prompt=True)
                if not prompt.startswith(rendered):
                    return self._first_turn_only(first, num_ecg_tokens, system_prompt)
                user_ids = self._tokens(prompt[len(rendered) :])
                rendered = prompt
            messages = [*messages, {"role": "assistant", "content": turn["answer"]}]
            full = self.render(messages, add_generation_prompt=False)
            if not full.startswith(rendered):
                return self._first_turn_only(first, num_ecg_tokens, system_prompt)
            answer_ids = self._tokens(full[len(rendered) :])
            rendered = full
            grown = (user_ids if i else []) + answer_ids
            if self.max_length is not None and len(ids) + len(grown) > self.max_length:
                break
            ids += grown
            labels += ([IGNORE_INDEX] * len(user_ids) if i else []) + answer_ids
            kept += 1
        if kept < 2:
            return self.encode(first["question"], first["answer"], num_ecg_tokens, system_prompt)
        return EncodedChat(ids, labels, len(head) - num_ecg_tokens, len(head) + len(tail))

    def _first_turn_only(self, first: dict[str, str], num_ecg_tokens: int, system_prompt: str | None):
        if not self._warned_turns:
            self._warned_turns = True
            log.warning(
                "the chat template renders earlier turns differently once later turns follow, so the "
                "answers of a conversation cannot be found as spans: training on first turns only"
            )
        return self.encode(first["question"], first["answer"], num_ecg_tokens, system_prompt)

    def _prompt(
        self, question: str, system_prompt: str | None, num_ecgs: int = 1
    ) -> tuple[str, list[list[int]], str, list[int]]:
        """The rendered prompt, the ids before each ECG marker, the text and ids after the last (cached)."""
        key = (question, system_prompt, num_ecgs)
        cached = self._prompts.get(key)
        if cached is not None:
            self._prompts.move_to_end(key)
            return cached[0], [list(p) for p in cached[1]], cached[2], list(cached[3])
        prompt_text = self.render(
            self.messages(question, system_prompt=system_prompt, num_ecgs=num_ecgs),
            add_generation_prompt=True,
        )
        *pieces, after = prompt_text.split(ECG_MARKER)
        if len(pieces) != num_ecgs:
            raise ValueError(
                f"the rendered prompt must contain {ECG_MARKER!r} {num_ecgs} time(s), once per ECG: "
                f"{prompt_text!r}"
            )
        entry = (prompt_text, [self._tokens(p) for p in pieces], after, self._tokens(after))
        if self.prompt_cache_size > 0:
            self._prompts[key] = entry
            if len(self._prompts) > self.prompt_cache_size:
                self._prompts.popitem(last=False)
        return entry[0], [list(p) for p in entry[1]], entry[2], list(entry[3])

    def _shorten_question(
        self,
        question: str,
        prompt_text: str,
        segments: list[list[int]],
        answer_room: int,
        num_ecg_tokens: int,
    ) -> list[list[int]]:
        """``segments``, the prompt's tokens between its ECGs, with the question's end cut so that
        ``answer_room`` tokens fit; the question may come before, between or after the ECGs."""
        texts = prompt_text.split(ECG_MARKER)
        ecg_positions = (len(texts) - 1) * num_ecg_tokens
        found = self._find_question(question, texts)
        if found is None:
            raise ValueError(
                f"prompt of {ecg_positions + sum(map(len, segments))} tokens (with {num_ecg_tokens} tokens "
                f"per ECG) leaves no room for {answer_room} answer tokens within "
                f"max_length={self.max_length}, and the question cannot be shortened: the template does "
                "not write it verbatim"
            )
        index, start, end = found
        text = texts[index]
        lead, cut, closing = (self._tokens(t) for t in (text[:start], text[start:end], text[end:]))
        others = sum(len(s) for i, s in enumerate(segments) if i != index)
        rest = ecg_positions + others + len(lead) + len(closing)
        keep = self.max_length - answer_room - rest
        if keep < 0:
            raise ValueError(
                f"the prompt without its question is {rest} tokens (with {num_ecg_tokens} tokens per ECG), "
                f"which leaves no room for {answer_room} answer tokens within max_length={self.max_length}; "
                "shorten the system prompt or raise max_length"
            )
        if not self._warned_truncation:
            self._warned_truncation = True
            log.warning(
                "question of %d tokens cut to %d to fit max_length=%d (further cuts are not logged)",
                len(cut),
                keep,
                self.max_length,
            )
        return [*segments[:index], lead + cut[:keep] + closing, *segments[index + 1 :]]

    @staticmethod
    def _find_question(question: str, texts: list[str]) -> tuple[int, int, int] | None:
        """``(segment, start, end)`` of the question's last verbatim occurrence in the prompt's texts.

        The last, because the system prompt before it may repeat the question (few-shot demonstrations).
        """
        core = question.strip()
        for index in reversed(range(len(texts)) if core else ()):
            start = texts[index].rfind(core)
            if start >= 0:
                return index, start, start + len(core)
        return None

    def _answer_frame(self, system_prompt: str | None) -> tuple[str, str] | None:
        """The text the template writes before and after an answer, if it writes answers verbatim.

        Found once per system prompt by rendering two probe answers after two probe questions: the
        frame is used only when all four give the same text around the answer. A template that
        changes the answer (upper-cases it, parses tags out of it) or frames it differently per
        question gets ``None``: every pair is then rendered in full.
        """
        if system_prompt in self._frames:
            return self._frames[system_prompt]
        frames = set()
        for question in ("ecglm probe question one?", "Probe two: what does it show?"):
            prompt = self.render(
                self.messages(question, system_prompt=system_prompt), add_generation_prompt=True
            )
            for probe in ("ecglm-answer-probe", "Answer probe, two words."):
                full = self.render(self.messages(question, probe, system_prompt), add_generation_prompt=False)
                rest = full[len(prompt) :] if full.startswith(prompt) else ""
                frames.add(tuple(rest.split(probe)) if rest.count(probe) == 1 else None)
        frame = frames.pop() if len(frames) == 1 else None
        self._frames[system_prompt] = frame
        return frame

    def _answer_text(
        self,
        question: str,
        answer: str,
        prompt_text: str,
        system_prompt: str | None = None,
        num_ecgs: int = 1,
    ) -> str:
        # Rendering the whole chat again for every pair is most of a loader worker's time; a template
        # that writes answers verbatim (checked by _answer_frame) gives the same text from its frame.
        # Answers with surrounding space or markup ("<", e.g. "</think>") are rendered in full.
        frame = self._answer_frame(system_prompt) if self.prompt_cache_size > 0 else None
        if frame is not None and answer == answer.strip() and "<" not in answer:
            return frame[0] + answer + frame[1]
        full_text = self.render(
            self.messages(question, answer, system_prompt, num_ecgs), add_generation_prompt=False
        )
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
    ``prefix_reuse`` (set by a policy that keeps the LM frozen) lets :meth:`forward` compute the
    prompt prefix that rows share once, without gradients; a backbone that cannot ignores it.
    """

    hidden_size: int
    formatter: ChatFormatter
    pretrained: bool = True
    prefix_reuse: bool = False

    #: What a subclass must set in ``__init__``, and why (named when it is missing).
    REQUIRED_ATTRIBUTES = {
        "hidden_size": "the width of its token embeddings, which the connector projects the ECG to",
        "formatter": "the ChatFormatter that tokenises its prompts",
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


# --- prefix reuse -------------------------------------------------------------------------------------


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


def answer_loss(logits: Tensor, labels: Tensor, span: int) -> Tensor:
    """Mean loss of the answer tokens from the logits of the last ``span + 1`` positions (left-padded)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, -span:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def resolve_model_path(model: str) -> str:
    """``pkg:NAME`` names the folder of an installed Python package that ships model files.

    A value that can only be a local path (``/abs``, ``./rel``, ``../rel``, ``~/...``, or more than
    one ``/``; a hub id is ``org/name``) must exist: transformers would call it a malformed repo id.
    """
    if not model.startswith("pkg:"):
        return _local_path(model) if _is_local_path(model) else model
    name = model[len("pkg:") :]
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {model!r}: no installed package named {name!r} (pip install it first)"
        )
    return next(iter(spec.submodule_search_locations))


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


def kernel_bindings(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """``(kernel, package, implementation)`` for each optional fast kernel of ``model``.

    transformers binds such kernels (Qwen3.5's Gated DeltaNet: ``chunk_gated_delta_rule`` from
    flash-linear-attention's package ``fla``, ``causal_conv1d_fn`` from ``causal_conv1d``, ...) when
    it imports the modeling file, through ``use_kernel_func_from_hub_with_fallback``: the package's
    function if it imports, else the PyTorch reference. ``implementation`` is ``"module.function"``,
    or ``None`` for the PyTorch reference. Models without such kernels give ``[]``.
    """
    found = {}
    for module_name in sorted({type(m).__module__ for m in model.modules()}):
        for fn in vars(sys.modules[module_name]).values():
            if not inspect.isfunction(fn) or "is_new_implementation" not in fn.__code__.co_freevars:
                continue
            bound = inspect.getclosurevars(fn).nonlocals
            impl = bound["implementation"]
            path = f"{impl.__module__}.{impl.__name__}" if bound["is_new_implementation"] else None
            found[bound["func_name"]] = (bound["func_name"], bound["package"], path)
    return list(found.values())


def log_kernels(model_type: str, bindings: list[tuple[str, str, str | None]]) -> None:
    """One INFO line per kernel package: its fast kernels, or the PyTorch reference path."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, package, impl in bindings:
        groups.setdefault((package, impl is not None), []).append(name)
    for (package, fast), names in sorted(groups.items()):
        dist = KERNEL_DISTRIBUTIONS.get(package, package)
        if fast:
            log.info("%s: %s run on the fast kernels of %s", model_type, ", ".join(names), dist)
        else:
            log.info(
                "%s: %s run on the PyTorch reference path (slower; install %s for the fast kernels)",
                model_type,
                ", ".join(names),
                dist,
            )


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
        random_init: Build the architecture with random weights instead of loading them
            (for smoke tests; such weights are saved in checkpoints).
        config_overrides: Config fields to change, e.g. a tiny ``hidden_size`` for tests.
        system_prompt: System turn of every conversation (joins the user turn when the chat
            template has no system role).
        max_length: Longest token sequence (``llm_input_len``); see :class:`ChatFormatter`.
        min_answer_tokens: Answer tokens kept before truncation cuts into the answer.
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
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        max_length: int | None = None,
        min_answer_tokens: int = 16,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.model_name = model
        self.gguf_file = gguf_file
        self.dtype = torch_dtype(dtype)
        self.quantization = quantization
        self.bnb_double_quant = bnb_double_quant
        self.bnb_compute_dtype = torch_dtype(bnb_compute_dtype, "bnb_compute_dtype")
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
        self.formatter = self.build_formatter(system_prompt, max_length)
        self.formatter.min_answer_tokens = min_answer_tokens  # set here, so subclasses' formatters get it
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._per_layer_path = self._find_per_layer_embeddings()
        bindings = kernel_bindings(self.model)
        self.kernels = {name: impl or "torch" for name, _, impl in bindings}
        log_kernels(self.model.config.model_type, bindings)
        self.prefix_cache = PrefixCache()
        self._prefix_unsupported: str | None = None  # why this LM's cache cannot be shared, once found
        self._prefix_warned: set[str] = set()

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
        quantized = {}
        if self.quantization:
            quantized = {
                "quantization_config": self.quantization_config(),
                "device_map": quantized_device_map(),
            }
        model = AutoModelForCausalLM.from_pretrained(
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
    ) -> CausalLMOutputWithPast:
        """Logits (with ``labels``: of the answer span only, and the answer loss) of a left-padded batch.

        With ``prefix_reuse`` the loss path may run :meth:`forward_reusing_prefix`: same loss, and the
        same logits at every supervised position, from less compute.
        """
        if labels is not None and self._keeps_logits and self.prefix_reuse:
            out = self.forward_reusing_prefix(input_ids, attention_mask, ecg_mask, ecg_tokens, labels)
            if out is not None:
                return out
        inputs = {
            "inputs_embeds": self.splice(input_ids, ecg_mask, ecg_tokens),
            "attention_mask": attention_mask,
            "position_ids": positions_from_mask(attention_mask),
            "use_cache": False,
            **self.token_inputs(input_ids),
        }
        if labels is None or not self._keeps_logits:
            return self.model(**inputs, labels=labels)
        # Left-padded answers end at the last position: computing the vocabulary logits for that span
        # alone saves most of the LM head's time and memory, and gives the same loss.
        span = answer_span(labels)
        out = self.model(**inputs, logits_to_keep=span + 1)
        out.loss = answer_loss(out.logits, labels, span)
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
        layout = SuffixLayout.of(input_ids, attention_mask, ecg_mask, self.formatter.pad_token_id)
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
        generation_kwargs.setdefault("pad_token_id", self.formatter.pad_token_id)
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
