"""The report as Markdown, in the paper's layout: a table per condition, a table per gap, intervals,
the judge's scores and the failure modes."""

from __future__ import annotations

import math
from typing import Any

from ecglm.metrics import answer_text

METRIC_TITLES = {
    "acc": "ACC",
    "f1": "F1",
    "bleu4": "BLEU-4",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore-F1",
}
ABNORMALITY_METRICS = ("sensitivity", "specificity", "precision", "f1")


def _interval(stat: dict[str, float] | None) -> str:
    if not stat:
        return "-"
    if math.isnan(stat["low"]):
        return f"{100 * stat['estimate']:.1f} (one record)"
    return f"{100 * stat['estimate']:.1f} [{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]"


def _pct(stat: dict[str, float] | None, scale: float = 100.0) -> str:
    if not stat or math.isnan(stat["mean"]):
        return "-"
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def render_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report in the paper's layout: one table per condition, rows are datasets."""
    lines = ["# ecglm evaluation", ""]
    if meta.get("ckpt_path"):
        lines += [f"Checkpoint: `{meta['ckpt_path']}`; seeds {meta.get('seeds')}", ""]
    if meta.get("split", "test") != "test":
        lines += [f"Split: **{meta['split']}** (not the held-out test split)", ""]
    if meta.get("training"):
        from ecglm.bundle import describe_stages

        lines += [f"Training: {describe_stages(meta['training'])}", ""]
    lines += [
        f"Decoding: {meta.get('decoding')}",
        "",
        "Values are % (mean ± sample std over seeds). `n` is the number of answers per seed (mean).",
        "",
    ]
    for c, entry in summary["conditions"].items():
        datasets = entry["datasets"]
        metrics = [m for m in METRIC_TITLES if any(m in v for v in datasets.values())]
        lines += [f"## Condition `{c}`", ""]
        lines.append("| Dataset | n | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |")
        lines.append("|---|---:|" + "---:|" * len(metrics))
        for name, values in datasets.items():
            n = values.get("n", {}).get("mean", float("nan"))
            cells = [_pct(values.get(m)) for m in metrics]
            lines.append(f"| {name} | {n:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
        if entry["abnormality"]:
            lines.append("Binary abnormality detection (abnormal = positive):")
            lines.append("")
            lines.append("| Dataset | n | Sensitivity | Specificity | Precision | F1 |")
            lines.append("|---|---:|---:|---:|---:|---:|")
            for name, values in entry["abnormality"].items():
                n = values.get("n", {}).get("mean", float("nan"))
                cells = [_pct(values.get(m)) for m in ABNORMALITY_METRICS]
                lines.append(f"| {name} | {n:.0f} | " + " | ".join(cells) + " |")
            lines.append("")
        if entry.get("label_sets"):
            lines.append(
                "Label-set answers (macro-F1 over the vocabulary, Hamming loss, predicted items outside it):"
            )
            lines.append("")
            scored = any("auc" in values for values in entry["label_sets"].values())
            columns = ("macro_f1", "hamming_loss", "out_of_vocabulary", *(("auc",) if scored else ()))
            lines.append(
                "| Dataset | n | Macro-F1 | Hamming loss | Out of vocabulary |"
                + (" Macro-AUC (label scores) |" if scored else "")
            )
            lines.append("|---|---:|---:|---:|---:|" + ("---:|" if scored else ""))
            for name, values in entry["label_sets"].items():
                n = values.get("n", {}).get("mean", float("nan"))
                cells = [_pct(values.get(m)) for m in columns]
                lines.append(f"| {name} | {n:.0f} | " + " | ".join(cells) + " |")
            lines.append("")
        if entry.get("verify_auc"):
            lines.append('Yes/no questions: AUROC of the probability of answering "yes" (no threshold):')
            lines.append("")
            lines.append("| Dataset | n | AUROC |")
            lines.append("|---|---:|---:|")
            for name, values in entry["verify_auc"].items():
                n = values.get("n", {}).get("mean", float("nan"))
                lines.append(f"| {name} | {n:.0f} | {_pct(values.get('auc'))} |")
            lines.append("")
        if entry["question_types"]:
            lines.append("| Question type | n | ACC | F1 |")
            lines.append("|---|---:|---:|---:|")
            for name, values in entry["question_types"].items():
                n = values.get("n", {}).get("mean", float("nan"))
                lines.append(f"| {name} | {n:.0f} | {_pct(values.get('acc'))} | {_pct(values.get('f1'))} |")
            lines.append("")
    for gap_name, datasets in summary["gaps"].items():
        lines += [f"## Gap `{gap_name.replace('_minus_', ' - ')}` (points)", ""]
        metrics = [m for m in METRIC_TITLES if any(m in v for v in datasets.values())]
        lines.append("| Dataset | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |")
        lines.append("|---|" + "---:|" * len(metrics))
        for name, values in datasets.items():
            lines.append(f"| {name} | " + " | ".join(_pct(values.get(m)) for m in metrics) + " |")
        lines.append("")
    bands = meta.get("intervals")
    if bands:
        pct = round(100 * bands["confidence"])
        lines += [
            f"## ACC with {pct}% intervals",
            "",
            f"Over the {bands['questions']} distinct questions of all seeds (each answered once per "
            "condition); the interval is a percentile bootstrap that resamples records (an ECG with all "
            "its questions), not seeds. Gaps are paired (the same questions); p: two-sided sign-flip "
            "test over records.",
            "",
        ]
        conditions = list(next(iter(bands["accuracy"].values())))
        lines.append("| Group | " + " | ".join(f"`{c}`" for c in conditions) + " |")
        lines.append("|---|" + "---:|" * len(conditions))
        for group, row in bands["accuracy"].items():
            lines.append(f"| {group} | " + " | ".join(_interval(row.get(c)) for c in conditions) + " |")
        lines.append("")
        gaps = bands["gaps"]
        if gaps:
            names = list(gaps)
            lines.append(
                "| Group | " + " | ".join(f"`{g.replace('_minus_', ' - ')}` (p)" for g in names) + " |"
            )
            lines.append("|---|" + "---:|" * len(names))
            for group in bands["accuracy"]:
                cells = []
                for g in names:
                    gap = gaps[g].get(group)
                    cells.append(f"{_interval(gap)} (p={gap['p_value']:.3g})" if gap else "-")
                lines.append(f"| {group} | " + " | ".join(cells) + " |")
            lines.append("")
        others = {m: v for m, v in bands.get("metrics", {}).items() if v["gaps"]}
        if others:
            lines.append("Other metrics with a score per answer: each gap with its interval (p):")
            lines.append("")
            columns = [(m, g) for m, v in others.items() for g in v["gaps"]]
            titles = [f"{METRIC_TITLES.get(m, m)} `{g.replace('_minus_', ' - ')}`" for m, g in columns]
            lines.append("| Group | " + " | ".join(titles) + " |")
            lines.append("|---|" + "---:|" * len(columns))
            for group in bands["accuracy"]:
                cells = []
                for m, g in columns:
                    gap = others[m]["gaps"][g].get(group)
                    cells.append(f"{_interval(gap)} (p={gap['p_value']:.3g})" if gap else "-")
                lines.append(f"| {group} | " + " | ".join(cells) + " |")
            lines.append("")
        if bands.get("shuffled_kept_own_ecg"):
            lines += [
                f"`shuffled_ecg`: {bands['shuffled_kept_own_ecg']} question(s) kept their own ECG (no other "
                "record had been streamed yet).",
                "",
            ]
    judged = meta.get("judge")
    if judged:
        lines += [
            f"## Judge: {judged['judge']} ({judged.get('model') or 'plugin'})",
            "",
            "Mean score (fraction of the judge's scale) with a 95% bootstrap interval over records; "
            "replies the judge's output could not be read from are counted, not scored. **A judge is "
            "only as valid as its model**: validate it against clinicians' ratings before citing it.",
            "",
            "| Dataset | Condition | n | Score | Parse failures |",
            "|---|---|---:|---:|---:|",
        ]
        for dataset, by_condition in judged["scores"].items():
            for condition, entry in by_condition.items():
                score = _interval(entry) if "estimate" in entry else "-"
                counts = f"{entry['answers']} | {score} | {entry['parse_failures']}"
                lines.append(f"| {dataset} | `{condition}` | {counts} |")
        for gap_name, by_dataset in judged["gaps"].items():
            for dataset, gap in by_dataset.items():
                lines.append(
                    f"\n`{gap_name.replace('_minus_', ' - ')}` on {dataset}: {_interval(gap)} "
                    f"(p={gap['p_value']:.3g})"
                )
        lines.append("")
    failures = meta.get("failure_modes")
    if failures:
        lines += ["## Failure modes (condition `ecg`, first seed)", ""]
        lines.append(
            f"- wrong answers: {failures['num_wrong']}; defaulting to a normal answer (`normal_answers`): "
            f"{100 * failures['share_wrong_default_none']:.1f}%; sharing a clinical term with the reference: "
            f"{100 * failures['share_wrong_related']:.1f}%"
        )
        for reference, prediction, count in failures.get("top_confusions", [])[:10]:
            lines.append(f"- {count} x `{answer_text(reference)}` answered as `{prediction}`")
        lines.append("")
    return "\n".join(lines)
