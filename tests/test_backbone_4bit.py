"""4-bit (bitsandbytes NF4) backbones across a validation pass: what training sees after eval.

bitsandbytes 0.49+ repacks 4-bit weights for a bf16 inference kernel on AVX512-BF16 CPUs the first
time a layer runs in eval mode without gradients; ecglm turns that off (``keep_4bit_layout_on_cpu``).
These tests run on every CPU; on one without AVX512-BF16 they pass with or without the fix.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from ecglm._quiet import KERNELS_LOOKUP_LOGGER, KERNELS_LOOKUP_MESSAGE, quiet_kernels_lookup
from ecglm.backbones import HFBackbone
from ecglm.testing import bound_prompt
from ecglm_testing import FAMILIES

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_qwen(tiny_backbone_factory, tmp_path_factory) -> str:
    """A tiny Qwen3.5 text model: its linear-attention gates have 4 outputs, not a multiple of 32."""
    backbone = tiny_backbone_factory("qwen3_5_text", config_overrides=FAMILIES["qwen3_5_text"])
    folder = tmp_path_factory.mktemp("qwen3_5_4bit")
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return str(folder)


def _batch(backbone: HFBackbone, rows: int = 2) -> dict[str, torch.Tensor]:
    """Left-padded QA pairs with one ECG position each, as the collator writes them."""
    chats = [
        bound_prompt(backbone).encode(f"Rate {i}?", f"answer {i}", num_ecg_tokens=1) for i in range(rows)
    ]
    width = max(len(c.input_ids) for c in chats)
    batch = {
        "input_ids": torch.full((rows, width), backbone.pad_token_id),
        "attention_mask": torch.zeros((rows, width), dtype=torch.long),
        "ecg_mask": torch.zeros((rows, width), dtype=torch.bool),
        "labels": torch.full((rows, width), -100),
    }
    for row, chat in enumerate(chats):
        start = width - len(chat.input_ids)
        batch["input_ids"][row, start:] = torch.tensor(chat.input_ids)
        batch["labels"][row, start:] = torch.tensor(chat.labels)
        batch["attention_mask"][row, start:] = 1
        batch["ecg_mask"][row, start + chat.ecg_start] = True
    return batch


def test_4bit_layers_keep_training_after_a_validation_pass(saved_qwen):
    """Train step, no-grad eval pass, train step: same loss and the same gradients reach the ECG tokens."""
    import bitsandbytes as bnb

    four = HFBackbone(saved_qwen, quantization="nf4", dtype="float32", bnb_compute_dtype="float32")
    four.requires_grad_(False).eval()  # a frozen LLM stays in eval mode while the connector trains
    batch = _batch(four)
    torch.manual_seed(0)
    ecg = torch.randn(2, 1, four.hidden_size) * 0.02

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = ecg.clone().requires_grad_(True)
        args = (batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens, batch["labels"])
        loss = four(*args).loss
        loss.backward()
        return loss.detach(), tokens.grad

    loss_before, grad_before = step()
    with torch.no_grad():  # validation: the pass in which bitsandbytes would repack the weights
        four(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], ecg)
    layers = [m for m in four.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.out_features % 32 for m in layers)  # shapes the bf16 kernel refuses ran
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    loss_after, grad_after = step()
    torch.testing.assert_close(loss_after, loss_before)
    assert grad_after is not None and grad_after.abs().sum() > 0
    torch.testing.assert_close(grad_after, grad_before)


LOAD_4BIT = """
import logging, sys
from ecglm.backbones import HFBackbone
HFBackbone(sys.argv[1], quantization="nf4", dtype="float32", bnb_compute_dtype="float32")
assert "bitsandbytes.backends.cpu.ops" in sys.modules
"""
#: Then bitsandbytes' logger again: its lookup message (on a CPU where bitsandbytes does not try the
#: lookup), and a real warning, which must still be printed.
LOG_BOTH = f"""
ops = logging.getLogger({KERNELS_LOOKUP_LOGGER!r})
ops.warning("%s: %s. Please `pip install kernels`", {KERNELS_LOOKUP_MESSAGE!r}, "no kernels")
ops.warning("a real bitsandbytes warning")
"""


@pytest.mark.parametrize(
    "script",
    [LOAD_4BIT + LOG_BOTH, "from ecglm.commands import main\nimport logging\n" + LOG_BOTH],
    ids=["4-bit", "command"],
)
def test_the_kernels_lookup_message_is_not_printed(script, saved_qwen):
    """bitsandbytes (0.49+, AVX512-BF16 CPUs) logs a failed lookup of an optional kernel ecglm never uses
    when it is imported; neither loading a 4-bit backbone nor the ``ecglm`` command prints it."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), saved_qwen],
        capture_output=True,
        text=True,
        check=True,
    )
    assert KERNELS_LOOKUP_MESSAGE not in out.stderr
    assert "a real bitsandbytes warning" in out.stderr


def test_the_kernels_lookup_message_is_demoted_to_debug(caplog):
    quiet_kernels_lookup()
    quiet_kernels_lookup()  # once only
    ops = logging.getLogger(KERNELS_LOOKUP_LOGGER)
    assert len(ops.filters) == 1
    with caplog.at_level(logging.WARNING, logger=KERNELS_LOOKUP_LOGGER):
        ops.warning("%s: no kernels", KERNELS_LOOKUP_MESSAGE)
        ops.warning("another message")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "another message")]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=KERNELS_LOOKUP_LOGGER):
        ops.warning("%s: no kernels", KERNELS_LOOKUP_MESSAGE)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, f"{KERNELS_LOOKUP_MESSAGE}: no kernels")
    ]
