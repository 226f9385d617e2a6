"""``ecglm.testing``, what plugin authors test against: tiny fixtures, and contract checks that pass
for every built-in component and catch each way a component can break its contract."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor, nn

from ecglm.backbones import HFBackbone
from ecglm.connectors import EncoderFreeConnector, LinearConnector, MLPConnector
from ecglm.encoders import ECGEncoder, RawECGEncoder
from ecglm.peft import LoRA, PEFTPolicy, ProjectionOnly, set_trainable
from ecglm.testing import (
    ContractError,
    byte_tokenizer,
    check_backbone,
    check_connector,
    check_encoder,
    check_policy,
    tiny_backbone,
    tiny_causal_lm,
    tiny_encoder,
)


def test_imports_neither_lightning_nor_pytest():
    code = textwrap.dedent(
        """
        import sys
        import ecglm.testing
        above = {"lightning", "pytorch_lightning", "pytest"}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in above)
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_byte_tokenizer_round_trips_any_text_and_is_deterministic():
    tok = byte_tokenizer()
    text = "Sinus rhythm at 72 bpm; QRS 96 ms. Ünusual axis: \u221230°. <think>x</think>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids == byte_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (
        rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_suite_and_plugins_test_at_the_same_sizes():
    import ecglm.testing
    import ecglm_testing

    assert ecglm_testing.TINY == ecglm.testing.TINY
    assert ecglm_testing.SMOLLM2_GGUF == ecglm.testing.SMOLLM2_GGUF


def test_tiny_lms_are_the_real_classes_at_tiny_sizes():
    model = tiny_causal_lm("qwen3", vocab_size=100)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 100)
    torch.testing.assert_close(tiny_causal_lm("qwen3", vocab_size=100).lm_head.weight, model.lm_head.weight)
    state = torch.random.get_rng_state()
    tiny_causal_lm()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone


@pytest.fixture(scope="module")
def backbone() -> HFBackbone:
    return tiny_backbone()


def test_every_builtin_keeps_its_contract(backbone):
    assert check_encoder(tiny_encoder()).shape == (2, 99, 32)
    assert check_encoder(RawECGEncoder()).shape == (2, 2500, 12)
    assert check_connector(MLPConnector(num_tokens=2, pooling="attention")).shape == (2, 2, 64)
    assert check_connector(LinearConnector(num_tokens=3)).shape == (2, 3, 64)
    assert check_connector(EncoderFreeConnector(num_tokens=2), input_dim=12, num_frames=2500).shape == (
        2,
        2,
        64,
    )
    assert torch.isfinite(check_backbone(backbone))
    assert check_policy(ProjectionOnly(), backbone=backbone)["backbone"] == []
    trainable = check_policy(LoRA(r=2), backbone=tiny_backbone())
    assert (
        trainable["encoder"] == [] and len(trainable["backbone"]) == 16
    )  # A and B of 4 projections, 2 layers
    assert all("lora_" in name for name in trainable["backbone"])


def test_the_smollm2_tokenizer_works_as_well(tokenizer_dir):
    backbone = tiny_backbone(tokenizer=tokenizer_dir)
    assert backbone.model.config.vocab_size == 49152
    check_backbone(backbone)


class Encoder(ECGEncoder):
    """A small valid encoder; each test breaks one thing."""

    def __init__(self, output_dim: int = 8):
        super().__init__()
        self.output_dim = output_dim
        self.conv = nn.Conv1d(12, 8, 50, stride=50)
        self.unused = nn.Linear(2, 2)

    def forward(self, ecg: Tensor) -> Tensor:
        return self.conv(ecg).transpose(1, 2)


class BatchMixingEncoder(Encoder):
    def forward(self, ecg: Tensor) -> Tensor:
        frames = super().forward(ecg)
        return frames - frames.mean(0)  # statistics over the batch, as a BatchNorm in training mode


def test_encoder_contract_violations_are_named():
    del_unused = Encoder()
    del del_unused.unused
    assert check_encoder(del_unused).shape == (2, 50, 8)
    with pytest.raises(
        ContractError,
        match=r"no gradient reaches the trainable parameters \['unused.weight', 'unused.bias'\]",
    ):
        check_encoder(Encoder())
    with pytest.raises(ContractError, match=r"Encoder: output \(2, 50, 8\) for output_dim=16"):
        check_encoder(Encoder(output_dim=16))
    with pytest.raises(ContractError, match="a row's output depends on the other rows"):
        check_encoder(BatchMixingEncoder())


class DetachingConnector(LinearConnector):
    def forward(self, frames: Tensor) -> Tensor:
        return super().forward(frames.detach())


class OneTokenConnector(LinearConnector):
    def forward(self, frames: Tensor) -> Tensor:
        return super().forward(frames)[:, :1]


def test_connector_contract_violations_are_named():
    with pytest.raises(ContractError, match="DetachingConnector: no gradient reaches its input"):
        check_connector(DetachingConnector(num_tokens=2))
    with pytest.raises(ContractError, match=r"output \(2, 1, 64\), expected \(2, 2, 64\)"):
        check_connector(OneTokenConnector(num_tokens=2))


class BlindBackbone(HFBackbone):
    """Never looks at the ECG tokens."""

    def splice(self, input_ids, ecg_mask, ecg_tokens):
        return self.embed_tokens(input_ids) + 0 * ecg_tokens.sum()


class EchoingBackbone(HFBackbone):
    """Returns the prompt with the new tokens."""

    def generate(self, input_ids, attention_mask, ecg_mask, ecg_tokens, **kwargs):
        return torch.cat(
            [input_ids, super().generate(input_ids, attention_mask, ecg_mask, ecg_tokens, **kwargs)], 1
        )


def test_backbone_contract_violations_are_named(backbone):
    with pytest.raises(ContractError, match="BlindBackbone: the loss does not depend on the ECG tokens"):
        check_backbone(tiny_backbone(backbone_class=BlindBackbone))
    with pytest.raises(ContractError, match=r"EchoingBackbone\.generate must return only the new tokens"):
        check_backbone(tiny_backbone(backbone_class=EchoingBackbone))


class FreezesEverything(PEFTPolicy):
    def adapt(self, connector, backbone):
        set_trainable(connector, False)
        set_trainable(backbone, False)


class UnwiredAdapter(ProjectionOnly):
    def adapt(self, connector, backbone):
        super().adapt(connector, backbone)
        backbone.adapter = nn.Linear(4, 4)  # trainable, but the LM never calls it


def test_policy_contract_violations_are_named(backbone):
    with pytest.raises(ContractError, match="FreezesEverything: nothing trains after apply"):
        check_policy(FreezesEverything(), backbone=backbone)
    with pytest.raises(
        ContractError, match=r"UnwiredAdapter: no gradient reaches .*\['adapter.weight', 'adapter.bias'\]"
    ):
        check_policy(UnwiredAdapter(), backbone=tiny_backbone())
