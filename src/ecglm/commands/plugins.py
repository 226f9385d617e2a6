"""``ecglm plugins``: every registered component with the package and version that provides it."""

from __future__ import annotations


def plugins() -> int:
    """List every registered component (built-ins and installed plugins) and every plugin that failed
    to register, with the reason. Exit status 1 when one failed."""
    from ecglm.plugins import discover, format_registry

    registry = discover()
    print(format_registry(registry))
    return 1 if registry.failures else 0
