"""Several ``ecglm evaluate`` reports side by side (``ecglm compare``), e.g. the signal and the image path."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ecglm.evaluation.markdown import METRIC_TITLES, _pct
from ecglm.io import atomic_write_bytes


def compare_reports(reports: Mapping[str, dict[str, Any]], metrics: Sequence[str] = ("acc", "f1")) -> str:
    """One Markdown table of several ``ecglm evaluate`` reports (``name -> report.json`` content), e.g.
    the same questions answered from the signal path and from the image path: a row per dataset and
    metric, a column per report and condition, so each path's score stands beside its own no-signal
    ablations (a zeroed signal, a blank page, no ECG at all). Values are % mean ± std over seeds."""
    conditions: list[str] = []
    for report in reports.values():
        for condition in report["summary"]["conditions"]:
            if condition not in conditions:
                conditions.append(condition)
    datasets = sorted(
        {d for r in reports.values() for e in r["summary"]["conditions"].values() for d in e["datasets"]}
    )
    ran = {name: report["summary"]["conditions"] for name, report in reports.items()}
    columns = [(name, c) for name in reports for c in conditions if c in ran[name]]
    lines = [
        "# Side by side",
        "",
        "Values are % (mean ± sample std over seeds); each report's conditions as it ran them "
        "(`zeroed_ecg` is a blank page on the image path).",
        "",
        "| Dataset | Metric | " + " | ".join(f"{name}: `{c}`" for name, c in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for dataset in datasets:
        for metric in metrics:
            cells = [
                _pct(reports[name]["summary"]["conditions"][c]["datasets"].get(dataset, {}).get(metric))
                for name, c in columns
            ]
            lines.append(f"| {dataset} | {METRIC_TITLES.get(metric, metric)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(args: list[str]) -> Path:
    """``ecglm compare --report NAME=PATH [--report NAME=PATH ...] --out compare.md [--metrics acc f1]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ecglm compare", description="Evaluation reports side by side (e.g. signal vs image path)."
    )
    parser.add_argument("--report", action="append", required=True, help="NAME=path/to/report.json")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    parser.add_argument("--metrics", nargs="+", default=["acc", "f1"])
    options = parser.parse_args(args)
    reports = {}
    for spec in options.report:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--report {spec!r}: write NAME=path/to/report.json")
        try:
            reports[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--report {name}: cannot read {path} ({err})") from None
        if "summary" not in reports[name]:
            raise ValueError(f"--report {name}: {path} is not an ecglm evaluate report.json (no summary)")
    text = compare_reports(reports, options.metrics)
    print(text)
    return atomic_write_bytes(Path(options.out), text.encode())
