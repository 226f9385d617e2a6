"""Prompt styles: how an ECG question (and its answer) becomes token ids, answer labels and ECG positions.

A prompt style is a component of the data side: a recipe names it under ``data.init_args.prompt``
(entry-point group ``ecglm.prompts``; ``chat`` is :class:`ChatTemplate`), it holds the system prompt
and the length limit, and data-loader workers use it to tokenise (it is small and picklable). The
backbone supplies only its tokenizer and the id written at the ECG positions, through :meth:`bind`,
which :func:`ecglm.wiring.connect` (the CLI) calls once.

:class:`PromptStyle` does everything but the rendering of a conversation as text: ECG placement,
system prompts, few-shot system prompts per dataset, multi-turn conversations, answer spans found
by rendering, truncation. A new style implements :meth:`PromptStyle.render` only.

Component layer: imports transformers' tokenizer types and jinja2 only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ecglm.batch import IGNORE_INDEX as IGNORE_INDEX  # re-exported: prompt styles write it

log = logging.getLogger(__name__)

ECG_MARKER = "<ecg>"


@dataclass
class EncodedChat:
    """One tokenised conversation: ECG placeholders at ``ecg_start``, loss only where ``labels`` is set."""

    input_ids: list[int]
    labels: list[int]
    ecg_start: int
    prompt_length: int
    ecg_starts: tuple[int, ...] = ()  # every ECG's first position, when the prompt holds several


def default_placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written at the ECG positions unless a backbone says otherwise: pad, else end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PromptStyle(ABC):
    """Writes an ECG question (and its answer) as text with :meth:`render` and tokenises it.

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

    :meth:`encode` takes a ``system_prompt`` for one pair, which replaces the style's own (few-shot
    prompts carry each dataset's demonstrations there); it takes the same path as the style's own,
    so on a template without a system role the demonstrations start the user turn.

    Args:
        tokenizer: The backbone's tokenizer; usually left out and given by :meth:`bind`.
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
        tokenizer: PreTrainedTokenizerBase | None = None,
        system_prompt: str | None = None,
        placeholder_token_id: int | None = None,
        max_length: int | None = None,
        min_answer_tokens: int = 16,
        prompt_cache_size: int = 4096,
    ):
        self.prompt_cache_size = prompt_cache_size
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.min_answer_tokens = min_answer_tokens
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.placeholder_token_id = placeholder_token_id
        self.ecg_frame: tuple[str, str] = ("", "")
        self._warned_truncation = False
        self._warned_turns = False
        self._warned_history = False
        self._forget_renderings()
        if tokenizer is not None:
            self.bind(tokenizer, placeholder_token_id)

    def bind(
        self,
        tokenizer: PreTrainedTokenizerBase,
        placeholder_token_id: int | None = None,
        ecg_frame: tuple[str, str] = ("", ""),
    ) -> PromptStyle:
        """Write prompts for ``tokenizer``, with ``placeholder_token_id`` at the ECG positions (default:
        the one given at construction, else :func:`default_placeholder_id`); returns ``self``.

        ``ecg_frame``: text written before and after each ECG's positions (a vision-language model's
        image delimiters, e.g. Gemma 3's ``<start_of_image>`` and ``<end_of_image>``; see
        :attr:`ecglm.backbones.Backbone.ecg_frame`)."""
        self.ecg_frame = tuple(ecg_frame)
        self.tokenizer = tokenizer
        if placeholder_token_id is not None:
            self.placeholder_token_id = placeholder_token_id
        elif self.placeholder_token_id is None:
            self.placeholder_token_id = default_placeholder_id(tokenizer)
        self._forget_renderings()
        self.check_tokenizer(tokenizer)
        return self

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:  # noqa: B027 (optional hook)
        """Raise ``ValueError`` if this style cannot write prompts for ``tokenizer`` (default: any can)."""

    @abstractmethod
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation (``system`` / ``user`` / ``assistant`` turns, ``<ecg>`` where the ECG goes) as
        text; the prompt (``add_generation_prompt``) must be a prefix of the text with the answer."""

    def _forget_renderings(self) -> None:
        # (question, system prompt, ECGs) -> (prompt text, ids before each ECG, text and ids after the last)
        self._prompts: OrderedDict[tuple, tuple[str, list[list[int]], str, list[int]]] = OrderedDict()
        self._frames: dict[str | None, tuple[str, str] | None] = {}  # system prompt -> answer frame
        self._template_has_system: bool | None = None  # found on first use

    def _bound_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer yet: ecglm.wiring.connect(model, data) binds the "
                "backbone's (the ecglm command does it), or call bind(tokenizer)"
            )
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        return default_placeholder_id(self._bound_tokenizer())

    def answer_token(self, answer: str) -> int:
        """The first token this style writes for ``answer`` after a prompt: what a model emits first
        when it gives that answer (scored by :meth:`ecglm.model.ECGLM.answer_scores`)."""
        labels = self.encode("?", answer, 1).labels
        return int(next(label for label in labels if label != IGNORE_INDEX))

    def answer_tokens(self, answer: str) -> list[int]:
        """Every token this style writes for ``answer`` after a prompt (the end of the turn included):
        what :meth:`ecglm.model.ECGLM.label_scores` scores as a complete answer."""
        return [int(label) for label in self.encode("?", answer, 1).labels if label != IGNORE_INDEX]

    def decode(self, ids: Any) -> list[str]:
        """Generated token ids, ``(batch, new_tokens)``, as answer strings (special tokens dropped)."""
        return [t.strip() for t in self._bound_tokenizer().batch_decode(ids, skip_special_tokens=True)]

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
        """The conversation; a ``system_prompt`` replaces the style's own for this call.

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
        history: Sequence[Mapping[str, str]] | None = None,
    ) -> EncodedChat:
        """Tokenise one QA pair; with ``answer=None`` the result ends with the generation prompt.

        ``system_prompt`` replaces the style's own for this pair (few-shot prompts differ by dataset).
        ``num_ecgs`` ECGs (2 for comparison questions) each get ``num_ecg_tokens`` positions.
        ``history``: the earlier turns of the conversation, ``[{question, answer}, ...]``, written
        before ``question`` as user and assistant turns; the ECGs go into the first of them. Only
        ``answer`` gets labels. Whole turns are dropped from the start of a history too long for
        ``max_length`` (the ECGs then go into the first turn kept), with a warning (once).
        """
        if history:
            return self._encode_followup(question, answer, num_ecg_tokens, system_prompt, num_ecgs, history)
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
        return self._assemble(segments, answer_ids, num_ecg_tokens)

    def _assemble(self, segments: list[list[int]], answer_ids: list[int], num_ecg_tokens: int) -> EncodedChat:
        """The prompt's text segments with ``num_ecg_tokens`` placeholders between them (one run per
        ECG), then the answer (cut to ``max_length``), which alone gets labels."""
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

    def _encode_followup(
        self,
        question: str,
        answer: str | None,
        num_ecg_tokens: int,
        system_prompt: str | None,
        num_ecgs: int,
        history: Sequence[Mapping[str, str]],
    ) -> EncodedChat:
        """:meth:`encode` of a question that follows ``history`` (at least one earlier turn)."""
        self._bound_tokenizer()
        messages = self.messages(history[0]["question"], system_prompt=system_prompt, num_ecgs=num_ecgs)
        for i, turn in enumerate(history):
            if i:
                messages.append({"role": "user", "content": turn["question"]})
            messages.append({"role": "assistant", "content": turn["answer"]})
        messages.append({"role": "user", "content": question})
        prompt_text = self.render(messages, add_generation_prompt=True)
        *pieces, after = self._framed(prompt_text).split(ECG_MARKER)
        if len(pieces) != num_ecgs:
            raise ValueError(
                f"the rendered prompt must contain {ECG_MARKER!r} {num_ecgs} time(s), once per ECG: "
                f"{prompt_text!r}"
            )
        answer_ids: list[int] = []
        if answer is not None:
            full = self.render(
                [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False
            )
            if not full.startswith(prompt_text):
                raise ValueError(
                    "the chat template renders the prompt differently once the answer is added, so the "
                    f"answer span cannot be found:\nprompt: {prompt_text!r}\nfull:   {full!r}"
                )
            answer_ids = self._tokens(full[len(prompt_text) :])
        segments = [self._tokens(p) for p in pieces] + [self._tokens(after)]
        wanted = self.min_answer_tokens if answer is None else min(self.min_answer_tokens, len(answer_ids))
        size = sum(map(len, segments)) + num_ecgs * num_ecg_tokens + wanted
        if self.max_length is not None and size > self.max_length:
            if not getattr(self, "_warned_history", False):
                self._warned_history = True
                log.warning(
                    "a conversation of %d tokens does not fit max_length=%d: its earliest turns are left "
                    "out (further cuts are not logged)",
                    size,
                    self.max_length,
                )
            return self.encode(question, answer, num_ecg_tokens, system_prompt, num_ecgs, history[1:])
        return self._assemble(segments, answer_ids, num_ecg_tokens)

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
        self._bound_tokenizer()
        key = (question, system_prompt, num_ecgs)
        cached = self._prompts.get(key)
        if cached is not None:
            self._prompts.move_to_end(key)
            return cached[0], [list(p) for p in cached[1]], cached[2], list(cached[3])
        prompt_text = self.render(
            self.messages(question, system_prompt=system_prompt, num_ecgs=num_ecgs),
            add_generation_prompt=True,
        )
        *pieces, after = self._framed(prompt_text).split(ECG_MARKER)
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

    def _framed(self, prompt_text: str) -> str:
        """The rendered prompt with :attr:`ecg_frame` around each ECG marker."""
        before, after = getattr(self, "ecg_frame", ("", ""))
        if not (before or after):
            return prompt_text
        return prompt_text.replace(ECG_MARKER, f"{before}{ECG_MARKER}{after}")

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
        texts = self._framed(prompt_text).split(ECG_MARKER)
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


class ChatTemplate(PromptStyle):
    """The tokenizer's own chat template (``apply_chat_template``): the style for instruction-tuned LMs.

    Registered as ``chat`` in ``ecglm.prompts``. A base LM without a chat template needs a style that
    writes plain text instead (the ``ecglm-plain-prompt`` plugin's ``plain``).
    """

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.chat_template is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {name!r} has no chat template: name a prompt style that writes plain text in "
                "data.init_args.prompt (`plain` from the ecglm-plain-prompt plugin; see docs/plugins.md)"
            )

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
