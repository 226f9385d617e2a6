"""The LR-restart instability monitor (:class:`LRRestartMonitor`).

The paper found that joint PEFT on 4-bit models peaks near an LR trough and collapses after a hard restart
(ACC 34.0 at step 155,960, 16.5 at step 194,950). :class:`LRRestartMonitor` compares training loss,
gradient norm and, when one is logged, a validation metric after each restart with their values before it,
and on an alarm logs, stops, lowers the schedule's peak, or rolls the trainable weights back. The rules
are in ``docs/training.md``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ecglm.callbacks.schedule_plot import _figure_bytes
from ecglm.callbacks.snapshots import Snapshot, restore_snapshot, take_snapshot
from ecglm.callbacks.stability import (
    ACTIONS,
    SIGNALS,
    Action,
    Signal,
    StabilityWarning,
    _json_safe,
    any_rank,
    compare,
    grad_norm,
    plot_stability,
    window_stats,
)
from ecglm.io import atomic_torch_save, save_run_file
from ecglm.schedules import LRJumpDetector, scale_lr, schedule_restarts


class LRRestartMonitor(Callback):
    """Detects LR restarts, tests training after each against the pre-restart baseline, and acts on an alarm.

    Args:
        action: On an alarm: ``log`` (a :class:`StabilityWarning`, training goes on), ``stop``
            (``trainer.should_stop``), ``lower_peak`` (multiply the schedule by ``lr_factor`` from the next
            step on, so every later peak is lower), or ``rollback`` (restore the trainable weights and
            optimizer moments of the best point of the cycle before the restart, then lower the peak).
        restart_steps: Optimizer steps of the restarts. Default: read from the scheduler when it is
            transformers' cosine with hard restarts, else every LR rise of more than ``jump_ratio`` after
            the LR had come down from a peak.
        jump_ratio: Relative LR rise that counts as a restart when restarts are detected from the LR.
        window: Pre-restart baseline: mean and standard deviation over the last ``window`` optimizer steps.
        grace_steps: Steps after a restart that are not tested (the LR jump's own transient).
        post_steps: Steps after the grace period averaged and tested; the decision comes at step
            ``restart + grace_steps + post_steps - 1``. Keep ``grace_steps + post_steps`` below a cycle.
        ratio_threshold: Alarm needs ``post_mean / pre_mean`` above this ...
        sigma_threshold: ... and ``(post_mean - pre_mean) / pre_std`` above this.
        signals: Which training signals are tested: ``loss`` (per optimizer step, averaged over the
            accumulated micro-batches) and ``grad_norm`` (global L2 norm of trainable gradients before
            clipping, after AMP unscaling).
        monitor: A validation metric (e.g. ``val/acc``); the first validation at least ``grace_steps``
            after a restart is compared with the best value before it. With ``monitor`` set, the rollback
            point is the cycle's best validation rather than its lowest smoothed training loss.
        mode: ``max`` or ``min``: which direction of ``monitor`` is better.
        val_drop_threshold: Alarm when the metric is worse than the best before the restart by more than
            this fraction of it (0.2: ``val/acc`` 34.0 -> below 27.2).
        lr_factor: Peak-LR factor of ``lower_peak`` and ``rollback``; repeated alarms compound.
        smooth_steps: Training-loss smoothing (mean over this many steps) that ranks rollback points.
        snapshot_every: Least number of steps between two in-memory snapshots of a cycle's best point
            (each copies trainable weights and optimizer state to the CPU).
        snapshot_dir: Also write the rollback point to ``snapshot_dir/lr_restart_rollback.pt`` at each
            restart, so a resumed run can still roll back (a shared filesystem for multi-node runs).
        plot: Log ``stability.png`` (loss and LR, restarts and alarms marked) at the end of training.
    """

    def __init__(
        self,
        action: Action = "log",
        restart_steps: list[int] | None = None,
        jump_ratio: float = 0.5,
        window: int = 200,
        grace_steps: int = 100,
        post_steps: int = 200,
        ratio_threshold: float = 1.5,
        sigma_threshold: float = 6.0,
        signals: Sequence[Signal] = SIGNALS,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "max",
        val_drop_threshold: float = 0.2,
        lr_factor: float = 0.5,
        smooth_steps: int = 20,
        snapshot_every: int = 100,
        snapshot_dir: str | None = None,
        plot: bool = True,
    ):
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        if not set(signals) <= set(SIGNALS):
            raise ValueError(f"unknown signal(s) {sorted(set(signals) - set(SIGNALS))}; expected {SIGNALS}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], not {lr_factor}")
        if window < 2 or post_steps < 1 or grace_steps < 0 or smooth_steps < 1:
            raise ValueError("need window >= 2, post_steps >= 1, grace_steps >= 0 and smooth_steps >= 1")
        self.action = action
        self.restart_steps = sorted(restart_steps) if restart_steps is not None else None
        self.jump_ratio = jump_ratio
        self.window = window
        self.grace_steps = grace_steps
        self.post_steps = post_steps
        self.ratio_threshold = ratio_threshold
        self.sigma_threshold = sigma_threshold
        self.signals = tuple(signals)
        self.monitor = monitor
        self.mode = mode
        self.val_drop_threshold = val_drop_threshold
        self.lr_factor = lr_factor
        self.smooth_steps = smooth_steps
        self.snapshot_every = snapshot_every
        self.snapshot_dir = snapshot_dir
        self.plot = plot
        self._known: set[int] | None = None
        self._detected_by = "lr_jump"
        self._step_record: dict[str, Any] | None = None
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._cycle_best: Snapshot | None = None
        self._rollback_point: Snapshot | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.history: dict[str, list[float]] = {"step": [], "lr": [], "loss": [], "grad_norm": []}
        self.peak_scale = 1.0
        self._windows = {s: deque(maxlen=self.window) for s in SIGNALS}
        self._post: dict[str, list[float]] = {s: [] for s in SIGNALS}
        self._pending: dict[str, Any] | None = None
        self._detector = LRJumpDetector(self.jump_ratio)
        self._best_val: float | None = None
        self._cycle_start = 0
        self._rollback_meta: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        # Not keyed by action: a run may resume with another action and keep its baseline and events.
        return self._generate_state_key(monitor=self.monitor)

    # --- hooks ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._known, self._detected_by = None, "lr_jump"
        if self.restart_steps is not None:
            self._known, self._detected_by = set(self.restart_steps), "given"
        elif trainer.lr_scheduler_configs:
            config = trainer.lr_scheduler_configs[0]
            restarts = schedule_restarts(config.scheduler)
            if restarts is not None and config.interval == "step" and config.frequency == 1:
                self._known, self._detected_by = set(restarts), "schedule"
        if self._known:
            bounds = sorted(self._known)
            shortest = min((b - a for a, b in itertools.pairwise(bounds)), default=math.inf)
            if shortest < self.grace_steps + self.post_steps:
                rank_zero_warn(
                    f"LRRestartMonitor: a cycle of {shortest} steps is shorter than grace_steps + post_steps "
                    f"({self.grace_steps} + {self.post_steps}); its restart cannot be tested",
                    category=StabilityWarning,
                )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not trainer.optimizers[0]:
            return
        step, lr = trainer.global_step, float(optimizer.param_groups[0]["lr"])
        lr_before = self._detector.last
        jump = self._detector.update(lr)
        params = (p for group in optimizer.param_groups for p in group["params"])
        norm = grad_norm(params) if "grad_norm" in self.signals else math.nan
        self._step_record = {"step": step, "lr": lr, "grad_norm": norm}
        if (step in self._known) if self._known is not None else jump:
            self._on_restart(trainer, step, lr_before, lr)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            # Lightning divides the loss it hands back by accumulate_grad_batches; undo that.
            loss = loss.detach().float() * trainer.accumulate_grad_batches
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        record = self._step_record
        if record is None or trainer.global_step <= record["step"]:
            return  # still accumulating micro-batches of this optimizer step
        record["loss"] = float(self._loss_sum) / self._loss_count if self._loss_count else math.nan
        self._step_record, self._loss_sum, self._loss_count = None, None, 0
        self._record(trainer, pl_module, record)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        event = self._pending
        if (
            event is not None
            and event["val"] is not None
            and "value" not in event["val"]
            and trainer.global_step >= event["restart_step"] + self.grace_steps
        ):
            self._decide_validation(trainer, pl_module, event, value)
        if math.isfinite(value) and (self._best_val is None or self._better(value, self._best_val)):
            self._best_val = value
        best = self._cycle_best
        if math.isfinite(value) and (best is None or self._better(value, best.score)):
            self._cycle_best = take_snapshot(trainer, pl_module, value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._write_events(trainer)
        if self.plot and self.history["step"]:
            restarts = [e["restart_step"] for e in self.events]
            alarms = [e["decided_at"] for e in self.events if e["alarm"]]
            fig = plot_stability(self.history, restarts, alarms)
            save_run_file(trainer, "stability.png", _figure_bytes(fig))

    # --- per step ------------------------------------------------------------------------------------

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]) -> None:
        step = record["step"]
        for key in self.history:
            self.history[key].append(record[key])
        for signal in self.signals:
            self._windows[signal].append(record[signal])
        event = self._pending
        if event is not None and event["decided_at"] is None:
            offset = step - event["restart_step"]
            if self.grace_steps <= offset < self.grace_steps + self.post_steps:
                for signal in self.signals:
                    self._post[signal].append(record[signal])
            if offset == self.grace_steps + self.post_steps - 1:
                self._decide_training(trainer, pl_module, event, step)
        if self.monitor is None:
            self._track_best_loss(trainer, pl_module, step)

    def _track_best_loss(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if step - self._cycle_start + 1 < self.smooth_steps:
            return  # the smoothing window would reach into the previous cycle
        score = sum(self.history["loss"][-self.smooth_steps :]) / self.smooth_steps
        best = self._cycle_best
        if not math.isfinite(score) or (best is not None and score >= best.score):
            return
        if best is None or trainer.global_step - best.step >= self.snapshot_every:
            self._cycle_best = take_snapshot(trainer, pl_module, score)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    # --- restarts and decisions ----------------------------------------------------------------------

    def _on_restart(self, trainer: L.Trainer, step: int, lr_before: float | None, lr: float) -> None:
        if self._pending is not None and self._pending["decided_at"] is None:
            self._pending["status"] = "undecided: the next restart came before the test window ended"
        baseline = {s: window_stats(self._windows[s]) for s in self.signals}
        val = (
            {"best_before": self._best_val}
            if self.monitor is not None and self._best_val is not None
            else None
        )
        self._pending = {
            "restart_step": step,
            "lr_before": lr_before,
            "lr_after": lr,
            "detected_by": self._detected_by,
            "baseline": baseline,
            "scores": {},
            "val": val,
            "decided_at": None,
            "alarm": False,
            "reasons": [],
            "action": None,
        }
        self.events.append(self._pending)
        self._post = {s: [] for s in SIGNALS}
        if self._cycle_best is not None:
            self._rollback_point = self._cycle_best
            self._rollback_meta = {"step": self._cycle_best.step, "score": self._cycle_best.score}
            self._save_rollback_point(trainer)
        self._cycle_best, self._cycle_start = None, step
        self._log(trainer, {"stability/restart": 1.0}, step)

    def _decide_training(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any], step: int
    ) -> None:
        scores = {
            signal: compare(baseline, self._post[signal], self.ratio_threshold, self.sigma_threshold)
            for signal, baseline in event["baseline"].items()
            if baseline is not None and self._post[signal]
        }
        alarm = any_rank(any(s["alarm"] for s in scores.values()), trainer.strategy)
        event.update(scores=scores, decided_at=step)
        metrics = {f"stability/{s}_{k}": v[k] for s, v in scores.items() for k in ("ratio", "sigma")}
        self._log(trainer, {**metrics, "stability/alarm": float(alarm)}, step)
        if alarm:
            failing = [
                f"{s} x{v['ratio']:.2f} ({v['sigma']:.1f} sigma)" for s, v in scores.items() if v["alarm"]
            ]
            reason = f"{', '.join(failing)} over the baseline" if failing else "another rank's signals rose"
            self._alarm(trainer, pl_module, event, reason)
        self._write_events(trainer)

    def _decide_validation(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any], value: float
    ) -> None:
        best = event["val"]["best_before"]
        worse = best - value if self.mode == "max" else value - best
        drop = worse / abs(best) if best != 0 else (math.inf if worse > 0 else 0.0)
        drop = drop if math.isfinite(value) else math.inf
        alarm = any_rank(drop > self.val_drop_threshold, trainer.strategy)
        step = trainer.global_step
        event["val"].update(value=value, step=step, drop=drop, alarm=alarm)
        self._log(trainer, {"stability/val_drop": drop, "stability/val_alarm": float(alarm)}, step)
        if alarm:
            if event["decided_at"] is None:
                event["decided_at"] = step
            reason = f"{self.monitor} fell from {best:.4g} to {value:.4g} ({100 * drop:.0f}% worse)"
            self._alarm(trainer, pl_module, event, reason)
        self._write_events(trainer)

    def _alarm(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any], reason: str
    ) -> None:
        event["alarm"] = True
        event["reasons"].append(reason)
        where = f"LRRestartMonitor: after the LR restart at step {event['restart_step']}, {reason}"
        if event["action"] is not None:
            rank_zero_warn(f"{where} (already acted on: {event['action']})", category=StabilityWarning)
            return
        event["action"] = self.action
        if self.action == "log":
            message = "training continues (action: log)"
        elif self.action == "stop":
            trainer.should_stop = True
            message = f"stopping after step {trainer.global_step} (action: stop)"
        else:
            message = ""
            if self.action == "rollback":
                point = self._load_rollback_point()
                if point is None:
                    message = "no pre-restart point to roll back to; "
                else:
                    restore_snapshot(trainer, pl_module, point)
                    event["rollback_to_step"] = point.step
                    self._cycle_best, self._cycle_start = None, trainer.global_step
                    message = f"trainable weights rolled back to step {point.step}; "
            self._lower_peak(trainer)
            message += f"peak LR now x{self.peak_scale:g} (action: {self.action})"
        event["peak_scale"] = self.peak_scale
        self._log(trainer, {"stability/peak_scale": self.peak_scale}, trainer.global_step)
        rank_zero_warn(f"{where}; {message}", category=StabilityWarning)

    def _lower_peak(self, trainer: L.Trainer) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scale_lr(trainer.optimizers, schedulers, self.lr_factor)
        self.peak_scale *= self.lr_factor

    # --- rollback point on disk -----------------------------------------------------------------------

    def _snapshot_path(self) -> Path | None:
        return None if self.snapshot_dir is None else Path(self.snapshot_dir) / "lr_restart_rollback.pt"

    def _save_rollback_point(self, trainer: L.Trainer) -> None:
        path = self._snapshot_path()
        if path is None or self._rollback_point is None:
            return
        self._rollback_meta["path"] = str(path)
        if trainer.is_global_zero:
            atomic_torch_save(vars(self._rollback_point), path)

    def _load_rollback_point(self) -> Snapshot | None:
        if self._rollback_point is None and self._rollback_meta and self._rollback_meta.get("path"):
            path = Path(self._rollback_meta["path"])
            if path.exists():
                self._rollback_point = Snapshot(**torch.load(path, map_location="cpu", weights_only=True))
        return self._rollback_point

    # --- logging and state ----------------------------------------------------------------------------

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=step)

    def _write_events(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            payload = _json_safe({"peak_scale": self.peak_scale, "events": self.events})
            text = json.dumps(payload, indent=2, allow_nan=False)
            save_run_file(trainer, "stability_events.json", text.encode())

    def state_dict(self) -> dict[str, Any]:
        pending = next((i for i, e in enumerate(self.events) if e is self._pending), None)
        return {
            "events": copy.deepcopy(self.events),
            "pending": pending,
            "post": {s: list(v) for s, v in self._post.items()},
            "windows": {s: list(v) for s, v in self._windows.items()},
            "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
            "detector": {"last": self._detector.last, "peak": self._detector.peak},
            "best_val": self._best_val,
            "peak_scale": self.peak_scale,
            "cycle_start": self._cycle_start,
            "rollback_point": self._rollback_meta,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset_state()
        self.events = state_dict["events"]
        pending = state_dict["pending"]
        self._pending = self.events[pending] if pending is not None else None
        self._post = {s: list(state_dict["post"].get(s, [])) for s in SIGNALS}
        for signal in SIGNALS:
            self._windows[signal].extend(state_dict["windows"].get(signal, []))
        self.history = {k: v.tolist() for k, v in state_dict["history"].items()}
        self.history["step"] = [int(s) for s in self.history["step"]]
        self._detector.last = state_dict["detector"]["last"]
        self._detector.peak = state_dict["detector"]["peak"]
        self._best_val = state_dict["best_val"]
        self.peak_scale = state_dict["peak_scale"]
        self._cycle_start = state_dict["cycle_start"]
        self._rollback_meta = state_dict["rollback_point"]
        self._rollback_point = None  # in memory only; reloaded from snapshot_dir when it was written there
