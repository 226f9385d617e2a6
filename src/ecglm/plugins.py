"""Discovery of components through Python entry points.

ecglm's own encoders, connectors, backbones and PEFT policies are registered in its
``pyproject.toml`` exactly as a third-party package registers its own, under the groups in
:data:`GROUPS`. Loading is safe to repeat, and a plugin that fails to import is reported with its
distribution and error without breaking the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

log = logging.getLogger(__name__)

#: Entry-point group of each component family, keyed by the model argument it fills.
GROUPS = {
    "encoder": "ecglm.encoders",
    "connector": "ecglm.connectors",
    "backbone": "ecglm.backbones",
    "policy": "ecglm.peft",
}


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


@dataclass
class PluginFailure:
    plugin: Plugin
    error: str


@dataclass
class Registry:
    plugins: dict[str, dict[str, Plugin]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def names(self, group: str) -> list[str]:
        return sorted(self.plugins.get(group, {}))

    def class_path(self, group: str, name: str) -> str | None:
        plugin = self.plugins.get(group, {}).get(name)
        return plugin.class_path if plugin else None


def _describe(group: str, ep: EntryPoint) -> Plugin:
    dist = ep.dist
    return Plugin(group, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")


def _load_error(ep: EntryPoint) -> str | None:
    try:
        ep.load()
    except Exception as err:  # a broken plugin must not take the others down
        return f"{type(err).__name__}: {err}"
    return None


def discover(load: bool = True) -> Registry:
    """Every entry point of the ecglm groups; with ``load``, each is imported and checked.

    Entry points are re-read on each call (cheap), so plugins installed after start-up are seen.
    """
    registry = Registry()
    for group in GROUPS.values():
        registry.plugins[group] = {}
        for ep in entry_points(group=group):
            plugin = _describe(group, ep)
            error = _load_error(ep) if load else None
            taken = registry.plugins[group].get(plugin.name)
            if error is None and taken is not None:
                error = (
                    f"name already registered by {taken.distribution} {taken.version} ({taken.class_path})"
                )
            if error is not None:
                registry.failures.append(PluginFailure(plugin, error))
                log.warning(
                    "ecglm plugin %r (%s) from %s %s was not registered: %s",
                    *(plugin.name, group, plugin.distribution, plugin.version, error),
                )
                continue
            registry.plugins[group][plugin.name] = plugin
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


class UnknownComponentError(ValueError):
    pass


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
            f"{f.plugin.version}, which failed to load: {f.error}"
        )
    known = ", ".join(registry.names(group)) or "none"
    raise UnknownComponentError(
        f"unknown {group} component {name!r} at {where}.class_path; registered names: {known} "
        "(or give a full import path such as my_package.MyClass; `ecglm plugins` lists everything)"
    )


def resolve_cli_args(args: list[str], registry: Registry) -> list[str]:
    """Resolve entry-point names given on the command line (``--model.encoder.class_path s4d``).

    The YAML loader resolves names inside recipes; flags bypass it, so they are rewritten here.
    """
    out = list(args)
    for i, arg in enumerate(out):
        for part, group in GROUPS.items():
            flag = f"--model.{part}.class_path"
            where = f"model.{part}"
            if arg.startswith(flag + "="):
                out[i] = f"{flag}={_resolve_name(arg.split('=', 1)[1], group, registry, where)}"
            elif arg == flag and i + 1 < len(out):
                out[i + 1] = _resolve_name(out[i + 1], group, registry, where)
    return out
