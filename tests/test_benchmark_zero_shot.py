"""``ecglm benchmark run --config``: the untrained model of a real recipe (MedGemma's, its Gemma 3
backbone shrunk to a tiny random model of the same architecture) answers ECGBench fixtures zero-shot,
end to end through ``score``, and the predictions and the report say so."""

from __future__ import annotations

import json

import pytest

from ecglm.commands import main
from ecglm_testing import REPO
from test_benchmark_run import ecgbench  # noqa: F401 (the fixture: ptb-test and mmmu-ecg, drawn images)

RECIPE = REPO / "recipes" / "medgemma-4b" / "lora-r32-all-linear.yaml"


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from ecglm.testing import saved_vision_model

    return saved_vision_model(tmp_path_factory.mktemp("vlm") / "gemma3", "gemma3")


def run_args(data, out, vlm):
    return [
        "benchmark", "run", "--config", str(RECIPE), "--data", str(data), "--out", str(out),
        "--override", f"backbone.model={vlm}", "--override", "backbone.dtype=float32",
        "--subsets", "ptb-test", "--max_new_tokens", "3", "--batch_size", "3", "--device", "cpu",
    ]  # fmt: skip


def test_recipe_s_untrained_vlm_answers_ecgbench_and_the_report_says_zero_shot(
    ecgbench,  # noqa: F811
    tiny_gemma3,
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)  # the recipe's relative folders (runs/, shards/) stay here
    out = tmp_path / "preds"
    assert main([*run_args(ecgbench, out, tiny_gemma3), "--controls", "blank"]) == 0
    rows = [json.loads(line) for line in (out / "ptb-test.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert {r["model_id"] for r in rows} == {f"zero-shot:{tiny_gemma3}"}
    assert all(isinstance(r["text"], str) for r in rows)
    assert set(rows[0]["label_scores"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert len((out / "ptb-test.blank.jsonl").read_text().splitlines()) == 5
    record = json.loads((out / "run.json").read_text())["model"]
    assert record["zero_shot"] is True and record["recipe"] == str(RECIPE)
    assert record["components"]["backbone"]["init_args"]["model"] == tiny_gemma3
    assert record["reads_images_itself"] is True and "encoder" not in record["components"]  # its own tower
    assert not (tmp_path / "mlflow.db").exists()  # the recipe's Trainer is built, never logs
    # A rerun answers nothing new; greedy answers do not change.
    assert main(run_args(ecgbench, out, tiny_gemma3)) == 0
    again = [json.loads(line) for line in (out / "ptb-test.jsonl").read_text().splitlines()]
    assert again == rows
    scores = tmp_path / "report" / "scores.json"
    score = ["benchmark", "score", "--data", str(ecgbench), "--predictions", str(out), "--scoring", "strict"]
    assert main([*score, "--out", str(scores)]) == 0
    report = json.loads(scores.read_text())
    assert report["model"]["zero_shot"] is True and report["model"]["recipe"] == str(RECIPE)
    ptb = report["subsets"]["ptb-test"]
    assert ptb["answers"] == 5 and ptb["auc_from"] == "label_scores" and "model_minus_blank" in ptb["gaps"]
    markdown = scores.with_suffix(".md").read_text()
    assert f"untrained (zero-shot: its parts' own weights), from recipe `{RECIPE}`" in markdown
    assert "Decoding: greedy, up to 3 tokens" in markdown
    assert (
        record["decoding"]["max_new_tokens"] == 3 and record["decoding"]["num_beams"] == 1
    )  # --max_new_tokens


def test_a_recipe_s_model_answers_with_the_recipe_s_decoding(ecgbench, tiny_gemma3, tmp_path, monkeypatch):  # noqa: F811
    """Without --max_new_tokens the answers follow the recipe's model.decoding (here a variant merged
    over it: beam search, two tokens), and run.json records it."""
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)
    variant = tmp_path / "decoding.yaml"
    variant.write_text("model:\n  decoding:\n    max_new_tokens: 2\n    num_beams: 2\n")
    out = tmp_path / "preds"
    args = run_args(ecgbench, out, tiny_gemma3)
    at = args.index("--max_new_tokens")
    args = args[:at] + args[at + 2 :]
    assert main([*args, "--config", str(variant)]) == 0
    record = json.loads((out / "run.json").read_text())["model"]
    assert record["decoding"] == {
        "max_new_tokens": 2, "num_beams": 2, "do_sample": False, "temperature": 1.0, "top_p": 1.0
    }  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_gemma3)
    rows = [json.loads(line) for line in (out / "ptb-test.jsonl").read_text().splitlines()]
    assert all(len(tokenizer(r["text"], add_special_tokens=False).input_ids) <= 2 for r in rows)


def test_model_and_config_are_one_or_the_other(ecgbench, tmp_path, capsys):  # noqa: F811
    base = ["benchmark", "run", "--data", str(ecgbench), "--out", str(tmp_path / "out")]
    assert main([*base, "--model", str(tmp_path), "--config", str(RECIPE)]) == 2
    assert "--model and --config are exclusive: give one model to run" in capsys.readouterr().err
    assert main(base) == 2
    assert (
        "give one model to run: --model BUNDLE (a trained model) or --config RECIPE"
        in capsys.readouterr().err
    )
    assert main([*base, "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such recipe file" in capsys.readouterr().err
    assert main(["benchmark", "run", "--config", str(RECIPE)]) == 2
    assert "--data DIR --out DIR" in capsys.readouterr().err


def test_a_run_folder_refuses_answers_of_another_model(tmp_path):
    from ecglm.benchmarks import BenchmarkError
    from ecglm.benchmarks.provenance import read_run_record, write_run_record

    write_run_record(tmp_path, {"name": "google/medgemma-4b-it", "zero_shot": True, "recipe": "a.yaml"})
    write_run_record(tmp_path, {"name": "google/medgemma-4b-it", "zero_shot": True, "recipe": "a.yaml"})
    with pytest.raises(BenchmarkError, match=r"holds the answers of another model .*: give a new --out"):
        write_run_record(tmp_path, {"name": "bundles/mine", "zero_shot": False})
    assert read_run_record(tmp_path / "ptb-test.jsonl")["recipe"] == "a.yaml"
