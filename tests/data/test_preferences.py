"""Preference-pair shards (DPO) from JSON lines and from ``ecglm evaluate`` predictions: ECGs taken from
a shard set or read from ECG files, bad lines named by file:line and counted, pairs keeping their
ECG's split."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecglm.data.preferences import PreferencePairs, PreferencePairsError
from ecglm.data.shards import read_manifest
from ecglm.data.stream.qa import expand_qa
from ecglm.data.synthetic import SyntheticHeartQA

Q = "Is the rhythm regular or irregular?"


def ecg_signal(seed: int, fs: int, n: int) -> np.ndarray:
    """``(n, 12)`` in mV: per lead a 1.2 Hz fundamental with harmonics, amplitudes drawn per lead."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    out = np.zeros((n, 12))
    for lead in range(12):
        for harmonic in (1, 2, 3, 5):
            out[:, lead] += rng.uniform(0.05, 0.6) / harmonic * np.sin(2 * np.pi * 1.2 * harmonic * t + lead)
    return out


def write_record(path: Path, x: np.ndarray, names: list[str], fs: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(names)
    wfdb.wrsamp(path.name, fs=fs, units=["mV"] * n, sig_name=names, p_signal=x, fmt=["16"] * n,
                adc_gain=[1000.0] * n, baseline=[0] * n, write_dir=str(path.parent))  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory, ptb_record) -> Path:
    folder = tmp_path_factory.mktemp("source") / "synthetic"  # beats cut from a real record: fast
    SyntheticHeartQA(
        num_train=3, num_val=1, num_test=2, max_samples_per_shard=2, beat_source=str(ptb_record)
    ).build(folder)
    return folder


def _read(folder: Path, split: str) -> dict[str, dict]:
    """Every sample of a split: ``{key: {"ecg": array, "json": meta}}``."""
    out: dict[str, dict] = {}
    for entry in read_manifest(folder)["splits"][split]["shards"]:
        with tarfile.open(folder / entry["path"]) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                value = np.load(io.BytesIO(data)) if field == "ecg.npy" else json.loads(data)
                out.setdefault(key, {})["ecg" if field == "ecg.npy" else "json"] = value
    return out


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _pair(record: str, chosen: str = "irregular", rejected: str = "regular", **extra) -> dict:
    return {"record": record, "question": Q, "chosen": chosen, "rejected": rejected, **extra}


def test_pairs_on_shard_records_keep_their_ecg_and_split_and_bad_lines_are_named_and_counted(
    source, tmp_path, caplog
):
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [
            _pair("synthetic_train_000000", question_type="rhythm"),
            _pair("synthetic_train_000000", "fast", "slow", question="How fast?", answer="fast"),
            _pair("synthetic_train_000002_qa1"),  # a QA key, as predictions write them
            "",  # blank lines are not lines
            "{not json",
            _pair("synthetic_train_000001", "regular", "regular"),
            {"record": "synthetic_train_000001", "question": Q, "chosen": "regular"},
            _pair("synthetic_train_000099"),
            _pair("synthetic_test_000000", split="train"),  # a held-out ECG cannot become training data
            _pair("synthetic_val_000000", split="val"),
            _pair("synthetic_train_000000", question_type="rhythm"),  # the first line again
            ["a", "list"],
        ],
    )
    with caplog.at_level(logging.WARNING, logger="ecglm.data.preferences"):
        manifest = PreferencePairs(pairs=[str(pairs)], ecg_shards=str(source)).build(tmp_path / "out")
    assert manifest["skipped"] == {
        "bad split": 1,
        "chosen equals rejected": 1,
        "missing field": 1,
        "not JSON": 1,
        "not an object": 1,
        "unknown record": 1,
    }
    assert manifest["unused"] == {"duplicate": 1}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 6
    for line, reason in [(5, "not JSON"), (6, "chosen equals rejected"), (7, "missing field"),
                         (8, "unknown record"), (9, "bad split"), (12, "not an object")]:  # fmt: skip
        assert any(m.startswith(f"skipped: {pairs}:{line}: {reason}") for m in warned), (line, warned)
    assert any("'rejected'" in m and ":7:" in m for m in warned)
    assert any("'synthetic_train_000099'" in m for m in warned)

    splits = manifest["splits"]
    assert [splits[s]["num_ecgs"] for s in ("train", "val", "test")] == [2, 1, 0]
    assert [splits[s]["num_qa"] for s in ("train", "val", "test")] == [3, 1, 0]
    assert splits["train"]["datasets"] == {"synthetic-heart-qa": 3}
    assert manifest["preprocessing"] == read_manifest(source)["preprocessing"]

    written, original = _read(tmp_path / "out", "train"), _read(source, "train")
    assert sorted(written) == ["synthetic_train_000000", "synthetic_train_000002"]
    for key in written:  # the very ECG of the source record, its labels kept
        np.testing.assert_array_equal(written[key]["ecg"], original[key]["ecg"])
        assert written[key]["json"]["labels"] == original[key]["json"]["labels"]
    assert written["synthetic_train_000000"]["json"]["qa"] == [
        {"question": Q, "answer": "irregular", "chosen": "irregular", "rejected": "regular",
         "question_type": "rhythm"},
        {"question": "How fast?", "answer": "fast", "chosen": "fast", "rejected": "slow",
         "question_type": "unknown"},
    ]  # fmt: skip

    # Through the loader's QA expansion and the collator: DPO's batch fields.
    samples = [{"__key__": k, "ecg.npy": v["ecg"], "json": v["json"]} for k, v in sorted(written.items())]
    items = list(expand_qa(iter(samples)))
    assert [(i["key"], i["chosen"], i["rejected"]) for i in items] == [
        ("synthetic_train_000000_qa0", "irregular", "regular"),
        ("synthetic_train_000000_qa1", "fast", "slow"),
        ("synthetic_train_000002_qa0", "irregular", "regular"),
    ]

    # Built again from the same inputs: left as it is; a changed input rebuilds.
    before = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    PreferencePairs(pairs=[str(pairs)], ecg_shards=str(source)).build(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == before
    _write(pairs, [_pair("synthetic_train_000001")])
    rebuilt = PreferencePairs(pairs=[str(pairs)], ecg_shards=str(source)).build(tmp_path / "out")
    assert rebuilt["splits"]["train"]["num_qa"] == 1 and rebuilt["skipped"] == {}


def test_pairs_from_predictions_are_the_models_wrong_answers_against_the_references(source, tmp_path):
    def prediction(key, condition, reference, answer, **extra):
        return {"key": key, "dataset": "synthetic-heart-qa", "question_type": "rhythm",
                "condition": condition, "reference": reference, "prediction": answer, "question": Q,
                **extra}  # fmt: skip

    seed0 = _write(
        tmp_path / "predictions_seed0.jsonl",
        [
            prediction("synthetic_test_000000_qa1", "ecg", "regular", "irregular", correct=False),
            prediction("synthetic_test_000001_qa1", "ecg", "irregular", "irregular", correct=True),
            prediction("synthetic_test_000001_qa1", "shuffled_ecg", "irregular", "regular", donor="x"),
            prediction(
                "synthetic_train_000001_qa0", "ecg", "normal", "Normal."
            ),  # right, as the metric reads it
            prediction("synthetic_train_000001_qa1", "ecg", "regular", " The rhythm is irregular. "),
            {"key": "synthetic_test_000001_qa0", "condition": "ecg", "reference": "fast"},
        ],
    )
    seed1 = _write(
        tmp_path / "predictions_seed1.jsonl",
        [prediction("synthetic_test_000000_qa1", "ecg", "regular", "irregular", correct=False)],
    )
    builder = PreferencePairs(predictions=[str(seed0), str(seed1)], ecg_shards=str(source))
    manifest = builder.build(tmp_path / "out")
    assert manifest["skipped"] == {"missing field": 1}
    assert manifest["unused"] == {"correct answer": 2, "duplicate": 1, "other condition": 1}
    # Pairs stay in their ECG's split: held-out questions' mistakes are never trained on.
    assert [manifest["splits"][s]["num_qa"] for s in ("train", "val", "test")] == [1, 0, 1]
    test = _read(tmp_path / "out", "test")
    assert test["synthetic_test_000000"]["json"]["qa"] == [
        {
            "question": Q,
            "answer": "regular",
            "chosen": "regular",
            "rejected": "irregular",
            "question_type": "rhythm",
        }
    ]
    train = _read(tmp_path / "out", "train")
    assert train["synthetic_train_000001"]["json"]["qa"][0]["rejected"] == "The rhythm is irregular."


def test_right_answers_become_pairs_against_another_answer_of_the_question(source, tmp_path):
    """right_answers: each right answer is a pair too, the reference chosen and another reference answer
    of the same question rejected (picked by a hash of the key: the same on every build); a question
    with one answer in the predictions gives no such pair, and is counted."""
    hr = "Is the heart rate in this ECG bradycardia, normal or tachycardia?"

    def prediction(key, question, reference, answer):
        return {"key": key, "question_type": "x", "condition": "ecg", "reference": reference,
                "prediction": answer, "question": question, "correct": reference == answer}  # fmt: skip

    lines = [
        prediction("synthetic_train_000000_qa0", hr, "normal", "normal"),
        prediction("synthetic_train_000001_qa0", hr, "tachycardia", "normal"),  # the one mistake
        prediction("synthetic_train_000002_qa0", hr, "bradycardia", "bradycardia"),
        prediction("synthetic_train_000002_qa1", hr, "tachycardia", "tachycardia"),
        prediction("synthetic_train_000000_qa1", Q, "regular", "regular"),  # Q's only answer here
    ]
    path = _write(tmp_path / "predictions_seed0.jsonl", lines)
    plain = PreferencePairs(predictions=[str(path)], ecg_shards=str(source)).build(tmp_path / "plain")
    assert plain["splits"]["train"]["num_qa"] == 1 and plain["unused"] == {"correct answer": 4}
    builder = PreferencePairs(predictions=[str(path)], ecg_shards=str(source), right_answers=True)
    manifest = builder.build(tmp_path / "both")
    assert manifest["splits"]["train"]["num_qa"] == 4
    assert manifest["unused"] == {"right answer, no other answer": 1}
    train = _read(tmp_path / "both", "train")
    pairs = {key: [(qa["chosen"], qa["rejected"]) for qa in v["json"]["qa"]] for key, v in train.items()}
    assert pairs["synthetic_train_000001"] == [("tachycardia", "normal")]  # the mistake, as before
    right = [*pairs["synthetic_train_000000"], *pairs["synthetic_train_000002"]]
    assert [chosen for chosen, _ in right] == ["normal", "bradycardia", "tachycardia"]
    assert all(rejected in {"normal", "bradycardia", "tachycardia"} - {chosen} for chosen, rejected in right)
    again = PreferencePairs(predictions=[str(path)], ecg_shards=str(source), right_answers=True)
    again.build(tmp_path / "again")
    rebuilt = _read(tmp_path / "again", "train")
    assert {key: v["json"]["qa"] for key, v in rebuilt.items()} == {
        key: v["json"]["qa"] for key, v in train.items()
    }


def test_pairs_on_ecg_files_are_read_and_prepared_as_the_shards_are(tmp_path):
    fs, seconds = 500, 12
    record = tmp_path / "records" / "r1"
    names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    write_record(record, ecg_signal(3, fs, fs * seconds), names, fs)
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [
            {"ecg": str(record), "question": Q, "chosen": "regular", "rejected": "irregular", "split": "val"},
            {"ecg": str(tmp_path / "missing"), "question": Q, "chosen": "regular", "rejected": "irregular"},
            {"ecg": str(record), "record": "x", "question": Q, "chosen": "regular", "rejected": "irregular"},
        ],
    )
    manifest = PreferencePairs(pairs=[str(pairs)]).build(tmp_path / "out")
    assert manifest["skipped"] == {"missing field": 1, "unreadable ECG": 1}
    assert (
        manifest["preprocessing"]["sampling_rate"] == 250 and manifest["preprocessing"]["num_samples"] == 2500
    )
    (sample,) = _read(tmp_path / "out", "val").values()
    ecg = sample["ecg"].astype(np.float64)
    assert ecg.shape == (12, 2500)
    # Per-lead z-scored, and lead II is the recording's lead II resampled to 250 Hz (its first 10 s).
    np.testing.assert_allclose(ecg.mean(1), 0, atol=1e-2)
    np.testing.assert_allclose(ecg.std(1), 1, atol=1e-2)
    lead_ii = ecg_signal(3, fs, fs * seconds)[: fs * 10 : 2, 1]
    assert np.corrcoef(ecg[1], lead_ii)[0, 1] > 0.99


def test_strict_stops_at_the_first_bad_line_and_no_usable_pair_is_an_error(source, tmp_path):
    pairs = _write(tmp_path / "pairs.jsonl", [_pair("synthetic_train_000000"), _pair("nope")])
    with pytest.raises(PreferencePairsError, match=rf"{pairs}:2: unknown record: 'nope'"):
        PreferencePairs(pairs=[str(pairs)], ecg_shards=str(source), strict=True).build(tmp_path / "a")
    bad = _write(tmp_path / "bad.jsonl", ["[]", _pair("nope")])
    with pytest.raises(PreferencePairsError, match=r"no usable preference pair .*'not an object': 1"):
        PreferencePairs(pairs=[str(bad)], ecg_shards=str(source)).build(tmp_path / "b")
    with pytest.raises(PreferencePairsError, match="needs `pairs`"):
        PreferencePairs()
    with pytest.raises(PreferencePairsError, match="give `ecg_shards`"):
        PreferencePairs(predictions=[str(pairs)])
