"""ecglm backbone plugin for base causal LMs: plain-text prompts instead of a chat template.

Registered as ``plain-prompt`` in the ``ecglm.backbones`` entry-point group. Imports ecglm's
component layer, torch and transformers only, and has no import-time side effects, so it is safe
to import in every process and more than once.
"""

from __future__ import annotations

from string import Formatter
from typing import Any

from transformers import PreTrainedTokenizerBase

from ecglm.backbones import ECG_MARKER, ChatFormatter, HFBackbone

__all__ = ["PlainPromptBackbone", "PlainPromptFormatter", "check_templates"]

DEFAULT_SYSTEM_TEMPLATE = "{system}\n\n"
DEFAULT_PROMPT_TEMPLATE = f"ECG: {ECG_MARKER}\nQuestion: {{question}}\nAnswer:"
DEFAULT_ANSWER_TEMPLATE = " {answer}{eos_token}"


def check_templates(prompt_template: str, answer_template: str, system_template: str) -> None:
    """Raise ``ValueError`` unless the templates hold what :class:`PlainPromptFormatter` needs."""
    if prompt_template.count(ECG_MARKER) != 1:
        raise ValueError(f"prompt_template {prompt_template!r} must contain {ECG_MARKER!r} exactly once")
    _check_fields("prompt_template", prompt_template, {"question"}, {"question"})
    _check_fields("answer_template", answer_template, {"answer", "eos_token"}, {"answer"})
    _check_fields("system_template", system_template, {"system"}, {"system"})


def _check_fields(name: str, template: str, allowed: set[str], required: set[str]) -> None:
    fields = {field for _, field, _, _ in Formatter().parse(template) if field is not None}
    if fields - allowed or required - fields:
        raise ValueError(
            f"{name} {template!r} must use the fields {sorted(required)} and may use {sorted(allowed)}; "
            f"it uses {sorted(fields)} (write literal braces as {{{{ and }}}})"
        )


class PlainPromptFormatter(ChatFormatter):
    """Writes ``[system] prompt [answer]`` as plain text, for tokenizers without a chat template.

    The rendering is ``system_template`` (only when there is a system prompt), then
    ``prompt_template``, then, when the conversation holds an answer, ``answer_template``. The
    prompt is thus always a prefix of the full text, and its end (``Answer:`` by default) is the
    cue to answer, so ``add_generation_prompt`` changes nothing.

    Args:
        tokenizer: The backbone's tokenizer; its chat template, if any, is not used.
        system_prompt: Text of ``{system}``; without it ``system_template`` is left out.
        placeholder_token_id: Token id at the ECG positions (see :class:`ChatFormatter`).
        max_length: Longest sequence (see :class:`ChatFormatter`).
        prompt_template: The question, with ``<ecg>`` exactly once (where the ECG tokens go) and
            the field ``{question}``.
        answer_template: The supervised continuation, with ``{answer}`` and optionally
            ``{eos_token}`` (the tokenizer's end-of-sequence token, so the model learns to stop).
        system_template: How the system prompt is written, with ``{system}``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        placeholder_token_id: int | None = None,
        max_length: int | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        system_template: str = DEFAULT_SYSTEM_TEMPLATE,
    ):
        super().__init__(tokenizer, system_prompt, placeholder_token_id, max_length)
        check_templates(prompt_template, answer_template, system_template)
        self.prompt_template = prompt_template
        self.answer_template = answer_template
        self.system_template = system_template

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        turns = self._turns(messages)
        # ChatFormatter.messages puts the marker at the start of the user turn; the template places it.
        question = turns["user"].replace(ECG_MARKER, "", 1).strip()
        text = self.system_template.format(system=turns["system"]) if turns.get("system") else ""
        text += self.prompt_template.format(question=question)
        if "assistant" in turns:
            text += self.answer_template.format(
                answer=turns["assistant"], eos_token=self.tokenizer.eos_token or ""
            )
        return text

    @staticmethod
    def _turns(messages: list[dict[str, str]]) -> dict[str, str]:
        turns: dict[str, str] = {}
        for message in messages:
            role = message["role"]
            if role not in ("system", "user", "assistant") or role in turns:
                raise ValueError(
                    "a plain prompt holds at most one system, one user and one assistant turn; "
                    f"got roles {[m['role'] for m in messages]}"
                )
            turns[role] = message["content"]
        if "user" not in turns:
            raise ValueError("a plain prompt needs a user turn (the question)")
        return turns


class PlainPromptBackbone(HFBackbone):
    """:class:`~ecglm.backbones.HFBackbone` with plain-text prompts, for base LMs without a chat template.

    A prompt reads, by default::

        {system}

        ECG: <ecg>
        Question: {question}
        Answer:

    and the supervised answer is ``" {answer}{eos_token}"``.

    Args:
        model: Hub id or local folder (``pkg:NAME``, or a ``model_type`` with ``random_init``).
        tokenizer: Where to load the tokenizer from, if not from ``model``.
        gguf_file: GGUF file inside ``model`` to load.
        dtype: Weight dtype of the LM, e.g. ``"float32"`` or ``"bfloat16"``.
        random_init: Build the architecture with random weights (for tests).
        config_overrides: Config fields to change.
        system_prompt: Text written first, through ``system_template``; none by default.
        max_length: Longest token sequence.
        trust_remote_code: Allow code from the model's repository to run.
        prompt_template: Prompt with ``<ecg>`` exactly once and ``{question}``.
        answer_template: Answer with ``{answer}`` and optionally ``{eos_token}``.
        system_template: System prompt with ``{system}``, followed by the prompt.
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
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        system_template: str = DEFAULT_SYSTEM_TEMPLATE,
    ):
        # Checked before the model loads; HFBackbone.__init__ calls build_formatter, which needs them.
        check_templates(prompt_template, answer_template, system_template)
        self.templates = {
            "prompt_template": prompt_template,
            "answer_template": answer_template,
            "system_template": system_template,
        }
        super().__init__(
            model,
            tokenizer=tokenizer,
            gguf_file=gguf_file,
            dtype=dtype,
            random_init=random_init,
            config_overrides=config_overrides,
            system_prompt=system_prompt,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
        )

    def build_formatter(self, system_prompt: str | None, max_length: int | None) -> ChatFormatter:
        return PlainPromptFormatter(self.tokenizer, system_prompt, max_length=max_length, **self.templates)
