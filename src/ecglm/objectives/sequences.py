"""Token rows for the RL and preference objectives: prompts cut from training batches, groups of
rows per question, completions appended, their log-probabilities, and the reference policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor

from ecglm.batch import IGNORE_INDEX, ECGQABatch, TokenFields
from ecglm.model import ECGLM
from ecglm.objectives.losses import token_logprobs


def prompt_fields(batch: ECGQABatch) -> TokenFields:
    """The left-padded prompts of a batch: its generation prompts, or, on a teacher-forced batch,
    each row cut before its first supervised token (a conversation's first question)."""
    if batch.prompt is not None:
        return batch.prompt
    if batch.labels is None or batch.packed:
        raise ValueError("prompts are cut from padded teacher-forced batches (labels, not packed)")
    supervised = batch.labels != IGNORE_INDEX
    if not supervised.any(1).all():
        raise ValueError(f"a row of the batch has no answer: {batch.key}")
    ends = supervised.float().argmax(1)
    starts = batch.input_ids.shape[1] - batch.attention_mask.sum(1)
    lengths = ends - starts
    width = int(lengths.max())
    rows = batch.input_ids.shape[0]
    ids = torch.full((rows, width), int(batch.input_ids[0, 0]), dtype=batch.input_ids.dtype)
    ids = ids.to(batch.input_ids.device)
    mask = torch.zeros_like(ids, dtype=batch.attention_mask.dtype)
    ecg_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(rows):
        start, end, n = int(starts[row]), int(ends[row]), int(lengths[row])
        ids[row, width - n :] = batch.input_ids[row, start:end]
        mask[row, width - n :] = 1
        ecg_mask[row, width - n :] = batch.ecg_mask[row, start:end]
    pad = batch.input_ids.masked_select(batch.attention_mask == 0)
    if pad.numel():
        ids = ids.masked_fill(mask == 0, int(pad[0]))
    return TokenFields(ids, mask, ecg_mask)


def repeat_rows(fields: TokenFields, times: int) -> TokenFields:
    """Each row ``times`` times in a row (a group of answers per question)."""
    return TokenFields(
        *(t.repeat_interleave(times, 0) for t in (fields.input_ids, fields.attention_mask, fields.ecg_mask))
    )


def repeat_ecgs(ecg: Tensor, counts: Tensor, times: int) -> Tensor:
    """The ECGs of :func:`repeat_rows`' rows: each row's ECG(s) ``times`` times, in row order."""
    blocks = torch.arange(ecg.shape[0], device=ecg.device).split(counts.tolist())
    return ecg[torch.cat([b for b in blocks for _ in range(times)])]


def completion_mask(tokens: Tensor, eos_ids: set[int]) -> Tensor:
    """``(rows, n)`` bool: the tokens of each generated answer, up to and including its first end
    token (generate pads finished rows after it)."""
    is_end = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_end |= tokens == eos
    before = is_end.long().cumsum(1) - is_end.long()
    return before == 0


def end_token_ids(model: ECGLM) -> set[int]:
    """The ids that end a generated answer: the LM's generation end tokens and the tokenizer's eos."""
    ids: set[int] = set()
    lm = model.backbone.transformers_model
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    if model.backbone.tokenizer.eos_token_id is not None:
        ids.add(model.backbone.tokenizer.eos_token_id)
    return ids


def completion_logprobs(
    model: ECGLM,
    prompt: TokenFields,
    ecg_tokens: Tensor,
    completion: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """``(rows, n)`` log-probabilities of ``completion`` after each left-padded prompt (0 outside
    ``mask``), at ``temperature``: the prompt and the answer in one teacher-forced forward pass."""
    pad = model.backbone.pad_token_id
    n = completion.shape[1]
    out = model.backbone(
        torch.cat([prompt.input_ids, completion.masked_fill(~mask, pad)], 1),
        torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask.dtype)], 1),
        torch.cat([prompt.ecg_mask, torch.zeros_like(mask)], 1),
        ecg_tokens,
        torch.cat(
            [torch.full_like(prompt.input_ids, IGNORE_INDEX), completion.masked_fill(~mask, IGNORE_INDEX)], 1
        ),
    )
    # The logits before each answer token predict it (the backbone keeps the answer span's, or all).
    logp = token_logprobs(out.logits[:, -(n + 1) : -1], completion, temperature)
    return logp * mask


def snapshot_trainable(model: ECGLM) -> dict[str, Tensor]:
    """A detached copy of the trainable weights (connector, adapters, a trained encoder): with the
    frozen rest, the policy as it is now. Never a copy of the LLM's frozen weights."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def reference_policy(model: ECGLM, snapshot: dict[str, Tensor], adapters_off: bool = False) -> Iterator[None]:
    """Within: the model as the reference policy, its trainable weights swapped for ``snapshot``'s
    (:func:`snapshot_trainable` at the start of the run); with ``adapters_off``, LoRA adapters are
    switched off instead of swapped (the reference is then the base LLM, whatever the adapters
    learnt before this run).

    Written here rather than peft's ``PeftModel.disable_adapter()``: ecglm injects adapters in place
    (``inject_adapter_in_model``), so there is no ``PeftModel``; its tuner layers are switched off
    one by one, as that context manager does.
    """
    params = dict(model.named_parameters())
    swapped = {n: v for n, v in snapshot.items() if not (adapters_off and ".lora_" in n)}
    current = {name: params[name].data for name in swapped}
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    layers = layers if adapters_off else []
    try:
        for name, value in swapped.items():
            params[name].data = value
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for name, value in current.items():
            params[name].data = value
        for layer in layers:
            layer.enable_adapters(True)


def answer_rows(model: ECGLM, prompt: TokenFields, answers: list[str]) -> tuple[Tensor, Tensor]:
    """Each answer's tokens as the prompt style writes them (end of turn included), right-padded:
    ``(tokens, mask)`` to append to ``prompt``'s rows (:func:`completion_logprobs`)."""
    if model.prompt is None:
        raise ValueError("answers are written with the model's prompt style (ecglm.wiring.connect sets it)")
    encoded = [model.prompt.answer_tokens(answer) for answer in answers]
    width = max(len(e) for e in encoded)
    tokens = torch.full((len(encoded), width), model.backbone.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = True
    device = prompt.input_ids.device
    return tokens.to(device), mask.to(device)
