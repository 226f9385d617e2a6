"""``ecglm evaluate``: :class:`EvaluationProtocol` runs a model over seeds and writes the report
(Markdown, JSON, per-answer predictions, plots), attached to the MLflow run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from ecglm.data.splits import SPLITS
from ecglm.evaluation.intervals import intervals
from ecglm.evaluation.judging import build_judge, judge_answers
from ecglm.evaluation.markdown import render_markdown
from ecglm.evaluation.plots import _summed_confusion, plot_metrics
from ecglm.evaluation.summary import summarize
from ecglm.evaluation.tracking import _log_to_mlflow
from ecglm.io import atomic_write_bytes
from ecglm.judges import Judge
from ecglm.metrics import plot_confusion

DEFAULT_SAMPLES_PER_DATASET = {
    "ecgqa-ptbxl": 20_000,
    "ecgqa-mimic-iv-ecg": 20_000,
    "pulse-ecg-instruct": 5_000,
}


@dataclass
class EvaluationProtocol:
    """``ecglm evaluate``: a trained model over the test split for several seeds, beside the ablations.

    Each seed draws its own subset of about ``samples_per_dataset`` QA pairs per dataset (see
    :meth:`ecglm.data.datamodule.ECGQADataModule.set_test_subset`) and seeds any sampling in
    decoding; the report gives mean ± std over seeds for every metric and condition.

    Args:
        ckpt_path: Checkpoint to evaluate (trainable weights only, as ``ecglm fit`` writes them), or
            ``last`` / ``best`` to take it from the recipe's ModelCheckpoint.
        seeds: One evaluation per seed.
        samples_per_dataset: QA pairs per dataset (an int for all, or a dict by dataset name; a
            dataset not named is evaluated in full); ``null`` evaluates everything.
        out_dir: Report folder (default ``<trainer.default_root_dir>/evaluation``).
        judge: A judge (entry-point group ``ecglm.judges``, e.g. ``local``) that scores the generated
            answers of its datasets and conditions against their references (:mod:`ecglm.judges`);
            ``None``: no judge.
        split: The split answered: ``test`` (held out); ``train`` to find the model's mistakes on its
            training questions (the preference pairs DPO trains on, ``ecglm.data.preferences``) or
            ``val``. The report states it.
    """

    ckpt_path: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    samples_per_dataset: dict[str, int] | int | None = field(
        default_factory=lambda: dict(DEFAULT_SAMPLES_PER_DATASET)
    )
    out_dir: str | None = None
    judge: Judge | None = None
    split: str = "test"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"evaluate.split is {self.split!r}: give one of {list(SPLITS)}")

    def run(
        self, trainer: L.Trainer, model: L.LightningModule, datamodule: Any, config_text: str = ""
    ) -> dict[str, Any]:
        if not self.seeds:
            raise ValueError("evaluate.seeds is empty: give at least one seed")
        if self.ckpt_path is None:
            raise ValueError(
                "ecglm evaluate needs a checkpoint: --ckpt_path PATH (or `last` / `best` from the "
                "recipe's ModelCheckpoint)"
            )
        per_seed, expected = [], []
        for seed in self.seeds:
            L.seed_everything(seed, verbose=False)
            expected.append(datamodule.set_test_subset(self.samples_per_dataset, seed, split=self.split))
            trainer.test(model, datamodule=datamodule, ckpt_path=self.ckpt_path, verbose=False)
            per_seed.append(model.evaluation_result)
        summary = summarize(per_seed)
        if trainer.is_global_zero:
            self.write_report(trainer, model, per_seed, summary, expected, config_text)
        return summary

    def write_report(
        self,
        trainer: L.Trainer,
        model: L.LightningModule,
        per_seed: list[dict[str, Any]],
        summary: dict[str, Any],
        expected: list[dict[str, int]],
        config_text: str,
    ) -> Path:
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "evaluation")
        out_dir.mkdir(parents=True, exist_ok=True)
        decoding = asdict(model.decoding) if hasattr(model, "decoding") else {}
        first_ecg = per_seed[0]["conditions"]["ecg"]
        meta = {
            "ckpt_path": self.ckpt_path,
            # Which training stages produced the evaluated weights (SFT, GRPO, DPO), as its checkpoint says.
            "training": getattr(getattr(model, "model", None), "training_stages", None),
            "seeds": self.seeds,
            "split": self.split,
            "samples_per_dataset": self.samples_per_dataset,
            "expected_samples": expected,
            "decoding": decoding,
            "failure_modes": first_ecg.get("failure_modes"),
            "intervals": intervals(per_seed),
        }
        judge = build_judge(self.judge)
        if judge is not None:
            meta["judge"], verdicts = judge_answers(judge, per_seed)
            lines = "".join(json.dumps(v) + "\n" for v in verdicts)
            judged_file = atomic_write_bytes(out_dir / "judge.jsonl", lines.encode())
        files = []
        for seed, result in zip(self.seeds, per_seed, strict=True):
            lines = "".join(json.dumps(r) + "\n" for r in result["records"])
            files.append(atomic_write_bytes(out_dir / f"predictions_seed{seed}.jsonl", lines.encode()))
        # The questions each seed evaluated, by dataset: what another lab needs to score the same subset.
        subsets = {
            str(seed): {
                dataset: sorted({r["key"] for r in result["records"] if r["dataset"] == dataset})
                for dataset in sorted({r["dataset"] for r in result["records"]})
            }
            for seed, result in zip(self.seeds, per_seed, strict=True)
        }
        files.append(atomic_write_bytes(out_dir / "eval_subset.json", json.dumps(subsets, indent=1).encode()))
        report = {
            "meta": meta,
            "summary": summary,
            "per_seed": [{k: v for k, v in r.items() if k != "records"} for r in per_seed],
            "config": config_text,
        }
        if judge is not None:
            files.append(judged_file)
        files.append(atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2).encode()))
        text = render_markdown(summary, meta)
        files.append(atomic_write_bytes(out_dir / "report.md", text.encode()))
        files.append(plot_metrics(summary, out_dir / "metrics.png"))
        for c in summary["conditions"]:
            confusion = _summed_confusion(per_seed, c)
            if confusion:
                files.append(plot_confusion(confusion, out_dir / f"confusion_{c}.png"))
        print(text)
        print(f"report: {out_dir / 'report.md'}")
        _log_to_mlflow(trainer, summary, files)
        return out_dir
