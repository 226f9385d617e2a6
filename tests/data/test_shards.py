"""Tests for the deterministic WebDataset shard and manifest writer."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ecglm.data.shards import read_manifest, write_manifest, write_shards


def make_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"rec_{i:04d}",
            "ecg.npy": rng.normal(size=(12, 500)).astype(np.float32),
            "json": {"record_id": f"rec_{i:04d}", "qa": [{"answer": "normal", "question": "Rate?"}], "i": i},
        }
        for i in range(n)
    ]


def test_shards_split_by_count_and_report_sha256(tmp_path: Path) -> None:
    shards = write_shards(make_samples(7), tmp_path, "train", max_samples_per_shard=3)

    assert [s["path"] for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["num_samples"] for s in shards] == [3, 3, 1]
    for shard in shards:
        assert shard["sha256"] == hashlib.sha256((tmp_path / shard["path"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == [s["path"] for s in shards]  # no .tmp left


def test_round_trip_through_webdataset(tmp_path: Path) -> None:
    samples = make_samples(5)
    shards = write_shards(samples, tmp_path, "val", max_samples_per_shard=2)
    urls = [str(tmp_path / s["path"]) for s in shards]

    read = list(wds.WebDataset(urls, shardshuffle=False).decode())

    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    for got, want in zip(read, samples, strict=True):
        assert got["ecg.npy"].dtype == np.float16
        assert got["ecg.npy"].shape == (12, 500)
        np.testing.assert_allclose(got["ecg.npy"], want["ecg.npy"], rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got["ecg.npy"], want["ecg.npy"].astype(np.float16))
        assert got["json"] == want["json"]


def test_same_inputs_give_byte_identical_shards(tmp_path: Path) -> None:
    first = write_shards(make_samples(4), tmp_path / "a", "train")
    second = write_shards(make_samples(4), tmp_path / "b", "train")

    assert first == second
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a/train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["rec_0000.ecg.npy", "rec_0000.json"]
    assert {m.mtime for m in members} == {0}


def test_json_is_written_with_sorted_keys(tmp_path: Path) -> None:
    sample = {"__key__": "k", "ecg.npy": np.zeros((12, 4)), "json": {"b": 1, "a": {"z": 2, "y": 3}}}
    write_shards([sample], tmp_path, "test")

    with tarfile.open(tmp_path / "test-000000.tar") as tar:
        text = tar.extractfile("k.json").read().decode()

    assert text == '{"a":{"y":3,"z":2},"b":1}'


def test_key_with_dot_is_rejected_by_name(tmp_path: Path) -> None:
    samples = make_samples(2)
    samples[1]["__key__"] = "patient.1"

    with pytest.raises(ValueError, match=r"patient\.1"):
        write_shards(samples, tmp_path, "train")
    assert not list(tmp_path.glob("*.tmp"))


def test_duplicate_keys_and_non_finite_ecgs_are_rejected(tmp_path: Path) -> None:
    samples = make_samples(2)
    samples[1]["__key__"] = samples[0]["__key__"]
    with pytest.raises(ValueError, match=r"duplicate.*rec_0000"):
        write_shards(samples, tmp_path, "train")

    bad = make_samples(1)
    bad[0]["ecg.npy"][3, 7] = 1e6  # beyond float16's range
    with pytest.raises(ValueError, match=r"rec_0000.*float16"):
        write_shards(bad, tmp_path, "val")
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_write_keeps_the_old_shard_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shards(make_samples(3), tmp_path, "train")
    before = (tmp_path / "train-000000.tar").read_bytes()
    original_write = wds.TarWriter.write
    calls = []

    def failing_write(self: wds.TarWriter, obj: dict) -> int:
        calls.append(obj["__key__"])
        if len(calls) == 2:
            raise OSError("disk full")
        return original_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_shards(make_samples(3, seed=1), tmp_path, "train")

    assert (tmp_path / "train-000000.tar").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]


def test_manifest_round_trip_is_sorted_and_atomic(tmp_path: Path) -> None:
    manifest = {"version": 1, "dataset": "x", "splits": {"train": {"num_ecgs": 3}}}
    write_manifest(tmp_path, manifest)

    text = (tmp_path / "manifest.json").read_text()
    assert read_manifest(tmp_path) == manifest
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_read_manifest_on_empty_dir_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json") as info:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert "build" in str(info.value)


def test_shards_close_at_the_size_limit_and_count_qa_per_dataset(tmp_path: Path) -> None:
    samples = make_samples(9)
    for i, sample in enumerate(samples):
        sample["json"]["dataset"] = "a" if i < 5 else "b"
        sample["json"]["qa"] = sample["json"]["qa"] * (i % 3 + 1)
    # A sample takes 15,872 bytes of tar members here (float16 (12, 500) .npy, its json, headers).
    shards = write_shards(samples, tmp_path, "train", max_samples_per_shard=None, max_shard_mb=0.04)

    assert [s["num_samples"] for s in shards] == [3, 3, 3]  # 2 samples: 31,744 bytes; 3: 47,616
    assert [s["bytes"] for s in shards] == [(tmp_path / s["path"]).stat().st_size for s in shards]
    assert [s["num_qa"] for s in shards] == [6, 6, 6]
    assert [s["datasets"] for s in shards] == [{"a": 6}, {"a": 3, "b": 3}, {"b": 6}]
    with pytest.raises(ValueError, match="max_shard_mb"):
        write_shards(samples, tmp_path, "x", max_shard_mb=0)


def test_shards_built_checks_the_manifest_entries_and_every_shard(tmp_path: Path) -> None:
    from ecglm.data.shards import shards_built

    splits = {}
    for split in ("train", "val", "test"):
        shards = write_shards(make_samples(2), tmp_path, split)
        comparison = write_shards(make_samples(1, seed=1), tmp_path, f"{split}-comparison")
        splits[split] = {"shards": shards, "comparison": {"shards": comparison}}
    write_manifest(tmp_path, {"params": {"a": 1}, "version": 2, "splits": splits})

    assert shards_built(tmp_path, params={"a": 1}, version=2)
    assert not shards_built(tmp_path, params={"a": 2}, version=2)
    assert not shards_built(tmp_path, params={"a": 1}, version=2, inputs_fingerprint="x")  # absent entry
    assert not shards_built(tmp_path / "nowhere", params={"a": 1})
    comparison = tmp_path / splits["val"]["comparison"]["shards"][0]["path"]
    comparison.write_bytes(comparison.read_bytes()[:-512])  # a comparison shard counts too
    assert not shards_built(tmp_path, params={"a": 1}, version=2)
