"""The shuffled-ECG control and the intervals beside every gap: numbers from scripted models."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from ecglm.batch import ECGQABatch
from ecglm.data.controls import ECGDonors
from ecglm.evaluation import AnswerEvaluation, MetricsConfig, intervals, render_markdown, summarize


def _item(record: str, q: int, dataset: str = "d", value: float | None = None, two: bool = False) -> dict:
    """A QA item whose ECG is constant ``value`` (default: a number derived from the record)."""
    value = float(zlib.crc32(record.encode()) % 1000) if value is None else value
    shape = (2, 12, 50) if two else (12, 50)
    return {"key": f"{record}_qa{q}", "ecg": np.full(shape, value, dtype=np.float16), "dataset": dataset}


def test_donors_give_another_record_of_the_same_dataset_reproducibly():
    items = [_item(f"r{i}", q, value=i) for i in range(6) for q in range(3)]  # 3 questions per ECG
    shuffled, donors = ECGDonors(seed=0)(items)
    again, donors_again = ECGDonors(seed=0)(items)
    assert np.array_equal(shuffled, again) and donors == donors_again
    assert donors != ECGDonors(seed=1)(items)[1]
    assert shuffled.shape == (18, 12, 50) and shuffled.dtype == np.float16
    for item, ecg, donor in zip(items, shuffled, donors, strict=True):
        own = item["key"].split("_qa")[0]
        assert donor is not None and donor != own
        assert ecg[0, 0] == int(donor[1:]) != item["ecg"][0, 0]  # the donor record's signal


def test_donors_keep_to_the_dataset_fall_back_across_and_count_what_they_cannot_shuffle():
    donors = ECGDonors(seed=0)
    mixed = [_item("a1", 0, "A"), _item("a2", 0, "A"), _item("b1", 0, "B")]
    _, names = donors(mixed)
    assert names[:2] == ["a2", "a1"]  # the other record of dataset A
    assert names[2] in ("a1", "a2")  # B has one record: another dataset's, rather than its own
    # A comparison question takes two ECGs, from two records that are not its own.
    shuffled, names = donors([_item("a3", 0, "A", two=True)])
    assert shuffled.shape == (2, 12, 50) and set(names[0].split("+")) <= {"a1", "a2"}
    assert len(set(names[0].split("+"))) == 2
    # A first batch with a single record and nothing streamed before: it keeps its own ECG, counted.
    alone = [_item("z", 0), _item("z", 1)]
    shuffled, names = ECGDonors()(alone)
    assert names == [None, None] and np.array_equal(shuffled, np.stack([alone[0]["ecg"], alone[1]["ecg"]]))
    with pytest.raises(ValueError, match="pool_records"):
        ECGDonors(pool_records=1)


def _evaluate(
    answer_from_signal: bool, records: int = 40, questions: int = 3, with_answers: bool = False
) -> dict:
    """A scripted model answers "abnormal" when the ECG it is given is positive. It reads the signal
    (``answer_from_signal``) or ignores it and answers from the question alone."""
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=records)
    items = [
        {**_item(f"r{i}", q, value=float(signs[i])), "question": f"q{q}", "question_type": f"t{q % 2}"}
        for i in range(records)
        for q in range(questions)
    ]
    answers = ["abnormal" if it["ecg"][0, 0] > 0 else "normal" for it in items]
    if with_answers:  # the donors may then pick records whose answer to the same question differs
        items = [{**it, "answer": a} for it, a in zip(items, answers, strict=True)]
    evaluation = AnswerEvaluation(
        MetricsConfig(metrics=("acc",), bertscore_model=None),
        ["d"],
        ["t0", "t1"],
        conditions=("ecg", "shuffled_ecg"),
    )
    donors = ECGDonors(seed=0)
    for start in range(0, len(items), 16):  # eval batches of 16, as a loader hands them out
        chunk = items[start : start + 16]
        shuffled, donor = donors(chunk)
        empty = torch.zeros((len(chunk), 1), dtype=torch.long)
        batch = ECGQABatch(
            input_ids=empty,
            attention_mask=empty,
            ecg_mask=empty.bool(),
            ecg=torch.from_numpy(np.stack([it["ecg"] for it in chunk])),
            ecg_counts=torch.ones(len(chunk), dtype=torch.long),
            key=[it["key"] for it in chunk],
            dataset=[it["dataset"] for it in chunk],
            question_type=[it["question_type"] for it in chunk],
            answer=answers[start : start + 16],
            shuffled_ecg=torch.from_numpy(shuffled),
            donor=donor,
        )

        def model(ecg: torch.Tensor, questions: list[str]) -> list[str]:
            if answer_from_signal:
                return ["abnormal" if float(e[0, 0]) > 0 else "normal" for e in ecg]
            return ["abnormal" if q == "q0" else "normal" for q in questions]

        questions_ = [it["question"] for it in chunk]
        evaluation.update("ecg", model(batch.ecg, questions_), batch)
        evaluation.update("shuffled_ecg", model(batch.shuffled_ecg, questions_), batch)
    return evaluation.compute()


def test_a_model_that_reads_the_signal_has_a_shuffled_gap_whose_interval_excludes_zero():
    result = _evaluate(answer_from_signal=True)
    bands = intervals([result])
    assert bands["questions"] == 120
    assert bands["accuracy"]["dataset: d"]["ecg"]["estimate"] == 1.0
    gap = bands["gaps"]["ecg_minus_shuffled_ecg"]["dataset: d"]
    # Donor signs agree with the record's half of the time: the gap is about 0.5, far from 0.
    assert 0.3 < gap["estimate"] < 0.7 and gap["low"] > 0 and gap["p_value"] < 0.01
    assert gap["records"] == 40 and gap["n"] == 120  # resampled by record, not by question
    assert set(bands["gaps"]["ecg_minus_shuffled_ecg"]) == {
        "dataset: d",
        "question_type: t0",
        "question_type: t1",
    }
    # One-word answers: token F1 and ROUGE-L score each answer as exact match does.
    for metric in ("f1", "rouge_l"):
        other = bands["metrics"][metric]["gaps"]["ecg_minus_shuffled_ecg"]["dataset: d"]
        assert other["estimate"] == pytest.approx(gap["estimate"])
        assert other["low"] == pytest.approx(gap["low"])
    # The mean gap over seeds and the report (both tables) carry the control.
    summary = summarize([result])
    assert summary["gaps"]["ecg_minus_shuffled_ecg"]["d"]["acc"]["mean"] == pytest.approx(gap["estimate"])
    text = render_markdown(summary, {"intervals": bands})
    assert "## Gap `ecg - shuffled_ecg` (points)" in text and "## ACC with 95% intervals" in text
    assert f"{100 * gap['estimate']:.1f} [{100 * gap['low']:.1f}, {100 * gap['high']:.1f}]" in text
    assert "F1 `ecg - shuffled_ecg`" in text and "ROUGE-L `ecg - shuffled_ecg`" in text


def test_donors_whose_answer_to_the_same_question_differs_are_preferred():
    """With the answers known, every donor's answer to the question differs: a model that reads the
    signal then gets every shuffled question wrong (gap 1), not half of them."""
    items = [
        {
            **_item(f"r{i}", 0, value=i),
            "question": "Is there atrial fibrillation?",
            "answer": ["yes" if i % 2 else "no"],
        }
        for i in range(8)
    ]
    _, donors = ECGDonors(seed=0)(items)
    for item, donor in zip(items, donors, strict=True):
        assert int(donor[1:]) % 2 != int(item["key"][1]) % 2, (item["key"], donor)
    bands = intervals([_evaluate(answer_from_signal=True, with_answers=True)])
    gap = bands["gaps"]["ecg_minus_shuffled_ecg"]["dataset: d"]
    assert gap["estimate"] > 0.9 and gap["low"] > 0.8


def test_a_model_that_ignores_the_signal_has_a_shuffled_gap_interval_including_zero():
    bands = intervals([_evaluate(answer_from_signal=False)])
    gap = bands["gaps"]["ecg_minus_shuffled_ecg"]["dataset: d"]
    assert gap["estimate"] == 0.0 and gap["low"] <= 0.0 <= gap["high"] and gap["p_value"] == 1.0
    # Its accuracy is the question prior's (about half), with an interval that says how sure that is.
    acc = bands["accuracy"]["dataset: d"]["ecg"]
    assert 0.2 < acc["estimate"] < 0.8 and acc["low"] < acc["estimate"] < acc["high"]


def test_questions_drawn_in_several_seeds_count_once():
    result = _evaluate(answer_from_signal=True, records=10)
    assert intervals([result, result])["questions"] == intervals([result])["questions"] == 30


def test_matched_noise_has_each_leads_scale_and_none_of_its_content():
    from ecglm.conditions import default_names, matched_noise
    from ecglm.evaluation import MetricsConfig

    t = torch.linspace(0, 10, 2500)
    ecg = torch.stack([torch.stack([3 * torch.sin(2 * torch.pi * t) + lead for lead in range(12)])] * 2)
    ecg = ecg.half()  # as stored
    noise = matched_noise(ecg, ["r1_qa0", "r2_qa0"])
    assert noise.shape == ecg.shape and noise.dtype == torch.float16
    torch.testing.assert_close(noise.float().mean(-1), ecg.float().mean(-1), atol=0.2, rtol=0)
    torch.testing.assert_close(noise.float().std(-1), ecg.float().std(-1), atol=0.2, rtol=0.05)
    # No heartbeat: the noise does not correlate with the signal.
    centred = (noise.float() - noise.float().mean(-1, keepdim=True))[0, 0]
    signal = (ecg.float() - ecg.float().mean(-1, keepdim=True))[0, 0]
    assert abs(float(torch.corrcoef(torch.stack([centred, signal]))[0, 1])) < 0.1
    assert torch.equal(noise, matched_noise(ecg, ["r1_qa0", "r2_qa0"]))  # the same questions, the same noise
    assert not torch.equal(noise, matched_noise(ecg, ["r1_qa1", "r2_qa0"]))
    assert "noise_ecg" not in default_names() and MetricsConfig().conditions == default_names()
    assert MetricsConfig(conditions=("noise_ecg",)).conditions == ("ecg", "noise_ecg")


def test_the_random_encoder_keeps_each_tensors_scale_and_nothing_learnt(tiny_encoder_factory):
    from ecglm.model import randomized_copy

    encoder = tiny_encoder_factory()
    before = {n: p.clone() for n, p in encoder.state_dict().items()}
    random = randomized_copy(encoder, seed=0)
    assert all(
        torch.equal(before[n], p) for n, p in encoder.state_dict().items()
    )  # the original is untouched
    again = randomized_copy(encoder, seed=0)
    changed = 0
    for (name, p), q, r in zip(
        encoder.named_parameters(), random.parameters(), again.parameters(), strict=True
    ):
        assert torch.equal(q, r), name  # seeded
        if p.numel() > 1 and float(p.std()) > 0:
            changed += 1
            assert not torch.equal(p, q), name
            assert abs(float(q.std()) - float(p.std())) < 0.2 * float(p.std()) + 1e-6, name
    assert changed > 10  # every weight matrix and convolution, weight-normalised ones included
    ecg = torch.randn(2, 12, 2500)
    with torch.no_grad():
        assert not torch.allclose(encoder.eval()(ecg), random.eval()(ecg))


def _exact_auroc(scores: list[float], targets: list[int]) -> float:
    """The reference: the share of (positive, negative) pairs ranked right, ties counting half."""
    pos = [s for s, t in zip(scores, targets, strict=True) if t == 1]
    neg = [s for s, t in zip(scores, targets, strict=True) if t == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_verify_auroc_matches_the_pairwise_definition_per_group():
    from ecglm.metrics.verify import VerifyAUROC

    rng = np.random.default_rng(0)
    n = 60
    references = [["yes"] if rng.random() < 0.4 else "No" for _ in range(n)]
    targets = [1 if r == ["yes"] else 0 for r in references]
    # Informative but noisy scores, with ties between classes (rounded to 0.05).
    scores = np.round(np.clip(0.5 * np.array(targets) + rng.random(n) * 0.6, 0, 1) * 20) / 20
    groups = ["a" if i % 3 else "b" for i in range(n)]
    metric = VerifyAUROC(["a", "b", "c"])
    # Other answers are ignored; a group with one class ("c": only yes) has no AUROC.
    metric.update(torch.tensor([0.9, 0.1]), ["tachycardia", ["yes", "no"]], ["a", "a"])
    metric.update(torch.tensor([0.7]), ["yes"], ["c"])
    metric.update(torch.tensor(scores[:30]), references[:30], groups[:30])
    metric.update(torch.tensor(scores[30:]), references[30:], groups[30:])
    result = metric.compute()
    assert set(result) == {"all", "a", "b"}
    for group in ("a", "b"):
        rows = [i for i in range(n) if groups[i] == group]
        expected = _exact_auroc([scores[i] for i in rows], [targets[i] for i in rows])
        assert result[group]["auc"] == pytest.approx(expected, abs=1e-6)
        assert result[group]["n"] == len(rows)
    all_scores, all_targets = [*scores, 0.7], [*targets, 1]
    assert result["all"]["auc"] == pytest.approx(_exact_auroc(all_scores, all_targets), abs=1e-6)
    metric.reset()
    assert metric.compute() == {}
