"""ECGBench scoring (``ecglm benchmark score``): PULSE's published scoring reproduced on hand-computed
cases and against sklearn's metrics computed here, and the strict scoring's differences from it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score

from ecglm.benchmarks import Item, read_subset, score_subset
from ecglm.benchmarks.parsing import pulse_letter, strict_letter
from ecglm.benchmarks.scoring import score_ecgbench
from ecglm.commands import main

PTB = ["NORM", "MI", "STTC", "CD", "HYP"]


def items(gold: list, question: str = "Which classes?") -> list[Item]:
    return [Item(f"q{i}", f"ptb-xl/{i}.png", question, g) for i, g in enumerate(gold)]


def rows(texts: list[str], **extra) -> list[dict]:
    return [dict(question_id=f"q{i}", prompt="Which classes?", text=t, **extra) for i, t in enumerate(texts)]


def test_pulse_letters_follow_the_published_extractor_and_strict_letters_only_stated_ones():
    cases = {  # text: (PULSE's letter, strict letter)
        "C": ("C", "C"),
        "B. Sinus rhythm": ("B", "B"),
        "The correct option is D": ("D", "D"),
        "Answer: Because of the rhythm, C": ("B", None),  # PULSE: the first of A..H anywhere after Answer:
        "Answer: a normal ECG": ("C", None),  # ... here the C of "ECG"
        "I think (E)": (None, None),
        "(E)": (None, "E"),
        "A normal ECG": (None, None),
        "It is C. Or A.": ("A", None),  # PULSE tries "A." before "C."
    }
    for text, (pulse, strict) in cases.items():
        assert (pulse_letter(text), strict_letter(text)) == (pulse, strict), text


def test_pulse_multilabel_scores_equal_hand_computed_values_and_strict_reads_whole_tokens():
    gold = ["NORM", "MI", "NORM; MI"]
    texts = ["NORM", "ABNORMAL", "MI, HYP"]
    pulse = score_subset("ptb-test", items(gold), rows(texts), "pulse")
    # PULSE: classes fitted on the gold sets (MI, NORM; HYP dropped); "ABNORMAL" holds "NORM".
    # NORM: F1 0.5, AUC of 0/1 predictions 0.25; MI: F1 2/3, AUC 0.75; 3 of 6 decisions wrong.
    assert pulse["classes"] == ["MI", "NORM"]
    assert pulse["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert pulse["auc"] == pytest.approx(0.5)
    assert pulse["hamming_loss"] == pytest.approx(0.5)
    strict = score_subset("ptb-test", items(gold), rows(texts), "strict")
    # Strict: "ABNORMAL" names no label (unparsable, wrong); HYP's false positive counts over 5 classes.
    assert strict["unparsable"] == 1
    assert strict["f1"] == pytest.approx(2 / 3)
    assert strict["hamming_loss"] == pytest.approx(3 / 15)
    assert strict["auc"] is None and strict["auc_from"] is None
    assert strict["auc_of_decisions"] == pytest.approx((0.75 + 0.75) / 2)
    assert strict["intervals"]["f1"]["low"] <= strict["f1"] <= strict["intervals"]["f1"]["high"]


def test_pulse_multilabel_equals_sklearn_per_class_metrics_on_random_answers():
    rng = np.random.default_rng(3)
    truth = rng.random((60, 5)) < 0.4
    said = rng.random((60, 5)) < 0.4
    gold = ["; ".join(label for label, on in zip(PTB, row, strict=True) if on) for row in truth]
    texts = [" and ".join(label for label, on in zip(PTB, row, strict=True) if on) for row in said]
    scores = score_subset("ptb-test", items(gold), rows(texts), "pulse")
    # Every class has positives and negatives here, in label order after sorting.
    order = [PTB.index(c) for c in sorted(PTB)]
    t, p = truth[:, order].astype(int), said[:, order].astype(int)
    assert scores["f1"] == pytest.approx(np.mean(f1_score(t, p, average=None)))
    assert scores["auc"] == pytest.approx(np.mean([roc_auc_score(t[:, j], p[:, j]) for j in range(5)]))
    assert scores["hamming_loss"] == pytest.approx(hamming_loss(t, p))


def test_strict_auroc_comes_from_label_scores():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 5)) < 0.5
    noise = rng.random((40, 5))
    gold = ["; ".join(label for label, on in zip(PTB, row, strict=True) if on) for row in truth]
    answers = [
        {
            "question_id": f"q{i}",
            "text": "NORM",
            "label_scores": dict(zip(PTB, (truth[i] + noise[i]).tolist(), strict=True)),
        }
        for i in range(40)
    ]
    scores = score_subset("ptb-test", items(gold), answers, "strict")
    expected = roc_auc_score(truth.astype(int), truth + noise, average="macro")
    assert scores["auc_from"] == "label_scores"
    assert scores["auc"] == pytest.approx(expected)


def test_code15_norm_and_abnormal_are_single_labels_under_pulse():
    labels_gold = ["NORM", "ABNORMAL", "RBBB"]
    texts = ["Answer: NORMAL", "ABNORMAL ECG", "RBBB and ST"]
    pulse = score_subset("code15-test", items(labels_gold), rows(texts), "pulse")
    # PULSE: "NORMAL" holds NORM; "RBBB and ST" predicts RBBB and ST (ST not among gold classes: dropped).
    assert pulse["classes"] == ["ABNORMAL", "NORM", "RBBB"]
    assert pulse["f1"] == pytest.approx(1.0) and pulse["hamming_loss"] == 0
    strict = score_subset("code15-test", items(labels_gold), rows(texts), "strict")
    assert strict["unparsable"] == 1  # "NORMAL" is not the token NORM
    assert strict["hamming_loss"] == pytest.approx(2 / (3 * 8))  # NORM missed, ST said, over 8 labels


def test_choice_fallback_letters_come_from_pulse_s_seeded_generator_across_subsets():
    mmmu = items(list("ABCD" * 10))
    csn = items([f"{letter}) a rhythm" for letter in "ABCDEFGH" * 5])
    texts_mmmu = ["A"] + ["no idea"] * 39
    texts_csn = ["A", "(B)"] + ["unsure"] * 38  # "(B)" is no letter to PULSE
    scores = score_ecgbench(
        {"mmmu-ecg": mmmu, "csn-test-no-cot": csn},
        {"csn-test-no-cot": rows(texts_csn), "mmmu-ecg": rows(texts_mmmu)},
    )
    draw = random.Random(42)  # PULSE draws mmmu-ecg's guesses first (A-D), then csn's (A-H)
    mmmu_letters = ["A"] + [draw.choice("ABCD") for _ in range(39)]
    csn_letters = ["A"] + [draw.choice("ABCDEFGH") for _ in range(39)]
    assert list(scores) == ["mmmu-ecg", "csn-test-no-cot"]
    expected_mmmu = np.mean([p == g.gold for p, g in zip(mmmu_letters, mmmu, strict=True)])
    expected_csn = np.mean([p == g.gold[0] for p, g in zip(csn_letters, csn, strict=True)])
    assert scores["mmmu-ecg"]["accuracy"] == pytest.approx(expected_mmmu)
    assert scores["csn-test-no-cot"]["accuracy"] == pytest.approx(expected_csn)
    assert scores["csn-test-no-cot"]["unparsable"] == 39
    strict = score_subset("csn-test-no-cot", csn, rows(texts_csn), "strict")
    assert strict["accuracy"] == pytest.approx(2 / 40) and strict["unparsable"] == 38


def test_ecgqa_compares_candidate_sets_and_pulse_never_finds_a_capitalised_option():
    question = "Question: Which leads show ST elevation?\nOptions: v1, v2, lead i, None\n\n"
    question += "Only answer based on the given Options without any explanation."
    gold = [["v1", "v2"], ["none"], ["lead i"]]
    texts = ["V1, V2", "none", "I cannot tell"]
    answers = [{"question_id": f"q{i}", "prompt": question, "text": t} for i, t in enumerate(texts)]
    pulse = score_subset("ecgqa-test", items(gold, question), answers, "pulse")
    assert pulse["accuracy"] == pytest.approx(1 / 3)  # "None" (capital N) is never found in "none"
    strict = score_subset("ecgqa-test", items(gold, question), answers, "strict")
    assert strict["accuracy"] == pytest.approx(2 / 3) and strict["unparsable"] == 1


def test_strict_counts_missing_answers_wrong_and_pairs_controls(tmp_path):
    gold = items(["A", "B", "C", "D"])
    answers = rows(["A", "B", "C"])  # q3 unanswered
    blank = rows(["A", "D", "D", "D"])
    strict = score_subset("mmmu-ecg", gold, answers, "strict", controls={"blank": blank})
    assert strict["missing"] == 1 and strict["accuracy"] == pytest.approx(0.75)
    gap = strict["gaps"]["model_minus_blank"]
    assert gap["n"] == 3 and gap["estimate"] == pytest.approx(2 / 3)
    assert strict["controls"]["blank"]["accuracy"] == pytest.approx(0.5)  # A and D right


def write_subset(root, name, gold, question="Which classes?"):
    data = [
        {
            "id": f"q{i}",
            "image": f"{name}/{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": g},
            ],
        }
        for i, g in enumerate(gold)
    ]
    (root / f"{name}.json").write_text(json.dumps(data))


def test_score_command_reads_pulse_s_layout_and_writes_scores_json(tmp_path, capsys):
    data, preds = tmp_path / "ECGBench", tmp_path / "outputs"
    data.mkdir()
    write_subset(data, "ptb-test", ["NORM", "MI", "NORM; MI"])
    write_subset(data, "mmmu-ecg", ["A", "B"])
    (preds / "ptb-test").mkdir(parents=True)  # PULSE's <subset>/step-final.jsonl
    lines = [json.dumps(r) for r in rows(["NORM", "ABNORMAL", "MI, HYP"])]
    (preds / "ptb-test" / "step-final.jsonl").write_text("\n".join(lines) + "\n")
    (preds / "mmmu-ecg.jsonl").write_text("\n".join(json.dumps(r) for r in rows(["A", "B"])) + '\n{"questi')
    out = tmp_path / "scores.json"
    args = ["benchmark", "score", "--data", str(data), "--predictions", str(preds), "--out", str(out)]
    assert main(args) == 0
    scores = json.loads(out.read_text())["subsets"]
    assert scores["ptb-test"]["hamming_loss"] == pytest.approx(0.5)
    assert scores["mmmu-ecg"]["accuracy"] == 1.0 and scores["mmmu-ecg"]["answers"] == 2  # cut line ignored
    printed = capsys.readouterr().out
    assert "| ptb-test | pulse | 3 |" in printed
    # The paper's PULSE-7B row beside ours, in the same units (Table 3: AUC 82.4, F1 74.8, HL 11.0).
    assert "| ptb-test | PULSE-7B (published, pulse) | | |  | 74.8 | 82.4 | 11.0 |" in printed
    assert json.loads(out.read_text())["published"]["ptb-test"]["PULSE-7B"]["auc"] == pytest.approx(0.824)
    assert main([*args[:-2], "--scoring", "strict", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["subsets"]["ptb-test"]["unparsable"] == 1


def test_predictions_for_an_id_the_subset_lacks_are_refused_naming_it(tmp_path, capsys):
    write_subset(tmp_path, "mmmu-ecg", ["A"])
    (tmp_path / "p.jsonl").write_text(json.dumps({"question_id": "nope", "text": "A"}) + "\n")
    args = ["benchmark", "score", "--data", str(tmp_path), "--predictions", str(tmp_path / "p.jsonl")]
    assert main([*args, "--subsets", "mmmu-ecg"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert read_subset(tmp_path, "mmmu-ecg")[0].question == "<image>\nWhich classes?"


def test_strict_resamples_equal_sklearn_metrics_of_the_same_weighted_items():
    from ecglm.benchmarks.scoring import _resampled

    rng = np.random.default_rng(5)
    t, p = (rng.random((30, 4)) < 0.4).astype(int), (rng.random((30, 4)) < 0.4).astype(int)
    score = t + rng.random((30, 4))
    draws = _resampled(t, p, score, [0, 1, 2, 3], n_resamples=5)
    weights = np.random.default_rng(0).multinomial(30, np.full(30, 1 / 30), size=5)
    for row, w in zip(draws, weights, strict=True):
        keep = [j for j in range(4) if 0 < (w * t[:, j]).sum() < w.sum()]  # classes drawn both ways
        f1 = f1_score(t[:, keep], p[:, keep], average="macro", sample_weight=w, zero_division=0)
        auc = roc_auc_score(t[:, keep], score[:, keep], average="macro", sample_weight=w)
        decided = roc_auc_score(t[:, keep], p[:, keep], average="macro", sample_weight=w)
        assert row == pytest.approx([f1, auc, decided, hamming_loss(t, p, sample_weight=w)])


def test_pulse_auc_of_a_class_every_item_has_is_undefined_and_the_judged_subsets_are_refused():
    scores = score_subset("ptb-test", items(["NORM", "NORM; MI"]), rows(["NORM", "NORM"]), "pulse")
    assert scores["per_class"]["NORM"]["auc"] is None and scores["auc"] is None  # PULSE's mean is NaN
    assert scores["per_class"]["MI"]["auc"] == 0.5 and scores["f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scored by a judge"):
        score_subset("ptb-test-report", items(["Sinus rhythm."]), rows(["Sinus rhythm."]), "pulse")
