"""ecglm prompt-style plugin for base causal LMs: plain-text prompts instead of a chat template.

Registered as ``plain`` in the ``ecglm.prompts`` entry-point group. Imports ecglm's component layer
only and has no import-time side effects, so it is safe to import in every process and more than once.
"""

from __future__ import annotations

from string import Formatter

from ecglm.prompts import ECG_MARKER, PromptStyle

__all__ = ["PlainPrompt", "check_templates"]

DEFAULT_SYSTEM_TEMPLATE = "{system}\n\n"
DEFAULT_PROMPT_TEMPLATE = f"ECG: {ECG_MARKER}\nQuestion: {{question}}\nAnswer:"
DEFAULT_ANSWER_TEMPLATE = " {answer}{eos_token}"


def check_templates(prompt_template: str, answer_template: str, system_template: str) -> None:
    """Raise ``ValueError`` unless the templates hold what :class:`PlainPrompt` needs."""
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


class PlainPrompt(PromptStyle):
    """Writes ``[system] prompt [answer]`` as plain text, for base LMs without a chat template.

    A prompt reads, by default::

        {system}

        ECG: <ecg>
        Question: {question}
        Answer:

    and the supervised answer is ``" {answer}{eos_token}"``. The prompt is always a prefix of the
    full text and ends with the cue to answer, so ``add_generation_prompt`` changes nothing.
    ``<ecg>`` may come before or after the question.

    Args:
        prompt_template: The question, with ``<ecg>`` exactly once and the field ``{question}``.
        answer_template: The supervised continuation, with ``{answer}`` and optionally
            ``{eos_token}`` (the tokenizer's end-of-sequence token, so the model learns to stop).
        system_template: How the system prompt is written, with ``{system}`` (left out without one).
        **kwargs: :class:`~ecglm.prompts.PromptStyle`'s (``system_prompt``, ``max_length``,
            ``min_answer_tokens``, ...).
    """

    def __init__(
        self,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_template: str = DEFAULT_ANSWER_TEMPLATE,
        system_template: str = DEFAULT_SYSTEM_TEMPLATE,
        **kwargs,
    ):
        check_templates(prompt_template, answer_template, system_template)
        self.prompt_template = prompt_template
        self.answer_template = answer_template
        self.system_template = system_template
        super().__init__(**kwargs)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        turns = _turns(messages)
        # PromptStyle.messages puts the marker at the start of the user turn; the template places it.
        question = turns["user"].replace(ECG_MARKER, "", 1).strip()
        text = self.system_template.format(system=turns["system"]) if turns.get("system") else ""
        text += self.prompt_template.format(question=question)
        if "assistant" in turns:
            text += self.answer_template.format(
                answer=turns["assistant"], eos_token=self.tokenizer.eos_token or ""
            )
        return text


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
