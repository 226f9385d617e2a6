"""Few-shot connector PEFT: demonstrations drawn by seed from the training split, one per dataset type,
written into each row's prompt, recorded with the run and reused at evaluation; prefix reuse checked
against the full-sequence path on tiny models of every paper family."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer

from ecglm.backbones import HFBackbone
from ecglm.connectors import MLPConnector
from ecglm.data.datamodule import ECGQADataModule, QACollator, read_qa_text, select_demonstrations
from ecglm.data.shards import write_manifest, write_shards
from ecglm.evaluation import Decoding, EvaluationProtocol, MetricsConfig
from ecglm.metrics import answer_text
from ecglm.module import ECGLanguageModel
from ecglm.peft import FewShotConnector, ProjectionOnly
from ecglm.prompts import ChatTemplate
from ecglm.testing import bound_prompt
from ecglm.wiring import connect
from ecglm_testing import FAMILIES as SHARED_FAMILIES
from ecglm_testing import GEMMA4_TEXT, TINY

K = 2  # ECG tokens per sample
SYSTEM = "You read ECGs. Answer briefly."
#: ECGs per split and dataset type (PTB-XL and MIMIC records hold two QA pairs, PULSE one).
SIZES = {"ecgqa-ptbxl": 10, "ecgqa-mimic-iv-ecg": 6, "pulse-ecg-instruct": 5}
SPLITS = {"train": 1.0, "val": 0.4, "test": 0.4}


def qa_pairs(dataset: str, split: str, i: int) -> list[tuple[str, object, str]]:
    """Distinct text per record, so that a demonstration names the pair it came from."""
    if dataset == "pulse-ecg-instruct":
        return [
            (f"Write the report of {split} ECG {i}.", f"sinus rhythm, report {i}" + " and more" * i, "report")
        ]
    return [
        (
            f"Which diagnoses does {split} ECG {i} of {dataset} show?",
            ["none"] if i % 2 else ["afib", "lbbb"],
            "q",
        ),
        (f"Does {split} ECG {i} of {dataset} show first degree av block?", "yes" if i % 3 else "no", "v"),
    ]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """Three dataset types, each split in shards of three ECGs, laid out as the shard builders write them."""
    out = tmp_path_factory.mktemp("few-shot-mixture")
    rng = np.random.default_rng(0)
    splits = {}
    for split, scale in SPLITS.items():
        shards, datasets = [], {}
        for dataset, n in SIZES.items():
            n = max(2, round(n * scale))
            samples = [
                {
                    "__key__": f"{dataset}_{split}_{i:03d}",
                    "ecg.npy": rng.standard_normal((12, 2500)).astype(np.float16),
                    "json": {
                        "dataset": dataset,
                        "qa": [
                            {"question": q, "answer": a, "question_type": t}
                            for q, a, t in qa_pairs(dataset, split, i)
                        ],
                    },
                }
                for i in range(n)
            ]
            shards += write_shards(samples, out, f"{split}-{dataset}", 3)
            datasets[dataset] = sum(len(s["json"]["qa"]) for s in samples)
        splits[split] = {"num_qa": sum(datasets.values()), "datasets": datasets, "shards": shards}
    write_manifest(out, {"dataset": "mixture", "splits": splits})
    return out


# --- drawing the demonstrations ---------------------------------------------------------------------------


def test_demonstrations_are_drawn_by_seed_from_the_training_split(mixture, monkeypatch):
    dm = ECGQADataModule(str(mixture))
    demos = dm.sample_demonstrations(seed=0, per_dataset=1)

    assert list(demos) == sorted(SIZES) and all(len(d) == 1 for d in demos.values())
    for dataset, (demo,) in demos.items():
        _, split, i = demo["key"].rsplit("_qa", 1)[0].rsplit("_", 2)
        assert split == "train" and demo["dataset"] == dataset
        q, a, t = qa_pairs(dataset, "train", int(i))[int(demo["key"][-1])]
        assert (demo["question"], demo["answer"], demo["question_type"]) == (q, answer_text(a), t)

    # Deterministic: same seed, same demonstrations, whatever the loader workers or the shard order.
    assert dm.sample_demonstrations(seed=0, per_dataset=1) == demos
    assert ECGQADataModule(str(mixture), num_workers=2).sample_demonstrations(0, 1) == demos
    urls = dm._urls("train")
    monkeypatch.setattr(dm, "_urls", lambda split: urls[::-1])
    assert dm.sample_demonstrations(seed=0, per_dataset=1) == demos
    items = [qa for url in urls for qa in read_qa_text(url)]
    assert select_demonstrations(items[::-1], 0, 1) == select_demonstrations(items, 0, 1) == demos

    # Another seed draws others; more per dataset extends the draw (a hash rank, not a stream).
    assert any(dm.sample_demonstrations(seed=s, per_dataset=1) != demos for s in (1, 2))
    two = dm.sample_demonstrations(seed=0, per_dataset=2)
    assert all(two[d][:1] == demos[d] and len(two[d]) == 2 for d in SIZES)

    short = dm.sample_demonstrations(seed=0, per_dataset=1, max_chars=70)
    assert all(len(d["question"]) + len(d["answer"]) <= 70 for ds in short.values() for d in ds)
    with pytest.warns(UserWarning, match=r"no few-shot demonstration for \['ecgqa-mimic-iv-ecg'"):
        assert "ecgqa-mimic-iv-ecg" not in dm.sample_demonstrations(0, 1, max_chars=30)


def test_policy_checks_its_options():
    with pytest.raises(ValueError, match=r"\{question\} and \{answer\}"):
        FewShotConnector(template="Q: {q}\nA: {answer}")
    with pytest.raises(ValueError, match="at least 1"):
        FewShotConnector(demos_per_dataset=0)
    policy = FewShotConnector(template="Q: {question} A: {answer}", train_encoder=True)
    assert policy.train_encoder  # the options of projection-only pass through
    demos = {"d": [{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}]}
    assert policy.system_prompts("Sys.", demos) == {"d": "Sys.\n\nQ: a? A: b\n\nQ: c? A: d"}
    assert policy.system_prompts(None, demos) == {"d": "Q: a? A: b\n\nQ: c? A: d"}


# --- prompts ----------------------------------------------------------------------------------------------

#: Gemma 2's chat template, which has no system role.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def items_of(split: str = "test") -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "key": f"{dataset}_{i}",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float32),
            "question": q,
            "answer": a,
            "question_type": t,
            "dataset": dataset,
        }
        for i in range(2)
        for dataset in SIZES
        for q, a, t in qa_pairs(dataset, split, i)[:1]
    ]


@pytest.mark.parametrize("template", [None, GEMMA2_TEMPLATE], ids=["system-role", "no-system-role"])
def test_each_row_carries_its_datasets_demonstration_before_the_ecg(mixture, tokenizer_dir, template):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template or tok.chat_template
    formatter = ChatTemplate(tok, SYSTEM)
    assert formatter.template_has_system == (template is None)
    policy = FewShotConnector()
    demos = ECGQADataModule(str(mixture)).sample_demonstrations(0, 1)
    prompts = policy.system_prompts(SYSTEM, demos)
    items = items_of()
    for collate in (
        QACollator(formatter, K, system_prompts=prompts),
        QACollator(formatter, K, True, system_prompts=prompts),
    ):
        batch = collate(items)
        rows = [batch] + ([batch.text_only] if batch.text_only is not None else [])
        for part in rows:
            for row, item in enumerate(items):
                ids = part.input_ids[row][part.attention_mask[row].bool()]
                ecg = part.ecg_mask[row][part.attention_mask[row].bool()]
                first_ecg = int(ecg.long().argmax()) if ecg.any() else len(ids)
                before = tok.decode(ids[:first_ecg])
                own = demos[item["dataset"]][0]
                assert f"{SYSTEM}\n\nExample:\nQuestion: {own['question']}\nAnswer: {own['answer']}" in before
                others = [d[0]["question"] for name, d in demos.items() if name != item["dataset"]]
                assert not any(q in tok.decode(ids) for q in others)
                if template:  # no system role: the demonstration opens the user turn
                    assert before.startswith(f"{tok.bos_token}<start_of_turn>user\n{SYSTEM}\n\nExample:")
    # Without per-dataset prompts (and for a dataset with none) the formatter's own system prompt stays.
    plain = tok.decode(QACollator(formatter, K)(items[:1]).input_ids[0])
    assert SYSTEM in plain and "Example:" not in plain
    partial = QACollator(formatter, K, system_prompts={"other": "X"})(items[:1]).input_ids[0]
    assert tok.decode(partial) == plain
    # The DataModule's loaders say which datasets of a split have no demonstration.
    dm = ECGQADataModule(str(mixture))
    dm.setup("test")
    dm.attach(formatter, K, {d: p for d, p in prompts.items() if d != "pulse-ecg-instruct"})
    with pytest.warns(
        UserWarning, match=r"datasets \['pulse-ecg-instruct'\] without few-shot demonstrations"
    ):
        assert dm.test_dataloader().collate_fn.system_prompts == dm.system_prompts


# --- recorded with the run, reused at evaluation --------------------------------------------------------


def build_model(tiny_backbone_factory, tiny_encoder_factory, policy) -> ECGLanguageModel:
    return ECGLanguageModel(
        tiny_encoder_factory(),
        MLPConnector(num_tokens=K),
        tiny_backbone_factory("llama"),
        policy,
        decoding=Decoding(max_new_tokens=2),
        evaluation=MetricsConfig(metrics=("acc",), bertscore_model=None, conditions=("ecg", "text_only")),
    )


def connected(model: ECGLanguageModel, mixture: Path, **kwargs) -> ECGQADataModule:
    """The mixture's DataModule, with the system prompt, connected to ``model``."""
    data = ECGQADataModule(str(mixture), prompt=ChatTemplate(system_prompt=SYSTEM), **kwargs)
    connect(model, data)
    return data


def trainer_in(folder: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_demonstrations_are_recorded_and_reused_at_evaluation_after_a_rebuild(
    mixture, tiny_backbone_factory, tiny_encoder_factory, tmp_path
):
    model = build_model(tiny_backbone_factory, tiny_encoder_factory, FewShotConnector(seed=0))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = trainer_in(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[checkpoints])
    trainer.fit(model, connected(model, mixture, batch_size=4, eval_batch_size=8))

    drawn = ECGQADataModule(str(mixture)).sample_demonstrations(0, 1)
    assert model.demonstrations == drawn
    recorded = json.loads((tmp_path / "demonstrations.json").read_text())
    assert recorded["demonstrations"] == drawn and recorded["seed"] == 0
    assert recorded["system_prompts"] == FewShotConnector().system_prompts(SYSTEM, drawn)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["ecglm"]["demonstrations"] == drawn
    # Training ran the prefix-reuse path, and the frozen LLM computed no prefix twice.
    cache = model.backbone.prefix_cache
    assert 0 < cache.misses == len(cache.entries) <= len(SIZES)

    # A fresh build whose policy seed (and data seed) would draw other demonstrations.
    other_seed = next(
        s for s in range(1, 10) if ECGQADataModule(str(mixture)).sample_demonstrations(s, 1) != drawn
    )
    rebuilt = build_model(tiny_backbone_factory, tiny_encoder_factory, FewShotConnector(seed=other_seed))
    prompts = []
    test_step = rebuilt.test_step

    def spy(batch, batch_idx):
        prompts.extend(
            zip(batch.dataset, rebuilt.backbone.tokenizer.batch_decode(batch.input_ids), strict=True)
        )
        return test_step(batch, batch_idx)

    rebuilt.test_step = spy
    protocol = EvaluationProtocol(
        ckpt_path=str(last), seeds=[0], samples_per_dataset=None, out_dir=str(tmp_path / "e")
    )
    summary = protocol.run(trainer_in(tmp_path / "eval"), rebuilt, connected(rebuilt, mixture, seed=7))

    assert rebuilt.demonstrations == drawn
    assert set(summary["conditions"]) == {"ecg", "text_only"}
    assert {d for d, _ in prompts} == set(SIZES)
    for dataset, text in prompts:
        assert f"Question: {drawn[dataset][0]['question']}\nAnswer: {drawn[dataset][0]['answer']}" in text

    # A checkpoint and a policy that disagree about demonstrations are refused.
    with pytest.raises(RuntimeError, match="trained with few-shot demonstrations"):
        plain = build_model(tiny_backbone_factory, tiny_encoder_factory, ProjectionOnly())
        trainer_in(tmp_path / "plain").test(plain, connected(plain, mixture), ckpt_path=str(last))
    few_shot = build_model(tiny_backbone_factory, tiny_encoder_factory, FewShotConnector())
    with pytest.raises(RuntimeError, match="records none"):
        few_shot._restore_demonstrations(None)
    with pytest.raises(RuntimeError, match="none were drawn"):
        few_shot.system_prompts()


# --- prefix reuse -----------------------------------------------------------------------------------------

#: Per family, a tiny config with every layer kind of the real checkpoints (sliding windows are set
#: per test, between the prefix lengths, so that one prefix fits the window and another does not).
FAMILIES = {
    "llama": SHARED_FAMILIES["llama"],
    "qwen3_5_text": SHARED_FAMILIES["qwen3_5_text"],
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "gemma4_text": {k: v for k, v in GEMMA4_TEXT.items() if k != "sliding_window"},
}
PROMPTS = {
    "ecgqa-ptbxl": "Example:\nQuestion: Does this ECG show atrial fibrillation?\nAnswer: no",
    "ecgqa-mimic-iv-ecg": "Example:\nQuestion: Which rhythm?\nAnswer: sinus rhythm",
    "pulse-ecg-instruct": "Example:\nQuestion: Write the report of this ECG.\nAnswer: sinus rhythm, left "
    "ventricular hypertrophy with secondary repolarisation abnormality",
}


def prefix_lengths(formatter: ChatTemplate) -> list[int]:
    return sorted(formatter.encode("q", None, K, system_prompt=p).ecg_start for p in PROMPTS.values())


def loss_logits_grads(model: ECGLanguageModel, batch: dict, reuse: bool):
    model.backbone.prefix_reuse = reuse
    model.zero_grad()
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.connector.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


def tiny_family(family: str, tiny_backbone_factory, tokenizer_dir: str) -> HFBackbone:
    """A tiny backbone of ``family`` (``gemma4``: the multimodal class Gemma 4 checkpoints load as)."""
    overrides = dict(FAMILIES["gemma4_text" if family == "gemma4" else family])
    if "sliding_attention" in overrides.get("layer_types", ()):
        shortest, *_, longest = prefix_lengths(
            ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), SYSTEM)
        )
        overrides["sliding_window"] = (shortest + longest) // 2
    if family != "gemma4":
        return tiny_backbone_factory(family, config_overrides=overrides)
    torch.manual_seed(0)
    vocab = overrides["vocab_size_per_layer_input"]
    # Multimodal placeholder ids inside the tiny vocabulary; they never occur in these prompts.
    special = {"image_token_id": vocab - 1, "video_token_id": vocab - 2, "audio_token_id": vocab - 3}
    config = {
        "text_config": dict(TINY, vocab_size=vocab, **overrides),
        "vision_config": None,
        "audio_config": None,
    }
    return HFBackbone(
        "gemma4",
        tokenizer=tokenizer_dir,
        random_init=True,
        config_overrides={**config, **special},
    )


@pytest.mark.parametrize("family", [*FAMILIES, "gemma4"])
def test_prefix_reuse_gives_the_full_sequence_loss_logits_and_gradients(
    family, tiny_backbone_factory, tiny_encoder_factory, tokenizer_dir
):
    """float32: loss to 1e-5 (relative), supervised logits to 1e-4, connector gradients to 1e-4 relative."""
    backbone = tiny_family(family, tiny_backbone_factory, tokenizer_dir)
    model = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone, FewShotConnector())
    assert backbone.prefix_reuse
    model.train()  # as in training: the connector trains, the frozen LLM stays in eval mode
    prompts = {d: f"{SYSTEM}\n\n{p}" for d, p in PROMPTS.items()}
    batch = QACollator(bound_prompt(backbone), K, system_prompts=prompts)(items_of("train"))
    assert (batch.attention_mask == 0).any()

    loss, logits, grads = loss_logits_grads(model, batch, reuse=False)
    assert backbone.prefix_cache.misses == 0
    for step in range(2):
        reused_loss, reused_logits, reused_grads = loss_logits_grads(model, batch, reuse=True)
        torch.testing.assert_close(reused_loss, loss, rtol=1e-5, atol=1e-6)
        supervised = batch.labels[:, -logits.shape[1] + 1 :] != -100
        torch.testing.assert_close(
            reused_logits[:, :-1][supervised], logits[:, :-1][supervised], rtol=0, atol=1e-4
        )
        for name, grad in grads.items():
            scale = float(grad.abs().max())
            torch.testing.assert_close(reused_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        # Each dataset's prefix ran once; the second step reused all of them.
        assert (backbone.prefix_cache.misses, backbone.prefix_cache.hits) == (len(SIZES), step * len(SIZES))


def test_prefix_reuse_steps_aside_where_it_would_be_wrong(
    tiny_backbone_factory, tiny_encoder_factory, caplog
):
    backbone = tiny_backbone_factory("llama")
    model = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone, FewShotConnector())
    model.eval()
    batch = QACollator(bound_prompt(backbone), K, system_prompts=PROMPTS)(items_of("train"))
    cache = backbone.prefix_cache
    with torch.no_grad():
        backbone.prefix_reuse = False
        naive = model(batch).loss
        backbone.prefix_reuse = True
        torch.testing.assert_close(model(batch).loss, naive)
        assert cache.misses == len(SIZES)

        # Without the hook that feeds the LM head each row's answer window, the logits are gathered after it.
        backbone.model.get_output_embeddings = lambda: None
        torch.testing.assert_close(model(batch).loss, naive)
        del backbone.model.get_output_embeddings

        # New LLM weights (an in-place load) empty the cache: the prefixes are computed again.
        state = {k: v + 0.01 for k, v in backbone.model.state_dict().items()}
        backbone.model.load_state_dict(state)
        changed = model(batch).loss
        backbone.prefix_reuse = False
        torch.testing.assert_close(changed, model(batch).loss)
        assert not torch.allclose(changed, naive) and cache.misses == 2 * len(SIZES)
        backbone.prefix_reuse = True

        # A trainable LLM (LoRA, unfrozen layers) or one in training mode runs the whole sequence.
        with caplog.at_level(logging.WARNING, logger="ecglm.backbones"):
            backbone.model.lm_head.weight.requires_grad_(True)
            model(batch)
            backbone.model.lm_head.weight.requires_grad_(False)
            backbone.model.train()
            model(batch)
            backbone.model.eval()
        assert cache.misses == 2 * len(SIZES)
        assert "trainable parameters" in caplog.text and "training mode" in caplog.text
