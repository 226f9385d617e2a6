"""Text metrics of generated answers and reports, overall and per group: exact match, token F1, BLEU-4,
ROUGE-L, METEOR and BERTScore-F1 (:class:`TextMetrics`), and the per-pair metrics it is made of."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore

from ecglm.metrics._grouped import GroupCount, GroupedMean, Groups, check_pairs, quiet_if_never_updated
from ecglm.metrics.bertscore import DEFAULT_BERTSCORE_MODEL, BERTScoreF1
from ecglm.metrics.meteor import METEOR
from ecglm.metrics.normalize import answer_items, answer_text, normalize_answer

TEXT_METRICS: tuple[str, ...] = ("acc", "f1", "bleu4", "rouge_l", "meteor", "bertscore_f1")


def _token_f1(pred: str, target: str) -> float:
    """SQuAD v1.1 token F1 on normalize_answer tokens; two empty answers count as a match (as SQuAD v2)."""
    pred_tokens, target_tokens = normalize_answer(pred).split(), normalize_answer(target).split()
    if not pred_tokens or not target_tokens:
        return float(pred_tokens == target_tokens)
    same = sum((Counter(pred_tokens) & Counter(target_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


class ExactMatch(GroupedMean):
    """Order-insensitive set match, ``answer_items(pred) == answer_items(target)`` (torchmetrics has none)."""

    def _scores(self, preds, target):
        return [float(answer_items(p) == answer_items(t)) for p, t in zip(preds, target, strict=True)]


class TokenF1(GroupedMean):
    """SQuAD-style token F1 per pair on ``normalize_answer`` tokens, averaged.

    torchmetrics' SQuAD metric takes SQuAD dicts, drops articles and keeps scalar states, hence this class.
    """

    def _scores(self, preds, target):
        return [_token_f1(answer_text(p), answer_text(t)) for p, t in zip(preds, target, strict=True)]


class RougeL(GroupedMean):
    """ROUGE-L F-measure per pair (torchmetrics' functional ``rouge_score``, no stemming), averaged.

    torchmetrics' ROUGEScore keeps per-sample lists; this keeps sums.
    """

    def _scores(self, preds, target):
        return [
            float(rouge_score(answer_text(p), answer_text(t), rouge_keys="rougeL")["rougeL_fmeasure"])
            for p, t in zip(preds, target, strict=True)
        ]


#: Metrics with a score per answer (what bootstrap intervals over answers need); BLEU-4 is a corpus
#: statistic, and METEOR and BERTScore need WordNet or a model, so they have none here.
PER_ANSWER_METRICS = {"acc": ExactMatch, "f1": TokenF1, "rouge_l": RougeL}


def pair_scores(metric: str, preds: Sequence[str], target: Sequence[str | Sequence[str]]) -> list[float]:
    """Each answer's score under ``metric`` (one of :data:`PER_ANSWER_METRICS`): the values whose mean
    the metric reports."""
    if metric not in PER_ANSWER_METRICS:
        raise ValueError(f"no per-answer score for {metric!r}; choose from {list(PER_ANSWER_METRICS)}")
    return PER_ANSWER_METRICS[metric]()._scores(preds, target)


class TextMetrics(torch.nn.Module):
    """Exact match, token F1, BLEU-4, ROUGE-L, METEOR and BERTScore-F1 overall and per group.

    Groups (dataset names, question types) are fixed at construction so every rank holds the same states.
    ``compute()`` gives ``{"all": {...}, group: {...}}`` with an ``"n"`` count each; empty groups are omitted.
    """

    def __init__(
        self,
        groups: Sequence[str] = (),
        metrics: Sequence[str] = TEXT_METRICS,
        bertscore_model: str | None = DEFAULT_BERTSCORE_MODEL,
        bertscore_num_layers: int | None = None,
        bertscore_batch_size: int = 64,
    ) -> None:
        super().__init__()
        unknown = sorted(set(metrics) - set(TEXT_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
        self.groups = Groups(groups)
        num_groups = len(self.groups.names) - 1
        self.metric_names = tuple(m for m in TEXT_METRICS if m in metrics)
        if bertscore_model is None:
            self.metric_names = tuple(m for m in self.metric_names if m != "bertscore_f1")
        self.count = GroupCount(num_groups)
        mean_metrics = {
            "acc": lambda: ExactMatch(num_groups),
            "f1": lambda: TokenF1(num_groups),
            "rouge_l": lambda: RougeL(num_groups),
            "meteor": lambda: METEOR(num_groups),
            "bertscore_f1": lambda: BERTScoreF1(
                bertscore_model, bertscore_num_layers, bertscore_batch_size, num_groups
            ),
        }
        self.means = torch.nn.ModuleDict(
            {m: mean_metrics[m]() for m in self.metric_names if m in mean_metrics}
        )
        # BLEU is corpus-level, so each slot has its own BLEUScore (four n-gram counts, no model).
        self.bleu = torch.nn.ModuleList(
            [BLEUScore(n_gram=4) for _ in self.groups.names] if "bleu4" in self.metric_names else []
        )

    def update(
        self,
        preds: Sequence[str | Sequence[str]],
        target: Sequence[str | Sequence[str]],
        groups: Sequence[str] | None = None,
    ) -> None:
        check_pairs(preds, target)
        slots = self.groups.slots(groups, len(preds))
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=self.count.device)
        self.count.update(slot_tensor)
        for metric in self.means.values():
            metric.update(preds, target, slot_tensor)
        if self.bleu:
            self._update_bleu(preds, target, slots)

    def _update_bleu(self, preds, target, slots: list[int]) -> None:
        hyps = [normalize_answer(answer_text(p)) for p in preds]
        refs = [[normalize_answer(answer_text(t))] for t in target]
        self.bleu[0].update(hyps, refs)
        for slot in sorted(set(slots) - {0}):
            chosen = [i for i, s in enumerate(slots) if s == slot]
            self.bleu[slot].update([hyps[i] for i in chosen], [refs[i] for i in chosen])

    def compute(self) -> dict[str, dict[str, float]]:
        # torchmetrics squeezes one-element results, so with no groups these come back as scalars.
        counts = torch.atleast_1d(self.count.compute()).tolist()
        means = {name: torch.atleast_1d(metric.compute()).tolist() for name, metric in self.means.items()}
        result: dict[str, dict[str, float]] = {}
        for slot, group in enumerate(self.groups.names):
            if counts[slot] == 0 and slot > 0:
                continue
            values = {"n": counts[slot]}
            for name in self.metric_names:
                values[name] = self._bleu(slot) if name == "bleu4" else means[name][slot]
            result[group] = values
        return result

    def _bleu(self, slot: int) -> float:
        with quiet_if_never_updated():
            return float(self.bleu[slot].compute())

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
