"""SkippedInputLogger: the training pairs lost to bad input, logged by a real Trainer during the epoch."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecglm.data.shards import write_manifest, write_shards
from ecglm.wiring import connect

N = 50  # samples per lead
GOOD = 4 * 4 * 4  # 4 shards of 4 ECGs with 4 questions each
CUT, CUT_KEPT = 6 * 8, 8  # one shard of 6 ECGs with 8 questions each, cut inside its second ECG
BATCHES = (GOOD + CUT) // 4  # batch 4


def _samples(dataset: str, shard: int, ecgs: int, qa: int) -> list[dict[str, Any]]:
    questions = [
        {"question": f"q{i}", "answer": ["yes"], "question_type": "single-verify"} for i in range(qa)
    ]
    return [
        {
            "__key__": f"{dataset}_{shard}_{i}",
            "ecg.npy": np.full((12, N), i, dtype=np.float32),
            "json": {"dataset": dataset, "qa": questions},
        }
        for i in range(ecgs)
    ]


def _cut_inside_the_second_ecg(shard: Path) -> None:
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name == "cut_0_1.ecg.npy")
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + 100)


def _write(out: Path) -> Path:
    """Two datasets, so that the cut shard is read from the first batches on (datasets are interleaved)."""
    shards = [s for i in range(4) for s in write_shards(_samples("good", i, 4, 4), out, f"good-{i}")]
    shards += write_shards(_samples("cut", 0, 6, 8), out, "cut")
    _cut_inside_the_second_ecg(out / shards[-1]["path"])
    split = {"num_qa": GOOD + CUT, "datasets": {"good": GOOD, "cut": CUT}, "shards": shards}
    splits = dict.fromkeys(("train", "val", "test"), split)
    write_manifest(out, {"dataset": "mix", "preprocessing": {"num_samples": N}, "splits": splits})
    return out


@pytest.mark.parametrize(
    ("verify", "reason", "lost"),
    [(False, "corrupt_or_truncated_tar", CUT - CUT_KEPT), (True, "sha256_mismatch", CUT)],
)
def test_pairs_lost_are_logged_during_the_epoch(
    tmp_path, tiny_backbone_factory, tiny_encoder_factory, verify, reason, lost
):
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from ecglm.connectors import MLPConnector
    from ecglm.data.datamodule import ECGQADataModule
    from ecglm.data.monitor import SkippedInputLogger
    from ecglm.module import ECGLanguageModel

    class Recorded(Logger):
        name, version = "recorded", 0

        def __init__(self):
            super().__init__()
            self.records: list[tuple[int, dict[str, float]]] = []

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.records.append((step, dict(metrics)))

    recorded = Recorded()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=recorded,
        log_every_n_steps=2,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkippedInputLogger()],
        default_root_dir=tmp_path,
    )
    model = ECGLanguageModel(
        tiny_encoder_factory(), MLPConnector(num_tokens=1), tiny_backbone_factory("llama")
    )
    data = ECGQADataModule(
        str(_write(tmp_path / "shards")),
        batch_size=4,
        num_workers=2,
        shuffle_buffer=0,
        verify_checksums=verify,
    )
    connect(model, data)
    trainer.fit(model, datamodule=data)

    logged = [(step, m) for step, m in recorded.records if "data/pairs_lost" in m]
    during = [m for step, m in logged if step < BATCHES]
    assert during and during[-1]["data/pairs_lost"] == lost  # known and logged before the epoch's end
    assert logged[-1][0] == BATCHES and logged[-1][1] == {
        "data/pairs_lost": lost,
        f"data/pairs_lost/{reason}": lost,
    }
