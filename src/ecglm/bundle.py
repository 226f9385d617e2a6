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

A bundle is untrusted input, as a model repository is for transformers: loading it runs no code of
the bundle's choosing (:func:`check_bundle`, before the LLM loads):

- every file is checked against the size and sha256 ``ecglm.yaml`` records (a changed byte, a
  truncated or renamed file, an extra file: refused, naming the file and both digests);
- every class it names must be one that an installed distribution registers for that part (ecglm's
  own, or a plugin the user installed: :mod:`ecglm.plugins`), of the part's base class;
- arguments that load files outside the bundle, allow pickles or run a repository's code
  (``checkpoint``, ``trust_pickle``, ``trust_remote_code``, absolute or ``..`` paths, a local
  folder as the base LLM) are not honoured: the user gives them at load time (``overrides``);
- it reads YAML, JSON and safetensors only (never a pickle).

``trust_remote_code=True`` lifts the class and argument rules (not the digests) for bundles whose
author the user trusts. A bundle from a newer ecglm or format, or whose tensors differ from what the
model expects, is refused naming what differs.

Component layer: torch, transformers, peft, safetensors and PyYAML; no Lightning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from packaging.version import Version
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ecglm.errors import EcglmError

if TYPE_CHECKING:
    from ecglm.model import ECGLM

#: Raised by readers when a bundle's layout changes; a reader refuses any newer format. 2: ``files``
#: records every file's size and sha256.
BUNDLE_FORMAT = 2
CONFIG_FILE = "ecglm.yaml"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_FILE = "README.md"
PARTS = ("encoder", "connector", "backbone", "policy")
#: The entry-point group each section of ``ecglm.yaml`` names its class from.
GROUPS = {
    "encoder": "ecglm.encoders",
    "connector": "ecglm.connectors",
    "backbone": "ecglm.backbones",
    "policy": "ecglm.peft",
    "prompt": "ecglm.prompts",
    "image": "ecglm.printouts",
}
#: Arguments a bundle cannot set for its user, and why: each runs code or reads files from elsewhere.
UNSAFE_ARGUMENTS = {
    "trust_remote_code": "runs code from the model's repository",
    "trust_pickle": "unpickles a checkpoint, which runs code",
    "checkpoint": "loads a file from outside the bundle",
}
#: Arguments that name a pretrained model: a hub id or an installed package (``pkg:NAME``) from a
#: bundle; a local folder only from the user.
MODEL_ARGUMENTS = ("model", "tokenizer")
#: The key prefix PEFT's own files use for a model's adapters (``PeftModel.save_pretrained``).
PEFT_PREFIX = "base_model.model."


class BundleError(EcglmError, ValueError):
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
    training: list[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``model`` as a bundle into ``directory`` (which must not exist yet; written beside it
    and renamed into place, so a crash leaves no half bundle). ``components``: the ``class_path`` /
    ``init_args`` of ``encoder``, ``connector``, ``backbone`` and ``policy``; ``prompt``: the prompt
    style's; ``training``: the training stages that produced the weights (SFT, GRPO, DPO; in the card)."""
    from ecglm.version import __version__

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
        "training": _plain(training),
        "weights": sorted(weights),
        "adapters": sorted(adapters),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if adapters:
            _save_adapters(model, staging / ADAPTER_DIR, components)
        (staging / CARD_FILE).write_text(card or default_card(config, report))
        config["files"] = file_digests(staging)  # every file but ecglm.yaml, which holds the digests
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
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


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``directory`` but ``ecglm.yaml``, by relative path."""
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in bundle_files(directory)
    }


def bundle_files(directory: Path) -> list[str]:
    """Relative paths of every file under ``directory`` but ``ecglm.yaml``, sorted."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in names if name != CONFIG_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(directory: str | Path) -> dict[str, Any]:
    """The bundle's ``ecglm.yaml``, checked against this ecglm's version and format."""
    from ecglm.version import __version__

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"{path} not found: {directory} is not an ecglm bundle (ecglm export writes one)")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BundleError(
            f"{path}: not readable YAML ({type(err).__name__}); the bundle is damaged"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("components"), dict):
        raise BundleError(f"{path}: no components section; the bundle is damaged or not an ecglm bundle")
    made_by = str(config.get("ecglm_version", "0"))
    try:
        newer = int(config.get("format", 0)) > BUNDLE_FORMAT or Version(made_by) > Version(__version__)
    except (ValueError, TypeError):
        raise BundleError(
            f"{path}: format {config.get('format')!r} / version {made_by!r} unreadable"
        ) from None
    if newer:
        raise BundleError(
            f"{path} was written by ecglm {made_by} (bundle format {config.get('format')}); this is "
            f"ecglm {__version__} (format {BUNDLE_FORMAT}): upgrade ecglm to load it"
        )
    return config


def verify_files(directory: Path, config: Mapping[str, Any]) -> None:
    """Every file the bundle holds, against the size and sha256 ``ecglm.yaml`` records for it."""
    recorded = config.get("files")
    if recorded is None:
        warnings.warn(
            f"{directory / CONFIG_FILE} was written by ecglm {config.get('ecglm_version')} (bundle format "
            f"{config.get('format')}), which recorded no file digests: its files cannot be checked. "
            "Re-export it with this ecglm to have them checked.",
            UserWarning,
            stacklevel=3,
        )
        return
    unlisted = sorted(set(bundle_files(directory)) - set(recorded))
    if unlisted:
        raise BundleError(
            f"{directory / unlisted[0]} is not one of the files {directory / CONFIG_FILE} lists: a file was "
            f"added to the bundle ({len(unlisted)} in all); remove it, or ask the sender for the bundle"
        )
    for name, entry in recorded.items():
        path = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            raise BundleError(f"{path}: listed in {CONFIG_FILE} but missing; the bundle is incomplete")
        size = path.stat().st_size
        found = _sha256(path)
        if size != entry.get("size") or found != entry.get("sha256"):
            raise BundleError(
                f"{path} does not match {CONFIG_FILE}: expected sha256 {entry.get('sha256')} "
                f"({entry.get('size')} bytes), found {found} ({size} bytes); the file was changed or "
                "damaged after export: ask the sender for it again"
            )


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["backbone.model=/models/x", "encoder.checkpoint=ecg-fm.pt"]`` as ``{part: {key: value}}``
    (values parsed as YAML scalars: ``true``, ``3``, ``null``)."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        part, dot, name = key.partition(".")
        if not sep or not dot or part not in GROUPS or not name:
            raise BundleError(
                f"--override {item!r}: write PART.KEY=VALUE with PART one of {', '.join(GROUPS)} "
                "(e.g. backbone.model=/models/smollm2)"
            )
        overrides.setdefault(part, {})[name] = yaml.safe_load(value) if value else value
    return overrides


def check_bundle(
    directory: str | Path,
    trust_remote_code: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``ecglm.yaml`` once the bundle is known to be safe to load (see the module docstring), with the
    user's ``overrides`` (``{part: {argument: value}}``) applied: what :func:`load_bundle` builds. Cheap:
    it reads the files and imports only registered components' modules, and loads no model."""
    directory = Path(directory)
    config = read_config(directory)
    verify_files(directory, config)
    for path in sorted(directory.rglob("*.safetensors")):  # headers only: cheap, before any model
        _check_safetensors(path)
    overrides = {part: dict(args) for part, args in (overrides or {}).items()}
    for part, spec in _sections(config):
        given = overrides.pop(part, {})
        if not trust_remote_code:  # the bundle's own values; what the user gives replaces them
            _check_spec(directory, part, spec, skip=set(given))
        if given:
            spec["init_args"] = {**(spec.get("init_args") or {}), **given}
    if overrides:
        raise BundleError(f"--override names {sorted(overrides)}, which this bundle has no section for")
    return config


def _sections(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sections = [(p, config["components"][p]) for p in PARTS if config["components"].get(p)]
    sections += [(p, config[p]) for p in ("prompt", "image") if config.get(p)]
    for part, spec in sections:
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
            raise BundleError(f"{CONFIG_FILE}: {part} has no class_path; the bundle is damaged")
    return sections


def _check_spec(directory: Path, part: str, spec: Mapping[str, Any], skip: set[str]) -> None:
    from ecglm.plugins import UntrustedComponentError, component_class

    where = f"{directory / CONFIG_FILE}: {part}"
    try:
        component_class(spec["class_path"], GROUPS[part], registered_only=True)
    except UntrustedComponentError as err:
        raise BundleError(f"{where}.class_path: {err}") from None
    except ValueError as err:
        raise BundleError(f"{where}.class_path: {err}") from None
    for key, value in (spec.get("init_args") or {}).items():
        reason = None if key in skip else _unsafe_argument(key, value)
        if reason is not None:
            raise BundleError(
                f"{where}.init_args.{key} = {value!r} is not honoured from a bundle: it {reason}. Give it "
                f"yourself if you trust it (overrides={{'{part}': {{'{key}': ...}}}}, ecglm ask --override "
                f"{part}.{key}=...), or load with trust_remote_code=True"
            )


def _unsafe_argument(key: str, value: Any) -> str | None:
    """Why a bundle may not set ``key`` to ``value`` (``None``: it may)."""
    if key in UNSAFE_ARGUMENTS and value not in (None, False):
        return UNSAFE_ARGUMENTS[key]
    for text in _strings(value):
        path = Path(os.path.expanduser(text)) if text.startswith("~") else Path(text)
        if text.startswith("~") or path.is_absolute() or ".." in path.parts:
            return "names a file outside the bundle"
        if key in MODEL_ARGUMENTS and not text.startswith("pkg:") and path.exists():
            return "names a local folder as the model (a bundle names a hub id or pkg:PACKAGE)"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _build(spec: Mapping[str, Any], part: str, trust_remote_code: bool) -> Any:
    from ecglm.plugins import build_component

    return build_component(spec, GROUPS[part], registered_only=not trust_remote_code)


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(
            f"{path}: not a readable safetensors file ({first}); the bundle is damaged"
        ) from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BundleError(f"{path} not found: the bundle is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(
            f"{path}: not a readable safetensors file ({first}); the bundle is damaged"
        ) from None


def load_bundle(
    directory: str | Path,
    device: str | torch.device | None = None,
    *,
    model_class: type[ECGLM],
    trust_remote_code: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> ECGLM:
    """The model a bundle holds, in eval mode, as ``model_class`` (``ECGLM.from_pretrained`` passes
    itself: this module never imports the model); see the module docstring and :func:`check_bundle`."""
    directory = Path(directory)
    config = check_bundle(directory, trust_remote_code, overrides)
    weights = _read_weights(directory / WEIGHTS_FILE)  # before the LLM loads: a damaged file fails fast
    components = config["components"]
    parts = {p: _build(components[p], p, trust_remote_code) if components.get(p) else None for p in PARTS}
    prompt = _build(config["prompt"], "prompt", trust_remote_code) if config.get("prompt") else None
    model = model_class(parts["encoder"], parts["connector"], parts["backbone"], parts["policy"], prompt)
    expected = model.persistent_keys()
    _check_keys(directory / WEIGHTS_FILE, {k for k in expected if not is_adapter_key(k)}, set(weights))
    model.load_state_dict(weights, strict=False)
    wanted_adapters = {k for k in expected if is_adapter_key(k)}
    if wanted_adapters or (directory / ADAPTER_DIR).exists():
        _load_adapters(model, directory / ADAPTER_DIR, wanted_adapters)
    model.demonstrations = config.get("demonstrations")
    model.training_stages = config.get("training")
    if config.get("image"):  # the image path: draw each ECG as the model was trained to read it
        model.printout = _build(config["image"], "image", trust_remote_code)
    model.bundle_config = config
    if device is not None:
        model.to(device)
    return model.eval()


def _load_adapters(model: ECGLM, folder: Path, wanted: set[str]) -> None:
    from peft import set_peft_model_state_dict

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise BundleError(f"{path} not found: the model has {len(wanted)} adapter tensors to load")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in _read_weights(path).items()}
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
    if config.get("training"):
        lines += [f"Training: {describe_stages(config['training'])}.", ""]
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


def describe_stages(stages: list[Mapping[str, Any]]) -> str:
    """``SFT -> GRPO (from runs/quickstart/checkpoints/last.ckpt)``: the training stages, oldest first."""
    parts = []
    for stage in stages:
        text = str(stage.get("stage", "?")).upper()
        parts.append(f"{text} (from `{stage['init_from']}`)" if stage.get("init_from") else text)
    return " -> ".join(parts)


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
