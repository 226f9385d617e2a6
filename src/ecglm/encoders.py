"""ECG encoders: modules that turn a batch of 12-lead signals into a sequence of frame embeddings.

Component layer: imports torch only. Subclass :class:`ECGEncoder` to add an encoder and register it
under the ``ecglm.encoders`` entry-point group. Every encoder states the input it expects as a
:class:`Preprocessing`; :func:`check_preprocessing` compares it with what a dataset declares.
:class:`Wav2Vec2ECGEncoder` imports fairseq-signals / ECG-FM checkpoints (``checkpoint=`` or
:meth:`Wav2Vec2ECGEncoder.from_fairseq_checkpoint`); ``docs/encoders.md`` describes the formats.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import logging
import os
import pickle
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecglm.ecg import NORMALIZATIONS

log = logging.getLogger(__name__)

# --- expected input ----------------------------------------------------------------------------------


class PreprocessingMismatchWarning(UserWarning):
    """Data prepared differently from what an encoder expects (``warnings.simplefilter("error", ...)``)."""


@dataclass(frozen=True)
class Preprocessing:
    """The input an encoder expects: ``num_samples`` per lead at ``sampling_rate`` Hz, normalised so.

    fairseq-signals' preprocessing (ECG-FM, the CMSC encoders) resamples to 500 Hz, cuts 5 s
    segments (2,500 samples) and z-scores each lead; ecglm's own default is 10 s at 250 Hz.
    """

    sampling_rate: int = 250
    num_samples: int = 2500
    normalization: str = "zscore"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {sorted(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.sampling_rate <= 0 or self.num_samples <= 0:
            raise ValueError(
                f"sampling_rate and num_samples must be positive, got {self.sampling_rate}, "
                f"{self.num_samples}"
            )


#: Names a dataset's manifest may use for each :class:`Preprocessing` field.
_DATA_KEYS = {
    "sampling_rate": ("sampling_rate",),
    "num_samples": ("num_samples",),
    "normalization": ("normalization", "normalisation"),
}


#: Spellings (lower case, letters only) a manifest may use for each normalisation.
_NORMALIZATION_ALIASES = {
    "zscore": {"zscore", "perleadzscore", "zscoreperlead"},
    "minmax": {"minmax", "globalminmax", "minmaxglobal"},
}


def _canonical_normalization(value: Any) -> str:
    """``"per-lead z-score"``, ``"z_score"``, ``"min-max"`` ... -> ``"zscore"`` / ``"minmax"``; else as is."""
    letters = re.sub(r"[^a-z]", "", str(value).lower())
    return next((name for name, aliases in _NORMALIZATION_ALIASES.items() if letters in aliases), str(value))


def _mismatch_fix(name: str, expected: Preprocessing) -> str:
    if name == "sampling_rate":
        return (
            f"resample the ECGs to {expected.sampling_rate} Hz (e.g. scipy.signal.resample_poly) "
            "or use an encoder trained at the data's rate"
        )
    if name == "num_samples":
        seconds = expected.num_samples / expected.sampling_rate
        return f"crop or pad each record to {expected.num_samples} samples ({seconds:g} s)"
    return f"normalise the ECGs with {expected.normalization!r} ({NORMALIZATIONS[expected.normalization]})"


def check_preprocessing(encoder_pre: Preprocessing, data_pre: Mapping[str, Any], source: str) -> list[str]:
    """Compare an encoder's expected input with a dataset's; warn about, and return, every mismatch.

    ``data_pre`` holds what the data declares (a manifest's ``preprocessing`` section): any of
    ``sampling_rate``, ``num_samples`` and ``normalization`` (or ``normalisation``, free text such
    as ``"per-lead z-score"``). A field the data does not declare is not checked. ``source`` names
    the data in the messages (the manifest's path). Each mismatch is a
    :class:`PreprocessingMismatchWarning` naming the source, both values and the fix.
    """
    messages = []
    for name, keys in _DATA_KEYS.items():
        key = next((k for k in keys if k in data_pre), None)
        if key is None:
            continue
        expected, found = getattr(encoder_pre, name), data_pre[key]
        same = _canonical_normalization(found) == expected if name == "normalization" else found == expected
        if not same:
            messages.append(
                f"{source}: the data has {key}={found!r} but the encoder expects {name}={expected!r}; "
                f"{_mismatch_fix(name, encoder_pre)}"
            )
    for message in messages:
        warnings.warn(message, PreprocessingMismatchWarning, stacklevel=2)
    return messages


# --- modules -----------------------------------------------------------------------------------------


class ECGEncoder(nn.Module, ABC):
    """Base class of every ECG encoder.

    Subclasses set ``output_dim`` (the width of each output frame) in ``__init__`` and implement
    :meth:`forward`. ``pretrained`` says whether the weights come from a checkpoint that can be
    loaded again; weights that cannot (a randomly initialised encoder) are saved in ecglm's
    checkpoints even when frozen, so that a resumed or evaluated run sees the same encoder.
    ``preprocessing`` is the input the encoder expects.
    """

    output_dim: int
    pretrained: bool = False
    preprocessing: Preprocessing = Preprocessing()

    @abstractmethod
    def forward(self, ecg: Tensor) -> Tensor:
        """Encode ``ecg`` of shape ``(batch, leads, samples)`` into ``(batch, frames, output_dim)``."""

    def top_layers(self, n: int) -> list[nn.Module]:
        """Optional: the modules that training the top ``n`` layers unfreezes, lowest first.

        Policies call it for ``encoder_top_layers: n``. An encoder without a stack of layers to
        choose from keeps this default, which refuses.
        """
        raise TypeError(
            f"encoder_top_layers needs an encoder that says which its top layers are; "
            f"{type(self).__name__} has neither known layers nor a top_layers(n) -> list[nn.Module] of "
            "its own. Use train_encoder: true to train all of it"
        )


class _SamePad(nn.Module):
    """Drops the extra frame that an even-sized, centre-padded convolution produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : -self.remove] if self.remove else x


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's strided convolution stack over the leads (GroupNorm on the first layer only)."""

    def __init__(
        self,
        in_channels: int,
        conv_layers: Sequence[Sequence[int]],
        dropout: float = 0.0,
        conv_bias: bool = False,
    ):
        super().__init__()
        layers = []
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            block = [nn.Conv1d(in_channels, dim, kernel, stride=stride, bias=conv_bias), nn.Dropout(dropout)]
            if i == 0:
                block.append(nn.GroupNorm(dim, dim, affine=True))
            block.append(nn.GELU())
            layers.append(nn.Sequential(*block))
            in_channels = dim
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.conv_layers:
            x = layer(x)
        return x


class ConvPositionalEmbedding(nn.Module):
    """Grouped, weight-normalised convolution that gives wav2vec 2.0 its relative positions."""

    def __init__(self, dim: int, kernel_size: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, _SamePad(kernel_size), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fairseq's parameter names (``q_proj`` ... ``out_proj``).

    Written out rather than taken from ``nn.MultiheadAttention`` so that fairseq-signals'
    attention and feed-forward weights keep their names here.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    """One wav2vec 2.0 encoder layer, post-LN by default (as in fairseq-signals' ECG models)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, layer_norm_first: bool):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.self_attn = SelfAttention(dim, num_heads, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x)))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        return self.final_layer_norm(x + self._ffn(x))


class TransformerEncoder(nn.Module):
    def __init__(
        self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float, layer_norm_first: bool
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, ffn_dim, dropout, layer_norm_first) for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm_first else x


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


class Wav2Vec2ECGEncoder(ECGEncoder):
    """The wav2vec 2.0 architecture over 12-lead ECGs, as in fairseq-signals' ``ecg_transformer``.

    The defaults are the CMSC / ECG-FM size: four ``(256, 2, 2)`` convolutions turn 2,500 samples
    into 156 frames, projected to 768 and fed through 12 post-LN transformer layers. With
    ``checkpoint``, the architecture comes from the file's config (:func:`find_fairseq_model_config`:
    ``cfg['model']``, ``args``, or the pretrained model's config a fine-tuned file keeps in them) and
    its weights are loaded (``pretrained`` is then True); size arguments may be left out, and one that
    contradicts the file is an error. A file that states no architecture needs every size argument.
    An imported encoder is returned in eval mode (no dropout); ``.train()`` turns dropout back on, as
    :class:`ecglm.module.ECGLanguageModel` does for an encoder that trains.

    Args:
        in_channels: Number of leads (default 12).
        conv_layers: ``(channels, kernel, stride)`` of each convolution (default ``((256, 2, 2),) * 4``).
        embed_dim: Transformer width and ``output_dim`` (default 768).
        num_layers: Transformer layers (default 12).
        num_heads: Attention heads (default 12).
        ffn_dim: Feed-forward width (default 3072).
        dropout: Dropout in the feature extractor and transformer.
        conv_pos_kernel: Kernel of the convolutional positional embedding (default 128).
        conv_pos_groups: Groups of the convolutional positional embedding (default 16).
        layer_norm_first: Pre-LN layers instead of fairseq-signals' post-LN (default False).
        conv_bias: Biases in the feature extractor's convolutions (default False).
        sampling_rate: Expected sampling rate in Hz (default: the checkpoint's ``cfg['task']['sample_rate']``,
            else 250).
        num_samples: Expected samples per lead.
        normalization: Expected normalisation, one of :data:`NORMALIZATIONS`.
        checkpoint: A fairseq-signals / ECG-FM ``.pt`` file to import.
        strict: With ``checkpoint``, refuse keys the encoder does not know (missing keys and shape
            mismatches are always refused).
        trust_pickle: With ``checkpoint``, unpickle any object in the file (runs arbitrary code).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        conv_layers: Sequence[tuple[int, int, int]] | None = None,
        embed_dim: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        conv_pos_kernel: int | None = None,
        conv_pos_groups: int | None = None,
        layer_norm_first: bool | None = None,
        conv_bias: bool | None = None,
        sampling_rate: int | None = None,
        num_samples: int = 2500,
        normalization: str = "zscore",
        checkpoint: str | None = None,
        strict: bool = True,
        trust_pickle: bool = False,
    ):
        super().__init__()
        given = {
            "in_channels": in_channels,
            "conv_layers": conv_layers,
            "embed_dim": embed_dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
            "conv_pos_kernel": conv_pos_kernel,
            "conv_pos_groups": conv_pos_groups,
            "layer_norm_first": layer_norm_first,
            "conv_bias": conv_bias,
        }
        given = {k: v for k, v in given.items() if v is not None}
        ckpt = load_fairseq_checkpoint(checkpoint, trust_pickle=trust_pickle) if checkpoint else None
        arch = self._architecture(given, ckpt, checkpoint)
        rate = self._sampling_rate(sampling_rate, ckpt, checkpoint)
        self.preprocessing = Preprocessing(rate, num_samples, normalization)
        self._build(dropout=dropout, **arch)
        self.checkpoint = os.fspath(checkpoint) if checkpoint else None
        if ckpt is not None:
            self.load_fairseq_state_dict(ckpt["model"], strict=strict, source=self.checkpoint)
            self.pretrained = True
            # Imported weights are mostly used as they are (frozen, or to encode); whatever trains them
            # calls .train() (ECGLanguageModel does), so eval is the mode that cannot silently add dropout.
            self.eval()

    @staticmethod
    def _architecture(given: dict[str, Any], ckpt: Mapping | None, path: str | None) -> dict[str, Any]:
        if "conv_layers" in given:
            given["conv_layers"] = parse_conv_layers(given["conv_layers"])
        if ckpt is None:
            return {**ARCHITECTURE_DEFAULTS, **given}
        config, where, looked = find_fairseq_model_config(ckpt)
        if config is None:
            missing = [k for k in ARCHITECTURE_DEFAULTS if k not in given]
            if missing:
                raise CheckpointImportError(_no_architecture_message(f"checkpoint {path}", looked, missing))
            return given
        stated = stated_architecture(config)
        arch = architecture_from_fairseq(config)
        conflicts = [_size_conflict(k, v, stated) for k, v in given.items() if v != arch[k]]
        if conflicts:
            raise ValueError(
                f"the architecture comes from {where} of checkpoint {path}, and these arguments contradict "
                f"it: {'; '.join(conflicts)}. Leave them out, or use a checkpoint of that size."
            )
        return arch

    @staticmethod
    def _sampling_rate(given: int | None, ckpt: Mapping | None, path: str | None) -> int:
        trained = fairseq_sample_rate(ckpt) if ckpt is not None else None
        if given is None:
            return trained or Preprocessing.sampling_rate
        if trained is not None and given != trained:
            warnings.warn(
                f"checkpoint {path} was trained on {trained} Hz ECGs (cfg['task']['sample_rate']) but "
                f"sampling_rate={given} was given: the encoder will expect {given} Hz input. Leave "
                "sampling_rate out to use the rate it was trained at.",
                PreprocessingMismatchWarning,
                stacklevel=3,
            )
        return given

    def _build(
        self,
        *,
        in_channels: int,
        conv_layers: Sequence[tuple[int, int, int]],
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        conv_pos_kernel: int,
        conv_pos_groups: int,
        layer_norm_first: bool,
        conv_bias: bool,
    ) -> None:
        self.output_dim = embed_dim
        self.in_channels = in_channels
        self.conv_layers = tuple(conv_layers)
        feature_dim = conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(in_channels, conv_layers, dropout, conv_bias)
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.post_extract_proj = (
            nn.Linear(feature_dim, embed_dim) if feature_dim != embed_dim else nn.Identity()
        )
        self.dropout_input = nn.Dropout(dropout)
        self.conv_pos = ConvPositionalEmbedding(embed_dim, conv_pos_kernel, conv_pos_groups)
        self.encoder = TransformerEncoder(
            embed_dim, num_layers, num_heads, ffn_dim, dropout, layer_norm_first
        )

    @classmethod
    def from_fairseq_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        strict: bool = True,
        map_location: str | torch.device = "cpu",
        trust_pickle: bool = False,
        **overrides: Any,
    ) -> Wav2Vec2ECGEncoder:
        """Import a fairseq-signals / ECG-FM checkpoint (pretrained or fine-tuned), in eval mode.

        The architecture comes from the file; ``overrides`` may set the other constructor arguments
        (``dropout``, ``sampling_rate``, ``num_samples``, ``normalization``) and repeat size arguments
        that agree with the file (or give all of them, for a file that states none). The encoder is
        moved to ``map_location`` after loading; call ``.train()`` to train it with dropout.
        """
        encoder = cls(checkpoint=os.fspath(path), strict=strict, trust_pickle=trust_pickle, **overrides)
        return encoder.to(map_location)

    def load_fairseq_state_dict(
        self, state: Mapping[str, Tensor], *, strict: bool = True, source: str = "state dict"
    ) -> list[str]:
        """Load fairseq-signals weights exactly; return the file's keys that were left out on purpose.

        Missing keys and shape mismatches always raise :class:`CheckpointImportError` listing them;
        unknown keys raise too unless ``strict=False`` (then they are listed in a warning). Every key is
        named as the file spells it (its prefix, its weight-norm names), missing ones included.
        """
        converted, keys_in_file, ignored = convert_fairseq_state_dict(state)
        layout = FairseqLayout.of(state)
        expected = self.state_dict()
        missing = sorted(layout.file_key(k) for k in set(expected) - set(converted))
        unknown = sorted(keys_in_file[k] for k in set(converted) - set(expected))
        if missing or (unknown and strict):
            raise CheckpointImportError(
                f"{source} does not fit this Wav2Vec2ECGEncoder (nothing was loaded).\n"
                f"  missing from the file ({len(missing)}): {_key_list(missing)}\n"
                f"  unknown to the encoder ({len(unknown)}): {_key_list(unknown)}"
            )
        if unknown:
            warnings.warn(
                f"{source}: ignoring keys unknown to the encoder (strict=False): {unknown}", stacklevel=2
            )
        shapes = [
            f"{keys_in_file[k]}: file {tuple(converted[k].shape)} vs encoder {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(converted[k].shape) != tuple(v.shape)
        ]
        if shapes:
            raise CheckpointImportError(f"{source}: shape mismatch (nothing was loaded): {'; '.join(shapes)}")
        self.load_state_dict({k: converted[k] for k in expected}, strict=True)
        if ignored:
            described = _describe_ignored(ignored, layout.prefix)
            log.info("%s: left out %d unused keys (%s)", source, len(ignored), described)
        return ignored

    def top_layers(self, n: int) -> list[nn.Module]:
        """The last ``n`` transformer layers and, in a pre-LN encoder (``layer_norm_first``), the norm
        applied after them; in the post-LN layout of fairseq-signals that norm comes before the first
        layer and stays frozen, as do the convolutions, projection and positional convolution."""
        layers = self.encoder.layers
        if not 1 <= n <= len(layers):
            raise ValueError(f"encoder_top_layers must be between 1 and {len(layers)} (its layers); got {n}")
        top: list[nn.Module] = list(layers[len(layers) - n :])
        if self.encoder.layer_norm_first:
            top.append(self.encoder.layer_norm)
        return top

    def num_frames(self, num_samples: int) -> int:
        """Frames returned for ``num_samples`` input samples: ``floor((n - k) / s) + 1`` per convolution."""
        for _, kernel, stride in self.conv_layers:
            num_samples = (num_samples - kernel) // stride + 1
        return num_samples

    def forward(self, ecg: Tensor) -> Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        features = self.layer_norm(self.feature_extractor(ecg).transpose(1, 2))
        x = self.dropout_input(self.post_extract_proj(features))
        return self.encoder(x + self.conv_pos(x))


class RawECGEncoder(ECGEncoder):
    """No encoder: the signal itself, one frame per sample, for connectors that read raw ECGs.

    Returns ``ecg`` transposed to ``(batch, samples, leads)``, so ``output_dim`` is the number of
    leads. It has no parameters; pair it with the ``encoder-free`` connector
    (:class:`ecglm.connectors.EncoderFreeConnector`), which patches and projects the signal.

    Args:
        in_channels: Number of leads (default 12).
        sampling_rate: Expected sampling rate in Hz.
        num_samples: Expected samples per lead.
        normalization: Expected normalisation, one of :data:`NORMALIZATIONS`.
    """

    def __init__(
        self,
        in_channels: int = 12,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.output_dim = in_channels
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)

    def forward(self, ecg: Tensor) -> Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.in_channels:
            raise ValueError(
                f"expected ECGs of shape (batch, {self.in_channels}, samples), got {tuple(ecg.shape)}"
            )
        return ecg.transpose(1, 2)


# --- ECG images --------------------------------------------------------------------------------------
# Encoders of the image-ECG path: they read the printouts the data side draws
# (ecglm.render.ECGPrintout), ``(batch, 3, height, width)`` uint8, and give frames like any encoder,
# so a connector and any text LLM read ECG images as they read signals (the LLaVA composition).


def pixels_to_unit(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> Tensor:
    """uint8 (or 0-255 float) images as ``(x / 255 - mean) / std`` per channel, in ``dtype``."""
    x = images.to(dtype) / 255.0
    mean_ = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_) / std_


class ImageECGEncoder(ECGEncoder):
    """Base class of the encoders that read ECG images, ``(batch, 3, height, width)`` uint8.

    ``image_size`` is the ``(height, width)`` they read: the DataModule's printouts are drawn at it
    (:func:`ecglm.wiring.connect`). ``preprocessing`` is that of the signals the printouts are
    drawn from (checked against the shards' manifest as for signal encoders).
    """

    image_size: tuple[int, int]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != tuple(self.image_size):
            raise ValueError(
                f"{type(self).__name__} reads ECG images of shape (batch, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(images.shape)}: draw them with data.init_args.image "
                "(ecglm.render.ECGPrintout) at this size"
            )

    def pixels(self, images: Tensor) -> Tensor:
        """The images checked and normalised, in the encoder's precision."""
        self.check_images(images)
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        return pixels_to_unit(images, self.image_mean, self.image_std, dtype)


class ViTImageEncoder(ImageECGEncoder):
    """A small vision transformer over ECG images: square patches, learnt positions, pre-LN layers.

    ``(batch, 3, H, W)`` -> ``(batch, (H / patch) * (W / patch), embed_dim)``. For training from scratch
    on printouts (a pretrained SigLIP / CLIP tower is :class:`HFVisionEncoder`).

    Args:
        image_size: ``(height, width)`` of the images, multiples of ``patch_size``.
        patch_size: Side of the square patches, pixels.
        embed_dim: Width of every frame (``output_dim``).
        num_layers, num_heads, ffn_dim, dropout: The transformer's layers.
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (224, 448),
        patch_size: int = 16,
        embed_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image_size {tuple(image_size)} is not a multiple of patch_size {patch_size}")
        self.image_size = (height, width)
        self.output_dim = embed_dim
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        patches = (height // patch_size) * (width // patch_size)
        self.position = nn.Parameter(torch.zeros(1, patches, embed_dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.encoder = TransformerEncoder(embed_dim, num_layers, num_heads, ffn_dim, dropout, True)

    def top_layers(self, n: int) -> list[nn.Module]:
        return [*self.encoder.layers[-n:], self.encoder.layer_norm]

    def forward(self, ecg: Tensor) -> Tensor:
        x = self.patch_embed(self.pixels(ecg)).flatten(2).transpose(1, 2)
        return self.encoder(x + self.position)


class CNNImageEncoder(ImageECGEncoder):
    """A small convolutional encoder of ECG images: stride-2 3x3 convolutions with batch norm and GELU,
    each cell of the last feature map one frame, ``(batch, cells, channels[-1])``. Fast on a CPU.

    Args:
        image_size: ``(height, width)`` of the images.
        channels: Output channels of each stride-2 stage (the map shrinks 2x per stage).
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (128, 256),
        channels: Sequence[int] = (16, 32, 64, 64, 128),
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        super().__init__()
        if not channels:
            raise ValueError("channels is empty: give at least one stage")
        self.image_size = tuple(image_size)
        self.output_dim = channels[-1]
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        stages, width = [], 3
        for out in channels:
            stages.append(
                nn.Sequential(nn.Conv2d(width, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.GELU())
            )
            width = out
        self.stages = nn.ModuleList(stages)

    def top_layers(self, n: int) -> list[nn.Module]:
        return list(self.stages[-n:])

    def forward(self, ecg: Tensor) -> Tensor:
        x = self.pixels(ecg)
        for stage in self.stages:
            x = stage(x)
        return x.flatten(2).transpose(1, 2)


class HFVisionEncoder(ImageECGEncoder):
    """Any transformers vision tower (SigLIP, CLIP, ViT, DINOv2, ...) over ECG images: its last hidden
    states are the frames.

    Args:
        model: Hub id or folder of a vision model (``google/siglip-base-patch16-224``); with
            ``random_init``, a ``model_type`` such as ``siglip_vision_model``.
        image_size: ``(height, width)`` to feed it (default: the config's square ``image_size``).
        image_mean, image_std: Per-channel normalisation (default: the model's image processor's,
            else 0.5, SigLIP's).
        dtype: Weight dtype.
        random_init: Build the architecture with random weights (tests, training from scratch).
        config_overrides: Config fields to change (a tiny ``hidden_size`` for tests).
        sampling_rate, num_samples, normalization: The signals the printouts are drawn from.
    """

    def __init__(
        self,
        model: str,
        image_size: tuple[int, int] | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        dtype: str = "float32",
        random_init: bool = False,
        config_overrides: dict[str, Any] | None = None,
        sampling_rate: int = 250,
        num_samples: int = 2500,
        normalization: str = "zscore",
    ):
        from transformers import AutoConfig, AutoModel

        super().__init__()
        overrides = dict(config_overrides or {})
        torch_dtype = getattr(torch, dtype)
        config = (
            AutoConfig.from_pretrained(model, **overrides)
            if os.path.isdir(model) or "/" in model
            else AutoConfig.for_model(model, **overrides)
        )
        if hasattr(config, "vision_use_head") and "vision_use_head" not in overrides:
            config.vision_use_head = False  # SigLIP's pooling head: the frames are read, not the pool
        if random_init:
            self.tower = AutoModel.from_config(config, dtype=torch_dtype)
        else:
            self.tower = AutoModel.from_pretrained(model, config=config, dtype=torch_dtype)
            mean, std = _processor_normalisation(model)
            image_mean, image_std = image_mean or mean, image_std or std
        config = self.tower.config
        side = getattr(config, "image_size", 224)
        self.image_size = tuple(image_size) if image_size is not None else (side, side)
        self.image_mean = tuple(image_mean or (0.5, 0.5, 0.5))
        self.image_std = tuple(image_std or (0.5, 0.5, 0.5))
        self.output_dim = config.hidden_size
        self.pretrained = not random_init
        self.preprocessing = Preprocessing(sampling_rate, num_samples, normalization)
        # A SigLIP / CLIP tower interpolates its position embeddings to a non-square printout.
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.tower.forward).parameters

    def top_layers(self, n: int) -> list[nn.Module]:
        encoder = getattr(self.tower, "encoder", None)
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if layers is None:
            return super().top_layers(n)
        return list(layers[-n:])

    def forward(self, ecg: Tensor) -> Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.tower(pixel_values=self.pixels(ecg), **kwargs).last_hidden_state


def _processor_normalisation(model: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The image mean and std of ``model``'s image processor, or ``(None, None)`` without one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError):
        return None, None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


class BackbonePixels(ImageECGEncoder):
    """No encoder of ecglm's own: the images as they are, for a vision-language backbone whose own
    vision tower reads them (:class:`ecglm.backbones.VisionLanguageBackbone`). No parameters.

    :class:`ecglm.model.ECGLM` puts it in the encoder's place when a recipe gives such a backbone and
    no encoder; the images pass the ``passthrough`` connector unchanged.
    """

    def __init__(self, image_size: tuple[int, int], preprocessing: Preprocessing | None = None):
        super().__init__()
        self.image_size = tuple(image_size)
        self.output_dim = 3
        self.pretrained = True  # nothing to save
        self.preprocessing = preprocessing or Preprocessing()

    def forward(self, ecg: Tensor) -> Tensor:
        self.check_images(ecg)
        return ecg
