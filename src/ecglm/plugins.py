"""Discovery of components through Python entry points.

ecglm's own encoders, connectors, backbones and PEFT policies are registered in its
``pyproject.toml`` exactly as a third-party package registers its own, under the groups in
:data:`GROUPS`. Loading is safe to repeat, and a plugin that fails to import, is not a valid
component, or clashes with another's name is reported with its distribution and the reason
without breaking the others. ecglm's own names always win; two plugins that claim the same name
are both refused. :func:`component_provenance` says which distribution provides a component.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, packages_distributions, version
from typing import Any

from ecglm.errors import EcglmError

log = logging.getLogger(__name__)

#: Entry-point group of each component family, keyed by the argument it fills (a data set: the
#: DataModule's ``builder``).
GROUPS = {
    "encoder": "ecglm.encoders",
    "connector": "ecglm.connectors",
    "backbone": "ecglm.backbones",
    "policy": "ecglm.peft",
    "prompt": "ecglm.prompts",
    "judge": "ecglm.judges",
    "printout": "ecglm.printouts",
    "reader": "ecglm.readers",
    "objective": "ecglm.objectives",
    "reward": "ecglm.rewards",
    "builder": "ecglm.sources",
}

#: Keys whose value is a list of components of one group (a recipe weights several rewards).
LIST_GROUPS = {"rewards": "ecglm.rewards"}

#: Where each group's component sits in the CLI's config (the prompt style is the data side's, the
#: judge the evaluation protocol's).
CLI_PLACES = {part: (f"model.{part}",) for part in GROUPS} | {
    "prompt": ("data.prompt", "data.init_args.prompt"),
    "judge": ("evaluate.judge",),
    "printout": ("data.image", "data.init_args.image"),
    "reader": (),  # no recipe key: a file is offered to every reader (ecglm.records)
    "reward": (),  # listed under model.objective.init_args.rewards
    "builder": ("data.init_args.builder", "builder"),  # a recipe's data set; `ecglm shard --builder`
}

#: The base class every component of a group derives from, imported only when a plugin is checked.
BASE_CLASSES = {
    "ecglm.encoders": "ecglm.encoders:ECGEncoder",
    "ecglm.connectors": "ecglm.connectors:Connector",
    "ecglm.backbones": "ecglm.backbones:Backbone",
    "ecglm.peft": "ecglm.peft:PEFTPolicy",
    "ecglm.prompts": "ecglm.prompts:PromptStyle",
    "ecglm.judges": "ecglm.judges:Judge",
    "ecglm.printouts": "ecglm.render:ECGPrintout",
    "ecglm.readers": "ecglm.readers:ECGReader",
    "ecglm.objectives": "ecglm.objectives.base:Objective",
    "ecglm.rewards": "ecglm.rewards:Reward",
    "ecglm.sources": "ecglm.data.source:ShardSource",
}

#: The distribution whose entry points are the built-ins, which no plugin can replace.
OWN_DISTRIBUTION = "ecglm"


@dataclass(frozen=True)
class Plugin:
    group: str
    name: str
    target: str  # "module:Class"
    distribution: str
    version: str

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")

    @property
    def is_builtin(self) -> bool:
        return self.distribution == OWN_DISTRIBUTION

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.class_path})"


@dataclass
class PluginFailure:
    plugin: Plugin
    error: str
    reason: str = "failed to load"  # completes "comes from DIST VERSION, which ..."


@dataclass
class Registry:
    plugins: dict[str, dict[str, Plugin]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def names(self, group: str) -> list[str]:
        return sorted(self.plugins.get(group, {}))

    def class_path(self, group: str, name: str) -> str | None:
        plugin = self.plugins.get(group, {}).get(name)
        return plugin.class_path if plugin else None

    def fail(self, plugin: Plugin, error: str, reason: str) -> None:
        self.failures.append(PluginFailure(plugin, error, reason))
        log.warning(
            "ecglm plugin %r (%s) from %s %s was not registered: %s",
            *(plugin.name, plugin.group, plugin.distribution, plugin.version, error),
        )


def _describe(group: str, ep: EntryPoint) -> Plugin:
    dist = ep.dist
    return Plugin(group, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")


def _load_error(ep: EntryPoint, group: str) -> str | None:
    try:
        loaded = ep.load()
    except Exception as err:  # a broken plugin must not take the others down
        return f"{type(err).__name__}: {err}"
    return component_error(loaded, group)


def component_error(obj: object, group: str) -> str | None:
    """Why ``obj`` cannot be a component of ``group`` (not a class, wrong base, abstract), or ``None``."""
    base = base_class(group)
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    where = public_class_path(obj) if inspect.isclass(obj) else name
    if not inspect.isclass(obj):
        return f"{where} is a {type(obj).__name__}, not a class"
    if not issubclass(obj, base):
        return f"{where} is not a subclass of {public_class_path(base)}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        return f"{where} is abstract: it does not implement {missing}"
    return None


def _ranked(candidates: Iterable[Plugin]) -> list[Plugin]:
    """ecglm's own entry first, the rest by distribution: the same order whatever the discovery order."""
    return sorted(candidates, key=lambda p: (not p.is_builtin, p.distribution, p.version, p.target))


def _claim(registry: Registry, found: dict[Plugin, EntryPoint], load: bool) -> None:
    """Register the one entry point that may hold its name, and report the refused ones."""
    first, *others = _ranked(found)
    if others and not first.is_builtin:
        listed = "; ".join(str(p) for p in (first, *others))
        for plugin in (first, *others):
            error = (
                f"name {plugin.name!r} is registered by more than one distribution: {listed}. Uninstall "
                "all but one, or name the class by its full import path"
            )
            registry.fail(plugin, error, "clashes with another plugin")
        return
    for plugin in others:
        error = (
            f"name {plugin.name!r} is already registered by ecglm's own {first}; a plugin cannot replace it"
        )
        registry.fail(plugin, error, "was refused")
    error = _load_error(found[first], first.group) if load else None
    if error is not None:
        registry.fail(first, error, "failed to load")
        return
    registry.plugins[first.group][first.name] = first


def discover(load: bool = True, groups: Iterable[str] | None = None) -> Registry:
    """Every entry point of the ecglm groups (or of ``groups`` only); with ``load``, each is imported
    and checked.

    Entry points are re-read on each call (cheap), so plugins installed after start-up are seen.
    """
    registry = Registry()
    for group in GROUPS.values() if groups is None else groups:
        registry.plugins[group] = {}
        by_name: dict[str, dict[Plugin, EntryPoint]] = {}
        for ep in entry_points(group=group):
            by_name.setdefault(ep.name, {})[_describe(group, ep)] = ep
        for name in sorted(by_name):
            _claim(registry, by_name[name], load)
    return registry


def format_registry(registry: Registry) -> str:
    """A table of every group's entries, then the failures."""
    lines = []
    for group, plugins in registry.plugins.items():
        lines.append(f"{group}:")
        if not plugins:
            lines.append("  (none)")
        for name in sorted(plugins):
            p = plugins[name]
            lines.append(f"  {name:<20} {p.class_path:<50} {p.distribution} {p.version}")
    for failure in registry.failures:
        p = failure.plugin
        lines.append(f"FAILED {p.group} {p.name!r} from {p.distribution} {p.version}: {failure.error}")
    return "\n".join(lines)


class UnknownComponentError(EcglmError, ValueError):
    """A component name or class path that no registry entry or import path provides."""


class UntrustedComponentError(EcglmError, ValueError):
    """A class named by untrusted input (a bundle) that no installed entry point registers."""


def import_object(path: str) -> Any:
    """The object a dotted (``package.module.Name``) or entry-point style (``package.module:Name``)
    path names; the one place ecglm turns a class path into a class."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise UnknownComponentError(f"{path!r} is not an import path (package.module.Name)")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UnknownComponentError(
            f"cannot import {path}: {err}; install the package that provides it or correct the path"
        ) from None


def base_class(group: str) -> type:
    """The class every component of ``group`` (``ecglm.encoders``, ...) derives from."""
    return import_object(BASE_CLASSES[group])


def component_class(
    class_path: str, group: str, registry: Registry | None = None, registered_only: bool = False
) -> type:
    """The class of a ``group`` component named by entry-point name or import path, checked against the
    group's base class. ``registered_only``: the class must be one that an installed distribution
    registers under ``group`` (ecglm's own, or a plugin the user installed) -- for class paths read
    from untrusted files such as bundles, where importing an arbitrary module would run its code."""
    registry = registry or discover()
    path = _resolve_name(class_path, group, registry, group)
    if registered_only:
        registered = {p.class_path for p in registry.plugins.get(group, {}).values()}
        if path not in registered:
            known = ", ".join(registry.names(group)) or "none"
            raise UntrustedComponentError(
                f"{class_path!r} is not a registered {group} component (registered: {known}); a bundle may "
                "only name components of installed packages. Install the plugin that provides it, or load "
                "with trust_remote_code=True (--trust-remote-code) if you trust the bundle's author"
            )
    cls = import_object(path)
    error = component_error(cls, group)
    if error is not None:
        raise UnknownComponentError(f"{class_path}: {error}")
    return cls


def build_component(
    spec: Mapping[str, Any], group: str, registry: Registry | None = None, **kwargs: Any
) -> Any:
    """A ``group`` component from its config node (``class_path`` + ``init_args``); ``kwargs`` go to
    :func:`component_class`."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class_path"), str):
        raise UnknownComponentError(f"a {group} component needs a class_path (and init_args), got {spec!r}")
    cls = component_class(spec["class_path"], group, registry, **kwargs)
    return cls(**dict(spec.get("init_args") or {}))


def resolve_class_paths(config: object, registry: Registry, path: str = "") -> object:
    """Replace entry-point names in ``class_path`` values by full import paths, recursively.

    Under the keys of :data:`GROUPS` (``encoder``, ``connector``, ...), a name that is neither an
    entry point, nor a dotted import path, is an error listing what is registered.
    """
    if isinstance(config, list):
        return [resolve_class_paths(v, registry, f"{path}[{i}]") for i, v in enumerate(config)]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        where = f"{path}.{key}" if path else str(key)
        out[key] = resolve_class_paths(value, registry, where)
        if isinstance(value, dict) and isinstance(value.get("class_path"), str) and key in GROUPS:
            out[key]["class_path"] = _resolve_name(value["class_path"], GROUPS[key], registry, where)
        if isinstance(value, list) and key in LIST_GROUPS:
            for i, item in enumerate(value):
                if isinstance(item, dict) and isinstance(item.get("class_path"), str):
                    name = _resolve_name(item["class_path"], LIST_GROUPS[key], registry, f"{where}[{i}]")
                    out[key][i]["class_path"] = name
    return out


def _resolve_name(name: str, group: str, registry: Registry, where: str) -> str:
    if "." in name:
        return name
    found = registry.class_path(group, name)
    if found:
        return found
    by_class_name = [
        p.class_path for p in registry.plugins.get(group, {}).values() if p.class_path.endswith("." + name)
    ]
    if by_class_name:
        return by_class_name[0]
    failed = [f for f in registry.failures if f.plugin.group == group and f.plugin.name == name]
    if failed:
        f = failed[0]
        raise UnknownComponentError(
            f"{group} component {name!r} at {where}.class_path comes from {f.plugin.distribution} "
            f"{f.plugin.version}, which {f.reason}: {f.error}"
        )
    known = ", ".join(registry.names(group)) or "none"
    raise UnknownComponentError(
        f"unknown {group} component {name!r} at {where}.class_path; registered names: {known} "
        "(or give a full import path such as my_package.MyClass; `ecglm plugins` lists everything)"
    )


def resolve_cli_args(args: list[str], registry: Registry) -> list[str]:
    """Resolve entry-point names given on the command line.

    The YAML loader resolves names inside recipes; flags bypass it, so they are rewritten here: the
    ``class_path`` of each group (``--model.encoder.class_path s4d``), its ``help`` (jsonargparse's
    help for one class), and the short form ``--model.encoder s4d`` / ``--model.policy=lora``.
    """
    out = list(args)
    for i, arg in enumerate(out):
        for part, group in GROUPS.items():
            for where in CLI_PLACES[part]:
                for flag in (f"--{where}.class_path", f"--{where}.help", f"--{where}"):
                    short = flag == f"--{where}"  # --model.policy lora: only a name is rewritten
                    if arg.startswith(flag + "="):
                        value = arg.split("=", 1)[1]
                        if not short or _is_short_name(value):
                            out[i] = f"{flag}={_resolve_name(value, group, registry, where)}"
                    elif arg == flag and i + 1 < len(out) and (not short or _is_short_name(out[i + 1])):
                        out[i + 1] = _resolve_name(out[i + 1], group, registry, where)
    return out


#: YAML's words for no value and for booleans: ``--data.init_args.builder null`` unsets a component.
_YAML_WORDS = {"null", "none", "true", "false", "yes", "no", "on", "off"}


def _is_short_name(value: str) -> bool:
    """An entry-point name (``lora``), not a config file, a JSON/YAML node, YAML's ``null`` or an import
    path."""
    if value.lower() in _YAML_WORDS:
        return False
    return bool(value) and value.replace("-", "").replace("_", "").isalnum()


def component_provenance(*components: object) -> dict[str, dict[str, str]]:
    """Per component's class path: that path, and the distribution and version that provide it.

    Looked up in the entry-point registry first, then by the distribution that installed the
    class's top-level package; ``"unknown"`` for a class no installed distribution provides
    (defined in a script or a test). For checkpoints, so that a run records which plugins it used.
    """
    registered = {p.class_path: p for group in discover(load=False).plugins.values() for p in group.values()}
    out = {}
    for component in components:
        cls = type(component)
        class_path = public_class_path(cls)
        plugin = registered.get(class_path)
        dist, ver = (plugin.distribution, plugin.version) if plugin else _module_distribution(cls.__module__)
        out[class_path] = {"class_path": class_path, "distribution": dist, "version": ver}
    return out


def public_class_path(cls: type) -> str:
    """``package.Class`` by the package that re-exports it: ``ecglm.encoders.Wav2Vec2ECGEncoder`` for the
    class defined in ``ecglm.encoders.wav2vec2``, so that splitting a module into files changes no path
    a checkpoint or a message records (and a registered class is found under its entry point's path)."""
    parts = cls.__module__.split(".")
    path = f"{cls.__module__}.{cls.__qualname__}"
    for end in range(len(parts) - 1, 0, -1):
        parent = sys.modules.get(".".join(parts[:end]))
        if parent is None or vars(parent).get(cls.__qualname__) is not cls:  # vars: no moved-name warning
            break
        path = f"{parent.__name__}.{cls.__qualname__}"
    return path


def _module_distribution(module: str) -> tuple[str, str]:
    top = module.split(".")[0]
    dists = packages_distributions().get(top, [])
    for dist in dists:
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    own = sys.modules.get(OWN_DISTRIBUTION)
    if top == OWN_DISTRIBUTION and own is not None:  # an editable install may not list its modules
        return OWN_DISTRIBUTION, own.__version__
    return "unknown", "unknown"
