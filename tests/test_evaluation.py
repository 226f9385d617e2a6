"""The evaluation protocol: seeded test subsets, metrics per condition and dataset, the seed summary,
the report, and ``ecglm evaluate`` end to end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ecglm.data.datamodule import ECGQADataModule, subset_fraction
from ecglm.data.shards import write_manifest, write_shards
from ecglm.evaluation import (
    AnswerEvaluation,
    EvaluationProtocol,
    MetricsConfig,
    mean_std,
    plot_metrics,
    render_markdown,
    summarize,
)
from ecglm.metrics import plot_confusion
from ecglm_testing import SHARED_DATA, TINY, shared_data

REPO = Path(__file__).resolve().parents[1]
#: Two datasets of the mixture, in the layout the shard builders write.
DATASETS = {"ecgqa-ptbxl": 30, "pulse-ecg-instruct": 20}
PTBXL_QA = [
    ("Which diagnostic superclasses does this ECG show?", ["none"], "single-query"),
    ("Does this ECG show first degree av block?", ["yes"], "single-verify"),
]
PULSE_QA = [("Write the report of this ECG.", "sinus rhythm, left ventricular hypertrophy", "report")]


def _samples(dataset: str, split: str, n: int):
    rng = np.random.default_rng([len(dataset), len(split)])
    for i in range(n):
        qa = PTBXL_QA if dataset == "ecgqa-ptbxl" else PULSE_QA
        yield {
            "__key__": f"{dataset}_{split}_{i:04d}",
            "ecg.npy": rng.standard_normal((12, 2500)).astype(np.float16),
            "json": {
                "dataset": dataset,
                "record_id": str(i),
                # Half the ECGs answer the yes/no question "no": both classes for the AUROC.
                "qa": [
                    {"question": q, "answer": ["no"] if a == ["yes"] and i % 2 else a, "question_type": t}
                    for q, a, t in qa
                ],
            },
        }


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixture")
    splits = {}
    for split, scale in (("train", 1), ("val", 0.2), ("test", 1)):
        shards, datasets = [], {}
        for dataset, n in DATASETS.items():
            n = max(2, int(n * scale))
            shards += write_shards(_samples(dataset, split, n), out, f"{split}-{dataset}", 8)
            datasets[dataset] = n * (2 if dataset == "ecgqa-ptbxl" else 1)
        splits[split] = {
            "num_qa": sum(datasets.values()),
            "datasets": datasets,
            "question_types": sorted({t for _, _, t in PTBXL_QA + PULSE_QA}),
            "shards": shards,
        }
    write_manifest(out, {"dataset": "mixture", "splits": splits})
    return out


@pytest.fixture(scope="module")
def formatter(tokenizer_dir):
    from transformers import AutoTokenizer

    from ecglm.prompts import ChatTemplate

    return ChatTemplate(AutoTokenizer.from_pretrained(tokenizer_dir), "Answer briefly.")


def _test_keys(dm: ECGQADataModule) -> list[str]:
    return [key for batch in dm.test_dataloader() for key in batch.key]


def test_subset_is_fixed_by_seed_whatever_the_worker_split(mixture_dir, formatter):
    dm = ECGQADataModule(str(mixture_dir), eval_batch_size=7, num_workers=0)
    dm.setup("test")
    dm.attach(formatter, 1)
    assert dm.eval_groups("test") == (
        ["ecgqa-ptbxl", "pulse-ecg-instruct"],
        ["report", "single-query", "single-verify"],
    )
    everything = _test_keys(dm)
    assert len(everything) == 80 and len(set(everything)) == 80

    expected = dm.set_test_subset({"ecgqa-ptbxl": 20, "pulse-ecg-instruct": 100}, seed=0)
    assert expected == {"ecgqa-ptbxl": 20, "pulse-ecg-instruct": 20}  # capped by what exists
    seed0 = _test_keys(dm)
    dm.num_workers = 2
    assert sorted(_test_keys(dm)) == sorted(seed0)  # same subset when two workers share the shards
    dm.num_workers = 0
    assert all(k in everything for k in seed0)
    assert sum(k.startswith("pulse") for k in seed0) == 20  # rate 1: the whole dataset
    ptbxl = [k for k in seed0 if k.startswith("ecgqa")]
    assert 8 <= len(ptbxl) <= 32  # Binomial(60, 1/3): mean 20, sd 3.7
    dm.set_test_subset(20, seed=1)
    assert set(_test_keys(dm)) != set(seed0)
    dm.set_test_subset(None, seed=1)
    assert _test_keys(dm) == everything


def test_the_test_loop_answers_the_split_the_protocol_names(mixture_dir, formatter):
    """evaluate.split: train answers the training questions (DPO's pairs come from the model's mistakes on
    them); the subset and the report's groups follow that split, and an unknown split is refused."""
    dm = ECGQADataModule(str(mixture_dir), eval_batch_size=7, num_workers=0)
    dm.setup("test")
    dm.attach(formatter, 1)
    assert dm.set_test_subset(None, seed=0, split="train") == {"ecgqa-ptbxl": 60, "pulse-ecg-instruct": 20}
    train = _test_keys(dm)
    assert len(train) == 80 and all("_train_" in k for k in train)
    assert dm.set_test_subset(None, seed=0, split="val") == {"ecgqa-ptbxl": 12, "pulse-ecg-instruct": 4}
    assert all("_val_" in k for k in _test_keys(dm))
    dm.set_test_subset(None, seed=0)  # the default goes back to the held-out questions
    assert all("_test_" in k for k in _test_keys(dm))
    with pytest.raises(ValueError, match=r"evaluate\.split is 'dev'"):
        dm.set_test_subset(None, seed=0, split="dev")
    with pytest.raises(ValueError, match=r"give one of \['train', 'val', 'test'\]"):
        EvaluationProtocol(split="training")


def test_subset_fraction_is_uniform():
    u = np.array([subset_fraction(3, f"key{i}") for i in range(20_000)])
    assert u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov distance to U(0, 1); the 99.9% critical value for n = 20,000 is 0.0138.
    ecdf = np.arange(1, u.size + 1) / u.size
    assert np.abs(np.sort(u) - ecdf).max() < 0.0138
    assert subset_fraction(3, "key0") == subset_fraction(3, "key0") != subset_fraction(4, "key0")


def _batch(references, datasets, types):
    """The per-row fields of an ECGQABatch that evaluation reads."""
    return SimpleNamespace(
        key=[f"k{i}" for i in range(len(references))],
        answer=references,
        dataset=datasets,
        question_type=types,
    )


def test_answer_evaluation_scores_each_condition_and_dataset():
    vocabulary = ["left ventricular hypertrophy", "first degree av block", "normal", "none"]
    config = MetricsConfig(
        metrics=("acc", "f1", "bleu4"), bertscore_model=None, label_vocabularies={"b": vocabulary}
    )
    evaluation = AnswerEvaluation(config, ["a", "b"], ["verify", "query"])
    references = [["yes"], ["none"], ["left ventricular hypertrophy", "first degree av block"], "normal"]
    batch = _batch(references, ["a", "a", "b", "b"], ["verify", "query", "query", "verify"])
    evaluation.update(
        "ecg", ["Yes.", "none", "first degree AV block, left ventricular hypertrophy", "x"], batch
    )
    evaluation.update("zeroed_ecg", ["no", "none", "none", "normal"], batch)
    evaluation.update("text_only", ["no", "no", "none", "abnormal"], batch)
    result = evaluation.compute()

    ecg = result["conditions"]["ecg"]
    assert ecg["datasets"]["a"]["acc"] == 1.0 and ecg["datasets"]["b"]["acc"] == 0.5
    assert ecg["datasets"]["all"]["acc"] == 0.75 and ecg["datasets"]["all"]["n"] == 4
    assert ecg["question_types"]["query"]["acc"] == 1.0 and ecg["question_types"]["verify"]["acc"] == 0.5
    zeroed = result["conditions"]["zeroed_ecg"]["datasets"]
    assert zeroed["a"]["acc"] == 0.5 and zeroed["b"]["acc"] == 0.5
    assert result["conditions"]["text_only"]["datasets"]["all"]["acc"] == 0.0
    assert len(result["records"]) == 12
    assert [r["correct"] for r in result["records"][:4]] == [True, True, True, False]
    assert result["conditions"]["ecg"]["failure_modes"]["num_wrong"] == 1
    # Binary abnormality: "yes" and the diagnosis list are abnormal; "none" and "normal" are not.
    abnormal = result["conditions"]["zeroed_ecg"]["abnormality"]["b"]
    assert abnormal["sensitivity"] == 0.0 and abnormal["specificity"] == 1.0

    # Label sets on "b" (hand-computed): per-label F1 1, 1, 0 (missed "normal"), 0 (never used) -> 0.5;
    # one wrong cell of 2 x 4 -> Hamming 0.125; "x" is one of 3 predicted items and not in the vocabulary.
    assert set(ecg["label_sets"]) == {"b"}
    assert ecg["label_sets"]["b"] == pytest.approx(
        {"macro_f1": 0.5, "hamming_loss": 0.125, "out_of_vocabulary": 1 / 3, "n": 2.0}
    )

    evaluation.reset()
    assert evaluation.records == []
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['c'\]"):
        evaluation.update("ecg", ["yes"], _batch(["yes"], ["c"], ["verify"]))


def _result(acc_ecg: float, acc_zeroed: float) -> dict:
    def entry(acc):
        return {
            "datasets": {"d": {"n": 10.0, "acc": acc, "f1": acc}},
            "abnormality": {"d": {"n": 10.0, "sensitivity": acc, "confusion": [[1, 2], [3, 4]]}},
            "question_types": {},
        }

    return {"conditions": {"ecg": entry(acc_ecg), "zeroed_ecg": entry(acc_zeroed)}, "records": []}


def test_summary_gives_mean_and_sample_std_over_seeds_and_the_ablation_gap(tmp_path):
    summary = summarize([_result(0.6, 0.3), _result(0.7, 0.3), _result(0.8, 0.6)])
    acc = summary["conditions"]["ecg"]["datasets"]["d"]["acc"]
    assert acc["mean"] == pytest.approx(0.7) and acc["std"] == pytest.approx(0.1) and acc["n_seeds"] == 3
    gap = summary["gaps"]["ecg_minus_zeroed_ecg"]["d"]["acc"]
    assert gap["mean"] == pytest.approx(0.3) and gap["std"] == pytest.approx(0.1)
    assert mean_std([0.5])["std"] == 0.0 and math.isnan(mean_std([])["mean"])

    text = render_markdown(summary, {"ckpt_path": "x.ckpt", "seeds": [0, 1, 2]})
    assert "| d | 10 | 70.0 ± 10.0 | 70.0 ± 10.0 |" in text
    assert "## Gap `ecg - zeroed_ecg` (points)" in text
    assert plot_metrics(summary, tmp_path / "m.png").stat().st_size > 1000
    assert plot_confusion({"d": [[1, 2], [3, 4]]}, tmp_path / "c.png").stat().st_size > 1000


def _recipe_args(mixture_dir: Path, tokenizer_dir: str) -> list[str]:
    """The quickstart recipe with a tiny random Llama on the mixture; relative paths land in the cwd."""
    overrides = json.dumps({**TINY, "vocab_size": 49152})
    return [
        "--config",
        str(REPO / "recipes/quickstart.yaml"),
        "--model.backbone.init_args.model=llama",
        f"--model.backbone.init_args.tokenizer={tokenizer_dir}",
        "--model.backbone.init_args.gguf_file=null",
        "--model.backbone.init_args.random_init=true",
        f"--model.backbone.init_args.config_overrides={overrides}",
        "--model.val_generation_samples=6",
        "--model.decoding.max_new_tokens=3",
        '--model.evaluation.label_vocabularies={"ecgqa-ptbxl": ["none", "yes", "no"]}',
        "--data.class_path=ecglm.data.datamodule.ECGQADataModule",
        f"--data.init_args.data_dir={mixture_dir}",
        "--data.init_args.builder=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=16",
        "--trainer.limit_val_batches=1",
    ]


def test_evaluate_command_writes_the_report(mixture_dir, tokenizer_dir, tmp_path, monkeypatch):
    from ecglm.commands.lightning import run_cli, run_evaluate

    monkeypatch.chdir(tmp_path)
    # Absolute: MLflow caches its store per URI string, and other tests use the recipe's relative one.
    args = [
        *_recipe_args(mixture_dir, tokenizer_dir),
        f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    fit = run_cli(["fit", *args])
    # Validation scored generated answers with the evaluation metrics, and the answer-token stats.
    for name in ("val/acc", "val/f1", "val/bleu4", "val/token_accuracy", "val/mean_entropy"):
        assert torch.isfinite(fit.trainer.callback_metrics[name]), name

    with pytest.raises(ValueError, match="needs a checkpoint"):
        run_evaluate([*args, "--evaluate.ckpt_path=null"])
    summary = run_evaluate(
        [*args, "--ckpt_path", "last", "--evaluate.seeds=[0, 1]", "--evaluate.samples_per_dataset=20"]
    )
    out = tmp_path / "runs/quickstart/evaluation"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["seeds"] == [0, 1] and report["meta"]["decoding"]["max_new_tokens"] == 3
    assert "ecglm.data.datamodule.ECGQADataModule" in report["config"]
    ecg = summary["conditions"]["ecg"]["datasets"]
    assert set(ecg) == {"ecgqa-ptbxl", "pulse-ecg-instruct", "all"}
    assert ecg["pulse-ecg-instruct"]["n"]["mean"] == 20  # every PULSE pair: fewer than asked
    assert ecg["pulse-ecg-instruct"]["n"]["std"] == 0.0
    # Each seed drew its own PTB-XL subset (Binomial(60, 1/3) each; equal sizes would be a coincidence
    # we tolerate, equal key sets would not).
    keys = [
        {json.loads(line)["key"] for line in (out / f"predictions_seed{s}.jsonl").read_text().splitlines()}
        for s in (0, 1)
    ]
    assert keys[0] != keys[1]
    subsets = json.loads((out / "eval_subset.json").read_text())  # the IDs another lab can re-draw
    assert {k for keys_ in subsets["1"].values() for k in keys_} == keys[1]
    assert len(subsets["0"]["pulse-ecg-instruct"]) == 20
    assert set(summary["conditions"]) == {"ecg", "shuffled_ecg", "zeroed_ecg", "text_only"}
    assert set(summary["gaps"]) == {"ecg_minus_shuffled_ecg", "ecg_minus_zeroed_ecg", "ecg_minus_text_only"}
    # Every question of the shuffled control was answered with another record's ECG.
    shuffled = [
        json.loads(line)
        for line in (out / "predictions_seed0.jsonl").read_text().splitlines()
        if json.loads(line)["condition"] == "shuffled_ecg"
    ]
    assert shuffled and all(r["donor"] not in (None, r["key"].rsplit("_qa", 1)[0]) for r in shuffled)
    assert set(report["meta"]["intervals"]["gaps"]) == set(summary["gaps"])
    # ECG-QA's yes/no questions: the AUROC of P(yes) under every condition.
    for condition in summary["conditions"]:
        auc = summary["conditions"][condition]["verify_auc"]["ecgqa-ptbxl"]["auc"]["mean"]
        assert 0.0 <= auc <= 1.0, condition
    text = (out / "report.md").read_text()
    assert "AUROC of the probability" in text
    assert (
        "| ecgqa-ptbxl |" in text and "Binary abnormality detection" in text and "Label-set answers" in text
    )
    assert set(summary["conditions"]["ecg"]["label_sets"]) == {"ecgqa-ptbxl"}
    for name in ("report.md", "report.json", "metrics.png", "confusion_ecg.png", "predictions_seed1.jsonl"):
        assert (out / name).exists(), name


def test_label_vocabulary_reads_ecgqa_answer_files(tmp_path):
    from ecglm.evaluation import read_vocabulary

    real = shared_data(SHARED_DATA / "ecgqa-sample/ptbxl-answers.csv", "the ECG-QA answer vocabulary")
    vocabulary = read_vocabulary(str(real))
    assert vocabulary[:3] == ["no", "not sure", "yes"] and "none" in vocabulary
    config = MetricsConfig(bertscore_model=None, label_vocabularies={"ecgqa-ptbxl": str(real)})
    assert config.vocabulary("ecgqa-ptbxl") == vocabulary and config.vocabulary("other") is None
    (tmp_path / "bad.csv").write_text("index,label\n0,no\n")
    with pytest.raises(ValueError, match="no `class` column"):
        read_vocabulary(str(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="label_vocabularies"):
        read_vocabulary(str(tmp_path / "missing.csv"))
