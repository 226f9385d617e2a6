"""The quickstart recipe end to end through the CLI with the real SmolLM2 backbone: a few steps,
a trainable-only checkpoint, MLflow records, an exact resume, and the evaluation report."""

from __future__ import annotations

import json
import shutil
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


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    """The quickstart trained for 2 steps in a folder of its own (the recipe's relative paths, shards
    and runs, land there); its step-2 checkpoint is also kept as ``step2.ckpt``, which the resume test's
    later checkpoints do not replace. Shared by the tests below, so that each loads SmolLM2 once more
    only (three loads in one test came near the per-test timeout on a busy machine)."""
    folder = tmp_path_factory.mktemp("quickstart")
    # MLflow caches one store per tracking URI string for the whole process, so a relative
    # sqlite:///mlflow.db would reach whichever folder another test used first: use an absolute one.
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    small = [*SMALL, f"--trainer.logger.init_args.tracking_uri={tracking_uri}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        cli = run_cli(["fit", *small, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    last = folder / "runs/quickstart/checkpoints/last.ckpt"
    shutil.copy(last, folder / "step2.ckpt")
    trainable = {n: p.numel() for n, p in cli.model.named_parameters() if p.requires_grad}
    return {
        "folder": folder,
        "small": small,
        "tracking_uri": tracking_uri,
        "last": last,
        "trainable": trainable,
        "encoder_keys": {f"encoder.{k}" for k in cli.model.encoder.state_dict()},
        "connector_keys": {f"connector.{k}" for k in cli.model.connector.state_dict()},
        "full_bytes": sum(t.numel() * t.element_size() for t in cli.model.state_dict().values()),
    }


@pytest.mark.slow
def test_quickstart_trains_checkpoints_and_resumes(quickstart, monkeypatch):
    monkeypatch.chdir(quickstart["folder"])
    small, ckpt_path = quickstart["small"], quickstart["last"]
    ckpt = torch.load(quickstart["folder"] / "step2.ckpt", weights_only=False, map_location="cpu")
    trainable = set(quickstart["trainable"])
    assert {n.split(".")[0] for n in trainable} == {"connector"}
    # Trainable weights, plus the frozen encoder that has no pretrained source; never the LLM.
    assert set(ckpt["state_dict"]) == trainable | quickstart["encoder_keys"] | quickstart["connector_keys"]
    assert ckpt["global_step"] == 2
    for key in ("optimizer_states", "lr_schedulers", "loops", "hyper_parameters", "ecglm"):
        assert key in ckpt, key
    assert (quickstart["folder"] / "step2.ckpt").stat().st_size < 0.05 * quickstart["full_bytes"]
    assert not list(ckpt_path.parent.glob("*.tmp*"))

    # Resume: the weights at restart are exactly the checkpoint's, and the step count goes on.
    resumed = run_cli([*small, "--trainer.max_steps", "4"], run=False)
    probe = WeightProbe()
    resumed.trainer.callbacks.append(probe)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(quickstart["folder"] / "step2.ckpt"))
    assert resumed.trainer.global_step == 4
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(probe.weights[name], value, rtol=0, atol=0)
    ckpt2 = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert ckpt2["global_step"] == 4
    adam_steps = {int(s["step"]) for s in ckpt2["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4}  # optimizer state was restored, not restarted

    # MLflow: parameter counts and the resolved config of the first run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(quickstart["tracking_uri"])
    experiment = client.get_experiment_by_name("quickstart")
    first = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])[0]
    assert int(first.data.params["params_trainable"]) == sum(quickstart["trainable"].values())
    assert "train/loss" in first.data.metrics
    assert "config_fit.yaml" in {a.path for a in client.list_artifacts(first.info.run_id)}


@pytest.mark.slow
def test_quickstart_evaluation_reports_every_condition_and_seed(quickstart, monkeypatch):
    monkeypatch.chdir(quickstart["folder"])
    tmp_path = quickstart["folder"]
    # Evaluation protocol: two seeds, the no-signal ablations, a report in every format.
    summary = run_evaluate(
        [
            *quickstart["small"],
            "--ckpt_path",
            str(tmp_path / "step2.ckpt"),
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(quickstart["tracking_uri"])
    experiment = client.get_experiment_by_name("quickstart")
    last = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    assert "eval/ecg/synthetic-heart-qa/acc" in last.data.metrics
    assert "evaluation/report.md" in {a.path for a in client.list_artifacts(last.info.run_id, "evaluation")}
