"""Padding-free (packed) training batches: the padded batch's loss and gradients, from one row."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from ecglm import ECGLM
from ecglm.batch import IGNORE_INDEX, pack
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.peft import LoRA
from ecglm.testing import bound_prompt
from ecglm.wiring import connect
from ecglm_testing import FAMILIES

K = 2  # ECG tokens per ECG


def _items() -> list[dict]:
    """QA pairs of different lengths, one a comparison question with two ECGs."""
    rng = np.random.default_rng(0)
    questions = [
        ("What is the heart rate?", "tachycardia"),
        ("Is the rhythm regular? Answer in one word, please, and say nothing else at all.", "irregular"),
        ("Which leads show ST elevation?", ["V1", "V2", "V3"]),
        ("Does the second ECG differ from the first?", "yes"),
    ]
    return [
        {
            "key": f"ecg{i}_qa0",
            "ecg": rng.standard_normal((2, 12, 2500) if i == 3 else (12, 2500)).astype(np.float16),
            "question": q,
            "answer": a,
            "question_type": "x",
        }
        for i, (q, a) in enumerate(questions)
    ]


def _model(family, tiny_backbone_factory, tiny_encoder_factory) -> ECGLM:
    # Larger random weights than the default init: logits far from uniform, so that a pair attending
    # to another pair's tokens changes the loss by far more than the tolerance.
    overrides = {**FAMILIES[family], "initializer_range": 0.2}
    backbone = tiny_backbone_factory(family, config_overrides=overrides)
    torch.manual_seed(1)
    policy = LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.0, train_connector=True)
    return ECGLM(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone, policy).train()


def test_packed_rows_have_the_layout_of_transformers_flattening_collator(tiny_backbone_factory):
    backbone = tiny_backbone_factory("llama")
    padded = QACollator(bound_prompt(backbone), K)(_items())
    packed = pack(padded)
    real = padded.attention_mask.bool()
    lengths = real.sum(1).tolist()
    assert packed.rows == 1 and packed.input_ids.shape[1] == sum(lengths)  # no padding left
    # The reference: transformers' own collator for padding-free batches, on the same token rows.
    features = [
        {"input_ids": ids[m].tolist(), "labels": labels[m].tolist()}
        for ids, labels, m in zip(padded.input_ids, padded.labels, real, strict=True)
    ]
    reference = DataCollatorWithFlattening(return_position_ids=True)(features)
    assert torch.equal(packed.input_ids, reference["input_ids"])
    assert torch.equal(packed.position_ids, reference["position_ids"])
    assert torch.equal(packed.labels, reference["labels"])
    # Every answer token is still supervised, and every ECG position kept (5 ECGs x K).
    assert int((packed.labels != IGNORE_INDEX).sum()) == int((padded.labels != IGNORE_INDEX).sum())
    assert int(packed.ecg_mask.sum()) == 5 * K == int(padded.ecg_mask.sum())
    assert packed.key == padded.key and torch.equal(packed.ecg, padded.ecg)
    assert torch.equal(pack(packed).input_ids, packed.input_ids)  # packing twice changes nothing
    again = QACollator(bound_prompt(backbone), K, packed=True)(_items())
    assert torch.equal(again.input_ids, packed.input_ids) and torch.equal(again.labels, packed.labels)


def test_bounded_rows_keep_pairs_whole_in_batch_order(tiny_backbone_factory):
    backbone = tiny_backbone_factory("llama")
    padded = QACollator(bound_prompt(backbone), K)(_items())
    lengths = padded.attention_mask.sum(1).tolist()
    bound = max(lengths[0] + lengths[1], lengths[2] + lengths[3])  # two pairs per row
    assert sum(lengths[:3]) > bound
    packed = pack(padded, max_tokens=bound, pad_token_id=backbone.pad_token_id)
    assert packed.rows == 2 and packed.input_ids.shape[1] == max(bound, lengths[2] + lengths[3])
    one_row = pack(padded)
    for field in ("input_ids", "labels", "ecg_mask", "position_ids"):
        rows = getattr(packed, field)[packed.attention_mask.bool()]  # real positions, row after row
        assert torch.equal(rows, getattr(one_row, field)[0]), field
    pad = ~packed.attention_mask.bool()
    assert (packed.labels[pad] == IGNORE_INDEX).all() and not packed.ecg_mask[pad].any()
    assert (packed.input_ids[pad] == backbone.pad_token_id).all()


@pytest.mark.parametrize("bounded", [False, True], ids=["one-row", "two-rows"])
@pytest.mark.parametrize("family", ["llama", "gemma4_text"])
def test_packed_loss_and_gradients_equal_the_padded_ones(
    family, bounded, tiny_backbone_factory, tiny_encoder_factory
):
    """Llama, and Gemma 4 with sliding-window layers, shared KV layers and per-layer embeddings; one
    row per batch, and two rows of two pairs (the shorter padded at the end)."""
    model = _model(family, tiny_backbone_factory, tiny_encoder_factory)
    padded = QACollator(bound_prompt(model.backbone), K)(_items())
    lengths = padded.attention_mask.sum(1).tolist()
    bound = max(lengths[0] + lengths[1], lengths[2] + lengths[3]) if bounded else None
    packed = pack(padded, bound, pad_token_id=model.backbone.pad_token_id)
    assert packed.rows == (2 if bounded else 1)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (packed_loss, packed_grads) = results
    assert loss.item() > 1.0  # a real loss of random weights over a 49k vocabulary
    # Tolerance: float32 summation order differs between the two layouts.
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-5)
    assert {n for n in grads if "lora" in n} and any(n.startswith("connector") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_row_that_leaked_across_pairs_would_be_caught(tiny_backbone_factory, tiny_encoder_factory):
    """The equality above is not vacuous: the same row with one position numbering (one long
    sequence, every pair attending to the pairs before it) gives another loss."""
    model = _model("llama", tiny_backbone_factory, tiny_encoder_factory)
    packed = pack(QACollator(bound_prompt(model.backbone), K)(_items()))
    with torch.no_grad():
        separate = model(packed).loss
        joined = model(replace(packed, position_ids=torch.arange(packed.input_ids.shape[1])[None])).loss
    assert abs(separate.item() - joined.item()) > 0.05  # measured 0.84; the equality holds to 1e-6


def test_linear_attention_layers_refuse_packed_rows(tiny_backbone_factory, tiny_encoder_factory):
    """Qwen3.5's Gated DeltaNet layers carry their state from one pair into the next: refused, at
    connect time (before training) and at the forward pass."""
    model = _model("qwen3_5_text", tiny_backbone_factory, tiny_encoder_factory)
    packed = pack(QACollator(bound_prompt(model.backbone), K)(_items()))
    with pytest.raises(ValueError, match=r"qwen3_5_text has linear_attention layers.*packed: false"):
        model(packed)
    task = SimpleNamespace(model=model, backbone=model.backbone, connect_data=lambda **_: None)
    with pytest.raises(ValueError, match="linear_attention"):
        connect(task, SimpleNamespace(packed=True))
    connect(task, SimpleNamespace(packed=False))  # padded batches are fine


def test_prefix_reuse_and_packing_are_not_combined(tiny_backbone_factory, tiny_encoder_factory):
    model = _model("llama", tiny_backbone_factory, tiny_encoder_factory)
    model.backbone.prefix_reuse = True  # what the few-shot connector policy sets (its default)
    packed = pack(QACollator(bound_prompt(model.backbone), K)(_items()))
    with pytest.raises(ValueError, match="prefix_reuse: false"):
        model(packed)


def test_generation_and_validation_batches_are_not_packed(tiny_backbone_factory, tiny_encoder_factory):
    model = _model("llama", tiny_backbone_factory, tiny_encoder_factory)
    prompt = bound_prompt(model.backbone)
    with pytest.raises(ValueError, match="only teacher-forced"):
        QACollator(prompt, K, for_generation=True, packed=True)
    with pytest.raises(ValueError, match="only teacher-forced"):
        pack(QACollator(prompt, K, with_prompts=True)(_items()))
    with pytest.raises(ValueError, match="generate from padded prompts"):
        model.generate(pack(QACollator(prompt, K)(_items())))
