"""PEFT policies on tiny models of real architectures.

For each policy, exactly which parameters get gradients; LoRA options reaching peft's modules;
target names per family and their errors; QLoRA's 4-bit requirement and k-bit preparation; encoder
top layers; gradient checkpointing (gradients still reach the ECG tokens, layers recompute); a
LoRA / QLoRA checkpoint round trip through Lightning that holds only trainable weights; and the
YAML in docs/peft.md parsed and instantiated.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.encoders import RawECGEncoder, Wav2Vec2ECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.peft import (
    LoRA,
    PEFTPolicy,
    ProjectionOnly,
    count_parameters,
    encoder_top_layers,
    frozen_part_mode,
)
from ecglm.testing import bound_prompt

REPO = Path(__file__).resolve().parents[1]
K = 2  # ECG tokens per sample

QWEN3_5 = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
}
GEMMA4_TEXT = {
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "sliding_window": 16,
    "global_head_dim": 16,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 49152,
    "num_kv_shared_layers": 2,  # layers 2 and 3 reuse the keys and values of earlier layers
}
FAMILIES = {"llama": {}, "qwen3_5_text": QWEN3_5, "gemma4_text": GEMMA4_TEXT}

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
DELTANET = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
PER_LAYER = ["per_layer_input_gate", "per_layer_projection"]


def layer_names(layers, modules) -> list[str]:
    return [f"model.layers.{i}.{m}" for i in layers for m in modules]


#: Every linear layer of each tiny decoder, written out: what "all-linear" must adapt.
LINEAR_LAYERS = {
    "llama": layer_names((0, 1), [f"self_attn.{a}" for a in ATTENTION] + [f"mlp.{m}" for m in MLP]),
    # Layer 0 is Gated DeltaNet (linear attention), layer 1 full attention.
    "qwen3_5_text": layer_names([0], [f"linear_attn.{m}" for m in DELTANET])
    + layer_names([1], [f"self_attn.{a}" for a in ATTENTION])
    + layer_names((0, 1), [f"mlp.{m}" for m in MLP]),
    # Layers 2 and 3 share keys and values: no k_proj / v_proj of their own.
    "gemma4_text": layer_names((0, 1), [f"self_attn.{a}" for a in ATTENTION])
    + layer_names((2, 3), ["self_attn.q_proj", "self_attn.o_proj"])
    + layer_names(range(4), [f"mlp.{m}" for m in MLP] + PER_LAYER)
    + ["model.per_layer_model_projection"],
}


def items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    questions = ["What is the heart rate category of this ECG?", "Is the rhythm regular? Answer briefly."]
    return [
        {
            "key": f"ecg{i}",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": questions[i % 2],
            "answer": ["tachycardia", "irregular"][i % 2],
            "question_type": "x",
        }
        for i in range(n)
    ]


def make_encoder(seed: int = 0, layer_norm_first: bool = False) -> Wav2Vec2ECGEncoder:
    """Two transformer layers, so that "the top layer" is not the whole stack."""
    torch.manual_seed(seed)
    return Wav2Vec2ECGEncoder(
        conv_layers=[(16, 10, 5), (16, 5, 5)],
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        dropout=0.0,
        conv_pos_kernel=4,
        conv_pos_groups=2,
        layer_norm_first=layer_norm_first,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy 2-core machine two threads are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_llama(tiny_backbone_factory, tmp_path_factory) -> str:
    """A tiny Llama saved as from_pretrained reads it: a pretrained backbone, loadable in 4 bits."""
    folder = tmp_path_factory.mktemp("llama")
    tiny = tiny_backbone_factory("llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return str(folder)


def load_4bit(folder: str, dtype: str = "float32") -> HFBackbone:
    return HFBackbone(folder, quantization="nf4", dtype=dtype, bnb_compute_dtype="float32")


def build(backbone: HFBackbone, policy: PEFTPolicy, seed: int = 0) -> ECGLanguageModel:
    encoder = make_encoder(seed)
    torch.manual_seed(seed)
    return ECGLanguageModel(encoder, MLPConnector(num_tokens=K, hidden_dim=32), backbone, policy)


def adapters(layers: list[str], dora: bool = False) -> set[str]:
    kinds = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if dora else [])
    return {f"backbone.model.{layer}.{kind}.default.weight" for layer in layers for kind in kinds}


def names_under(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


# --- which parameters train -------------------------------------------------------------------------

POLICIES = {
    "projection-only": ("llama", lambda: ProjectionOnly()),
    "projection-only+encoder": ("llama", lambda: ProjectionOnly(train_encoder=True)),
    "projection-only+top-layer": ("llama", lambda: ProjectionOnly(encoder_top_layers=1)),
    "lora-attention": ("llama", lambda: LoRA(r=4, alpha=8)),
    "lora-all-linear-qwen3.5": ("qwen3_5_text", lambda: LoRA(r=4, alpha=8, target_modules="all-linear")),
    "lora-all-linear-gemma4": ("gemma4_text", lambda: LoRA(r=4, alpha=8, target_modules="all-linear")),
    "dora-attention+mlp": ("llama", lambda: LoRA(4, 8, target_modules=ATTENTION + MLP, use_dora=True)),
    "qlora": ("llama-4bit", lambda: LoRA(r=4, alpha=8, kbit=True)),
}


def expected_trainable(case: str, model: ECGLanguageModel) -> set[str]:
    connector = names_under(model, "connector.")
    family = POLICIES[case][0].removesuffix("-4bit")
    attention = [n for n in LINEAR_LAYERS[family] if n.rsplit(".", 1)[-1] in ATTENTION]
    return {
        "projection-only": connector,
        "projection-only+encoder": connector | names_under(model, "encoder."),
        "projection-only+top-layer": connector | names_under(model, "encoder.encoder.layers.1."),
        "lora-attention": connector | adapters(attention),
        "lora-all-linear-qwen3.5": connector | adapters(LINEAR_LAYERS["qwen3_5_text"]),
        "lora-all-linear-gemma4": connector | adapters(LINEAR_LAYERS["gemma4_text"]),
        "dora-attention+mlp": connector | adapters(LINEAR_LAYERS["llama"], dora=True),
        "qlora": connector | adapters(attention),
    }[case]


@pytest.mark.parametrize("case", list(POLICIES))
def test_gradients_reach_exactly_the_policy_parameters(case, tiny_backbone_factory, saved_llama):
    family, policy = POLICIES[case]
    if family == "llama-4bit":
        backbone = load_4bit(saved_llama)
    else:
        backbone = tiny_backbone_factory(family, config_overrides=FAMILIES[family])
    model = build(backbone, policy())
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    model(QACollator(bound_prompt(backbone), K)(items(2))).loss.backward()

    expected = expected_trainable(case, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == expected, (sorted(trainable - expected), sorted(expected - trainable))
    assert with_grad == expected
    silent = [n for n in expected if not model.get_parameter(n).grad.abs().sum() > 0]
    assert not silent, f"trainable but zero gradient: {silent}"
    # Counts see through 4-bit packing: total is the plain model's count plus the adapters.
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(model.get_parameter(n).numel() for n in expected)
    if family == "llama-4bit":
        plain = build(HFBackbone(saved_llama), ProjectionOnly())
        adapter_count = sum(model.get_parameter(n).numel() for n in expected if ".lora_" in n)
        assert n_total == count_parameters(plain)[1] + adapter_count


# --- LoRA options and targets -----------------------------------------------------------------------


def test_rank_alpha_dropout_and_dora_reach_the_lora_modules(tiny_backbone_factory):
    from peft.tuners.lora import LoraLayer

    policy = LoRA(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = build(tiny_backbone_factory("llama"), policy)
    layers = {n: m for n, m in model.backbone.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == policy.targets == layer_names((0, 1), ["self_attn.q_proj", "self_attn.v_proj"])
    for layer in layers.values():
        assert layer.r["default"] == 8 and layer.scaling["default"] == 16 / 8
        dropout = layer.lora_dropout["default"]
        assert isinstance(dropout, nn.Dropout) and dropout.p == 0.1
        assert layer.use_dora["default"]
    # The model keeps its class and methods; the adapted weight moves to base_layer.
    assert type(model.backbone.model).__name__ == "LlamaForCausalLM"
    keys = set(model.backbone.model.state_dict())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    no_dropout = build(tiny_backbone_factory("llama"), LoRA(dropout=0.0))
    layer = no_dropout.backbone.model.get_submodule("model.layers.0.self_attn.k_proj")
    assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_adapters_train_in_float32_over_a_bfloat16_llm(tiny_backbone_factory):
    backbone = tiny_backbone_factory("llama", dtype="bfloat16")
    model = build(backbone, LoRA(r=4, alpha=8, use_dora=True))
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
    assert adapter_dtypes == {torch.float32}
    assert model.backbone.model.get_submodule("model.layers.0.self_attn.q_proj.base_layer").weight.dtype == (
        torch.bfloat16
    )
    model.train()
    model(QACollator(bound_prompt(backbone), K)(items(2))).loss.backward()
    lora_a = model.backbone.model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight
    assert lora_a.grad is not None and lora_a.grad.dtype == torch.float32


def test_qwen3_5_attention_targets_only_its_full_attention_layers(tiny_backbone_factory):
    policy = LoRA(target_modules=ATTENTION + MLP)
    build(tiny_backbone_factory("qwen3_5_text", config_overrides=QWEN3_5), policy)
    # The Gated DeltaNet layer has other projection names; adapting it takes in_proj_qkv, ... by name.
    assert not any("linear_attn" in t for t in policy.targets)
    assert len(policy.targets) == 4 + 2 * 3
    deltanet = LoRA(target_modules=["in_proj_qkv", "in_proj_z", "out_proj"])
    build(tiny_backbone_factory("qwen3_5_text", config_overrides=QWEN3_5), deltanet)
    chosen = ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"]
    assert deltanet.targets == layer_names([0], chosen)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["q_proj", "qkv_proj"], r"\['qkv_proj'\] match no linear layer .*: .*layers\.N\.self_attn\.q_proj"),
        (["embed_tokens"], r"they name model\.embed_tokens \(Embedding\), which LoRA never adapts"),
        (["lm_head"], r"they name lm_head \(Linear\), which LoRA never adapts"),
    ],
)
def test_targets_that_name_no_decoder_linear_layer_are_refused(targets, message, tiny_backbone_factory):
    with pytest.raises(ValueError, match=message):
        build(tiny_backbone_factory("llama"), LoRA(target_modules=targets))


def test_all_linear_leaves_out_embeddings_and_lm_head(tiny_backbone_factory):
    policy = LoRA(target_modules="all-linear")
    model = build(tiny_backbone_factory("llama"), policy)
    assert policy.targets == sorted(LINEAR_LAYERS["llama"])
    lm = model.backbone.model
    assert type(lm.lm_head) is nn.Linear and type(lm.get_input_embeddings()) is nn.Embedding


def test_lora_on_the_multimodal_gemma4_class_stays_in_the_language_model(tokenizer_dir):
    from test_backbones import gemma4_multimodal

    policy = LoRA(target_modules="all-linear")
    model = build(gemma4_multimodal(tokenizer_dir), policy)
    assert policy.targets and all(t.startswith("model.language_model.") for t in policy.targets)
    assert not any(t.startswith("model.vision") or t.startswith("model.audio") for t in policy.targets)
    batch = QACollator(bound_prompt(model.backbone), K, for_generation=True)(items(2))
    assert len(model.model.generate(batch, max_new_tokens=2)) == 2  # generate still splices the ECG


# --- QLoRA ------------------------------------------------------------------------------------------


def test_qlora_needs_a_4bit_backbone_and_a_4bit_backbone_needs_qlora(tiny_backbone_factory, saved_llama):
    with pytest.raises(ValueError, match=r"model\.backbone\.init_args\.quantization: nf4"):
        build(tiny_backbone_factory("llama"), LoRA(kbit=True))
    with pytest.raises(ValueError, match=r"QLoRA: set model\.policy\.init_args\.kbit: true"):
        build(load_4bit(saved_llama), LoRA())


def test_qlora_casts_the_unquantised_weights_to_float32_and_generates(saved_llama):
    import bitsandbytes as bnb

    backbone = load_4bit(saved_llama, dtype="bfloat16")
    assert backbone.model.model.norm.weight.dtype == torch.bfloat16
    model = build(backbone, LoRA(r=4, alpha=8, kbit=True, use_dora=True, gradient_checkpointing=True))
    lm = model.backbone.model
    assert lm.model.norm.weight.dtype == lm.get_input_embeddings().weight.dtype == torch.float32
    assert isinstance(lm.get_submodule("model.layers.0.self_attn.q_proj.base_layer"), bnb.nn.Linear4bit)
    model.train()
    model(QACollator(bound_prompt(backbone), K)(items(2))).loss.backward()
    assert model.connector.mlp[0].weight.grad.abs().sum() > 0
    model.eval()
    batch = QACollator(bound_prompt(backbone), K, for_generation=True)(items(2))
    assert len(model.model.generate(batch, max_new_tokens=2)) == 2


# --- encoder fine-tuning ----------------------------------------------------------------------------


def test_encoder_top_layers_are_the_last_transformer_layers():
    post_ln = make_encoder()
    assert encoder_top_layers(post_ln, 1) == [post_ln.encoder.layers[1]]
    # Pre-LN: the norm after the layers belongs to the top; post-LN: the norm comes before layer 0.
    pre_ln = make_encoder(layer_norm_first=True)
    assert encoder_top_layers(pre_ln, 2) == [*pre_ln.encoder.layers, pre_ln.encoder.layer_norm]
    with pytest.raises(ValueError, match="between 1 and 2"):
        encoder_top_layers(post_ln, 3)
    with pytest.raises(TypeError, match=r"RawECGEncoder has neither.*train_encoder: true"):
        encoder_top_layers(RawECGEncoder(), 1)
    with pytest.raises(ValueError, match="at least 1"):
        ProjectionOnly(encoder_top_layers=0)

    class Stacked(RawECGEncoder):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))

        def top_layers(self, n):
            return list(self.blocks[-n:])

    stacked = Stacked()
    ProjectionOnly(encoder_top_layers=2).apply(stacked, MLPConnector(), _FrozenBackbone())
    assert [p.requires_grad for p in stacked.blocks.parameters()] == [False, False, True, True, True, True]


class _FrozenBackbone(nn.Module):
    """Stands in for a backbone where only requires_grad on the encoder matters."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)


# --- gradient checkpointing -------------------------------------------------------------------------


def layer_calls(model: ECGLanguageModel) -> list[int]:
    """Counts the calls of decoder layer 0's MLP: a checkpointed layer runs again in the backward pass.

    A pre-hook, because the recomputation stops (raises inside the layer) once it has rebuilt the
    last saved tensor, so the MLP's forward never returns there.
    """
    calls = [0]
    mlp = model.backbone.model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("train_connector", [True, False])
def test_gradient_checkpointing_recomputes_and_gradients_still_flow(train_connector, tiny_backbone_factory):
    batch = QACollator(bound_prompt(tiny_backbone_factory("llama")), K)(items(2))
    grads, counts = [], []
    for checkpointing in (False, True):
        policy = LoRA(4, 8, 0.0, train_connector=train_connector, gradient_checkpointing=checkpointing)
        model = build(tiny_backbone_factory("llama"), policy)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        calls = layer_calls(model)
        model(batch).loss.backward()
        counts.append(calls[0])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert counts == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("connector.") for n in grads[1]) == train_connector
    for name, grad in grads[0].items():
        assert grads[1][name] is not None and grads[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_a_frozen_llm_recomputes_in_training_without_dropout(tiny_backbone_factory):
    """Projection-only with checkpointing: the frozen LLM is in eval mode, its layers still recompute."""
    overrides = {"attention_dropout": 0.5}  # would change every forward if dropout ran
    batch = QACollator(bound_prompt(tiny_backbone_factory("llama")), K)(items(2))
    reference = build(tiny_backbone_factory("llama", config_overrides=overrides), ProjectionOnly())
    reference.train()
    reference(batch).loss.backward()
    backbone = tiny_backbone_factory("llama", config_overrides=overrides)
    model = build(backbone, ProjectionOnly(gradient_checkpointing=True))
    model.train()
    frozen_part_mode(model.backbone, training=True)  # what ECGLanguageModel.train does for frozen parts
    calls = layer_calls(model)
    loss = model(batch).loss
    loss.backward()
    assert calls[0] == 2
    torch.testing.assert_close(loss, reference(batch).loss)
    for name, p in reference.connector.named_parameters():
        torch.testing.assert_close(model.connector.get_parameter(name).grad, p.grad, rtol=1e-4, atol=1e-6)
    frozen_part_mode(model.backbone, training=False)
    assert not any(m.training for m in model.backbone.modules())


def test_checkpointing_needs_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ProjectionOnly(gradient_checkpointing=True).apply(make_encoder(), MLPConnector(), _FrozenBackbone())


# --- checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kbit", [False, True], ids=["lora", "qlora-dora"])
def test_checkpoint_holds_the_adapters_and_reloads_exactly(kbit, saved_llama, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    def policy() -> LoRA:
        return LoRA(4, 8, 0.0, ["q_proj", "v_proj", "down_proj"], use_dora=kbit, kbit=kbit)

    def backbone() -> HFBackbone:
        return load_4bit(saved_llama) if kbit else HFBackbone(saved_llama)

    model = build(backbone(), policy())
    loader = DataLoader(items(2), batch_size=2, collate_fn=QACollator(bound_prompt(model.backbone), K))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model.hparams.learning_rate = 1e-2  # one visible step
    trainer.fit(model, loader)
    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)

    saved = set(torch.load(path, weights_only=False)["state_dict"])
    backbone_keys = {k for k in saved if k.startswith("backbone.")}
    assert backbone_keys == adapters(
        layer_names((0, 1), ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
        dora=kbit,
    )
    # A random encoder has no pretrained source: it is saved whole.
    assert {k.split(".")[0] for k in saved} == {"encoder", "connector", "backbone"}
    trained_b = model.backbone.model.get_submodule("model.layers.0.self_attn.q_proj").lora_B["default"].weight
    assert trained_b.abs().sum() > 0, "the step must have moved lora_B off its zero initialisation"

    rebuilt = ECGLanguageModel.load_from_checkpoint(
        path,
        encoder=make_encoder(seed=1),
        connector=MLPConnector(num_tokens=K, hidden_dim=32),
        backbone=backbone(),
        policy=policy(),
    )
    assert saved == rebuilt.model.persistent_keys()
    batch = QACollator(bound_prompt(model.backbone), K)(items(3, seed=1))
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(batch).logits, model(batch).logits)


# --- docs -------------------------------------------------------------------------------------------


def peft_entry_points() -> dict[str, str]:
    """``name -> module.Class`` from pyproject.toml's ``ecglm.peft`` table (not the installed metadata)."""
    text = (REPO / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."ecglm.peft"]', 1)[1].split("\n[", 1)[0]
    return {k: v.replace(":", ".") for k, v in re.findall(r'^([\w-]+) = "([\w.:]+)"$', table, re.M)}


def test_every_yaml_policy_in_the_docs_parses_and_applies(saved_llama, tiny_backbone_factory):
    import yaml
    from jsonargparse import ArgumentParser

    entry_points = peft_entry_points()
    assert {"projection-only": "ecglm.peft.ProjectionOnly", "lora": "ecglm.peft.LoRA"}.items() <= (
        entry_points.items()
    )
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "peft.md").read_text(), re.S)
    assert len(blocks) >= 7
    parser = ArgumentParser()
    parser.add_argument("--policy", type=PEFTPolicy)
    for block in blocks:
        model_cfg = yaml.safe_load(block)["model"]
        spec = dict(model_cfg["policy"])
        spec["class_path"] = entry_points[spec["class_path"]]
        policy = parser.instantiate_classes(parser.parse_object({"policy": spec})).policy
        quantized = model_cfg.get("backbone", {}).get("init_args", {}).get("quantization")
        backbone = load_4bit(saved_llama) if quantized else tiny_backbone_factory("llama")
        model = build(backbone, policy)
        assert 0 < count_parameters(model)[0] < count_parameters(model)[1], block


def test_adapters_need_a_backbone_that_declares_its_transformers_model():
    """``Backbone.transformers_model`` is the declared hook; a backbone without one is named in the error."""
    from ecglm.backbones import Backbone

    class Bare(Backbone):
        def __init__(self):
            super().__init__()
            self.hidden_size = 8

        def embed_tokens(self, input_ids):
            raise NotImplementedError

        def forward(self, *args, **kwargs):
            raise NotImplementedError

        def generate(self, *args, **kwargs):
            raise NotImplementedError

    assert Bare().transformers_model is None
    for policy in (LoRA(), ProjectionOnly(gradient_checkpointing=True)):
        with pytest.raises(TypeError, match=r"Backbone\.transformers_model.*Bare wraps none"):
            policy.apply(RawECGEncoder(), MLPConnector(), Bare())
