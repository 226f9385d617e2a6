"""Collating QA items into the typed batch: tokenise with the prompt style, left-pad, stack the ECGs.

Lightning-free, so that inference (``ECGLM.answer``, ``ecglm ask``) and loops without Lightning use
the same collator as training. :class:`QACollator` is picklable: it runs in loader workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ecglm._deprecation import warn_deprecated
from ecglm.answers import answer_text
from ecglm.batch import ECGQABatch, TokenFields, pack
from ecglm.data.controls import ECGDonors
from ecglm.prompts import IGNORE_INDEX, PromptStyle
from ecglm.render import ECGPrintout


def _ecgs(item: dict[str, Any]) -> np.ndarray:
    """A QA item's ECGs with a leading count: a signal ``(12, T)`` is one, ``(n, 12, T)`` (a comparison
    question) is ``n``; images (:class:`ecglm.render.ECGPrintout`) are always ``(n, 3, H, W)``."""
    if item.get("ecg") is None:
        raise ValueError(
            f"QA pair {item.get('key')} has an ECG picture and no signal (image-only shards such as "
            "ECGInstruct's): read it with an image model and data.init_args.image (ecglm.render.ECGPrintout)"
        )
    ecg = np.asarray(item["ecg"])
    return ecg[None] if ecg.ndim == 2 else ecg


def _num_ecgs(item: dict[str, Any]) -> int:
    return len(_ecgs(item))


def _stack_ecgs(items: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([_ecgs(it) for it in items])


class QACollator:
    """Tokenise and pad QA items into a batch; picklable, so it runs in loader workers.

    Batches are left-padded, so every answer ends at the last position (the backbone then computes
    logits for the answer span only). Generation batches (``for_generation``) hold prompts without
    the answer, the reference answers as strings, and under ``text_only`` the same prompts with no
    ECG positions (the text-only ablation). ``with_prompts`` adds the generation prompts to a
    teacher-forced batch (``batch.prompt``), for metrics on generated answers during validation.
    ``system_prompts`` maps a dataset name to the system prompt of its items (few-shot prompts with
    that dataset's demonstrations); other items get the prompt style's own. ``packed`` lays each
    training batch out without padding, in one row or in rows of at most ``pack_tokens``
    (:func:`ecglm.batch.pack`). ``donors`` adds other records' ECGs to generation batches
    (``batch.shuffled_ecg``, the shuffled-ECG control). ``images`` (:class:`ecglm.render.ECGPrintout`)
    turns every item's ECG into the image an image model reads (drawn from the signal, distorted
    per QA key and epoch on training batches, or the dataset's own image): ``batch.ecg`` then holds
    ``(num_ecgs, 3, height, width)`` uint8 images, and everything else is as on the signal path.
    An item's ``history`` (``[{question, answer}, ...]``, the earlier turns of a conversation about
    its ECG) is written before its question (:meth:`ecglm.prompts.PromptStyle.encode`).
    """

    def __init__(
        self,
        prompt: PromptStyle | None = None,
        num_ecg_tokens: int | None = None,
        for_generation: bool = False,
        with_prompts: bool = False,
        system_prompts: dict[str, str] | None = None,
        packed: bool = False,
        pack_tokens: int | None = None,
        donors: ECGDonors | None = None,
        images: ECGPrintout | None = None,
        formatter: PromptStyle | None = None,
    ):
        if formatter is not None:  # 0.1's name of the prompt style
            warn_deprecated("QACollator(formatter=...)", "QACollator(prompt=...)")
            prompt = prompt or formatter
        if prompt is None or num_ecg_tokens is None:
            raise TypeError("QACollator needs a prompt style (bound to a tokenizer) and num_ecg_tokens")
        self.prompt = prompt
        self.images = images
        self.donors = donors
        self.num_ecg_tokens = num_ecg_tokens
        self.for_generation = for_generation
        self.with_prompts = with_prompts
        self.system_prompts = dict(system_prompts or {})
        if packed and (for_generation or with_prompts):
            raise ValueError("only teacher-forced training batches are packed (no generation prompts)")
        self.packed, self.pack_tokens = packed, pack_tokens

    def _pad(self, items: list[dict[str, Any]], with_answer: bool, num_ecg_tokens: int) -> TokenFields:
        k = num_ecg_tokens
        # ECG-QA answers are lists; the model reads and writes them as "a, b" (metrics compare sets).
        encoded = [
            # A multi-turn conversation (PULSE) is trained on every answer; it is asked its first question.
            self.prompt.encode_turns(
                it["turns"], k, system_prompt=self.system_prompts.get(it.get("dataset", "unknown"))
            )
            if with_answer and len(it.get("turns") or ()) > 1
            else self.prompt.encode(
                it["question"],
                answer_text(it["answer"]) if with_answer else None,
                k,
                system_prompt=self.system_prompts.get(it.get("dataset", "unknown")),
                num_ecgs=_num_ecgs(it),
                history=it.get("history"),
            )
            for it in items
        ]
        length = max(len(e.input_ids) for e in encoded)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.prompt.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        ecg_mask = torch.zeros((batch_size, length), dtype=torch.bool)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            start = length - n
            input_ids[row, start : start + n] = torch.tensor(e.input_ids)
            labels[row, start : start + n] = torch.tensor(e.labels)
            attention_mask[row, start : start + n] = 1
            for ecg_start in e.ecg_starts or (e.ecg_start,):
                ecg_mask[row, start + ecg_start : start + ecg_start + k] = True
        return TokenFields(input_ids, attention_mask, ecg_mask, labels if with_answer else None)

    @property
    def formatter(self) -> PromptStyle:
        """Deprecated since 0.2.0 (removed in 0.3.0): :attr:`prompt`."""
        warn_deprecated("QACollator.formatter", "QACollator.prompt")
        return self.prompt

    def __call__(self, items: list[dict[str, Any]]) -> ECGQABatch:
        if self.images is not None:
            # Distorted on training batches only: evaluation reads clean printouts.
            augment = not self.for_generation and not self.with_prompts
            items = [{**it, "ecg": self.images(it, it.get("epoch", 0), augment)} for it in items]
        tokens = self._pad(items, not self.for_generation, self.num_ecg_tokens)
        batch = ECGQABatch(
            **vars(tokens),
            # As stored (float16): the model converts on its device (ECGLM.ecg_tokens).
            # Every ECG of the batch in row order; a comparison question's row has two.
            ecg=torch.from_numpy(_stack_ecgs(items)),
            ecg_counts=torch.tensor([_num_ecgs(it) for it in items]),
            key=[it["key"] for it in items],
            question_type=[it["question_type"] for it in items],
            dataset=[it.get("dataset", "unknown") for it in items],
            answer=[it["answer"] for it in items],
            text_only=self._pad(items, False, num_ecg_tokens=0) if self.for_generation else None,
            prompt=self._pad(items, False, self.num_ecg_tokens)
            if self.with_prompts and not self.for_generation
            else None,
        )
        if self.for_generation or all("question" in it for it in items):
            batch.question = [it["question"] for it in items]
        if items and all("chosen" in it and "rejected" in it for it in items):
            batch.chosen = [answer_text(it["chosen"]) for it in items]
            batch.rejected = [answer_text(it["rejected"]) for it in items]
        if self.donors is not None and self.for_generation:
            shuffled, batch.donor = self.donors(items)
            batch.shuffled_ecg = torch.from_numpy(shuffled)
        if not self.packed:
            return batch
        return pack(batch, self.pack_tokens, pad_token_id=self.prompt.pad_token_id)
