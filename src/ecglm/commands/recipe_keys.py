"""Recipe keys of earlier ecglm releases, and where they went.

A recipe written for an earlier release keeps working for one minor version: its moved keys are
migrated to their new place as the recipe is read, with a :class:`DeprecationWarning` naming the new
key; a flag or key that can no longer be migrated fails with an error naming its new place
(:func:`moved_key_hint`). CHANGELOG.md lists the same moves.
"""

from __future__ import annotations

from typing import Any

from ecglm._deprecation import warn_deprecated

#: The built-in backbones, which left the prompt keys in 0.2.0 (a plugin backbone may still take them).
BUILTIN_BACKBONES = {"ecglm.backbones.HFBackbone", "ecglm.backbones.VisionLanguageBackbone"}
PROMPT = "data.init_args.prompt.init_args"
#: Old key -> new key, for the messages.
MOVED_KEYS = {
    "model.backbone.init_args.system_prompt": f"{PROMPT}.system_prompt",
    "model.backbone.init_args.max_length": f"{PROMPT}.max_length",
    "model.backbone.init_args.min_answer_tokens": f"{PROMPT}.min_answer_tokens",
}


def migrate_recipe(config: Any) -> Any:
    """``config`` (a recipe as read from YAML, entry-point names resolved) with 0.1 keys moved."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return config
    backbone = config["model"].get("backbone")
    if not isinstance(backbone, dict) or backbone.get("class_path") not in BUILTIN_BACKBONES:
        return config
    init_args = backbone.get("init_args") or {}
    for old, new in MOVED_KEYS.items():
        key = old.rpartition(".")[2]
        if key not in init_args:
            continue
        value = init_args.pop(key)
        prompt = _prompt_node(config)
        prompt.setdefault("init_args", {}).setdefault(key, value)
        warn_deprecated(f"the recipe key {old}", new, stacklevel=2)
    return config


def _prompt_node(config: dict[str, Any]) -> dict[str, Any]:
    data = config.setdefault("data", {})
    init_args = data.setdefault("init_args", {})
    prompt = init_args.get("prompt")
    if not isinstance(prompt, dict):
        prompt = init_args["prompt"] = {"class_path": "ecglm.prompts.ChatTemplate", "init_args": {}}
    return prompt


def moved_key_hint(message: str) -> str | None:
    """Where a key that a parser refused went, when the refusal names one of :data:`MOVED_KEYS`."""
    for old, new in MOVED_KEYS.items():
        name = old.rpartition(".")[2]
        if f"'{name}'" in message or f'"{name}"' in message or f".{name}" in message:
            return f"{old} moved to {new} in ecglm 0.2.0 (the prompt style is the data side's)"
    return None
