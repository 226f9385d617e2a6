"""ECGBench answered by an ecglm model: each subset's questions about its ECG images, in batches,
appended to ``<out>/<subset>.jsonl`` in the layout PULSE's inference writes (``question_id``,
``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``) plus ecglm's fields (``condition``,
``label_scores`` on multi-label subsets). A rerun answers only what is missing; a line a kill cut short
is dropped first (:func:`ecglm.inference.drop_cut_line`). The controls are the same questions about
another item's image (``shuffled``) or a blank page (``blank``), in ``<subset>.<control>.jsonl``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from ecglm.benchmarks.ecgbench import Item, read_predictions, subset
from ecglm.inference import ASKED, answer_images, drop_cut_line, printout_of, read_image, system_prompts

if TYPE_CHECKING:
    from ecglm.model import ECGLM, Decoding

CONTROLS = ("shuffled", "blank")
#: The image placeholder of LLaVA-style questions: ecglm places the picture itself.
IMAGE_TOKEN = "<image>"


def question_text(question: str) -> str:
    return question.replace(IMAGE_TOKEN, "").strip()


def output_file(out: str | Path, name: str, condition: str = "image") -> Path:
    return Path(out) / (f"{name}.jsonl" if condition == "image" else f"{name}.{condition}.jsonl")


def images_for(items: Sequence[Item], images: Path, condition: str, seed: int = 0) -> list[np.ndarray | Path]:
    """Each item's picture under ``condition``: its own, another item's (a seeded derangement when
    there are two or more), or a white page of its own size (read when drawn)."""
    paths = [images / item.image for item in items]
    if condition == "shuffled" and len(paths) > 1:
        # One random cycle through all items: each gets the next one's picture, never its own.
        cycle = np.random.default_rng(seed).permutation(len(paths))
        donor = np.empty(len(paths), dtype=int)
        donor[cycle] = np.roll(cycle, -1)
        return [paths[j] for j in donor]
    return paths


def _picture(source: Path, condition: str) -> np.ndarray:
    image = read_image(source)
    return np.full_like(image, 255) if condition == "blank" else image


@torch.no_grad()
def label_scores(
    model: ECGLM, pictures: Sequence[np.ndarray], questions: Sequence[str], labels: Sequence[str]
):
    """``(len(pictures), len(labels))`` label scores (:meth:`ECGLM.label_scores`) of each question."""
    from ecglm.data.collate import QACollator

    collate = QACollator(
        model.prompt,
        model.num_ecg_tokens,
        for_generation=True,
        system_prompts=system_prompts(model),
        images=printout_of(model),
    )
    items = [
        {"key": f"bench{i}_qa0", "ecg": None, "image": p, "question": q, "answer": "", "question_type": "ask"}
        | ASKED
        for i, (p, q) in enumerate(zip(pictures, questions, strict=True))
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
    """Answer the items of ``name`` not yet in its output file; the number answered now."""
    path = output_file(out, name, condition)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_cut_line(path)
    done = {str(r.get("question_id")) for r in read_predictions(path)} if path.is_file() else set()
    sources = images_for(items, images, condition)
    todo = [(item, source) for item, source in zip(items, sources, strict=True) if item.id not in done]
    labels = subset(name).labels if with_label_scores else ()
    if name == "code15-test" and labels:
        labels = ("NORM", "ABNORMAL", *labels)
    bar = tqdm(total=len(todo), desc=f"{name} ({condition})", unit="answer", disable=not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pictures = [_picture(source, condition) for _, source in chunk]
        questions = [question_text(item.question) for item, _ in chunk]
        answers = answer_images(model, pictures, questions, decoding, batch_size)
        scores = label_scores(model, pictures, questions, labels).tolist() if labels else None
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
                "image": str(Path(source).relative_to(images)) if condition == "shuffled" else item.image,
            }
            if scores is not None:
                row["label_scores"] = dict(zip(labels, scores[k], strict=True))
            rows.append(row)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
