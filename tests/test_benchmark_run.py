"""``ecglm benchmark run``: a tiny random image model answers ECGBench fixtures (images drawn by
ecglm's renderer) end to end, resumes a run cut short, answers the controls, and is scored."""

from __future__ import annotations

import json

import pytest

from ecglm.commands import main
from ecglm.testing.benchmark_fixtures import ecgbench_item, random_walk_ecgs, write_ecgbench


@pytest.fixture(scope="module")
def ecgbench(tmp_path_factory):
    """ptb-test and mmmu-ecg in ECGBench's layout, three ECGs drawn by ecglm's renderer."""
    images = {f"ptb-xl/{i}.png": signal for i, signal in enumerate(random_walk_ecgs(3))}
    ptb = [
        ecgbench_item(i, f"ptb-xl/{i % 3}.png", "Which diagnostic classes?", g)
        for i, g in enumerate(["NORM", "MI; STTC", "NORM", "CD", "HYP"])
    ]
    mmmu = [
        ecgbench_item(i, f"ptb-xl/{i % 3}.png", "Which rhythm? A. sinus B. AF", g)
        for i, g in enumerate("ABA")
    ]
    subsets = {"ptb-test": ptb, "mmmu-ecg": mmmu}
    return write_ecgbench(tmp_path_factory.mktemp("ECGBench"), subsets, images)


def test_run_answers_in_pulse_s_layout_resumes_and_scores(image_bundle, ecgbench, tmp_path):
    path, llm = image_bundle
    out = tmp_path / "preds"
    args = ["benchmark", "run", "--model", str(path), "--data", str(ecgbench), "--out", str(out)]
    args += [
        "--override",
        f"backbone.model={llm}",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*args, "--controls", "blank"]) == 0
    rows = [json.loads(line) for line in (out / "ptb-test.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[1]["prompt"] == "<image>\nWhich diagnostic classes?" and isinstance(rows[1]["text"], str)
    assert set(rows[0]["label_scores"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert len((out / "ptb-test.blank.jsonl").read_text().splitlines()) == 5
    assert len((out / "mmmu-ecg.jsonl").read_text().splitlines()) == 3
    # Killed midway: two whole lines and a cut one; the rerun answers the three missing items only.
    lines = (out / "ptb-test.jsonl").read_text().splitlines()
    (out / "ptb-test.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    assert main(args) == 0
    again = [json.loads(line) for line in (out / "ptb-test.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in again] == ["0", "1", "2", "3", "4"]
    assert again[:2] == rows[:2]
    assert [r["text"] for r in again[2:]] == [r["text"] for r in rows[2:]]  # greedy: the same answers
    scores = tmp_path / "scores.json"
    score = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--out", str(scores)]
    assert main([*score, "--scoring", "strict"]) == 0
    ptb = json.loads(scores.read_text())["subsets"]["ptb-test"]
    assert ptb["auc_from"] == "label_scores" and ptb["answers"] == 5
    assert "model_minus_blank" in ptb["gaps"]


def test_run_refuses_a_folder_without_ecgbench_naming_the_hub_dataset(tmp_path, capsys):
    assert (
        main(
            [
                "benchmark",
                "run",
                "--model",
                str(tmp_path),
                "--data",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "PULSE-ECG/ECGBench" in capsys.readouterr().err


def test_shuffled_control_gives_every_item_another_item_s_picture_once():
    from pathlib import Path

    from ecglm.benchmarks import Item
    from ecglm.benchmarks.running import images_for

    for n in range(2, 12):
        items = [Item(str(i), f"{i}.png", "q", "A") for i in range(n)]
        own = [Path("images") / item.image for item in items]
        for seed in range(4):
            shuffled = images_for(items, Path("images"), "shuffled", seed)
            assert all(path != mine for path, mine in zip(shuffled, own, strict=True))
            assert sorted(shuffled) == sorted(own)  # each picture drawn once
            assert images_for(items, Path("images"), "shuffled", seed) == shuffled  # seeded
