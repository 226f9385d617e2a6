"""ECGBench's ``arena``: a tiny random image model answers multi-turn conversations (images drawn by
ecglm's renderer) turn by turn through ``ecglm benchmark run``, each question after its own earlier
answers; a run cut short answers only what is missing; the openai-chat judge, against a stub server on
127.0.0.1, scores the conversations with the arena rubric as ``ecglm benchmark score`` reads it."""

from __future__ import annotations

import json

import pytest

from ecglm.benchmarks import BenchmarkError
from ecglm.benchmarks.ecgbench import read_conversations
from ecglm.benchmarks.judged import ARENA_RUBRIC, arena_categories
from ecglm.commands import main
from ecglm.judges import Judge, Verdict
from ecglm.testing.benchmark_fixtures import arena_item, random_walk_ecgs, write_ecgbench
from ecglm_testing import chat_completions_stub

CONVERSATIONS = [
    [("What rhythm does this ECG show?", "Sinus rhythm."), ("Is the axis normal?", "Yes, normal axis.")],
    [
        ("Describe the ST segments.", "ST elevation in V2-V4."),
        ("What is the likely diagnosis?", "Anterior MI."),
    ],
    [
        ("What is the heart rate?", "About 110 bpm."),
        ("Is that a tachycardia?", "Yes, sinus tachycardia."),
        ("Name one cause of it.", "Fever."),
    ],
]


@pytest.fixture(scope="module")
def ecgbench(tmp_path_factory):
    """arena.json in ECGBench's layout (turns of {question, answer}), two ECGs drawn by ecglm's renderer."""
    images = {f"ecg-arena/{i}.png": signal for i, signal in enumerate(random_walk_ecgs(2))}
    items = [
        arena_item(f"arena-{i}", f"ecg-arena/{i % 2}.png", turns) for i, turns in enumerate(CONVERSATIONS)
    ]
    return write_ecgbench(tmp_path_factory.mktemp("ECGBench"), {"arena": items}, images)


@pytest.fixture
def judge_server():
    """A chat-completions stub: the replies in order (PULSE's JSON of categories; one fenced, one
    unreadable), and every request it saw."""
    seen: list[dict] = []
    replies = iter(
        [
            json.dumps(
                {
                    "Accuracy": {"Score": 8, "Explanation": "rhythm right"},
                    "Completeness": {"Score": 6, "Explanation": "axis thin"},
                    "Instruction Adherence": {"Score": 10, "Explanation": "answers each question"},
                }
            ),
            '```json\n{"Accuracy": {"Score": 3}, "Completeness": {"Score": 4}, '
            '"Instruction Adherence": {"Score": 5}}\n```',
            "I cannot grade this.",
        ]
    )

    def respond(path: str, headers, body: dict):
        seen.append(body)
        return 200, {"choices": [{"message": {"content": next(replies)}}]}

    with chat_completions_stub(respond) as url:
        yield url, seen


def run_args(image_bundle, ecgbench, out):
    path, llm = image_bundle
    args = ["benchmark", "run", "--model", str(path), "--data", str(ecgbench), "--out", str(out)]
    args += ["--subsets", "arena", "--override", f"backbone.model={llm}", "--max_new_tokens", "4"]
    return [*args, "--batch_size", "2", "--device", "cpu"]


def test_arena_is_answered_turn_by_turn_after_the_model_s_own_answers(
    image_bundle, ecgbench, tmp_path, monkeypatch, capsys
):
    from ecglm.prompts import PromptStyle

    asked: list[tuple[str, list]] = []
    encode = PromptStyle.encode

    def spy(self, question, answer, *args, history=None, **kwargs):
        asked.append((question, [dict(t) for t in history or ()]))
        return encode(self, question, answer, *args, history=history, **kwargs)

    monkeypatch.setattr(PromptStyle, "encode", spy)
    out = tmp_path / "preds"
    assert main(run_args(image_bundle, ecgbench, out)) == 0
    rows = [json.loads(line) for line in (out / "arena.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["arena-0", "arena-1", "arena-2"]
    for row, turns in zip(rows, CONVERSATIONS, strict=True):
        assert row["golden_convs"] == [{"question": q, "answer": a} for q, a in turns]
        assert [t["question"] for t in row["predict_convs"]] == [q for q, _ in turns]
        assert all(isinstance(t["answer"], str) for t in row["predict_convs"])
        assert row["image"].startswith("ecg-arena/") and row["condition"] == "image"
    # Every question after the earlier questions and the model's own answers (not the gold ones).
    for row in rows:
        predicted = row["predict_convs"]
        for k, turn in enumerate(predicted):
            assert (turn["question"], predicted[:k]) in asked
    third = [history for question, history in asked if question == "Name one cause of it."]
    assert third and all(history == rows[2]["predict_convs"][:2] for history in third)
    assert "arena (image): 3 conversations answered now, 3 in all" in capsys.readouterr().out

    # Cut midway: one whole line and a cut one; the rerun answers the two missing conversations only.
    lines = (out / "arena.jsonl").read_text().splitlines()
    (out / "arena.jsonl").write_text(lines[0] + "\n" + lines[1][:30])
    asked.clear()
    assert main(run_args(image_bundle, ecgbench, out)) == 0
    assert "arena (image): 2 conversations answered now, 3 in all" in capsys.readouterr().out
    assert {question for question, _ in asked}.isdisjoint(q for q, _ in CONVERSATIONS[0])
    again = [json.loads(line) for line in (out / "arena.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in again] == ["arena-0", "arena-1", "arena-2"]
    assert again[0] == rows[0]
    assert [r["predict_convs"] for r in again[1:]] == [r["predict_convs"] for r in rows[1:]]  # greedy


def test_arena_scored_by_a_judge_as_pulse_averages_its_categories(
    image_bundle, ecgbench, tmp_path, judge_server, capsys
):
    url, seen = judge_server
    out = tmp_path / "preds"
    assert main(run_args(image_bundle, ecgbench, out)) == 0
    rows = [json.loads(line) for line in (out / "arena.jsonl").read_text().splitlines()]
    scores = tmp_path / "scores.json"
    args = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--out", str(scores)]
    args += ["--subsets", "arena", "--judge", "openai-chat", "--judge_args"]
    assert main([*args, json.dumps({"model": "stub", "base_url": url, "rubric": "a report rubric"})]) == 0
    report = json.loads(scores.read_text())
    arena = report["subsets"]["arena"]
    # By hand: (8 + 6 + 10) / 30 = 0.8 and (3 + 4 + 5) / 30 = 0.4; the third reply has no score.
    assert arena["arena_score"] == pytest.approx(0.6)
    assert arena["categories"] == pytest.approx(
        {"accuracy": 0.55, "completeness": 0.5, "instruction_adherence": 0.75}
    )
    assert arena["category_counts"] == {"accuracy": 2, "completeness": 2, "instruction_adherence": 2}
    assert (arena["items"], arena["answers"], arena["missing"], arena["unreadable"]) == (3, 3, 0, 1)
    assert [v["question_id"] for v in arena["verdicts"]] == ["arena-0", "arena-1", "arena-2"]
    assert report["published"]["arena"]["PULSE-7B"]["arena_score"] == pytest.approx(0.389)
    printed = capsys.readouterr().out
    assert "arena score 60.0" in printed and "PULSE-7B (published, GPT-4o judge): arena score 38.9" in printed
    # The judge gets the arena rubric (not judge_args' report rubric), the gold and the model's answers,
    # and under --scoring pulse the first two turns only, as PULSE's eval_arena.py shows them.
    assert [r["messages"][0]["content"] for r in seen] == [ARENA_RUBRIC] * 3
    assert [r["response_format"] for r in seen] == [{"type": "json_object"}] * 3  # the rubric asks for JSON
    first = seen[0]["messages"][1]["content"]
    assert "Sinus rhythm." in first and rows[0]["predict_convs"][1]["answer"] in first
    assert "Is the axis normal?" in first
    assert "Name one cause of it." not in seen[2]["messages"][1]["content"]


def test_arena_rubric_file_replaces_the_rubric_and_strict_shows_every_turn(
    image_bundle, ecgbench, tmp_path, judge_server
):
    url, seen = judge_server
    out = tmp_path / "preds"
    out.mkdir()
    rows = [
        {"question_id": f"arena-{i}", "predict_convs": [{"question": q, "answer": "?"} for q, _ in turns]}
        for i, turns in enumerate(CONVERSATIONS)
    ]
    (out / "arena.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rubric = tmp_path / "rubric.txt"
    rubric.write_text('Grade it. Reply {"Accuracy": {"Score": N}}.')
    args = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--scoring", "strict"]
    args += ["--subsets", "arena", "--judge", "openai-chat", "--arena_rubric", str(rubric)]
    assert main([*args, "--judge_args", json.dumps({"model": "stub", "base_url": url})]) == 0
    assert seen[0]["messages"][0]["content"] == rubric.read_text()
    assert "Question 3: Name one cause of it." in seen[2]["messages"][1]["content"]


def test_arena_categories_are_read_from_the_reply_s_json_object():
    assert arena_categories('Here: {"Accuracy": {"Score": 7}, "Completeness": 5} done') == {
        "accuracy": 0.7,
        "completeness": 0.5,
    }
    assert arena_categories('{"Instruction Adherence": {"score": 10, "Explanation": "ok"}}') == {
        "instruction_adherence": 1.0
    }
    # Out of the 0-10 scale, not a number, or no JSON at all: nothing read.
    assert arena_categories('{"Accuracy": {"Score": 11}, "Completeness": {"Score": "high"}}') == {}
    assert arena_categories("Accuracy: 7/10") == {}
    assert arena_categories('{"Accuracy": {"Score": 7}') == {}


def test_the_prompt_of_a_follow_up_holds_the_earlier_turn_after_the_ecg():
    from ecglm.prompts import ChatTemplate
    from ecglm.testing import byte_tokenizer

    style = ChatTemplate(byte_tokenizer())
    first = {"question": "What rhythm is this?", "answer": "Atrial fibrillation."}
    follow = style.encode("Is it rate controlled?", None, 3, history=[first])
    alone = style.encode("Is it rate controlled?", None, 3)
    decoded = style.tokenizer.decode(follow.input_ids)
    start = decoded.index("What rhythm is this?")
    assert start < decoded.index("Atrial fibrillation.") < decoded.index("Is it rate controlled?")
    # The ECG's three positions come before the first question, once.
    placeholder = style.placeholder_token_id
    assert follow.input_ids[follow.ecg_start : follow.ecg_start + 3] == [placeholder] * 3
    assert len(style.tokenizer.decode(follow.input_ids[: follow.ecg_start])) < start
    assert "What rhythm" not in style.tokenizer.decode(alone.input_ids)
    # A history too long for max_length loses its earliest turns: the ECG moves to the question.
    style.max_length = len(alone.input_ids) + 16
    cut = style.encode("Is it rate controlled?", None, 3, history=[first])
    assert cut.input_ids == alone.input_ids


class NoRubricJudge(Judge):
    """A judge that takes no rubric: arena, judged with its own rubric, refuses it."""

    def judge(self, items):
        return [Verdict(1.0, "", "Score: 10") for _ in items]


def test_bad_arena_input_is_refused_naming_the_file_item_or_judge(ecgbench, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    turns = [{"from": "gpt", "value": "Sinus rhythm."}, {"from": "human", "value": "Rhythm?"}]
    (data / "arena.json").write_text(
        json.dumps([{"id": "arena-7", "image": "x.png", "conversations": turns}])
    )
    with pytest.raises(BenchmarkError, match=r"arena\.json: item 'arena-7': 'conversations' must be"):
        read_conversations(data)
    out = tmp_path / "preds"
    out.mkdir()
    (out / "arena.jsonl").write_text(json.dumps({"question_id": "arena-1", "text": "one answer"}) + "\n")
    args = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--subsets", "arena"]
    assert main([*args, "--judge", "test_benchmark_arena.NoRubricJudge"]) == 2
    assert "takes no 'rubric' argument" in capsys.readouterr().err
    assert main([*args, "--judge", "openai-chat", "--judge_args", '{"model": "stub"}']) == 2
    assert "'arena-1' has no 'predict_convs'" in capsys.readouterr().err
    assert main(args) == 2  # a judged subset without a judge
    assert "arena is scored by a judge" in capsys.readouterr().err


class WordJudge(Judge):
    """Scores an answer by whether it names the finding: arena's accuracy 10 when the model's answers hold
    "Sinus" or "Anterior" (else 2), completeness always 6; a report 0.8 when it says "sinus" (else 0.2)."""

    def __init__(self, rubric: str = ""):
        self.rubric = rubric

    def judge(self, items):
        out = []
        for item in items:
            named = any(word in item.prediction for word in ("Sinus", "Anterior", "sinus"))
            reply = json.dumps({"Accuracy": {"Score": 10 if named else 2}, "Completeness": {"Score": 6}})
            out.append(Verdict(0.8 if named else 0.2, "", reply))
        return out


def test_the_controls_are_judged_beside_the_model_with_paired_gaps(ecgbench, tmp_path):
    """arena.shuffled.jsonl and arena.blank.jsonl (another conversation's image, a blank page) are judged as
    the model's answers are, and scored against them item by item; ptb-test-report's controls alike."""
    from ecglm.benchmarks.ecgbench import Item
    from ecglm.benchmarks.judged import judge_subset

    out = tmp_path / "preds"
    out.mkdir()

    def write(name: str, answers: list[str]) -> None:
        rows = [
            {"question_id": f"arena-{i}", "predict_convs": [{"question": q, "answer": a} for q, _ in turns]}
            for i, (turns, a) in enumerate(zip(CONVERSATIONS, answers, strict=True))
        ]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("arena.jsonl", ["Sinus rhythm.", "Anterior MI.", "I do not know."])
    write("arena.blank.jsonl", ["?", "Anterior MI.", "?"])
    write("arena.shuffled.jsonl", ["?", "?", "?"])
    scores = tmp_path / "scores.json"
    args = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--out", str(scores)]
    assert main([*args, "--subsets", "arena", "--judge", "test_benchmark_arena.WordJudge"]) == 0
    arena = json.loads(scores.read_text())["subsets"]["arena"]
    # By hand, a conversation's score is (accuracy + completeness) / 20: named 0.8, not named 0.4.
    # Model 0.8, 0.8, 0.4; blank 0.4, 0.8, 0.4; shuffled 0.4 each.
    assert arena["arena_score"] == pytest.approx(2 / 3)
    assert arena["controls"]["blank"]["arena_score"] == pytest.approx(1.6 / 3)
    assert arena["controls"]["shuffled"]["arena_score"] == pytest.approx(0.4)
    assert arena["controls"]["blank"]["answers"] == 3 and arena["controls"]["blank"]["unreadable"] == 0
    blank, shuffled = arena["gaps"]["model_minus_blank"], arena["gaps"]["model_minus_shuffled"]
    assert blank["estimate"] == pytest.approx(0.4 / 3) and blank["n"] == 3
    assert shuffled["estimate"] == pytest.approx(0.8 / 3)
    assert shuffled["low"] <= shuffled["estimate"] <= shuffled["high"] and 0 < shuffled["p_value"] <= 1
    md = scores.with_name("scores.md").read_text()
    assert "| ours, blank control | 53.3 [" in md and "| shuffled | +26.7 |" in md

    items = [Item(str(i), f"{i}.png", "Write the report.", "sinus rhythm") for i in range(4)]
    rows = [{"question_id": str(i), "text": t} for i, t in enumerate(["sinus", "sinus", "sinus", "no idea"])]
    blank_rows = [{"question_id": str(i), "text": t} for i, t in enumerate(["sinus", "?", "?", "?"])]
    report = judge_subset("ptb-test-report", items, rows, WordJudge(), controls={"blank": blank_rows})
    assert report["report_score"] == pytest.approx((0.8 * 3 + 0.2) / 4)
    assert report["controls"]["blank"]["report_score"] == pytest.approx((0.8 + 0.2 * 3) / 4)
    assert report["gaps"]["model_minus_blank"]["estimate"] == pytest.approx(0.6 * 2 / 4)
