"""LRRestartMonitor and LRSchedulePlot on a tiny real regression model: a restart whose weights are blown up
is detected and acted on with each action; a stable run raises no alarm; state survives checkpoints; the
alarm is combined across two processes; MLflow receives the metrics, the events and the plots."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_scheduler

from ecglm.callbacks import (
    LRRestartMonitor,
    LRSchedulePlot,
    StabilityWarning,
    any_rank,
    compare,
    window_stats,
)
from ecglm.schedules import restart_steps

WARMUP, TOTAL, CYCLES, PEAK = 4, 64, 4, 0.01
RESTARTS = restart_steps(WARMUP, TOTAL, CYCLES)  # [19, 34, 49]
#: A fast monitor: 8-step baseline, 2 grace steps, then 4 tested steps; first decision at step 24.
FAST = dict(window=8, grace_steps=2, post_steps=4, ratio_threshold=3.0, sigma_threshold=6.0, smooth_steps=3)
DECIDED = RESTARTS[0] + 2 + 4 - 1


class Regression(L.LightningModule):
    """A small MLP fitting ``sin(x @ w)``; ``corrupt_at`` adds large noise to its weights at that step."""

    def __init__(self, corrupt_at: int | None = None, plain_lambda: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.frozen = nn.Linear(8, 8).requires_grad_(False)  # never part of a snapshot
        self.corrupt_at = corrupt_at
        self.plain_lambda = plain_lambda
        self.step_losses: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        if self.global_step == self.corrupt_at:
            self.corrupt_at = None
            with torch.no_grad():
                for p in self.net.parameters():
                    p.add_(3.0 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.step_losses.setdefault(self.global_step, []).append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", ((self.net(x) - y).abs() < 0.3).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=PEAK)
        scheduler = get_scheduler("cosine_with_restarts", optimizer, WARMUP, TOTAL, {"num_cycles": CYCLES})
        if self.plain_lambda:  # the same schedule, but not recognisable as transformers' hard restarts
            fn = scheduler.lr_lambdas[0]
            scheduler = LambdaLR(optimizer, lambda step: fn(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = 0.3 * torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.sin(x @ w) + 0.05 * torch.randn(n, 1, generator=g))


class Recorder(L.Callback):
    """LR of every optimizer step, and trainable weights after each (listed after the monitor)."""

    def __init__(self):
        self.lrs: dict[int, float] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainable = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.weights[trainer.global_step] = trainable


def _fit(
    model, monitor, tmp_path, max_steps=TOTAL, ckpt_path=None, logger=False, val=False, **trainer_kwargs
):
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor, recorder, *trainer_kwargs.pop("callbacks", [])],
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0,
        val_check_interval=5 if val else None,
        **trainer_kwargs,
    )
    train = DataLoader(
        _data(2048, 1), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    trainer.fit(model, train, DataLoader(_data(256, 2), batch_size=256) if val else None, ckpt_path=ckpt_path)
    return trainer, recorder


def test_a_stable_run_raises_no_alarm(tmp_path):
    # Accumulating two micro-batches per step, and a schedule the monitor must read from LR jumps.
    monitor = LRRestartMonitor(**FAST)
    model = Regression(plain_lambda=True)
    trainer, _ = _fit(model, monitor, tmp_path, accumulate_grad_batches=2)
    assert trainer.global_step == TOTAL
    assert [e["restart_step"] for e in monitor.events] == RESTARTS
    assert {e["detected_by"] for e in monitor.events} == {"lr_jump"}
    assert all(e["decided_at"] == e["restart_step"] + 5 and not e["alarm"] for e in monitor.events)
    assert set(monitor.events[0]["scores"]) == {"loss", "grad_norm"}
    # One record per optimizer step: the mean of its micro-batch losses, not Lightning's scaled-down one.
    assert monitor.history["step"] == list(range(TOTAL))
    expected = [sum(model.step_losses[s]) / 2 for s in range(TOTAL)]
    assert monitor.history["loss"] == pytest.approx(expected)
    assert all(len(model.step_losses[s]) == 2 for s in range(TOTAL))


def _alarm_run(tmp_path, action, max_steps=TOTAL, **kwargs):
    monitor = LRRestartMonitor(action=action, **{**FAST, **kwargs})
    model = Regression(corrupt_at=RESTARTS[0])
    with pytest.warns(StabilityWarning, match=f"restart at step {RESTARTS[0]}"):
        trainer, recorder = _fit(model, monitor, tmp_path, max_steps=max_steps)
    first = monitor.events[0]
    assert first["alarm"] and first["decided_at"] == DECIDED and first["action"] == action
    assert first["scores"]["loss"]["ratio"] > 10 and first["scores"]["loss"]["sigma"] > 10
    return trainer, recorder, monitor


def test_log_only_warns_and_training_goes_on(tmp_path):
    trainer, recorder, monitor = _alarm_run(tmp_path, "log")
    assert trainer.global_step == TOTAL
    assert recorder.lrs[RESTARTS[1]] == recorder.lrs[RESTARTS[0]]  # the schedule is untouched
    assert [e["alarm"] for e in monitor.events] == [True, False, False]


def test_stop_ends_training_after_the_deciding_step(tmp_path):
    trainer, _, monitor = _alarm_run(tmp_path, "stop")
    assert trainer.global_step == DECIDED + 1
    assert len(monitor.events) == 1


def test_lower_peak_lowers_every_later_peak_and_survives_resume(tmp_path):
    trainer, recorder, monitor = _alarm_run(tmp_path, "lower_peak", lr_factor=0.5, max_steps=30)
    peak = recorder.lrs[RESTARTS[0]]
    scheduled = PEAK * trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0](DECIDED + 1)
    assert recorder.lrs[DECIDED + 1] == pytest.approx(0.5 * scheduled)  # from the very next step
    assert monitor.peak_scale == 0.5
    ckpt = tmp_path / "lowered.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed_monitor = LRRestartMonitor(action="lower_peak", **FAST)
    _, resumed = _fit(Regression(), resumed_monitor, tmp_path, max_steps=TOTAL, ckpt_path=ckpt)
    assert resumed.lrs[RESTARTS[1]] == 0.5 * peak
    assert resumed.lrs[RESTARTS[2]] == 0.5 * peak
    assert resumed_monitor.peak_scale == 0.5
    assert [e["alarm"] for e in resumed_monitor.events] == [True, False, False]


def test_rollback_restores_the_best_pre_restart_weights_and_lowers_the_peak(tmp_path):
    trainer, recorder, monitor = _alarm_run(
        tmp_path, "rollback", lr_factor=0.5, snapshot_every=1, snapshot_dir=str(tmp_path / "snap")
    )
    # The best point of the first cycle: the lowest 3-step mean loss (weights after that step).
    losses = monitor.history["loss"]
    smoothed = {s: sum(losses[s - 2 : s + 1]) / 3 for s in range(2, RESTARTS[0])}
    best = min(smoothed, key=smoothed.get) + 1
    event = monitor.events[0]
    assert event["rollback_to_step"] == best
    after_action = recorder.weights[DECIDED + 1]  # recorded right after the monitor acted
    for name, value in recorder.weights[best].items():
        assert torch.equal(after_action[name], value), name
    assert "frozen.weight" not in after_action
    before, after = losses[best - 3 : best], losses[DECIDED + 1 : DECIDED + 4]
    assert sum(after) / 3 < 2 * sum(before) / 3 < 1  # back to the pre-restart loss (it was ~1000)
    assert recorder.lrs[RESTARTS[1]] == 0.5 * recorder.lrs[RESTARTS[0]]
    assert trainer.global_step == TOTAL
    # The latest rollback point (the second cycle's best) is on disk; a resumed monitor finds it there.
    resumed = LRRestartMonitor(action="rollback", snapshot_dir=str(tmp_path / "snap"), **FAST)
    resumed.load_state_dict(monitor.state_dict())
    point = resumed._load_rollback_point()
    assert RESTARTS[1] < point.step == monitor._rollback_point.step <= RESTARTS[2]
    assert torch.equal(point.params["net.0.weight"], recorder.weights[point.step]["net.0.weight"])
    assert point.optimizers[0]["state"][0]["exp_avg"].shape == (32, 8)


def test_a_validation_drop_after_a_restart_raises_the_alarm(tmp_path):
    # Training-signal tests switched off: only val/acc can raise it.
    monitor = LRRestartMonitor(
        action="stop", monitor="val/acc", mode="max", **{**FAST, "ratio_threshold": 1e9}
    )
    with pytest.warns(StabilityWarning, match="val/acc fell"):
        trainer, _ = _fit(Regression(corrupt_at=RESTARTS[0]), monitor, tmp_path, val=True)
    val = monitor.events[0]["val"]
    assert val["step"] == 25 and val["alarm"] and val["drop"] > 0.2  # the first validation after the grace
    assert val["best_before"] >= 0.5 and monitor.events[0]["scores"]["loss"]["alarm"] is False
    assert trainer.global_step == 25


def test_state_dict_round_trip_keeps_baseline_events_and_history(tmp_path):
    monitor = LRRestartMonitor(**FAST)
    _fit(Regression(corrupt_at=RESTARTS[0]), monitor, tmp_path, max_steps=22)
    pending = monitor.events[-1]
    assert pending["decided_at"] is None and pending["baseline"]["loss"]["n"] == 8
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)

    restored = LRRestartMonitor(**FAST)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.events == monitor.events and restored._pending == pending
    assert restored.history == monitor.history
    assert restored._post == monitor._post and restored._windows == monitor._windows
    assert (restored._detector.last, restored._detector.peak) == (
        monitor._detector.last,
        monitor._detector.peak,
    )


def test_compare_flags_non_finite_losses_and_needs_both_tests():
    baseline = {"mean": 1.0, "std": 0.1}
    assert compare(baseline, [float("nan"), 1.0], 2.0, 3.0)["alarm"]
    assert not compare(baseline, [1.5], 2.0, 3.0)["alarm"]  # 5 sigma, but only x1.5
    assert not compare({"mean": 1.0, "std": 1.0}, [2.5], 2.0, 3.0)["alarm"]  # x2.5, but 1.5 sigma
    scores = compare(baseline, [2.0, 3.0], 2.0, 3.0)
    assert scores["alarm"] and scores["ratio"] == 2.5 and scores["sigma"] == pytest.approx(15.0)
    assert window_stats([1.0, 2.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert window_stats([1.0]) is None


def _any_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    strategy = DDPStrategy(parallel_devices=[torch.device("cpu")] * world, process_group_backend="gloo")
    results = [any_rank(rank == 1, strategy), any_rank(False, strategy), any_rank(True, strategy)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_any_rank_alarm_combines_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would import Lightning again, ~10 s each).
    workers = mp.start_processes(
        _any_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two gloo workers did not finish within 60 s")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False, True]


def test_mlflow_gets_metrics_events_and_both_plots(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifact store lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="stability", tracking_uri=uri)
    monitor = LRRestartMonitor(action="log", **FAST)
    with pytest.warns(StabilityWarning):
        trainer, _ = _fit(
            Regression(corrupt_at=RESTARTS[0]), monitor, tmp_path, logger=logger, callbacks=[LRSchedulePlot()]
        )
    assert trainer.global_step == TOTAL
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"lr_schedule.png", "stability.png", "stability_events.json"} <= artifacts
    out = Path(client.download_artifacts(logger.run_id, "lr_schedule.png", str(tmp_path)))
    assert out.read_bytes().startswith(b"\x89PNG")
    events = json.loads(Path(client.download_artifacts(logger.run_id, "stability_events.json")).read_text())
    assert [e["alarm"] for e in events["events"]] == [True, False, False]
    alarm = {m.step: m.value for m in client.get_metric_history(logger.run_id, "stability/alarm")}
    assert alarm == {DECIDED: 1.0, RESTARTS[1] + 5: 0.0, RESTARTS[2] + 5: 0.0}
    restarts = [m.step for m in client.get_metric_history(logger.run_id, "stability/restart")]
    assert sorted(restarts) == RESTARTS
    assert client.get_metric_history(logger.run_id, "stability/loss_ratio")[0].value > 10
