"""Evaluation of generated answers: metrics per condition, the multi-seed protocol, and its report.

Every evaluation runs the model several ways on the same questions: the *conditions*, registered in
:mod:`ecglm.conditions` (the real ``ecg``; by default the controls ``shuffled_ecg``, ``zeroed_ecg``
and ``text_only``; ``noise_ecg`` and ``random_encoder`` on request). The gap between ``ecg`` and the
controls is the evidence that a model reads the signal rather than answering from language priors,
so no report shows one without the others: every table and every gap is derived from the registry.
Beside the mean ± std over seeds, the report gives 95% bootstrap intervals that resample records
(questions about one ECG are not independent) and a paired sign-flip test of each gap
(:mod:`ecglm.uncertainty`).

One file per job:

- ``config.py``: :class:`MetricsConfig` (which metrics and conditions), :func:`read_vocabulary`;
- ``answers.py``: :class:`AnswerEvaluation`, the metric states (torchmetrics, synced across DDP
  ranks) and per-answer records of one pass; :func:`gather_rows`;
- ``summary.py``: :func:`summarize` (mean ± std over seeds, the gaps), :func:`mean_std`,
  :func:`distinct_answers`;
- ``intervals.py``: :func:`intervals` (bootstrap intervals over records, paired gap tests);
- ``judging.py``: :func:`build_judge`, :func:`judge_answers` (a judge's scores of the answers);
- ``markdown.py``: :func:`render_markdown` (the paper's layout), :data:`METRIC_TITLES`;
- ``plots.py``: :func:`plot_metrics` and the summed confusion matrices;
- ``protocol.py``: :class:`EvaluationProtocol` (``ecglm evaluate``: seeds, report files);
- ``tracking.py``: the summary and files to the Trainer's loggers and MLflow;
- ``compare.py``: :func:`compare_reports` and ``ecglm compare`` (:func:`run_compare`).
"""

from __future__ import annotations

from ecglm._deprecation import moved_names
from ecglm.conditions import _LEGACY_CONSTANTS
from ecglm.evaluation.answers import AnswerEvaluation, gather_rows
from ecglm.evaluation.compare import compare_reports, run_compare
from ecglm.evaluation.config import MetricsConfig, read_vocabulary
from ecglm.evaluation.intervals import intervals
from ecglm.evaluation.judging import build_judge, judge_answers
from ecglm.evaluation.markdown import ABNORMALITY_METRICS, METRIC_TITLES, render_markdown
from ecglm.evaluation.plots import plot_metrics
from ecglm.evaluation.protocol import DEFAULT_SAMPLES_PER_DATASET, EvaluationProtocol
from ecglm.evaluation.summary import distinct_answers, mean_std, summarize
from ecglm.model import Decoding  # recipes and code name it here too

__all__ = [
    "ABNORMALITY_METRICS",
    "DEFAULT_SAMPLES_PER_DATASET",
    "METRIC_TITLES",
    "AnswerEvaluation",
    "Decoding",
    "EvaluationProtocol",
    "MetricsConfig",
    "build_judge",
    "compare_reports",
    "distinct_answers",
    "gather_rows",
    "intervals",
    "judge_answers",
    "mean_std",
    "plot_metrics",
    "read_vocabulary",
    "render_markdown",
    "run_compare",
    "summarize",
]

# CONDITIONS, DEFAULT_CONDITIONS and CONTROLS are read from the condition registry (deprecated); the
# names evaluation.py had only imported are served from their own modules. Each warns.
__getattr__ = moved_names(
    __name__,
    {
        **_LEGACY_CONSTANTS,
        "plot_confusion": "ecglm.metrics:plot_confusion",
        "failure_modes": "ecglm.metrics:failure_modes",
        "answer_items": "ecglm.metrics:answer_items",
        "answer_text": "ecglm.metrics:answer_text",
        "TEXT_METRICS": "ecglm.metrics:TEXT_METRICS",
        "NORMAL_ANSWERS": "ecglm.metrics:NORMAL_ANSWERS",
        "DEFAULT_BERTSCORE_MODEL": "ecglm.metrics:DEFAULT_BERTSCORE_MODEL",
        "TextMetrics": "ecglm.metrics:TextMetrics",
        "AbnormalityMetrics": "ecglm.metrics:AbnormalityMetrics",
        "LabelSetMetrics": "ecglm.metrics:LabelSetMetrics",
        "VerifyAUROC": "ecglm.metrics.verify:VerifyAUROC",
        "PER_ANSWER_METRICS": "ecglm.metrics.text:PER_ANSWER_METRICS",
        "pair_scores": "ecglm.metrics.text:pair_scores",
        "bootstrap_mean": "ecglm.uncertainty:bootstrap_mean",
        "paired_gap": "ecglm.uncertainty:paired_gap",
        "record_of": "ecglm.uncertainty:record_of",
        "Judge": "ecglm.judges:Judge",
        "JudgeItem": "ecglm.judges:JudgeItem",
    },
)
