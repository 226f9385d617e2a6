"""GRPO and DPO runs interrupted and resumed from their checkpoint end where the uninterrupted run ends:
the same trainable weights and the same logged values at every step (``ecglm fit`` with a tiny random
Llama; DPO on pair shards built by :class:`~ecglm.data.preferences.PreferencePairs`).

The interruption is a crash at a chosen step, not a shorter ``max_steps``: the learning-rate schedule
spans ``max_steps``, so a run told to stop at step 3 is another run (a cosine decayed over 3 steps),
and its resume could not end as the 6-step run does."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ecglm.commands.lightning import run_cli
from ecglm.data.preferences import PreferencePairs
from ecglm.data.shards import read_manifest
from ecglm.data.synthetic import SyntheticHeartQA
from ecglm.rewards import Reward
from ecglm.testing import TINY_ENCODER, saved_causal_lm


class AnswerLengthReward(Reward):
    """Longer answers score more: a reward that a tiny random model's samples differ in (exact match would
    be 0 for all, leaving every advantage 0 and the weights unmoved)."""

    default_name = "answer_length"

    def score(self, items):
        return [len(item.completion) / 10 for item in items]


class Interrupted(RuntimeError):
    """The crash :class:`CrashAt` stands for (a killed job, a lost node)."""


class CrashAt(pl.Callback):
    """Crashes the run when it reaches ``step``, after the checkpoint of the step before was written."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted(f"crashed at step {self.step}")


STEPS = 6  # 4 steps per epoch (8 ECGs, 2 questions each, batch 4): the resume crosses an epoch end


@pytest.fixture(scope="module")
def llm_dir(tokenizer_dir, tmp_path_factory) -> str:
    return saved_causal_lm(tmp_path_factory.mktemp("llm"), tokenizer_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ptb_record) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "synthetic"  # beats cut from a real record: fast
    SyntheticHeartQA(num_train=8, num_val=2, num_test=2, beat_source=str(ptb_record)).build(folder)
    return folder


@pytest.fixture(scope="module")
def pair_shards(shards, tmp_path_factory) -> Path:
    """Every training question of ``shards`` as a pair: its answer chosen, another answer rejected."""
    folder = tmp_path_factory.mktemp("pairs")
    other = {"regular": "irregular", "irregular": "regular", "bradycardia": "normal", "normal": "tachycardia",
             "tachycardia": "bradycardia"}  # fmt: skip
    lines = []
    for entry in read_manifest(shards)["splits"]["train"]["shards"]:
        with tarfile.open(shards / entry["path"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(io.BytesIO(tar.extractfile(member).read()))
                    for qa in meta["qa"]:
                        pair = {"record": member.name.split(".")[0], "question": qa["question"]}
                        lines.append({**pair, "chosen": qa["answer"], "rejected": other[qa["answer"]]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    PreferencePairs(pairs=[str(folder / "pairs.jsonl")], ecg_shards=str(shards)).build(folder / "shards")
    return folder / "shards"


OBJECTIVES = {
    # Two optimisation steps per rollout: the run is interrupted between the two steps of one rollout,
    # and then samples new rollouts (seeded by the step) after the resume.
    "grpo": {
        "group_size": 2,
        "max_new_tokens": 3,
        "steps_per_rollout": 2,
        "beta": 0.04,
        "rewards": [{"class_path": "test_rl_resume.AnswerLengthReward"}],
    },
    "dpo": {"beta": 0.1},
}
LOGGED = {
    "grpo": ["train/loss", "train/kl", "train/clip_fraction", "train/reward", "train/answer_length"],
    "dpo": ["train/loss", "train/rewards/chosen", "train/rewards/margin"],
}


def _recipe(
    tmp_path: Path, name: str, llm_dir: str, data_dir: Path, objective: str, crash_at: int | None = None
) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "encoder": {"class_path": "wav2vec2", "init_args": TINY_ENCODER},
            "connector": {"class_path": "mlp", "init_args": {"num_tokens": 1}},
            "backbone": {"class_path": "hf", "init_args": {"model": llm_dir, "dtype": "float32"}},
            "objective": {"class_path": objective, "init_args": OBJECTIVES[objective]},
            "learning_rate": 0.01,
            "warmup_steps": 1,
            "evaluation": {"metrics": ["acc"]},
        },
        "data": {
            "class_path": "ecglm.data.datamodule.ECGQADataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 4, "eval_batch_size": 4, "num_workers": 0},
        },
        "trainer": {
            "max_steps": STEPS,
            "accelerator": "cpu",
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / name),
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {"experiment_name": "rl", "tracking_uri": f"sqlite:///{tmp_path / name}.db"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / name / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                }
            ]
            + [{"class_path": "test_rl_resume.CrashAt", "init_args": {"step": crash_at}}] * bool(crash_at),
        },
    }
    path = tmp_path / f"{name}{'-crashing' if crash_at else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _history(tmp_path: Path, name: str, key: str) -> dict[int, float]:
    """``{step: value}`` of one metric of the run's single MLflow run."""
    client = MlflowClient(f"sqlite:///{tmp_path / name}.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rl").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
def test_a_resumed_run_ends_with_the_weights_and_logs_of_the_uninterrupted_run(
    objective, llm_dir, request, tmp_path
):
    data = request.getfixturevalue("shards" if objective == "grpo" else "pair_shards")
    whole = run_cli(["fit", "--config", str(_recipe(tmp_path, "whole", llm_dir, data, objective))])
    # Crashed at step 3: for GRPO between the two optimisation steps of the rollout sampled at step 2.
    with pytest.raises(Interrupted):
        run_cli(["fit", "--config", str(_recipe(tmp_path, "cut", llm_dir, data, objective, crash_at=3))])
    assert sorted(p.name for p in (tmp_path / "cut" / "ckpt").glob("*step=*")) == [
        f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)
    ]
    cut = _recipe(tmp_path, "cut", llm_dir, data, objective)
    resumed = run_cli(["fit", "--config", str(cut), "--ckpt_path", "last"])
    assert whole.trainer.global_step == resumed.trainer.global_step == STEPS

    ends = [torch.load(tmp_path / n / "ckpt" / "last.ckpt", weights_only=True) for n in ("whole", "cut")]
    assert ends[0]["global_step"] == ends[1]["global_step"] == STEPS
    trainable = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(ends[0]["state_dict"])
    start = whole.model.objective.reference  # the weights the runs started from
    for name in trainable:
        torch.testing.assert_close(
            ends[1]["state_dict"][name], ends[0]["state_dict"][name], rtol=0, atol=1e-7
        )
    assert any(not torch.equal(ends[0]["state_dict"][n], start[n]) for n in trainable)  # it did train
    for key in LOGGED[objective]:
        uninterrupted, interrupted = _history(tmp_path, "whole", key), _history(tmp_path, "cut", key)
        assert len(uninterrupted) == STEPS, key  # GRPO: each step logs the rollout it optimises
        assert interrupted == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7), key
