"""Import of fairseq-signals / ECG-FM checkpoints into Wav2Vec2ECGEncoder, and the preprocessing contract.

Checkpoints are written here in fairseq-signals' format (``torch.save`` of ``{'cfg', 'model', ...}``
with fairseq's key names and ``cfg['model']`` fields) from a tiny reference encoder, in every
spelling the loader accepts. Outputs are compared with the reference encoder (exactly: the same
operations on the same numbers) and with a functional forward written from fairseq-signals' source.
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ecglm.encoders import (
    CheckpointImportError,
    Preprocessing,
    PreprocessingMismatchWarning,
    Wav2Vec2ECGEncoder,
    check_preprocessing,
    convert_fairseq_state_dict,
    explain_unpickling_error,
    parse_conv_layers,
)

CONV = [(16, 10, 5), (24, 5, 5)]  # 500 samples -> 99 -> 19 frames
#: ``cfg['model']`` of a wav2vec2_cmsc pretraining run, fairseq-signals' field names, tiny sizes.
MODEL_CFG = {
    "_name": "wav2vec2_cmsc",
    "extractor_mode": "default",
    "conv_feature_layers": "[(16, 10, 5)] + [(24, 5, 5)]",
    "in_d": 12,
    "conv_bias": False,
    "feature_grad_mult": 0.1,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "final_dim": 16,
    "layer_norm_first": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.1,
    "dropout_features": 0.1,
    "mask_length": 10,
    "mask_prob": 0.65,
    "conv_pos": 8,
    "conv_pos_groups": 4,
    "quantize_targets": True,
    "latent_vars": 5,
    "latent_groups": 2,
    "latent_temp": [2.0, 0.5, 0.999995],
    "normalize": False,
    "data": "/data/cmsc",
    "args": None,
}
TASK_CFG = {"_name": "ecg_pretraining", "data": "/data/cmsc", "sample_rate": 500, "normalize": False}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32, fairseq-order functional forward vs the module
EXACT = {"rtol": 0.0, "atol": 0.0}  # the same weights through the same module


def reference_encoder(model_cfg: dict, seed: int = 0) -> Wav2Vec2ECGEncoder:
    """The encoder a checkpoint is written from; every weight perturbed so that each one matters."""
    torch.manual_seed(seed)
    encoder = Wav2Vec2ECGEncoder(
        conv_layers=parse_conv_layers(model_cfg["conv_feature_layers"]),
        embed_dim=model_cfg["encoder_embed_dim"],
        num_layers=model_cfg["encoder_layers"],
        num_heads=model_cfg["encoder_attention_heads"],
        ffn_dim=model_cfg["encoder_ffn_embed_dim"],
        conv_pos_kernel=model_cfg["conv_pos"],
        conv_pos_groups=model_cfg["conv_pos_groups"],
        layer_norm_first=model_cfg["layer_norm_first"],
        conv_bias=model_cfg["conv_bias"],
    )
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


def old_weight_norm_state(state: dict, prefix: str, cfg: dict) -> dict:
    """Replace torch's parametrization keys by those ``torch.nn.utils.weight_norm`` writes (weight_g/_v)."""
    dim, kernel = cfg["encoder_embed_dim"], cfg["conv_pos"]
    conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=cfg["conv_pos_groups"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated API is the point
        old = nn.utils.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        old.weight_g.copy_(state.pop(f"{prefix}.parametrizations.weight.original0"))
        old.weight_v.copy_(state.pop(f"{prefix}.parametrizations.weight.original1"))
        old.bias.copy_(state.pop(f"{prefix}.bias"))
    assert set(old.state_dict()) == {"bias", "weight_g", "weight_v"}
    state.update({f"{prefix}.{k}": v.clone() for k, v in old.state_dict().items()})
    return state


def pretraining_extras(cfg: dict) -> dict[str, torch.Tensor]:
    """wav2vec 2.0 pretraining parameters, shaped as fairseq-signals' Wav2Vec2Model makes them."""
    dim, final, groups, num_vars = (
        cfg[k] for k in ("encoder_embed_dim", "final_dim", "latent_groups", "latent_vars")
    )
    feature = parse_conv_layers(cfg["conv_feature_layers"])[-1][0]
    return {
        "mask_emb": torch.rand(dim),
        "quantizer.vars": torch.randn(1, groups * num_vars, final // groups),
        "quantizer.weight_proj.weight": torch.randn(groups * num_vars, feature),
        "quantizer.weight_proj.bias": torch.randn(groups * num_vars),
        "project_q.weight": torch.randn(final, final),
        "project_q.bias": torch.randn(final),
        "target_glu.0.weight": torch.randn(2 * final, final),
        "target_glu.0.bias": torch.randn(2 * final),
        "final_proj.weight": torch.randn(final, dim),
        "final_proj.bias": torch.randn(final),
    }


def fairseq_state(encoder: Wav2Vec2ECGEncoder, cfg: dict, spelling: str) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    if spelling == "parametrizations":
        return state
    state = old_weight_norm_state(state, "conv_pos.pos_conv.0", cfg)
    if spelling == "weight_g_v":
        return state
    if spelling == "pre_2022_encoder_pos_conv":
        return {k.replace("conv_pos.pos_conv.", "encoder.pos_conv."): v for k, v in state.items()}
    state.update(pretraining_extras(cfg))
    if spelling == "pretraining_extras":
        return state
    assert spelling == "finetuned"
    head = {"proj.weight": torch.randn(5, cfg["encoder_embed_dim"]), "proj.bias": torch.randn(5)}
    return {**{f"encoder.{k}": v for k, v in state.items()}, **head}


def write_checkpoint(path, model_state: dict, model_cfg: dict, task_cfg: dict = TASK_CFG, **extra) -> str:
    """A file as fairseq-signals' Trainer.save_checkpoint writes it (plain containers only)."""
    ckpt = {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"seed": 1, "fp16": False},
            "task": copy.deepcopy(task_cfg),
            "model": copy.deepcopy(model_cfg),
            "criterion": {"_name": "wav2vec2_with_cmsc"},
        },
        "model": model_state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "Wav2Vec2WithCMSCCriterion",
                "optimizer_name": "AdamOptimizer",
                "lr_scheduler_state": {"best": 1.25},
                "num_updates": 1000,
            }
        ],
        "extra_state": {
            "epoch": 10,
            "train_iterator": {"epoch": 10, "iterations_in_epoch": 0},
            "val_loss": 1.5,
        },
        "last_optimizer_state": None,
        **extra,
    }
    torch.save(ckpt, path)
    return str(path)


def finetuned_cfg() -> dict:
    """An ecg_transformer_classifier config: size fields are defaults; ``args`` holds the real ones."""
    return {
        "_name": "ecg_transformer_classifier",
        "num_labels": 5,
        "model_path": "/ckpt/pretrained.pt",
        "encoder_embed_dim": 768,
        "encoder_layers": 12,
        "conv_feature_layers": "[(256, 2, 2)] * 4",
        "args": {"task": TASK_CFG, "model": MODEL_CFG},
    }


#: MODEL_CFG's sizes as Wav2Vec2ECGEncoder arguments: an architecture given in full.
REFERENCE_ARCH = {
    "in_channels": 12,
    "conv_layers": CONV,
    "embed_dim": 32,
    "num_layers": 2,
    "num_heads": 4,
    "ffn_dim": 64,
    "conv_pos_kernel": 8,
    "conv_pos_groups": 4,
    "layer_norm_first": False,
    "conv_bias": False,
}
#: A wav2vec2_dc-style fine-tuning config (Wav2Vec2DcConfig): its own size fields are defaults; the
#: pretrained model's config is stored in ``w2v_args`` when the fine-tuning run builds the model.
W2V_FINETUNING_CFG = {
    "_name": "wav2vec2_dc",
    "w2v_path": "/ckpt/pretrained.pt",
    "no_pretrained_weights": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "in_d": 12,
    "final_dropout": 0.0,
    "output_size": 5,
    "w2v_args": None,
}
FINETUNING_TASK = {"_name": "ecg_classification", "data": "/data/ptbxl", "sample_rate": 500}
W2V_LAYOUTS = ["cfg.model.w2v_args", "cfg.model.w2v_args-namespace", "args.w2v_args"]


def w2v_finetuned_state(encoder: Wav2Vec2ECGEncoder, prefix: str) -> dict[str, torch.Tensor]:
    """A fine-tuned model's weights: the pretrained model under ``prefix``, the task head beside it.

    remove_pretraining_modules drops the quantizer and projections but keeps ``mask_emb``.
    """
    state = {**fairseq_state(encoder, MODEL_CFG, "weight_g_v"), "mask_emb": torch.rand(32)}
    wrapper = prefix.split(".")[0] + "." if prefix.count(".") > 1 else ""
    head = {f"{wrapper}proj.weight": torch.randn(5, 32), f"{wrapper}proj.bias": torch.randn(5)}
    return {**{prefix + k: v for k, v in state.items()}, **head}


def write_w2v_finetuned(path, state: dict, layout: str) -> str:
    """A fine-tuned file whose pretrained config sits in ``w2v_args``, in each way fairseq writes it."""
    flat = argparse.Namespace(**{k: v for k, v in MODEL_CFG.items() if k != "_name"})
    if layout == "cfg.model.w2v_args":
        w2v_args = {"_name": None, "task": TASK_CFG, "model": MODEL_CFG, "criterion": None}
        return write_checkpoint(path, state, {**W2V_FINETUNING_CFG, "w2v_args": w2v_args}, FINETUNING_TASK)
    if layout == "cfg.model.w2v_args-namespace":
        return write_checkpoint(path, state, {**W2V_FINETUNING_CFG, "w2v_args": flat}, FINETUNING_TASK)
    assert layout == "args.w2v_args"
    legacy = {k: v for k, v in W2V_FINETUNING_CFG.items() if k != "_name"}
    args = argparse.Namespace(**{**legacy, "w2v_args": flat}, arch="wav2vec2_dc", sample_rate=500)
    torch.save({"args": args, "model": state, "extra_state": {"epoch": 3}}, path)
    return str(path)


@pytest.fixture(scope="module")
def reference() -> Wav2Vec2ECGEncoder:
    return reference_encoder(MODEL_CFG)


@pytest.fixture(scope="module")
def ecg() -> torch.Tensor:
    return torch.randn(2, 12, 500, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def checkpoint(tmp_path, reference) -> str:
    return write_checkpoint(
        tmp_path / "w2v_cmsc.pt", fairseq_state(reference, MODEL_CFG, "weight_g_v"), MODEL_CFG
    )


# --- import: every spelling, exactly the reference output ------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["parametrizations", "weight_g_v", "pre_2022_encoder_pos_conv", "pretraining_extras", "finetuned"],
)
def test_every_checkpoint_spelling_reproduces_the_reference(tmp_path, reference, ecg, spelling):
    cfg = finetuned_cfg() if spelling == "finetuned" else MODEL_CFG
    path = write_checkpoint(tmp_path / f"{spelling}.pt", fairseq_state(reference, MODEL_CFG, spelling), cfg)
    encoder = Wav2Vec2ECGEncoder(checkpoint=path).eval()
    assert encoder.pretrained and encoder.output_dim == 32 and encoder.conv_layers == tuple(CONV)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ecg), reference(ecg), **EXACT)


def test_pretraining_extras_and_finetuning_head_are_the_only_keys_left_out(reference):
    state = fairseq_state(reference, MODEL_CFG, "finetuned")
    converted, _, ignored = convert_fairseq_state_dict(state)
    extras = {f"encoder.{k}" for k in pretraining_extras(MODEL_CFG)}
    assert set(ignored) == extras | {"proj.weight", "proj.bias"}
    assert set(converted) == set(reference.state_dict())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"layer_norm_first": True, "conv_bias": True, "conv_pos": 7}],
    ids=["post-LN", "pre-LN-conv-bias-odd-kernel"],
)
def test_import_matches_fairseq_signals_forward(tmp_path, ecg, overrides):
    cfg = {**MODEL_CFG, **overrides}
    state = fairseq_state(reference_encoder(cfg, seed=2), cfg, "weight_g_v")
    encoder = Wav2Vec2ECGEncoder(checkpoint=write_checkpoint(tmp_path / "ckpt.pt", state, cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(ecg), fairseq_signals_forward(state, cfg, ecg), **TOLERANCE)


def fairseq_signals_forward(state: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """ECGTransformerModel's forward in eval mode without padding, from fairseq-signals' source.

    get_embeddings (feature extractor, layer_norm, post_extract_proj, + conv_pos) then
    TransformerEncoder (layer_norm before the layers unless layer_norm_first) with
    TransformerEncoderLayer; the positional convolution's weight is g * v / ||v|| (weight_norm, dim=2).
    """

    def ln(name, t):
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    def lin(name, t):
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    def attention(prefix, t):
        b, n, d = t.shape
        heads = cfg["encoder_attention_heads"]
        q, k, v = (lin(f"{prefix}.{p}_proj", t).view(b, n, heads, -1).transpose(1, 2) for p in "qkv")
        weights = torch.softmax(q * (d // heads) ** -0.5 @ k.transpose(-1, -2), dim=-1)
        return lin(f"{prefix}.out_proj", (weights @ v).transpose(1, 2).reshape(b, n, d))

    def ffn(prefix, t):
        return lin(f"{prefix}.fc2", F.gelu(lin(f"{prefix}.fc1", t)))

    for i, (dim, _, stride) in enumerate(parse_conv_layers(cfg["conv_feature_layers"])):
        x = F.conv1d(
            x,
            state[f"feature_extractor.conv_layers.{i}.0.weight"],
            state.get(f"feature_extractor.conv_layers.{i}.0.bias"),
            stride=stride,
        )
        if i == 0:
            x = F.group_norm(
                x,
                dim,
                state["feature_extractor.conv_layers.0.2.weight"],
                state["feature_extractor.conv_layers.0.2.bias"],
            )
        x = F.gelu(x)
    x = lin("post_extract_proj", ln("layer_norm", x.transpose(1, 2)))
    g, v = state["conv_pos.pos_conv.0.weight_g"], state["conv_pos.pos_conv.0.weight_v"]
    kernel = cfg["conv_pos"]
    pos = F.conv1d(
        x.transpose(1, 2),
        g * v / v.norm(dim=(0, 1), keepdim=True),
        state["conv_pos.pos_conv.0.bias"],
        padding=kernel // 2,
        groups=cfg["conv_pos_groups"],
    )
    x = x + F.gelu(pos[..., : x.shape[1]]).transpose(1, 2)  # SamePad drops the extra frame of an even kernel
    pre_ln = cfg["layer_norm_first"]
    if not pre_ln:
        x = ln("encoder.layer_norm", x)
    for n in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{n}"
        if pre_ln:
            x = x + attention(f"{p}.self_attn", ln(f"{p}.self_attn_layer_norm", x))
            x = x + ffn(p, ln(f"{p}.final_layer_norm", x))
        else:
            x = ln(f"{p}.self_attn_layer_norm", x + attention(f"{p}.self_attn", x))
            x = ln(f"{p}.final_layer_norm", x + ffn(p, x))
    return ln("encoder.layer_norm", x) if pre_ln else x


def test_default_size_matches_ecg_fm_key_names_and_shapes():
    """ECG-FM's mimic_iv_ecg_physionet_pretrained.pt layout (weight_g/_v spelling), one layer of twelve."""
    fairseq = {
        "feature_extractor.conv_layers.0.0.weight": (256, 12, 2),
        "feature_extractor.conv_layers.0.2.weight": (256,),
        "feature_extractor.conv_layers.0.2.bias": (256,),
        **{f"feature_extractor.conv_layers.{i}.0.weight": (256, 256, 2) for i in (1, 2, 3)},
        "layer_norm.weight": (256,),
        "layer_norm.bias": (256,),
        "post_extract_proj.weight": (768, 256),
        "post_extract_proj.bias": (768,),
        "conv_pos.pos_conv.0.weight_g": (1, 1, 128),
        "conv_pos.pos_conv.0.weight_v": (768, 48, 128),
        "conv_pos.pos_conv.0.bias": (768,),
        **{f"encoder.layers.0.self_attn.{p}_proj.weight": (768, 768) for p in ("q", "k", "v", "out")},
        **{f"encoder.layers.0.self_attn.{p}_proj.bias": (768,) for p in ("q", "k", "v", "out")},
        **{
            f"encoder.layers.0.{n}.{w}": (768,)
            for n in ("self_attn_layer_norm", "final_layer_norm")
            for w in ("weight", "bias")
        },
        "encoder.layers.0.fc1.weight": (3072, 768),
        "encoder.layers.0.fc1.bias": (3072,),
        "encoder.layers.0.fc2.weight": (768, 3072),
        "encoder.layers.0.fc2.bias": (768,),
        "encoder.layer_norm.weight": (768,),
        "encoder.layer_norm.bias": (768,),
    }
    converted, source, ignored = convert_fairseq_state_dict({k: torch.empty(s) for k, s in fairseq.items()})
    encoder_shapes = {k: tuple(v.shape) for k, v in Wav2Vec2ECGEncoder(num_layers=1).state_dict().items()}
    assert not ignored
    assert {source[k]: tuple(v.shape) for k, v in converted.items()} == fairseq
    assert {k: tuple(v.shape) for k, v in converted.items()} == encoder_shapes


# --- architecture and preprocessing from the file --------------------------------------------------


def test_architecture_and_sampling_rate_come_from_the_file(checkpoint):
    encoder = Wav2Vec2ECGEncoder.from_fairseq_checkpoint(checkpoint)
    assert encoder.preprocessing == Preprocessing(sampling_rate=500, num_samples=2500, normalization="zscore")
    assert encoder.num_frames(500) == 19 and len(encoder.encoder.layers) == 2
    agreeing = Wav2Vec2ECGEncoder(checkpoint=checkpoint, embed_dim=32, conv_layers=[[16, 10, 5], [24, 5, 5]])
    assert agreeing.output_dim == 32
    with pytest.warns(PreprocessingMismatchWarning, match=r"trained on 500 Hz.*sampling_rate=250"):
        assert Wav2Vec2ECGEncoder(checkpoint=checkpoint, sampling_rate=250).preprocessing.sampling_rate == 250


def test_size_argument_that_contradicts_the_file_is_an_error(checkpoint):
    with pytest.raises(
        ValueError, match=r"embed_dim=64 \(the file has 32\).*num_layers=3 \(the file has 2\)"
    ):
        Wav2Vec2ECGEncoder(checkpoint=checkpoint, embed_dim=64, num_layers=3)


def test_pre_hydra_file_with_argparse_namespace_loads_without_trusting_pickle(tmp_path, reference, ecg):
    args = argparse.Namespace(**{k: v for k, v in MODEL_CFG.items() if k != "_name"}, sample_rate=250)
    state = fairseq_state(reference, MODEL_CFG, "pre_2022_encoder_pos_conv")
    path = tmp_path / "old.pt"
    torch.save({"args": args, "model": state, "extra_state": {"epoch": 3}}, path)
    encoder = Wav2Vec2ECGEncoder(checkpoint=str(path)).eval()
    assert encoder.preprocessing.sampling_rate == 250
    with torch.no_grad():
        torch.testing.assert_close(encoder(ecg), reference(ecg), **EXACT)


@pytest.mark.parametrize("prefix", ["w2v_encoder.w2v_model.", "encoder.w2v_model."])
@pytest.mark.parametrize("layout", W2V_LAYOUTS)
def test_finetuned_file_takes_the_architecture_from_w2v_args(tmp_path, reference, ecg, layout, prefix):
    state = w2v_finetuned_state(reference, prefix)
    path = write_w2v_finetuned(tmp_path / "finetuned.pt", state, layout)
    encoder = Wav2Vec2ECGEncoder(checkpoint=path)
    assert (
        encoder.output_dim == 32 and len(encoder.encoder.layers) == 2 and encoder.conv_layers == tuple(CONV)
    )
    assert encoder.preprocessing.sampling_rate == 500
    with torch.no_grad():
        torch.testing.assert_close(encoder(ecg), reference(ecg), **EXACT)
    head = {k for k in state if not k.startswith(prefix)}
    assert set(encoder.load_fairseq_state_dict(state)) == {prefix + "mask_emb", *head}


def test_size_conflict_reports_the_value_in_the_file_or_that_it_does_not_state_it(tmp_path, reference):
    state = w2v_finetuned_state(reference, "w2v_encoder.w2v_model.")
    finetuned = write_w2v_finetuned(tmp_path / "finetuned.pt", state, "cfg.model.w2v_args")
    with pytest.raises(
        ValueError,
        match=r"architecture comes from cfg\['model'\]\['w2v_args'\]\['model'\] of checkpoint "
        r"\S*finetuned\.pt[\s\S]*embed_dim=768 \(the file has 32\)",
    ):
        Wav2Vec2ECGEncoder(checkpoint=finetuned, embed_dim=768)
    unstated = {k: v for k, v in MODEL_CFG.items() if k not in ("conv_bias", "layer_norm_first")}
    path = write_checkpoint(
        tmp_path / "unstated.pt", fairseq_state(reference, MODEL_CFG, "weight_g_v"), unstated
    )
    with pytest.raises(
        ValueError,
        match=r"conv_bias=True \(the file does not state conv_bias; fairseq-signals' default is False\)",
    ):
        Wav2Vec2ECGEncoder(checkpoint=path, conv_bias=True)
    assert not Wav2Vec2ECGEncoder(checkpoint=path).encoder.layer_norm_first


@pytest.mark.parametrize("config", ["cfg-without-sizes", "neither-cfg-nor-args"])
def test_file_that_states_no_architecture_needs_every_size_argument(tmp_path, reference, ecg, config):
    state = fairseq_state(reference, MODEL_CFG, "weight_g_v")
    path = str(tmp_path / "bare.pt")
    if config == "cfg-without-sizes":
        write_checkpoint(path, state, {"_name": "wav2vec2_cmsc", "dropout": 0.1, "args": None})
        looked = r"looked in cfg\['model'\]"
    else:
        torch.save({"model": state}, path)
        looked = "the file has neither cfg\\['model'\\] nor args"
    with pytest.raises(
        CheckpointImportError, match=rf"{re.escape(path)} states no architecture[\s\S]*{looked}"
    ):
        Wav2Vec2ECGEncoder(checkpoint=path)
    partial = {k: REFERENCE_ARCH[k] for k in ("embed_dim", "num_layers", "conv_layers")}
    with pytest.raises(
        CheckpointImportError, match=r"not given: in_channels, num_heads, ffn_dim, conv_pos_kernel"
    ):
        Wav2Vec2ECGEncoder(checkpoint=path, **partial)
    explicit = Wav2Vec2ECGEncoder(checkpoint=path, **REFERENCE_ARCH)
    with torch.no_grad():
        torch.testing.assert_close(explicit(ecg), reference(ecg), **EXACT)


def test_imported_encoder_is_returned_in_eval_mode(checkpoint, reference, ecg):
    for encoder in (
        Wav2Vec2ECGEncoder(checkpoint=checkpoint),
        Wav2Vec2ECGEncoder.from_fairseq_checkpoint(checkpoint),
    ):
        assert not any(module.training for module in encoder.modules())
        with torch.no_grad():  # dropout is 0.1: any of it would change the output
            torch.testing.assert_close(encoder(ecg), reference(ecg), **EXACT)
    with torch.no_grad():
        assert not torch.equal(encoder.train()(ecg), reference(ecg))  # training code gets dropout back


def test_layer_norm_extractor_mode_is_refused(tmp_path, reference):
    cfg = {**MODEL_CFG, "extractor_mode": "layer_norm"}
    path = write_checkpoint(tmp_path / "ln.pt", fairseq_state(reference, MODEL_CFG, "weight_g_v"), cfg)
    with pytest.raises(CheckpointImportError, match="extractor_mode='layer_norm'"):
        Wav2Vec2ECGEncoder(checkpoint=path)


def test_conv_feature_layers_are_parsed_without_eval():
    wav2vec2_speech = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"
    assert parse_conv_layers(wav2vec2_speech) == ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    assert parse_conv_layers("[(256, 2, 2)] * 4") == ((256, 2, 2),) * 4
    for bad in ("__import__('os').system('true')", "[(256, 2)]", "[(256, 2, 2)] * 10**9", "[(0, 2, 2)]"):
        with pytest.raises(ValueError, match="conv layers"):
            parse_conv_layers(bad)


# --- refusals: missing, unknown, shape, pickle ---------------------------------------------------------


MISSING_CASES = {
    "weight_g_v": ("", "weight_g_v", ["conv_pos.pos_conv.0.weight_g", "encoder.layers.1.fc2.bias"]),
    "parametrizations": (
        "",
        "parametrizations",
        ["conv_pos.pos_conv.0.parametrizations.weight.original0", "encoder.layers.1.fc2.bias"],
    ),
    "pre_2022_encoder_pos_conv": (
        "",
        "pre_2022_encoder_pos_conv",
        ["encoder.layers.1.fc2.bias", "encoder.pos_conv.0.weight_v"],
    ),
    "finetuned": (
        "encoder.",
        "weight_g_v",
        ["encoder.conv_pos.pos_conv.0.weight_g", "encoder.encoder.layers.1.fc2.bias"],
    ),
    "w2v_finetuned": (
        "w2v_encoder.w2v_model.",
        "weight_g_v",
        ["w2v_encoder.w2v_model.conv_pos.pos_conv.0.weight_g", "w2v_encoder.w2v_model.layer_norm.bias"],
    ),
}


@pytest.mark.parametrize("case", list(MISSING_CASES))
def test_missing_keys_are_an_error_naming_them_as_the_file_would(tmp_path, reference, case):
    prefix, spelling, deleted = MISSING_CASES[case]
    state = {prefix + k: v for k, v in fairseq_state(reference, MODEL_CFG, spelling).items()}
    for key in deleted:
        del state[key]
    cfg = finetuned_cfg() if prefix else MODEL_CFG
    path = write_checkpoint(tmp_path / "missing.pt", state, cfg)
    expected = re.escape(f"missing from the file (2): {', '.join(deleted)}\n")
    with pytest.raises(CheckpointImportError, match=rf"nothing was loaded[\s\S]*{expected}"):
        Wav2Vec2ECGEncoder(checkpoint=path)
    with pytest.raises(CheckpointImportError, match="missing from the file"):
        Wav2Vec2ECGEncoder(checkpoint=path, strict=False)


def test_unknown_key_is_an_error_unless_not_strict(tmp_path, reference, ecg):
    state = fairseq_state(reference, MODEL_CFG, "weight_g_v")
    state["encoder.layers.0.self_attn.rel_pos_bias.weight"] = torch.zeros(3)
    path = write_checkpoint(tmp_path / "unknown.pt", state, MODEL_CFG)
    with pytest.raises(
        CheckpointImportError, match=r"unknown to the encoder \(1\): encoder\.layers\.0\.self_attn\.rel"
    ):
        Wav2Vec2ECGEncoder(checkpoint=path)
    with pytest.warns(UserWarning, match="rel_pos_bias"):
        lenient = Wav2Vec2ECGEncoder(checkpoint=path, strict=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(lenient(ecg), reference(ecg), **EXACT)


def test_head_in_a_pretraining_file_is_unknown(tmp_path, reference):
    state = {**fairseq_state(reference, MODEL_CFG, "weight_g_v"), "proj.weight": torch.zeros(5, 32)}
    with pytest.raises(CheckpointImportError, match=r"unknown to the encoder \(1\): proj\.weight"):
        Wav2Vec2ECGEncoder(checkpoint=write_checkpoint(tmp_path / "head.pt", state, MODEL_CFG))


def test_shape_mismatch_is_an_error_naming_key_and_shapes(tmp_path, reference):
    state = fairseq_state(reference, MODEL_CFG, "finetuned")
    state["encoder.encoder.layers.0.fc1.weight"] = torch.zeros(65, 32)
    path = write_checkpoint(tmp_path / "shape.pt", state, finetuned_cfg())
    with pytest.raises(
        CheckpointImportError,
        match=r"encoder\.encoder\.layers\.0\.fc1\.weight: file \(65, 32\) "
        r"vs encoder \(64, 32\)",
    ):
        Wav2Vec2ECGEncoder(checkpoint=path)


class ArbitraryClass:
    """Stands for any class a pickle may name; unpickling it means importing and running its code."""


def test_pickled_arbitrary_class_is_refused_under_weights_only(tmp_path, reference):
    state = fairseq_state(reference, MODEL_CFG, "weight_g_v")
    path = write_checkpoint(tmp_path / "pickle.pt", state, MODEL_CFG, extra_state=ArbitraryClass())
    with pytest.raises(
        CheckpointImportError,
        match=r"refused to unpickle the global \S*ArbitraryClass[\s\S]*"
        r"trust_pickle=True \(this runs any code the pickle names\)",
    ):
        Wav2Vec2ECGEncoder(checkpoint=path)
    assert Wav2Vec2ECGEncoder(checkpoint=path, trust_pickle=True).pretrained


class RunsACommand:
    """Pickles as a call of ``os.system("true")``, as a hostile checkpoint would; only ever saved here."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_pickle_that_would_run_a_command_is_refused_naming_the_blocked_global(tmp_path, reference):
    state = fairseq_state(reference, MODEL_CFG, "weight_g_v")
    path = write_checkpoint(tmp_path / "hostile.pt", state, MODEL_CFG, extra_state=RunsACommand())
    module = os.system.__module__  # posix here
    with pytest.raises(
        pickle.UnpicklingError, match=rf"GLOBAL {module}\.system whose module {module} is blocked"
    ):
        torch.load(path, weights_only=True)  # torch's own wording, which the message must read
    with pytest.raises(CheckpointImportError) as caught:
        Wav2Vec2ECGEncoder(checkpoint=path)
    message = str(caught.value)
    assert message.startswith(
        f"{path}: torch.load(weights_only=True) refused to unpickle the global {module}.system"
    )
    assert f"torch blocks the module {module} outright" in message
    assert "trust_pickle=True (this runs any code the pickle names)" in message
    assert "pytorch.org" not in message
    assert message.startswith(explain_unpickling_error(path, caught.value.__cause__))


TORCH_WORDINGS = {
    "blocked-module": (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` "
        "argument.\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\n"
        "Check the documentation of torch.load to learn more about types accepted by default with "
        "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.",
        "the global posix.system: torch blocks the module posix outright",
    ),
    "not-allowed": (
        "Weights only load failed. This file can still be loaded, to do so you have two options, "
        "\x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m.\n\tWeightsUnpickler "
        "error: Unsupported global: GLOBAL fairseq_signals.dataclass.Dataclass was not an allowed global "
        "by default. Please use `torch.serialization.add_safe_globals([fairseq_signals.dataclass.Dataclass])`"
        "\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
        "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.",
        "the global fairseq_signals.dataclass.Dataclass, because creating it could run code",
    ),
    "build": (
        "Weights only load failed. WeightsUnpickler error: Can only build Tensor, Parameter, OrderedDict or "
        "types allowlisted via `add_safe_globals`, but got <class 'omegaconf.dictconfig.DictConfig'>",
        "the global omegaconf.dictconfig.DictConfig, because",
    ),
    "unknown-wording": (
        "Weights only load failed. Please file an issue with the following so that we can make "
        "`weights_only=True` compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand "
        "149\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
        "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.",
        "refused the file's pickle; torch said: Unsupported operand 149.",
    ),
}


@pytest.mark.parametrize("wording", list(TORCH_WORDINGS))
def test_explain_unpickling_error_names_the_global_in_every_torch_wording(wording):
    torch_message, expected = TORCH_WORDINGS[wording]
    message = explain_unpickling_error("ckpt/last.ckpt", pickle.UnpicklingError(torch_message))
    assert message.startswith("ckpt/last.ckpt: torch.load(weights_only=True) ")
    assert expected in message and "only if you trust" in message.lower()
    assert "pytorch.org" not in message and "\x1b" not in message
    if wording == "not-allowed":
        assert "torch.serialization.add_safe_globals([fairseq_signals.dataclass.Dataclass])" in message


def test_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointImportError, match=r"not a fairseq-signals checkpoint.*\['state_dict'\]"):
        Wav2Vec2ECGEncoder(checkpoint=str(path))


# --- preprocessing contract ------------------------------------------------------------------------


def test_check_preprocessing_accepts_a_matching_manifest():
    manifest = {
        "sampling_rate": 250,
        "num_samples": 2500,
        "leads": ["I"],
        "normalisation": "per-lead z-score",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_preprocessing(Preprocessing(), manifest, "shards/manifest.json") == []
        assert check_preprocessing(Preprocessing(), {}, "shards/manifest.json") == []


def test_check_preprocessing_warns_loudly_about_each_mismatch():
    expected = Preprocessing(sampling_rate=500, num_samples=2500, normalization="zscore")
    data = {"sampling_rate": 250, "num_samples": 5000, "normalization": "minmax"}
    with pytest.warns(PreprocessingMismatchWarning) as caught:
        messages = check_preprocessing(expected, data, "data/ptbxl/manifest.json")
    assert [str(w.message) for w in caught] == messages and len(messages) == 3
    assert all(m.startswith("data/ptbxl/manifest.json: the data has ") for m in messages)
    assert (
        "sampling_rate=250 but the encoder expects sampling_rate=500; resample the ECGs to 500 Hz"
        in messages[0]
    )
    assert "num_samples=5000 but the encoder expects num_samples=2500; crop or pad" in messages[1]
    assert "normalization='minmax' but the encoder expects normalization='zscore'" in messages[2]


def test_normalization_text_must_name_the_same_method():
    with pytest.warns(PreprocessingMismatchWarning, match="'per-lead min-max' but the encoder expects"):
        check_preprocessing(Preprocessing(normalization="minmax"), {"normalisation": "per-lead min-max"}, "m")


def test_preprocessing_rejects_unknown_normalization():
    with pytest.raises(ValueError, match=r"one of \['minmax', 'zscore'\]"):
        Preprocessing(normalization="robust")
    with pytest.raises(ValueError, match="must be positive"):
        Wav2Vec2ECGEncoder(num_layers=1, sampling_rate=0)


# --- a real ECG --------------------------------------------------------------------------------------


def test_real_ptb_record_through_an_imported_encoder(ptb_record, tmp_path):
    import wfdb
    from scipy.signal import resample_poly

    cfg = {
        **MODEL_CFG,
        "conv_feature_layers": "[(32, 2, 2)] * 4",
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 128,
        "conv_pos": 128,
        "conv_pos_groups": 16,
    }
    state = fairseq_state(reference_encoder(cfg, seed=3), cfg, "weight_g_v")
    path = write_checkpoint(tmp_path / "ptb.pt", state, cfg, task_cfg={**TASK_CFG, "sample_rate": 250})
    encoder = Wav2Vec2ECGEncoder.from_fairseq_checkpoint(path).eval()

    record = wfdb.rdrecord(str(ptb_record))
    names = [n.lower() for n in record.sig_name]
    leads = ["i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"]
    assert record.fs == 1000
    signal = resample_poly(record.p_signal[:, [names.index(lead) for lead in leads]].T, up=1, down=4, axis=-1)
    window = signal[:, :2500]
    window = (window - window.mean(axis=1, keepdims=True)) / window.std(axis=1, keepdims=True)
    data = {"sampling_rate": 250, "num_samples": window.shape[1], "normalization": "zscore"}
    assert check_preprocessing(encoder.preprocessing, data, str(ptb_record)) == []

    with torch.no_grad():
        frames = encoder(torch.from_numpy(window.astype(np.float32))[None])
    expected_frames = 2500
    for _ in range(4):
        expected_frames = (expected_frames - 2) // 2 + 1
    assert expected_frames == encoder.num_frames(2500) == 156
    assert frames.shape == (1, expected_frames, 64)
    assert torch.isfinite(frames).all() and frames.std(dim=1).min() > 0
