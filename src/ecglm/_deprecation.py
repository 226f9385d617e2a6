"""Deprecation periods for ecglm's public API (see ``docs/api.md``).

A public name that moves, is renamed or is replaced keeps working for one minor version: using it
warns with a :class:`DeprecationWarning` that names its new place and the release that removes it.
Modules hand their moved names to :func:`moved_names`, which gives the module ``__getattr__`` (PEP
562) that resolves them on first use, so nothing is imported before an old name is asked for.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

#: The release that removes what 0.2.0 deprecated.
REMOVED_IN = "0.3.0"
#: The release that deprecated it.
SINCE = "0.2.0"


def warn_deprecated(old: str, new: str, removed_in: str = REMOVED_IN, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated, naming ``new`` (where it went, or what replaces it)."""
    warnings.warn(
        f"{old} is deprecated since ecglm {SINCE} and will be removed in ecglm {removed_in}: use {new} "
        "(docs/api.md, CHANGELOG.md)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def moved_names(
    module: str, moved: Mapping[str, str | tuple[str, str]], removed_in: str = REMOVED_IN
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that left ``module``.

    ``moved`` maps each old name to ``"package.module:Name"`` (its new place, whose object is
    returned), or to ``("package.module:Name", "what to use instead")`` when the object returned is a
    compatibility stand-in rather than the new API itself.
    """

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        path, instead = target if isinstance(target, tuple) else (target, target.replace(":", "."))
        warn_deprecated(f"{module}.{name}", instead, removed_in)
        where, _, attribute = path.partition(":")
        return getattr(importlib.import_module(where), attribute)

    return __getattr__


def forward_deprecated(old: str, new: str, removed_in: str = REMOVED_IN) -> Callable[..., Any]:
    """The function at ``new`` (``"package.module:function"``), after warning that ``old`` is deprecated:
    for a deprecated method that forwards to where its job went. Resolved here, by name, so that a
    lower layer's shim does not import the layer above it (the shim goes in ``removed_in``)."""
    where, _, attribute = new.partition(":")
    warn_deprecated(old, f"{where}.{attribute}", removed_in, stacklevel=4)
    return getattr(importlib.import_module(where), attribute)
