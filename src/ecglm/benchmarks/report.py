"""The report of ``ecglm benchmark score``: ``scores.json``, ``scores.md`` (per subset our metrics, with
strict scoring's intervals, beside the published rows of the PULSE paper, in percent) and a PNG per
metric (ours, our controls and the published rows) plus one of the paired gaps against the controls,
written atomically beside ``scores.json`` and, on request, logged to MLflow as metrics and artifacts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ecglm.benchmarks.published import SOURCE, published
from ecglm.io import atomic_write_bytes

#: The metrics a report shows, in this order, with their column titles.
METRIC_TITLES = {
    "accuracy": "accuracy",
    "f1": "F1",
    "auc": "AUC",
    "auc_of_decisions": "AUC of 0/1 decisions",
    "hamming_loss": "Hamming loss",
    "report_score": "report score",
    "arena_score": "arena score",
}
#: MLflow's artifact folder of the report.
ARTIFACT_PATH = "benchmark"


def subset_metrics(name: str, row: Mapping[str, Any]) -> list[str]:
    """The metrics of subset ``name`` that our row or a published row holds (:data:`METRIC_TITLES` order)."""
    theirs = {m for values in published(name).values() for m, v in values.items() if v is not None}
    return [m for m in METRIC_TITLES if _number(row.get(m)) is not None or m in theirs]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal (``-`` for none), as the paper prints its tables."""
    number = _number(value)
    return "-" if number is None else f"{100 * number:.1f}"


def interval_of(row: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """The bootstrap interval of ``metric`` in a strict row (``accuracy_interval`` or ``intervals``)."""
    found = row.get(f"{metric}_interval") or (row.get("intervals") or {}).get(metric)
    if not found:
        return None
    low, high = _number(found.get("low")), _number(found.get("high"))
    return None if low is None or high is None else (low, high)


def cell(row: Mapping[str, Any], metric: str) -> str:
    """``metric`` of ``row`` in percent, with its interval when the row has one: ``61.2 [55.0, 67.3]``."""
    interval = interval_of(row, metric)
    value = percent(row.get(metric))
    if interval is None or value == "-":
        return value
    return f"{value} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def gaps_of(row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The overall paired gap against each control (``control -> {estimate, low, high, n, p_value}``);
    ECG-QA's per-question-type gaps give their ``all`` entry."""
    out = {}
    for key, gap in (row.get("gaps") or {}).items():
        gap = gap.get("all") if gap and "estimate" not in gap else gap
        if gap and _number(gap.get("estimate")) is not None:
            out[key.removeprefix("model_minus_")] = gap
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """``scores.md``: per subset a table of our metrics (and the controls') beside the published rows,
    in percent, then the paired gaps against the controls."""
    scoring = report["scoring"]
    lines = [f"# {report['suite']} scores ({scoring} scoring)", ""]
    model = report.get("model")
    if model:
        lines += [f"Model: {describe_model(model)}", ""]
        if model.get("decoding"):
            lines += [f"Decoding: {describe_decoding(model['decoding'])}", ""]
    lines += [
        "All numbers are percentages (the fractions of `scores.json` times 100); "
        "`[low, high]` is the 95% bootstrap interval over items.",
        "",
    ]
    if any(published(name) and any(published(name).values()) for name in report["subsets"]):
        lines += [
            f"Published rows: {SOURCE}.",
            "The paper scored them as `--scoring pulse` does:"
            " compare them with our numbers under that scoring only.",
        ]
        if scoring == "strict":
            lines.append(
                "(Their AUC is PULSE's AUC of 0/1 decisions; strict scoring's AUC ranks label scores.)"
            )
        lines.append("")
    for name, row in report["subsets"].items():
        lines += _subset_section(name, row, scoring)
    return "\n".join(lines).rstrip() + "\n"


def describe_model(model: Mapping[str, Any]) -> str:
    """One line on the model that answered (the ``run.json`` of ``ecglm benchmark run``)."""
    if model.get("zero_shot"):
        recipe = model.get("recipe")
        return f"`{model.get('name')}`, untrained (zero-shot: its parts' own weights), from recipe `{recipe}`"
    return f"`{model.get('name')}`"


def describe_decoding(decoding: Mapping[str, Any]) -> str:
    """The answers' decoding in words: ``greedy, up to 64 tokens``."""
    if decoding.get("do_sample"):
        how = f"sampled (temperature {decoding.get('temperature')}, top-p {decoding.get('top_p')})"
    elif (decoding.get("num_beams") or 1) > 1:
        how = f"beam search ({decoding['num_beams']} beams)"
    else:
        how = "greedy"
    return f"{how}, up to {decoding.get('max_new_tokens')} tokens"


def _subset_section(name: str, row: Mapping[str, Any], scoring: str) -> list[str]:
    metrics = subset_metrics(name, row)
    counts = [f"{row.get('answers', 0)} answers of {row.get('items', '?')} items"]
    counts += [f"{row[k]} {k.replace('_', ' ')}" for k in ("unparsable", "missing", "unreadable") if k in row]
    if "published_items" in row:
        counts.append(f"the published files hold {row['published_items']}")
    if row.get("complete") is False:
        counts.append("**incomplete: not comparable with the tables**")
    lines = [f"## {name}", "", "; ".join(counts) + ".", ""]
    if not metrics:
        return lines
    titles = [METRIC_TITLES[m] for m in metrics]
    lines += ["| model | " + " | ".join(titles) + " |", "|---" * (len(metrics) + 1) + "|"]
    how = f"judge {row.get('judge')}" if row.get("scoring") == "judge" else row.get("scoring", scoring)
    lines.append(f"| ours ({how}) | " + " | ".join(cell(row, m) for m in metrics) + " |")
    for control, values in (row.get("controls") or {}).items():
        lines.append(f"| ours, {control} control | " + " | ".join(cell(values, m) for m in metrics) + " |")
    for model, values in published(name).items():
        if any(v is not None for v in values.values()):
            lines.append(
                f"| {model} (published) | " + " | ".join(percent(values.get(m)) for m in metrics) + " |"
            )
    lines.append("")
    lines += _question_types(row)
    gaps = gaps_of(row)
    if gaps:
        lines += ["Paired gaps, ours minus the control (per-item scores, percentage points):", ""]
        lines += ["| control | gap | 95% interval | p | items |", "|---|---|---|---|---|"]
        for control, gap in gaps.items():
            low, high = _number(gap.get("low")), _number(gap.get("high"))
            span = "-" if low is None or high is None else f"[{100 * low:+.1f}, {100 * high:+.1f}]"
            p = _number(gap.get("p_value"))
            lines.append(
                f"| {control} | {100 * gap['estimate']:+.1f} | {span} | {'-' if p is None else f'{p:.3g}'}"
                f" | {gap.get('n', '')} |"
            )
        lines.append("")
    return lines


def _question_types(row: Mapping[str, Any]) -> list[str]:
    """ECG-QA's accuracy per question type (ours with its interval, then each control's), if scored so."""
    types = row.get("question_types") or {}
    if not types:
        return []
    controls = row.get("controls") or {}
    lines = ["| question type | questions | accuracy | " + " | ".join(controls) + " |"]
    lines.append("|---" * (3 + len(controls)) + "|")
    for name, stat in types.items():
        cells = [
            name,
            str(stat.get("n", "")),
            cell({"accuracy": stat.get("estimate"), "accuracy_interval": stat}, "accuracy"),
        ]
        cells += [percent((c.get("question_types") or {}).get(name)) for c in controls.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_metric(report: Mapping[str, Any], metric: str) -> bytes | None:
    """A PNG of ``metric``: a panel per subset that has it, a bar for ours (with its interval), each
    control and each published row, in percent; ``None`` when no subset has it."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    panels = []
    for name, row in report["subsets"].items():
        if metric not in subset_metrics(name, row):
            continue
        bars = [(f"ours ({row.get('scoring')})", row.get(metric), interval_of(row, metric), "tab:blue")]
        for control, values in (row.get("controls") or {}).items():
            bars.append((f"ours, {control}", values.get(metric), interval_of(values, metric), "tab:orange"))
        for model, values in published(name).items():
            if values.get(metric) is not None:
                bars.append((f"{model} (published)", values[metric], None, "tab:gray"))
        panels.append((name, bars))
    if not panels:
        return None
    figure = Figure(figsize=(3.6 * len(panels), 0.9 + 0.28 * max(len(b) for _, b in panels)))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, bars) in zip(axes, panels, strict=True):
        values = [100 * (_number(v) or 0.0) for _, v, _, _ in bars]
        ys = list(range(len(bars)))[::-1]
        ax.barh(ys, values, color=[c for *_, c in bars])
        for y, value, (_, _, span, _) in zip(ys, values, bars, strict=True):
            if span is not None:
                error = [[value - 100 * span[0]], [100 * span[1] - value]]
                ax.errorbar([value], [y], xerr=error, fmt="none", color="black", capsize=2)
        ax.set_yticks(ys, [label for label, *_ in bars], fontsize="small")
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{METRIC_TITLES[metric]} (%)")
        ax.set_title(name)
    figure.tight_layout()
    return _png(figure)


def plot_gaps(report: Mapping[str, Any]) -> bytes | None:
    """A PNG of every paired gap against a control (estimate and 95% interval, percentage points), or
    ``None`` when no subset has one."""
    from matplotlib.figure import Figure

    points = [
        (f"{name} minus {control}", gap)
        for name, row in report["subsets"].items()
        for control, gap in gaps_of(row).items()
    ]
    if not points:
        return None
    figure = Figure(figsize=(6, 0.9 + 0.35 * len(points)))
    ax = figure.subplots()
    ys = list(range(len(points)))[::-1]
    for y, (_, gap) in zip(ys, points, strict=True):
        estimate = 100 * gap["estimate"]
        low, high = _number(gap.get("low")), _number(gap.get("high"))
        span = [[0.0], [0.0]]
        if low is not None and high is not None:
            span = [[estimate - 100 * low], [100 * high - estimate]]
        ax.errorbar([estimate], [y], xerr=span, fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(ys, [label for label, _ in points], fontsize="small")
    ax.set_xlabel("ours minus the control, per-item score (percentage points)")
    figure.tight_layout()
    return _png(figure)


def write_report(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """``out`` (scores.json), ``<stem>.md`` and the plots ``<stem>.<metric>.png``, ``<stem>.gaps.png``
    beside it, each written atomically; the paths written."""
    out = Path(out)
    files = [atomic_write_bytes(out, json.dumps(report, indent=2).encode())]
    files.append(atomic_write_bytes(out.with_suffix(".md"), render_markdown(report).encode()))
    for metric in METRIC_TITLES:
        png = plot_metric(report, metric)
        if png is not None:
            files.append(atomic_write_bytes(out.with_name(f"{out.stem}.{metric}.png"), png))
    gaps = plot_gaps(report)
    if gaps is not None:
        files.append(atomic_write_bytes(out.with_name(f"{out.stem}.gaps.png"), gaps))
    return files


def mlflow_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Every metric of the report as ``benchmark/<subset>/<metric>`` (fractions), the controls' as
    ``benchmark/<subset>/<control>/<metric>`` and the gaps as ``benchmark/<subset>/gap_<control>``."""
    metrics = {}
    for name, row in report["subsets"].items():
        for metric in METRIC_TITLES:
            if (value := _number(row.get(metric))) is not None:
                metrics[f"benchmark/{name}/{metric}"] = value
            for control, values in (row.get("controls") or {}).items():
                if (value := _number(values.get(metric))) is not None:
                    metrics[f"benchmark/{name}/{control}/{metric}"] = value
        for control, gap in gaps_of(row).items():
            metrics[f"benchmark/{name}/gap_{control}"] = float(gap["estimate"])
    return metrics


def log_to_mlflow(
    report: Mapping[str, Any], files: Sequence[Path], tracking_uri: str, experiment: str = "ecglm-benchmark"
) -> str:
    """A new MLflow run in ``experiment`` at ``tracking_uri`` (Lightning's ``MLFlowLogger``, as
    ``ecglm evaluate``'s runs) with the report's metrics, its suite, scoring and model as
    parameters, and its files as artifacts (folder ``benchmark``); the run's id."""
    from lightning.pytorch.loggers import MLFlowLogger

    from ecglm.io import log_artifacts

    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri, run_name=report["suite"])
    params = {"suite": report["suite"], "scoring": report["scoring"]}
    model = report.get("model") or {}
    params |= {f"model.{k}": v for k, v in model.items() if k in ("name", "zero_shot", "recipe")}
    logger.log_hyperparams(params)
    logger.log_metrics(mlflow_metrics(report))
    log_artifacts(SimpleNamespace(loggers=[logger]), files, artifact_path=ARTIFACT_PATH)  # as a Trainer
    logger.finalize("success")
    return logger.run_id
