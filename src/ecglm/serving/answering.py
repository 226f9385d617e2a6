"""The answers of checked :class:`~ecglm.serving.requests.Job` s, many at a time: every (window,
question) pair of every job through :func:`ecglm.inference.answer_windows` (or
:func:`~ecglm.inference.answer_images`) in batches, cut back into one list per job. The one answering
path of ``ecglm serve``'s workers (:mod:`ecglm.serving.api`) and ``ecglm demo``'s page
(:mod:`ecglm.serving.demo`), so both answer exactly as ``ecglm ask`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ecglm.serving.requests import Job

if TYPE_CHECKING:
    from ecglm.model import ECGLM, Decoding


def answer_jobs(
    model: ECGLM, jobs: Sequence[Job], decoding: Decoding, generate_batch_size: int
) -> list[list[str]]:
    """One list of answers per job, window by window (or picture by picture), each window's
    questions in order."""
    from ecglm.inference import answer_images, answer_windows

    signals: list[tuple[int, Any, str]] = []
    pictures: list[tuple[int, Any, str]] = []
    for index, job in enumerate(jobs):
        for ecg in job.windows:
            signals += [(index, ecg, q) for q in job.questions]
        for image in job.images:
            pictures += [(index, image, q) for q in job.questions]
    answers: list[list[str]] = [[] for _ in jobs]
    for pairs, run in ((signals, answer_windows), (pictures, answer_images)):
        if not pairs:
            continue
        said = run(
            model,
            [ecg for _, ecg, _ in pairs],
            [q for _, _, q in pairs],
            decoding,
            generate_batch_size,
        )
        for (index, _, _), text in zip(pairs, said, strict=True):
            answers[index].append(text)
    return answers
