"""CODE-15% as a source: HDF5 parts and exams.csv in the published layout, written here with h5py from
signals whose values are known, built into shards and checked against scipy and the labels."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import signal as scipy_signal

from ecglm.data.code15 import LABELS, CODE15Error, CODE15LabelQA
from ecglm.data.source import patient_split
from ecglm.plugins import discover

COLUMNS = [
    "exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB", "LBBB", "SB", "ST", "AF",
    "patient_id", "death", "timey", "normal_ecg", "trace_file",
]  # fmt: skip
PADDED = 4096
#: (exam_id, patient_id, part, recorded samples at 400 Hz, labels present)
EXAMS = [
    (1001, 7, 0, 2920, {"RBBB", "AF"}),  # 7.3 s, the shortest CODE-15% recording
    (1002, 7, 0, 4080, set()),  # 10.2 s, the longest
    (1003, 8, 0, 4000, {"1dAVb"}),
    (1004, 9, 0, 3600, {"SB"}),
    (2001, 10, 1, 4096, {"ST", "LBBB"}),  # no padding at all
    (2002, 11, 1, 3000, set()),
    (2003, 8, 1, 3200, {"AF"}),  # patient 8's second exam, in another part
    (3001, 12, 2, 4000, {"AF"}),  # part 2 is not downloaded
]


def read_shards(out: Path, manifest: dict) -> list[dict]:
    """Every sample of every split's shards: ``ecg.npy`` as an array, ``json`` as a dict."""
    samples: dict[str, dict] = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                for member in tar:
                    key, _, field = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    value = np.load(io.BytesIO(data)) if field == "ecg.npy" else json.loads(data)
                    samples.setdefault(key, {})[field] = value
    return list(samples.values())


def known_signal(exam_id: int, samples: int) -> np.ndarray:
    """(samples, 12) at 400 Hz: per lead an offset plus a sine; no instant where all 12 leads are 0."""
    t = np.arange(samples) / 400.0
    lead = np.arange(12)
    return 0.1 * (lead + 1) + 0.5 * np.sin(2 * np.pi * (1.0 + 0.3 * lead + exam_id % 7) * t[:, None] + lead)


def write_code15(root: Path, bad_flag: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for part in (0, 1):
        exams = [e for e in EXAMS if e[2] == part]
        tracings = np.zeros((len(exams) + 1, PADDED, 12), dtype=np.float32)  # a last row of zeros
        for row, (exam_id, _, _, samples, _) in enumerate(exams):
            start = (PADDED - samples) // 2  # centred, as CODE-15% pads
            tracings[row, start : start + samples] = known_signal(exam_id, samples)
        with h5py.File(root / f"exams_part{part}.hdf5", "w") as h5:
            h5["tracings"] = tracings
            h5["exam_id"] = np.array([e[0] for e in exams] + [0], dtype=np.int64)
    with open(root / "exams.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for exam_id, patient_id, part, _, present in EXAMS:
            row = {c: "" for c in COLUMNS} | {"exam_id": exam_id, "patient_id": patient_id, "age": 60}
            row |= {label: str(label in present) for label in LABELS}
            row |= {"is_male": "True", "normal_ecg": str(not present), "trace_file": f"exams_part{part}.hdf5"}
            writer.writerow(row)
        if bad_flag:
            flags = {label: "False" for label in LABELS} | {"RBBB": "maybe"}
            writer.writerow({c: "" for c in COLUMNS} | flags | {"exam_id": 9, "patient_id": 9})
    return root


def expected_ecg(exam_id: int, samples: int) -> np.ndarray:
    """scipy's 400 -> 250 Hz (5/8) polyphase resampling, the first 2500 samples z-scored, zero-padded."""
    recorded = known_signal(exam_id, samples).astype(np.float32)  # as the HDF5 file stores it
    x = scipy_signal.resample_poly(recorded, 5, 8, axis=0).T[:, :2500]
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    return np.pad(x, ((0, 0), (0, 2500 - x.shape[1])))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = write_code15(tmp_path_factory.mktemp("code15"))
    out = root / "shards"
    manifest = CODE15LabelQA(root, max_samples_per_shard=3).build(out)
    return root, out, manifest


def test_every_downloaded_exam_is_one_unpadded_resampled_sample(built):
    _, out, manifest = built
    samples = read_shards(out, manifest)
    by_exam = {s["json"]["record_id"]: s for s in samples}
    assert sorted(by_exam) == [1001, 1002, 1003, 1004, 2001, 2002, 2003]
    assert manifest["skipped"] == {"part_not_found:exams_part2.hdf5": 1} and manifest["dropped"] == {}
    for exam_id, _, _, recorded, _ in EXAMS[:-1]:
        ecg = by_exam[exam_id]["ecg.npy"]
        assert ecg.shape == (12, 2500) and ecg.dtype == np.float16
        np.testing.assert_allclose(ecg.astype(np.float64), expected_ecg(exam_id, recorded), atol=4e-3)
        real = min(2500, recorded * 5 // 8)
        assert not ecg[:, real:].any()  # the padding CODE-15% adds is gone; only the window's own remains
        assert np.all(np.abs(ecg[:, :real].astype(np.float64).std(axis=1) - 1) < 0.01)
    meta = by_exam[1001]["json"]
    assert (meta["sampling_rate"], meta["leads"][:3], meta["patient_id"]) == (250, ["I", "II", "III"], 7)
    assert (
        manifest["preprocessing"]["sampling_rate"] == 250 and manifest["preprocessing"]["num_samples"] == 2500
    )


def test_questions_state_the_labels_of_exams_csv(built):
    _, out, manifest = built
    by_exam = {s["json"]["record_id"]: s["json"]["qa"] for s in read_shards(out, manifest)}
    for exam_id, _, _, _, present in EXAMS[:-1]:
        qa = by_exam[exam_id]
        query = [q for q in qa if q["question_type"] == "single-query"]
        assert len(query) == 1 and "sinus tachycardia" in query[0]["question"]
        assert sorted(query[0]["answer"]) == sorted(LABELS[c] for c in present) or (
            not present and query[0]["answer"] == ["none"]
        )
        verify = {q["attribute"][0]: q["answer"] for q in qa if q["question_type"] == "single-verify"}
        assert verify == {c: ["yes" if c in present else "no"] for c in LABELS}
        assert all(
            LABELS[q["attribute"][0]] in q["question"] for q in qa if q["question_type"] == "single-verify"
        )
    assert manifest["splits"]["train"]["question_types"] == ["single-query", "single-verify"]
    total = sum(manifest["splits"][s]["num_qa"] for s in ("train", "val", "test"))
    assert total == 7 * 7


def test_a_patient_s_exams_share_the_split_its_id_hashes_to(built):
    _, out, manifest = built
    splits = {}
    for sample in read_shards(out, manifest):
        meta = sample["json"]
        assert meta["split"] == patient_split("code15", meta["patient_id"], (0.8, 0.1, 0.1))
        splits.setdefault(meta["patient_id"], set()).add(meta["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits[8]) == 1 and len(splits[7]) == 1


def test_a_second_build_is_byte_identical_and_the_first_is_kept(built, tmp_path):
    root, out, manifest = built
    again = CODE15LabelQA(root, max_samples_per_shard=3).build(tmp_path / "again")
    digests = [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]
    assert [s["sha256"] for split in again["splits"].values() for s in split["shards"]] == digests
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert CODE15LabelQA(root, max_samples_per_shard=3).build(out) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    first = next(out.glob("*.tar"))
    assert hashlib.sha256(first.read_bytes()).hexdigest() in digests


def test_limit_and_question_types_choose_what_is_written(built, tmp_path):
    root, _, _ = built
    manifest = CODE15LabelQA(root, question_types=["single-query"], limit=3).build(tmp_path)
    samples = read_shards(tmp_path, manifest)
    assert sorted(s["json"]["record_id"] for s in samples) == [1001, 1002, 1003]
    assert all(len(s["json"]["qa"]) == 1 for s in samples)


def test_bad_layouts_are_named(tmp_path):
    root = write_code15(tmp_path / "bad", bad_flag=True)
    with pytest.raises(
        CODE15Error, match=r"exams.csv: line 10 \(exam_id 9\) has RBBB='maybe'; expected True or False"
    ):
        CODE15LabelQA(root).build(tmp_path / "out")
    (root / "exams.csv").write_text("exam_id,patient_id\n1,1\n")
    with pytest.raises(CODE15Error, match=r"has no column\(s\) \['trace_file', '1dAVb'"):
        CODE15LabelQA(root).build(tmp_path / "out")
    with pytest.raises(CODE15Error, match=r"exams\.csv not found: give root the folder"):
        CODE15LabelQA(tmp_path / "nowhere").build(tmp_path / "out")
    with pytest.raises(CODE15Error, match="question_types"):
        CODE15LabelQA(root, question_types=["single-choose"])


def test_code15_is_an_ecglm_source():
    registry = discover(groups=["ecglm.sources"])
    assert registry.class_path("ecglm.sources", "code15") == "ecglm.data.code15.CODE15LabelQA"
    assert not [f for f in registry.failures if f.plugin.group == "ecglm.sources"]
    assert {"synthetic", "ecgqa-mixture", "ecg-instruct-images", "code15"} <= set(
        registry.names("ecglm.sources")
    )


def _docs_block(language: str) -> str:
    """The first ``language`` code block of docs/data.md's "Adding a dataset" section."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    section = text.split("### Adding a dataset", 1)[1].split("\n### ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_adding_a_dataset_walk_through_builds_from_its_yaml(tmp_path, monkeypatch):
    import sys
    import types

    import wfdb
    import yaml

    from ecg_exports import LEADS as EXPORT_LEADS
    from ecg_exports import dicom_group, ecg_signal, to_raw, write_dicom
    from ecglm.plugins import Plugin, Registry, build_component, resolve_class_paths

    module = types.ModuleType("my_hospital_source")
    exec(compile(_docs_block("python"), "docs/data.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "my_hospital_source", module)
    root = tmp_path / "exports"
    root.mkdir()
    rows = []
    for k in range(6):
        signal = ecg_signal(10.0, 500, seed=k)
        if k % 2:
            write_dicom(root / f"ecg{k}.dcm", [dicom_group(to_raw(signal, 2.5), EXPORT_LEADS, 500)])
            name = f"ecg{k}.dcm"
        else:
            wfdb.wrsamp(f"ecg{k}", fs=500, units=["mV"] * 12, sig_name=EXPORT_LEADS, p_signal=signal,
                        fmt=["16"] * 12, write_dir=str(root))  # fmt: skip
            name = f"ecg{k}.hea"
        rows.append({"file": name, "patient": f"p{k // 2}", "finding": ["normal", "AF", "LBBB"][k % 3]})
    with open(root / "ecgs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "patient", "finding"])
        writer.writeheader()
        writer.writerows(rows)
    config = yaml.safe_load(_docs_block("yaml"))
    config["builder"]["init_args"]["root"] = str(root)
    registry = Registry(plugins={"ecglm.sources": {}})
    registry.plugins["ecglm.sources"]["hospital-exports"] = Plugin(
        "ecglm.sources", "hospital-exports", "my_hospital_source:HospitalExports", "my-hospital", "1.0"
    )  # as the entry point in the docs' pyproject.toml registers it

    # What `ecglm shard --config` does with it (tests/test_shard_cli.py runs the command on shards/*.yaml).
    config = resolve_class_paths(config, registry)
    assert config["builder"]["class_path"] == "my_hospital_source.HospitalExports"
    manifest = build_component(config["builder"], "ecglm.sources", registry).build(tmp_path / "shards")
    samples = read_shards(tmp_path / "shards", manifest)
    assert sorted(s["json"]["record_id"] for s in samples) == [f"ecg{k}" for k in range(6)]
    for sample in samples:
        k = int(sample["json"]["record_id"][3:])
        assert sample["json"]["qa"][0]["answer"] == ["normal", "AF", "LBBB"][k % 3]
        assert sample["json"]["split"] == patient_split("hospital-exports", f"p{k // 2}", (0.8, 0.1, 0.1))
        expected = scipy_signal.resample_poly(ecg_signal(10.0, 500, seed=k), 1, 2, axis=0).T
        expected = (expected - expected.mean(axis=1, keepdims=True)) / expected.std(axis=1, keepdims=True)
        np.testing.assert_allclose(sample["ecg.npy"].astype(np.float64), expected, atol=0.02)
    assert manifest["dataset"] == "hospital-exports" and manifest["splits"]["train"]["question_types"] == [
        "finding"
    ]


def test_a_damaged_shard_is_written_again_alone(built, tmp_path):
    root, _, _ = built
    manifest = CODE15LabelQA(root, max_samples_per_shard=2).build(tmp_path)
    shards = sorted(tmp_path.glob("*.tar"))
    original = {p.name: p.read_bytes() for p in shards}
    damaged = shards[1]
    damaged.write_bytes(original[damaged.name][:-600])
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    assert CODE15LabelQA(root, max_samples_per_shard=2).build(tmp_path) == manifest
    assert {p.name: p.read_bytes() for p in shards} == original
    assert [p.name for p in shards if p.stat().st_mtime_ns != stamps[p.name]] == [damaged.name]
