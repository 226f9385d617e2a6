"""``ecglm compare``: evaluation reports side by side (e.g. the signal path and the image path)."""

from __future__ import annotations

import json
from pathlib import Path

from ecglm.errors import EcglmError


class CompareError(EcglmError, ValueError):
    """A report that cannot be read or is not an ``ecglm evaluate`` report."""


def compare(report: list[str], out: str, metrics: list[str] | None = None) -> int:
    """Put evaluation reports side by side, each path with its controls. Where each report has its
    per-answer predictions beside it (``predictions_seed*.jsonl``, as ``ecglm evaluate`` writes them),
    every report after the first is also compared with the first on the questions both answered:
    the change of accuracy under each condition and of each gap against a control, with paired
    bootstrap intervals (e.g. the model after GRPO against the SFT model it started from).

    Args:
        report: ``NAME=path/to/report.json`` (repeat for each report).
        out: Markdown file to write.
        metrics: Metrics to show (default: acc, f1).
    """
    from ecglm.evaluation import compare_reports
    from ecglm.evaluation.compare import paired_changes, read_predictions, render_paired_changes
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
    paths = {name: Path(spec.partition("=")[2]) for name, spec in zip(reports, report, strict=True)}
    names = list(reports)
    base = read_predictions(paths[names[0]])
    for name in names[1:] if base else []:
        other = read_predictions(paths[name])
        changes = paired_changes(base, other) if other else {}
        if changes:
            text += "\n" + render_paired_changes(changes, name, names[0])
    print(text)
    print(f"comparison: {atomic_write_bytes(Path(out), text.encode())}")
    return 0
