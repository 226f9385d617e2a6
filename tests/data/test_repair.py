"""A builder that finds damaged shards (changed bytes, cut short, deleted) names them at WARNING and
writes them again alone, byte-identical to the build, the other shards untouched; when a source changed
since the build, it says so and builds anew. One test per builder."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import ecglm.data.mixture
from ecglm.data.ecg_instruct import ECGInstructImages
from ecglm.data.mixture import ECGQAMixture
from ecglm.data.shards import last_key, read_manifest, shard_runs
from ecglm.data.synthetic import SyntheticHeartQA


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: found by its sha256
    path.write_bytes(bytes(data))


def _contents(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.tar"))}


def _stamps(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.tar")}


def _rewritten(out_dir: Path, before: dict[str, int]) -> list[str]:
    return sorted(name for name, stamp in before.items() if (out_dir / name).stat().st_mtime_ns != stamp)


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ecglm")
    ]


def test_synthetic_shards_that_changed_or_went_missing_are_named_and_written_again_alone(tmp_path, caplog):
    builder = SyntheticHeartQA(num_train=6, num_val=2, num_test=2, max_samples_per_shard=2)
    manifest = builder.build(tmp_path)
    original = _contents(tmp_path)
    _flip(tmp_path / "train-000001.tar")
    (tmp_path / "test-000000.tar").unlink()
    before = _stamps(tmp_path)
    caplog.clear()

    with caplog.at_level(logging.INFO):
        assert builder.build(tmp_path) == manifest
    (warning,) = _warnings(caplog)
    assert warning.startswith(
        f"synthetic-heart-qa in {tmp_path}: 2 of its 5 shards do not match manifest.json: "
    )
    assert "test-000000.tar (missing), train-000001.tar (sha256 " in warning
    assert "writing them again from the sources" in warning and "the other shards are kept" in warning
    assert _contents(tmp_path) == original  # byte-identical
    assert _rewritten(tmp_path, before) == ["train-000001.tar"]  # and nothing else (test-000000 was gone)
    assert read_manifest(tmp_path) == manifest


def _png(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 72), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ecg_instruct_shards_are_written_again_alone_and_built_anew_when_an_image_changed(tmp_path, caplog):
    root = tmp_path / "images"
    root.mkdir()
    items = []
    for i in range(6):
        (root / f"{i}.png").write_bytes(_png(10 * i))
        turns = [{"from": "human", "value": "<image>\nRhythm?"}, {"from": "gpt", "value": f"answer {i}"}]
        items.append({"id": f"item{i}", "image": f"{i}.png", "conversations": turns})
    (root / "missing.png").unlink(missing_ok=True)
    items.insert(1, {"id": "gone", "image": "missing.png", "conversations": items[0]["conversations"]})
    (tmp_path / "ECGInstruct.json").write_text(json.dumps(items))
    builder = ECGInstructImages(
        str(tmp_path / "ECGInstruct.json"),
        str(root),
        val_fraction=0.0,
        test_fraction=0.0,
        max_samples_per_shard=2,
    )
    out = tmp_path / "shards"
    with caplog.at_level(logging.INFO):
        manifest = builder.build(out)
    assert [s["path"] for s in manifest["splits"]["train"]["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    original = _contents(out)
    out.joinpath("train-000001.tar").write_bytes(original["train-000001.tar"][:-700])  # cut short
    before = _stamps(out)
    caplog.clear()

    with caplog.at_level(logging.INFO):
        assert builder.build(out) == manifest
    (warning,) = _warnings(caplog)  # the missing image, skipped again on the way, is not reported again
    assert "1 of its 3 shards do not match manifest.json: train-000001.tar (" in warning
    assert f"{len(original['train-000001.tar']) - 700} bytes, manifest.json records" in warning
    assert _contents(out) == original and _rewritten(out, before) == ["train-000001.tar"]

    (root / "5.png").write_bytes(_png(255))  # a source of train-000002 changed since the build
    _flip(out / "train-000002.tar")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rebuilt = builder.build(out)
    found, differs = _warnings(caplog)[:2]
    assert "train-000002.tar (sha256 " in found
    assert "train-000002.tar written again differs from manifest.json" in differs
    assert "the sources changed since the build; building all shards anew" in differs
    assert rebuilt != manifest and builder.is_built(out) and _contents(out) != original


def test_mixture_shards_are_written_again_from_their_own_records_only(sources, tmp_path, caplog, monkeypatch):
    """Two 4 s windows per 10 s record, one sample per shard: damaged shards that start mid-record, at
    a record's start and at a run's start (a comparison) are written again after preprocessing their
    own records only."""
    builder = ECGQAMixture(**sources, seconds=4.0, window="all", max_samples_per_shard=1)
    manifest = builder.build(tmp_path)
    original = _contents(tmp_path)
    damaged = {
        "train-ecgqa-ptbxl-000003.tar": "ecgqa-ptbxl_ptbxl_00000004_w1",  # after ..._00000004_w0
        "test-ecgqa-ptbxl-000002.tar": "ecgqa-ptbxl_ptbxl_00001005_w0",  # after ..._00000003_w1
        "train-comparison-ecgqa-ptbxl-000000.tar": "ecgqa-ptbxl_00000001_00000004",
    }
    assert {path: last_key(tmp_path / path) for path in damaged} == damaged
    for path in damaged:
        _flip(tmp_path / path)
    before = _stamps(tmp_path)
    preprocessed: list[str] = []
    real = ecglm.data.mixture.preprocess_task
    monkeypatch.setattr(
        ecglm.data.mixture, "preprocess_task", lambda task: preprocessed.append(task[1]) or real(task)
    )
    caplog.clear()

    with caplog.at_level(logging.INFO):
        assert builder.build(tmp_path) == manifest
    (warning,) = _warnings(caplog)
    total = sum(len(entries) for entries in shard_runs(manifest).values())
    assert f"3 of its {total} shards do not match manifest.json" in warning
    assert all(f"{path} (sha256 " in warning for path in damaged)
    assert _contents(tmp_path) == original
    assert _rewritten(tmp_path, before) == sorted(damaged)
    assert sorted(preprocessed) == ["ptbxl/00001", "ptbxl/00004", "ptbxl/00004", "ptbxl/01005"]


#: ``ecglm shard`` as a user runs it: no logging set up, so what shows is WARNING and above on stderr.
SHARD = "import sys; from ecglm.commands import main; sys.exit(main(['shard', '--config', sys.argv[1]]))"


def test_the_shard_command_says_what_it_found_and_what_it_writes_again(tmp_path):
    import subprocess
    import sys

    args = {"num_train": 4, "num_val": 1, "num_test": 1, "max_samples_per_shard": 2}
    config = tmp_path / "shard.yaml"
    config.write_text(
        "builder:\n  class_path: ecglm.data.synthetic.SyntheticHeartQA\n"
        f"  init_args: {json.dumps(args)}\nout_dir: {tmp_path / 'out'}\n"
    )
    SyntheticHeartQA(**args).build(tmp_path / "out")
    _flip(tmp_path / "out" / "train-000001.tar")

    run = subprocess.run(
        [sys.executable, "-c", SHARD, str(config)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        f"synthetic-heart-qa in {tmp_path / 'out'}: 1 of its 4 shards do not match manifest.json: "
        in run.stderr
    )
    assert "train-000001.tar (sha256 " in run.stderr and "writing it again from the sources" in run.stderr
