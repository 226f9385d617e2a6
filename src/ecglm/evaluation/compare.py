"""Several ``ecglm evaluate`` reports side by side (``ecglm compare``), e.g. the signal and the image path."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ecglm.evaluation.markdown import METRIC_TITLES, _pct
from ecglm.evaluation.summary import distinct_answers
from ecglm.io import atomic_write_bytes
from ecglm.uncertainty import paired_gap, record_of


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


def read_predictions(report_path: Path) -> list[dict[str, Any]]:
    """The per-answer records of every seed of an ``ecglm evaluate`` run: the
    ``predictions_seed*.jsonl`` files beside its ``report.json`` (empty when there are none)."""
    records = []
    for path in sorted(Path(report_path).parent.glob("predictions_seed*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def paired_changes(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], confidence: float = 0.95
) -> dict[str, dict[str, dict[str, Any]]]:
    """How ``other`` (e.g. the model after GRPO) changed on the questions ``base`` (the SFT model)
    answered too, per dataset and question type: ``acc:<condition>`` is the change of exact-match
    accuracy under each condition both ran, ``gap:ecg-<control>`` the change of the gap between the
    ECG and each control (did the model come to read the signal more?). Each is a paired bootstrap
    over records with its sign-flip p-value (:func:`ecglm.uncertainty.paired_gap`), in fractions."""
    a = distinct_answers([{"records": list(other)}])
    b = distinct_answers([{"records": list(base)}])
    shared = sorted(set(a) & set(b))
    conditions = list(dict.fromkeys(c for c, _, _ in shared))
    questions = sorted({(d, k) for c, d, k in shared if c == "ecg"})
    groups: dict[str, list[tuple[str, str]]] = {}
    for d, k in questions:
        groups.setdefault(f"dataset: {d}", []).append((d, k))
        groups.setdefault(f"question_type: {b[('ecg', d, k)]['question_type']}", []).append((d, k))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for group, keys in groups.items():
        complete = [c for c in conditions if all((c, *k) in a and (c, *k) in b for k in keys)]
        records = [f"{d}/{record_of(k)}" for d, k in keys]
        right = {
            (c, n): [float(r[(c, *k)]["correct"]) for k in keys]
            for c in complete
            for n, r in (("a", a), ("b", b))
        }
        row = out.setdefault(group, {"questions": {"n": len(keys)}})
        for c in complete:
            row[f"acc:{c}"] = paired_gap(right[(c, "a")], right[(c, "b")], records, confidence).as_dict()
        for c in (c for c in complete if c != "ecg" and "ecg" in complete):
            gap_a = [x - y for x, y in zip(right[("ecg", "a")], right[(c, "a")], strict=True)]
            gap_b = [x - y for x, y in zip(right[("ecg", "b")], right[(c, "b")], strict=True)]
            row[f"gap:ecg-{c}"] = paired_gap(gap_a, gap_b, records, confidence).as_dict()
    return out


def render_paired_changes(changes: Mapping[str, Mapping[str, Any]], other: str, base: str) -> str:
    """:func:`paired_changes` as a Markdown table, in percentage points."""
    columns = list(dict.fromkeys(c for row in changes.values() for c in row if c != "questions"))
    lines = [
        f"## {other} - {base} on the same questions",
        "",
        "Percentage points, with 95% paired bootstrap intervals over records and the sign-flip "
        "p-value; `acc:` is the change of accuracy under a condition, `gap:` the change of the gap "
        "between the ECG and a control.",
        "",
        "| Group | Questions | " + " | ".join(f"`{c}`" for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for group, row in changes.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(
                "-"
                if v is None
                else f"{100 * v['estimate']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}] "
                f"(p={v['p_value']:.3f})"
            )
        lines.append(f"| {group} | {row['questions']['n']} | " + " | ".join(cells) + " |")
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
