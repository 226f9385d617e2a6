"""ECGQADataModule checks its manifest against what the model's encoder expects (handed over by connect)."""

from __future__ import annotations

import pytest

from ecglm.data.datamodule import ECGQADataModule
from ecglm.data.shards import write_manifest
from ecglm.encoders import Preprocessing, PreprocessingMismatchWarning


def _setup(tmp_path, preprocessing: dict, expected: Preprocessing) -> list[str]:
    splits = {s: {"num_qa": 0, "shards": []} for s in ("train", "val", "test")}
    write_manifest(tmp_path, {"dataset": "d", "splits": splits, "preprocessing": preprocessing})
    dm = ECGQADataModule(str(tmp_path))
    dm.attach(dm.prompt, num_ecg_tokens=1, preprocessing=expected)  # what connect(model, dm) hands over
    with pytest.warns(PreprocessingMismatchWarning) as caught:
        dm.setup("fit")
    return [str(w.message) for w in caught if issubclass(w.category, PreprocessingMismatchWarning)]


def test_manifest_at_another_rate_warns_naming_the_manifest(tmp_path):
    messages = _setup(
        tmp_path,
        {"sampling_rate": 500, "num_samples": 2500, "normalisation": "per-lead z-score"},
        Preprocessing(sampling_rate=250, num_samples=2500, normalization="zscore"),
    )
    assert len(messages) == 1
    assert "manifest.json" in messages[0] and "500" in messages[0] and "250" in messages[0]


def test_manifest_normalised_otherwise_warns(tmp_path):
    messages = _setup(
        tmp_path,
        {"sampling_rate": 250, "num_samples": 2500, "normalisation": "global min-max"},
        Preprocessing(),
    )
    assert len(messages) == 1 and "zscore" in messages[0]
