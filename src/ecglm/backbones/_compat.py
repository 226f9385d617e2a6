"""ecglm 0.1's backbone-side prompt API, kept working, with a DeprecationWarning, until 0.3.0.

In 0.1 a backbone wrote its prompts: ``HFBackbone(system_prompt=..., max_length=...,
min_answer_tokens=...)`` and the hook ``build_formatter(system_prompt, max_length)``, which returned a
``ChatFormatter`` (imported, with ``ECG_MARKER``, from ``ecglm.backbones``). Since 0.2 prompts are the
data side's: a prompt style (:class:`ecglm.prompts.PromptStyle`) that a recipe names under
``data.init_args.prompt``. Here: :class:`ChatFormatter`, a prompt style that takes 0.1's constructor
and ``render`` contract, and :func:`legacy_prompt`, the prompt style a 0.1-era backbone asks for,
which :func:`ecglm.wiring.connect` uses when the recipe names none.

Component layer: imports ecglm's prompt styles only.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ecglm._deprecation import warn_deprecated
from ecglm.prompts import ChatTemplate, PromptStyle

#: What replaces ``ChatFormatter``, as its deprecation message names it.
PROMPT_STYLE = "ecglm.prompts.PromptStyle (a prompt style, named in a recipe under data.init_args.prompt)"
#: 0.1's prompt arguments of ``HFBackbone``, each now an argument of the data side's prompt style.
LEGACY_PROMPT_ARGS = ("system_prompt", "max_length", "min_answer_tokens")


class ChatFormatter(PromptStyle):
    """0.1's ``ChatFormatter`` as a prompt style: the tokenizer comes first (as before, it may also be
    bound later), and :meth:`render` writes the conversation with the tokenizer's chat template
    unless a subclass overrides it (a subclass that does may serve tokenizers without one).

    Deprecated: subclass :class:`~ecglm.prompts.PromptStyle` (or :class:`~ecglm.prompts.ChatTemplate`)
    and name it in ``data.init_args.prompt``.
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
        super().__init__(
            tokenizer, system_prompt, placeholder_token_id, max_length, min_answer_tokens, prompt_cache_size
        )

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if type(self).render is ChatFormatter.render:  # only the chat template's rendering needs one
            ChatTemplate.check_tokenizer(self, tokenizer)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._bound_tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def overrides_build_formatter(backbone: Any, default_hook: Any) -> bool:
    """Whether ``backbone``'s class overrides 0.1's ``build_formatter`` hook (``default_hook``: the base
    class's own, passed in so that this module does not import the class that imports it)."""
    hook = getattr(type(backbone), "build_formatter", None)
    return hook is not None and hook is not default_hook


def legacy_prompt(backbone: Any, default_hook: Any, **given: Any) -> PromptStyle | None:
    """The prompt style a 0.1-era backbone asks for, warning once per deprecated use; ``None`` if none.

    ``given``: the :data:`LEGACY_PROMPT_ARGS` its constructor received (``None`` when left out). A
    backbone that overrides ``build_formatter`` gets that formatter; one that passed only arguments
    gets :class:`~ecglm.prompts.ChatTemplate` with them (0.1's default formatter).
    """
    name = type(backbone).__name__
    given = {key: value for key, value in given.items() if value is not None}
    for key in given:
        warn_deprecated(f"{name}({key}=...)", f"data.init_args.prompt.init_args.{key}", stacklevel=4)
    max_length, system_prompt = given.get("max_length"), given.get("system_prompt")
    if overrides_build_formatter(backbone, default_hook):
        warn_deprecated(f"{name}.build_formatter", PROMPT_STYLE, stacklevel=4)
        style = backbone.build_formatter(system_prompt, max_length)
    elif given:
        style = ChatTemplate(system_prompt=system_prompt, max_length=max_length)
    else:
        return None
    if "min_answer_tokens" in given:
        style.min_answer_tokens = given["min_answer_tokens"]
    return style
