"""Which optional fast kernels a transformers model runs on (Qwen3.5's Gated DeltaNet, ...).

transformers does not report this; it is read from the closures of its kernel-fallback functions, an
internal detail: a release that changes them gives an empty report and a warning, never an error.
"""

from __future__ import annotations

import inspect
import logging
import sys

from torch import nn

log = logging.getLogger(__name__)

#: Python packages of optional fast kernels, and the distributions that ship them.
KERNEL_DISTRIBUTIONS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def kernel_bindings(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """``(kernel, package, implementation)`` for each optional fast kernel of ``model``.

    transformers binds such kernels (Qwen3.5's Gated DeltaNet: ``chunk_gated_delta_rule`` from
    flash-linear-attention's package ``fla``, ``causal_conv1d_fn`` from ``causal_conv1d``, ...) when
    it imports the modeling file, through ``use_kernel_func_from_hub_with_fallback``: the package's
    function if it imports, else the PyTorch reference. ``implementation`` is ``"module.function"``,
    or ``None`` for the PyTorch reference. Models without such kernels give ``[]``.
    """
    found = {}
    for module_name in sorted({type(m).__module__ for m in model.modules()}):
        for fn in vars(sys.modules[module_name]).values():
            if not inspect.isfunction(fn) or "is_new_implementation" not in fn.__code__.co_freevars:
                continue
            bound = inspect.getclosurevars(fn).nonlocals
            missing = sorted({"implementation", "func_name", "package"} - set(bound))
            if missing:
                log.warning(
                    "transformers %s binds kernels differently than ecglm reads them (no %s in %s.%s): "
                    "the fast-kernel report is empty",
                    transformers_version(),
                    ", ".join(missing),
                    module_name,
                    fn.__name__,
                )
                return []
            impl = bound["implementation"]
            path = f"{impl.__module__}.{impl.__name__}" if bound["is_new_implementation"] else None
            found[bound["func_name"]] = (bound["func_name"], bound["package"], path)
    return list(found.values())


def transformers_version() -> str:
    from transformers import __version__

    return __version__


def log_kernels(model_type: str, bindings: list[tuple[str, str, str | None]]) -> None:
    """One INFO line per kernel package: its fast kernels, or the PyTorch reference path."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name, package, impl in bindings:
        groups.setdefault((package, impl is not None), []).append(name)
    for (package, fast), names in sorted(groups.items()):
        dist = KERNEL_DISTRIBUTIONS.get(package, package)
        if fast:
            log.info("%s: %s run on the fast kernels of %s", model_type, ", ".join(names), dist)
        else:
            log.info(
                "%s: %s run on the PyTorch reference path (slower; install %s for the fast kernels)",
                model_type,
                ", ".join(names),
                dist,
            )
