"""Answers on ECGs, above the model (as transformers' pipelines sit above its models): a signal in
physical units (:func:`answer`), a picture of a printout (:func:`answer_image`), ECG files
(:func:`ask`, behind ``ecglm ask``). Calls :meth:`ecglm.model.ECGLM.generate`; the model never calls
up into this module. No Lightning, metrics or WebDataset.

A record is read (:mod:`ecglm.records`), prepared as the encoder expects (its ``preprocessing``),
and every (window, question) pair is answered in batches through the same collator training uses,
with the prompt style, ECG token count and few-shot system prompt the model was trained with.

``ecglm ask`` writes one JSON line per answer (record, window, question, answer, decoding, model),
appended and flushed as each batch finishes: an interrupted folder run loses nothing, and a rerun
with the same ``--out`` answers only what is missing. Files that cannot be read are skipped and
reported, never fatal to the rest.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from ecglm._deprecation import moved_names
from ecglm.data.collate import QACollator
from ecglm.encoders import Preprocessing
from ecglm.records import (
    RecordError,
    Recording,
    installed_readers,
    prepare,
    read_recording,
    records_in,
    samples_by_leads,
)
from ecglm.render import ECGPrintout

if TYPE_CHECKING:
    from ecglm.model import ECGLM, Decoding


#: What every asked item carries besides its ECG and question (the key the few-shot prompt is under).
ASKED = {"dataset": "ask"}


def system_prompts(model: ECGLM, dataset: str | None = None) -> dict[str, str] | None:
    """The few-shot system prompt the model was trained with, keyed ``ask`` (``None``: no demonstrations).

    A model trained with demonstrations of several datasets needs ``dataset`` to say whose to use."""
    prompts = model.system_prompts()
    if prompts is None:
        return None
    if dataset is None and len(prompts) > 1:
        raise ValueError(f"the model has demonstrations for {sorted(prompts)}: say which (dataset=...)")
    chosen = dataset or next(iter(prompts))
    if chosen not in prompts:
        raise ValueError(f"no demonstrations for dataset {chosen!r}; the model has {sorted(prompts)}")
    return {"ask": prompts[chosen]}


def preprocessing_of(model: ECGLM) -> Preprocessing:
    pre = getattr(model.encoder, "preprocessing", None)
    if pre is None:
        name = type(model.encoder).__name__
        raise ValueError(f"{name} does not state its preprocessing: records cannot be prepared for it")
    return pre


def printout_of(model: ECGLM) -> ECGPrintout | None:
    """How the windows are drawn for a model that reads ECG images (``None`` for a signal model): its
    recorded printout component, at its image size and the prepared windows' sampling rate."""
    if model.image_size is None:
        return None
    printout = model.printout or ECGPrintout()
    return replace(printout, size=tuple(model.image_size), fs=float(preprocessing_of(model).sampling_rate))


def read_image(image: str | Path | np.ndarray, source: str = "image") -> np.ndarray:
    """An ECG picture (a PNG / JPEG file, or an array) as RGB ``(height, width, 3)`` uint8; a file that
    is not a readable image, or a picture too small to show a printout, is refused naming it."""
    from PIL import Image, UnidentifiedImageError

    from ecglm.data.images import MIN_IMAGE_SIDE

    if isinstance(image, str | Path):
        source = str(image)
        try:
            with Image.open(image) as picture:
                array = np.asarray(picture.convert("RGB"))
        except FileNotFoundError:
            raise RecordError(f"{source}: no such file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise RecordError(f"{source}: not an image Pillow can read ({err})") from None
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise RecordError(
                f"{source}: expected an RGB image (height, width, 3) of uint8, got {array.shape}"
            )
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise RecordError(
            f"{source}: {array.shape[1]} x {array.shape[0]} px is too small for an ECG printout "
            f"(at least {MIN_IMAGE_SIDE} px a side)"
        )
    return array


def answer(
    model: ECGLM,
    signal: Any,
    fs: float,
    leads: Sequence[str],
    question: str | Sequence[str],
    decoding: Decoding | None = None,
    window: str = "first",
    dataset: str | None = None,
    batch_size: int = 8,
) -> str | list[str]:
    """Answer ``question`` about one ECG, ``signal`` (leads by samples, or samples by leads, in
    physical units) sampled at ``fs`` Hz with its ``leads`` named: the 12 standard leads are picked by
    name, resampled and normalised as the model's encoder expects (:mod:`ecglm.records`), and drawn as
    a printout for a model that reads images.

    One question gives one answer (``window="first"``: from the first window); a list of questions
    gives a list; ``window="all"`` answers every window of a longer record (a list per question,
    flattened window by window). ``dataset`` picks whose few-shot demonstrations prompt the model."""
    array = samples_by_leads(np.asarray(signal), len(leads), "signal")
    windows = prepare(Recording(array, list(leads), float(fs), "signal"), preprocessing_of(model), window)
    questions = [question] if isinstance(question, str) else list(question)
    pairs = [(w, q) for w in windows for q in questions]
    answers = answer_windows(
        model, [w for w, _ in pairs], [q for _, q in pairs], decoding, batch_size, dataset=dataset
    )
    return answers[0] if isinstance(question, str) and len(answers) == 1 else answers


def answer_image(
    model: ECGLM,
    image: str | Path | np.ndarray,
    question: str | Sequence[str],
    decoding: Decoding | None = None,
    dataset: str | None = None,
    batch_size: int = 8,
    history: Sequence[Mapping[str, str]] | None = None,
) -> str | list[str]:
    """Answer ``question`` (or each of a list) about an ECG picture, as datasets ship them (a
    photographed or scanned printout): a PNG / JPEG path or an RGB array, resized to what the
    image-path ``model`` reads. For a signal, use :func:`answer` (the model's printout draws it).
    ``history``: the conversation so far about this picture, ``[{question, answer}, ...]``, which
    each question follows (a follow-up question)."""
    picture = read_image(image)
    questions = [question] if isinstance(question, str) else list(question)
    histories = None if history is None else [history] * len(questions)
    answers = answer_images(
        model, [picture] * len(questions), questions, decoding, batch_size, dataset, histories
    )
    return answers[0] if isinstance(question, str) else answers


def answer_images(
    model: ECGLM,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    decoding: Decoding | None = None,
    batch_size: int = 8,
    dataset: str | None = None,
    histories: Sequence[Sequence[Mapping[str, str]]] | None = None,
) -> list[str]:
    """One answer per (ECG picture, question) pair, in order, in batches: for models of the image path,
    on pictures as datasets ship them (a photographed or scanned printout), resized to the model's size.
    ``histories``: per pair, the earlier turns of its conversation (``[{question, answer}, ...]``,
    the picture in the first), written before its question as user and assistant turns."""
    if model.image_size is None:
        raise ValueError("this model reads ECG signals, not pictures: give it a record (ecglm ask --record)")
    items = [{"ecg": None, "image": image} for image in images]
    return _answer(model, items, questions, decoding, batch_size, dataset, printout_of(model), histories)


def answer_windows(
    model: ECGLM,
    windows: Sequence[np.ndarray],
    questions: Sequence[str],
    decoding: Decoding | None = None,
    batch_size: int = 8,
    dataset: str | None = None,
) -> list[str]:
    """One answer per (window ``(12, num_samples)``, question) pair, in order, in batches."""
    items = [{"ecg": window} for window in windows]
    return _answer(model, items, questions, decoding, batch_size, dataset, printout_of(model))


def answer_inputs(
    model: ECGLM,
    inputs: Sequence[dict[str, Any]],
    questions: Sequence[str],
    decoding: Decoding | None = None,
    batch_size: int = 8,
    dataset: str | None = None,
    histories: Sequence[Sequence[Mapping[str, str]]] | None = None,
) -> list[str]:
    """One answer per (input, question) pair, in order, in batches; each input as the collator takes it:
    ``{"ecg": window}`` (a ``(12, num_samples)`` window) or ``{"ecg": None, "image": picture}``.
    ``histories``: per pair, the earlier turns of its conversation, as :func:`answer_images` takes them."""
    given = [dict(g) for g in inputs]
    return _answer(model, given, questions, decoding, batch_size, dataset, printout_of(model), histories)


@torch.no_grad()
def _answer(
    model: ECGLM,
    ecgs: list[dict[str, Any]],
    questions: Sequence[str],
    decoding: Decoding | None,
    batch_size: int,
    dataset: str | None,
    printout: ECGPrintout | None,
    histories: Sequence[Sequence[Mapping[str, str]]] | None = None,
) -> list[str]:
    """Generated answers for ``ecgs`` (each item's ``ecg`` / ``image``) asked ``questions``, in batches,
    each after its conversation's earlier turns (``histories``, if given)."""
    if model.prompt is None:
        raise ValueError("the model has no prompt style: load it with ECGLM.from_pretrained or connect it")
    if len(ecgs) != len(questions):
        raise ValueError(f"{len(ecgs)} ECGs for {len(questions)} questions: one question per ECG")
    if histories is not None:
        if len(histories) != len(questions):
            raise ValueError(f"{len(histories)} histories for {len(questions)} questions: one per question")
        pairs = zip(ecgs, histories, strict=True)
        ecgs = [{**ecg, "history": [dict(turn) for turn in history]} for ecg, history in pairs]
    collate = QACollator(
        model.prompt,
        model.num_ecg_tokens,
        for_generation=True,
        system_prompts=system_prompts(model, dataset),
        images=printout,
    )
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(ecgs), batch_size):
        chunk = zip(ecgs[start : start + batch_size], questions[start : start + batch_size], strict=True)
        items = [
            {"key": f"ask{i}_qa0", **ecg, "question": q, "answer": "", "question_type": "ask"} | ASKED
            for i, (ecg, q) in enumerate(chunk)
        ]
        answers += model.generate(collate(items).to(device), decoding)
    return answers


def plot_window(window: np.ndarray, fs: float, title: str, path: str | Path) -> Path:
    """The prepared window (12 leads, as the encoder reads them: normalised units) as a PNG, one
    panel per lead in the standard order, the question and answer as the title."""
    # A Figure without pyplot: no global backend to switch, nothing left open.
    from matplotlib.figure import Figure

    from ecglm.ecg import LEADS

    window = np.asarray(window, dtype=np.float32)
    seconds = np.arange(window.shape[1]) / fs
    figure = Figure(figsize=(12, 14), layout="constrained")
    axes = figure.subplots(len(LEADS), 1, sharex=True)
    for axis, lead, trace in zip(axes, LEADS, window, strict=True):
        axis.plot(seconds, trace, linewidth=0.6, color="black")
        axis.set_ylabel(lead, rotation=0, labelpad=18)
        axis.grid(True, linewidth=0.3)
    axes[-1].set_xlabel(f"seconds (resampled to {fs:g} Hz; values as the encoder reads them)")
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path


# --- ecglm ask ---------------------------------------------------------------------------------------


def find_records(source: str | Path) -> list[Path]:
    """The ECG records a folder holds (the files an installed reader claims: WFDB records by their
    ``.hea``, each exam of an HDF5 file as ``FILE#EXAM_ID``), or those a CSV list names in its ``path``
    column (relative to the list), or the one file given."""
    source = Path(source)
    if source.is_dir():
        readers = installed_readers()
        found = (records_in(p, readers) for p in sorted(source.rglob("*")) if p.is_file())
        return [record for records in found for record in records]
    if source.suffix.lower() == ".csv" and source.is_file():
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and "path" in reader.fieldnames:
                return [(source.parent / row["path"]) for row in reader if row.get("path")]
    if not source.exists() and not source.with_name(source.name + ".hea").exists():
        raise RecordError(f"{source}: no such file or folder")
    return records_in(source) or [source]  # a file of many records (HDF5): each of them


def drop_cut_line(path: Path) -> None:
    """Truncate a last line that a kill cut short (no newline), so the file stays valid JSON lines
    and the next row starts on its own line; the pair it held is answered again."""
    if not path.is_file() or not path.stat().st_size:
        return
    with path.open("rb+") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        # Read back until the last newline: the cut line starts after it (or at the start of the file).
        block, end = 1 << 16, size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


def _done(out: Path) -> set[tuple[str, int, str]]:
    if not out.is_file():
        return set()
    done = set()
    for line in out.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: answered again
            continue
        if "answer" in row:
            done.add((row["record"], row["window"], row["question"]))
    return done


def ask(
    model: ECGLM,
    records: Sequence[str | Path],
    questions: Sequence[str],
    out: str | Path | None = None,
    fs: float | None = None,
    leads: list[str] | None = None,
    window: str = "first",
    decoding: Decoding | None = None,
    batch_size: int = 8,
    model_id: str = "",
    plot_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Answer every question about every record: ``(answer rows, [(file, why skipped)])``.

    With ``out``, rows are appended as JSON lines and flushed per batch; pairs already in ``out`` are
    not asked again. With ``plot_dir``, each answer's window is drawn there (:func:`plot_window`)."""
    from ecglm.model import Decoding

    decoding = decoding or Decoding()
    pre = preprocessing_of(model)
    done = _done(Path(out)) if out else set()
    readers = installed_readers()  # found once: finding them costs milliseconds a file
    skipped: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    pending: list[tuple[str, int, np.ndarray, str]] = []
    if out:
        drop_cut_line(Path(out))
    with Path(out).open("a") if out else contextlib.nullcontext() as sink:

        def flush() -> None:
            windows, asked = [p[2] for p in pending], [p[3] for p in pending]
            answers = answer_windows(model, windows, asked, decoding, batch_size)
            for (record, index, w, question), answer in zip(pending, answers, strict=True):
                row = {"record": record, "window": index, "question": question, "answer": answer}
                row |= {"decoding": asdict(decoding), "model": model_id}
                if plot_dir is not None:
                    name = f"{Path(record).stem}_w{index}_q{questions.index(question)}.png"
                    title = f"{record} (window {index})\nQ: {question}\nA: {answer}"
                    row["plot"] = str(plot_window(w, pre.sampling_rate, title, Path(plot_dir) / name))
                rows.append(row)
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
            if sink is not None:
                sink.flush()
            pending.clear()

        for path in tqdm(records, desc="records", unit="record", disable=not progress, file=sys.stderr):
            try:
                windows = prepare(read_recording(path, fs, leads, readers), pre, window)
            except RecordError as err:
                skipped.append((str(path), str(err)))
                continue
            for index, w in enumerate(windows):
                for question in questions:
                    if (str(path), index, question) not in done:
                        pending.append((str(path), index, w, question))
                        if len(pending) >= batch_size:
                            flush()
        if pending:
            flush()
    return rows, skipped


#: ``ecglm ask``'s command-line side moved to :mod:`ecglm.commands.ask` in 0.2.0.
__getattr__ = moved_names(
    __name__, {"run_ask": "ecglm.commands.ask:run_ask", "ask_parser": "ecglm.commands.ask:ask_parser"}
)
