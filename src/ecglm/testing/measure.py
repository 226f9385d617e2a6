"""Measuring what tests and benchmarks compare figures against: tensor memory of one step on CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors allocated within ``step`` and alive at once, above what existed before.

    torch keeps no CPU allocator statistics, so this replays the profiler's allocation events (their
    running sum is the ``Total Allocated`` of its trace). Written here because neither torch nor
    Lightning offers a CPU peak of one call.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type().name == "CPU":
            running += event.nbytes()
            peak = max(peak, running)
    return peak
