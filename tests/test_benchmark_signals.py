"""``ecglm benchmark --suite ptbxl|ecgqa``: PTB-XL's diagnostic superclasses and ECG-QA's test split
from the signal. The gold sets from a PTB-XL 1.0.3 layout written here (WFDB records,
``ptbxl_database.csv``, ``scp_statements.csv``) and ECG-QA's files about its records, a tiny random
signal model answering them end to end with its controls, resumed after a kill, and the answers scored
against hand-computed figures."""

from __future__ import annotations

import json

import pytest

from ecglm.commands import main
from ecglm.testing.benchmark_fixtures import ecgqa_sample, write_ecgqa, write_ptbxl

#: ecg_id -> (strat_fold, scp_codes); the superclasses expected of fold 10, in ecg_id order.
ROWS = {
    1: (3, "{'NORM': 100.0, 'SR': 0.0}"),
    2: (10, "{'NORM': 100.0, 'SR': 0.0}"),
    3: (10, "{'IMI': 35.0, 'LAFB': 0.0, 'SR': 0.0}"),  # likelihood 0 still counts, as in the benchmark
    4: (10, "{'SR': 0.0, 'LVOLT': 0.0}"),  # no diagnostic statement: left out
    5: (9, "{'LVH': 100.0}"),
    1006: (10, "{'NDT': 100.0, 'LVH': 50.0}"),
}
EXPECTED = {"2": "NORM", "3": "MI, CD", "1006": "STTC, HYP"}


@pytest.fixture(scope="module")
def ptbxl(tmp_path_factory):
    """PTB-XL 1.0.3's layout (scp_statements.csv: NORM, IMI, LAFB, NDT, LVH diagnostic; SR, LVOLT not)."""
    return write_ptbxl(tmp_path_factory.mktemp("ptb-xl"), ROWS)


def test_gold_sets_are_the_diagnostic_superclasses_of_fold_10(ptbxl):
    from ecglm.benchmarks.ptbxl import read_superclass_items

    items = read_superclass_items(ptbxl)
    assert {item.id: item.gold for item in items} == EXPECTED
    assert [item.records for item in items][-1] == ("records500/01000/01006_hr",)
    assert {item.id: item.gold for item in read_superclass_items(ptbxl, "val")} == {"5": "HYP"}


def test_a_folder_without_scp_statements_is_refused_naming_the_file(tmp_path):
    from ecglm.benchmarks import BenchmarkError
    from ecglm.benchmarks.ptbxl import read_superclass_items

    with pytest.raises(BenchmarkError, match=r"scp_statements\.csv: no such file"):
        read_superclass_items(tmp_path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from ecglm.testing import saved_signal_bundle

    return saved_signal_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.mark.timeout(300)  # a tiny model, but three runs and a load; slow on a loaded machine
def test_a_signal_bundle_answers_resumes_and_is_scored_with_its_controls(ptbxl, bundle, tmp_path):
    from ecglm.benchmarks.ptbxl import QUESTION
    from ecglm.inference import answer
    from ecglm.model import ECGLM, Decoding
    from ecglm.records import read_recording

    path, llm = bundle
    out = tmp_path / "preds"
    args = ["benchmark", "run", "--suite", "ptbxl", "--model", path, "--data", str(ptbxl), "--out", str(out)]
    args += ["--override", f"backbone.model={llm}", "--max_new_tokens", "4", "--batch_size", "2"]
    args += ["--device", "cpu"]
    assert main([*args, "--controls", "shuffled", "--controls", "blank"]) == 0
    rows = [json.loads(line) for line in (out / "ptbxl-superclass.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["2", "3", "1006"]
    assert set(rows[0]["label_scores"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    shuffled = [json.loads(x) for x in (out / "ptbxl-superclass.shuffled.jsonl").read_text().splitlines()]
    assert all(s["records"] != r["records"] for s, r in zip(shuffled, rows, strict=True))  # another's record
    assert len((out / "ptbxl-superclass.blank.jsonl").read_text().splitlines()) == 3
    # The answers are the model's answers to the same record asked alone (ecglm.inference.answer).
    model = ECGLM.from_pretrained(path, device="cpu", overrides={"backbone": {"model": llm}})
    recording = read_recording(ptbxl / rows[1]["records"][0])
    alone = answer(
        model, recording.signal, recording.fs, recording.leads, QUESTION, Decoding(max_new_tokens=4)
    )
    assert rows[1]["text"] == alone
    # Killed after the first line (the second cut short): the rerun answers the two missing only.
    lines = (out / "ptbxl-superclass.jsonl").read_text().splitlines()
    (out / "ptbxl-superclass.jsonl").write_text(lines[0] + "\n" + lines[1][:15])
    assert main(args) == 0
    again = [json.loads(line) for line in (out / "ptbxl-superclass.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in again] == ["2", "3", "1006"]
    assert [r["text"] for r in again] == [r["text"] for r in rows]  # greedy: the same answers
    scores = tmp_path / "scores.json"
    score = ["benchmark", "score", "--suite", "ptbxl", "--data", str(ptbxl), "--predictions", str(out)]
    assert main([*score, "--scoring", "strict", "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())["subsets"]["ptbxl-superclass"]
    assert result["auc_from"] == "label_scores" and result["answers"] == 3 and result["split"] == "test"
    assert set(result["gaps"]) == {"model_minus_shuffled", "model_minus_blank"}


def test_scores_match_hand_computed_figures(ptbxl, tmp_path):
    """Three records, gold NORM / MI+CD / STTC+HYP. Answers: "NORM" (right), "MI" (misses CD), a
    non-answer; label scores rank every positive above every negative for NORM, MI and CD only."""
    out = tmp_path / "preds"
    out.mkdir()
    scores = {
        "2": {"NORM": 0.9, "MI": 0.1, "STTC": 0.2, "CD": 0.1, "HYP": 0.8},
        "3": {"NORM": 0.1, "MI": 0.9, "STTC": 0.7, "CD": 0.8, "HYP": 0.1},
        "1006": {"NORM": 0.2, "MI": 0.2, "STTC": 0.3, "CD": 0.2, "HYP": 0.5},
    }
    texts = {"2": "NORM", "3": "The ECG shows MI.", "1006": "I cannot tell."}
    lines = [json.dumps({"question_id": i, "text": texts[i], "label_scores": scores[i]}) for i in texts]
    (out / "ptbxl-superclass.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "scores.json"
    score = ["benchmark", "score", "--suite", "ptbxl", "--data", str(ptbxl), "--predictions", str(out)]
    assert main([*score, "--scoring", "strict", "--out", str(path)]) == 0
    result = json.loads(path.read_text())["subsets"]["ptbxl-superclass"]
    # Per class (NORM, MI, STTC, CD, HYP), tp/fp/fn: NORM 1/0/0, MI 1/0/0, STTC 0/0/1, CD 0/0/1, HYP 0/0/1:
    # F1 = (1 + 1 + 0 + 0 + 0) / 5; wrong decisions 3 of 15: Hamming loss 0.2.
    assert result["f1"] == pytest.approx(0.4)
    assert result["hamming_loss"] == pytest.approx(0.2)
    assert result["unparsable"] == 1
    # AUROC per class from the scores: NORM 1, MI 1, CD 1, STTC (0.3 vs 0.2, 0.7 -> 0.5), HYP (0.5 vs 0.8,
    # 0.1 -> 0.5); the macro mean 4 / 5.
    assert result["auc"] == pytest.approx(0.8)


@pytest.fixture(scope="module")
def ecgqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecgqa")
    samples = [
        ecgqa_sample(
            11, "single-verify", "Does this ECG show a left anterior fascicular block?", ["yes"], [3]
        ),
        ecgqa_sample(
            12,
            "single-query",
            "What diagnostic statements does this ECG show?",
            ["sinus rhythm", "left axis deviation"],
            [2],
        ),
        ecgqa_sample(
            13,
            "comparison_consecutive-verify",
            "Are there any new symptoms in the second ECG?",
            ["none"],
            [2, 3],
        ),
        ecgqa_sample(14, "single-verify", "Does this ECG show a myocardial infarction?", ["no"], [1006]),
        ecgqa_sample(15, "single-verify", "Is there a pacemaker?", ["no"], [999]),  # not in the table
    ]
    return write_ecgqa(root, samples)


def test_ecgqa_items_are_its_test_questions_about_records_the_signals_hold(ecgqa, ptbxl):
    from ecglm.benchmarks.ecgqa import read_ecgqa_items

    items, left_out = read_ecgqa_items(ecgqa, ptbxl)
    assert [item.id for item in items] == ["11", "12", "13", "14"]
    assert items[2].records == ("records500/00000/00002_hr", "records500/00000/00003_hr")
    assert items[1].gold == ("sinus rhythm", "left axis deviation") and items[2].question_type.startswith(
        "comp"
    )
    assert left_out == {"unknown_ecg_id": 1}


def test_ecgqa_exact_match_per_question_type_matches_hand_computed_figures(ecgqa, ptbxl, tmp_path):
    """Answers: 11 "Yes." (right), 12 the two items in another order (right: a set), 13 "none" (right:
    the empty set), 14 missing (wrong). The shuffled control gets only 11 right."""
    out = tmp_path / "preds"
    out.mkdir()
    answers = {"11": "Yes.", "12": "left axis deviation; sinus rhythm", "13": "none"}
    control = {"11": "yes", "12": "sinus rhythm", "13": "yes", "14": "yes"}
    name = "ecgqa-ptbxl-paraphrased"
    for path, texts in ((out / f"{name}.jsonl", answers), (out / f"{name}.shuffled.jsonl", control)):
        path.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in texts.items()))
    scores = tmp_path / "scores.json"
    args = ["benchmark", "score", "--suite", "ecgqa", "--data", str(ecgqa), "--signals", str(ptbxl)]
    assert main([*args, "--predictions", str(out), "--scoring", "strict", "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())["subsets"][name]
    assert result["accuracy"] == pytest.approx(3 / 4) and result["missing"] == 1
    types = result["question_types"]
    assert types["single-verify"]["estimate"] == pytest.approx(1 / 2) and types["single-verify"]["n"] == 2
    assert (
        types["single-query"]["estimate"] == 1.0 and types["comparison_consecutive-verify"]["estimate"] == 1.0
    )
    assert result["controls"]["shuffled"]["accuracy"] == pytest.approx(1 / 4)
    assert result["gaps"]["model_minus_shuffled"]["all"]["estimate"] == pytest.approx(
        2 / 3
    )  # 3 answered both
    assert main([*args, "--predictions", str(out), "--scoring", "pulse"]) == 2  # not how ECG-QA is scored


@pytest.mark.timeout(300)  # a tiny model, but a load and two runs; slow on a loaded machine
def test_a_signal_bundle_answers_ecgqa_comparisons_with_both_records(ecgqa, ptbxl, bundle, tmp_path):
    path, llm = bundle
    out = tmp_path / "preds"
    args = [
        "benchmark",
        "run",
        "--suite",
        "ecgqa",
        "--model",
        path,
        "--data",
        str(ecgqa),
        "--signals",
        str(ptbxl),
    ]
    args += [
        "--out",
        str(out),
        "--override",
        f"backbone.model={llm}",
        "--max_new_tokens",
        "4",
        "--device",
        "cpu",
    ]
    assert main([*args, "--controls", "blank"]) == 0
    rows = [json.loads(x) for x in (out / "ecgqa-ptbxl-paraphrased.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["11", "12", "13", "14"]
    assert len(rows[2]["records"]) == 2 and "label_scores" not in rows[0]
    assert len((out / "ecgqa-ptbxl-paraphrased.blank.jsonl").read_text().splitlines()) == 4
    score = ["benchmark", "score", "--suite", "ecgqa", "--data", str(ecgqa), "--signals", str(ptbxl)]
    assert main([*score, "--predictions", str(out), "--scoring", "strict"]) == 0
