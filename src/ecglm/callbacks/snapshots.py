"""Snapshots of the trainable weights and optimizer state, on the CPU: the LR-restart monitor's rollback
points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


@dataclass
class Snapshot:
    """Trainable weights and optimizer state after ``step`` optimizer steps, on the CPU."""

    step: int
    score: float
    params: dict[str, Tensor]
    optimizers: list[dict[str, Any]]


def _cpu_copy(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().to("cpu", copy=True))


def take_snapshot(trainer: L.Trainer, pl_module: L.LightningModule, score: float) -> Snapshot:
    params = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters() if p.requires_grad}
    optimizers = [_cpu_copy(opt.state_dict()) for opt in trainer.optimizers]
    return Snapshot(trainer.global_step, score, params, optimizers)


def restore_snapshot(trainer: L.Trainer, pl_module: L.LightningModule, snapshot: Snapshot) -> None:
    """Copy the snapshot's weights and optimizer moments back; LR and schedule position stay as they are."""
    named = dict(pl_module.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.params.items():
            named[name].copy_(value)
    for optimizer, saved in zip(trainer.optimizers, snapshot.optimizers, strict=True):
        current = optimizer.state_dict()["param_groups"]
        # A copy: load_state_dict may keep CPU tensors as they are, and the moments are updated in place.
        optimizer.load_state_dict({"state": _cpu_copy(saved["state"]), "param_groups": current})
