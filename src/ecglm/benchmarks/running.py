"""Benchmarks answered by an ecglm model: ECGBench's questions about its ECG images, and the signal
suites' (PTB-XL) about their records, in batches, appended to ``<out>/<subset>.jsonl`` in the layout
PULSE's inference writes (``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``,
``metadata``) plus ecglm's fields (``condition``, ``label_scores`` on multi-label subsets). A rerun
answers only what is missing; a line a kill cut short is dropped first
(:func:`ecglm.inference.drop_cut_line`). The controls are the same questions about another item's
ECG (``shuffled``) or the no-signal input (``blank``: a white page, a zero signal), in
``<subset>.<control>.jsonl``.

``arena``'s multi-turn conversations are answered turn by turn, as PULSE's ``model_ecg_arena.py``
does: each question follows the earlier questions and the model's **own** answers to them, the ECG
in the first turn; one line per conversation in PULSE's arena layout (``question_id``,
``golden_convs``, ``predict_convs``: ``[{question, answer}, ...]``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from ecglm.benchmarks.ecgbench import Conversation, Item, Subset, read_predictions, subset
from ecglm.benchmarks.signals import SignalItem
from ecglm.inference import ASKED, drop_cut_line, printout_of, read_image, system_prompts

if TYPE_CHECKING:
    from ecglm.model import ECGLM, Decoding

CONTROLS = ("shuffled", "blank")
#: The image placeholder of LLaVA-style questions: ecglm places the picture itself.
IMAGE_TOKEN = "<image>"


def question_text(question: str) -> str:
    return question.replace(IMAGE_TOKEN, "").strip()


def output_file(out: str | Path, name: str, condition: str = "image") -> Path:
    """``<name>.jsonl`` for the model's own input (``image``, ``ecg``), else ``<name>.<condition>.jsonl``."""
    own = condition in ("image", "ecg")
    return Path(out) / (f"{name}.jsonl" if own else f"{name}.{condition}.jsonl")


def donors(count: int, seed: int = 0) -> np.ndarray:
    """For each of ``count`` items, the item whose input it gets under the ``shuffled`` control: one
    seeded random cycle through all of them, so none gets its own (with two or more)."""
    if count < 2:
        return np.arange(count)
    cycle = np.random.default_rng(seed).permutation(count)
    donor = np.empty(count, dtype=int)
    donor[cycle] = np.roll(cycle, -1)
    return donor


def images_for(
    items: Sequence[Item | Conversation], images: Path, condition: str, seed: int = 0
) -> list[np.ndarray | Path]:
    """Each item's picture under ``condition``: its own, another item's (:func:`donors`), or a white
    page of its own size (read when drawn)."""
    paths = [images / item.image for item in items]
    if condition == "shuffled":
        return [paths[j] for j in donors(len(paths), seed)]
    return paths


def _picture(source: Path, condition: str) -> np.ndarray:
    image = read_image(source)
    return np.full_like(image, 255) if condition == "blank" else image


@torch.no_grad()
def label_scores(
    model: ECGLM, pictures: Sequence[np.ndarray], questions: Sequence[str], labels: Sequence[str]
):
    """``(len(pictures), len(labels))`` label scores (:meth:`ECGLM.label_scores`) of each question."""
    return _label_scores(model, [{"ecg": None, "image": p} for p in pictures], questions, labels)


@torch.no_grad()
def _label_scores(model: ECGLM, inputs: Sequence[dict], questions: Sequence[str], labels: Sequence[str]):
    """:func:`label_scores` of inputs given as collator items (``{"ecg": window}`` or ``{"image": ...}``)."""
    from ecglm.data.collate import QACollator

    collate = QACollator(
        model.prompt,
        model.num_ecg_tokens,
        for_generation=True,
        system_prompts=system_prompts(model),
        images=printout_of(model),
    )
    items = [
        {"key": f"bench{i}_qa0", **given, "question": q, "answer": "", "question_type": "ask"} | ASKED
        for i, (given, q) in enumerate(zip(inputs, questions, strict=True))
    ]
    device = next(model.parameters()).device
    return model.label_scores(collate(items).to(device), list(labels))


def run_subset(
    model: ECGLM,
    name: str,
    items: Sequence[Item],
    images: Path,
    out: str | Path,
    decoding: Decoding,
    batch_size: int = 8,
    condition: str = "image",
    model_id: str = "",
    with_label_scores: bool = True,
) -> int:
    """Answer the ECGBench items of ``name`` not yet in its output file; the number answered now."""
    labels = subset(name).labels if with_label_scores else ()
    if name == "code15-test" and labels:
        labels = ("NORM", "ABNORMAL", *labels)

    def inputs(sources: Sequence[Path]) -> list[dict]:
        return _image_inputs(sources, condition)

    def shown(item: Item, source: Path) -> str:
        return _shown_image(item, source, images, condition)

    sources = images_for(items, images, condition)
    return _answer_missing(
        model, name, items, sources, inputs, shown, out, decoding, batch_size, condition, model_id, labels
    )


def run_signal_subset(
    model: ECGLM,
    spec: Subset,
    items: Sequence[SignalItem],
    data: Path,
    out: str | Path,
    decoding: Decoding,
    batch_size: int = 8,
    condition: str = "ecg",
    model_id: str = "",
    with_label_scores: bool = True,
    dataset: str | None = None,
) -> int:
    """Answer a signal suite's items (records under ``data``) not yet in the output file, each record
    read as its first window as the model's encoder reads it (:func:`ecglm.records.prepare`; two
    stacked for a comparison question); the ``shuffled`` control gives each item another item's
    records (:func:`donors`), ``blank`` the model's no-signal input (:meth:`ECGLM.blank_ecg`, as
    ``ecglm evaluate``'s ``zeroed_ecg``). ``dataset``: whose system prompt and demonstrations the
    model was trained with for these questions (``ecgqa-ptbxl``)."""
    from ecglm.inference import preprocessing_of
    from ecglm.records import installed_readers, prepare, read_recording

    preprocessing, readers = preprocessing_of(model), installed_readers()
    own = [item.records for item in items]
    sources = [own[j] for j in donors(len(own))] if condition == "shuffled" else own

    def window(path: str) -> np.ndarray:
        return prepare(read_recording(data / path, readers=readers), preprocessing)[0]

    def inputs(chunk: Sequence[tuple[str, ...]]) -> list[dict]:
        given = []
        for records in chunk:
            ecg = np.stack([window(p) for p in records]) if len(records) > 1 else window(records[0])
            if condition == "blank":
                ecg = model.blank_ecg(torch.from_numpy(ecg)).numpy()
            given.append({"ecg": ecg})
        return given

    def shown(item: SignalItem, records: tuple[str, ...]) -> list[str]:
        return list(records)

    labels = spec.labels if with_label_scores else ()
    return _answer_missing(
        model, spec.name, items, sources, inputs, shown, out, decoding, batch_size, condition, model_id,
        labels, dataset,
    )  # fmt: skip


def _missing(
    out: str | Path, name: str, condition: str, items: Sequence[Any], sources: Sequence[Any]
) -> tuple[Path, list[tuple[Any, Any]]]:
    """``name``'s output file for ``condition`` (its cut last line dropped) and the ``(item, source)``
    pairs whose ``id`` is not answered in it yet: what a rerun still has to answer."""
    path = output_file(out, name, condition)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_cut_line(path)
    done = {str(r.get("question_id")) for r in read_predictions(path)} if path.is_file() else set()
    return path, [(item, source) for item, source in zip(items, sources, strict=True) if item.id not in done]


def _image_inputs(sources: Sequence[Path], condition: str) -> list[dict]:
    """The model's inputs for ECGBench pictures: each source's picture as the condition shows it."""
    return [{"ecg": None, "image": _picture(source, condition)} for source in sources]


def _shown_image(item: Item | Conversation, source: Path, images: Path, condition: str) -> str:
    """The picture an answer was given, as its prediction line records it (another item's under shuffled)."""
    return str(Path(source).relative_to(images)) if condition == "shuffled" else item.image


def _answer_missing(
    model: ECGLM,
    name: str,
    items: Sequence[Item | SignalItem],
    sources: Sequence[Any],
    inputs: Callable[[Sequence[Any]], list[dict]],
    shown: Callable[[Any, Any], Any],
    out: str | Path,
    decoding: Decoding,
    batch_size: int,
    condition: str,
    model_id: str,
    labels: Sequence[str],
    dataset: str | None = None,
) -> int:
    """The loop both runners share: the items not yet in ``name``'s output file for ``condition``
    answered in batches from ``inputs(sources)``, each batch appended as JSON lines (a kill loses at
    most the batch being answered); the number answered now."""
    from ecglm.inference import answer_inputs

    path, todo = _missing(out, name, condition, items, sources)
    bar = tqdm(total=len(todo), desc=f"{name} ({condition})", unit="answer", disable=not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        given = inputs([source for _, source in chunk])
        questions = [question_text(item.question) for item, _ in chunk]
        answers = answer_inputs(model, given, questions, decoding, batch_size, dataset)
        scores = _label_scores(model, given, questions, labels).tolist() if labels else None
        rows = []
        for k, ((item, source), text) in enumerate(zip(chunk, answers, strict=True)):
            row: dict[str, Any] = {
                "question_id": item.id,
                "prompt": item.question,
                "text": text,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
                "condition": condition,
                "records" if isinstance(item, SignalItem) else "image": shown(item, source),
            }
            if scores is not None:
                row["label_scores"] = dict(zip(labels, scores[k], strict=True))
            rows.append(row)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def run_conversations(
    model: ECGLM,
    name: str,
    conversations: Sequence[Conversation],
    images: Path,
    out: str | Path,
    decoding: Decoding,
    batch_size: int = 8,
    condition: str = "image",
    model_id: str = "",
) -> int:
    """Answer the conversations of ``name`` (``arena``) not yet in its output file, turn by turn: a
    batch of conversations is asked its first questions about their pictures, then its second
    questions after the first questions and the model's own answers, and so on. Each conversation is
    one line, appended once all its turns are answered; the number answered now."""
    from ecglm.inference import answer_inputs

    sources = images_for(conversations, images, condition)
    path, todo = _missing(out, name, condition, conversations, sources)
    bar = tqdm(total=len(todo), desc=f"{name} ({condition})", unit="conversation", disable=not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        given = _image_inputs([source for _, source in chunk], condition)
        predicted: list[list[dict[str, str]]] = [[] for _ in chunk]
        for turn in range(max(len(c.turns) for c, _ in chunk)):
            asking = [k for k, (c, _) in enumerate(chunk) if turn < len(c.turns)]
            questions = [question_text(chunk[k][0].turns[turn]["question"]) for k in asking]
            histories = [
                [{"question": question_text(t["question"]), "answer": t["answer"]} for t in predicted[k]]
                for k in asking
            ]
            answers = answer_inputs(
                model, [given[k] for k in asking], questions, decoding, batch_size, histories=histories
            )
            for k, text in zip(asking, answers, strict=True):
                predicted[k].append({"question": chunk[k][0].turns[turn]["question"], "answer": text})
        rows = [
            {
                "question_id": c.id,
                "golden_convs": [dict(t) for t in c.turns],
                "predict_convs": answers_of_one,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
                "condition": condition,
                "image": _shown_image(c, source, images, condition),
            }
            for (c, source), answers_of_one in zip(chunk, predicted, strict=True)
        ]
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
