"""``ECGLanguageModel``: ecglm's one LightningModule, composed of encoder, connector, backbone and policy.

Every PEFT strategy trains through this module; what differs between strategies is the policy
object, not the code path. Checkpoints hold only what cannot be rebuilt from pretrained sources:
trainable parameters, plus every weight of a component that has no pretrained source.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import get_scheduler

from ecglm import __version__
from ecglm.backbones import Backbone
from ecglm.connectors import Connector
from ecglm.encoders import ECGEncoder
from ecglm.io import atomic_write_bytes
from ecglm.peft import PEFTPolicy, ProjectionOnly, count_parameters

#: Evaluation conditions: the real ECG, and the no-signal ablation with the ECG zeroed.
CONDITIONS = ("ecg", "zeroed_ecg")


def save_run_file(trainer: L.Trainer, name: str, text: str) -> Path:
    """Write ``text`` atomically into the run's folder and attach it to every logger's run (MLflow)."""
    path = atomic_write_bytes(Path(trainer.default_root_dir) / name, text.encode())
    for logger in trainer.loggers:
        run_id = getattr(logger, "run_id", None)
        if run_id and hasattr(logger.experiment, "log_artifact"):
            logger.experiment.log_artifact(run_id, str(path))
    return path


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace — the normalisation of exact match."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class ECGLanguageModel(L.LightningModule):
    """An ECG-language model: ``backbone(prompt with connector(encoder(ecg)) spliced in)``.

    Args:
        encoder: ECG encoder (``ecglm.encoders`` entry point or import path).
        connector: Encoder frames to LLM tokens (``ecglm.connectors``).
        backbone: Causal LM with tokenizer (``ecglm.backbones``).
        policy: Which parameters train (``ecglm.peft``); projection-only by default.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps of the schedule.
        lr_scheduler: A transformers scheduler name (``cosine``, ``linear``, ``constant_with_warmup``, ...),
            stepped every optimizer step.
        max_new_tokens: Longest generated answer in evaluation.
    """

    def __init__(
        self,
        encoder: ECGEncoder,
        connector: Connector,
        backbone: Backbone,
        policy: PEFTPolicy | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler: str = "cosine",
        max_new_tokens: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "connector", "backbone", "policy"])
        self.encoder = encoder
        self.connector = connector
        self.backbone = backbone
        self.connector.configure(encoder.output_dim, backbone.hidden_size)
        self.policy = policy or ProjectionOnly()
        self.policy.apply(encoder, connector, backbone)
        # Frozen pretrained weights are not in our checkpoints; _check_checkpoint_keys guards the rest.
        self.strict_loading = False
        self.exact_match = torch.nn.ModuleDict({c: MeanMetric() for c in CONDITIONS})
        self._test_records: list[dict[str, Any]] = []
        self._weights_from = "initialisation"  # becomes "training" or "checkpoint"

    def train(self, mode: bool = True) -> ECGLanguageModel:
        """Frozen parts stay in eval mode, so a frozen encoder or LLM never applies dropout."""
        super().train(mode)
        for part in (self.encoder, self.connector, self.backbone):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        return self

    @property
    def num_ecg_tokens(self) -> int:
        return self.connector.num_tokens

    def ecg_tokens(self, ecg: Tensor) -> Tensor:
        """``(batch, leads, samples)`` -> ``(batch, num_ecg_tokens, hidden_size)``."""
        return self.connector(self.encoder(ecg))

    def forward(self, batch: dict[str, Any], zero_ecg: bool = False):
        ecg = torch.zeros_like(batch["ecg"]) if zero_ecg else batch["ecg"]
        return self.backbone(
            batch["input_ids"],
            batch["attention_mask"],
            batch["ecg_mask"],
            self.ecg_tokens(ecg),
            batch.get("labels"),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["ecg"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self(batch).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["ecg"].shape[0], sync_dist=True)

    # --- evaluation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_answers(
        self, batch: dict[str, Any], zero_ecg: bool = False, **generation_kwargs: Any
    ) -> list[str]:
        """Greedy answers for a left-padded prompt batch (``collate(..., for_generation=True)``)."""
        ecg = torch.zeros_like(batch["ecg"]) if zero_ecg else batch["ecg"]
        generation_kwargs.setdefault("max_new_tokens", self.hparams.max_new_tokens)
        generation_kwargs.setdefault("do_sample", False)
        new_ids = self.backbone.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["ecg_mask"],
            self.ecg_tokens(ecg),
            **generation_kwargs,
        )
        texts = self.backbone.formatter.tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for condition in CONDITIONS:
            answers = self.generate_answers(batch, zero_ecg=condition == "zeroed_ecg")
            pairs = zip(answers, batch["answer"], strict=True)
            correct = torch.tensor(
                [normalize_answer(p) == normalize_answer(r) for p, r in pairs],
                dtype=torch.float32,
                device=self.device,
            )
            self.exact_match[condition].update(correct)
            for i, prediction in enumerate(answers):
                self._test_records.append(
                    {
                        "key": batch["key"][i],
                        "question_type": batch["question_type"][i],
                        "condition": condition,
                        "reference": batch["answer"][i],
                        "prediction": prediction,
                        "correct": bool(correct[i]),
                    }
                )

    def on_test_start(self) -> None:
        if self._weights_from == "initialisation" and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(
                "refusing to evaluate untrained weights: no checkpoint was loaded (pass --ckpt_path with a "
                "checkpoint file, or `last` when the recipe's ModelCheckpoint has save_last: true)"
            )

    def on_test_epoch_start(self) -> None:
        self._test_records = []

    def on_test_epoch_end(self) -> None:
        scores = {c: float(self.exact_match[c].compute()) * 100 for c in CONDITIONS}
        for c in CONDITIONS:
            self.log(f"test/exact_match_{c}", scores[c])
            self.exact_match[c].reset()
        self.log("test/exact_match_gap", scores["ecg"] - scores["zeroed_ecg"])
        report = self._test_report(scores)
        self.print(report["text"])
        self._save_test_report(report)

    def _test_report(self, scores: dict[str, float]) -> dict[str, Any]:
        by_type: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for r in self._test_records:
            by_type[(r["question_type"], r["condition"])].append(r["correct"])
        types = sorted({t for t, _ in by_type})
        lines = [
            "",
            "Exact-match accuracy on the held-out split (%)",
            f"  {'question type':<16}{'with ECG':>10}{'ECG zeroed':>12}",
            f"  {'all':<16}{scores['ecg']:>10.1f}{scores['zeroed_ecg']:>12.1f}",
        ]
        per_type = {}
        for t in types:
            acc = {c: 100 * sum(by_type[(t, c)]) / max(len(by_type[(t, c)]), 1) for c in CONDITIONS}
            per_type[t] = acc
            lines.append(f"  {t:<16}{acc['ecg']:>10.1f}{acc['zeroed_ecg']:>12.1f}")
        lines.append(f"  gap (with ECG - zeroed): {scores['ecg'] - scores['zeroed_ecg']:+.1f} points")
        n = sum(1 for r in self._test_records if r["condition"] == "ecg")
        lines.append(f"  {n} questions on this process")
        return {
            "text": "\n".join(lines),
            "exact_match": scores,
            "per_question_type": per_type,
            "records": self._test_records,
        }

    def _save_test_report(self, report: dict[str, Any]) -> None:
        if not self.trainer.is_global_zero:
            return
        payload = {k: v for k, v in report.items() if k != "text"}
        path = save_run_file(self.trainer, "test_report.json", json.dumps(payload, indent=2))
        self.print(f"  report: {path}")

    # --- optimisation -----------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._weights_from = "training"

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        self.print(f"ecglm: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
        if self.logger is not None:
            self.logger.log_hyperparams({"params_trainable": trainable, "params_total": total})

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
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------------------

    def persistent_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: trainable weights and all of non-pretrained parts."""
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        for part_name in ("encoder", "connector", "backbone"):
            part = getattr(self, part_name)
            if not getattr(part, "pretrained", False):
                keys.update(f"{part_name}.{k}" for k in part.state_dict())
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.persistent_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["ecglm"] = {"version": __version__, "state_dict": "trainable-and-unrecoverable-only"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = self.persistent_keys()
        found = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - set(self.state_dict()))
        if missing or unexpected:
            raise RuntimeError(
                "checkpoint does not match this model (was it written with another recipe or policy?)\n"
                f"  missing ({len(missing)}): {missing[:10]}\n"
                f"  unexpected ({len(unexpected)}): {unexpected[:10]}"
            )
        self._weights_from = "checkpoint"
