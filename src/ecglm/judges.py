"""Judges: a language model scores generated reports against their references, without a commercial API.

Report-writing studies score free-text ECG reports with a large commercial model as a judge. A judge
here is a component (entry-point group ``ecglm.judges``) that ``ecglm evaluate`` runs as an optional
metric: ``evaluate.judge`` in a recipe. :class:`LocalJudge` prompts any causal LM the user has (hub
id, local folder, ``pkg:NAME`` or a GGUF file) with a rubric over the question, the reference and the
generated report, and reads a score and a reason from its reply; replies it cannot read are counted,
never scored as zero.

A judge is only as valid as its model: a small model (SmolLM2-135M, which the tests use for a smoke
test) is **not** a valid judge; its scores say nothing about report quality. Validate a judge against
clinicians' ratings before reporting its scores.

Evaluation layer: imports torch and transformers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ecglm.backbones import resolve_model_path, torch_dtype

DEFAULT_RUBRIC = (
    "You are a cardiologist grading an ECG report written by a trainee against the reference report "
    "of the same ECG. Judge clinical content only: rhythm, rate, intervals, axis, conduction, "
    "ischaemia and other findings. Missing or contradicted findings lower the score; wording does "
    "not matter. Reply with exactly two lines:\nScore: <integer from 0 to {scale}>\nReason: <one sentence>"
)
USER_TEMPLATE = "Question: {question}\nReference report: {reference}\nTrainee report: {prediction}"
SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?", re.IGNORECASE)
REASON = re.compile(r"reason\s*[:=]\s*(.+)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class JudgeItem:
    """One generated answer to judge."""

    question: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class Verdict:
    """A judge's reading of one answer: ``score`` in [0, 1], or ``None`` where its reply could not be read."""

    score: float | None
    reason: str
    reply: str

    def as_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def parse_verdict(reply: str, scale: int) -> Verdict:
    """``Score: 7`` (or ``7/10``) and ``Reason: ...`` from a reply; a score outside ``[0, scale]`` or
    none at all is a parse failure (``score=None``)."""
    match = SCORE.search(reply)
    reason = REASON.search(reply)
    reason_text = reason.group(1).strip().splitlines()[0] if reason else ""
    if match is None:
        return Verdict(None, reason_text, reply)
    value, out_of = float(match.group(1)), float(match.group(2) or scale)
    if out_of <= 0 or not 0 <= value <= out_of:
        return Verdict(None, reason_text, reply)
    return Verdict(value / out_of, reason_text, reply)


class Judge(ABC):
    """Scores generated answers against references (a plugin implements :meth:`judge`).

    Args:
        datasets: Datasets whose answers are judged (``None``: every dataset); judge the report-style
            ones, not one-word answers.
        conditions: Conditions whose answers are judged (``ecg`` and the controls it is compared with).
    """

    def __init__(
        self, datasets: list[str] | None = None, conditions: tuple[str, ...] = ("ecg", "shuffled_ecg")
    ):
        self.datasets = list(datasets) if datasets is not None else None
        self.conditions = tuple(conditions)

    def wants(self, dataset: str, condition: str) -> bool:
        return condition in self.conditions and (self.datasets is None or dataset in self.datasets)

    @abstractmethod
    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order."""


class LocalJudge(Judge):
    """A causal LM as judge: the rubric as system turn (the tokenizer's chat template, or plain text
    when it has none), greedy decoding, a score out of ``scale`` and a reason read from the reply.

    Args:
        model: Hub id, local folder, or ``pkg:NAME`` (an installed package's model files).
        gguf_file: A GGUF file inside ``model`` (transformers de-quantises it; needs ``gguf``).
        rubric: System prompt; ``{scale}`` is filled in, other braces are kept (a JSON example).
        scale: Highest score (scores are reported as fractions of it).
        max_new_tokens: Longest reply.
        batch_size: Answers judged per generation batch.
        dtype: Weight dtype.
        device: ``cuda``, ``cpu`` (default: CUDA when available).
        datasets, conditions: See :class:`Judge`.
    """

    def __init__(
        self,
        model: str,
        gguf_file: str | None = None,
        rubric: str = DEFAULT_RUBRIC,
        scale: int = 10,
        max_new_tokens: int = 48,
        batch_size: int = 8,
        dtype: str = "bfloat16",
        device: str | None = None,
        datasets: list[str] | None = None,
        conditions: tuple[str, ...] = ("ecg", "shuffled_ecg"),
    ):
        super().__init__(datasets, conditions)
        if scale < 1:
            raise ValueError(f"scale must be at least 1; got {scale}")
        self.model_name, self.gguf_file = model, gguf_file
        self.rubric, self.scale = rubric.replace("{scale}", str(scale)), scale
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_model_path(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, dtype=torch_dtype(dtype, "judge dtype")
        )
        self.model.to(self.device).eval()

    def prompt(self, item: JudgeItem) -> str:
        user = USER_TEMPLATE.format(**asdict(item))
        if self.tokenizer.chat_template:
            messages = [{"role": "system", "content": self.rubric}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.rubric}\n\n{user}\n"

    @torch.no_grad()
    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for start in range(0, len(items), self.batch_size):
            prompts = [self.prompt(item) for item in items[start : start + self.batch_size]]
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.device)
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = output[:, inputs["input_ids"].shape[1] :]
            replies = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            verdicts += [parse_verdict(reply, self.scale) for reply in replies]
        return verdicts
