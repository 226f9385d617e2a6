"""Killed, crashed and resumed runs through the ``ecglm`` CLI with a tiny real model: a kill mid-save leaves
nothing in the system temp folder and the previous checkpoint intact; ``--ckpt_path last`` takes the
furthest-trained complete checkpoint; a resumed fit logs into the MLflow run it left; an unsafe
checkpoint is refused before the LLM is built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient

from ecglm import callbacks as ecglm_callbacks
from ecglm import resume
from ecglm.backbones import HFBackbone
from ecglm.commands import main
from ecglm.commands.lightning import run_cli, run_evaluate
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.testing import TINY_ENCODER, saved_causal_lm


@pytest.fixture(scope="module")
def llm_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a hub model folder."""
    return saved_causal_lm(tmp_path_factory.mktemp("llm"), tokenizer_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards") / "synthetic"
    SyntheticHeartQA(num_train=8, num_val=2, num_test=2).build(folder)
    return str(folder)


@pytest.fixture
def recipe(llm_dir, shards, tmp_path) -> Path:
    """A fit recipe whose run folder, checkpoints and MLflow store are in ``tmp_path``: four training
    steps per epoch (8 ECGs, 2 questions each, batch 4), a checkpoint after every step."""
    config = {
        "seed_everything": 0,
        "model": {
            "encoder": {"class_path": "wav2vec2", "init_args": TINY_ENCODER},
            "connector": {"class_path": "mlp", "init_args": {"num_tokens": 1}},
            "backbone": {"class_path": "hf", "init_args": {"model": llm_dir, "dtype": "float32"}},
            "learning_rate": 0.001,
            "evaluation": {"metrics": ["acc"]},
        },
        "data": {
            "class_path": "ecglm.data.datamodule.ECGQADataModule",
            "init_args": {"data_dir": shards, "batch_size": 4, "eval_batch_size": 4},
        },
        "trainer": {
            "max_epochs": 3,
            "accelerator": "cpu",
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                # MLflow caches one store per URI string per process: an absolute, per-test path.
                "init_args": {
                    "experiment_name": "runs",
                    "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                },
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                }
            ],
        },
        "evaluate": {"seeds": [0], "out_dir": str(tmp_path / "evaluation")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _runs(tmp_path: Path, db: str = "mlflow.db") -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / db}")
    experiment = client.get_experiment_by_name("runs")
    return client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


def _losses_by_step(tmp_path: Path, run_id: str) -> list[int]:
    """Steps with a logged training loss (a step retrained after a kill may be logged twice)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})


def _metric_steps(tmp_path: Path, run_id: str, key: str = "train/loss") -> list[int]:
    """Every logged step of ``key``, repeats included."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


#: Runs ``ecglm`` and dies (os._exit: no cleanup, as under SIGKILL) when a save renames a file into
#: ``epoch=0-step=2.ckpt``: after the checkpoint's bytes are written, before it is in place.
KILLED_AT_SECOND_SAVE = textwrap.dedent(
    """
    import os, shutil, sys
    from ecglm.commands import main

    def dies_at_step_2(rename):
        def wrapped(src, dst, *args, **kwargs):
            if str(dst).endswith("step=2.ckpt"):
                os._exit(137)
            return rename(src, dst, *args, **kwargs)
        return wrapped

    os.replace, os.rename, shutil.move = map(dies_at_step_2, (os.replace, os.rename, shutil.move))
    main(sys.argv[1:])
    """
)


def test_a_kill_mid_save_leaves_no_temp_file_and_the_resume_continues_the_run(recipe, tmp_path):
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp), "HF_HUB_OFFLINE": "1"}
    args = ["fit", "--config", str(recipe), "--trainer.max_steps", "3"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_SECOND_SAVE, *args], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    ckpt = tmp_path / "ckpt"

    assert sorted(p.name for p in system_tmp.iterdir()) == []  # the partial file is not in the temp folder
    assert not (ckpt / "epoch=0-step=2.ckpt").exists()
    assert _step(ckpt / "epoch=0-step=1.ckpt") == 1 and _step(ckpt / "last.ckpt") == 1
    assert [p.name for p in ckpt.glob("*.tmp")] == ["epoch=0-step=2.ckpt.tmp"]  # beside its target
    (killed_run,) = _runs(tmp_path)
    assert killed_run.info.status == "RUNNING"  # a killed process cannot end its run

    cli = run_cli(["fit", "--config", str(recipe), "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert Path(cli.trainer.ckpt_path).name in ("last.ckpt", "epoch=0-step=1.ckpt")
    assert cli.trainer.global_step == 3
    assert not list(ckpt.glob("*.tmp"))  # the killed save's leftover is removed at the next start
    (run,) = _runs(tmp_path)  # one MLflow run across the kill
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    assert _losses_by_step(tmp_path, run.info.run_id) == [0, 1, 2]
    # Step 1 was retrained (its checkpoint was never completed) and step 0 logged before the kill:
    # the resume logs neither twice.
    assert _metric_steps(tmp_path, run.info.run_id) == [0, 1, 2]
    saved = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and saved["mlflow"]["run_id"] == run.info.run_id


#: Runs ``ecglm`` and dies once ``last.ckpt`` of step 2 is in place: both checkpoints of the step are
#: complete, and the step's metrics, which Lightning logs after its checkpoint callbacks, never were.
KILLED_AFTER_SECOND_SAVE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ecglm.commands import main

    replace = os.replace

    def dies_after_step_2(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if str(dst).endswith("last.ckpt") and (Path(dst).parent / "epoch=0-step=2.ckpt").exists():
            os._exit(137)

    os.replace = dies_after_step_2
    main(sys.argv[1:])
    """
)


def test_a_step_whose_checkpoint_was_saved_but_whose_metrics_were_not_is_logged_on_resume(recipe, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["fit", "--config", str(recipe), "--trainer.max_steps", "3"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_SECOND_SAVE, *args], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert _step(tmp_path / "ckpt" / "last.ckpt") == 2
    (killed_run,) = _runs(tmp_path)
    assert _losses_by_step(tmp_path, killed_run.info.run_id) == [0]  # the second step's loss is missing
    recorded = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["mlflow"]

    main(["fit", "--config", str(recipe), "--trainer.max_steps", "3", "--ckpt_path", "last"])
    (run,) = _runs(tmp_path)
    assert run.info.run_id == killed_run.info.run_id
    assert _metric_steps(tmp_path, run.info.run_id) == [0, 1, 2]  # no hole, nothing twice
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (loss,) = [m for m in client.get_metric_history(run.info.run_id, "train/loss") if m.step == 1]
    assert loss.value == pytest.approx(recorded["unlogged"]["metrics"]["train/loss"])


class FailsAtStep2(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("node lost")


def test_a_crashed_run_ends_failed_and_its_resume_reopens_it(recipe, tmp_path):
    crashed = run_cli(["--config", str(recipe)], run=False)
    crashed.trainer.callbacks.append(FailsAtStep2())
    with pytest.raises(RuntimeError, match="node lost"):
        crashed.trainer.fit(crashed.model, crashed.datamodule)
    (run,) = _runs(tmp_path)
    assert run.info.status == "FAILED"

    main(["fit", "--config", str(recipe), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    (resumed,) = _runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert _losses_by_step(tmp_path, run.info.run_id) == [0, 1, 2, 3]


def test_a_resumed_run_keeps_params_it_logged_and_records_changed_ones_as_tags(tmp_path):
    """MLflow refuses to change a logged param: a resumed fit whose trainable-parameter counts changed
    (another PEFT policy, a newer ecglm) would fail at its start."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLFlowLogger(experiment_name="runs", tracking_uri=uri)
    first.log_hyperparams({"params_trainable": 6272, "learning_rate": 0.001})
    resumed = ecglm_callbacks.ResumedMLFlowLogger(tracking_uri=uri, run_id=first.run_id)
    with pytest.warns(UserWarning, match=r"params_trainable \(6272 -> 20772\)"):
        resumed.log_hyperparams({"params_trainable": 20772, "learning_rate": 0.001, "warmup_steps": 10})
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.data.params == {"params_trainable": "6272", "learning_rate": "0.001", "warmup_steps": "10"}
    assert run.data.tags["resumed/params_trainable"] == "20772"


def test_a_resume_against_another_tracking_store_starts_a_new_run_tagged_with_the_old_one(recipe, tmp_path):
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "1"])
    (first,) = _runs(tmp_path)
    other_store = f"--trainer.logger.init_args.tracking_uri=sqlite:///{tmp_path / 'other.db'}"
    main(["fit", "--config", str(recipe), other_store, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    (new,) = _runs(tmp_path, "other.db")
    assert new.info.run_id != first.info.run_id
    assert new.data.tags["ecglm.resumed_from_run"] == first.info.run_id


def test_ckpt_path_last_takes_the_furthest_trained_complete_checkpoint(recipe, tmp_path, caplog):
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "3"])
    ckpt = tmp_path / "ckpt"
    # last.ckpt from step 1 (a kill between a step checkpoint and last.ckpt), written after the others,
    # and a newer file cut short by a kill.
    (ckpt / "last.ckpt").write_bytes((ckpt / "epoch=0-step=1.ckpt").read_bytes())
    whole = (ckpt / "epoch=0-step=3.ckpt").read_bytes()
    (ckpt / "epoch=0-step=9.ckpt").write_bytes(whole[: len(whole) // 2])

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(["fit", "--config", str(recipe), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(ckpt / "epoch=0-step=3.ckpt")
    assert cli.trainer.global_step == 4
    assert f"ckpt_path=last: {ckpt / 'epoch=0-step=3.ckpt'} (global step 3, epoch 0)" in caplog.text
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "epoch=0-step=9.ckpt is not a complete checkpoint" in skipped[0]


class RunsCode:
    def __reduce__(self):  # never executed: weights_only refuses to call os.system
        return (os.system, ("echo this file ran code",))


@pytest.mark.parametrize("command", ["fit", "validate", "evaluate"])
def test_an_unsafe_ckpt_path_is_refused_naming_the_global_before_the_llm_is_built(
    command, recipe, tmp_path, monkeypatch
):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, unsafe)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the checkpoint was checked")

    monkeypatch.setattr(HFBackbone, "__init__", no_backbone)
    args = ["--config", str(recipe), "--ckpt_path", str(unsafe)]
    with pytest.raises(Exception, match=r"(posix|os)\.system") as info:
        run_evaluate(args) if command == "evaluate" else run_cli([command, *args])
    assert type(info.value).__name__ == "CheckpointError", info.value  # not torch's raw UnpicklingError
    assert "ecglm fit writes checkpoints of tensors and plain containers only" in str(info.value)

    partial = tmp_path / "partial.ckpt"
    partial.write_bytes(unsafe.read_bytes()[:100])
    with pytest.raises(resume.CheckpointError, match=r"partial\.ckpt is not a complete checkpoint"):
        run_cli(["fit", "--config", str(recipe), "--ckpt_path", str(partial)])
