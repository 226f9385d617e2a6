"""Bad input while streaming: skipped and logged with shard and key, or raised under ``strict``."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ecglm.data.datamodule import BadSampleError, ECGQADataModule
from ecglm.data.shards import json_bytes, npy_bytes, read_manifest, sha256_file, write_manifest, write_shards

N = 50  # samples per lead, recorded in the manifest's preprocessing
QA = [
    {
        "question": "Does this ECG show atrial fibrillation?",
        "answer": ["no"],
        "question_type": "single-verify",
    },
    {"question": "What is the rhythm?", "answer": ["sinus rhythm"], "question_type": "single-query"},
]


def _ecg(shape=(12, N), fill: float | None = None) -> np.ndarray:
    ecg = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    if fill is not None:
        ecg[0, 3] = fill
    return ecg


def _meta(qa=QA) -> dict:
    return {"dataset": "ecgqa-ptbxl", "record_id": "1", "qa": qa}


#: case -> (tar members of the one bad sample, reason logged, key named). The sample key is the case.
CASES = {
    "unreadable_npy": ({"ecg.npy": b"\x93NUMPY garbage", "json": json_bytes(_meta())}, "unreadable ecg.npy"),
    "long_ecg": ({"ecg.npy": npy_bytes(_ecg((12, 100))), "json": json_bytes(_meta())}, "wrong shape"),
    "flat_ecg": ({"ecg.npy": npy_bytes(_ecg((12 * N,))), "json": json_bytes(_meta())}, "wrong shape"),
    "nan_ecg": ({"ecg.npy": npy_bytes(_ecg(fill=np.nan)), "json": json_bytes(_meta())}, "non-finite ecg"),
    "inf_ecg": ({"ecg.npy": npy_bytes(_ecg(fill=np.inf)), "json": json_bytes(_meta())}, "non-finite ecg"),
    "bad_json": ({"ecg.npy": npy_bytes(_ecg()), "json": b'{"qa": [{"question": '}, "unreadable json"),
    "latin1_json": (
        {
            "ecg.npy": npy_bytes(_ecg()),
            "json": '{"qa": [{"question": "Caf\xe9?", "answer": "x"}]}'.encode("latin-1"),
        },
        "non-UTF-8 text",
    ),
    "json_not_object": ({"ecg.npy": npy_bytes(_ecg()), "json": b"[1, 2]"}, "invalid json"),
    "no_ecg": ({"json": json_bytes(_meta())}, "missing ecg.npy"),
    "no_json": ({"ecg.npy": npy_bytes(_ecg())}, "missing json"),
}


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> dict:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for field, data in members.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # What the manifest of a shard written whole would say: the QA count before any damage.
    num_qa = sum(len(_meta()["qa"]) if "empty_qa" not in key else 4 for key in samples)
    return {"path": path.name, "num_samples": len(samples), "num_qa": num_qa}


def _good(key: str) -> dict[str, bytes]:
    return {"ecg.npy": npy_bytes(_ecg()), "json": json_bytes(_meta())}


def _truncated_shard(out: Path) -> dict:
    """Two good samples, the file cut in the middle of the second one's last member."""
    shard = _write_tar(out / "truncated.tar", {"trunc_a": _good("trunc_a"), "trunc_b": _good("trunc_b")})
    with tarfile.open(out / "truncated.tar") as tar:
        last = tar.getmembers()[-1]
    assert last.name == "trunc_b.json"
    with open(out / "truncated.tar", "r+b") as f:
        f.truncate(last.offset_data + 10)
    return shard


def _corrupt_header_shard(out: Path) -> dict:
    """Three good samples, the header of the second one's first member overwritten: tarfile stops there."""
    shard = _write_tar(out / "corrupt.tar", {f"corrupt_{i}": _good(f"corrupt_{i}") for i in range(3)})
    with tarfile.open(out / "corrupt.tar") as tar:
        header = tar.getmembers()[2].offset
    with open(out / "corrupt.tar", "r+b") as f:
        f.seek(header)
        f.write(b"\x07" * 100)
    return shard


def _not_a_tar_shard(out: Path) -> dict:
    (out / "not_a_tar.tar").write_bytes(b"this is not a tar file " * 50)
    return {"path": "not_a_tar.tar", "num_samples": 2, "num_qa": 4}


def _empty_qa_shard(out: Path) -> dict:
    qa = [
        {"question": "Is it normal?", "answer": ""},
        QA[0],
        {"question": " ", "answer": ["yes"]},
        {"answer": []},
    ]
    return _write_tar(
        out / "empty_qa.tar", {"empty_qa": {"ecg.npy": npy_bytes(_ecg()), "json": json_bytes(_meta(qa))}}
    )


def _dataset(out: Path, shards: list[dict]) -> Path:
    split = {"num_qa": 1, "shards": shards}
    write_manifest(
        out,
        {
            "dataset": "bad",
            "preprocessing": {"num_samples": N},
            "splits": dict.fromkeys(("train", "val", "test"), split),
        },
    )
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_input")
    good = [{"__key__": f"good_{i}", "ecg.npy": _ecg(), "json": _meta()} for i in range(3)]
    shards = write_shards(good[:2], out, "good-a") + write_shards(good[2:], out, "good-b")
    for case, (members, _) in CASES.items():
        shards.append(_write_tar(out / f"{case}.tar", {case: members, f"{case}_after": _good(case)}))
    shards += [_truncated_shard(out), _corrupt_header_shard(out), _not_a_tar_shard(out), _empty_qa_shard(out)]
    return _dataset(out, shards)


@pytest.fixture(scope="module")
def formatter(tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.prompts import ChatTemplate

    return ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), "Answer briefly.")


def _keys(dm: ECGQADataModule) -> list[str]:
    return [key for batch in dm.test_dataloader() for key in batch.key]


def _module(data_dir: Path, formatter, strict: bool = False, **kwargs) -> ECGQADataModule:
    dm = ECGQADataModule(str(data_dir), eval_batch_size=4, num_workers=0, strict=strict, **kwargs)
    dm.setup("test")
    dm.attach(formatter, 1)
    return dm


def test_default_mode_yields_the_good_pairs_and_logs_each_bad_sample(shard_dir, formatter, caplog):
    dm = _module(shard_dir, formatter)
    with caplog.at_level(logging.WARNING, logger="ecglm.data"):
        keys = _keys(dm)

    good = [f"good_{i}" for i in range(3)] + [f"{case}_after" for case in CASES] + ["trunc_a", "corrupt_0"]
    assert sorted(keys) == sorted([f"{k}_qa{i}" for k in good for i in range(2)] + ["empty_qa_qa1"])
    skips = [r.getMessage() for r in caplog.records if "skipped bad input: shard" in r.getMessage()]
    for case, (_, reason) in CASES.items():
        assert any(f"shard {shard_dir / case}.tar, key {case}: {reason}" in m for m in skips), (case, skips)
    tar_errors = [m for m in skips if "corrupt or truncated tar" in m]
    assert len(tar_errors) == 3 and all("the rest of this shard is lost" in m for m in tar_errors)
    for shard, key in (("truncated", "trunc_b"), ("corrupt", "corrupt_0"), ("not_a_tar", "unknown")):
        assert any(f"shard {shard_dir / shard}.tar, key {key}: corrupt" in m for m in tar_errors), (
            shard,
            skips,
        )
    assert "1 of the 3 in the manifest" in next(m for m in tar_errors if "corrupt.tar" in m)
    for i in (0, 2, 3):
        assert any(f"key empty_qa_qa{i}: empty QA" in m for m in skips), (i, skips)
    # QA pairs lost: a bad sample's two; what a broken tar did not yield of the pairs its manifest lists.
    lost = {reason: 2 * n for reason, n in Counter(reason for _, reason in CASES.values()).items()}
    assert dm.skipped == {**lost, "empty QA": 3, "corrupt or truncated tar": 2 + 4 + 4}
    summary = [r.getMessage() for r in caplog.records if "at the end of its stream" in r.getMessage()]
    assert len(summary) == 1 and "'wrong shape': 4" in summary[0]


BAD_SHARDS = {
    **{case: case for case in CASES},
    "truncated": "trunc_b",
    "corrupt": "corrupt_0",
    "not_a_tar": "unknown",
    "empty_qa": "empty_qa_qa0",
}


@pytest.mark.parametrize(("case", "key"), BAD_SHARDS.items())
def test_strict_mode_raises_naming_shard_and_key(shard_dir, formatter, tmp_path, case, key):
    shards = read_manifest(shard_dir)["splits"]["test"]["shards"]
    shard = next(s for s in shards if s["path"] == f"{case}.tar")
    dm = _module(
        _dataset(tmp_path, [{**shard, "path": str(shard_dir / shard["path"])}]), formatter, strict=True
    )

    with pytest.raises(BadSampleError) as raised:
        _keys(dm)

    assert f"shard {shard_dir / case}.tar, key {key}: " in str(raised.value)


def test_a_broken_shard_read_beside_another_dataset_names_its_own_key(shard_dir, formatter, tmp_path):
    """A worker reads one shard per dataset at a time; a tar error must not name the other's member."""
    manifest = read_manifest(shard_dir)["splits"]["test"]["shards"]
    broken = next(s for s in manifest if s["path"] == "not_a_tar.tar")
    other = [
        {"__key__": f"other_{i}", "ecg.npy": _ecg(), "json": {**_meta(), "dataset": "other"}}
        for i in range(40)
    ]
    shards = [
        {**broken, "path": str(shard_dir / "not_a_tar.tar"), "datasets": {"ecgqa-ptbxl": 4}},
        *write_shards(other, tmp_path, "other"),
    ]
    dm = _module(_dataset(tmp_path, shards), formatter, strict=True)

    with pytest.raises(BadSampleError) as raised:
        _keys(dm)

    assert f"shard {shard_dir / 'not_a_tar'}.tar, key unknown: " in str(raised.value)


def _flip_two_bytes_in_an_ecg(shard: Path) -> None:
    """The low bits of the first ECG's last two values flipped: still finite, the tar still valid."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".ecg.npy"))
    with open(shard, "r+b") as f:
        for offset in (member.offset_data + member.size - 2, member.offset_data + member.size - 4):
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 1]))


def _checksummed(out: Path) -> tuple[Path, dict]:
    """An intact shard and one whose ECG bytes changed after the build; returns the damaged one's entry."""
    intact = [{"__key__": f"intact_{i}", "ecg.npy": _ecg(), "json": _meta()} for i in range(2)]
    flipped = [{"__key__": f"flipped_{i}", "ecg.npy": _ecg(), "json": _meta()} for i in range(2)]
    shards = write_shards(intact, out, "intact") + write_shards(flipped, out, "flipped")
    _flip_two_bytes_in_an_ecg(out / shards[1]["path"])
    return _dataset(out, shards), shards[1]


def test_a_shard_changed_after_its_build_is_skipped_and_its_pairs_counted(tmp_path, formatter, caplog):
    data_dir, damaged = _checksummed(tmp_path)
    dm = _module(data_dir, formatter)
    with caplog.at_level(logging.WARNING, logger="ecglm.data"):
        keys = _keys(dm)

    assert sorted(keys) == [f"intact_{i}_qa{j}" for i in range(2) for j in range(2)]
    assert dm.skipped == {"sha256 mismatch": 4}
    skips = [r.getMessage() for r in caplog.records if "skipped bad input: shard" in r.getMessage()]
    assert len(skips) == 1 and f"shard {data_dir / damaged['path']}: sha256 mismatch" in skips[0]
    assert damaged["sha256"] in skips[0] and sha256_file(data_dir / damaged["path"]) in skips[0]


def test_a_shard_changed_after_its_build_raises_in_strict_mode(tmp_path, formatter):
    data_dir, damaged = _checksummed(tmp_path)
    dm = _module(data_dir, formatter, strict=True)

    with pytest.raises(BadSampleError) as raised:
        _keys(dm)

    message = str(raised.value)
    assert f"shard {data_dir / damaged['path']}: sha256 mismatch" in message
    assert str(data_dir / "manifest.json") in message and "ecglm shard" in message


def test_without_the_check_the_changed_shard_streams_unnoticed(tmp_path, formatter):
    data_dir, _ = _checksummed(tmp_path)
    dm = _module(data_dir, formatter, verify_checksums=False)

    assert len(_keys(dm)) == 8 and not dm.skipped  # what the check is for: nothing else notices


def test_each_shard_is_hashed_once_per_process(tmp_path, formatter, monkeypatch):
    import ecglm.data.shards

    data_dir, _ = _checksummed(tmp_path)
    hashed = Counter()
    monkeypatch.setattr(
        ecglm.data.shards, "sha256_file", lambda path: hashed.update([path.name]) or sha256_file(path)
    )
    dm = _module(data_dir, formatter)
    _keys(dm)
    _keys(dm)

    assert hashed == {"intact-000000.tar": 1, "flipped-000000.tar": 1}
