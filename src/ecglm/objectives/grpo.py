"""GRPO (DeepSeekMath): reinforcement learning with verifiable rewards, groups of sampled answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ecglm.batch import ECGQABatch, TokenFields
from ecglm.model import ECGLM
from ecglm.objectives.base import Objective
from ecglm.objectives.losses import group_advantages, grpo_loss, zero_variance_fraction
from ecglm.objectives.sequences import (
    completion_logprobs,
    completion_mask,
    end_token_ids,
    prompt_fields,
    reference_policy,
    repeat_ecgs,
    repeat_rows,
    snapshot_trainable,
)
from ecglm.rewards import ExactMatchReward, Reward, RewardItem

if TYPE_CHECKING:
    from ecglm.module import ECGLanguageModel


@dataclass
class Rollout:
    """A group of sampled answers per question of a batch, scored, with the sampling policy's and
    the reference's log-probabilities (fixed while the policy takes its steps on it)."""

    prompt: TokenFields
    ecg: Tensor
    completion: Tensor
    mask: Tensor
    rewards: Tensor
    advantages: Tensor
    old_logp: Tensor
    ref_logp: Tensor | None
    stats: dict[str, float]

    def to(self, device: torch.device) -> Rollout:
        moved = {f: v.to(device) if isinstance(v, Tensor | TokenFields) else v for f, v in vars(self).items()}
        return Rollout(**moved)


class GRPO(Objective):
    """Group Relative Policy Optimization (Shao et al., 2024) on the training questions.

    Per question, ``group_size`` answers are sampled in one batched ``generate`` call and scored by
    the ``rewards`` (summed with their weights); advantages are the rewards normalised within each
    group. The loss is the clipped policy-ratio objective with a per-token KL penalty (``beta``) to
    the reference policy: the trainable weights as the run started (a copy of those only, never of
    the LLM), or with ``reference: base`` the same weights with LoRA adapters switched off. The
    reference answers of the batch are read by the rewards, never trained on.

    Args:
        rewards: ``ecglm.rewards`` components, each with its weight (default: exact match).
        group_size: Answers sampled per question (G).
        temperature: Sampling temperature (also of the log-probabilities).
        top_p: Nucleus sampling.
        max_new_tokens: Longest sampled answer.
        beta: Weight of the KL penalty to the reference (0: none, and no reference pass).
        clip_eps: Clipping of the policy ratio.
        steps_per_rollout: Optimisation steps on one rollout (DeepSeekMath's mu); the batches of
            the extra steps are not sampled from (each step still consumes one training batch).
        scale_rewards: Divide by the group's std (``false``: Dr. GRPO's centred rewards).
        seed: Seed of the rollouts: the answers sampled at training step ``s`` are drawn from a
            generator seeded with ``(seed, s)``, so a resumed run samples what the uninterrupted run
            sampled (the global random state, which Lightning does not checkpoint, is left alone).
        init_from, reference: See :class:`~ecglm.objectives.base.Objective`.
    """

    stage = "grpo"
    needs_reference = True

    def __init__(
        self,
        rewards: list[Reward] | None = None,
        group_size: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
        beta: float = 0.04,
        clip_eps: float = 0.2,
        steps_per_rollout: int = 1,
        scale_rewards: bool = True,
        seed: int = 0,
        init_from: str | None = None,
        reference: str = "start",
    ):
        super().__init__(init_from, reference)
        if group_size < 2:
            raise ValueError(
                f"model.objective.init_args.group_size is {group_size}: GRPO compares at least 2 answers"
            )
        self.rewards = list(rewards) if rewards else [ExactMatchReward()]
        self.group_size, self.temperature, self.top_p = group_size, temperature, top_p
        self.max_new_tokens, self.beta, self.clip_eps = max_new_tokens, beta, clip_eps
        self.steps_per_rollout, self.scale_rewards, self.seed = steps_per_rollout, scale_rewards, seed
        self.reference: dict[str, Tensor] | None = None
        self._rollout: Rollout | None = None
        self._steps_on_rollout = 0

    # --- training ---------------------------------------------------------------------------------

    def training_step(self, task: ECGLanguageModel, batch: ECGQABatch, batch_idx: int) -> Tensor:
        with running_statistics_kept(task.model):
            return self._training_step(task, batch)

    def _training_step(self, task: ECGLanguageModel, batch: ECGQABatch) -> Tensor:
        model = task.model
        if self.reference is None:
            self.reference = snapshot_trainable(model)
        if self._rollout is None or self._steps_on_rollout >= self.steps_per_rollout:
            with self.seeded(model, getattr(task, "global_step", None)):
                self._rollout = self.rollout(model, batch)
            self._steps_on_rollout = 0
        # Every step logs the statistics of the rollout it optimises (Lightning would repeat a value
        # logged only on the rollout's first step anyway, but not in a run resumed between the two);
        # they travel with the rollout in the checkpoint, so a resumed run logs what the whole one did.
        for name, value in self._rollout.stats.items():
            task.log(f"train/{name}", value, batch_size=len(batch.key))
        self._steps_on_rollout += 1
        r = self._rollout
        device = next(model.parameters()).device
        if r.completion.device != device:  # restored from a checkpoint, on the CPU
            r = self._rollout = r.to(device)
        logp = completion_logprobs(
            model, r.prompt, model.ecg_tokens(r.ecg), r.completion, r.mask, self.temperature
        )
        out = grpo_loss(logp, r.old_logp, r.ref_logp, r.advantages, r.mask, self.clip_eps, self.beta)
        task.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch.key))
        task.log("train/kl", out.kl, batch_size=len(batch.key))
        task.log("train/clip_fraction", out.clip_fraction, batch_size=len(batch.key))
        return out.loss

    @contextmanager
    def seeded(self, model: ECGLM, step: int | None) -> Iterator[None]:
        """Within: the random state seeded with ``(seed, step)`` (restored after); ``step`` None: as it is.

        Written here rather than passing a ``torch.Generator``: ``generate`` samples with the global one."""
        if step is None:
            yield
            return
        device = next(model.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, int(step)]).generate_state(1)[0]))
            yield

    # --- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The reference, and a rollout that has optimisation steps left (``steps_per_rollout`` > 1):
        a run resumed between them takes those steps on the same answers."""
        state = super().state_dict()
        if self._rollout is not None and self._steps_on_rollout < self.steps_per_rollout:
            state["rollout"] = asdict(self._rollout)  # the prompt's TokenFields as a dict too
            state["steps_on_rollout"] = self._steps_on_rollout
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rollout = state.get("rollout")
        if rollout is not None:
            rollout = Rollout(**{**rollout, "prompt": TokenFields(**rollout["prompt"])})
        self._rollout = rollout
        self._steps_on_rollout = int(state.get("steps_on_rollout", 0))

    @torch.no_grad()
    def sample(self, model: ECGLM, batch: ECGQABatch) -> tuple[TokenFields, Tensor, Tensor, Tensor]:
        """``group_size`` sampled answers per question: ``(prompts, ecgs, tokens, mask)`` of the
        group rows (each question's rows next to each other)."""
        prompt = repeat_rows(prompt_fields(batch), self.group_size)
        ecg = repeat_ecgs(batch.ecg, batch.ecg_counts, self.group_size)
        tokens = model.backbone.generate(
            prompt.input_ids,
            prompt.attention_mask,
            prompt.ecg_mask,
            model.ecg_tokens(ecg),
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
        )
        return prompt, ecg, tokens, completion_mask(tokens, end_token_ids(model))

    def score(
        self, model: ECGLM, batch: ECGQABatch, tokens: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """The weighted sum of the rewards of each sampled answer, and each reward's mean and std."""
        texts = model.backbone.tokenizer.batch_decode(
            tokens.masked_fill(~mask, model.backbone.pad_token_id), skip_special_tokens=True
        )
        questions = batch.question or [""] * len(batch.key)
        items = [
            RewardItem(
                questions[row // self.group_size],
                batch.answer[row // self.group_size],
                text.strip(),
                batch.dataset[row // self.group_size],
                batch.question_type[row // self.group_size],
            )
            for row, text in enumerate(texts)
        ]
        total = torch.zeros(len(items))
        stats: dict[str, float] = {}
        for reward in self.rewards:
            values = torch.tensor(reward(items))
            total += reward.weight * values
            stats[f"reward/{reward.name}"] = float(values.mean())
            stats[f"reward/{reward.name}_std"] = float(values.std()) if len(values) > 1 else 0.0
        return total, stats

    def rollout(self, model: ECGLM, batch: ECGQABatch) -> Rollout:
        prompt, ecg, tokens, mask = self.sample(model, batch)
        rewards, stats = self.score(model, batch, tokens, mask)
        rewards = rewards.to(tokens.device)
        with torch.no_grad():
            ecg_tokens = model.ecg_tokens(ecg)
            old = completion_logprobs(model, prompt, ecg_tokens, tokens, mask, self.temperature)
            ref = None
            if self.beta:
                with reference_policy(model, self.reference or {}, self.adapters_off):
                    ref_tokens = model.ecg_tokens(ecg)
                    ref = completion_logprobs(model, prompt, ref_tokens, tokens, mask, self.temperature)
        stats.update(
            reward=float(rewards.mean()),
            reward_std=float(rewards.std()),
            answer_length=float(mask.sum(1).float().mean()),
            zero_variance_groups=zero_variance_fraction(rewards, self.group_size),
        )
        advantages = group_advantages(rewards, self.group_size, scale=self.scale_rewards)
        return Rollout(prompt, ecg, tokens, mask, rewards, advantages, old, ref, stats)


@contextmanager
def running_statistics_kept(model: torch.nn.Module) -> Iterator[None]:
    """Within: batch normalisation still normalises by each batch's statistics but leaves its running
    statistics (what evaluation normalises by) as the SFT stage left them. A rollout batch holds each
    ECG G times and is read three or four times a step; letting it move the running statistics cost
    the quickstart 7 points of accuracy with its trainable weights moved by under 1% (README)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        yield
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
