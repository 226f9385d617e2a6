"""``ECGLanguageModel``: ecglm's one LightningModule, composed of encoder, connector, backbone and policy.

Every PEFT strategy trains through this module; what differs between strategies is the policy
object, not the code path. Checkpoints hold only what cannot be rebuilt from pretrained sources:
trainable parameters, plus every weight of a component that has no pretrained source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor
from transformers import get_scheduler

from ecglm.backbones import Backbone
from ecglm.batch import ECGQABatch
from ecglm.connectors import Connector
from ecglm.encoders import ECGEncoder
from ecglm.evaluation import (
    AnswerEvaluation,
    Decoding,
    MetricsConfig,
    gather_rows,
    render_markdown,
    summarize,
)
from ecglm.io import save_run_file
from ecglm.metrics import AnswerTokenStats
from ecglm.model import ECGLM
from ecglm.objectives import SFT, Objective
from ecglm.objectives.base import training_stages
from ecglm.peft import PEFTPolicy, count_parameters
from ecglm.plugins import component_provenance
from ecglm.version import __version__


class ECGLanguageModel(L.LightningModule):
    """An ECG-language model: ``backbone(prompt with connector(encoder(ecg)) spliced in)``.

    Args:
        encoder: ECG encoder (``ecglm.encoders`` entry point or import path): of signals, or of ECG
            images (``image-vit``, ``image-cnn``, ``hf-vision``). ``null`` with a vision-language
            backbone, which reads the images with its own vision tower.
        connector: Encoder frames to LLM tokens (``ecglm.connectors``); ``null`` with a
            vision-language backbone.
        backbone: Causal LM with tokenizer (``ecglm.backbones``).
        policy: Which parameters train (``ecglm.peft``); projection-only by default.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps of the schedule.
        lr_scheduler: A transformers scheduler name (``cosine``, ``linear``, ``constant_with_warmup``, ...),
            stepped every optimizer step.
        lr_scheduler_kwargs: Keyword arguments of that scheduler (``cosine_with_restarts``:
            ``{num_cycles: 25}`` = 24 restarts; see ``docs/training.md``).
        decoding: Decoding of generated answers in validation, ``ecglm test`` and ``ecglm evaluate``.
        evaluation: Metrics, BERTScore model, the normal/abnormal answer mapping and the conditions
            run beside ``ecg`` in every evaluation (the registered controls of :mod:`ecglm.conditions`;
            ``shuffled_ecg``, ``zeroed_ecg`` and ``text_only`` by default).
        val_generation_samples: Validation QA pairs whose answers are generated and scored with the
            same metrics each validation (0: loss and answer-token statistics only). Lets
            ModelCheckpoint select by ``val/acc`` rather than by loss.
        objective: What a training step optimises (``ecglm.objectives``): the next-token loss
            (:class:`~ecglm.objectives.SFT`, the default), :class:`~ecglm.objectives.GRPO` or
            :class:`~ecglm.objectives.DPO`. Everything else is the same whatever the objective.
    """

    def __init__(
        self,
        encoder: ECGEncoder | None,
        connector: Connector | None,
        backbone: Backbone,
        policy: PEFTPolicy | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler: str = "cosine",
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        decoding: Decoding | None = None,
        evaluation: MetricsConfig | None = None,
        val_generation_samples: int = 0,
        objective: Objective | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=["encoder", "connector", "backbone", "policy", "decoding", "evaluation", "objective"]
        )
        self.objective = objective or SFT()
        self.decoding = Decoding(**decoding) if isinstance(decoding, dict) else decoding or Decoding()
        self.metrics_config = (
            MetricsConfig(**evaluation) if isinstance(evaluation, dict) else evaluation or MetricsConfig()
        )
        # Plain dicts in the hyper-parameters: logged to MLflow, and no pickled classes in checkpoints.
        self.hparams.update(decoding=asdict(self.decoding), evaluation=asdict(self.metrics_config))
        model = ECGLM(encoder, connector, backbone, policy)
        # The parts are registered here under the names ECGLM gives them, so a checkpoint's keys are
        # those of ECGLM's own state dict; the ECGLM is kept outside the module tree, which would
        # otherwise hold every weight twice.
        self.__dict__["model"] = model
        self.encoder, self.connector, self.backbone = model.encoder, model.connector, model.backbone
        self.policy = model.policy
        # Lightning never calls train() in fit (it only restores each submodule's mode after
        # validation), so frozen parts must start in eval mode: a randomly initialised LLM would not.
        self.train()
        # Frozen pretrained weights are not in our checkpoints; _check_checkpoint_keys guards the rest.
        self.strict_loading = False
        # Evaluation state lives outside the module tree (plain dicts): a BERTScore model is never a
        # submodule, so it can neither become "trainable" nor end up in a checkpoint.
        self._evaluations: dict[str, AnswerEvaluation] = {}
        self._predictions: list[dict[str, Any]] = []  # ecglm predict: this rank's answers
        self._token_stats: dict[str, AnswerTokenStats] = {}
        self._val_generated = 0
        self.evaluation_result: dict[str, Any] | None = None
        self._weights_from = "initialisation"  # becomes "training" or "checkpoint"
        # What the data side provides, handed over by ecglm.wiring.connect (never read from the Trainer).
        self._sample_demonstrations: Callable[..., dict[str, list[dict[str, str]]]] | None = None
        self._eval_groups: Callable[[str], tuple[list[str], list[str] | None]] | None = None

    def connect_data(
        self,
        sample_demonstrations: Callable[..., dict[str, list[dict[str, str]]]] | None = None,
        eval_groups: Callable[[str], tuple[list[str], list[str] | None]] | None = None,
    ) -> None:
        """What the model needs from the data: few-shot demonstrations drawn from the training split
        (``sample_demonstrations(seed, per_dataset, max_chars)``) and, per split, the datasets and
        question types evaluation reports on (``eval_groups(split)``). See :func:`ecglm.wiring.connect`."""
        self._sample_demonstrations, self._eval_groups = sample_demonstrations, eval_groups

    # --- few-shot demonstrations ------------------------------------------------------------------------

    @property
    def demonstrations(self) -> dict[str, list[dict[str, str]]] | None:
        """Few-shot demonstrations by dataset, when the policy asks for them: drawn at fit, recorded in
        checkpoints, restored from them (see :meth:`setup`, :meth:`on_load_checkpoint`). Held by the
        model (:attr:`ecglm.model.ECGLM.demonstrations`), so a bundle written from it carries them."""
        return self.model.demonstrations

    @demonstrations.setter
    def demonstrations(self, value: dict[str, list[dict[str, str]]] | None) -> None:
        self.model.demonstrations = value

    @property
    def wants_demonstrations(self) -> bool:
        """Whether the policy puts in-context demonstrations in the prompts (``demos_per_dataset``)."""
        return self.policy.demos_per_dataset > 0

    def setup(self, stage: str) -> None:
        """At fit, draw the policy's demonstrations from the DataModule's training split (unless set).

        Other stages take them from the checkpoint they load (:meth:`on_load_checkpoint`), which also
        replaces these when a fit resumes: a run keeps the demonstrations it started with.
        """
        if stage == "fit":
            self.objective.setup(self)
        if stage != "fit" or not self.wants_demonstrations or self.demonstrations is not None:
            return
        if self._sample_demonstrations is None:
            raise RuntimeError(
                f"policy {type(self.policy).__name__} needs few-shot demonstrations from the training split: "
                "connect the model to a DataModule that draws them (ecglm.wiring.connect(model, data) with "
                "ECGQADataModule; the ecglm command does it), or set model.demonstrations first"
            )
        policy = self.policy
        self.demonstrations = self._sample_demonstrations(
            policy.seed, policy.demos_per_dataset, policy.max_demo_chars
        )

    def system_prompts(self) -> dict[str, str] | None:
        """Per dataset, the system prompt with its demonstrations; ``None`` when the policy wants none."""
        if not self.wants_demonstrations:
            return None
        if self.demonstrations is None:
            raise RuntimeError(
                f"policy {type(self.policy).__name__} wants few-shot demonstrations, but none were drawn "
                "(fit) or loaded: pass the trained checkpoint (--ckpt_path)"
            )
        return self.model.system_prompts()

    def _record_demonstrations(self) -> None:
        """Print the demonstrations and write ``demonstrations.json`` into the run (and its MLflow run)."""
        if self.demonstrations is None:
            return
        for dataset, demos in self.demonstrations.items():
            self.print(f"ecglm: few-shot demonstrations for {dataset}: {', '.join(d['key'] for d in demos)}")
        if self.trainer.is_global_zero:
            payload = {
                "policy": type(self.policy).__name__,
                "seed": getattr(self.policy, "seed", None),
                "system_prompts": self.system_prompts(),
                "demonstrations": self.demonstrations,
            }
            save_run_file(self.trainer, "demonstrations.json", json.dumps(payload, indent=2))

    def train(self, mode: bool = True) -> ECGLanguageModel:
        """Frozen parts stay in eval mode, so a frozen encoder or LLM never applies dropout."""
        super().train(mode)
        self.model.train(mode)
        return self

    @property
    def num_ecg_tokens(self) -> int:
        return self.model.num_ecg_tokens

    def forward(self, batch: ECGQABatch, zero_ecg: bool = False) -> Any:
        return self.model(batch, zero_ecg)

    def training_step(self, batch: ECGQABatch, batch_idx: int) -> Tensor:
        return self.objective.training_step(self, batch, batch_idx)

    def validation_step(self, batch: ECGQABatch, batch_idx: int) -> None:
        out = self(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=len(batch.key), sync_dist=True)
        # Logits cover the answer span (or everything); position i predicts label i + 1.
        span = out.logits.shape[1] - 1
        self._stats("val").update(out.logits[:, :-1].float(), batch.labels[:, -span:])
        evaluation = self._evaluations.get("val")
        wanted = self.hparams.val_generation_samples
        if evaluation is not None and batch.prompt is not None and self._val_generated < wanted:
            answers = self.model.generate(batch, self.decoding, prompt=batch.prompt)
            evaluation.update("ecg", answers, batch)
            self._val_generated += len(answers)

    def on_validation_epoch_start(self) -> None:
        self._val_generated = 0
        if self.hparams.val_generation_samples > 0 and "val" not in self._evaluations:
            self._evaluations["val"] = self._build_evaluation("val", conditions=("ecg",), keep_records=False)

    def on_validation_epoch_end(self) -> None:
        stats = self._stats("val")
        for name, value in stats.compute().items():
            self.log(f"val/{name}", float(value))
        stats.reset()
        evaluation = self._evaluations.get("val")
        if evaluation is None:
            return
        datasets = evaluation.compute()["conditions"]["ecg"]["datasets"]
        overall = datasets.get("all") or next(iter(datasets.values()), {})
        for name, value in overall.items():
            if name != "n":
                self.log(f"val/{name}", value, prog_bar=name == "acc")
        evaluation.reset()

    def _stats(self, split: str) -> AnswerTokenStats:
        if split not in self._token_stats:
            self._token_stats[split] = AnswerTokenStats().to(self.device)
        return self._token_stats[split]

    def _build_evaluation(
        self, split: str, conditions: tuple[str, ...] | None = None, keep_records: bool = True
    ) -> AnswerEvaluation:
        if self._eval_groups is not None:
            datasets, question_types = self._eval_groups(split)
        else:
            datasets, question_types = ["unknown"], None
        evaluation = AnswerEvaluation(
            self.metrics_config,
            datasets,
            question_types,
            conditions=conditions,
            keep_records=keep_records,
        )
        return evaluation.to(self.device)

    # --- evaluation -----------------------------------------------------------------------------------

    def test_step(self, batch: ECGQABatch, batch_idx: int) -> None:
        evaluation = self._evaluations["test"]
        scores = self.model.prompt is not None and evaluation.wants_scores(batch)
        for condition in evaluation.conditions:
            label_scores = (
                partial(self.model.label_scores, batch, condition=condition)
                if self.metrics_config.label_auc and self.model.prompt is not None
                else None
            )
            answers = self.model.generate(batch, self.decoding, condition)
            evaluation.update(condition, answers, batch, label_scores)
            if scores:  # yes/no questions: P(yes) for the AUROC
                p_yes = self.model.answer_scores(batch, ("yes", "no"), condition)[:, 0]
                evaluation.update_scores(condition, p_yes, batch)

    def predict_step(self, batch: ECGQABatch, batch_idx: int) -> list[dict[str, Any]]:
        """``ecglm predict``: the generated answer of each QA pair, with its key, dataset, question
        type, question and reference; the run's ``predictions.jsonl`` collects them (every rank's)."""
        answers = self.model.generate(batch, self.decoding)
        rows = [
            {
                "key": batch.key[i],
                "dataset": batch.dataset[i],
                "question_type": batch.question_type[i],
                "question": batch.question[i] if batch.question else None,
                "reference": batch.answer[i],
                "answer": answer,
            }
            for i, answer in enumerate(answers)
        ]
        self._predictions.extend(rows)
        return rows

    def on_predict_start(self) -> None:
        self._refuse_untrained("answer with")

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        rows = gather_rows(self._predictions)
        if self.trainer.is_global_zero:
            lines = "".join(json.dumps({**r, "decoding": asdict(self.decoding)}) + "\n" for r in rows)
            path = save_run_file(self.trainer, "predictions.jsonl", lines)
            self.print(f"  {len(rows)} predictions: {path}")

    def _refuse_untrained(self, what: str) -> None:
        if self._weights_from == "initialisation" and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                f"refusing to {what} untrained weights: no checkpoint was loaded (pass --ckpt_path with a "
                "checkpoint file, or `last` when the recipe's ModelCheckpoint has save_last: true)"
            )

    def on_test_start(self) -> None:
        self._refuse_untrained("evaluate")
        # Built per test run: the groups come from the data, which may change between runs.
        self._evaluations["test"] = self._build_evaluation("test")

    def on_test_epoch_end(self) -> None:
        evaluation = self._evaluations["test"]
        result = evaluation.compute()
        evaluation.reset()
        self.evaluation_result = result
        for condition, entry in result["conditions"].items():
            for dataset, values in entry["datasets"].items():
                for name, value in values.items():
                    if name != "n":
                        self.log(f"test/{condition}/{dataset}/{name}", value)
        summary = summarize([result])
        text = render_markdown(summary, {"decoding": asdict(self.decoding)})
        self.print(text)
        if self.trainer.is_global_zero:
            payload = {"decoding": asdict(self.decoding), **result}
            path = save_run_file(self.trainer, "test_report.json", json.dumps(payload, indent=2))
            self.print(f"  report: {path}")

    # --- optimisation -----------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._weights_from = "training"
        self._record_demonstrations()  # here: after any checkpoint a resumed fit restores
        self.objective.on_train_start(self)

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        parts = {name: count_parameters(getattr(self, name)) for name in ("encoder", "connector", "backbone")}
        self.print(f"ecglm: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
        self.print("  " + ", ".join(f"{name} {t:,} / {n:,}" for name, (t, n) in parts.items()))
        if self.logger is not None:
            counts = {"params_trainable": trainable, "params_total": total}
            for name, (t, n) in parts.items():
                counts.update({f"params_{name}_trainable": t, f"params_{name}_total": n})
            self.logger.log_hyperparams(counts)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"policy {type(self.policy).__name__} left no parameter trainable")
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        scheduler = get_scheduler(
            self.hparams.lr_scheduler,
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=self.trainer.estimated_stepping_batches,
            scheduler_specific_kwargs=self.hparams.lr_scheduler_kwargs,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.model.persistent_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        parts = (self.encoder, self.connector, self.backbone, self.policy, self.model.prompt)
        checkpoint["ecglm"] = {
            "version": __version__,
            "state_dict": "trainable-and-unrecoverable-only",
            # Which distribution (ecglm or a plugin) and version provided each part and the prompt style
            # that wrote the training prompts (set by ecglm.wiring.connect); parts left out are not listed.
            "components": component_provenance(*(part for part in parts if part is not None)),
        }
        if self.demonstrations is not None:
            checkpoint["ecglm"]["demonstrations"] = self.demonstrations
        if not isinstance(self.objective, SFT):  # SFT checkpoints stay as they were
            checkpoint["ecglm"]["objective"] = {
                "stage": self.objective.stage,
                "init_from": self.objective.init_from,
                "state": self.objective.state_dict(),
            }
        stages = self.model.training_stages
        if stages and stages != [{"stage": "sft"}]:  # the stages behind the weights (evaluate reports them)
            checkpoint["ecglm"]["stages"] = stages

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = self.model.persistent_keys()
        found = set(checkpoint["state_dict"]) if "state_dict" in checkpoint else self._keys_in_ckpt_file()
        missing, unexpected = sorted(expected - found), sorted(found - set(self.state_dict()))
        if missing or unexpected:
            raise RuntimeError(
                "checkpoint does not match this model (was it written with another recipe or policy?)\n"
                f"  missing ({len(missing)}): {missing[:10]}\n"
                f"  unexpected ({len(unexpected)}): {unexpected[:10]}"
            )
        self._restore_demonstrations(checkpoint.get("ecglm", {}).get("demonstrations"))
        self.model.training_stages = training_stages(checkpoint)
        recorded = checkpoint.get("ecglm", {}).get("objective")
        if recorded and recorded.get("stage") == self.objective.stage:
            self.objective.load_state_dict(recorded.get("state") or {})
        self._weights_from = "checkpoint"

    def _keys_in_ckpt_file(self) -> set[str]:
        # Lightning's FSDPStrategy loads the weights itself and removes them from the dict it hands
        # this hook; the file still has them (memory-mapped: nothing is read but the keys).
        path = self.trainer.ckpt_path
        return set(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"])

    def _restore_demonstrations(self, recorded: dict[str, list[dict[str, str]]] | None) -> None:
        """The checkpoint's demonstrations replace any drawn here: evaluation reads what training read."""
        policy = type(self.policy).__name__
        if self.wants_demonstrations and recorded is None:
            raise RuntimeError(
                f"policy {policy} wants few-shot demonstrations, but the checkpoint records none (was it "
                "trained with another policy?)"
            )
        if recorded is not None and not self.wants_demonstrations:
            raise RuntimeError(
                f"the checkpoint was trained with few-shot demonstrations ({sorted(recorded)}), but policy "
                f"{policy} puts none in the prompts: use the few-shot policy of its recipe"
            )
        self.demonstrations = recorded
