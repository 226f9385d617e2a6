"""Connectors: every pooling, attention pooling's properties, the encoder-free connector end to end
through ECGLanguageModel, an fp32 connector feeding a bf16 backbone, and parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecglm.connectors import (
    POOLINGS,
    AttentionPool,
    EncoderFreeConnector,
    LinearConnector,
    MLPConnector,
    adaptive_average_pool,
)
from ecglm.data.datamodule import QACollator
from ecglm.encoders import RawECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.plugins import discover, resolve_class_paths
from ecglm.testing import bound_prompt

IN, OUT = 16, 24


def items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = [
        ("What is the heart rate category of this ECG?", "tachycardia"),
        ("Is the rhythm regular?", "no"),
    ]
    return [
        {
            "key": f"ecg{i}",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": pairs[i % 2][0],
            "answer": pairs[i % 2][1],
            "question_type": "hr" if i % 2 == 0 else "rhythm",
        }
        for i in range(n)
    ]


def connector(cls, pooling: str, k: int):
    torch.manual_seed(0)
    return cls(num_tokens=k, pooling=pooling, input_dim=IN, output_dim=OUT).eval()


# --- pooling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MLPConnector, LinearConnector])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_gives_k_tokens_of_the_output_width(cls, pooling):
    k = 1 if pooling == "mean" else 3
    frames = torch.randn(2, 37, IN)
    assert connector(cls, pooling, k)(frames).shape == (2, k, OUT)


def test_pooling_choices_are_checked_before_building():
    with pytest.raises(ValueError, match="pooling must be one of"):
        MLPConnector(pooling="max")
    with pytest.raises(ValueError, match="pooling='mean' gives one token"):
        LinearConnector(num_tokens=4, pooling="mean")
    with pytest.raises(ValueError, match="num_heads=5 must divide the pooled width 16"):
        MLPConnector(pooling="attention", num_heads=5, input_dim=IN, output_dim=OUT)


def test_adaptive_average_is_the_mean_of_each_group_of_frames():
    frames = torch.randn(2, 37, IN)
    k, t = 4, 37
    groups = [frames[:, (i * t) // k : math.ceil((i + 1) * t / k)].mean(1) for i in range(k)]
    torch.testing.assert_close(adaptive_average_pool(frames, k), torch.stack(groups, 1))
    mlp = connector(MLPConnector, "adaptive_avg", k)
    torch.testing.assert_close(mlp(frames), mlp.mlp(torch.stack(groups, 1)))
    mean = connector(LinearConnector, "mean", 1)
    torch.testing.assert_close(mean(frames), mean.proj(frames.mean(1, keepdim=True)))


def sharp_pool(num_tokens: int, num_heads: int) -> AttentionPool:
    """An attention pooler whose queries are large enough for attention far from uniform (the
    initial queries are small, so a fresh pooler starts close to the mean)."""
    torch.manual_seed(0)
    pool = AttentionPool(num_tokens, width=IN, num_heads=num_heads).eval()
    with torch.no_grad():
        pool.queries.mul_(100)
    return pool


def test_attention_pooling_attends_to_every_frame_and_ignores_their_order():
    pool = sharp_pool(num_tokens=3, num_heads=4)
    frames = torch.randn(2, 20, IN)
    changed = frames.clone()
    changed[:, 7] = torch.randn(2, IN)
    with torch.no_grad():
        pooled = pool(frames)
        moved = pool(changed)
        permuted = pool(frames[:, torch.randperm(20)])
        one = pool(frames[:, :1])
        repeated = pool(frames[:, :1].expand(-1, 20, -1))

    assert pooled.shape == (2, 3, IN)
    assert ((moved - pooled).abs().amax(-1) > 1e-3).all()  # one frame moves every token of its ECG
    torch.testing.assert_close(permuted, pooled, rtol=1e-5, atol=1e-5)  # no positions: order-free
    torch.testing.assert_close(repeated, one, rtol=1e-5, atol=1e-5)  # a weighted mean of the values
    assert (pooled[:, 0] - pooled[:, 1]).abs().amax() > 1e-2  # each query pools differently


def test_attention_weights_follow_the_keys():
    """Weights sum to one over the frames and are not uniform: the pooler is not a mean."""
    pool = sharp_pool(num_tokens=1, num_heads=1)
    frames = torch.randn(1, 10, IN)
    with torch.no_grad():
        keys = pool.norm(frames)
        _, weights = pool.attn(pool.queries[None], keys, keys)
    assert weights.shape == (1, 1, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1))
    assert weights.max() > 2 / 10


def test_quickstart_connector_arguments_and_state_dict_are_unchanged():
    mlp = MLPConnector(num_tokens=1, hidden_dim=256, input_norm="batch")
    mlp.configure(64, 576)
    # The keys of checkpoints written before pooling became an option: pooling adds none.
    assert set(mlp.state_dict()) == {
        *(f"norm.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
        *(f"mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")),
    }
    assert mlp.pooling == "adaptive_avg"
    assert set(LinearConnector(input_dim=IN, output_dim=OUT).state_dict()) == {"proj.weight", "proj.bias"}


def test_parameter_counts():
    mlp = MLPConnector(num_tokens=1, hidden_dim=256, input_norm="batch")
    assert mlp.num_parameters == 0  # not built yet
    mlp.configure(64, 576)
    assert mlp.num_parameters == 2 * 64 + (64 * 256 + 256) + (256 * 576 + 576)
    attention_pool = 3 * IN + 2 * IN + (3 * IN * IN + 3 * IN) + (IN * IN + IN)  # queries, norm, MHA
    assert connector(LinearConnector, "attention", 3).num_parameters == attention_pool + IN * OUT + OUT
    free = EncoderFreeConnector(num_tokens=2, patch_size=50, hidden_dim=32, input_dim=12, output_dim=OUT)
    assert free.num_parameters == (600 * 32 + 32) + 50 * 32 + (32 * OUT + OUT)


# --- encoder-free ---------------------------------------------------------------------------------------


def test_encoder_free_patches_are_consecutive_samples_over_all_leads():
    free = EncoderFreeConnector(num_tokens=1, patch_size=50, hidden_dim=8, input_dim=12, output_dim=OUT)
    ecg = torch.randn(2, 12, 2500)
    patches = free.patches(RawECGEncoder()(ecg))
    assert patches.shape == (2, 50, 600)
    torch.testing.assert_close(patches[:, 3], ecg[:, :, 150:200].transpose(1, 2).reshape(2, 600))

    whole = EncoderFreeConnector(patch_size=None, hidden_dim=8, input_dim=12, output_dim=OUT)
    assert whole.patches(RawECGEncoder()(ecg)).shape == (2, 1, 30000)
    assert whole(RawECGEncoder()(ecg)).shape == (2, 1, OUT)


def test_encoder_free_refuses_what_it_cannot_patch():
    with pytest.raises(ValueError, match="patch_size=300 must divide num_samples=2500"):
        EncoderFreeConnector(patch_size=300)
    with pytest.raises(ValueError, match="num_tokens=2 is more than the 1 patch"):
        EncoderFreeConnector(num_tokens=2, patch_size=None)
    free = EncoderFreeConnector(patch_size=50, hidden_dim=8, input_dim=12, output_dim=OUT)
    with pytest.raises(ValueError, match=r"expects the raw signal, \(batch, 2500, 12\)"):
        free(torch.randn(2, 156, 768))
    with pytest.raises(ValueError, match=r"\(batch, 12, samples\)"):
        RawECGEncoder()(torch.randn(2, 2500, 12))


def test_encoder_free_entry_points_resolve():
    config = {"model": {"encoder": {"class_path": "raw"}, "connector": {"class_path": "encoder-free"}}}
    resolved = resolve_class_paths(config, discover())
    assert resolved["model"]["encoder"]["class_path"] == "ecglm.encoders.RawECGEncoder"
    assert resolved["model"]["connector"]["class_path"] == "ecglm.connectors.EncoderFreeConnector"


@pytest.fixture(scope="module")
def encoder_free_model(tiny_backbone_factory) -> ECGLanguageModel:
    torch.manual_seed(0)
    free = EncoderFreeConnector(num_tokens=2, patch_size=125, hidden_dim=32, pooling="attention")
    return ECGLanguageModel(RawECGEncoder(), free, tiny_backbone_factory("llama"))


def test_encoder_free_trains_only_the_connector_and_generates(encoder_free_model):
    model = encoder_free_model
    assert (model.connector.input_dim, model.connector.output_dim) == (12, 64)
    assert list(model.encoder.parameters()) == []
    batch = QACollator(bound_prompt(model.backbone), 2)(items(2))

    model.zero_grad()
    loss = model(batch).loss
    loss.backward()

    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name.startswith("connector."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    keys = model.model.persistent_keys()  # the tiny backbone's random weights are in it too
    assert {f"connector.{k}" for k in model.connector.state_dict()} <= keys
    assert not [k for k in keys if k.startswith("encoder.")]

    collate = QACollator(bound_prompt(model.backbone), 2, for_generation=True)
    answers = model.model.generate(collate(items(2)), max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with torch.no_grad():
        real = model.model.ecg_tokens(batch.ecg)
        zeroed = model.model.ecg_tokens(torch.zeros_like(batch.ecg))
    assert not torch.allclose(real, zeroed)


# --- precision -------------------------------------------------------------------------------------------


def test_fp32_connector_feeds_a_bf16_backbone(tiny_backbone_factory, tiny_encoder_factory):
    backbone = tiny_backbone_factory("llama", dtype="bfloat16")
    model = ECGLanguageModel(
        tiny_encoder_factory(), MLPConnector(num_tokens=2, pooling="attention"), backbone
    )
    batch = QACollator(bound_prompt(backbone), 2)(items(2))

    tokens = model.model.ecg_tokens(batch.ecg)
    embeds = backbone.splice(batch.input_ids, batch.ecg_mask, tokens)
    loss = model(batch).loss
    loss.backward()

    assert tokens.dtype == torch.float32 and embeds.dtype == torch.bfloat16  # the cast is in splice
    assert torch.isfinite(loss)
    for name, p in model.connector.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name
