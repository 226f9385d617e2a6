"""Backbones of every paper family as tiny random models of the real architecture classes.

Forward, backward into the ECG tokens and generation for Llama, Qwen3.5 (hybrid Gated DeltaNet) and
Gemma 4 (per-layer embeddings, text-only and multimodal classes); Gemma 4's splice checked against
the model's own computation; 4-bit loading; truncation to ``max_length``; system prompts on chat
templates without a system role; the fast-kernel report; ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ecglm.backbones import Backbone, HFBackbone, positions_from_mask, resolve_model_path
from ecglm.prompts import ECG_MARKER, IGNORE_INDEX, ChatTemplate
from ecglm.testing import bound_prompt
from ecglm_testing import FAMILIES, GEMMA4_TEXT, TINY, VOCAB

K = 3  # ECG tokens per sample
QUESTIONS = [
    "What is the heart rate category of this ECG?",
    "Is the rhythm regular or irregular? Please answer briefly.",
    "Does this ECG show atrial fibrillation?",
]
ANSWERS = ["tachycardia", "irregular", "no"]


def gemma4_multimodal(tokenizer_dir: str, seed: int = 0) -> HFBackbone:
    """A tiny ``Gemma4ForConditionalGeneration``, the class google/gemma-4-E4B-it loads as."""
    torch.manual_seed(seed)
    text = dict(TINY, vocab_size=VOCAB, **GEMMA4_TEXT)
    # Multimodal placeholder ids inside the tiny vocabulary; they never occur in these prompts.
    special = {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2, "audio_token_id": VOCAB - 3}
    overrides = {"text_config": text, "vision_config": None, "audio_config": None, **special}
    return HFBackbone("gemma4", tokenizer=tokenizer_dir, random_init=True, config_overrides=overrides)


@pytest.fixture(scope="module")
def tiny(tiny_backbone_factory, tokenizer_dir):
    """``tiny(family)``: one tiny backbone per family for this module (``"gemma4"``: the multimodal class)."""
    built = {}

    def get(family: str) -> HFBackbone:
        if family not in built:
            built[family] = (
                gemma4_multimodal(tokenizer_dir)
                if family == "gemma4"
                else tiny_backbone_factory(family, config_overrides=FAMILIES[family])
            )
        return built[family]

    return get


@pytest.fixture(params=[*FAMILIES, "gemma4"])
def backbone(request, tiny) -> HFBackbone:
    return tiny(request.param)


def left_padded(formatter: ChatTemplate, n: int, with_answers: bool = True) -> dict[str, torch.Tensor]:
    """The first ``n`` QA pairs, tokenised and left-padded as the data pipeline does."""
    answers = ANSWERS[:n] if with_answers else [None] * n
    encoded = [formatter.encode(q, a, K) for q, a in zip(QUESTIONS[:n], answers, strict=True)]
    length = max(len(e.input_ids) for e in encoded)
    batch = {
        "input_ids": torch.full((n, length), formatter.pad_token_id),
        "attention_mask": torch.zeros((n, length), dtype=torch.long),
        "ecg_mask": torch.zeros((n, length), dtype=torch.bool),
        "labels": torch.full((n, length), IGNORE_INDEX),
    }
    for row, e in enumerate(encoded):
        start = length - len(e.input_ids)
        batch["input_ids"][row, start:] = torch.tensor(e.input_ids)
        batch["labels"][row, start:] = torch.tensor(e.labels)
        batch["attention_mask"][row, start:] = 1
        batch["ecg_mask"][row, start + e.ecg_start : start + e.ecg_start + K] = True
    if not with_answers:
        del batch["labels"]
    return batch


def random_ecg_tokens(backbone: HFBackbone, n: int, seed: int = 0) -> torch.Tensor:
    """ECG tokens on the scale of the LM's own input embeddings (Gemma's are scaled by sqrt(width))."""
    with torch.no_grad():
        scale = backbone.embed_tokens(torch.arange(100)).std()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, backbone.hidden_size, generator=generator) * scale


def placeholder_tokens(backbone: HFBackbone, n: int) -> torch.Tensor:
    """ECG tokens equal to the placeholder's own embedding: the splice must then change nothing."""
    ids = torch.full((n, K), backbone.placeholder_token_id)
    return backbone.embed_tokens(ids).detach()


def test_forward_and_backward_reach_the_ecg_tokens(backbone):
    batch = left_padded(bound_prompt(backbone), 3)
    backbone.requires_grad_(False)  # a frozen LM, as in projection-only training
    tokens = random_ecg_tokens(backbone, 3).requires_grad_(True)
    out = backbone(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens, batch["labels"])
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()
    assert (tokens.grad.abs().sum(-1) > 0).all(), "every ECG token of every sample must get a gradient"
    assert all(p.grad is None for p in backbone.parameters())


def test_answer_span_loss_equals_the_full_logits_loss(backbone):
    batch = left_padded(bound_prompt(backbone), 3)
    tokens = random_ecg_tokens(backbone, 3)
    args = (batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens, batch["labels"])
    with torch.no_grad():
        fast = backbone(*args).loss
        backbone._keeps_logits = False
        try:
            reference = backbone(*args).loss
        finally:
            backbone._keeps_logits = True
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def until_eos(row: torch.Tensor, eos: int) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_batched_generation_matches_one_by_one(backbone):
    batch = left_padded(bound_prompt(backbone), 3, with_answers=False)
    assert (batch["attention_mask"] == 0).any(), "the prompts must need padding for this test to mean much"
    tokens = random_ecg_tokens(backbone, 3)
    eos = backbone.tokenizer.eos_token_id
    batched = backbone.generate(**batch, ecg_tokens=tokens, max_new_tokens=5, do_sample=False)
    assert batched.shape[0] == 3 and 0 < batched.shape[1] <= 5
    for row in range(3):
        one = {k: v[row : row + 1, batch["attention_mask"][row] == 1] for k, v in batch.items()}
        alone = backbone.generate(**one, ecg_tokens=tokens[row : row + 1], max_new_tokens=5, do_sample=False)
        assert until_eos(batched[row], eos) == until_eos(alone[0], eos)


@pytest.mark.parametrize("family", ["gemma4_text", "gemma4"])
def test_gemma4_splice_equals_the_models_own_computation(family, tiny):
    """With the placeholder's embedding as ECG tokens, the spliced run is the model's run on the ids."""
    backbone = tiny(family)
    expected_class = {"gemma4_text": "Gemma4ForCausalLM", "gemma4": "Gemma4ForConditionalGeneration"}
    assert type(backbone.model).__name__ == expected_class[family]
    lm = backbone.model
    batch = left_padded(bound_prompt(backbone), 3)
    ids, mask, ecg_mask, labels = (batch[k] for k in ("input_ids", "attention_mask", "ecg_mask", "labels"))
    same = placeholder_tokens(backbone, 3)
    with torch.no_grad():
        reference = lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        torch.testing.assert_close(backbone(ids, mask, ecg_mask, same).logits, reference)
        # The loss path computes logits for the answer span only (and Gemma skips the other positions
        # in its KV-shared layers): same logits there, same loss.
        out = backbone(ids, mask, ecg_mask, same, labels)
        span = out.logits.shape[1] - 1
        assert span < ids.shape[1] - 1
        torch.testing.assert_close(out.logits, reference[:, -span - 1 :])
        expected = nn.functional.cross_entropy(reference[:, :-1].transpose(1, 2), labels[:, 1:])
        torch.testing.assert_close(out.loss, expected)
        # Other ECG tokens change the logits from the first ECG position on, and nothing before it.
        other = backbone(ids, mask, ecg_mask, random_ecg_tokens(backbone, 3)).logits
        first = int(ecg_mask[0].nonzero()[0])
        torch.testing.assert_close(other[0, :first], reference[0, :first])
        assert not torch.allclose(other[0, first:], reference[0, first:])
        # Without the per-layer inputs, Gemma 4 cannot run from these embeddings at all.
        spliced = backbone.splice(ids, ecg_mask, random_ecg_tokens(backbone, 3))
        with pytest.raises(RuntimeError, match="reverse the embedding"):
            lm(inputs_embeds=spliced, attention_mask=mask)

    prompts = left_padded(bound_prompt(backbone), 3, with_answers=False)
    pad = backbone.pad_token_id
    own = lm.generate(
        input_ids=prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=pad,
    )
    ours = backbone.generate(**prompts, ecg_tokens=placeholder_tokens(backbone, 3), max_new_tokens=6)
    assert torch.equal(ours, own[:, prompts["input_ids"].shape[1] :])
    # Beam search repeats every row; the prefill's inputs are repeated with them.
    beams = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False, "pad_token_id": pad}
    own = lm.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], **beams)
    ours = backbone.generate(**prompts, ecg_tokens=placeholder_tokens(backbone, 3), **beams)
    assert torch.equal(ours, own[:, prompts["input_ids"].shape[1] :])


def test_qwen3_5_hub_layout_loads_its_text_model(tmp_path, tokenizer_dir):
    """Qwen3.5-9B and Qwen3.6-27B are vision-language ``qwen3_5`` checkpoints: the LM is their text part."""
    from transformers import AutoModelForImageTextToText

    text = dict(TINY, vocab_size=VOCAB, **FAMILIES["qwen3_5_text"])
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    ids = {"image_token_id": VOCAB - 1, "video_token_id": VOCAB - 2}
    ids.update(vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4)
    torch.manual_seed(0)
    vlm = AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("qwen3_5", text_config=text, vision_config=vision, **ids)
    )
    vlm.save_pretrained(tmp_path)
    backbone = HFBackbone(str(tmp_path), tokenizer=tokenizer_dir)
    assert type(backbone.model).__name__ == "Qwen3_5ForCausalLM"
    batch = left_padded(bound_prompt(backbone), 2)
    mask = batch["attention_mask"]
    with torch.no_grad():
        ours = backbone(batch["input_ids"], mask, batch["ecg_mask"], placeholder_tokens(backbone, 2)).logits
        theirs = vlm(input_ids=batch["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs)


# --- precision and 4-bit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tiny, tmp_path_factory):
    """``family -> folder`` with a tiny random model and its tokenizer saved as from_pretrained reads them."""
    folders = {}
    for family in [*FAMILIES, "gemma4"]:
        folder = tmp_path_factory.mktemp(family)
        tiny(family).model.save_pretrained(folder)
        tiny(family).tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.mark.parametrize("family", [*FAMILIES, "gemma4"])
def test_4bit_backbone_trains_the_ecg_tokens_and_generates(family, saved_models, tiny):
    import bitsandbytes as bnb

    full = HFBackbone(saved_models[family])
    assert type(full.model) is type(tiny(family).model)  # the saved layout loads as the same class
    four = HFBackbone(saved_models[family], quantization="nf4", dtype="float32", bnb_compute_dtype="float32")
    quantized = [m for m in four.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "no linear layer was quantised"
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # bnb_double_quant defaults to True
    # As bitsandbytes does: embeddings and the LM head stay unquantised.
    assert type(four.model.get_input_embeddings()) is type(full.model.get_input_embeddings())
    assert type(four.model.get_output_embeddings()) is nn.Linear

    batch = left_padded(bound_prompt(four), 3)
    tokens = random_ecg_tokens(full, 3)
    four.requires_grad_(False)
    trained = tokens.clone().requires_grad_(True)
    out = four(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], trained, batch["labels"])
    out.loss.backward()
    assert (trained.grad.abs().sum(-1) > 0).all()
    # The 4-bit model computes exactly what the full model computes with the de-quantised weights.
    for name, layer in four.model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            full.model.get_submodule(name).weight.data.copy_(weight)
    with torch.no_grad():
        logits = four(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens).logits
        reference = full(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    prompts = left_padded(bound_prompt(four), 3, with_answers=False)
    assert four.generate(**prompts, ecg_tokens=tokens, max_new_tokens=4).shape == (3, 4)


def test_4bit_options_reach_bitsandbytes(saved_models):
    import bitsandbytes as bnb

    four = HFBackbone(
        saved_models["llama"],
        quantization="fp4",
        bnb_double_quant=False,
        dtype="float32",
        bnb_compute_dtype="float32",
    )
    layer = next(m for m in four.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested
    assert layer.compute_dtype == torch.float32
    # Parameter counts see through the 4-bit packing (two weights per stored byte).
    from ecglm.peft import count_parameters

    assert count_parameters(four)[1] == count_parameters(HFBackbone(saved_models["llama"]))[1]
    with pytest.raises(ValueError, match="pretrained weights"):
        HFBackbone("llama", random_init=True, quantization="nf4")


def test_dtype_sets_the_lm_weights_and_ecg_tokens_follow(tiny_backbone_factory):
    backbone = tiny_backbone_factory("llama", dtype="bfloat16")
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    batch = left_padded(bound_prompt(backbone), 2)
    tokens = torch.randn(2, K, backbone.hidden_size, requires_grad=True)  # a float32 connector's output
    out = backbone(batch["input_ids"], batch["attention_mask"], batch["ecg_mask"], tokens, batch["labels"])
    out.loss.backward()
    assert tokens.grad.dtype == torch.float32 and tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dtype must be one of"):
        tiny_backbone_factory("llama", dtype="float64")


class Spy:
    """Stands in for an ``Auto*`` class where ecglm.backbones looks it up; records ``trust_remote_code``."""

    def __init__(self, auto, seen: list):
        self.auto, self.seen = auto, seen

    def from_pretrained(self, *args, **kwargs):
        self.seen.append((self.auto.__name__, kwargs["trust_remote_code"]))  # passed explicitly
        return self.auto.from_pretrained(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.auto, name)


def test_trust_remote_code_is_off_unless_asked(saved_models, monkeypatch):
    from ecglm.backbones import hf, loading

    seen = []
    for module, auto in ((hf, AutoTokenizer), (hf, AutoModelForCausalLM), (loading, AutoConfig)):
        monkeypatch.setattr(module, auto.__name__, Spy(auto, seen))
    HFBackbone(saved_models["llama"])
    HFBackbone(saved_models["llama"], random_init=True)
    # The config is read once, by HFBackbone.load_config, then handed to the model class.
    loaded = ["AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"]
    assert seen == [(name, False) for name in loaded]
    seen.clear()
    HFBackbone(saved_models["llama"], trust_remote_code=True)
    assert seen == [("AutoTokenizer", True), ("AutoConfig", True), ("AutoModelForCausalLM", True)]


def test_load_config_reads_what_the_backbone_builds_without_weights(saved_models, monkeypatch):
    """HFBackbone.load_config is the one config read: a recipe's init_args give the built LM's config,
    with no weights loaded; the recipe's other keys are ignored; an unknown override names itself."""
    from ecglm.backbones import BackboneConfigError, hf

    folder = saved_models["llama"]
    built = HFBackbone(folder, config_overrides={"rms_norm_eps": 1e-3}).model.config

    monkeypatch.setattr(hf, "AutoModelForCausalLM", None)  # a weight read would fail
    args = {
        "model": folder,
        "config_overrides": {"rms_norm_eps": 1e-3},
        "dtype": "bfloat16",
        "tokenizer": "x",
    }
    config = HFBackbone.config_for(args)
    fields = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps")
    assert [getattr(config, f) for f in fields] == [getattr(built, f) for f in fields]
    assert config.rms_norm_eps == 1e-3
    random = HFBackbone.config_for({"model": "qwen3", "random_init": True, "config_overrides": TINY})
    assert (random.model_type, random.hidden_size) == ("qwen3", TINY["hidden_size"])
    with pytest.raises(BackboneConfigError, match=r"\['hiden_size'\] are not fields of the llama config"):
        HFBackbone.config_for({"model": folder, "config_overrides": {"hiden_size": 8}})
    with pytest.raises(BackboneConfigError, match=r"needs model\.backbone\.init_args\.model"):
        HFBackbone.config_for({"dtype": "float32"})


def test_a_plugin_overriding_load_config_controls_the_built_lm_and_the_estimate(saved_models):
    class OneLayer(HFBackbone):
        @classmethod
        def load_config(cls, model, config_overrides=None, **kwargs):
            overrides = {**(config_overrides or {}), "num_hidden_layers": 1}
            return super().load_config(model, config_overrides=overrides, **kwargs)

    assert OneLayer.config_for({"model": saved_models["llama"]}).num_hidden_layers == 1
    assert len(OneLayer(saved_models["llama"]).model.model.layers) == 1
    assert len(HFBackbone(saved_models["llama"]).model.model.layers) == 2


# --- fast kernels ---------------------------------------------------------------------------------------


def test_qwen3_5_reports_which_kernels_run(tiny_backbone_factory, tiny, caplog):
    with caplog.at_level(logging.INFO, logger="ecglm.kernels"):
        qwen = tiny_backbone_factory("qwen3_5_text", config_overrides=FAMILIES["qwen3_5_text"])
    assert set(qwen.kernels) == {
        "chunk_gated_delta_rule",
        "fused_recurrent_gated_delta_rule",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    }
    for package, dist, kernel in [
        ("fla", "flash-linear-attention", "chunk_gated_delta_rule"),
        ("causal_conv1d", "causal-conv1d", "causal_conv1d_fn"),
    ]:
        ours = [r.getMessage() for r in caplog.records if r.name == "ecglm.kernels"]
        [line] = [m for m in ours if kernel in m]
        if importlib.util.find_spec(package) is None:
            assert qwen.kernels[kernel] == "torch"
            assert line.startswith("qwen3_5_text:")
            assert f"PyTorch reference path (slower; install {dist} for the fast kernels)" in line
        else:
            assert qwen.kernels[kernel].startswith(package) and f"fast kernels of {dist}" in line
    assert tiny("llama").kernels == {} and tiny("gemma4").kernels == {}


def test_a_kernel_binding_ecglm_cannot_read_gives_an_empty_report_and_a_warning(caplog, monkeypatch):
    """transformers' kernel fallback is read from closures; another layout of them must not break loading."""
    import types

    from ecglm.kernels import kernel_bindings

    def bind(is_new_implementation, renamed):
        def kernel(*args):
            return is_new_implementation, renamed

        return kernel

    fake = types.ModuleType("fake_modeling")
    fake.kernel = bind(False, "chunk_gated_delta_rule")
    monkeypatch.setitem(sys.modules, "fake_modeling", fake)
    layer = type("Layer", (nn.Module,), {"__module__": "fake_modeling"})()
    with caplog.at_level(logging.WARNING, logger="ecglm.kernels"):
        assert kernel_bindings(layer) == []
    assert "binds kernels differently than ecglm reads them" in caplog.text
    assert "fake_modeling.kernel" in caplog.text


# --- prompts: max_length and system prompts -------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


LONG_QUESTION = "Describe the morphology of every beat in the tracing. " * 20  # 200 tokens
LONG_ANSWER = "sinus rhythm with occasional premature ventricular complexes and a normal axis " * 3


def test_truncation_cuts_the_question_end_never_the_ecg_or_the_answer_start(tok):
    unlimited = ChatTemplate(tok, "You read ECGs.")
    full = unlimited.encode(LONG_QUESTION, "irregular", K)
    question_ids = unlimited._tokens(LONG_QUESTION.strip())
    closing = unlimited._tokens(" <|im_end|>\n<|im_start|>assistant\n")  # the question's trailing space too
    answer = [t for t, label in zip(full.input_ids, full.labels, strict=True) if label != IGNORE_INDEX]
    # 13 system-turn tokens + 3 ECG + 1 newline + 200 question + 7 closing = 224; the answer is 4.
    assert (full.ecg_start, len(question_ids), len(closing), len(answer)) == (13, 200, 7, 4)
    assert full.prompt_length == 224

    cut = ChatTemplate(tok, "You read ECGs.", max_length=120).encode(LONG_QUESTION, "irregular", K)
    assert len(cut.input_ids) == 120 and cut.prompt_length == 116  # the whole 4-token answer fits
    assert cut.input_ids[:17] == full.input_ids[:17]  # system turn, ECG positions, newline
    assert cut.input_ids[17 : 17 + 92] == question_ids[:92]  # 120 - 4 - 17 - 7: the question's first 92
    assert cut.input_ids[17 + 92 : cut.prompt_length] == closing
    assert [t for t, label in zip(cut.input_ids, cut.labels, strict=True) if label != IGNORE_INDEX] == answer

    # A long answer (37 tokens) keeps its first min_answer_tokens = 16; only then is its end cut.
    long = ChatTemplate(tok, "You read ECGs.", max_length=120).encode(LONG_QUESTION, LONG_ANSWER, K)
    full_long = unlimited.encode(LONG_QUESTION, LONG_ANSWER, K)
    assert len(full_long.input_ids) - full_long.prompt_length == 37
    assert len(long.input_ids) == 120 and long.prompt_length == 104  # a question of 80 tokens
    assert long.input_ids[-16:] == full_long.input_ids[full_long.prompt_length :][:16]
    # The generation prompt leaves min_answer_tokens of room too: training and evaluation read the
    # same (shortened) question.
    prompt = ChatTemplate(tok, "You read ECGs.", max_length=120).encode(LONG_QUESTION, None, K)
    assert prompt.input_ids == long.input_ids[: long.prompt_length]

    # A short question is never cut: the answer's end goes.
    short = ChatTemplate(tok, "You read ECGs.", max_length=60).encode(QUESTIONS[0], LONG_ANSWER, K)
    whole = unlimited.encode(QUESTIONS[0], LONG_ANSWER, K)
    assert short.prompt_length == whole.prompt_length and short.input_ids == whole.input_ids[:60]
    # Fits: nothing changes.
    assert ChatTemplate(tok, "You read ECGs.", max_length=300).encode(LONG_QUESTION, "irregular", K) == full


def test_truncation_refuses_when_the_prompt_alone_is_too_long(tok):
    # Without its question the prompt is 13 + 3 + 1 + 7 = 24 tokens; the answer needs 4.
    formatter = ChatTemplate(tok, "You read ECGs.", max_length=28)
    assert len(formatter.encode(LONG_QUESTION, "irregular", K).input_ids) == 28  # no question left
    with pytest.raises(ValueError, match="leaves no room for 4 answer tokens within max_length=27"):
        ChatTemplate(tok, "You read ECGs.", max_length=27).encode(LONG_QUESTION, "irregular", K)
    with pytest.raises(ValueError, match="leaves no room for 16 answer tokens within max_length=300"):
        ChatTemplate(tok, "You read ECGs.", max_length=300).encode(LONG_QUESTION, None, 280)  # 280 ECG tokens


class QuestionBeforeECG(ChatTemplate):
    """A user turn that asks first and shows the ECG after the question."""

    def messages(self, question, answer=None, system_prompt=None, num_ecgs=1):
        turns = super().messages(question, answer, system_prompt, num_ecgs)
        user = next(t for t in turns if t["role"] == "user")
        user["content"] = user["content"].replace(f"{ECG_MARKER}\n{question}", f"{question}\n{ECG_MARKER}")
        return turns


def test_truncation_cuts_the_question_end_when_the_ecg_follows_it(tok):
    unlimited = QuestionBeforeECG(tok, "You read ECGs.")
    full = unlimited.encode(LONG_QUESTION, "irregular", K)
    question_ids = unlimited._tokens(LONG_QUESTION.strip())
    between = unlimited._tokens(" \n")  # the question's trailing space, the newline before the ECG
    closing = unlimited._tokens("<|im_end|>\n<|im_start|>assistant\n")
    answer = [t for t, label in zip(full.input_ids, full.labels, strict=True) if label != IGNORE_INDEX]
    # 13 system-turn tokens + 200 question + 1 between, then the ECG; 6 closing tokens; the answer is 4.
    assert (len(question_ids), len(between), len(closing), len(answer)) == (200, 1, 6, 4)
    assert full.ecg_start == 13 + 200 + 1 and full.prompt_length == full.ecg_start + K + 6

    formatter = QuestionBeforeECG(tok, "You read ECGs.", max_length=120)
    cut = formatter.encode(LONG_QUESTION, "irregular", K)

    kept = 120 - 4 - 13 - 1 - K - 6  # the question's first 93 tokens
    assert len(cut.input_ids) == 120 and cut.prompt_length == 116
    assert cut.input_ids[:13] == full.input_ids[:13]  # the system turn and the user turn's opening
    assert cut.input_ids[13 : 13 + kept] == question_ids[:kept]
    assert cut.input_ids[13 + kept : cut.ecg_start] == between
    assert cut.ecg_starts == (13 + kept + 1,)
    assert cut.input_ids[cut.ecg_start : cut.ecg_start + K] == [formatter.placeholder_token_id] * K
    assert cut.input_ids[cut.ecg_start + K : cut.prompt_length] == closing
    assert [t for t, label in zip(cut.input_ids, cut.labels, strict=True) if label != IGNORE_INDEX] == answer
    # Generation reads the same shortened question, with room for min_answer_tokens = 16 new tokens.
    prompt = formatter.encode(LONG_QUESTION, None, K)
    assert len(prompt.input_ids) == 120 - 16 and prompt.input_ids[:13] == full.input_ids[:13]
    assert prompt.input_ids[prompt.ecg_start :] == [formatter.placeholder_token_id] * K + closing
    with pytest.raises(ValueError, match="the prompt without its question is 23 tokens"):
        QuestionBeforeECG(tok, "You read ECGs.", max_length=26).encode(LONG_QUESTION, "irregular", K)


@pytest.mark.parametrize(
    "formatter_class", [ChatTemplate, QuestionBeforeECG], ids=["ecg-first", "question-first"]
)
def test_truncation_leaves_a_system_prompt_that_repeats_the_question(tok, formatter_class):
    question = "Describe the morphology of every beat in the tracing. " * 10  # 100 tokens
    system = f"You read ECGs. Example question: {question.strip()} Answer: sinus rhythm."
    full = formatter_class(tok, system).encode(question, "irregular", K)
    cut = formatter_class(tok, system, max_length=full.prompt_length - 30 + 4).encode(
        question, "irregular", K
    )

    assert len(cut.input_ids) == len(full.input_ids) - 30
    system_turn = tok(f"<|im_start|>system\n{system}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert cut.input_ids[: len(system_turn)] == full.input_ids[: len(system_turn)] == system_turn
    assert cut.input_ids[-4:] == full.input_ids[-4:]  # the answer


#: Gemma 2's chat template (no system role: it raises), and one that silently drops system turns.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
DROPS_SYSTEM = (
    "{% for m in messages if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [GEMMA2_TEMPLATE, DROPS_SYSTEM], ids=["raises", "drops"])
def test_system_prompt_joins_the_user_turn_without_a_system_role(tokenizer_dir, template):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template
    formatter = ChatTemplate(tok, system_prompt="You read ECGs. Answer with one word.")
    assert not formatter.template_has_system
    enc = formatter.encode("Is the rhythm regular?", "irregular", K)
    text = tok.decode(enc.input_ids)
    user_turn = "You read ECGs. Answer with one word.\n\n" + tok.decode([formatter.placeholder_token_id] * K)
    assert user_turn in text
    assert text.index("Answer with one word.") < text.index("Is the rhythm regular?")
    answer = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    end = "<end_of_turn>\n" if template == GEMMA2_TEMPLATE else "<|im_end|>\n"
    assert tok.decode(answer) == "irregular" + end
    assert enc.input_ids[enc.ecg_start : enc.ecg_start + K] == [formatter.placeholder_token_id] * K


def test_system_prompt_stays_a_system_turn_when_the_template_has_one(tok):
    formatter = ChatTemplate(tok, system_prompt="You read ECGs.")
    assert formatter.template_has_system
    text = tok.decode(formatter.encode("Is the rhythm regular?", None, K).input_ids)
    assert text.startswith("<|im_start|>system\nYou read ECGs.<|im_end|>\n<|im_start|>user\n")


UPPER_ANSWERS = DROPS_SYSTEM.replace(
    "{{ m['content'] }}", "{{ m['content'] | upper if m['role'] == 'assistant' else m['content'] }}"
)
PER_QUESTION = (  # the answer's frame depends on the question: no shared frame
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %} [{{ messages[-2]['content'] | length }}]{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QA_PAIRS = [
    ("Does this ECG show first degree av block?", "yes"),
    ("Does this ECG show first degree av block?", "no"),
    ("Which leads show st elevation?", "lead V1, lead V2"),
    ("Describe the rhythm.", "Sinus rhythm at 72 bpm; QRS 96 ms. Ünusual axis: \u221230°."),
    ("Describe the rhythm.", " leading and trailing space "),
    ("What does the report say?", "<think>\nhidden</think>\nsinus rhythm"),
    ("Is it normal?", "line one\nline two"),
]


@pytest.mark.parametrize("template", [None, GEMMA2_TEMPLATE, UPPER_ANSWERS, PER_QUESTION])
@pytest.mark.parametrize("system_prompt", [None, "You read ECGs."])
def test_prompt_cache_and_answer_frame_give_the_full_render_tokens(tokenizer_dir, template, system_prompt):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template is not None:
        tok.chat_template = template
    fast = ChatTemplate(tok, system_prompt)
    full = ChatTemplate(tok, system_prompt, prompt_cache_size=0)  # renders every pair in full

    for _ in range(2):  # the second round is served from the cache
        for question, answer in QA_PAIRS:
            for k in (0, K):
                assert fast.encode(question, answer, k) == full.encode(question, answer, k), (
                    question,
                    answer,
                )
                assert fast.encode(question, None, k) == full.encode(question, None, k)
    frame = fast._answer_frame(system_prompt)
    assert (frame is None) == (template in (UPPER_ANSWERS, PER_QUESTION))


TURNS = [
    {"question": "What is the rhythm?", "answer": "Sinus rhythm."},
    {"question": "Any atrial abnormality?", "answer": "Possible right atrial abnormality."},
    {"question": "And the axis?", "answer": "Normal axis."},
]
HISTORY_DIFFERS = (  # earlier assistant turns are rendered shorter once the conversation goes on
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer)"
    "{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_conversation_supervises_every_answer_and_renders_like_the_template(tok):
    formatter = ChatTemplate(tok, system_prompt="You read ECGs.")
    enc = formatter.encode_turns(TURNS, K)

    messages = formatter.messages(TURNS[0]["question"], TURNS[0]["answer"])
    for turn in TURNS[1:]:
        messages += [
            {"role": "user", "content": turn["question"]},
            {"role": "assistant", "content": turn["answer"]},
        ]
    full = tok.apply_chat_template(messages, tokenize=False).replace(
        "<ecg>", tok.decode([formatter.placeholder_token_id] * K)
    )
    assert tok.decode(enc.input_ids) == full
    supervised = tok.decode(
        [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    )
    assert supervised == "".join(f"{t['answer']}<|im_end|>\n" for t in TURNS)
    assert enc.input_ids[enc.ecg_start : enc.ecg_start + K] == [formatter.placeholder_token_id] * K
    assert formatter.encode_turns(TURNS[:1], K) == formatter.encode(
        TURNS[0]["question"], TURNS[0]["answer"], K
    )

    # Whole turns are dropped from the end to fit max_length.
    two = ChatTemplate(tok, system_prompt="You read ECGs.").encode_turns(TURNS[:2], K)
    fitted = ChatTemplate(
        tok, system_prompt="You read ECGs.", max_length=len(two.input_ids) + 3
    ).encode_turns(TURNS, K)
    assert fitted == two


def test_conversation_falls_back_to_its_first_turn_when_the_template_rewrites_history(tokenizer_dir, caplog):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = HISTORY_DIFFERS
    formatter = ChatTemplate(tok)
    with caplog.at_level(logging.WARNING):
        enc = formatter.encode_turns(TURNS, K)
    assert enc == formatter.encode(TURNS[0]["question"], TURNS[0]["answer"], K)
    assert "training on first turns only" in caplog.text


class NoWidthBackbone(Backbone):
    """Implements every abstract method but never sets ``hidden_size``."""

    def __init__(self, formatter: ChatTemplate):
        super().__init__()
        self.formatter = formatter

    def embed_tokens(self, input_ids): ...

    def forward(self, input_ids, attention_mask, ecg_mask, ecg_tokens, labels=None): ...

    def generate(self, input_ids, attention_mask, ecg_mask, ecg_tokens, **generation_kwargs): ...


def test_a_backbone_without_hidden_size_is_named_where_it_is_needed(tok, tiny_encoder_factory):
    from ecglm.connectors import MLPConnector
    from ecglm.module import ECGLanguageModel

    backbone = NoWidthBackbone(ChatTemplate(tok))
    message = r"NoWidthBackbone has no hidden_size: a Backbone must set self\.hidden_size"
    with pytest.raises(AttributeError, match=message):
        ECGLanguageModel(tiny_encoder_factory(), MLPConnector(), backbone)
    assert not hasattr(backbone, "hidden_size")  # still an AttributeError, for getattr with a default
    with pytest.raises(AttributeError, match="has no attribute 'width'"):
        backbone.width  # noqa: B018 - other attributes keep torch's message


@pytest.mark.parametrize(
    "model", ["/no/such/dir", "./models/missing", "../missing", "~/no-such-model", "a/b/c"]
)
def test_a_local_model_path_that_does_not_exist_is_named(model):
    with pytest.raises(FileNotFoundError, match=f"model path {re.escape(repr(model))} does not exist"):
        HFBackbone(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFBackbone("llama", tokenizer=model, random_init=True)


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "llama"])
def test_hub_ids_and_model_types_are_not_taken_for_paths(model):
    assert resolve_model_path(model) == model


def test_an_existing_local_folder_and_home_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    assert resolve_model_path(str(tmp_path / "model")) == str(tmp_path / "model")
    assert resolve_model_path("~/model") == str(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./model") == "./model"


def test_4bit_weights_can_be_stored_in_a_floating_point_dtype(saved_models):
    """What FSDP needs to shard 4-bit weights (docs/scaling.md): bnb_4bit_quant_storage."""
    import bitsandbytes as bnb

    four = HFBackbone(saved_models["llama"], quantization="nf4", dtype="float32", bnb_compute_dtype="float32")
    floats = HFBackbone(
        saved_models["llama"],
        quantization="nf4",
        dtype="float32",
        bnb_compute_dtype="float32",
        bnb_quant_storage="float32",
    )
    packed = [next(m for m in b.model.modules() if isinstance(m, bnb.nn.Linear4bit)) for b in (four, floats)]
    assert (packed[0].weight.dtype, packed[1].weight.dtype) == (torch.uint8, torch.float32)
