"""``ecglm ask``: answer questions about ECG files or pictures with a bundle (:mod:`ecglm.inference`).

Everything the user gave is checked before the LLM loads: the bundle (its files against their
recorded digests), every record's format and the options it needs, the questions file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ecglm.errors import EcglmError

if TYPE_CHECKING:
    import numpy as np

    from ecglm.model import ECGLM, Decoding


class AskError(EcglmError, ValueError):
    """Options of ``ecglm ask`` that do not fit together."""


def ask(
    model: str,
    question: str | None = None,
    questions: str | None = None,
    record: str | None = None,
    records: str | None = None,
    image: list[str] | None = None,
    out: str | None = None,
    fs: float | None = None,
    leads: str | None = None,
    window: Literal["first", "all"] = "first",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: str | None = None,
    plot: str | None = None,
    override: list[str] | None = None,
    trust_remote_code: bool = False,
) -> int:
    """Answer questions about ECG files (or pictures, for image-path models) with a bundle.

    Exit status: 0 when every file was answered, 1 when some were skipped, 2 when none was.

    Args:
        model: A bundle folder (``ecglm export``).
        question: The question.
        questions: A text file, one question per line.
        record: One ECG record: WFDB (.hea), EDF/BDF, .npy, .csv, DICOM, HL7 aECG (.xml), an exam of
            an HDF5 file (FILE.h5#EXAM_ID), or any format a reader plugin adds (docs/records.md).
        records: A folder of ECG files (every format mixed; each exam of an HDF5 file), or a CSV
            list with a ``path`` column.
        image: An ECG picture (PNG / JPEG; repeat for several): image-path models.
        out: JSON lines file, appended (a rerun answers only what is missing).
        fs: Sampling rate of .npy / .csv files, Hz.
        leads: Lead order of .npy / .csv files, comma-separated (I,II,III,aVR,...).
        window: ``first`` window of each record, or ``all`` (each in turn).
        batch_size: Questions answered per generate call.
        max_new_tokens: Longest answer, in tokens.
        device: cpu, cuda (default: CUDA when available).
        plot: A folder: each answer's ECG as the model read it, with Q and A, as PNG.
        override: ``PART.KEY=VALUE`` (repeatable): an argument of the bundle's parts given by you, e.g.
            ``backbone.model=/models/smollm2`` or ``encoder.checkpoint=ecg-fm.pt`` (a bundle cannot
            name local files or pickles for you).
        trust_remote_code: Let the bundle name classes no installed plugin registers and arguments
            that run code (trust_remote_code, pickles). Only for bundles from authors you trust.
    """
    import torch

    from ecglm.bundle import check_bundle, parse_overrides
    from ecglm.inference import find_records
    from ecglm.records import RecordError, check_readable, installed_readers

    sources = [s for s in (record, records, image) if s]
    if len(sources) != 1:
        raise AskError("give one of --record FILE, --records FOLDER_OR_LIST, --image PNG")
    if (question is None) == (questions is None):
        raise AskError("give --question TEXT or --questions FILE (one question per line)")
    asked = [question] if question is not None else _read_questions(Path(questions))
    overrides = parse_overrides(override or [])
    lead_names = leads.split(",") if leads else None
    skipped: list[tuple[str, str]] = []
    paths = []
    pictures = []
    if image:
        from ecglm.inference import read_image

        pictures = [(path, read_image(path)) for path in image]
    else:
        readers = installed_readers()
        for path in find_records(record or records):
            try:
                check_readable(path, fs, lead_names, readers)
                paths.append(path)
            except RecordError as err:
                skipped.append((str(path), str(err)))
        if not paths:
            reasons = "; ".join(reason for _, reason in skipped[:3])
            raise RecordError(f"no readable ECG file to answer: {reasons or 'none found'}")
    config = check_bundle(model, trust_remote_code=trust_remote_code, overrides=overrides)
    if pictures and not config.get("image"):
        raise AskError(f"{model} reads ECG signals, not pictures: give it a record (--record FILE)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ecglm.model import ECGLM, Decoding

    loaded = ECGLM.from_pretrained(
        model, device=device, trust_remote_code=trust_remote_code, overrides=overrides
    )
    decoding = Decoding(max_new_tokens=max_new_tokens)
    if pictures:
        return _ask_images(loaded, pictures, asked, decoding, batch_size, out, model)
    from ecglm.inference import ask as ask_records

    rows, more_skipped = ask_records(
        loaded,
        paths,
        asked,
        out=out,
        fs=fs,
        leads=lead_names,
        window=window,
        decoding=decoding,
        batch_size=batch_size,
        model_id=str(model),
        plot_dir=plot,
        progress=len(paths) > 1,
    )
    skipped += more_skipped
    for row in rows if out is None else rows[:20]:
        print(f"{row['record']} [window {row['window']}] {row['question']}\n  -> {row['answer']}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if out:
        print(f"{len(rows)} answer(s) appended to {out}; {len(skipped)} file(s) skipped")
    answered = len(paths) - len(more_skipped)
    return 2 if skipped and answered == 0 else 1 if skipped else 0


def _read_questions(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise AskError(f"--questions {path}: cannot read it ({err.strerror or err})") from None
    asked = [q.strip() for q in lines if q.strip()]
    if not asked:
        raise AskError(f"--questions {path}: no question in it (one per line)")
    return asked


def _ask_images(
    model: ECGLM,
    pictures: list[tuple[str, np.ndarray]],
    questions: list[str],
    decoding: Decoding,
    batch_size: int,
    out: str | None,
    model_id: str,
) -> int:
    """``ecglm ask --image``: every question about every picture, printed (and appended to ``out``)."""
    from ecglm.inference import answer_images, drop_cut_line

    pairs = [(path, picture, q) for path, picture in pictures for q in questions]
    answers = answer_images(
        model, [picture for _, picture, _ in pairs], [q for _, _, q in pairs], decoding, batch_size
    )
    rows = [
        {"image": str(path), "question": q, "answer": a, "model": str(model_id)}
        for (path, _, q), a in zip(pairs, answers, strict=True)
    ]
    for row in rows:
        print(f"{row['image']} {row['question']}\n  -> {row['answer']}")
    if out:
        drop_cut_line(Path(out))
        with Path(out).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


def ask_parser():
    """The parser of ``ecglm ask``'s flags (derived from :func:`ask`)."""
    from ecglm.commands.arguments import function_parser

    return function_parser(ask, "ecglm ask")


def run_ask(args: list[str]) -> int:
    """``ecglm ask ARGS`` from Python: the exit status (user errors raise, as ``ecglm.commands.main``
    prints them)."""
    from ecglm.commands.arguments import call

    return call(ask, list(args), prog="ecglm ask")
