"""``ecglm benchmark score``'s report: scores.md beside scores.json (ours with intervals, the controls,
the published rows of the PULSE paper, the paired gaps), a PNG per metric and of the gaps, and the
run in MLflow (metrics and the report's files as artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ecglm.commands import main

LABELS = ("NORM", "MI", "STTC", "CD", "HYP")


def write_subset(root, name, gold):
    data = [
        {
            "id": f"q{i}",
            "image": f"{name}/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": g}],
        }
        for i, g in enumerate(gold)
    ]
    (root / f"{name}.json").write_text(json.dumps(data))


def write_predictions(path, texts, scores=None):
    rows = []
    for i, text in enumerate(texts):
        row = {"question_id": f"q{i}", "prompt": "<image>\nWhich?", "text": text}
        if scores is not None:
            row["label_scores"] = {label: scores[label][i] for label in LABELS}
        rows.append(json.dumps(row) + "\n")
    path.write_text("".join(rows))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """ptb-test and mmmu-ecg, answered and under the blank control, scored strictly with --mlflow."""
    tmp_path = tmp_path_factory.mktemp("report")
    data, preds = tmp_path / "ECGBench", tmp_path / "preds"
    data.mkdir(), preds.mkdir()
    write_subset(data, "ptb-test", ["NORM", "MI", "NORM; MI", "CD"])
    write_subset(data, "mmmu-ecg", ["A", "B", "C", "D"])
    scores = {
        "NORM": [0.9, 0.2, 0.8, 0.3],  # AUROC 1
        "MI": [0.1, 0.9, 0.4, 0.3],  # AUROC 1
        "STTC": [0.0] * 4,
        "CD": [0.5, 0.1, 0.1, 0.2],  # AUROC 2/3
        "HYP": [0.0] * 4,
    }
    write_predictions(preds / "ptb-test.jsonl", ["NORM", "MI", "NORM", "HYP"], scores)
    write_predictions(preds / "ptb-test.blank.jsonl", ["NORM"] * 4)
    write_predictions(preds / "mmmu-ecg.jsonl", ["A", "B", "C", "unsure"])
    write_predictions(preds / "mmmu-ecg.blank.jsonl", ["A"] * 4)
    out, uri = tmp_path / "report" / "scores.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["benchmark", "score", "--data", str(data), "--predictions", str(preds), "--scoring", "strict"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
        assert main([*args, "--out", str(out), "--mlflow", uri]) == 0
    return out, uri


def table_row(markdown: str, subset: str, model: str) -> list[str]:
    """The cells of ``model``'s row in ``subset``'s table of scores.md."""
    section = markdown.split(f"## {subset}\n", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {model} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def with_interval(row: dict, metric: str) -> str:
    span = row.get(f"{metric}_interval") or row["intervals"][metric]
    return f"{100 * row[metric]:.1f} [{100 * span['low']:.1f}, {100 * span['high']:.1f}]"


def test_markdown_gives_scores_json_s_numbers_beside_the_published_rows(scored):
    out, _ = scored
    report = json.loads(out.read_text())
    ptb, mmmu = report["subsets"]["ptb-test"], report["subsets"]["mmmu-ecg"]
    # Hand-computed: F1 over NORM, MI, CD (the classes held both ways) = (1 + 2/3 + 0) / 3; Hamming
    # loss 3 wrong of 20 decisions; AUROC from the label scores (1 + 1 + 2/3) / 3; mmmu 3 of 4.
    assert ptb["f1"] == pytest.approx(5 / 9) and ptb["hamming_loss"] == pytest.approx(0.15)
    assert ptb["auc"] == pytest.approx(8 / 9) and mmmu["accuracy"] == pytest.approx(0.75)
    markdown = out.with_suffix(".md").read_text()
    # ptb-test's columns: F1, AUC, AUC of 0/1 decisions, Hamming loss.
    ours = table_row(markdown, "ptb-test", "ours (strict)")
    assert ours == [with_interval(ptb, m) for m in ("f1", "auc", "auc_of_decisions", "hamming_loss")]
    assert ours[0].startswith("55.6 [") and ours[1].startswith("88.9 [") and ours[3].startswith("15.0 [")
    # The paper's Table 3, PULSE-7B on ptb-test: AUC 82.4, F1 74.8, Hamming loss 11.0.
    assert table_row(markdown, "ptb-test", "PULSE-7B (published)") == ["74.8", "82.4", "-", "11.0"]
    blank = ptb["controls"]["blank"]  # NORM for every item: F1 of NORM 2/3, of MI and CD 0
    assert blank["f1"] == pytest.approx(2 / 9)
    assert table_row(markdown, "ptb-test", "ours, blank control")[0] == with_interval(blank, "f1")
    assert table_row(markdown, "mmmu-ecg", "ours (strict)") == [with_interval(mmmu, "accuracy")]
    assert table_row(markdown, "mmmu-ecg", "ours (strict)")[0].startswith("75.0 [")
    assert table_row(markdown, "mmmu-ecg", "ours, blank control")[0].startswith("25.0 [")
    assert table_row(markdown, "mmmu-ecg", "GPT-4o (published)") == ["43.5"]  # Table 4
    published = report["published"]["mmmu-ecg"]
    for model, values in published.items():
        assert table_row(markdown, "mmmu-ecg", f"{model} (published)") == [f"{100 * values['accuracy']:.1f}"]
    # The paired gap against the blank page: per item [1, 1, 1, 0] - [1, 0, 0, 0].
    gap = mmmu["gaps"]["model_minus_blank"]
    assert gap["estimate"] == pytest.approx(0.5)
    span = f"[{100 * gap['low']:+.1f}, {100 * gap['high']:+.1f}]"
    assert table_row(markdown, "mmmu-ecg", "blank")[:2] == ["+50.0", span]
    assert "Liu et al. 2024, arXiv:2410.19008v1" in markdown
    assert "1 unparsable" in markdown.split("## mmmu-ecg", 1)[1]


def test_plots_are_png_files_beside_scores_json(scored):
    out, _ = scored
    names = ["accuracy", "f1", "auc", "auc_of_decisions", "hamming_loss", "gaps"]
    for name in names:
        with Image.open(out.with_name(f"scores.{name}.png")) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100
            image.verify()
    assert not out.with_name("scores.report_score.png").exists()  # no subset has it
    assert not list(out.parent.glob("*.tmp"))


def test_mlflow_run_holds_the_metrics_and_the_report_files(scored):
    from mlflow import MlflowClient

    out, uri = scored
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ecglm-benchmark")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics, params = run.data.metrics, run.data.params
    assert metrics["benchmark/mmmu-ecg/accuracy"] == pytest.approx(0.75)
    assert metrics["benchmark/mmmu-ecg/blank/accuracy"] == pytest.approx(0.25)
    assert metrics["benchmark/mmmu-ecg/gap_blank"] == pytest.approx(0.5)
    assert metrics["benchmark/ptb-test/f1"] == pytest.approx(5 / 9)
    assert params["scoring"] == "strict" and params["suite"] == "ecgbench"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert {"benchmark/scores.json", "benchmark/scores.md", "benchmark/scores.gaps.png"} <= files
    local = client.download_artifacts(run.info.run_id, "benchmark/scores.md", str(out.parent.parent))
    assert Path(local).read_text() == out.with_suffix(".md").read_text()


def test_mlflow_without_out_is_refused_before_scoring(tmp_path, capsys):
    args = ["benchmark", "score", "--data", str(tmp_path), "--predictions", str(tmp_path)]
    assert main([*args, "--mlflow", "sqlite:///x.db"]) == 2
    assert "--out scores.json" in capsys.readouterr().err


def test_ecgqa_report_gives_each_question_type_and_its_overall_gap():
    from ecglm.benchmarks.report import mlflow_metrics, render_markdown

    def stat(estimate, low, high, n):
        return {"estimate": estimate, "low": low, "high": high, "n": n}

    row = {  # the shape of ecglm.benchmarks.ecgqa.score_ecgqa's result
        "subset": "ecgqa-ptbxl-paraphrased",
        "scoring": "strict",
        "items": 4,
        "answers": 3,
        "missing": 1,
        "accuracy": 0.75,
        "accuracy_interval": stat(0.75, 0.25, 1.0, 4),
        "question_types": {"single-verify": stat(0.5, 0.0, 1.0, 2), "single-query": stat(1.0, 1.0, 1.0, 1)},
        "controls": {
            "shuffled": {"accuracy": 0.25, "question_types": {"single-verify": 0.5, "single-query": 0.0}}
        },
        "gaps": {
            "model_minus_shuffled": {"all": stat(2 / 3, 0.0, 1.0, 3) | {"p_value": 0.5}, "single-query": None}
        },
    }
    report = {"suite": "ecgqa", "scoring": "strict", "subsets": {"ecgqa-ptbxl-paraphrased": row}}
    markdown = render_markdown(report)
    assert "| single-verify | 2 | 50.0 [0.0, 100.0] | 50.0 |" in markdown
    assert "| single-query | 1 | 100.0 [100.0, 100.0] | 0.0 |" in markdown
    assert "| ours (strict) | 75.0 [25.0, 100.0] |" in markdown
    assert "| shuffled | +66.7 | [+0.0, +100.0] | 0.5 | 3 |" in markdown
    assert "Published rows" not in markdown  # ECG-QA's own splits: no rows of the PULSE paper
    assert mlflow_metrics(report) == {
        "benchmark/ecgqa-ptbxl-paraphrased/accuracy": 0.75,
        "benchmark/ecgqa-ptbxl-paraphrased/shuffled/accuracy": 0.25,
        "benchmark/ecgqa-ptbxl-paraphrased/gap_shuffled": pytest.approx(2 / 3),
    }
