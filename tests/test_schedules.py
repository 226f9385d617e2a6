"""The LR schedule: restart steps against the scheduler's own LR values, the cycle count, LR scaling across
a state-dict round trip, the plot, and one LR per optimizer step whatever the gradient accumulation."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LinearLR, SequentialLR
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_scheduler

from ecglm.schedules import (
    cycle_position,
    hard_restarts_config,
    lr_curve,
    lr_jumps,
    plot_schedule,
    restart_steps,
    scale_lr,
    schedule_restarts,
)


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)


def _hard_restarts(warmup: int, total: int, cycles: int, lr: float = 1.0):
    optimizer = _optimizer(lr)
    kwargs = {"num_cycles": cycles}
    return optimizer, get_scheduler("cosine_with_restarts", optimizer, warmup, total, kwargs)


def _rises_after_warmup(lrs: list[float], warmup: int) -> list[int]:
    """Where the LR goes up once the warm-up is over: within a cosine cycle it only comes down."""
    return [s for s in range(warmup + 1, len(lrs)) if lrs[s] > lrs[s - 1]]


def test_restart_steps_are_where_the_stepped_scheduler_jumps_back_to_its_peak():
    optimizer, scheduler = _hard_restarts(warmup=20, total=500, cycles=7, lr=2e-5)
    lrs = []
    for _ in range(500):  # the real scheduler, stepped as Lightning steps it
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    restarts = restart_steps(20, 500, 7)
    assert restarts == _rises_after_warmup(lrs, 20) == schedule_restarts(scheduler)
    assert len(restarts) == 6  # 7 cycles, 6 restarts
    for step in restarts:
        assert lrs[step] > 0.99 * 2e-5  # back at the peak (the cycle starts within this step)
        assert lrs[step - 1] < 0.01 * 2e-5  # from near zero


def test_the_papers_25_cycles_are_24_restarts():
    # 2,000 warm-up steps; a run length that 25 does not divide.
    _, scheduler = _hard_restarts(warmup=2000, total=197_431, cycles=25)
    assert hard_restarts_config(scheduler) == {
        "num_warmup_steps": 2000,
        "num_training_steps": 197_431,
        "num_cycles": 25,
    }
    lrs = lr_curve(scheduler, 197_431)  # base_lr * lr_lambda(step): what the scheduler sets
    restarts = restart_steps(2000, 197_431, 25)
    assert len(restarts) == 24
    assert restarts == _rises_after_warmup(lrs, 2000) == lr_jumps(lrs)
    assert restarts[0] == 2000 + 7818  # ceil(195,431 / 25) steps into the cosine part


def test_restart_steps_agree_with_the_scheduler_wherever_its_float_arithmetic_rounds():
    rng = random.Random(0)
    for _ in range(150):
        cycles = rng.randint(1, 40)
        warmup = rng.randint(0, 50)
        total = warmup + rng.randint(2 * cycles, 2500)  # cycles of at least two steps have a trough
        _, scheduler = _hard_restarts(warmup, total, cycles)
        lrs = lr_curve(scheduler, total)
        assert restart_steps(warmup, total, cycles) == _rises_after_warmup(lrs, warmup), (
            warmup,
            total,
            cycles,
        )


def test_cycle_position():
    warmup, total, cycles = 10, 110, 4  # cycles of 25 steps: restarts at 35, 60, 85
    assert cycle_position(0, warmup, total, cycles) == (-1, 0.0)
    assert cycle_position(5, warmup, total, cycles) == (-1, 0.5)
    assert cycle_position(10, warmup, total, cycles) == (0, 0.0)
    assert cycle_position(34, warmup, total, cycles) == (0, pytest.approx(24 / 25))
    assert cycle_position(35, warmup, total, cycles) == (1, 0.0)
    assert cycle_position(109, warmup, total, cycles) == (3, pytest.approx(24 / 25))
    assert cycle_position(110, warmup, total, cycles) == (4, 0.0)
    assert restart_steps(warmup, total, cycles) == [35, 60, 85]


def test_other_schedulers_have_no_known_restarts_and_lr_jumps_find_theirs():
    cosine = get_scheduler("cosine", _optimizer(), 5, 100)
    assert schedule_restarts(cosine) is None and lr_jumps(lr_curve(cosine, 100)) == []

    optimizer = _optimizer(0.1)
    warm = LinearLR(optimizer, start_factor=0.01, total_iters=5)
    scheduler = SequentialLR(
        optimizer, [warm, CosineAnnealingWarmRestarts(optimizer, T_0=10)], milestones=[5]
    )
    before = (scheduler.state_dict(), optimizer.param_groups[0]["lr"])
    lrs = lr_curve(scheduler, 45)  # replayed on a stand-in optimizer
    assert schedule_restarts(scheduler) is None
    assert lr_jumps(lrs) == [15, 25, 35]  # not the warm-up, not its end
    assert (scheduler.state_dict(), optimizer.param_groups[0]["lr"]) == before


def test_scaled_lr_survives_a_state_dict_round_trip():
    optimizer, scheduler = _hard_restarts(warmup=4, total=64, cycles=4, lr=0.01)
    restarts = restart_steps(4, 64, 4)
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    scale_lr([optimizer], [scheduler], 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.01 * scheduler.lr_lambdas[0](25))
    states = optimizer.state_dict(), scheduler.state_dict()

    resumed_optimizer, resumed = _hard_restarts(warmup=4, total=64, cycles=4, lr=0.01)  # as on resume
    resumed_optimizer.load_state_dict(states[0])
    resumed.load_state_dict(states[1])
    for _ in range(25, restarts[1]):
        resumed_optimizer.step()
        resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == 0.5 * 0.01  # the next peak, lowered


def test_plot_schedule_draws_a_png():
    _, scheduler = _hard_restarts(warmup=20, total=500, cycles=5)
    fig = plot_schedule(lr_curve(scheduler, 500), schedule_restarts(scheduler))
    assert fig.axes[0].get_title().endswith("4 restarts")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")


class _LinearModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.lrs: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.lrs[self.trainer.global_step] = optimizer.param_groups[0]["lr"]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler("cosine_with_restarts", optimizer, 3, total, {"num_cycles": 3})
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit_lrs(accumulate: int, batches: int) -> dict[int, float]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * batches, 4, generator=g), torch.randn(4 * batches, 1, generator=g))
    model = _LinearModel()
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert trainer.global_step == 16
    return model.lrs


def test_the_lr_of_each_optimizer_step_does_not_depend_on_gradient_accumulation():
    single, accumulated = _fit_lrs(accumulate=1, batches=16), _fit_lrs(accumulate=2, batches=32)
    _, scheduler = _hard_restarts(warmup=3, total=16, cycles=3, lr=0.01)
    expected = {s: 0.01 * scheduler.lr_lambdas[0](s) for s in range(16)}
    assert single == accumulated == pytest.approx(expected)
    assert lr_jumps([single[s] for s in range(16)]) == restart_steps(3, 16, 3) == [8, 12]


def test_the_schedule_module_is_component_layer():
    """Torch and transformers only (STYLE.md): importable with Lightning and matplotlib absent."""
    code = "import sys, ecglm.schedules; print([m for m in ('lightning', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
