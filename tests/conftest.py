"""Shared fixtures: the real SmolLM2 files, its tokenizer, tiny random models of real architectures."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecglm_testing import REPO, SHARED_DATA, SMOLLM2_GGUF, TINY, shared_data, smollm2_dir  # noqa: F401


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2's real tokenizer and chat template, saved once so tiny models load it quickly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_backbone_factory(tokenizer_dir):
    """``make(model_type, **kwargs)`` -> an HFBackbone with random weights of that architecture."""
    import torch

    from ecglm.backbones import HFBackbone

    def make(model_type: str = "llama", seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        overrides = dict(TINY, vocab_size=49152, **kwargs.pop("config_overrides", {}))
        return HFBackbone(
            model_type, tokenizer=tokenizer_dir, random_init=True, config_overrides=overrides, **kwargs
        )

    return make


@pytest.fixture(scope="session")
def tiny_encoder_factory():
    """``make(seed)`` -> a 2-conv, 1-layer Wav2Vec2ECGEncoder (2500 samples -> 100 frames of 32)."""
    import torch

    from ecglm.encoders import Wav2Vec2ECGEncoder
    from ecglm.testing import TINY_ENCODER

    def make(seed: int = 0) -> Wav2Vec2ECGEncoder:
        torch.manual_seed(seed)
        return Wav2Vec2ECGEncoder(**TINY_ENCODER)

    return make


@pytest.fixture(scope="session")
def image_bundle(tmp_path_factory) -> tuple[Path, str]:
    """A tiny random image bundle (CNN encoder, 2-layer Llama) and the folder of its LLM, which its
    answers need given back (``--override backbone.model=...``): the benchmark runs' model."""
    from ecglm.testing import saved_image_bundle

    bundle, llm = saved_image_bundle(tmp_path_factory.mktemp("bundle"), channels=[8, 16])
    return Path(bundle), llm


@pytest.fixture(scope="session")
def ptb_record() -> Path:
    record = SHARED_DATA / "ptb-s0010" / "s0010_re"
    shared_data(record.with_suffix(".hea"), "the real PTB record")
    return record


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
