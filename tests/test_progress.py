"""ProgressLog: training and evaluation progress as log lines when the output is not a terminal, on a tiny
regression model; and, in a fresh process writing to a file, the lines reach that file as training runs."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecglm.callbacks import ProgressLog, interactive
from ecglm.callbacks.progress import duration


class Tiny(L.LightningModule):
    """A linear regression whose loss is logged for the progress bar, as ECGLanguageModel's is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 16) -> DataLoader:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def _fit(progress: ProgressLog, **trainer_args) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        max_steps=6,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        callbacks=[progress],
    )
    trainer = L.Trainer(**{**args, **trainer_args})
    trainer.fit(Tiny(), _loader(), _loader(6))
    return trainer


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ecglm.progress"]


def test_training_lines_every_n_steps_name_step_epoch_loss_lr_speed_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="ecglm.progress")
    trainer = _fit(ProgressLog(every_n_steps=2), val_check_interval=4)

    assert trainer.progress_bar_callback is not None
    assert isinstance(trainer.progress_bar_callback, ProgressLog)  # in place of Lightning's bar
    train = [line for line in _lines(caplog) if line.startswith("train: step")]
    assert [int(re.match(r"train: step (\d+)", line)[1]) for line in train] == [2, 4, 6]
    line = train[0]
    assert line.startswith("train: step 2/6 (33%) | epoch 0, batch 2/8 | loss ")
    assert re.search(r"\| lr 5\.00e-02 \| [0-9.e+]+ steps/s \| ETA \d+:\d\d:\d\d$", line), line
    loss = float(re.search(r"loss ([0-9.e+-]+)", line)[1])
    assert loss > 0
    validation = [line for line in _lines(caplog) if line.startswith("validation:")]
    assert len(validation) == 2, validation  # every 2 batches (as every_n_steps), and at its end
    assert re.match(r"validation: batch 2/3 \| [0-9.e+]+ batches/s \| ETA \d+:\d\d:\d\d$", validation[0])
    assert re.match(r"validation: 3 batches in [0-9.]+ s \| val/loss [0-9.]+$", validation[1])


def test_the_loss_is_the_mean_per_step_over_the_steps_since_the_last_line(caplog):
    caplog.set_level(logging.INFO, logger="ecglm.progress")
    seen: list[float] = []

    class Recorded(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(loss.item())
            return loss

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        max_steps=4,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        callbacks=[ProgressLog(every_n_steps=2)],
    )
    trainer.fit(Recorded(), _loader())
    train = [line for line in _lines(caplog) if line.startswith("train: step")]
    # Two micro-batches per step: one line per step that is a multiple of 2, never one per micro-batch.
    assert [int(re.match(r"train: step (\d+)", line)[1]) for line in train] == [2, 4]
    logged = [float(re.search(r"loss ([0-9.e+-]+)", line)[1]) for line in train]
    assert logged == pytest.approx([sum(seen[:4]) / 4, sum(seen[4:8]) / 4], rel=1e-3)


def test_the_interval_defaults_to_log_every_n_steps_and_the_epoch_end_gets_a_line(caplog):
    caplog.set_level(logging.INFO, logger="ecglm.progress")
    _fit(ProgressLog(), log_every_n_steps=3, max_steps=-1, max_epochs=1, limit_val_batches=0)
    train = [line for line in _lines(caplog) if line.startswith("train: step")]
    assert [int(re.match(r"train: step (\d+)", line)[1]) for line in train] == [3, 6, 8]
    assert "epoch 0 done" in train[-1]


def test_a_process_other_than_the_first_writes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="ecglm.progress")
    progress = ProgressLog(every_n_steps=1)
    progress.disable()  # what Lightning's ProgressBar.setup does on every rank but the first
    progress.setup = lambda *args, **kwargs: None  # keep it disabled on this single process
    _fit(progress, max_steps=2)
    assert _lines(caplog) == []


def test_what_the_module_prints_becomes_a_line(caplog):
    caplog.set_level(logging.INFO, logger="ecglm.progress")

    class Printing(Tiny):
        def on_train_end(self):
            self.print("trained", self.global_step, "steps")  # LightningModule.print: through the bar

    L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=2, callbacks=[ProgressLog()]
    ).fit(Printing(), _loader())
    assert _lines(caplog)[-1] == "trained 2 steps"


def test_interactive_only_when_both_streams_are_terminals():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert interactive([Terminal(), Terminal()])
    assert not interactive([Terminal(), io.StringIO()])
    assert not interactive([io.StringIO(), Terminal()])
    assert not interactive([Terminal(), None])  # pythonw, a closed stream
    assert (
        duration(3725) == "1:02:05" and duration(90000) == "1 days, 1:00:00" and duration(float("inf")) == "?"
    )


def test_invalid_intervals_are_refused_naming_them():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        ProgressLog(every_n_steps=0)


FIT_TO_A_FILE = textwrap.dedent(
    """
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from ecglm.callbacks import ProgressLog, interactive

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    assert not interactive(), "the output is a file"
    x = torch.randn(16, 4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=4,
                        callbacks=[ProgressLog(every_n_steps=2)])
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2))
    """
)


def test_with_output_to_a_file_and_no_logging_set_up_the_lines_reach_it(tmp_path):
    out = tmp_path / "train.log"
    with open(out, "w") as f:
        subprocess.run(
            [sys.executable, "-c", FIT_TO_A_FILE], stdout=f, stderr=subprocess.STDOUT, check=True, timeout=300
        )
    text = out.read_text()
    lines = [line for line in text.splitlines() if " train: step " in line]
    assert len(lines) == 2, text[-3000:]
    assert re.match(r"\d\d:\d\d:\d\d train: step 2/4 \(50%\) \| epoch 0, batch 2/8 \| loss ", lines[0]), (
        lines[0]
    )
    assert "\r" not in text  # no progress bar redrawn into the file
