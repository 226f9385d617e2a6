"""The composed model on tiny random models of real architectures.

Splice, answer-span loss, padding, gradients, generation, and the guards around evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecglm.backbones import positions_from_mask
from ecglm.connectors import LinearConnector, MLPConnector
from ecglm.data.datamodule import QACollator
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.module import ECGLanguageModel
from ecglm.peft import ProjectionOnly, count_parameters
from ecglm.prompts import ECG_MARKER, IGNORE_INDEX, ChatTemplate
from ecglm.testing import bound_prompt

#: Per-architecture config so that each tiny model has both of its layer kinds.
ARCHITECTURES = {
    "llama": {},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
}
K = 3


def items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    questions = ["What is the heart rate category of this ECG?", "Is the rhythm regular or irregular?"]
    answers = ["tachycardia", "irregular"]
    return [
        {
            "key": f"ecg{i}",
            "ecg": rng.standard_normal((12, 2500)).astype(np.float16),
            "question": questions[i % 2] + " Please answer briefly." * (i % 3),  # unequal lengths
            "answer": answers[i % 2],
            "question_type": "hr" if i % 2 == 0 else "rhythm",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tiny_backbone_factory, tiny_encoder_factory) -> ECGLanguageModel:
    backbone = tiny_backbone_factory(request.param, config_overrides=ARCHITECTURES[request.param])
    return ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone)


def test_wav2vec2_default_size_gives_156_frames():
    encoder = Wav2Vec2ECGEncoder(num_layers=1)  # the CMSC / ECG-FM feature extractor and width
    frames = encoder(torch.randn(2, 12, 2500))
    assert frames.shape == (2, 156, 768)
    with pytest.raises(ValueError, match=r"\(batch, 12, samples\)"):
        encoder(torch.randn(2, 15, 2500))


def test_connectors_pool_into_k_tokens():
    frames = torch.randn(2, 12, 8)
    linear = LinearConnector(num_tokens=1, input_dim=8, output_dim=5)
    torch.testing.assert_close(linear(frames), linear.proj(frames.mean(1, keepdim=True)))
    mlp = MLPConnector(num_tokens=4, hidden_dim=7, input_dim=8, output_dim=5)
    groups = frames.view(2, 4, 3, 8).mean(2)  # 12 frames -> 4 tokens of 3 frames each
    torch.testing.assert_close(mlp(frames), mlp.mlp(groups))
    with pytest.raises(ValueError, match="built for 8 -> 5"):
        mlp.configure(16, 5)
    normed = MLPConnector(num_tokens=1, input_norm="batch", input_dim=8, output_dim=5)
    pooled = frames.mean(1)
    expected = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(normed(frames), normed.mlp(expected.unsqueeze(1)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_norm"):
        MLPConnector(input_norm="group")


def test_formatter_marks_answer_span_from_the_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    formatter = ChatTemplate(tok, system_prompt="You read ECGs.")
    enc = formatter.encode("Is the rhythm regular?", "irregular", num_ecg_tokens=K)
    answer_ids = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(answer_ids) == "irregular<|im_end|>\n"
    assert enc.labels[: enc.prompt_length] == [IGNORE_INDEX] * enc.prompt_length
    assert enc.input_ids[enc.ecg_start : enc.ecg_start + K] == [formatter.placeholder_token_id] * K
    prompt = formatter.encode("Is the rhythm regular?", None, num_ecg_tokens=K)
    assert prompt.input_ids == enc.input_ids[: enc.prompt_length]
    assert tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")

    short = ChatTemplate(
        tok, system_prompt="You read ECGs.", max_length=enc.prompt_length + 1, min_answer_tokens=1
    )
    cut = short.encode("Is the rhythm regular?", "irregular", num_ecg_tokens=K)
    assert len(cut.input_ids) == enc.prompt_length + 1 and cut.labels[-1] == answer_ids[0]
    with pytest.raises(ValueError, match="leaves no room"):
        ChatTemplate(tok, max_length=5).encode("Is the rhythm regular?", "irregular", num_ecg_tokens=K)


def test_formatter_rejects_a_template_that_drops_the_ecg(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match=ECG_MARKER):
        ChatTemplate(tok).encode("q", "a", num_ecg_tokens=1)


def test_splice_writes_ecg_tokens_only_at_placeholders(model):
    batch = QACollator(bound_prompt(model.backbone), K)(items(3))
    tokens = model.model.ecg_tokens(batch.ecg)
    embeds = model.backbone.splice(batch.input_ids, batch.ecg_mask, tokens)
    plain = model.backbone.embed_tokens(batch.input_ids)
    mask = batch.ecg_mask
    assert mask.sum(1).tolist() == [K, K, K]
    torch.testing.assert_close(embeds[mask], tokens.reshape(-1, tokens.shape[-1]))
    torch.testing.assert_close(embeds[~mask], plain[~mask])


def _assert_span_loss_is_full_loss(model, batch: dict) -> None:
    """The loss from the answer span's logits equals the loss from every position's logits."""
    with torch.no_grad():
        fast = model(batch).loss
        model.backbone._keeps_logits = False
        try:
            reference = model(batch).loss
        finally:
            model.backbone._keeps_logits = True
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_answer_span_loss_equals_full_logits_loss(model):
    batch = QACollator(bound_prompt(model.backbone), K)(items(4))
    _assert_span_loss_is_full_loss(model, batch)


def test_conversation_loss_equals_full_logits_loss(model):
    data = items(3)
    data[1]["turns"] = [
        {"question": data[1]["question"], "answer": data[1]["answer"]},
        {"question": "Is that a problem?", "answer": "Not on its own."},
    ]  # answers with a user turn between them: the kept logits span covers both
    batch = QACollator(bound_prompt(model.backbone), K)(data)
    assert (batch.labels[1] != IGNORE_INDEX).sum() > (batch.labels[0] != IGNORE_INDEX).sum()
    _assert_span_loss_is_full_loss(model, batch)


def test_comparison_rows_carry_two_ecgs_through_loss_and_generation(model):
    data = items(3)
    rng = np.random.default_rng(1)
    data[1]["ecg"] = rng.standard_normal((2, 12, 2500)).astype(np.float16)  # a comparison question
    data[1]["question"] = "Compared with ECG 1, is ECG 2 faster?"
    batch = QACollator(bound_prompt(model.backbone), K)(data)
    assert batch.ecg.shape == (4, 12, 2500) and batch.ecg_counts.tolist() == [1, 2, 1]
    assert batch.ecg_mask.sum(1).tolist() == [K, 2 * K, K]
    _assert_span_loss_is_full_loss(model, batch)
    with torch.no_grad():
        tokens = model.model.ecg_tokens(batch.ecg)
        embeds = model.backbone.splice(batch.input_ids, batch.ecg_mask, tokens)
    # Row 1's second ECG tokens are the second ECG's: tokens stay in row order, ECG by ECG.
    second = batch.ecg_mask[1].nonzero().squeeze(1)[K:]
    torch.testing.assert_close(embeds[1, second], tokens[2])

    generation = QACollator(bound_prompt(model.backbone), K, for_generation=True)(data)
    for condition in ("ecg", "zeroed_ecg", "text_only"):
        with torch.no_grad():
            answers = model.model.generate(generation, condition=condition, max_new_tokens=2)
        assert len(answers) == 3, condition


def test_left_padding_does_not_change_a_sample(model):
    data = items(3)
    collate = QACollator(bound_prompt(model.backbone), K)
    batch = collate(data)
    assert (batch.attention_mask == 0).any(), "the items must need padding for this test to mean anything"
    with torch.no_grad():
        alone = model(collate(data[:1])).loss
        tokens = model.model.ecg_tokens(batch.ecg)
        logits = model.backbone.model(
            inputs_embeds=model.backbone.splice(batch.input_ids, batch.ecg_mask, tokens),
            attention_mask=batch.attention_mask,
            position_ids=positions_from_mask(batch.attention_mask),
        ).logits
    labels = batch.labels[0]
    row = torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train_encoder", [False, True])
def test_gradients_reach_exactly_the_trainable_parameters(
    tiny_backbone_factory, tiny_encoder_factory, train_encoder
):
    backbone = tiny_backbone_factory("qwen3_5_text", config_overrides=ARCHITECTURES["qwen3_5_text"])
    policy = ProjectionOnly(train_encoder)
    model = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=K), backbone, policy)
    model(QACollator(bound_prompt(backbone), K)(items(2))).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"encoder", "connector"} if train_encoder else {"connector"})
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in trainable)
    assert n_total > 10 * n_trainable


def test_batched_generation_matches_one_by_one(model):
    data = items(3)
    collate = QACollator(bound_prompt(model.backbone), K, for_generation=True)
    batched = model.model.generate(collate(data), max_new_tokens=5)
    single = [model.model.generate(collate([it]), max_new_tokens=5)[0] for it in data]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    zeroed = model.model.generate(collate(data), condition="zeroed_ecg", max_new_tokens=5)
    text_only = model.model.generate(collate(data), condition="text_only", max_new_tokens=5)
    assert len(zeroed) == len(text_only) == 3
    # Text-only prompts are the same prompts without the ECG positions.
    batch = collate(data)
    assert not batch.text_only.ecg_mask.any()
    assert (batch.attention_mask.sum(1) - batch.text_only.attention_mask.sum(1)).tolist() == [K] * 3


def test_the_shuffled_condition_answers_from_other_records_ecgs(model):
    from dataclasses import replace

    from ecglm.data.controls import ECGDonors

    with pytest.raises(ValueError, match="donors=ECGDonors"):
        plain = QACollator(bound_prompt(model.backbone), K, for_generation=True)
        model.model.generate(plain(items(3)), condition="shuffled_ecg")
    collate = QACollator(bound_prompt(model.backbone), K, for_generation=True, donors=ECGDonors(seed=0))
    batch = collate(items(3))
    assert batch.donor is not None
    assert all(d not in (None, k) for d, k in zip(batch.donor, batch.key, strict=True))
    assert not torch.equal(batch.shuffled_ecg, batch.ecg)
    shuffled = model.model.generate(batch, condition="shuffled_ecg", max_new_tokens=5)
    assert shuffled == model.model.generate(replace(batch, ecg=batch.shuffled_ecg), max_new_tokens=5)
    noise = model.model.generate(batch, condition="noise_ecg", max_new_tokens=5)
    assert len(noise) == 3 and noise == model.model.generate(batch, condition="noise_ecg", max_new_tokens=5)
    keys = set(model.state_dict())
    random = model.model.generate(batch, condition="random_encoder", max_new_tokens=5)
    assert len(random) == 3 and set(model.state_dict()) == keys  # the baseline never enters checkpoints


def test_answer_scores_are_the_first_answer_tokens_probabilities(model):
    """P(yes) for AUROC: the last prompt position's logits of the first tokens the prompt style writes
    for "yes" and "no", renormalised; the backbone's last_logits equal its full forward's."""
    prompt = bound_prompt(model.backbone)
    batch = QACollator(prompt, K, for_generation=True)(items(3))
    ecg_tokens = model.model.ecg_tokens(batch.ecg)
    with torch.no_grad():
        full = model.backbone(batch.input_ids, batch.attention_mask, batch.ecg_mask, ecg_tokens).logits[:, -1]
        last = model.backbone.last_logits(batch.input_ids, batch.attention_mask, batch.ecg_mask, ecg_tokens)
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)
    yes, no = prompt.answer_token("yes"), prompt.answer_token("no")
    encoded = prompt.encode("Is it?", "yes", K)
    assert yes == next(t for t in encoded.labels if t != -100) and yes != no
    original, model.model.prompt = model.model.prompt, None
    with pytest.raises(ValueError, match="prompt style"):
        model.model.answer_scores(batch, ("yes", "no"))
    model.model.prompt = prompt
    scores = model.model.answer_scores(batch, ("yes", "no"))
    torch.testing.assert_close(scores, full[:, [yes, no]].float().softmax(-1), rtol=1e-4, atol=1e-5)
    assert scores.shape == (3, 2) and torch.allclose(scores.sum(-1), torch.ones(3))
    text_only = model.model.answer_scores(batch, ("yes", "no"), condition="text_only")
    assert not torch.allclose(text_only, scores)  # the ECG tokens change the scores
    with pytest.raises(ValueError, match="same token"):
        model.model.answer_scores(batch, ("yes", "yes"))
    model.model.prompt = original


def test_generation_depends_on_the_ecg(model, tiny_encoder_factory):
    """The same question about two different ECGs (a flat line, as with the leads off, and a recording):
    different next-token logits and different greedy answers; the first ECG again gives the first answer,
    so the difference is the ECG's, not the row's."""
    # 16 ECG tokens: in an untrained model every position weighs about alike, so the ECG needs a share of
    # the prompt to move greedy answers.
    task = ECGLanguageModel(tiny_encoder_factory(), MLPConnector(num_tokens=16), model.backbone).eval()
    question = items(1)[0]
    flat = np.zeros_like(question["ecg"])
    rows = [dict(question, key="flat", ecg=flat), question, dict(question, key="flat-again", ecg=flat)]
    batch = QACollator(bound_prompt(task.backbone), 16, for_generation=True)(rows)
    assert (batch.input_ids == batch.input_ids[0]).all(), "one prompt: only the ECGs differ"
    with torch.no_grad():
        fields, ecg_tokens = task.model.condition_inputs(batch, "ecg")
        logits = task.backbone.last_logits(
            fields.input_ids, fields.attention_mask, fields.ecg_mask, ecg_tokens
        )
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    torch.testing.assert_close(logits[2], logits[0])
    answers = task.model.generate(batch, max_new_tokens=8)
    assert answers[0] != answers[1] and answers[2] == answers[0], answers


def test_frozen_parts_stay_in_eval_mode(tiny_backbone_factory, tiny_encoder_factory):
    model = ECGLanguageModel(
        tiny_encoder_factory(), MLPConnector(num_tokens=K), tiny_backbone_factory("llama")
    )
    model.train()
    assert model.connector.training
    assert not model.encoder.training and not model.backbone.training  # no dropout on frozen features


def test_evaluating_untrained_weights_is_refused(model):
    import lightning as L
    from torch.utils.data import DataLoader

    loader = DataLoader(items(2), batch_size=2, collate_fn=QACollator(bound_prompt(model.backbone), K, True))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="refusing to evaluate untrained weights"):
        trainer.test(model, dataloaders=loader)
