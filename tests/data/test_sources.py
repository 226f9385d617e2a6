"""Source readers (PTB-XL, MIMIC-IV-ECG, ECG-QA, PULSE) and the mixture builder, on tiny real layouts."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import wfdb
from scipy import signal

from ecglm.data.mixture import INDEX_NAME, ECGQAMixture
from ecglm.data.preprocess import LEADS, MissingLeadError, PreprocessConfig, preprocess_record
from ecglm.data.shards import read_manifest
from ecglm.data.sources import (
    iter_mimic,
    iter_ptbxl,
    mimic_split,
    ptbxl_split,
    pulse_image_record,
    read_ecgqa,
    read_mimic,
    read_ptbxl,
    read_pulse,
)

F16_ATOL = 2e-3  # float16 storage of z-scored values within a few units


def test_ptbxl_reader_parses_the_database_table(sources, layouts):
    records = read_ptbxl(sources["ptbxl_root"])

    assert sorted(records) == sorted(layouts.ptbxl_rows)
    first = records[1]
    assert (first.patient_id, first.split, first.source) == (15709, "train", "ptbxl")
    assert first.labels == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert first.path == sources["ptbxl_root"] / "records500/00000/00001_hr"
    assert records[1005].path == sources["ptbxl_root"] / "records500/01000/01005_hr"
    assert {i: r.split for i, r in records.items()} == {
        1: "train",
        2: "val",
        3: "test",
        4: "train",
        1005: "test",
    }
    assert [ptbxl_split(f) for f in range(1, 11)] == ["train"] * 8 + ["val", "test"]
    assert list(iter_ptbxl(sources["ptbxl_root"])) == list(records.values())  # the same, one row at a time


def test_mimic_reader_splits_by_patient(sources, layouts):
    records = read_mimic(sources["mimic_root"])

    assert sorted(records) == sorted(layouts.mimic_rows)
    record = records[40689238]
    assert record.path == sources["mimic_root"] / "files/p1000/p10000032/s40689238/40689238"
    assert record.report == "Sinus rhythm; Borderline ECG"
    assert records[41000001].report == "Sinus rhythm; Possible right atrial abnormality; Borderline ECG"
    assert records[40689238].split == records[41000001].split == mimic_split(10000032)
    bare = list(iter_mimic(sources["mimic_root"], reports=False))  # what the builder reads
    assert [r.report for r in bare] == [""] * len(records)
    assert [dataclasses.replace(r, report="") for r in records.values()] == bare
    shares = Counter(mimic_split(subject) for subject in range(10_000_000, 10_020_000))
    assert abs(shares["train"] / 20_000 - 0.8) < 0.01 and abs(shares["test"] / 20_000 - 0.1) < 0.01


def test_mimic_leads_come_out_in_canonical_order_by_name(sources):
    path = sources["mimic_root"] / "files/p1000/p10000032/s40689238/40689238"
    rec = wfdb.rdrecord(str(path))
    assert rec.sig_name[4:6] == ["aVF", "aVL"]  # MIMIC's own order

    out = preprocess_record(path, PreprocessConfig())
    # Reference: pick each canonical lead by name, resample 500 -> 250 Hz with scipy, z-score.
    ref = signal.resample_poly(rec.p_signal[:, [rec.sig_name.index(lead) for lead in LEADS]].T, 1, 2, axis=1)
    ref = (ref - ref.mean(axis=1, keepdims=True)) / ref.std(axis=1, keepdims=True)
    np.testing.assert_allclose(out.windows[0].astype(np.float64), ref, atol=F16_ATOL, rtol=1e-3)
    avl, avf = LEADS.index("aVL"), LEADS.index("aVF")
    assert np.abs(ref[avl] - ref[avf]).max() > 0.5  # the leads differ, so a positional read would fail


def test_mimic_nan_gap_interpolated_and_mostly_nan_record_dropped(sources):
    root = sources["mimic_root"]
    gap = preprocess_record(root / "files/p1000/p10000117/s42000002/42000002", PreprocessConfig())
    assert gap.drop_reason is None and np.isfinite(gap.windows.astype(np.float32)).all()

    mostly = preprocess_record(root / "files/p1000/p10000560/s43000003/43000003", PreprocessConfig())
    assert (mostly.drop_reason, mostly.windows) == ("nan_fraction", None)


def test_ecgqa_reader_follows_its_split_folders_and_variant(sources, layouts):
    samples = list(read_ecgqa(sources["ecgqa_root"], "ptbxl"))
    splits = Counter(split for split, _ in samples)
    assert splits == {"train": 4, "val": 1, "test": 3}  # "valid" -> "val"
    assert samples[0][1] == layouts.ecgqa_samples["ptbxl"]["train"][0]

    template = next(read_ecgqa(sources["ecgqa_root"], "mimic-iv-ecg", "template"))[1]
    assert template["question"].startswith("[template] ")
    with pytest.raises(ValueError, match="variant"):
        next(read_ecgqa(sources["ecgqa_root"], "ptbxl", "other"))


def test_pulse_images_map_to_signal_records_and_others_are_counted(sources):
    assert pulse_image_record("mimic_v4/files/p1000/p10000032/s40689238/40689238-0.png") == (
        "mimic-iv-ecg",
        40689238,
    )
    assert pulse_image_record("ptb-xl/00002_hr-0.png") == ("ptbxl", 2)
    assert pulse_image_record("code15_v4/1234567-0.png") is None

    skipped = Counter()
    items = list(read_pulse(sources["pulse_json"], skipped))
    assert [(i.source, i.record_id) for i in items] == [("mimic-iv-ecg", 40689238), ("ptbxl", 2)]
    assert items[0].conversation == [
        {
            "question": "What is the rhythm of this ECG?",
            "answer": "The ECG shows sinus rhythm at about 72 bpm.",
        },
        {
            "question": "Is there any sign of atrial abnormality?",
            "answer": "Possible right atrial abnormality.",
        },
    ]
    assert skipped == {"pulse_no_signal_source:code15_v4": 1, "pulse_no_signal_source:cpsc": 1}


def test_pulse_reader_names_the_file_when_it_is_not_a_list(tmp_path):
    path = tmp_path / "ECGInstruct.json"
    path.write_text('{"image": "ptb-xl/00002_hr-0.png"}')
    with pytest.raises(ValueError, match=f"{path} must hold a JSON list"):
        next(read_pulse(path))
    path.write_text('[{"image": "ptb-xl/00002_hr-0.png", "conversations": []}, {"image": ')
    with pytest.raises(ValueError, match=f"{path}: invalid JSON"):
        list(read_pulse(path))


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("mixture")
    return out_dir, ECGQAMixture(**sources, max_samples_per_shard=2).build(out_dir)


def _read(out_dir: Path, shards: list[dict]) -> list[dict]:
    urls = [str(out_dir / shard["path"]) for shard in shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()) if urls else []


def test_manifest_counts_datasets_drops_and_preprocessing(built):
    out_dir, manifest = built

    assert manifest == read_manifest(out_dir)
    splits = manifest["splits"]
    assert splits["train"]["datasets"] == {"ecgqa-mimic-iv-ecg": 1, "ecgqa-ptbxl": 3, "pulse-ecg-instruct": 1}
    assert splits["val"]["datasets"] == {"ecgqa-mimic-iv-ecg": 1, "ecgqa-ptbxl": 1, "pulse-ecg-instruct": 1}
    assert splits["test"]["datasets"] == {"ecgqa-mimic-iv-ecg": 1, "ecgqa-ptbxl": 2}
    assert splits["train"]["question_types"] == ["instruct", "single-choose", "single-query", "single-verify"]
    assert splits["train"]["comparison"]["num_qa"] == 2
    assert {k: v for k, v in manifest["preprocessing"].items() if k in ("sampling_rate", "num_samples")} == {
        "sampling_rate": 250,
        "num_samples": 2500,
    }
    assert manifest["preprocessing"]["normalisation"] == "zscore"
    assert manifest["dropped"] == {"nan_fraction": 1}
    assert list(manifest["dropped_records"]) == ["mimic-iv-ecg/43000003"]
    assert manifest["dropped_qa"] == {
        "pulse_no_signal_source:code15_v4": 1,
        "pulse_no_signal_source:cpsc": 1,
        "record_nan_fraction": 1,
        "unknown_ecg_id": 1,
    }


def test_samples_store_each_ecg_once_with_all_its_qa(built):
    out_dir, manifest = built
    train = {s["__key__"]: s for s in _read(out_dir, manifest["splits"]["train"]["shards"])}

    ptb = train["ecgqa-ptbxl_ptbxl_00000001_w0"]
    assert ptb["ecg.npy"].dtype == np.float16 and ptb["ecg.npy"].shape == (12, 2500)
    meta = ptb["json"]
    assert (meta["dataset"], meta["record_id"], meta["patient_id"], meta["split"]) == (
        "ecgqa-ptbxl",
        "ptbxl/00001",
        15709,
        "train",
    )
    assert [qa["answer"] for qa in meta["qa"]] == [["no"], ["none"]]
    assert sum(len(s["json"]["qa"]) for s in train.values()) == manifest["splits"]["train"]["num_qa"]

    pulse = train["pulse-ecg-instruct_mimic-iv-ecg_40689238_w0"]["json"]
    assert len(pulse["conversations"][0]) == 2
    assert pulse["qa"] == [{**pulse["conversations"][0][0], "question_type": "instruct"}]

    comparison = _read(out_dir, manifest["splits"]["train"]["comparison"]["shards"])
    pair = next(s for s in comparison if s["json"]["dataset"] == "ecgqa-ptbxl")
    assert pair["ecg.npy"].shape == (2, 12, 2500) and pair["json"]["ecg_ids"] == [1, 4]
    np.testing.assert_array_equal(pair["ecg.npy"][0], ptb["ecg.npy"])
    assert manifest["patient_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}


def test_builder_streams_through_the_datamodule(built, tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.data.datamodule import ECGQADataModule
    from ecglm.prompts import ChatTemplate

    out_dir, manifest = built
    dm = ECGQADataModule(str(out_dir), eval_batch_size=2)
    dm.setup("test")
    dm.attach(ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir)), num_ecg_tokens=4)
    batches = list(dm.test_dataloader())

    keys = [key for batch in batches for key in batch.key]
    assert len(keys) == len(set(keys)) == manifest["splits"]["test"]["num_qa"] == 3
    assert all(batch.ecg.shape[1:] == (12, 2500) for batch in batches)
    datasets = sorted(d for batch in batches for d in batch.dataset)
    assert datasets == ["ecgqa-mimic-iv-ecg", "ecgqa-ptbxl", "ecgqa-ptbxl"]
    assert dm.eval_groups("test")[0] == ["ecgqa-mimic-iv-ecg", "ecgqa-ptbxl"]


def test_rebuild_is_skipped_when_current_and_redone_when_params_change(sources, built, tmp_path):
    out_dir, manifest = built
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert ECGQAMixture(**sources, max_samples_per_shard=2).build(out_dir) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == stamps

    again = ECGQAMixture(**sources, max_samples_per_shard=2, num_workers=2).build(tmp_path / "parallel")
    assert _shas(again) == _shas(manifest)  # byte-identical, whatever the workers
    shas = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]

    minmax = ECGQAMixture(**sources, max_samples_per_shard=2, normalization="minmax").build(
        tmp_path / "parallel"
    )
    assert minmax["preprocessing"]["normalisation"] == "minmax"
    assert [s["sha256"] for s in minmax["splits"]["train"]["shards"]] != shas
    assert read_manifest(tmp_path / "parallel") == minmax

    shard = tmp_path / "parallel" / minmax["splits"]["val"]["shards"][0]["path"]
    shard.write_bytes(b"truncated")  # a damaged shard is noticed by its sha256 and rebuilt
    rebuilt = ECGQAMixture(**sources, max_samples_per_shard=2, normalization="minmax").build(
        tmp_path / "parallel"
    )
    assert rebuilt == minmax and shard.stat().st_size > 1000


def _all(info: dict) -> list[dict]:
    """The single-ECG and comparison shards of one split."""
    return info["shards"] + info["comparison"]["shards"]


def _shas(manifest: dict) -> list[tuple[str, str]]:
    return [(s["path"], s["sha256"]) for info in manifest["splits"].values() for s in _all(info)]


def test_each_shard_holds_one_dataset_named_in_its_file_name(built):
    out_dir, manifest = built

    for split, info in manifest["splits"].items():
        for kind, shards in (("", info["shards"]), ("comparison-", info["comparison"]["shards"])):
            for shard in shards:
                (dataset,) = shard["datasets"]
                assert re.fullmatch(rf"{split}-{kind}{dataset}-\d{{6}}\.tar", shard["path"]), shard["path"]
                samples = _read(out_dir, [shard])
                assert {s["json"]["dataset"] for s in samples} == {dataset}
                assert len(samples) == shard["num_samples"] <= 2
    train = [s["path"] for s in manifest["splits"]["train"]["shards"]]
    assert train == [
        "train-ecgqa-mimic-iv-ecg-000000.tar",
        "train-ecgqa-ptbxl-000000.tar",
        "train-pulse-ecg-instruct-000000.tar",
    ]
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".tar")) == ["manifest.json"]
    assert not (out_dir / INDEX_NAME).exists()


def test_shards_close_by_size_and_stale_shards_are_removed(sources, built, tmp_path):
    built_dir, by_count = built
    (tmp_path / "train-000000.tar").write_bytes(b"a shard of the one-shard-per-split layout")
    manifest = ECGQAMixture(**sources, shard_size_mb=0.05, max_samples_per_shard=None).build(tmp_path)

    assert (manifest["params"]["shard_size_mb"], manifest["params"]["max_samples_per_shard"]) == (0.05, None)
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    # One 12 x 2500 float16 ECG is 60 KB, past 50 KB: every shard is closed after its first sample.
    assert all(s["num_samples"] == 1 and s["bytes"] >= 50_000 for s in shards)
    assert len(shards) == sum(info["num_ecgs"] for info in manifest["splits"].values())
    for split, info in manifest["splits"].items():  # the same samples in the same order, cut differently
        expected = by_count["splits"][split]
        keys = [s["__key__"] for s in _read(tmp_path, _all(info))]
        assert keys == [s["__key__"] for s in _read(built_dir, _all(expected))]
        counts = ("num_ecgs", "num_qa", "num_conversations", "datasets", "question_types")
        assert {k: info[k] for k in counts} == {k: expected[k] for k in counts}
    assert {k: v for k, v in manifest.items() if k not in ("params", "splits")} == {
        k: v for k, v in by_count.items() if k not in ("params", "splits")
    }
    assert not (tmp_path / "train-000000.tar").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", *(s["path"] for info in manifest["splits"].values() for s in _all(info))]
    )


def test_missing_lead_fails_the_build_naming_the_record_unless_dropped(tmp_path, layouts):
    ptbxl = layouts.make_ptbxl(tmp_path / "ptb-xl", drop_lead={3: "V4"})
    ecgqa = layouts.make_ecgqa(tmp_path / "ecgqa")
    args = {"ptbxl_root": ptbxl, "ecgqa_root": ecgqa, "ecgqa_sources": ("ptbxl",)}
    with pytest.raises(MissingLeadError, match=r"ptbxl/00003.*V4"):
        ECGQAMixture(**args).build(tmp_path / "out")
    assert not (tmp_path / "out" / INDEX_NAME).exists()  # removed after a failed build too

    manifest = ECGQAMixture(**args, missing_leads="drop").build(tmp_path / "out")
    assert manifest["dropped"] == {"missing_lead": 1}
    assert manifest["splits"]["test"]["datasets"] == {"ecgqa-ptbxl": 1}

    zero = ECGQAMixture(**args, missing_leads="zero").build(tmp_path / "zero")
    assert zero["dropped"] == {} and zero["splits"]["test"]["datasets"] == {"ecgqa-ptbxl": 2}


def test_index_counts_odd_ids_unknown_records_and_patient_overlap(tmp_path, layouts):
    ptbxl, ecgqa = layouts.make_ptbxl(tmp_path / "ptb-xl"), layouts.make_ecgqa(tmp_path / "ecgqa")
    train = ecgqa / "ptbxl" / "paraphrased" / "train" / "00000.json"
    first = layouts.ecgqa_samples["ptbxl"]["train"][0]
    extra = [
        [3],
        [1, 3, 4],
        [1, 99999],
        [],
    ]  # a test-split ECG asked in train; 3 ids; unknown in a pair; none
    train.write_text(json.dumps(json.loads(train.read_text()) + [dict(first, ecg_id=ids) for ids in extra]))
    pulse = layouts.make_pulse(tmp_path / "ECGInstruct.json")
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    unknown = {"image": "ptb-xl/00077_hr-0.png", "conversations": turns}
    pulse.write_text(json.dumps([*json.loads(pulse.read_text()), unknown]))

    args = {"ptbxl_root": ptbxl, "ecgqa_root": ecgqa, "ecgqa_sources": ("ptbxl",), "pulse_json": pulse}
    manifest = ECGQAMixture(**args).build(tmp_path / "out")

    assert manifest["patient_overlap"] == {"train-val": 0, "train-test": 1, "val-test": 0}
    assert manifest["dropped_qa"] == {
        "bad_ecg_id": 2,
        "pulse_no_signal_source:code15_v4": 1,
        "pulse_no_signal_source:cpsc": 1,
        "pulse_source_not_given:mimic-iv-ecg": 1,
        "pulse_unknown_record": 1,
        "unknown_ecg_id": 2,
    }
    assert manifest["splits"]["train"]["datasets"] == {"ecgqa-ptbxl": 4}
    assert manifest["splits"]["val"]["datasets"] == {"ecgqa-ptbxl": 1, "pulse-ecg-instruct": 1}


def test_ptbxl_table_without_its_columns_is_refused_naming_them(tmp_path):
    (tmp_path / "ptbxl_database.csv").write_text("id,patient,fold\n1,2,3\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"ptbxl_database\.csv has no column\(s\) \['ecg_id', 'patient_id', 'strat_fold'\]"
    ):
        read_ptbxl(tmp_path)


def test_pulse_conversation_is_trained_on_every_answer(built, tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.data.datamodule import QACollator
    from ecglm.data.stream import BadInput, CheckedQA
    from ecglm.prompts import IGNORE_INDEX, ChatTemplate

    out_dir, manifest = built
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    sample = next(s for s in _read(out_dir, shards) if "40689238" in s["__key__"] and "pulse" in s["__key__"])
    items = list(CheckedQA(BadInput({}))._pairs(sample))
    assert [len(item.get("turns", [])) for item in items] == [2]
    assert items[0]["answer"] == "The ECG shows sinus rhythm at about 72 bpm."  # what evaluation scores

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = QACollator(ChatTemplate(tokenizer), 1)(items)
    labels = batch.labels[0]
    supervised = tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert supervised == (
        "The ECG shows sinus rhythm at about 72 bpm.<|im_end|>\n"
        "Possible right atrial abnormality.<|im_end|>\n"
    )
    assert "Is there any sign of atrial abnormality?" in tokenizer.decode(batch.input_ids[0])
    generation = QACollator(ChatTemplate(tokenizer), 1, for_generation=True)(items)
    assert "atrial abnormality" not in tokenizer.decode(generation.input_ids[0])  # asked its first question


def test_comparison_questions_stream_with_two_ecgs_in_their_row(built, tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.data.datamodule import ECGQADataModule
    from ecglm.prompts import ChatTemplate

    out_dir, _ = built
    formatter = ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir))
    dm = ECGQADataModule(str(out_dir), batch_size=7, num_workers=0, shuffle_buffer=0)  # 5 single + 2 pairs
    dm.setup("fit")
    dm.attach(formatter, num_ecg_tokens=4)
    assert dm.qa_counts("train") == {"ecgqa-mimic-iv-ecg": 2, "ecgqa-ptbxl": 4, "pulse-ecg-instruct": 1}
    (batch,) = list(dm.train_dataloader())

    counts = batch.ecg_counts.tolist()
    pairs = [k for k, n in zip(batch.key, counts, strict=True) if n == 2]
    assert sorted(batch.question_type[i][:10] for i, n in enumerate(counts) if n == 2) == ["comparison"] * 2
    assert len(pairs) == 2 and all("_w" not in k for k in pairs)  # comparison keys name both ECG ids
    assert batch.ecg.shape == (9, 12, 2500)
    assert batch.ecg_mask.sum(1).tolist() == [4 * n for n in counts]
    row = counts.index(2)
    text = formatter.tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool()])
    assert "ECG 1: " in text and "ECG 2: " in text

    single = ECGQADataModule(str(out_dir), batch_size=5, include_comparison=False)
    with pytest.warns(UserWarning, match=r"comparison \(two-ECG\) questions, \{'train': 2\}"):
        single.setup("fit")
    single.attach(formatter, num_ecg_tokens=4)
    assert [b.ecg_counts.tolist() for b in single.train_dataloader()] == [[1] * 5]
