"""The example plugin ``plugins/ecglm-plain-prompt``, installed for real by pip: found, resolved, trained.

It is a prompt style (the data side's component): it changes how prompts are written for any backbone,
without touching the backbone."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.module import ECGLanguageModel
from ecglm.plugins import component_provenance, discover, format_registry, resolve_class_paths
from ecglm.prompts import ECG_MARKER, IGNORE_INDEX
from ecglm.testing import bound_prompt, check_backbone, tiny_backbone
from ecglm.wiring import connect
from ecglm_testing import REPO, TINY, import_fresh_from, package_version, pip_install_copy

PLUGIN_SRC = REPO / "plugins" / "ecglm-plain-prompt"
DIST, PACKAGE, NAME, GROUP = "ecglm-plain-prompt", "ecglm_plain_prompt", "plain", "ecglm.prompts"
CLASS_PATH = f"{PACKAGE}.PlainPrompt"
SYSTEM = "You read ECGs."


def plugin_version() -> str:
    return package_version(PLUGIN_SRC)


def plugin_class() -> type:
    """The prompt-style class, loaded as ecglm loads it: through its entry point."""
    return entry_points(group=GROUP)[NAME].load()


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """The plugin pip-installed (wheel built by setuptools) into a folder of its own."""
    return pip_install_copy(PLUGIN_SRC, tmp_path_factory.mktemp("plugin"))


@pytest.fixture
def installed(site_dir, monkeypatch) -> Iterator[Path]:
    """``site_dir`` first on ``sys.path``, and the plugin imported from there (not from any other install)."""
    yield from import_fresh_from(site_dir, PACKAGE, monkeypatch)


def test_discovered_and_listed(installed):
    registry = discover()

    plugin = registry.plugins[GROUP][NAME]
    assert (plugin.distribution, plugin.version, plugin.class_path) == (DIST, plugin_version(), CLASS_PATH)
    assert not [f for f in registry.failures if f.plugin.distribution == DIST]
    assert Path(sys.modules[PACKAGE].__file__).is_relative_to(installed)
    line = rf"^  {NAME} +{re.escape(CLASS_PATH)} +{DIST} {re.escape(plugin_version())}$"
    assert re.search(line, format_registry(registry), re.M)


def test_checkpoint_provenance_names_the_plugin_distribution(installed):
    provenance = component_provenance(plugin_class()(), MLPConnector())

    assert provenance[CLASS_PATH] == {
        "class_path": CLASS_PATH,
        "distribution": DIST,
        "version": plugin_version(),
    }
    assert provenance["ecglm.connectors.MLPConnector"]["distribution"] == "ecglm"


def test_a_checkpoint_records_the_plugin_that_wrote_its_prompts(installed, tiny_encoder_factory):
    task = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=2), tiny_backbone())
    connect(task, SimpleNamespace(prompt=plugin_class()(system_prompt=SYSTEM)))  # as the ecglm command does
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)

    recorded = checkpoint["ecglm"]["components"][CLASS_PATH]
    assert recorded == {"class_path": CLASS_PATH, "distribution": DIST, "version": plugin_version()}


def test_safe_to_import_twice(installed):
    first = plugin_class()
    del sys.modules[PACKAGE]  # a fresh import, as in another process or after a reload
    assert plugin_class() is not first
    registry = discover()
    assert NAME in registry.plugins[GROUP]
    assert not [f for f in registry.failures if f.plugin.distribution == DIST]


def test_recipe_name_resolves_to_import_path(installed):
    config = {"data": {"init_args": {"prompt": {"class_path": NAME, "init_args": {"system_prompt": "S"}}}}}

    resolved = resolve_class_paths(config, discover())

    assert resolved["data"]["init_args"]["prompt"] == {
        "class_path": CLASS_PATH,
        "init_args": {"system_prompt": "S"},
    }


def test_templates_are_checked_when_the_style_is_built(installed):
    cls = plugin_class()
    with pytest.raises(ValueError, match="exactly once"):
        cls(prompt_template="Question: {question}\nAnswer:")
    with pytest.raises(ValueError, match="answer_template"):
        cls(answer_template=" {reply}")


def test_a_template_with_the_ecg_after_the_question_is_truncated_and_trains(
    installed, tokenizer_dir, tiny_encoder_factory
):
    template = f"Question: {{question}}\nECG: {ECG_MARKER}\nAnswer:"
    torch.manual_seed(0)
    backbone = HFBackbone(
        "llama", tokenizer=tokenizer_dir, random_init=True, config_overrides=dict(TINY, vocab_size=49152)
    )
    model = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=2), backbone)
    prompt = bound_prompt(backbone, plugin_class()(prompt_template=template, max_length=40))
    question = "Describe the morphology of every beat in the tracing. " * 5
    items = [
        {
            "key": "ecg0",
            "ecg": np.zeros((12, 2500), np.float32),
            "question": question,
            "answer": "sinus",
            "question_type": "morphology",
        }
    ]

    batch = QACollator(prompt, 2)(items)

    tok = backbone.tokenizer
    answer_ids = tok(f" sinus{tok.eos_token}", add_special_tokens=False)["input_ids"]
    assert batch.input_ids.shape == (1, 40)
    assert batch.labels[0, -len(answer_ids) :].tolist() == answer_ids
    assert batch.ecg_mask[0].sum() == 2
    text = tok.decode(batch.input_ids[0][~batch.ecg_mask[0]])
    start = "Question: Describe the morphology of every beat"
    assert text.startswith(start) and text.endswith(f"\nECG: \nAnswer: sinus{tok.eos_token}")
    assert len(text) < len(f"Question: {question}\nECG: \nAnswer:")  # the question was shortened
    loss = model(batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.connector.mlp[0].weight.grad.abs().sum() > 0


def test_writes_prompts_a_backbone_keeps_its_contract_with(installed, no_template_tokenizer_dir):
    backbone = tiny_backbone(tokenizer=no_template_tokenizer_dir)
    assert torch.isfinite(check_backbone(backbone, prompt=plugin_class()(system_prompt=SYSTEM)))


@pytest.fixture(scope="module")
def no_template_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> str:
    """SmolLM2's tokenizer with its chat template removed, as a base model's tokenizer has none."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    out = tmp_path_factory.mktemp("tokenizer-no-template")
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("chat_template", [True, False], ids=["with-chat-template", "no-chat-template"])
def test_trains_one_step_with_plain_prompts(
    installed, chat_template, tokenizer_dir, no_template_tokenizer_dir, tiny_encoder_factory, tmp_path
):
    torch.manual_seed(0)
    backbone = HFBackbone(
        "llama",
        tokenizer=tokenizer_dir if chat_template else no_template_tokenizer_dir,
        random_init=True,
        config_overrides=dict(TINY, vocab_size=49152),
    )
    assert (backbone.tokenizer.chat_template is not None) == chat_template
    prompt = bound_prompt(backbone, plugin_class()(system_prompt=SYSTEM))
    model = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=2), backbone)
    rng = np.random.default_rng(0)
    items = [
        {
            "key": f"ecg{i}",
            "ecg": rng.normal(size=(12, 2500)).astype(np.float32),
            "question": q,
            "answer": a,
            "question_type": t,
        }
        for i, (q, a, t) in enumerate(
            [
                ("Is the rhythm regular or irregular?", "irregular", "rhythm"),
                ("What is the heart rate category of this ECG?", "bradycardia", "heart-rate"),
            ]
        )
    ]
    collate = QACollator(prompt, 2)

    _check_plain_prompt_and_labels(prompt, collate(items), items)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(items, batch_size=2, collate_fn=collate))

    assert trainer.global_step == 1
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("connector.")}


def _check_plain_prompt_and_labels(formatter, batch, items):
    tok = formatter.tokenizer
    for row, item in enumerate(items):
        prompt = f"{SYSTEM}\n\nECG: {ECG_MARKER}\nQuestion: {item['question']}\nAnswer:"
        assert formatter.render(formatter.messages(item["question"]), add_generation_prompt=True) == prompt
        answer_ids = tok(f" {item['answer']}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        labels = batch.labels[row]
        # Left padding: the supervised tokens are exactly the answer's, at the end of the row.
        assert labels[-len(answer_ids) :].tolist() == answer_ids
        assert (labels[: -len(answer_ids)] == IGNORE_INDEX).all()
        ids = batch.input_ids[row][batch.attention_mask[row].bool() & ~batch.ecg_mask[row]]
        before, _, after = prompt.partition(ECG_MARKER)
        assert tok.decode(ids) == before + after + f" {item['answer']}{tok.eos_token}"
