"""``ecglm compare``: evaluation reports side by side (e.g. the signal path and the image path)."""

from __future__ import annotations

import json
from pathlib import Path

from ecglm.errors import EcglmError


class CompareError(EcglmError, ValueError):
    """A report that cannot be read or is not an ``ecglm evaluate`` report."""


def compare(report: list[str], out: str, metrics: list[str] | None = None) -> int:
    """Put evaluation reports side by side, each path with its controls.

    Args:
        report: ``NAME=path/to/report.json`` (repeat for each report).
        out: Markdown file to write.
        metrics: Metrics to show (default: acc, f1).
    """
    from ecglm.evaluation import compare_reports
    from ecglm.io import atomic_write_bytes

    reports = {}
    for spec in report:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CompareError(f"--report {spec!r}: write NAME=path/to/report.json")
        try:
            reports[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(f"--report {name}: cannot read {path} ({err})") from None
        if "summary" not in reports[name]:
            raise CompareError(f"--report {name}: {path} is not an ecglm evaluate report.json (no summary)")
    text = compare_reports(reports, metrics or ["acc", "f1"])
    print(text)
    print(f"comparison: {atomic_write_bytes(Path(out), text.encode())}")
    return 0
