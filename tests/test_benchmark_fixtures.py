"""``ecglm.testing.benchmark_fixtures.write_example_benchmarks`` (benchmarks/benchmark_example.py's
fixtures): what it writes reads back as each benchmark's layout, every question about a record the
signals hold, and the gold answers are the generator's heart rate and rhythm."""

from __future__ import annotations

import pytest

from ecglm.benchmarks.ecgbench import SCORED, read_subset
from ecglm.benchmarks.ecgqa import read_ecgqa_items
from ecglm.benchmarks.ptbxl import read_superclass_items
from ecglm.records import read_recording
from ecglm.testing.benchmark_fixtures import write_example_benchmarks

pytest.importorskip("neurokit2")


@pytest.mark.timeout(300)  # neurokit2's beats (a few seconds) and eight printouts
def test_example_benchmarks_read_back_with_the_generator_s_answers(tmp_path):
    example = write_example_benchmarks(tmp_path, count=4)
    ecgs = example.ecgs
    ptbxl = read_superclass_items(example.ptbxl)
    assert [item.id for item in ptbxl] == ["1", "2", "3", "4"]  # every record in test fold 10
    assert [item.gold for item in ptbxl] == ["NORM", "MI", "STTC", "CD"]
    recording = read_recording(example.ptbxl / ptbxl[0].records[0])
    assert recording.fs == 500 and recording.signal.shape == (5000, 12)
    items, left_out = read_ecgqa_items(example.ecgqa, example.ptbxl)
    assert not left_out and len(items) == 4 * 3 + 2
    chosen = [item for item in items if item.question_type == "single-choose"]
    assert [item.gold for item in chosen] == [(a,) for ecg in ecgs for a in (ecg.heart_rate, ecg.rhythm)]
    assert {len(item.records) for item in items if item.question_type.startswith("comparison")} == {2}
    for name in SCORED:
        subset = read_subset(example.ecgbench, name)
        assert [item.id for item in subset] == ["0", "1", "2", "3"]
        assert all((example.ecgbench / "images" / item.image).is_file() for item in subset)
    ptb = read_subset(example.ecgbench, "ptb-test")
    assert [item.gold.replace(";", ",") for item in ptb] == [item.gold for item in ptbxl]
    rates = [item.gold for item in read_subset(example.ecgbench, "ecgqa-test")]
    assert rates == [[ecg.heart_rate] for ecg in ecgs]
