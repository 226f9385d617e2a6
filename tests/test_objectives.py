"""The training objectives: GRPO's and DPO's math against hand computations and TRL, the reference
policy, and GRPO teaching a tiny model to read the ECG."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ecglm import ECGLM
from ecglm.connectors import MLPConnector
from ecglm.data.collate import QACollator
from ecglm.encoders import Wav2Vec2ECGEncoder
from ecglm.model import Decoding
from ecglm.objectives import DPO, GRPO
from ecglm.objectives.losses import dpo_loss, group_advantages, grpo_loss, zero_variance_fraction
from ecglm.objectives.sequences import (
    completion_logprobs,
    prompt_fields,
    reference_policy,
    snapshot_trainable,
)
from ecglm.peft import LoRA, PartialFineTuning
from ecglm.rewards import ExactMatchReward
from ecglm.testing import TINY_ENCODER, bound_prompt, tiny_backbone

QUESTION = "Is the rhythm regular or irregular?"


def test_group_advantages_are_rewards_normalised_within_each_group_and_zero_without_variance():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4, eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]))
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # zero variance: nothing to learn
    assert zero_variance_fraction(rewards, 4) == 0.5
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:2], torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_loss_equals_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
    old = torch.tensor([[-1.2, -1.5, -0.5], [-0.3, -0.4, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]])
    adv = torch.tensor([1.5, -0.7])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    eps, beta = 0.2, 0.1
    expected, kls, clipped = [], [], []
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            d = float(ref[i, t] - logp[i, t])
            kl = math.exp(d) - d - 1
            kls.append(kl)
            clipped.append(abs(ratio - 1) > eps)
            terms.append(float(surrogate) - beta * kl)
        expected.append(sum(terms) / len(terms))
    out = grpo_loss(logp, old, ref, adv, mask, eps, beta)
    assert out.loss.item() == pytest.approx(-sum(expected) / 2, rel=1e-6)
    assert out.kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert out.clip_fraction.item() == pytest.approx(sum(clipped) / len(clipped))
    # Zero advantages (a zero-variance group) and no KL: no loss and no gradient.
    logp.requires_grad_(True)
    flat = grpo_loss(logp, old, None, torch.zeros(2), mask, eps, 0.0)
    flat.loss.backward()
    assert flat.loss.item() == 0 and not logp.grad.any()


def _trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL's DPOTrainer._compute_loss on given sequence log-probabilities: the trainer's own code,
    run with a stand-in model whose per-token log-probabilities sum to them."""
    trl = pytest.importorskip("trl")
    n = len(chosen)
    per_token = torch.stack([torch.cat([chosen, rejected]) / 2] * 2, 1)  # two tokens each
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    identity = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    model = SimpleNamespace(training=True)
    trainer = SimpleNamespace(
        model=model,
        accelerator=identity,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1, 1]] * (2 * n)),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, trainer._metrics["train"]


def test_dpo_loss_equals_trls_on_the_same_log_probabilities():
    chosen = torch.tensor([-3.0, -7.5, -1.2, -10.0])
    rejected = torch.tensor([-4.0, -6.0, -9.0, -10.5])
    ref_chosen = torch.tensor([-3.5, -7.0, -2.0, -9.0])
    ref_rejected = torch.tensor([-3.9, -6.5, -8.0, -11.0])
    for beta in (0.1, 0.5):
        expected, metrics = _trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        assert losses.mean().item() == pytest.approx(float(expected), rel=1e-6)
        assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
        assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=1e-6)


def test_dpo_label_smoothing_is_the_conservative_dpo_formula():
    # TRL 1.x's sigmoid loss has no label smoothing (its "robust" loss is rDPO, another estimator):
    # checked against cDPO's formula (Mitchell, 2023), which older TRL releases implemented.
    c, r, rc, rr, beta, eps = -3.0, -4.0, -3.5, -3.9, 0.3, 0.1
    x = beta * ((c - rc) - (r - rr))
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-x))) - eps * math.log(1 / (1 + math.exp(x)))
    losses, _, _ = dpo_loss(*(torch.tensor([v]) for v in (c, r, rc, rr)), beta, eps)
    assert losses.item() == pytest.approx(expected, rel=1e-6)


# --- the tiny model ---------------------------------------------------------------------------------


def _signal(rng: np.random.Generator, regular: bool) -> np.ndarray:
    """A fast or a slow oscillation: which answer is right can only be read from the ECG."""
    t = np.arange(400)
    wave = np.sin(2 * np.pi * t / (10 if regular else 80) + rng.uniform(0, 6.3))
    return (wave + 0.2 * rng.standard_normal((12, 400))).astype(np.float16)


def _items(rng: np.random.Generator, n: int, random_answers: bool = False) -> list[dict]:
    items = []
    for i in range(n):
        regular = bool(rng.integers(2))
        answer = ("regular" if rng.integers(2) else "irregular") if random_answers else None
        items.append(
            dict(
                key=f"r{i}_qa0",
                ecg=_signal(rng, regular),
                question=QUESTION,
                answer=answer or ("regular" if regular else "irregular"),
                question_type="rhythm",
            )
        )
    return items


def _tiny(policy=None, seed: int = 0) -> ECGLM:
    torch.manual_seed(seed)
    backbone = tiny_backbone()
    connector = MLPConnector(num_tokens=1, input_norm="batch")
    model = ECGLM(Wav2Vec2ECGEncoder(**TINY_ENCODER), connector, backbone, policy)
    model.prompt = bound_prompt(backbone)
    return model.train()


def _task(model: ECGLM) -> SimpleNamespace:
    logs: dict[str, float] = {}
    return SimpleNamespace(model=model, logs=logs, log=lambda k, v, **kw: logs.__setitem__(k, float(v)))


def test_the_kl_is_zero_and_no_ratio_is_clipped_at_the_first_step():
    model = _tiny(LoRA(r=4, alpha=8, dropout=0.0))
    batch = QACollator(model.prompt, 1)(_items(np.random.default_rng(0), 3))
    task = _task(model)
    objective = GRPO(group_size=4, max_new_tokens=3, beta=0.04)
    loss = objective.training_step(task, batch, 0)
    assert task.logs["train/kl"] == 0 and task.logs["train/clip_fraction"] == 0
    assert torch.isfinite(loss) and loss.requires_grad
    rollout = objective._rollout
    assert rollout.completion.shape[0] == 12 and rollout.ref_logp is not None
    torch.testing.assert_close(rollout.ref_logp, rollout.old_logp)  # reference = policy at the start
    for name in (
        "reward",
        "reward/exact_match",
        "reward/exact_match_std",
        "answer_length",
        "zero_variance_groups",
    ):
        assert f"train/{name}" in task.logs


def test_a_grpo_step_leaves_the_running_statistics_of_batch_norm_as_they_were():
    """Rollouts normalise by their batch's statistics, but evaluation's running statistics stay those of
    the SFT stage (a rollout batch repeats each ECG G times); the layer's momentum is given back."""
    model = _tiny()
    norm = model.connector.norm
    norm.running_mean.fill_(0.3)
    norm.running_var.fill_(2.0)
    batch = QACollator(model.prompt, 1)(_items(np.random.default_rng(0), 3))
    objective = GRPO(group_size=4, max_new_tokens=3, beta=0.04)
    objective.training_step(_task(model), batch, 0).backward()
    assert torch.all(norm.running_mean == 0.3) and torch.all(norm.running_var == 2.0)
    assert norm.training and norm.momentum == 0.1
    model.ecg_tokens(batch.ecg)  # a training forward outside GRPO (SFT) still updates them
    assert not torch.all(norm.running_mean == 0.3)


def test_the_reference_with_adapters_off_is_the_frozen_base_and_start_is_the_start():
    model = _tiny(LoRA(r=4, alpha=8, dropout=0.0))
    batch = QACollator(model.prompt, 1)(_items(np.random.default_rng(0), 3))
    prompt = prompt_fields(batch)
    completion = torch.tensor([[288, 2], [282, 288], [288, 201]])
    mask = torch.ones_like(completion, dtype=torch.bool)

    def logp() -> torch.Tensor:
        with torch.no_grad():
            return completion_logprobs(model, prompt, model.ecg_tokens(batch.ecg), completion, mask)

    start, snapshot = logp(), snapshot_trainable(model)
    assert not any(n.startswith("backbone") and ".lora_" not in n for n in snapshot)  # no LLM copy
    with torch.no_grad():  # "training": every adapter and the connector move
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained = logp()
    assert not torch.allclose(trained, start)
    with reference_policy(model, snapshot):
        torch.testing.assert_close(logp(), start)
    with reference_policy(model, snapshot, adapters_off=True):
        base = logp()
    # The frozen base: the same model with every adapter's update zeroed, connector as at the start.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
            elif name in snapshot and ".lora_" not in name:
                p.copy_(snapshot[name])
    torch.testing.assert_close(base, logp())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # adapters back on


def test_dpo_prefers_the_chosen_answer_after_a_few_steps():
    model = _tiny(PartialFineTuning(modules=["lm_head"]))
    rng = np.random.default_rng(0)
    items = _items(rng, 4)
    for it in items:  # a preference the LM head alone can learn (it does not read the ECG)
        it["chosen"], it["rejected"] = "regular", "irregular"
    batch = QACollator(model.prompt, 1)(items)
    assert batch.chosen == ["regular"] * 4 and batch.rejected == ["irregular"] * 4
    task, objective = _task(model), DPO(beta=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(4):
        loss = objective.training_step(task, batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5)  # policy = reference at the start
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.3 and task.logs["train/rewards/accuracy"] == 1.0


def _accuracy(model: ECGLM, items: list[dict], shuffled: bool) -> float:
    batch = QACollator(model.prompt, 1, for_generation=True)(items)
    if shuffled:  # another record's ECG for every question
        batch.ecg = batch.ecg.roll(1, 0)
    answers = model.generate(batch, Decoding(max_new_tokens=3))
    return float(np.mean([a == it["answer"] for a, it in zip(answers, items, strict=True)]))


@pytest.mark.slow  # about 60 s on 2 CPU cores
def test_grpo_teaches_a_tiny_model_to_read_the_ecg():
    """SFT on answers drawn at random teaches the answer format but nothing about the ECG; GRPO with
    an exact-match reward then lifts accuracy well above the shuffled-ECG level."""
    model = _tiny(PartialFineTuning(modules=["lm_head", "layers.1"]))
    rng = np.random.default_rng(0)
    collate = QACollator(model.prompt, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(40):
        loss = model(collate(_items(rng, 16, random_answers=True))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = _items(np.random.default_rng(1), 64)
    before, before_shuffled = _accuracy(model, held_out, False), _accuracy(model, held_out, True)
    task, objective = _task(model), GRPO([ExactMatchReward()], group_size=8, max_new_tokens=3, beta=0.04)
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    rng, rewards = np.random.default_rng(5), []
    for step in range(40):
        loss = objective.training_step(task, collate(_items(rng, 8)), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(task.logs["train/reward"])
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.15, rewards
    after, after_shuffled = _accuracy(model, held_out, False), _accuracy(model, held_out, True)
    print(
        f"before {before:.2f} (shuffled {before_shuffled:.2f}), "
        f"after {after:.2f} (shuffled {after_shuffled:.2f})"
    )
    assert abs(before - before_shuffled) < 0.2
    assert after >= 0.75 and after - after_shuffled >= 0.25


def test_the_lightning_task_trains_with_grpo_and_checkpoints_its_reference(tmp_path):
    import lightning as L

    from ecglm.module import ECGLanguageModel

    torch.manual_seed(0)
    backbone = tiny_backbone()
    connector = MLPConnector(num_tokens=1, input_norm="batch")
    objective = GRPO(group_size=2, max_new_tokens=2)
    task = ECGLanguageModel(Wav2Vec2ECGEncoder(**TINY_ENCODER), connector, backbone, objective=objective)
    task.model.prompt = bound_prompt(backbone)
    assert "objective" not in task.hparams  # SFT recipes' hyper-parameters are unchanged
    batches = [QACollator(task.model.prompt, 1)(_items(np.random.default_rng(i), 2)) for i in range(2)]
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    start = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert {"train/reward", "train/kl", "train/clip_fraction"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    saved = torch.load(tmp_path / "grpo.ckpt", weights_only=True)["ecglm"]["objective"]
    assert saved["stage"] == "grpo" and set(saved["state"]["reference"]) == set(start)
    for name, value in start.items():  # the reference is the start, not the trained weights
        torch.testing.assert_close(saved["state"]["reference"][name], value)
    restored = GRPO(group_size=2)
    evaluated = ECGLanguageModel(
        Wav2Vec2ECGEncoder(**TINY_ENCODER), MLPConnector(num_tokens=1, input_norm="batch"), tiny_backbone(),
        objective=restored,
    )  # fmt: skip
    evaluated.on_load_checkpoint(torch.load(tmp_path / "grpo.ckpt", weights_only=True))
    assert restored.reference is not None and set(restored.reference) == set(start)
    assert evaluated.model.training_stages == [{"stage": "grpo"}]  # what evaluate and bundles report


def test_the_training_stages_are_read_from_checkpoints_and_stated_in_reports_and_cards():
    from ecglm.bundle import default_card
    from ecglm.evaluation.markdown import render_markdown
    from ecglm.objectives.base import training_stages

    assert training_stages({"ecglm": {}}) == [{"stage": "sft"}]  # SFT checkpoints record nothing
    objective = {"stage": "dpo", "init_from": "a.ckpt", "state": {}}
    assert training_stages({"ecglm": {"objective": objective}}) == [{"stage": "dpo", "init_from": "a.ckpt"}]
    stages = [{"stage": "sft"}, {"stage": "grpo", "init_from": "runs/quickstart/checkpoints/last.ckpt"}]
    assert training_stages({"ecglm": {"objective": objective, "stages": stages}}) == stages
    line = "Training: SFT -> GRPO (from `runs/quickstart/checkpoints/last.ckpt`)"
    summary = {"conditions": {"ecg": {"datasets": {}, "abnormality": {}, "question_types": {}}}, "gaps": {}}
    assert line in render_markdown(summary, {"training": stages}).splitlines()
    config = {"ecglm_version": "x", "components": {"backbone": {"class_path": "hf"}}, "training": stages}
    assert line + "." in default_card(config).splitlines()
