"""The quickstart recipe end to end through the CLI with the real SmolLM2 backbone: a few steps,
a trainable-only checkpoint, MLflow records, an exact resume, and the evaluation report."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from ecglm.commands.lightning import run_cli, run_evaluate

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
SMALL = [
    "--config",
    str(RECIPE),
    "--data.init_args.builder.init_args.num_train",
    "8",
    "--data.init_args.builder.init_args.num_val",
    "2",
    "--data.init_args.builder.init_args.num_test",
    "2",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.num_workers",
    "0",
    # max_steps ends these runs mid-epoch (4 steps per epoch); the recipe's max_epochs=1 would
    # count the interrupted epoch as done and leave nothing to resume.
    "--trainer.max_epochs",
    "3",
    "--trainer.log_every_n_steps",
    "1",
]


class WeightProbe(L.Callback):
    """Copies the model's state as it is when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: t.detach().clone() for n, t in pl_module.state_dict().items()}


@pytest.mark.slow
def test_quickstart_trains_checkpoints_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths (shards, runs) land here
    # MLflow caches one store per tracking URI string for the whole process, so a relative
    # sqlite:///mlflow.db would reach whichever folder another test used first: use an absolute one.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = [*SMALL, f"--trainer.logger.init_args.tracking_uri={tracking_uri}"]
    cli = run_cli(["fit", *small, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2

    ckpt_path = tmp_path / "runs/quickstart/checkpoints/last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"connector"}
    # Trainable weights, plus the frozen encoder that has no pretrained source; never the LLM.
    assert set(ckpt["state_dict"]) == trainable | {f"encoder.{k}" for k in cli.model.encoder.state_dict()} | {
        f"connector.{k}" for k in cli.model.connector.state_dict()
    }
    assert ckpt["global_step"] == 2
    for key in ("optimizer_states", "lr_schedulers", "loops", "hyper_parameters", "ecglm"):
        assert key in ckpt, key
    full_bytes = sum(t.numel() * t.element_size() for t in cli.model.state_dict().values())
    assert ckpt_path.stat().st_size < 0.05 * full_bytes
    assert not list(ckpt_path.parent.glob("*.tmp*"))

    # Resume: the weights at restart are exactly the checkpoint's, and the step count goes on.
    resumed = run_cli([*small, "--trainer.max_steps", "4"], run=False)
    probe = WeightProbe()
    resumed.trainer.callbacks.append(probe)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(ckpt_path))
    assert resumed.trainer.global_step == 4
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(probe.weights[name], value, rtol=0, atol=0)
    ckpt2 = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert ckpt2["global_step"] == 4
    adam_steps = {int(s["step"]) for s in ckpt2["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4}  # optimizer state was restored, not restarted

    # MLflow: parameter counts and the resolved config of the run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    first = runs[0]
    assert int(first.data.params["params_trainable"]) == sum(
        p.numel() for p in cli.model.parameters() if p.requires_grad
    )
    assert "train/loss" in first.data.metrics
    assert "config_fit.yaml" in {a.path for a in client.list_artifacts(first.info.run_id)}

    # Evaluation protocol: two seeds, the no-signal ablations, a report in every format.
    summary = run_evaluate(
        [
            *small,
            "--ckpt_path",
            str(ckpt_path),
            "--evaluate.seeds",
            "[0, 1]",
            "--evaluate.samples_per_dataset",
            "null",
        ]
    )
    out = tmp_path / "runs/quickstart/evaluation"
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]["conditions"]) == {"ecg", "shuffled_ecg", "zeroed_ecg", "text_only"}
    assert report["summary"] == json.loads(json.dumps(summary))
    predictions = (out / "predictions_seed0.jsonl").read_text().splitlines()
    assert len(predictions) == 2 * 2 * 4  # 2 ECGs x 2 questions x 4 conditions
    # Two records: each question's shuffled ECG is the other record's.
    answers = [json.loads(line) for line in predictions]
    donors = {(r["key"], r["donor"]) for r in answers if r["condition"] == "shuffled_ecg"}
    assert len(donors) == 4 and all(d and not key.startswith(d + "_qa") for key, d in donors)
    ecg = report["summary"]["conditions"]["ecg"]["datasets"]["synthetic-heart-qa"]
    assert set(ecg) == {"n", "acc", "f1", "bleu4", "rouge_l", "meteor", "bertscore_f1"}
    # Every pair evaluated and greedy decoding: both seeds give the same answers.
    assert ecg["n"]["mean"] == 4 and ecg["acc"]["std"] == 0.0
    assert "| synthetic-heart-qa | 4 |" in (out / "report.md").read_text()
    for name in ("metrics.png", "confusion_ecg.png"):
        assert (out / name).stat().st_size > 1000
    assert json.loads((tmp_path / "runs/quickstart/test_report.json").read_text())["records"]
    last = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    assert "eval/ecg/synthetic-heart-qa/acc" in last.data.metrics
    assert "evaluation/report.md" in {a.path for a in client.list_artifacts(last.info.run_id, "evaluation")}
