"""A plugin written against ecglm 0.1 keeps loading and training under the 0.2 compatibility shims.

The plugin is ecglm's own example as it was at 0.1 (``tests/compat/plain_prompt_0_1``, see its
README): a backbone that writes plain-text prompts through 0.1's ``build_formatter`` hook, with
``ECG_MARKER`` and ``ChatFormatter`` imported from ``ecglm.backbones`` and ``system_prompt`` /
``max_length`` passed to ``HFBackbone``. Each use of the old API warns, naming its new place.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import ECGQADataModule
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.module import ECGLanguageModel
from ecglm.plugins import discover
from ecglm.prompts import ECG_MARKER, IGNORE_INDEX, ChatTemplate
from ecglm.testing import TINY_ENCODER, tiny_encoder
from ecglm.wiring import connect
from ecglm_testing import REPO, TINY, VOCAB, import_fresh_from

FIXTURE = REPO / "tests" / "compat" / "plain_prompt_0_1"
DIST, PACKAGE, GROUP = "ecglm-plain-prompt-legacy", "ecglm_plain_prompt_legacy", "ecglm.backbones"
NAME = "plain-prompt-legacy"
SYSTEM = "You read ECGs."


@pytest.fixture
def legacy_plugin(monkeypatch):
    """The 0.1 plugin's folder first on ``sys.path`` (importlib.metadata finds its dist-info there), and
    its package forgotten, so that it is imported afresh (and warns) in each test."""
    yield from import_fresh_from(FIXTURE, PACKAGE, monkeypatch)


@pytest.fixture(scope="module")
def no_template_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> str:
    """SmolLM2's tokenizer without its chat template: the base LM the plugin was written for."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    out = tmp_path_factory.mktemp("tokenizer-no-template")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    SyntheticHeartQA(num_train=8, num_val=2, num_test=2).build(folder)
    return folder


def messages(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_discovered_and_its_imports_name_their_new_places(legacy_plugin):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = discover()

    plugin = registry.plugins[GROUP][NAME]
    assert (plugin.distribution, plugin.version) == (DIST, "0.1.0")
    assert plugin.class_path == f"{PACKAGE}.PlainPromptBackbone"
    assert not [f for f in registry.failures if f.plugin.distribution == DIST]
    said = messages(caught)
    assert any(
        m.startswith("ecglm.backbones.ECG_MARKER is deprecated") and "use ecglm.prompts.ECG_MARKER" in m
        for m in said
    )
    assert any(
        m.startswith("ecglm.backbones.ChatFormatter is deprecated")
        and "ecglm.prompts.PromptStyle" in m
        and "data.init_args.prompt" in m
        for m in said
    )
    assert all("removed in ecglm 0.3.0" in m for m in said)


def test_a_0_1_recipe_trains_a_step_with_its_plain_prompts(
    legacy_plugin, no_template_tokenizer_dir, shards, tmp_path
):
    """The plugin's backbone named in a 0.1-era recipe (prompt settings on the backbone, none on the
    data side), built and trained one step by ``ecglm fit``."""
    from ecglm.commands.lightning import run_cli

    overrides = dict(TINY, vocab_size=VOCAB)
    backbone = {"model": "llama", "tokenizer": no_template_tokenizer_dir, "random_init": True}
    backbone |= {"config_overrides": overrides, "system_prompt": SYSTEM, "max_length": 160}
    recipe = {
        "seed_everything": 0,
        "model": {
            "encoder": {"class_path": "wav2vec2", "init_args": TINY_ENCODER},
            "connector": {"class_path": "mlp", "init_args": {"num_tokens": 2}},
            "backbone": {"class_path": NAME, "init_args": backbone},
        },
        "data": {
            "class_path": "ecglm.data.datamodule.ECGQADataModule",
            "init_args": {"data_dir": str(shards), "batch_size": 4, "eval_batch_size": 4},
        },
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(["fit", "--config", str(path)])

    said = messages(caught)
    for key in ("system_prompt", "max_length"):
        assert any(
            m.startswith(f"PlainPromptBackbone({key}=...) is deprecated")
            and f"use data.init_args.prompt.init_args.{key}" in m
            for m in said
        ), said
    assert any(
        m.startswith("PlainPromptBackbone.build_formatter is deprecated") and "ecglm.prompts.PromptStyle" in m
        for m in said
    )
    assert cli.trainer.global_step == 1
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    prompt = cli.model.model.prompt
    assert type(prompt).__name__ == "PlainPromptFormatter" and cli.datamodule.prompt is prompt
    assert (prompt.system_prompt, prompt.max_length) == (SYSTEM, 160)
    rendered = prompt.render(prompt.messages("Is the rhythm regular?"), add_generation_prompt=True)
    assert rendered == f"{SYSTEM}\n\nECG: {ECG_MARKER}\nQuestion: Is the rhythm regular?\nAnswer:"
    check_answer_labels(cli.datamodule, prompt.tokenizer)


def check_answer_labels(data: ECGQADataModule, tok) -> None:
    """Every training row supervises exactly `` {answer}{eos}``, as the 0.1 plugin wrote answers."""
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    for row, answer in enumerate(batch.answer):
        answer_ids = tok(f" {answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        labels = batch.labels[row]
        assert labels[-len(answer_ids) :].tolist() == answer_ids
        assert (labels[: -len(answer_ids)] == IGNORE_INDEX).all()
        text = tok.decode(batch.input_ids[row][batch.attention_mask[row].bool() & ~batch.ecg_mask[row]])
        assert text.startswith(f"{SYSTEM}\n\nECG: \nQuestion: ") and text.endswith(
            f"\nAnswer: {answer}{tok.eos_token}"
        )


def test_hf_backbone_prompt_arguments_warn_and_reach_the_data_side(tokenizer_dir, shards):
    """0.1 recipes set system_prompt / max_length / min_answer_tokens on the backbone: they become the
    data side's chat template unless the recipe names a prompt style, which then wins, with a warning."""
    with pytest.warns(DeprecationWarning) as caught:
        backbone = tiny_hf(tokenizer_dir, system_prompt=SYSTEM, max_length=96, min_answer_tokens=4)
    for key in ("system_prompt", "max_length", "min_answer_tokens"):
        assert any(
            m.startswith(f"HFBackbone({key}=...) is deprecated")
            and f"data.init_args.prompt.init_args.{key}" in m
            for m in messages(caught)
        )
    model = ECGLanguageModel(tiny_encoder(), MLPConnector(num_tokens=2), backbone)

    data = ECGQADataModule(str(shards))
    connect(model, data)
    prompt = model.model.prompt
    assert type(prompt) is ChatTemplate and data.prompt is prompt
    assert (prompt.system_prompt, prompt.max_length, prompt.min_answer_tokens) == (SYSTEM, 96, 4)

    named = ECGQADataModule(str(shards), prompt=ChatTemplate(system_prompt="Recipe's own."))
    with pytest.warns(
        UserWarning, match="not used: the recipe names a prompt style in data.init_args.prompt"
    ):
        connect(model, named)
    assert model.model.prompt is named.prompt and named.prompt.system_prompt == "Recipe's own."


def test_an_hf_backbone_without_0_1_arguments_does_not_warn(tokenizer_dir, shards):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        backbone = tiny_hf(tokenizer_dir)
        data = ECGQADataModule(str(shards))
        connect(ECGLanguageModel(tiny_encoder(), MLPConnector(num_tokens=2), backbone), data)
    assert type(data.prompt) is ChatTemplate and data.prompt.system_prompt is None


def test_chat_formatter_takes_0_1_arguments_and_renders_as_the_chat_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.warns(DeprecationWarning, match="ecglm.backbones.ChatFormatter is deprecated"):
        from ecglm.backbones import ChatFormatter

    old = ChatFormatter(tok, SYSTEM, max_length=64)
    new = ChatTemplate(system_prompt=SYSTEM, max_length=64).bind(tok)
    chat = old.render(old.messages("Rate?", "60"), add_generation_prompt=False)
    assert chat == new.render(new.messages("Rate?", "60"), add_generation_prompt=False)
    assert old.encode("Rate?", "60", num_ecg_tokens=3) == new.encode("Rate?", "60", num_ecg_tokens=3)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ChatFormatter(tok)


def tiny_hf(tokenizer: str, **kwargs) -> HFBackbone:
    torch.manual_seed(0)
    overrides = dict(TINY, vocab_size=VOCAB)
    return HFBackbone("llama", tokenizer=tokenizer, random_init=True, config_overrides=overrides, **kwargs)
