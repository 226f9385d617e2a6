"""The typed batch: what the collator writes and the model, the training task and evaluation read.

Component layer: torch only. Lightning moves a dataclass batch to the device field by field, so the
batch needs no transfer code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

#: Label of a position that is not trained on (the value torch's cross-entropy ignores by default).
IGNORE_INDEX = -100


@dataclass
class TokenFields:
    """Left-padded token rows: every row ends at the last position (its answer, or its prompt's end).

    ``input_ids``, ``attention_mask`` (1 on real tokens) and ``ecg_mask`` (True at the positions whose
    embeddings the ECG tokens replace), all ``(rows, length)``; ``labels`` (``-100`` outside the
    answer spans) only on teacher-forced rows.

    ``position_ids`` is set on packed rows only (:func:`pack`): several QA pairs laid end to end in
    one row, each numbered from 0, no padding; the model then attends within each pair alone.
    """

    input_ids: Tensor
    attention_mask: Tensor
    ecg_mask: Tensor
    labels: Tensor | None = None
    position_ids: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

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
        shuffled_ecg: On generation batches, each row's ECG(s) replaced by other records' of its
            dataset (:class:`ecglm.data.controls.ECGDonors`), laid out as ``ecg``: the shuffled
            control.
        donor: Per row, the record(s) ``shuffled_ecg`` holds (``None``: the row kept its own ECG).
        question: Per row, the question as written (for judges, rewards and reports).
        chosen: Per row, the preferred answer of a preference pair (shards with ``chosen`` fields; DPO).
        rejected: Per row, the dispreferred answer of that pair.
    """

    ecg: Tensor
    ecg_counts: Tensor
    key: list[str]
    dataset: list[str]
    question_type: list[str]
    answer: list[str | list[str]]
    prompt: TokenFields | None = None
    text_only: TokenFields | None = None
    shuffled_ecg: Tensor | None = None
    donor: list[str | None] | None = None
    question: list[str] | None = None
    chosen: list[str] | None = None
    rejected: list[str] | None = None


def pack(batch: ECGQABatch, max_tokens: int | None = None, pad_token_id: int = 0) -> ECGQABatch:
    """The same teacher-forced QA pairs laid end to end in rows without padding between them.

    Each pair's real tokens follow the previous pair's, in batch order, with position ids restarting
    at 0, as transformers' ``DataCollatorWithFlattening`` lays them out: a backbone that takes packed
    rows (:meth:`ecglm.backbones.Backbone.packing_blocker`) then attends within each pair only, so
    the loss and the answer spans are those of the padded batch. ECGs stay in batch order, so the
    ECG positions are filled as before. Each pair's first label is ignored (nothing in the pair
    precedes it; in the padded layout it is a prompt token anyway).

    ``max_tokens``: ``None`` puts the whole batch in one row (the layout for flash-attention kernels,
    whose cost is per pair). With masked attention (SDPA, eager) a row costs the square of its
    length, so a bound splits the batch into the fewest rows of at most ``max_tokens`` (a longer
    pair takes a row alone), pairs kept in order and rows of about equal length; shorter rows are
    padded at the end with ``pad_token_id`` (position ids counting on from 0 there, labels ignored).
    """
    if batch.labels is None or batch.prompt is not None or batch.text_only is not None:
        raise ValueError("only teacher-forced training batches are packed (labels, no generation prompts)")
    if batch.packed:
        return batch
    real = batch.attention_mask.bool()
    lengths = real.sum(1).tolist()
    rows = _pack_rows(lengths, max_tokens)
    labels = batch.labels.masked_fill(real.long().cumsum(1) == 1, IGNORE_INDEX)
    width = max(sum(lengths[i] for i in row) for row in rows)

    def lay_out(values: Tensor, fill: int | bool) -> Tensor:
        out = []
        for row in rows:
            flat = torch.cat([values[i][real[i]] for i in row])
            out.append(torch.cat([flat, flat.new_full((width - len(flat),), fill)]))
        return torch.stack(out)

    positions = [torch.cat([torch.arange(lengths[i]) for i in row]) for row in rows]
    return replace(
        batch,
        input_ids=lay_out(batch.input_ids, pad_token_id),
        attention_mask=lay_out(batch.attention_mask, 0),
        ecg_mask=lay_out(batch.ecg_mask, False),
        labels=lay_out(labels, IGNORE_INDEX),
        position_ids=torch.stack([torch.cat([p, torch.arange(width - len(p))]) for p in positions]),
    )


def _pack_rows(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Pairs (by index, in order) per row: the fewest rows of about equal length within the bound.

    Written here because packing libraries reorder pairs to fill rows (first-fit decreasing), and
    the batch's ECGs, keys and answers are in pair order. A pair goes to the row its midpoint falls
    in when the batch's tokens are cut into ``count`` equal parts; ``count`` grows until every row
    with more than one pair fits.
    """
    if max_tokens is None:
        return [list(range(len(lengths)))]
    total = sum(lengths)
    for count in range(max(1, -(-total // max_tokens)), len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        start = 0
        for pair, n in enumerate(lengths):
            rows[min(count - 1, int((start + n / 2) * count // total))].append(pair)
            start += n
        rows = [row for row in rows if row]
        if all(len(row) == 1 or sum(lengths[i] for i in row) <= max_tokens for row in rows):
            return rows
    return [[pair] for pair in range(len(lengths))]
