"""Where a backbone's files come from, and what they are read as.

:func:`resolve_model_path` turns ``pkg:NAME`` and local paths into what transformers reads;
:func:`load_hf_config` reads the transformers config of a hub id, a folder, a GGUF file or a random
architecture (``model_type`` with ``random_init``) without any weights, the one code path behind
:meth:`ecglm.backbones.HFBackbone.load_config`; :func:`torch_dtype` names the dtypes a backbone runs in.

Component layer: torch and transformers only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from transformers import AutoConfig, PreTrainedConfig

from ecglm.errors import EcglmError
from ecglm.io import resolve_pkg

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["nf4", "fp4"]


def resolve_model_path(model: str) -> str:
    """``pkg:NAME`` names the model files of an installed Python package (:func:`ecglm.io.resolve_pkg`).

    A value that can only be a local path (``/abs``, ``./rel``, ``../rel``, ``~/...``, or more than
    one ``/``; a hub id is ``org/name``) must exist: transformers would call it a malformed repo id.
    """
    if not model.startswith("pkg:"):
        return _local_path(model) if _is_local_path(model) else model
    return resolve_pkg(model)


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


class BackboneConfigError(EcglmError, ValueError):
    """A backbone's config cannot be built from what the recipe gives (a missing argument, an override
    the config has no field for)."""


def load_hf_config(
    model: str,
    gguf_file: str | None = None,
    random_init: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedConfig:
    """The transformers config of ``model`` with ``config_overrides`` applied, read without any weights.

    ``model`` is a hub id (read from the local cache when offline), a folder, ``pkg:NAME``, or with
    ``random_init`` a ``model_type`` such as ``"llama"`` (then nothing is read). With ``gguf_file`` the
    config is read from that GGUF file inside ``model``. Raises ``FileNotFoundError`` for a local path
    that does not exist, ``OSError`` when transformers cannot read the config (a hub id offline and not
    cached), :class:`BackboneConfigError` for an override the config has no field for.
    """
    path = resolve_model_path(model)
    overrides = dict(config_overrides or {})
    if random_init and not os.path.exists(path) and "/" not in path:
        return AutoConfig.for_model(path, **overrides)
    config, unused = AutoConfig.from_pretrained(
        path, gguf_file=gguf_file, trust_remote_code=trust_remote_code, return_unused_kwargs=True, **overrides
    )
    unknown = sorted(set(unused) & set(overrides))
    if unknown:
        raise BackboneConfigError(
            f"config_overrides {unknown} are not fields of the {config.model_type} config of {model!r}: "
            "check their names against its config.json"
        )
    return config
