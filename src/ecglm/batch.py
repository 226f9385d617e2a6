"""The typed batch: what the collator writes and the model, the training task and evaluation read.

Component layer: torch only. Lightning moves a dataclass batch to the device field by field, so the
batch needs no transfer code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenFields:
    """Left-padded token rows: every row ends at the last position (its answer, or its prompt's end).

    ``input_ids``, ``attention_mask`` (1 on real tokens) and ``ecg_mask`` (True at the positions whose
    embeddings the ECG tokens replace), all ``(rows, length)``; ``labels`` (``-100`` outside the
    answer spans) only on teacher-forced rows.
    """

    input_ids: Tensor
    attention_mask: Tensor
    ecg_mask: Tensor
    labels: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TokenFields:
        """A copy with every tensor (the nested prompt fields' too) on ``device``; for loops without
        Lightning, which moves dataclass batches itself."""
        return replace(self, **{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})


def _moved(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, Tensor | TokenFields) else value


@dataclass(kw_only=True)
class ECGQABatch(TokenFields):
    """QA pairs about ECGs, collated (:class:`ecglm.data.datamodule.QACollator`).

    Token fields (:class:`TokenFields`): the prompts, with the answers on teacher-forced batches.

    Attributes:
        ecg: Every ECG of the batch in row order, ``(num_ecgs, leads, samples)``, as stored (float16;
            the model converts it). A comparison question's row has two.
        ecg_counts: ECGs per row, ``(rows,)``: 1, or 2 for a comparison question.
        key: Per row, the QA pair's key, ``"<record>_qa<i>"`` (the record is the ECG it asks about).
        dataset: Per row, the dataset name (``"unknown"`` when the shards do not say).
        question_type: Per row, the question type (ECG-QA's, or the builder's).
        answer: Per row, the reference answer as stored (a string, or a list of labels).
        prompt: On validation batches, the same rows as generation prompts (no answer), for metrics on
            generated answers.
        text_only: On generation batches, the same prompts with no ECG positions (the text-only ablation).
    """

    ecg: Tensor
    ecg_counts: Tensor
    key: list[str]
    dataset: list[str]
    question_type: list[str]
    answer: list[str | list[str]]
    prompt: TokenFields | None = None
    text_only: TokenFields | None = None
