"""``ecglm estimate``: parameters and per-device peak memory of a recipe, without loading weights."""

from __future__ import annotations


def estimate(args: list[str]) -> int:
    """Estimate a recipe's parameters and peak memory per device: ``ecglm estimate --config R
    [--config VARIANT] [--section.key=value ...] [--json out.json]``."""
    from ecglm.estimate import run_estimate

    run_estimate(args)
    return 0
