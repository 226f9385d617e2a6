"""Portable bundles of a trained ECG-language model: what cannot be rebuilt from public sources.

A bundle is a folder another lab can load with ``ECGLM.from_pretrained(folder)`` and nothing but
ecglm and its dependencies:

- ``ecglm.yaml``: the model's components (``class_path`` + ``init_args``, as the recipe gave them:
  the backbone's hub id or local path, the encoder's checkpoint file), the prompt style, the
  encoder's preprocessing, any few-shot demonstrations, the ecglm version and bundle format, and the
  names of every tensor in the weight files;
- ``model.safetensors``: the trained weights (connector, any trained or randomly initialised part);
- ``adapter/``: LoRA / DoRA adapters in PEFT's own format (``adapter_config.json`` +
  ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base, "adapter")`` loads on
  the same base model without ecglm;
- ``README.md``: the model card.

Loading reads YAML, JSON and safetensors only (never a pickle), and refuses a bundle from a newer
ecglm or format, or whose tensors differ from what the model expects, naming what differs.

Component layer: torch, transformers, peft, safetensors and PyYAML; no Lightning.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from packaging.version import Version
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from ecglm.model import ECGLM

#: Raised by readers when a bundle's layout changes; a reader refuses any newer format.
BUNDLE_FORMAT = 1
CONFIG_FILE = "ecglm.yaml"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_FILE = "README.md"
PARTS = ("encoder", "connector", "backbone", "policy")
#: The key prefix PEFT's own files use for a model's adapters (``PeftModel.save_pretrained``).
PEFT_PREFIX = "base_model.model."


class BundleError(ValueError):
    """A bundle that cannot be written or loaded; the message names the file and what to do."""


def _plain(value: Any) -> Any:
    """YAML-safe data from config nodes (jsonargparse Namespaces, tuples, dataclasses)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def save_bundle(
    model: ECGLM,
    directory: str | Path,
    components: Mapping[str, Any],
    prompt: Mapping[str, Any] | None = None,
    demonstrations: Mapping[str, list[dict[str, str]]] | None = None,
    card: str | None = None,
    report: Mapping[str, Any] | None = None,
    image: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a bundle into ``directory`` (which must not exist yet; written beside it
    and renamed into place, so a crash leaves no half bundle). ``components``: the ``class_path`` /
    ``init_args`` of ``encoder``, ``connector``, ``backbone`` and ``policy``; ``prompt``: the prompt
    style's."""
    from ecglm import __version__

    directory = Path(directory)
    if directory.exists():
        raise BundleError(f"{directory} exists: give a new folder (a bundle is never written over another)")
    # A vision-language backbone reads the images itself: it has no encoder or connector of ecglm's.
    needed = PARTS[2:3] if getattr(model.backbone, "image_size", None) else PARTS[:3]
    missing = [p for p in needed if p not in components]
    if missing:
        raise BundleError(f"components lack {missing}: give each part's class_path and init_args")
    state = model.trainable_state_dict()
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k not in adapters}
    preprocessing = getattr(model.encoder, "preprocessing", None)
    config = {
        "format": BUNDLE_FORMAT,
        "ecglm_version": __version__,
        "components": {p: _plain(components[p]) for p in PARTS if components.get(p) is not None},
        "prompt": _plain(prompt),
        "image": _plain(image),
        "preprocessing": _plain(preprocessing),
        "demonstrations": _plain(demonstrations),
        "weights": sorted(weights),
        "adapters": sorted(adapters),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if adapters:
            _save_adapters(model, staging / ADAPTER_DIR, components)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (staging / CARD_FILE).write_text(card or default_card(config, report))
        _readable(staging)  # mkdtemp's folder (and safetensors' files) are the owner's only
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _readable(folder: Path) -> None:
    """Give the bundle the permissions a folder made with the user's umask would have."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _save_adapters(model: ECGLM, folder: Path, components: Mapping[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    hf = model.backbone.transformers_model
    config = getattr(model.policy, "lora_config", None)
    if hf is None or config is None:
        raise BundleError(
            f"the model has adapter weights but {type(model.policy).__name__} records no LoRA config "
            "(policy.lora_config): only ecglm.peft.LoRA's adapters can be written in PEFT's format"
        )
    backbone_args = _plain(components["backbone"]).get("init_args", {})
    config = type(config)(**{**config.to_dict(), "base_model_name_or_path": backbone_args.get("model")})
    config.revision = backbone_args.get("revision")
    folder.mkdir()
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(hf)
    save_file(
        {PEFT_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
        str(folder / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )


def read_config(directory: str | Path) -> dict[str, Any]:
    """The bundle's ``ecglm.yaml``, checked against this ecglm's version and format."""
    from ecglm import __version__

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"{path} not found: {directory} is not an ecglm bundle (ecglm export writes one)")
    config = yaml.safe_load(path.read_text()) or {}
    made_by = str(config.get("ecglm_version", "0"))
    if int(config.get("format", 0)) > BUNDLE_FORMAT or Version(made_by) > Version(__version__):
        raise BundleError(
            f"{path} was written by ecglm {made_by} (bundle format {config.get('format')}); this is "
            f"ecglm {__version__} (format {BUNDLE_FORMAT}): upgrade ecglm to load it"
        )
    return config


def build(spec: Mapping[str, Any]) -> Any:
    """An object from its ``class_path`` and ``init_args``."""
    module, _, name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise BundleError(
            f"cannot import {spec['class_path']} named by the bundle: install the package that provides it"
        ) from err
    return cls(**dict(spec.get("init_args") or {}))


def load_bundle(directory: str | Path, device: str | torch.device | None = None) -> ECGLM:
    """The model a bundle holds, in eval mode (see the module docstring)."""
    from ecglm.model import ECGLM

    directory = Path(directory)
    config = read_config(directory)
    components = config["components"]
    parts = {p: build(components[p]) if components.get(p) else None for p in PARTS[:3]}
    policy = build(components["policy"]) if components.get("policy") else None
    prompt = build(config["prompt"]) if config.get("prompt") else None
    model = ECGLM(parts["encoder"], parts["connector"], parts["backbone"], policy, prompt)
    expected = model.persistent_keys()
    weights = load_file(str(directory / WEIGHTS_FILE))
    _check_keys(directory / WEIGHTS_FILE, {k for k in expected if not is_adapter_key(k)}, set(weights))
    model.load_state_dict(weights, strict=False)
    wanted_adapters = {k for k in expected if is_adapter_key(k)}
    if wanted_adapters or (directory / ADAPTER_DIR).exists():
        _load_adapters(model, directory / ADAPTER_DIR, wanted_adapters)
    model.demonstrations = config.get("demonstrations")
    if config.get("image"):  # the image path: draw each ECG as the model was trained to read it
        model.printout = build(config["image"])
    model.bundle_config = config
    if device is not None:
        model.to(device)
    return model.eval()


def _load_adapters(model: ECGLM, folder: Path, wanted: set[str]) -> None:
    from peft import set_peft_model_state_dict

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise BundleError(f"{path} not found: the model has {len(wanted)} adapter tensors to load")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    hf = model.backbone.transformers_model
    prefix = next(n for n, m in model.named_modules() if m is hf) + "."
    # PEFT's file leaves out the adapter name (".default") that the model's own keys carry.
    found = {
        prefix + k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        for k in state
    }
    found = {k.replace(".lora_magnitude_vector.", ".lora_magnitude_vector.default.") for k in found}
    _check_keys(path, wanted, found)
    result = set_peft_model_state_dict(hf, state)
    if result.unexpected_keys:
        raise BundleError(f"{path}: tensors the model has no place for: {sorted(result.unexpected_keys)[:5]}")


def _with_adapter_name(key: str) -> str:
    for part in (".lora_A.", ".lora_B.", ".lora_magnitude_vector."):
        key = key.replace(part, f"{part}default.")
    return key


def _check_keys(path: Path, expected: set[str], found: set[str]) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise BundleError(
            f"{path} does not fit the model its ecglm.yaml describes: {len(missing)} tensor(s) missing "
            f"({missing[:5]}), {len(extra)} unexpected ({extra[:5]}); the bundle was altered or written for "
            "other components"
        )


def default_card(config: Mapping[str, Any], report: Mapping[str, Any] | None = None) -> str:
    """A model card: the parts, the base LLM, the headline evaluation (with the no-signal gap) when a
    report is given, intended use, and that this is not a medical device."""
    components = config["components"]
    backbone = components["backbone"].get("init_args", {})
    lines = [
        "---",
        "library_name: ecglm",
        "tags: [ecg, electrocardiogram, ecg-language-model]",
        "---",
        "",
        "# ECG-language model (ecglm bundle)",
        "",
        f"Written by ecglm {config['ecglm_version']}. Load it with `ECGLM.from_pretrained(<this folder>)`.",
        "",
        "## Architecture",
        "",
    ]
    for part in PARTS:
        if components.get(part):
            lines.append(f"- **{part}**: `{components[part]['class_path']}`")
    lines += [
        "",
        f"Base LLM: `{backbone.get('model')}` (not included: downloaded from its hub id or read from the "
        "named folder). Trained weights: `model.safetensors`"
        + (", adapters in PEFT's format: `adapter/`." if config.get("adapters") else "."),
        "",
    ]
    if config.get("preprocessing"):
        pre = config["preprocessing"]
        lines += [f"Input: {pre}", ""]
    if report:
        lines += ["## Evaluation", "", report_table(report), ""]
    lines += [
        "## Intended use",
        "",
        "Research on ECG question answering and report generation. **Not a medical device**: not "
        "validated for clinical use, and its answers must not inform the care of a patient.",
        "",
    ]
    return "\n".join(lines)


def report_table(report: Mapping[str, Any]) -> str:
    """ACC (mean ± std over seeds) per dataset and condition, and the gap against each control, from an
    ``ecglm evaluate`` report.json."""
    summary = report["summary"]
    conditions = list(summary["conditions"])
    datasets = list(summary["conditions"]["ecg"]["datasets"])
    lines = [
        "| Dataset | "
        + " | ".join(f"ACC `{c}`" for c in conditions)
        + " | "
        + " | ".join(f"gap `{g.replace('_minus_', ' - ')}`" for g in summary.get("gaps", {}))
        + " |"
    ]
    lines.append("|---|" + "---:|" * (len(conditions) + len(summary.get("gaps", {}))))

    def pct(stat: Mapping[str, float] | None) -> str:
        return "-" if not stat else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"

    for d in datasets:
        cells = [pct(summary["conditions"][c]["datasets"].get(d, {}).get("acc")) for c in conditions]
        cells += [pct(g.get(d, {}).get("acc")) for g in summary.get("gaps", {}).values()]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
