"""QA pairs out of shard samples: :func:`expand_qa` (one item per pair) and :class:`CheckedQA` (the
same behind checks: each bad sample or QA pair is reported to :class:`~ecglm.data.stream.BadInput`),
reading the QA positions of one shard segment of the epoch plan."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from ecglm.data.images import IMAGE_MEMBERS, IMAGE_MODES, MIN_IMAGE_SIDE
from ecglm.data.stream.bad_input import BadInput
from ecglm.data.stream.plan import Segment

NUM_LEADS = 12


def expand_qa(samples: Iterator[dict[str, Any]], first: int = 0) -> Iterator[dict[str, Any]]:
    """One item per QA pair, each with its ECG; pair ``i`` of a sample is keyed ``{key}_qa{first + i}``."""
    for sample in samples:
        meta = sample["json"]
        for i, qa in enumerate(meta["qa"], start=first):
            yield {
                "key": f"{sample['__key__']}_qa{i}",
                "ecg": sample.get("ecg.npy"),
                **({"image": sample["image.rgb"]} if "image.rgb" in sample else {}),
                "question": qa["question"],
                "answer": qa["answer"],
                "question_type": qa.get("question_type", "unknown"),
                "dataset": meta.get("dataset", "unknown"),
                # Preference pairs (DPO): a preferred and a dispreferred answer beside the reference.
                **{f: qa[f] for f in ("chosen", "rejected") if f in qa},
            }


def _empty(text: Any) -> bool:
    if isinstance(text, list):
        return not any(isinstance(t, str) and t.strip() for t in text)
    return not isinstance(text, str) or not text.strip()


def _turns(meta: dict[str, Any], index: int) -> list[dict[str, str]] | None:
    """The whole conversation whose first turn is ``meta["qa"][index]``, if it has more than one turn.

    PULSE samples keep each conversation in ``conversations`` and its first turn in ``qa``, after any
    single-turn pairs, so conversation ``j`` is pair ``len(qa) - len(conversations) + j``. Turns
    without a question or answer end the conversation there.
    """
    conversations = meta.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return None
    j = index - (len(meta["qa"]) - len(conversations))
    if not 0 <= j < len(conversations) or not isinstance(conversations[j], list):
        return None
    turns = []
    for turn in conversations[j]:
        if not isinstance(turn, dict) or _empty(turn.get("question")) or _empty(turn.get("answer")):
            break
        turns.append({"question": str(turn["question"]), "answer": str(turn["answer"])})
    return turns if len(turns) > 1 else None


class CheckedQA:
    """:func:`expand_qa` behind checks: each bad sample or QA pair goes to ``bad`` (:class:`BadInput`).

    A sample needs a JSON object with a ``qa`` list and a finite ``(12, num_samples)`` ECG
    (``num_samples`` from the manifest's preprocessing; any length when it is not recorded); a QA
    pair without question or answer is dropped alone, the ECG's other pairs are kept. Runs before
    any shuffle, so samples arrive shard by shard and a shard's end is where its url changes.
    """

    def __init__(self, bad: BadInput, num_samples: int | None = None):
        self.bad, self.num_samples = bad, num_samples

    def _problem(self, sample: dict[str, Any]) -> tuple[str, str] | None:
        meta, ecg = sample.get("json"), sample.get("ecg.npy")
        if meta is None:
            return "missing json", "the sample has no json member (its QA pairs are unknown)"
        if not isinstance(meta, dict) or not isinstance(meta.get("qa"), list):
            return "invalid json", f"expected an object with a 'qa' list, got {str(meta)[:80]!r}"
        if ecg is None and any(m in sample for m in IMAGE_MEMBERS):
            return self._image_problem(sample)
        if ecg is None:
            return "missing ecg.npy", "the sample's QA pairs refer to an ECG that is not in the shard"
        if not isinstance(ecg, np.ndarray):
            return "unreadable ecg.npy", f"decoded to {type(ecg).__name__}, not an array"
        width = self.num_samples if self.num_samples is not None else ecg.shape[-1] if ecg.ndim else -1
        # One ECG, or two stacked for a comparison question (its json lists their ecg_ids).
        ecgs = len(meta["ecg_ids"]) if isinstance(meta.get("ecg_ids"), list) else None
        expected = (NUM_LEADS, width) if ecgs is None else (ecgs, NUM_LEADS, width)
        if ecg.shape != expected:
            return (
                "wrong shape",
                f"ecg.npy has shape {ecg.shape}, expected "
                f"({', '.join(map(str, expected[:-1]))}, {self.num_samples or 'N'})",
            )
        if not np.isfinite(ecg).all():
            return "non-finite ecg", f"ecg.npy holds {int((~np.isfinite(ecg)).sum())} NaN/Inf values"
        return None

    @staticmethod
    def _image_problem(sample: dict[str, Any]) -> tuple[str, str] | None:
        """Decode the sample's ECG image (RGB, into ``sample["image.rgb"]``), or say what is wrong."""
        from PIL import Image, UnidentifiedImageError

        member = next(m for m in IMAGE_MEMBERS if m in sample)
        data = sample[member]
        if not isinstance(data, bytes):
            return "unreadable image", f"{member} decoded to {type(data).__name__}, not the file's bytes"
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated file fails here, not at open
                if image.mode not in IMAGE_MODES:
                    return "unreadable image", f"{member} has mode {image.mode}: expected RGB or grey"
                rgb = np.asarray(image.convert("RGB"))
        except UnidentifiedImageError:
            return "unreadable image", f"{member} is not an image file Pillow can read"
        except (OSError, Image.DecompressionBombError) as err:
            return "unreadable image", f"{member} cannot be decoded ({err})"
        if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
            return "wrong image size", (
                f"{member} is {rgb.shape[1]} x {rgb.shape[0]} px: an ECG printout needs at least "
                f"{MIN_IMAGE_SIDE} px a side"
            )
        sample["image.rgb"] = rgb
        return None

    def _pairs(self, sample: dict[str, Any], lo: int = 0, hi: int | None = None) -> Iterator[dict[str, Any]]:
        """The sample's good QA pairs with index in ``[lo, hi)``; empty ones are reported and dropped."""
        meta = sample["json"]
        for i, qa in enumerate(meta["qa"]):
            if i < lo or (hi is not None and i >= hi):
                continue
            missing = [f for f in ("question", "answer") if not isinstance(qa, dict) or _empty(qa.get(f))]
            if missing:
                self.bad.report(
                    sample.get("__url__"),
                    f"{sample['__key__']}_qa{i}",
                    "empty QA",
                    f"empty or missing {' and '.join(missing)}",
                    pairs=1,
                )
                continue
            for item in expand_qa(iter([{**sample, "json": {**meta, "qa": [qa]}}]), first=i):
                turns = _turns(meta, i)
                if turns is not None:
                    item["turns"] = turns  # a multi-turn conversation: trained on every answer
                yield item

    def segment(self, samples: Iterator[dict[str, Any]], segment: Segment) -> Iterator[dict[str, Any]]:
        """The QA pairs at positions ``[segment.start, segment.stop)`` of one shard's decoded samples.

        The shard is read from its start (a tar has no index to seek by) and left as soon as the
        segment ends; only a segment that reaches the shard's end checks the shard's sample count.
        A bad sample is logged by the segment that holds its first position, so a shard split
        between slots logs it once; each segment counts the pairs it loses. A sample whose JSON is
        unreadable has no known QA count and takes no positions: pairs after it in that shard move
        up (the price of keeping no index), and the segments after it fall short by its count.
        """
        url = segment.shard.url
        self.bad.start_segment(url)
        key, offset, yielded = None, 0, 0
        for sample in samples:
            key = sample.get("__key__")
            self.bad.passed(url, key)
            qa = _qa_list(sample)
            first, offset = offset, offset + (len(qa) if qa is not None else 0)
            if first >= segment.stop and not segment.complete:
                break  # past the segment: the rest of the shard belongs to another slot
            for item in self._in_segment(sample, segment, first, offset):
                yielded += 1
                yield item
        key = key if key is not None else "unknown"
        if segment.complete:
            self.bad.check_count(url, key)
        self.bad.end_segment(url, key, segment.stop - segment.start - yielded)

    def _in_segment(
        self, sample: dict[str, Any], segment: Segment, first: int, stop: int
    ) -> Iterator[dict[str, Any]]:
        """The good pairs of a sample at shard positions ``[first, stop)`` that lie in ``segment``."""
        url, key = segment.shard.url, sample.get("__key__")
        owner = segment.start <= first < segment.stop or (segment.complete and first >= segment.stop)
        if _qa_list(sample) is None:  # its pairs are unknown: the segment's shortfall is put down to it
            self.bad.report(url, key, *self._problem(sample), announce=owner)
            return
        if first < segment.start and stop <= segment.start:
            return  # wholly before the segment
        problem = self._problem(sample)
        if problem is not None:
            lost = max(0, min(stop, segment.stop) - max(first, segment.start))
            self.bad.report(url, key, *problem, pairs=lost, announce=owner)
            return
        yield from self._pairs(sample, segment.start - first, segment.stop - first)


def _qa_list(sample: dict[str, Any]) -> list[Any] | None:
    meta = sample.get("json")
    qa = meta.get("qa") if isinstance(meta, dict) else None
    return qa if isinstance(qa, list) else None
