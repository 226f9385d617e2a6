"""``ecglm compare`` of two runs on the same questions: paired changes of accuracy and of the gaps."""

from __future__ import annotations

import json

import pytest

from ecglm.commands.compare import compare
from ecglm.evaluation.compare import paired_changes


def _records(correct: dict[str, list[int]], types: list[str]) -> list[dict]:
    """Answer records of one seed: question i is about record ``r<i // 2>`` (two questions per ECG)."""
    return [
        {
            "key": f"r{i // 2}_qa{i % 2}",
            "dataset": "toy",
            "question_type": types[i],
            "condition": condition,
            "correct": bool(flag),
            "prediction": "x",
            "reference": "x",
        }
        for condition, flags in correct.items()
        for i, flag in enumerate(flags)
    ]


TYPES = ["rate", "rhythm"] * 4
SFT = {"ecg": [1, 0, 1, 0, 1, 1, 0, 0], "shuffled_ecg": [0, 0, 1, 0, 0, 1, 0, 0]}
GRPO = {"ecg": [1, 1, 1, 1, 1, 1, 0, 1], "shuffled_ecg": [0, 1, 0, 0, 1, 1, 0, 1]}


def test_paired_changes_are_the_mean_differences_on_the_shared_questions():
    changes = paired_changes(_records(SFT, TYPES), _records(GRPO, TYPES))
    overall = changes["dataset: toy"]
    # ecg: 7/8 - 4/8; shuffled: 4/8 - 2/8; gap: (7-4)/8 - (4-2)/8
    assert overall["acc:ecg"]["estimate"] == pytest.approx(3 / 8)
    assert overall["acc:shuffled_ecg"]["estimate"] == pytest.approx(2 / 8)
    assert overall["gap:ecg-shuffled_ecg"]["estimate"] == pytest.approx(1 / 8)
    assert overall["questions"]["n"] == 8
    assert overall["acc:ecg"]["records"] == 4  # resampled by ECG, not by question
    # rhythm (odd questions): ecg 0,0,1,0 -> 1,1,1,1; shuffled 0,0,1,0 -> 1,0,1,1
    rhythm = changes["question_type: rhythm"]
    assert rhythm["acc:ecg"]["estimate"] == pytest.approx(3 / 4)
    assert rhythm["gap:ecg-shuffled_ecg"]["estimate"] == pytest.approx((4 - 3) / 4 - (1 - 1) / 4)
    assert rhythm["acc:ecg"]["low"] <= rhythm["acc:ecg"]["estimate"] <= rhythm["acc:ecg"]["high"]
    assert 0 < rhythm["acc:ecg"]["p_value"] <= 1


def test_only_questions_both_runs_answered_are_compared():
    other = [r for r in _records(GRPO, TYPES) if not r["key"].startswith("r3_")]
    changes = paired_changes(_records(SFT, TYPES), other)
    assert changes["dataset: toy"]["questions"]["n"] == 6
    assert changes["dataset: toy"]["acc:ecg"]["estimate"] == pytest.approx((6 - 4) / 6)


def test_compare_appends_the_paired_table_when_predictions_lie_beside_the_reports(tmp_path):
    for name, correct in (("sft", SFT), ("grpo", GRPO)):
        folder = tmp_path / name
        folder.mkdir()
        acc = {c: {"datasets": {"toy": {"acc": {"mean": sum(f) / 8, "std": 0}}}} for c, f in correct.items()}
        (folder / "report.json").write_text(json.dumps({"summary": {"conditions": acc}}))
        lines = "".join(json.dumps(r) + "\n" for r in _records(correct, TYPES))
        (folder / "predictions_seed0.jsonl").write_text(lines)
    out = tmp_path / "compare.md"
    compare([f"sft={tmp_path / 'sft/report.json'}", f"grpo={tmp_path / 'grpo/report.json'}"], str(out))
    text = out.read_text()
    assert "## grpo - sft on the same questions" in text
    row = next(line for line in text.splitlines() if line.startswith("| dataset: toy |"))
    assert "| 8 | +37.5 [" in row and "+12.5 [" in row
