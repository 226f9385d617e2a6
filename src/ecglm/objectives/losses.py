"""The math of the RL and preference objectives as plain torch functions (no model, no Lightning).

GRPO follows DeepSeekMath (Shao et al., 2024, eq. 3 and 4): group-normalised advantages, the
clipped policy-ratio loss per token, and the per-token KL to the reference with the unbiased
estimator ``exp(ref - logp) - (ref - logp) - 1``. DPO follows Rafailov et al. (2023), with the
label smoothing of cDPO; ``tests/test_objectives.py`` checks it against TRL's DPOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """``(rows,)`` rewards of consecutive groups of ``group_size`` answers -> their advantages:
    ``(r - mean(group)) / (std(group) + eps)`` (unbiased std, as DeepSeekMath and TRL compute it).

    A group whose answers all earned the same reward has advantage 0 everywhere: nothing to learn
    from it. ``scale=False`` keeps ``r - mean`` (Dr. GRPO's variant, no std division).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale and group_size > 1:
        std = grouped.std(1, keepdim=True)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.view(-1)


def zero_variance_fraction(rewards: Tensor, group_size: int) -> float:
    """The fraction of groups whose answers all earned the same reward."""
    grouped = rewards.float().view(-1, group_size)
    return float((grouped.max(1).values == grouped.min(1).values).float().mean())


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each of ``tokens`` ``(rows, n)`` under ``logits`` ``(rows, n, vocab)``
    (the logits that predict them), at the sampling temperature."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def per_token_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """DeepSeekMath's unbiased, non-negative per-token estimate of KL(policy || reference)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class GRPOLoss:
    """The loss and what is logged about it (the statistics are detached)."""

    loss: Tensor
    kl: Tensor
    clip_fraction: Tensor


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> GRPOLoss:
    """DeepSeekMath's GRPO objective, negated to a loss.

    ``logp``, ``old_logp`` (the policy that sampled), ``ref_logp``: ``(rows, n)`` per completion token;
    ``advantages`` ``(rows,)``; ``mask`` ``(rows, n)`` 1 on the tokens of each answer. Per token
    ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL``, averaged over each answer's
    tokens, then over answers. ``ref_logp=None`` or ``beta=0``: no KL term.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = per_token_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = surrogate - beta * kl if beta else surrogate
    lengths = mask.sum(1).clamp(min=1)
    loss = -((per_token * mask).sum(1) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    total = mask.sum().clamp(min=1)
    return GRPOLoss(loss, ((kl * mask).sum() / total).detach(), ((clipped * mask).sum() / total).detach())


def dpo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's sigmoid loss per pair from summed sequence log-probabilities ``(pairs,)``, with
    conservative-DPO label smoothing; returns ``(losses, chosen_rewards, rejected_rewards)``, the
    rewards being ``beta * (logp - ref_logp)`` (detached), as TRL reports them."""
    logits = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    chosen = beta * (chosen_logp - ref_chosen_logp).detach()
    rejected = beta * (rejected_logp - ref_rejected_logp).detach()
    return losses, chosen, rejected
