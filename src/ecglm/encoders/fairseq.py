"""Reading fairseq-signals / ECG-FM checkpoints: safe unpickling, the architecture a file states, and
the renaming of its state dict to :class:`~ecglm.encoders.Wav2Vec2ECGEncoder`'s names.

:func:`load_fairseq_checkpoint` reads a file with ``torch.load(weights_only=True)`` and explains what
it refused (:func:`explain_unpickling_error`); :func:`find_fairseq_model_config` and
:func:`stated_architecture` read the sizes the file states; :func:`convert_fairseq_state_dict` and
:class:`FairseqLayout` map its keys. ``docs/encoders.md`` describes the formats.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# --- fairseq-signals checkpoints ---------------------------------------------------------------------
#
# Names checked against the source of Jwoo5/fairseq-signals (the code the ECG-FM and CMSC checkpoints
# come from): the architecture fields of ECGTransformerConfig / TransformerConfig / ConvTransformerConfig
# (models/ecg_transformer.py, transformer.py, conv_transformer.py) and their defaults; ConvFeatureExtraction
# (modules/conv_feature_extraction.py: conv_layers.{i}.0 conv, .2 Fp32GroupNorm on layer 0 in "default"
# mode); ConvPositionalEncoding (modules/conv_positional_encoding.py: conv_pos.pos_conv.0, weight_norm
# dim=2, SamePad, GELU); TransformerEncoder / TransformerEncoderLayer (modules/transformer_encoder*.py:
# layers.N.self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm, layer_norm
# before the layers unless layer_norm_first). Before ecg_transformer.py existed, ConvTransformerModel
# (models/conv_transformer.py) kept the positional convolution inside its TransformerEncoder, hence
# ``encoder.pos_conv.*`` in older files, as in fairseq's own wav2vec 2.0.

#: Pretraining-only parameters (models/wav2vec2/wav2vec2.py: quantizer, input_quantizer, project_q,
#: project_inp, target_glu, final_proj, removed by remove_pretraining_modules; mask_emb from
#: ConvTransformerModel / TransformerModel). The encoder's forward never uses them.
PRETRAINING_ONLY = (
    "mask_emb",
    "quantizer",
    "input_quantizer",
    "project_q",
    "project_inp",
    "target_glu",
    "final_proj",
)
#: Task heads of fine-tuned models, which keep the pretrained model as ``self.encoder``
#: (models/finetuning_model.py): ``proj`` (classification/ecg_transformer_classifier.py,
#: classification/linear_projection.py) and ``kernel`` (identification/arcface.py).
FINETUNING_HEADS = ("proj", "kernel")
#: Every encoder key contains this; what precedes it is the prefix a fine-tuned model puts before the
#: pretrained one: ``encoder.`` (FinetuningModel.encoder) or ``w2v_encoder.w2v_model.`` (wav2vec2_dc's
#: Wav2Vec2Encoder.w2v_model, as in fairseq's wav2vec2_asr).
_FEATURE_EXTRACTOR = "feature_extractor.conv_layers."
_OLD_POS_CONV, _POS_CONV = "encoder.pos_conv.", "conv_pos.pos_conv."
#: torch.nn.utils.weight_norm's names -> torch.nn.utils.parametrizations.weight_norm's.
_WEIGHT_NORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
#: Where a fine-tuned file keeps the pretrained model's config: ``w2v_args`` (wav2vec2_dc and
#: fairseq's wav2vec2_asr lineage) or ``args`` (ConvTransformerModel / TransformerModel.from_pretrained).
#: Under Hydra it is a whole config (its ``model`` section holds the sizes); pre-Hydra, a flat Namespace.
PRETRAINED_CONFIG_KEYS = ("w2v_args", "args")

#: Classes a checkpoint may pickle besides tensors and containers. fairseq files before Hydra store
#: their arguments as ``args = argparse.Namespace(...)``; unpickling one only sets attributes on a
#: plain object, which runs no code of the file's choosing.
SAFE_GLOBALS = (argparse.Namespace,)

#: Architecture defaults, equal to fairseq-signals' ECGTransformerConfig defaults (the CMSC / ECG-FM size).
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "in_channels": 12,
    "conv_layers": ((256, 2, 2),) * 4,
    "embed_dim": 768,
    "num_layers": 12,
    "num_heads": 12,
    "ffn_dim": 3072,
    "conv_pos_kernel": 128,
    "conv_pos_groups": 16,
    "layer_norm_first": False,
    "conv_bias": False,
}
#: fairseq-signals ``cfg['model']`` field -> Wav2Vec2ECGEncoder argument.
FAIRSEQ_ARCHITECTURE_FIELDS = {
    "in_d": "in_channels",
    "conv_feature_layers": "conv_layers",
    "encoder_embed_dim": "embed_dim",
    "encoder_layers": "num_layers",
    "encoder_attention_heads": "num_heads",
    "encoder_ffn_embed_dim": "ffn_dim",
    "conv_pos": "conv_pos_kernel",
    "conv_pos_groups": "conv_pos_groups",
    "layer_norm_first": "layer_norm_first",
    "conv_bias": "conv_bias",
}
_FAIRSEQ_FIELD = {argument: field for field, argument in FAIRSEQ_ARCHITECTURE_FIELDS.items()}
_MAX_REPEAT = 1000
_MAX_CONFIG_DEPTH = 8  # fine-tuned-from-fine-tuned files nest a few levels; a pickle can nest forever


class CheckpointImportError(ValueError):
    """A checkpoint that cannot be imported exactly; the message says what differs and what to do."""


def _list_literal(node: ast.AST) -> Any:
    """Evaluate fairseq's ``conv_feature_layers`` syntax (int/list/tuple literals, ``+``, ``*``)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_list_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_literal(node.left), _list_literal(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult):
            seq, times = (left, right) if isinstance(left, list) else (right, left)
            if isinstance(seq, list) and isinstance(times, int) and 0 <= times <= _MAX_REPEAT:
                return seq * times
    raise ValueError(f"unsupported expression {ast.unparse(node)!r}")


def parse_conv_layers(spec: str | Sequence[Sequence[int]]) -> tuple[tuple[int, int, int], ...]:
    """``"[(256, 2, 2)] * 4"`` (fairseq's string, parsed without ``eval``) or a list -> tuple of triples."""
    try:
        value = _list_literal(ast.parse(spec.strip(), mode="eval").body) if isinstance(spec, str) else spec
        layers = tuple(tuple(layer) for layer in value)
    except (SyntaxError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read conv layers {spec!r}: {err}") from err
    if not layers or any(len(x) != 3 or not all(type(v) is int and v > 0 for v in x) for x in layers):
        raise ValueError(
            f"conv layers must be (channels, kernel, stride) triples of positive ints, got {spec!r}"
        )
    return layers


def _allow_globals(globals_: Sequence[Any]) -> contextlib.AbstractContextManager:
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(list(globals_))
    torch.serialization.add_safe_globals(list(globals_))  # torch 2.4 has only the process-wide list
    return contextlib.nullcontext()


#: How torch names the global it refused: "Trying to load unsupported GLOBAL posix.system whose module
#: posix is blocked" (a blocked module, torch 2.13), "Unsupported global: GLOBAL m.C was not an allowed
#: global by default" (torch 2.4+), "... but got <class 'm.C'>" (an object built from a refused class).
_REFUSED_GLOBAL = (re.compile(r"GLOBAL (\S+)"), re.compile(r"but got <class '([^']+)'>"))
_BLOCKED_MODULE = re.compile(r"whose module (\S+) is blocked")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _refused_global(message: str) -> str | None:
    for pattern in _REFUSED_GLOBAL:
        match = pattern.search(message)
        if match:
            return match.group(1).rstrip(".,;:")
    return None


def _torch_reason(message: str) -> str:
    """torch's own words without its boilerplate (the weights_only default, the documentation link)."""
    text = _ANSI_ESCAPE.sub("", message).split("Check the documentation of torch.load")[0]
    if "WeightsUnpickler error:" in text:
        text = text.rpartition("WeightsUnpickler error:")[2]
    return " ".join(text.split()).rstrip(".")


def explain_unpickling_error(path: str | os.PathLike, err: Exception) -> str:
    """What ``torch.load(path, weights_only=True)`` refused, why, and what to do: ``err``'s full message.

    Names the refused global in every wording torch uses (quoting torch's reason when it names none)
    and says what to do: only for a file you trust, load it with ``trust_pickle=True``
    (``weights_only=False``) or allow-list that one global; a global of a module torch blocks outright
    (``os``, ``posix``, ``sys``) has no place in a checkpoint.
    """
    path, message = os.fspath(path), str(err)
    name, blocked = _refused_global(message), _BLOCKED_MODULE.search(message)
    trust = "trust_pickle=True (this runs any code the pickle names)"
    if name is None:
        return (
            f"{path}: torch.load(weights_only=True) refused the file's pickle; torch said: "
            f"{_torch_reason(message)}. Only if you trust the file: load it with {trust}."
        )
    if blocked:
        return (
            f"{path}: torch.load(weights_only=True) refused to unpickle the global {name}: torch blocks "
            f"the module {blocked.group(1)} outright, because it runs commands on this machine, and no "
            f"allow-list can admit it. A checkpoint has no need for {name}: treat the file as hostile. "
            f"Only if you trust the file and know why it names {name}: load it with {trust}."
        )
    return (
        f"{path}: torch.load(weights_only=True) refused to unpickle the global {name}, because creating it "
        f"could run code chosen by whoever wrote the file. Only if you trust the file: load it with {trust}, "
        f"or allow just this global with torch.serialization.add_safe_globals([{name}]) (or the "
        "torch.serialization.safe_globals context manager) and load it again."
    )


def load_fairseq_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", trust_pickle: bool = False
) -> dict[str, Any]:
    """Read a fairseq-signals checkpoint (``{'cfg': ..., 'model': state dict}``) without running its code.

    Uses ``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` allowed; anything else pickled in
    the file is refused with a :class:`CheckpointImportError` naming it. ``trust_pickle=True`` loads
    with ``weights_only=False``, which executes whatever the pickle names: only for files you trust.
    """
    path = os.fspath(path)
    if trust_pickle:
        log.warning("loading %s with weights_only=False (trust_pickle=True): its pickle may run code", path)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    else:
        try:
            with _allow_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
            raise CheckpointImportError(
                f"{explain_unpickling_error(path, err)} ecglm allows tensors, plain containers and {allowed} "
                "(SAFE_GLOBALS). Or, in an environment you trust, re-save the file as "
                "torch.save({'cfg': <plain dict>, 'model': <state dict>}, path)."
            ) from err
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointImportError(
            f"{path} is not a fairseq-signals checkpoint: expected a dict with 'cfg' and 'model' "
            f"(the state dict), found {found}"
        )
    return dict(ckpt)


def _as_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, argparse.Namespace):
        return vars(value)
    return dict(value) if isinstance(value, Mapping) else None


def _child(where: str, parent: Any, key: str) -> str:
    return f"{where}.{key}" if isinstance(parent, argparse.Namespace) else f"{where}[{key!r}]"


def _states_architecture(config: Mapping[str, Any]) -> bool:
    return any(config.get(field) is not None for field in FAIRSEQ_ARCHITECTURE_FIELDS)


def _search_model_config(node: Any, where: str, looked: list[str]) -> tuple[dict[str, Any], str] | None:
    """The innermost config under ``node`` that states the architecture, and where it is.

    The pretrained model's config wins over the fine-tuning model's: fairseq-signals built the encoder
    from it, and the fine-tuning config's own size fields can be unrelated defaults.
    """
    config = _as_dict(node)
    if config is None or len(looked) >= _MAX_CONFIG_DEPTH:
        return None
    looked.append(where)
    for key in PRETRAINED_CONFIG_KEYS:
        pretrained = config.get(key)
        section = _as_dict(pretrained)
        if section is None:
            continue
        inner = _child(where, node, key)
        if _as_dict(section.get("model")) is not None:
            found = _search_model_config(section["model"], _child(inner, pretrained, "model"), looked)
        else:
            found = _search_model_config(pretrained, inner, looked)
        if found is not None:
            return found
    return (config, where) if _states_architecture(config) else None


def find_fairseq_model_config(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str, list[str]]:
    """``(config, where, looked)``: the model config that states a fairseq checkpoint's architecture.

    Searched, first found wins: ``cfg['model']`` (Hydra files), then ``args`` (pre-Hydra
    ``argparse.Namespace``); in each, the pretrained model's config a fine-tuned file keeps under
    ``w2v_args`` or ``args`` (a dict with a ``model`` section, or a flat Namespace) comes first. A
    config states the architecture when it sets any of :data:`FAIRSEQ_ARCHITECTURE_FIELDS`.
    ``config`` is None when none does; ``looked`` lists every config searched, by its path in the file.
    """
    looked: list[str] = []
    cfg = _as_dict(ckpt.get("cfg"))
    candidates = ((cfg.get("model"), "cfg['model']"),) if cfg else ()
    for node, where in (*candidates, (ckpt.get("args"), "args")):
        found = _search_model_config(node, where, looked)
        if found is not None:
            return found[0], found[1], looked
    return None, "", looked


def _no_architecture_message(source: str, looked: Sequence[str], missing: Sequence[str] = ()) -> str:
    searched = (
        f"looked in {', '.join(looked)}, and none sets any of fairseq-signals' size fields "
        f"({', '.join(FAIRSEQ_ARCHITECTURE_FIELDS)})"
        if looked
        else "the file has neither cfg['model'] nor args"
    )
    missing = missing or tuple(ARCHITECTURE_DEFAULTS)
    return (
        f"{source} states no architecture: {searched}. ecglm does not guess it from its defaults: pass "
        f"every size argument to import the file anyway (not given: {', '.join(missing)}), or re-save it "
        "with cfg['model'] from the run that trained it."
    )


def fairseq_model_config(ckpt: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The model config that states a fairseq checkpoint's architecture (:func:`find_fairseq_model_config`).

    Raises :class:`CheckpointImportError` naming ``source`` and the configs searched when none does.
    """
    config, _, looked = find_fairseq_model_config(ckpt)
    if config is None:
        raise CheckpointImportError(_no_architecture_message(source, looked))
    return config


def fairseq_sample_rate(ckpt: Mapping[str, Any], depth: int = 0) -> int | None:
    """``cfg['task']['sample_rate']`` (or ``args.sample_rate``); fairseq-signals' datasets refuse others.

    A fine-tuned file whose own task leaves the rate unset (fairseq-signals' classification task allows
    it) takes its pretraining run's, from the config it keeps under ``w2v_args`` / ``args``.
    """
    cfg = _as_dict(ckpt.get("cfg"))
    task = _as_dict(cfg.get("task")) if cfg else _as_dict(ckpt.get("args"))
    rate = task.get("sample_rate") if task else None
    if isinstance(rate, (int, float)) and rate > 0:
        return int(rate)
    model = _as_dict(cfg.get("model")) if cfg else _as_dict(ckpt.get("args"))
    for key in PRETRAINED_CONFIG_KEYS if model and depth < _MAX_CONFIG_DEPTH else ():
        pretrained = _as_dict(model.get(key))
        if pretrained is not None:
            hydra = "task" in pretrained or "model" in pretrained
            found = fairseq_sample_rate({"cfg": pretrained} if hydra else {"args": pretrained}, depth + 1)
            if found is not None:
                return found
    return None


def stated_architecture(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Wav2Vec2ECGEncoder arguments a fairseq-signals model config sets (only those it sets)."""
    mode = model_cfg.get("extractor_mode", "default")
    if mode != "default":
        raise CheckpointImportError(
            f"extractor_mode={mode!r} is not supported: Wav2Vec2ECGEncoder has the 'default' feature "
            "extractor (GroupNorm on the first convolution only)"
        )
    stated = {
        argument: model_cfg[field]
        for field, argument in FAIRSEQ_ARCHITECTURE_FIELDS.items()
        if model_cfg.get(field) is not None
    }
    if "conv_layers" in stated:
        stated["conv_layers"] = parse_conv_layers(stated["conv_layers"])
    return stated


def architecture_from_fairseq(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Wav2Vec2ECGEncoder arguments from a fairseq-signals model config (fairseq defaults where absent)."""
    arch = {**ARCHITECTURE_DEFAULTS, **stated_architecture(model_cfg)}
    arch["conv_layers"] = parse_conv_layers(arch["conv_layers"])
    return arch


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class FairseqLayout:
    """How a fairseq-signals state dict spells the encoder's keys.

    ``prefix``: ``""`` in a pretraining file, ``"encoder."`` or ``"w2v_encoder.w2v_model."`` in a
    fine-tuned one. ``old_pos_conv``: the positional convolution under ``encoder.pos_conv.``
    (ConvTransformerModel). ``weight_g_v``: torch.nn.utils.weight_norm's names (what fairseq-signals
    writes; assumed when the file holds neither spelling).
    """

    prefix: str = ""
    old_pos_conv: bool = False
    weight_g_v: bool = True

    @classmethod
    def of(cls, keys: Iterable[str]) -> FairseqLayout:
        keys = list(keys)
        found = {k.partition(_FEATURE_EXTRACTOR)[0] for k in keys if _FEATURE_EXTRACTOR in k}
        prefixes = sorted(p for p in found if p == "" or p.endswith("."))
        if len(prefixes) > 1 and "" not in prefixes:
            raise CheckpointImportError(
                f"the state dict holds several encoders (under {', '.join(prefixes)}): save the one to import"
            )
        prefix = prefixes[0] if prefixes else ""
        return cls(
            prefix=prefix,
            old_pos_conv=any(k.startswith(prefix + _OLD_POS_CONV) for k in keys),
            weight_g_v=not any(".parametrizations.weight.original" in k for k in keys),
        )

    def file_key(self, name: str) -> str:
        """An encoder parameter's name as this file would spell it."""
        if self.weight_g_v and name.startswith(_POS_CONV + "0."):
            leaf = name.removeprefix(_POS_CONV + "0.")
            name = _POS_CONV + "0." + next((g for g, p in _WEIGHT_NORM.items() if p == leaf), leaf)
        if self.old_pos_conv and name.startswith(_POS_CONV):
            name = _OLD_POS_CONV + name.removeprefix(_POS_CONV)
        return self.prefix + name

    def is_task_head(self, key: str) -> bool:
        """A fine-tuned model's head, beside the encoder at any level of its prefix (``w2v_encoder.proj``)."""
        parts = self.prefix.split(".")[:-1]
        wrappers = {"".join(f"{p}." for p in parts[:i]) for i in range(len(parts))}
        return any(key.startswith(w) and _under(key.removeprefix(w), FINETUNING_HEADS) for w in wrappers)


def _ecglm_name(name: str) -> str:
    if name.startswith(_OLD_POS_CONV):
        name = _POS_CONV + name[len(_OLD_POS_CONV) :]
    module, _, leaf = name.rpartition(".")
    if module == _POS_CONV + "0" and leaf in _WEIGHT_NORM:
        name = f"{module}.{_WEIGHT_NORM[leaf]}"
    return name


def convert_fairseq_state_dict(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Rename a fairseq-signals state dict to Wav2Vec2ECGEncoder's names.

    Returns ``(state, source, ignored)``: the renamed tensors, each new name's key in the file, and
    the file's keys left out (pretraining-only parameters, a fine-tuned model's task head).
    Fine-tuned files (the encoder under a prefix, see :class:`FairseqLayout`) are recognised and
    unwrapped.
    """
    layout = FairseqLayout.of(state)
    converted: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointImportError(f"{key} holds a {type(value).__name__}, not a tensor")
        inside = key.startswith(layout.prefix)
        name = key.removeprefix(layout.prefix)
        if (not inside and layout.is_task_head(key)) or _under(name, PRETRAINING_ONLY):
            ignored.append(key)
            continue
        name = _ecglm_name(name)
        if name in converted:
            raise CheckpointImportError(f"{source[name]} and {key} are the same parameter ({name}) twice")
        converted[name], source[name] = value, key
    return converted, source, ignored


def _key_list(keys: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _ignored_module(key: str, prefix: str) -> str:
    inside = key.startswith(prefix)
    name = key.removeprefix(prefix)
    if "." not in name:
        return name
    return (name.split(".")[0] if inside else name.rpartition(".")[0]) + ".*"


def _describe_ignored(ignored: Sequence[str], prefix: str) -> str:
    """``["encoder.quantizer.vars", "encoder.mask_emb", "proj.weight"]``, ``"encoder."`` ->
    ``"mask_emb, proj.*, quantizer.*"``."""
    return ", ".join(sorted({_ignored_module(k, prefix) for k in ignored}))


def _size_conflict(argument: str, value: Any, stated: Mapping[str, Any]) -> str:
    if argument in stated:
        return f"{argument}={value!r} (the file has {stated[argument]!r})"
    field = _FAIRSEQ_FIELD[argument]
    return (
        f"{argument}={value!r} (the file does not state {field}; fairseq-signals' default is "
        f"{ARCHITECTURE_DEFAULTS[argument]!r})"
    )
