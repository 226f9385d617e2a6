"""``ECGLM`` without Lightning: a plain PyTorch step computes what the Lightning task's step computes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch

from ecglm.backbones import HFBackbone
from ecglm.batch import ECGQABatch
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.module import ECGLanguageModel
from ecglm.prompts import ChatTemplate
from ecglm.testing import bound_prompt
from ecglm.wiring import connect

K = 2
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

PLAIN_STEP = """
import sys, torch
from ecglm import ECGLM
from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.encoders import Wav2Vec2ECGEncoder

tokenizer, config, folder = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
encoder = Wav2Vec2ECGEncoder(conv_layers=[(16, 10, 5), (16, 5, 5)], embed_dim=32, num_layers=1, num_heads=2,
                             ffn_dim=64, dropout=0.0, conv_pos_kernel=4, conv_pos_groups=2)
backbone = HFBackbone("llama", tokenizer=tokenizer, random_init=True, config_overrides=config)
model = ECGLM(encoder, MLPConnector(num_tokens=int(sys.argv[4])), backbone)
model.load_state_dict(torch.load(folder + "/weights.pt"))
batch = torch.load(folder + "/batch.pt", weights_only=False)  # an ECGQABatch this test wrote
model.train()
loss = model(batch).loss
loss.backward()
grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
torch.save({"loss": loss.detach(), "grads": grads}, folder + "/plain.pt")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
assert not heavy, heavy
"""


def _items() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "key": f"ecg{i}_qa0",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
            "question": ["What is the heart rate?", "Is the rhythm regular? Answer in one word."][i % 2],
            "answer": ["tachycardia", "irregular"][i % 2],
            "question_type": "x",
        }
        for i in range(3)
    ]


def _batch(task: ECGLanguageModel) -> ECGQABatch:
    return QACollator(bound_prompt(task.backbone), K)(_items())


class Capture(L.Callback):
    """Records the first step's loss and the gradients the optimizer is about to apply."""

    loss: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = outputs["loss"].detach()


def test_a_plain_pytorch_step_equals_the_lightning_step(tmp_path, tokenizer_dir, tiny_encoder_factory):

    config = dict(TINY_LLAMA, vocab_size=49152)
    torch.manual_seed(0)
    backbone = HFBackbone("llama", tokenizer=tokenizer_dir, random_init=True, config_overrides=config)
    task = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone)
    batch = _batch(task)
    torch.save(task.model.state_dict(), tmp_path / "weights.pt")
    torch.save(batch, tmp_path / "batch.pt")
    # The checkpoint keys of the task are the ECGLM's own.
    assert set(task.state_dict()) == set(task.model.state_dict())

    capture = Capture()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))

    code = textwrap.dedent(PLAIN_STEP)
    subprocess.run(
        [sys.executable, "-c", code, tokenizer_dir, repr(config), str(tmp_path), str(K)], check=True
    )
    plain = torch.load(tmp_path / "plain.pt")
    torch.testing.assert_close(plain["loss"], capture.loss)
    assert set(plain["grads"]) == set(capture.grads) and capture.grads
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(grad, capture.grads[name], msg=name)


def test_checkpoints_record_which_distribution_provided_each_part(tokenizer_dir, tiny_encoder_factory):
    import ecglm

    config = dict(TINY_LLAMA, vocab_size=49152)
    backbone = HFBackbone("llama", tokenizer=tokenizer_dir, random_init=True, config_overrides=config)
    task = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone)
    parts = {
        "ecglm.encoders.Wav2Vec2ECGEncoder",
        "ecglm.connectors.MLPConnector",
        "ecglm.backbones.HFBackbone",
        "ecglm.peft.ProjectionOnly",
    }

    def saved_components() -> dict:
        checkpoint = {"state_dict": task.state_dict()}
        task.on_save_checkpoint(checkpoint)
        return checkpoint["ecglm"]["components"]

    assert set(saved_components()) == parts  # no prompt style connected: none recorded
    connect(task, SimpleNamespace(prompt=ChatTemplate()))  # as the ecglm command connects its DataModule
    components = saved_components()
    assert set(components) == parts | {"ecglm.prompts.ChatTemplate"}
    assert {(c["distribution"], c["version"]) for c in components.values()} == {("ecglm", ecglm.__version__)}


def test_a_typed_batch_moves_to_a_device_with_its_prompt_fields(tokenizer_dir, tiny_encoder_factory):
    """What a loop without Lightning does with a batch (Lightning moves dataclasses itself)."""
    backbone = HFBackbone(
        "llama",
        tokenizer=tokenizer_dir,
        random_init=True,
        config_overrides=TINY_LLAMA | {"vocab_size": 49152},
    )
    task = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone)
    batch = _batch(task)
    generation = QACollator(bound_prompt(backbone), K, for_generation=True)(_items())
    moved = generation.to("meta")
    assert type(moved) is ECGQABatch and moved.input_ids.is_meta and moved.text_only.input_ids.is_meta
    assert moved.key == generation.key and generation.input_ids.device.type == "cpu"  # a copy
    assert batch.labels is not None and generation.labels is None
