"""The ``openai-chat`` judge against a stub chat-completions server on 127.0.0.1: what it sends (model,
rubric, temperature 0, the key from the environment) and how it reads the replies."""

from __future__ import annotations

import json

import pytest

from ecglm.chat_judge import JudgeServiceError, OpenAIChatJudge
from ecglm.judges import JudgeItem
from ecglm_testing import chat_completions_stub


@pytest.fixture
def server():
    seen: list[dict] = []
    replies = iter(["Score: 7\nReason: rhythm right, axis missed", "I cannot grade this"])

    def respond(path: str, headers, body: dict):
        seen.append({"path": path, "auth": headers.get("Authorization"), "body": body})
        if body["model"] == "refused":
            return 401, None
        return 200, {"choices": [{"message": {"role": "assistant", "content": next(replies)}}]}

    with chat_completions_stub(respond) as url:
        yield url, seen


def test_chat_judge_sends_the_rubric_and_key_and_reads_scores(server, tmp_path, monkeypatch):
    url, seen = server
    monkeypatch.setenv("ECGLM_TEST_JUDGE_KEY", "sk-test")
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Grade the report out of {scale}. Reply: Score: N, Reason: ...")
    judge = OpenAIChatJudge(
        "stub-model", base_url=url, api_key_env="ECGLM_TEST_JUDGE_KEY", rubric_file=str(rubric)
    )
    items = [
        JudgeItem("Report?", "Sinus rhythm.", "Sinus rhythm, normal axis."),
        JudgeItem("Report?", "AF.", "?"),
    ]
    verdicts = judge.judge(items)
    assert verdicts[0].score == pytest.approx(0.7) and verdicts[0].reason == "rhythm right, axis missed"
    assert verdicts[1].score is None  # unreadable: counted apart, never a zero
    first = seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "stub-model" and first["body"]["temperature"] == 0
    assert first["body"]["messages"][0] == {
        "role": "system",
        "content": "Grade the report out of 10. Reply: Score: N, Reason: ...",
    }
    assert "Trainee report: Sinus rhythm, normal axis." in first["body"]["messages"][1]["content"]
    assert "response_format" not in first["body"]  # a Score: N rubric wants plain text
    json_mode = OpenAIChatJudge("stub-model", base_url=url, response_format="json_object")
    assert json_mode.request(items[0])["response_format"] == {"type": "json_object"}
    with pytest.raises(JudgeServiceError, match="response_format 'yaml'"):
        OpenAIChatJudge("stub-model", base_url=url, response_format="yaml")


def test_chat_judge_refusals_name_the_service_and_the_missing_key(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("ECGLM_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeServiceError, match="set the environment variable ECGLM_TEST_JUDGE_KEY"):
        OpenAIChatJudge("m", base_url=url, api_key_env="ECGLM_TEST_JUDGE_KEY", require_key=True)
    with pytest.raises(JudgeServiceError, match="HTTP 401"):
        OpenAIChatJudge("refused", base_url=url).judge([JudgeItem("q", "r", "p")])


def test_benchmark_score_judges_ptb_test_report_through_the_chat_judge(server, tmp_path, capsys):
    from ecglm.commands import main

    url, seen = server
    turns = [
        [{"from": "human", "value": "<image>\nWrite a report."}, {"from": "gpt", "value": ref}]
        for ref in ("SR.", "AF.")
    ]
    data = [{"id": f"ptb-report-{i}", "image": f"{i}.png", "conversations": t} for i, t in enumerate(turns)]
    (tmp_path / "ptb-test-report.json").write_text(json.dumps(data))
    answers = [
        {"question_id": f"ptb-report-{i}", "prompt": "", "text": t}
        for i, t in enumerate(("SR, normal axis.", "?"))
    ]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = tmp_path / "scores.json"
    args = ["benchmark", "score", "--data", str(tmp_path), "--predictions", str(tmp_path / "preds.jsonl")]
    args += ["--subsets", "ptb-test-report", "--out", str(out), "--judge", "openai-chat"]
    assert main([*args, "--judge_args", json.dumps({"model": "stub-model", "base_url": url})]) == 0
    report = json.loads(out.read_text())["subsets"]["ptb-test-report"]
    assert report["report_score"] == pytest.approx(0.7) and report["unreadable"] == 1
    assert "Reference report: SR." in seen[0]["body"]["messages"][1]["content"]
    assert "<image>" not in seen[0]["body"]["messages"][1]["content"]
    assert main(args[:-2]) == 2  # the report subset without a judge
    assert "scored by a judge" in capsys.readouterr().err
