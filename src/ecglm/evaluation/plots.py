"""The report's figures: metric bars per condition and dataset, and summed confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecglm.evaluation.markdown import METRIC_TITLES


def plot_metrics(summary: dict[str, Any], path: Path) -> Path:
    """Bars per metric and dataset, one colour per condition, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(summary["conditions"])
    datasets = [d for d in summary["conditions"]["ecg"]["datasets"] if d != "all"] or ["all"]
    metrics = [m for m in METRIC_TITLES if m in summary["conditions"]["ecg"]["datasets"][datasets[0]]]
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(2 + 1.3 * len(metrics) * len(datasets), 3.6), squeeze=False
    )
    width = 0.8 / len(conditions)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, c in enumerate(conditions):
            values = summary["conditions"][c]["datasets"].get(dataset, {})
            means = [100 * values.get(m, {}).get("mean", float("nan")) for m in metrics]
            stds = [100 * values.get(m, {}).get("std", 0.0) for m in metrics]
            xs = [j + (i - (len(conditions) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=c)
        ax.set_xticks(range(len(metrics)), [METRIC_TITLES[m] for m in metrics], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(dataset)
        ax.set_ylabel("%")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _summed_confusion(per_seed: Sequence[dict[str, Any]], condition: str) -> dict[str, list[list[float]]]:
    """Per abnormality group, the 2x2 confusion matrix of ``condition`` summed over seeds."""
    out: dict[str, list[list[float]]] = {}
    for result in per_seed:
        for name, values in result["conditions"][condition]["abnormality"].items():
            matrix = values.get("confusion")
            if matrix is None:
                continue
            acc = out.setdefault(name, [[0.0, 0.0], [0.0, 0.0]])
            for i in range(2):
                for j in range(2):
                    acc[i][j] += float(matrix[i][j])
    return out
