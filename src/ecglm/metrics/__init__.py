"""Answer metrics for ECG question answering and report generation, as DDP-safe streaming torchmetrics.

Every metric keeps fixed-size tensor states reduced by sum, so memory is constant over an evaluation and
torchmetrics syncs them across ranks. Values are fractions in [0, 1]. Imports torch, torchmetrics, nltk and
transformers only (no Lightning); ``docs/metrics.md`` lists the reference implementations each metric is
checked against. One family per file:

- ``normalize``: answers as the metrics compare them (normalised text, item sets, "normal" answers);
- ``text``: :class:`TextMetrics` (exact match, token F1, BLEU-4, ROUGE-L, METEOR, BERTScore) per group;
- ``bertscore``: :class:`BERTScoreF1` and the offline-first loading of its encoder;
- ``meteor``: :class:`METEOR`; ``wordnet``: the WordNet data it needs, found or built from Debian's;
- ``abnormality``: normal vs abnormal detection and its confusion plot;
- ``label_sets``: multi-label scores over a fixed answer vocabulary;
- ``tokens``: answer-token accuracy and entropy under teacher forcing;
- ``failures``: how wrong answers go wrong;
- ``_grouped``: the per-group sum states and checks the metrics share.
"""

from ecglm.metrics.abnormality import AbnormalityMetrics, plot_confusion
from ecglm.metrics.bertscore import (
    BERTSCORE_CACHE_SIZE,
    DEFAULT_BERTSCORE_MODEL,
    HUB_PROBE_TIMEOUT_S,
    MINILM_BERTSCORE_MODEL,
    BERTScoreF1,
    resolve_bertscore_model,
)
from ecglm.metrics.failures import RELATED_STOP_TOKENS, failure_modes
from ecglm.metrics.label_sets import AUROC_THRESHOLDS, LabelSetMetrics
from ecglm.metrics.meteor import METEOR
from ecglm.metrics.normalize import (
    NORMAL_ANSWERS,
    answer_items,
    answer_text,
    is_normal_answer,
    normalize_answer,
)
from ecglm.metrics.text import TEXT_METRICS, ExactMatch, RougeL, TextMetrics, TokenF1
from ecglm.metrics.tokens import AnswerTokenStats
from ecglm.metrics.wordnet import DEBIAN_WORDNET, WORDNET_APT_COMMAND, ensure_wordnet

__all__ = [
    "AUROC_THRESHOLDS",
    "BERTSCORE_CACHE_SIZE",
    "DEBIAN_WORDNET",
    "DEFAULT_BERTSCORE_MODEL",
    "HUB_PROBE_TIMEOUT_S",
    "METEOR",
    "MINILM_BERTSCORE_MODEL",
    "NORMAL_ANSWERS",
    "RELATED_STOP_TOKENS",
    "TEXT_METRICS",
    "WORDNET_APT_COMMAND",
    "AbnormalityMetrics",
    "AnswerTokenStats",
    "BERTScoreF1",
    "ExactMatch",
    "LabelSetMetrics",
    "RougeL",
    "TextMetrics",
    "TokenF1",
    "answer_items",
    "answer_text",
    "ensure_wordnet",
    "failure_modes",
    "is_normal_answer",
    "normalize_answer",
    "plot_confusion",
    "resolve_bertscore_model",
]
