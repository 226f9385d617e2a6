"""An imported encoder comes back in eval mode; ECGLanguageModel still trains it with dropout when it trains.

Guards the hand-over between the two layers: ``Wav2Vec2ECGEncoder(checkpoint=...)`` returns eval mode, and
``ECGLanguageModel.train()`` must put an encoder the policy trains back into train mode (a frozen one
stays in eval mode).
"""

from __future__ import annotations

import pytest
import torch

from ecglm.connectors import MLPConnector
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.peft import ProjectionOnly

#: cfg['model'] of tiny_encoder_factory's encoder, in fairseq-signals' field names.
TINY_CFG = {
    "_name": "wav2vec2_cmsc",
    "conv_feature_layers": "[(16, 10, 5), (16, 5, 5)]",
    "encoder_embed_dim": 32,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_embed_dim": 64,
    "conv_pos": 4,
    "conv_pos_groups": 2,
}


@pytest.fixture(scope="module")
def imported_checkpoint(tmp_path_factory, tiny_encoder_factory) -> str:
    path = tmp_path_factory.mktemp("encoder") / "pretrained.pt"
    state = tiny_encoder_factory().state_dict()  # parametrizations spelling, which the loader also reads
    torch.save({"cfg": {"model": TINY_CFG, "task": {"sample_rate": 250}}, "model": state}, path)
    return str(path)


@pytest.mark.parametrize("train_encoder", [False, True], ids=["frozen", "trained"])
def test_language_model_trains_an_imported_encoder_only_when_the_policy_does(
    imported_checkpoint, tiny_backbone_factory, train_encoder
):
    encoder = Wav2Vec2ECGEncoder(checkpoint=imported_checkpoint)
    assert not encoder.training
    connector = MLPConnector(num_tokens=2, hidden_dim=32)
    model = ECGLanguageModel(encoder, connector, tiny_backbone_factory(), ProjectionOnly(train_encoder))
    assert {m.training for m in encoder.modules()} == {train_encoder}
    model.eval()
    model.train()
    assert {m.training for m in encoder.modules()} == {train_encoder}


def test_finetuned_file_without_a_task_rate_takes_the_pretraining_rate():
    from argparse import Namespace

    from ecglm.encoders import fairseq_sample_rate

    hydra = {"cfg": {"task": {"sample_rate": None}, "model": {"w2v_args": {"task": {"sample_rate": 500}}}}}
    assert fairseq_sample_rate(hydra) == 500
    legacy = {"args": Namespace(sample_rate=None, w2v_args=Namespace(sample_rate=500))}
    assert fairseq_sample_rate(legacy) == 500
    own = {"cfg": {"task": {"sample_rate": 250}, "model": {"w2v_args": {"task": {"sample_rate": 500}}}}}
    assert fairseq_sample_rate(own) == 250  # the fine-tuning run's own rate wins
    assert fairseq_sample_rate({"cfg": {"task": {}, "model": {}}}) is None
