"""METEOR per answer pair (nltk's ``meteor_score``), averaged per group; torchmetrics has none."""

from __future__ import annotations

from nltk.translate.meteor_score import meteor_score

from ecglm.metrics._grouped import GroupedMean
from ecglm.metrics.normalize import answer_text, normalize_answer
from ecglm.metrics.wordnet import require_wordnet


class METEOR(GroupedMean):
    """nltk's ``meteor_score`` per pair on ``normalize_answer`` tokens, averaged (torchmetrics has none).

    Needs WordNet: found on nltk's path, or built from Debian's packages by
    :func:`~ecglm.metrics.wordnet.ensure_wordnet`.
    """

    def _scores(self, preds, target):
        require_wordnet()
        return [
            meteor_score([normalize_answer(answer_text(t)).split()], normalize_answer(answer_text(p)).split())
            for p, t in zip(preds, target, strict=True)
        ]
