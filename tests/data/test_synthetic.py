"""Tests for the synthetic heart-rate / rhythm ECG QA dataset builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from scipy import signal

from ecglm.data.preprocess import zscore
from ecglm.data.shards import read_manifest
from ecglm.data.synthetic import LEADS, SyntheticHeartQA

RANGES = {"bradycardia": (40, 52), "normal": (65, 92), "tachycardia": (110, 150)}
SMALL = {"num_train": 24, "num_val": 6, "num_test": 10, "max_samples_per_shard": 10}


def measure_rr(ecg: np.ndarray, fs: int) -> np.ndarray:
    """RR intervals (s) from QRS slopes summed over all leads.

    neurokit2's simulated lead II has a tiny QRS under a tall T wave, so lead II alone is unreliable.
    """
    width = int(0.06 * fs)
    envelope = np.convolve(np.abs(np.diff(ecg, axis=1)).sum(axis=0), np.ones(width) / width, mode="same")
    peaks, _ = signal.find_peaks(envelope, height=0.5 * np.percentile(envelope, 99), distance=int(0.24 * fs))
    return np.diff(peaks) / fs


def read_split(out_dir: Path, manifest: dict, split: str) -> list[dict]:
    urls = [str(out_dir / shard["path"]) for shard in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("synthetic")
    return out_dir, SyntheticHeartQA(**SMALL).build(out_dir)


def test_manifest_describes_splits_and_preprocessing(built: tuple[Path, dict]) -> None:
    out_dir, manifest = built

    assert manifest == read_manifest(out_dir)
    assert manifest["dataset"] == "synthetic-heart-qa" and manifest["version"] == 4
    assert manifest["params"] == SyntheticHeartQA(**SMALL).params
    assert manifest["params"]["beat_source"] == "neurokit2"
    assert manifest["preprocessing"] == {
        "sampling_rate": 250,
        "num_samples": 2500,
        "leads": list(LEADS),
        "normalisation": "per-lead z-score",
    }
    train = manifest["splits"]["train"]
    assert (train["num_ecgs"], train["num_qa"]) == (24, 48)
    assert [s["path"] for s in train["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert [s["num_samples"] for s in train["shards"]] == [10, 10, 4]
    assert manifest["splits"]["test"]["num_qa"] == 20
    assert manifest["splits"]["test"]["datasets"] == {"synthetic-heart-qa": 20}
    assert manifest["splits"]["test"]["question_types"] == ["heart-rate", "rhythm"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["manifest.json"] + [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    )


def test_shards_hold_zscored_ecgs_and_clinical_qa(built: tuple[Path, dict]) -> None:
    out_dir, manifest = built
    samples = read_split(out_dir, manifest, "val")

    assert [s["__key__"] for s in samples] == [f"synthetic_val_{i:06d}" for i in range(6)]
    for sample in samples:
        ecg = sample["ecg.npy"].astype(np.float32)
        assert sample["ecg.npy"].dtype == np.float16 and ecg.shape == (12, 2500)
        assert np.isfinite(ecg).all()
        np.testing.assert_allclose(ecg.mean(axis=1), 0.0, atol=1e-2)
        np.testing.assert_allclose(ecg.std(axis=1), 1.0, atol=1e-2)
        meta = sample["json"]
        assert meta["record_id"] == meta["patient_id"] == sample["__key__"]
        assert (meta["dataset"], meta["split"], meta["sampling_rate"]) == ("synthetic-heart-qa", "val", 250)
        assert meta["leads"] == list(LEADS)
        labels = meta["labels"]
        low, high = RANGES[labels["heart_rate_class"]]
        assert low <= labels["heart_rate_bpm"] <= high
        assert [qa["question_type"] for qa in meta["qa"]] == ["heart-rate", "rhythm"]
        assert [qa["answer"] for qa in meta["qa"]] == [labels["heart_rate_class"], labels["rhythm"]]
        assert all(qa["question"].endswith("?") or qa["question"].endswith(".") for qa in meta["qa"])


def test_shards_match_the_generator_to_float16_precision(built: tuple[Path, dict]) -> None:
    out_dir, manifest = built
    builder = SyntheticHeartQA(**SMALL)

    for sample in read_split(out_dir, manifest, "test")[:3]:
        index = int(sample["__key__"].rsplit("_", 1)[1])
        record = builder.make_record("test", index)
        assert record["ecg.npy"].dtype == np.float32
        np.testing.assert_array_equal(sample["ecg.npy"], record["ecg.npy"].astype(np.float16))
        assert sample["json"] == record["json"]


def check_labels_are_in_the_signal(builder: SyntheticHeartQA, count: int) -> None:
    variation: dict[str, list[float]] = {"regular": [], "irregular": []}
    classes = set()
    for index in range(count):
        record = builder.make_record("train", index)
        labels = record["json"]["labels"]
        rr = measure_rr(record["ecg.npy"], builder.sampling_rate)
        measured = 60.0 / rr.mean()
        low, high = RANGES[labels["heart_rate_class"]]
        assert 0.97 * low <= measured <= 1.03 * high, (index, measured, labels)
        assert measured == pytest.approx(labels["heart_rate_bpm"], rel=0.03)
        variation[labels["rhythm"]].append(float(rr.std() / rr.mean()))
        classes.add((labels["heart_rate_class"], labels["rhythm"]))
    assert len(classes) == 6  # every rate class with both rhythms
    assert max(variation["regular"]) < 0.04 < 0.06 < min(variation["irregular"])
    assert np.median(variation["irregular"]) > 5 * np.median(variation["regular"])


def test_heart_rate_and_rhythm_labels_are_measurable_in_the_signal() -> None:
    check_labels_are_in_the_signal(SyntheticHeartQA(**SMALL), count=60)


def test_same_params_give_identical_shards_and_splits_are_independent(
    built: tuple[Path, dict], tmp_path: Path
) -> None:
    _, manifest = built
    again = SyntheticHeartQA(**SMALL).build(tmp_path / "again")
    more_test = SyntheticHeartQA(**{**SMALL, "num_test": 3}).build(tmp_path / "more_test")

    assert again == manifest
    assert more_test["splits"]["train"] == manifest["splits"]["train"]
    assert more_test["splits"]["val"] == manifest["splits"]["val"]
    assert more_test["splits"]["test"] != manifest["splits"]["test"]
    assert more_test["splits"]["test"]["num_ecgs"] == 3


def test_build_is_idempotent_and_repairs_changed_shards(tmp_path: Path) -> None:
    builder = SyntheticHeartQA(num_train=4, num_val=2, num_test=2)
    manifest = builder.build(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    assert builder.is_built(tmp_path)
    assert SyntheticHeartQA(num_train=4, num_val=2, num_test=2).build(tmp_path) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert not builder.is_built(tmp_path)
    assert builder.build(tmp_path) == manifest
    assert builder.is_built(tmp_path)


def test_changed_params_rebuild_and_drop_stale_shards(tmp_path: Path) -> None:
    SyntheticHeartQA(num_train=5, num_val=1, num_test=1, max_samples_per_shard=2).build(tmp_path)
    assert (tmp_path / "train-000002.tar").exists()

    smaller = SyntheticHeartQA(num_train=3, num_val=1, num_test=1, max_samples_per_shard=2)
    assert not smaller.is_built(tmp_path)
    manifest = smaller.build(tmp_path)

    assert manifest["params"]["num_train"] == 3
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]


def test_record_length_follows_sampling_rate_and_seconds() -> None:
    builder = SyntheticHeartQA(seconds=7.3)  # 250 Hz: reuses the cached neurokit2 templates
    record = builder.make_record("val", 0)

    assert record["ecg.npy"].shape == (12, 1825)
    assert record["ecg.npy"].dtype == np.float32
    assert builder.make_record("val", 0)["json"] == record["json"]


def test_zscore_maps_a_constant_lead_to_zeros() -> None:
    x = np.vstack([np.full((1, 100), 3.0), np.arange(100.0)[None], np.zeros((10, 100))])

    z = zscore(x, np.float32)  # as the synthetic records are stored

    assert z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_array_equal(z[0], 0.0)
    assert z[1].mean() == pytest.approx(0.0, abs=1e-6) and z[1].std() == pytest.approx(1.0, abs=1e-5)


def test_ptb_beat_source_builds_real_morphology(tmp_path: Path, ptb_record: Path) -> None:
    builder = SyntheticHeartQA(num_train=4, num_val=1, num_test=1, beat_source=str(ptb_record))

    manifest = builder.build(tmp_path)

    assert manifest["params"]["beat_source"] == str(ptb_record)
    assert len(builder.templates) == 4  # 38.4 s record: four 9.6 s segments
    assert all(t.beat.shape[0] == 12 for t in builder.templates)
    sample = read_split(tmp_path, manifest, "train")[0]
    assert sample["ecg.npy"].shape == (12, 2500)
    check_labels_are_in_the_signal(builder, count=40)
    check_labels_are_in_the_signal(SyntheticHeartQA(sampling_rate=500, beat_source=str(ptb_record)), count=20)


def test_missing_wfdb_record_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "rec01"
    builder = SyntheticHeartQA(num_train=1, num_val=0, num_test=0, beat_source=str(missing))

    with pytest.raises(FileNotFoundError, match="rec01"):
        builder.build(tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_wfdb_record_without_a_standard_lead_is_named(tmp_path: Path) -> None:
    import wfdb

    names = [lead.lower() for lead in LEADS if lead != "V4"]
    signals = np.zeros((5000, 11))
    wfdb.wrsamp("partial", 500, ["mV"] * 11, names, signals, fmt=["16"] * 11, write_dir=str(tmp_path))
    builder = SyntheticHeartQA(num_train=1, num_val=0, num_test=0, beat_source=str(tmp_path / "partial"))

    with pytest.raises(ValueError, match=r"partial.*V4"):
        builder.build(tmp_path / "out")


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_train"):
        SyntheticHeartQA(num_train=-1)
    with pytest.raises(ValueError, match="sampling_rate"):
        SyntheticHeartQA(sampling_rate=50)
