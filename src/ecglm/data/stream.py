"""The QA stream under the DataModule: an epoch plan over WebDataset shards, split across DDP ranks
and loader workers, mixed by dataset weight, resumable mid-epoch, and safe with bad input.

Why not ``webdataset.split_by_node`` / ``split_by_worker``: they deal whole shards round-robin, so
ranks get unequal numbers of QA pairs whenever shards differ in size (a rank that runs out first
leaves the others waiting in an all-reduce: a hang), and a shard can only be used by one worker.
:class:`EpochPlan` instead cuts every dataset's stream of QA pairs into contiguous ranges by QA
*position* (the manifest records each shard's ``num_qa``), one range per (rank, worker) "slot",
sized so that every rank yields the same number of full batches. A slot reads only the shards its
ranges touch; at most the two at its ends are read in part. No per-sample index is held anywhere:
the plan needs the shard list and its counts, nothing that grows with the number of samples.

Positions count every entry of a sample's ``json["qa"]`` in shard order; a shard's pairs are
``0 .. num_qa - 1``. A dataset's *stream* is its shards' pairs, pass after pass, each pass in its
own seeded shard order; epoch ``e`` of a dataset with quota ``Q`` is positions ``[e Q, (e + 1) Q)``.
Without weights ``Q`` is the dataset's size, so an epoch is one pass over every pair.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, count, islice, pairwise
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.autodecode import DecodingError
from webdataset.tariterators import base_plus_ext, tarfile_samples

from ecglm.data.shards import IMAGE_MEMBERS, cached_sha256

NUM_LEADS = 12
TAR_ERROR = "corrupt or truncated tar"
#: Why input was skipped: a fixed set, so that every rank logs the same per-reason metrics.
REASONS = (
    TAR_ERROR,
    "sha256 mismatch",
    "missing json",
    "invalid json",
    "unreadable json",
    "non-UTF-8 text",
    "missing ecg.npy",
    "unreadable ecg.npy",
    "unreadable member",
    "wrong shape",
    "non-finite ecg",
    "empty QA",
    "unreadable image",
    "wrong image size",
)
#: The smallest side an ECG image may have, pixels: a smaller one cannot show a 12-lead printout.
MIN_IMAGE_SIDE = 64

log = logging.getLogger("ecglm.data")


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
            }


class BadSampleError(ValueError):
    """Bad input met while streaming in ``strict`` mode; the message names shard, key and problem."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # webdataset appends the stream and url to the args of exceptions passing through it.
        return self.message


class BadInput:
    """What the stream does with bad input: raise :class:`BadSampleError` (``strict``) or log and count it.

    One object serves every stage of a loader's pipeline: webdataset's ``handler=`` for tar and
    decoding errors, its ``rename_files=`` hook (:meth:`see_member`, its only per-member hook, which
    tells a tar error the member it broke on) and :class:`CheckedQA`. Each skip is a WARNING on the
    ``ecglm.data`` logger naming shard and key. ``counts`` holds the QA pairs lost, by reason (one of
    :data:`REASONS`), in the process that runs the pipeline (a loader worker keeps its own and logs a
    summary when its stream ends). A bad sample loses its pairs; a broken tar or an unreadable sample,
    whose pairs are unknown when it is met, loses what its shard segment then fails to yield of the
    pairs the manifest lists (:meth:`end_segment`).
    ``shards`` maps each url to its sample count in the manifest (or None), to notice a tar that
    ends early without an error (tarfile reads a corrupt header past the first as the end).
    What it tracks of the tar being read is per stream: a worker reads one shard per dataset at a
    time, so each dataset's stream reads through its own :meth:`for_stream` copy, which shares the
    counts. Picklable, so it travels to loader workers.
    """

    def __init__(self, shards: dict[str, int | None], strict: bool = False):
        self.shards, self.strict = dict(shards), strict
        self.urls = sorted(self.shards, key=len, reverse=True)
        self.counts: Counter[str] = Counter()
        self.muted = False  # a second read of the same input (padding) reports nothing new
        self.reset()

    def reset(self) -> None:
        """Start a new pass over the shards."""
        self.counts.clear()
        self._start_stream()

    def _start_stream(self) -> None:
        self.read: Counter[str] = Counter()  # samples per shard that came out of the tar
        self.broken: set[str | None] = set()  # shards with a tar error already reported
        self.last_member: str | None = None
        self.done_key: str | None = None  # the last sample past the tar stages
        self.start_segment(None)

    def for_stream(self) -> BadInput:
        """A handler for one more stream read beside others: its own tar position, the same counts."""
        stream = copy.copy(self)  # shares counts (and strict, muted, shards)
        stream._start_stream()
        return stream

    def start_segment(self, url: str | None) -> None:
        """A shard segment starts: pairs lost in it are accounted for anew."""
        if url is not None:
            self.read[url] = 0
        self.explained = 0  # pairs of the segment lost to problems of known size
        self.unsized: str | None = None  # the last problem met whose pairs are unknown

    def report(
        self, url: Any, key: Any, reason: str, detail: str, pairs: int | None = None, announce: bool = True
    ) -> None:
        """Bad input met in the segment being read: raise (``strict``), else count it and log it.

        ``pairs``: the segment's QA pairs lost to it; None where they are unknown (a broken tar, a
        sample dropped unread), which :meth:`end_segment` then puts the segment's shortfall down to.
        ``announce=False``: another segment of the shard logs it (each reader counts its own pairs).
        """
        if reason not in REASONS:
            raise ValueError(f"unknown bad-input reason {reason!r}; expected one of {REASONS}")
        where = f"shard {url}" if key is None else f"shard {url}, key {key}"
        message = f"{where}: {reason}: {detail}"
        if self.strict:
            raise BadSampleError(message)
        if self.muted:
            return
        if pairs is not None:
            self._lose(reason, pairs)
        elif self.unsized != TAR_ERROR:  # after a tar error, what else goes wrong is its symptom
            self.unsized = reason
        if announce:
            log.warning("skipped bad input: %s", message)

    def _lose(self, reason: str, pairs: int) -> None:
        self.explained += pairs
        if pairs > 0:
            self.counts[reason] += pairs

    def end_segment(self, url: str, key: str, shortfall: int) -> None:
        """A segment ended ``shortfall`` pairs short of its share: count what no known problem explains."""
        lost = shortfall - self.explained
        if lost <= 0:
            return
        if self.unsized is None:  # no error: the tar ended early (an early end of a shard read in part)
            detail = f"the tar ends after this sample, {lost} QA pairs short of this reader's share of it"
            self.report(url, key, TAR_ERROR, detail + "; the rest of this shard is lost", lost)
        elif not self.muted:
            self.counts[self.unsized] += lost

    def see_member(self, name: str) -> str:
        self.last_member = name
        return name

    def passed(self, url: str, key: str) -> None:
        """A sample came out of the tar stages (decoded or not)."""
        self.read[url] += 1
        self.done_key = key

    def check_count(self, url: str, key: str) -> None:
        """At the end of a shard: did it hold every sample the manifest lists?"""
        expected, read = self.shards.get(url), self.read[url]
        if url not in self.broken and expected is not None and read < expected:
            self.report(
                url,
                key,
                TAR_ERROR,
                f"the tar ends after this sample, {read} of the {expected} in the manifest; "
                "the rest of this shard is lost",
            )

    def _shard_of(self, exn: BaseException) -> str | None:
        # webdataset appends the url (or the open file, whose repr holds the path) to the exception's args.
        text = " ".join(str(arg) for arg in getattr(exn, "args", ()))
        return next((url for url in self.urls if url in text), None)

    def _tar_error(self, exn: Exception) -> None:
        member = self.last_member
        if member is not None and base_plus_ext(member)[0] == self.done_key:
            member = None  # from a shard already done: this one broke before its first member
        url = self._shard_of(exn)
        self.broken.add(url)
        detail = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        detail += f" (last member read: {member})" if member else " (no member of it read)"
        key = base_plus_ext(member)[0] if member else "unknown"
        self.report(url, key, TAR_ERROR, detail + "; the rest of this shard is lost")

    def _decoding_error(self, exn: DecodingError) -> None:
        self.passed(exn.url, exn.key)
        cause = exn.__cause__
        if isinstance(cause, UnicodeDecodeError):
            problem = "non-UTF-8 text"
        else:
            problem = f"unreadable {exn.k}" if exn.k in ("json", "ecg.npy") else "unreadable member"
        # webdataset drops the sample: its pairs are unknown here, the segment's shortfall counts them.
        self.report(exn.url, exn.key, problem, f"{exn.k}: {type(cause).__name__}: {cause}")

    def __call__(self, exn: Exception) -> bool:
        """webdataset's exception handler: report, then go on with the next shard.

        Returns False (stop) for an error inside a shard's tar stream, raised in webdataset's member
        loop, where going on would only meet the same broken stream again; webdataset then moves on
        to the next shard. Errors its outer stages report carry the url (or None) as last argument;
        for those True means "go on".
        """
        if isinstance(exn, BadSampleError):  # raised by this handler in an inner stage
            raise exn
        try:
            if isinstance(exn, DecodingError):
                self._decoding_error(exn)
                return True
            self._tar_error(exn)
        except BadSampleError as error:
            raise error from exn
        last = exn.args[-1] if exn.args else None
        return last is None or last in self.urls


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
                if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"):
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


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it: where it is, which dataset it holds and how many pairs."""

    url: str
    dataset: str
    num_qa: int
    num_samples: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Segment:
    """QA positions ``[start, stop)`` of one shard."""

    shard: ShardInfo
    start: int
    stop: int

    @property
    def complete(self) -> bool:
        """Whether the segment runs to the shard's end (then the shard's sample count is checked)."""
        return self.stop == self.shard.num_qa


class ShardChecksums:
    """Checks each shard's file against the sha256 its manifest records, before any of its pairs is used.

    The whole file is hashed before its tar is read: a digest taken while streaming is known only at
    the shard's end, after its pairs have trained; the second read comes from the OS cache. Each
    process hashes a file once while its size and modification time stay the same. Picklable.
    """

    def __init__(self, manifest: str):
        self.manifest = manifest

    def problem(self, shard: ShardInfo) -> str | None:
        """Why ``shard``'s file does not match the manifest, or None (also when it records no sha256)."""
        if shard.sha256 is None:
            return None
        actual = cached_sha256(shard.url)
        if actual == shard.sha256:
            return None
        return (
            f"the file's sha256 is {actual}, {self.manifest} records {shard.sha256}: the shard changed "
            "or was damaged after it was built, and none of its pairs is used. Build the shards again "
            "(`ecglm shard --config CONFIG --out_dir DIR` rebuilds those whose sha256 does not match) "
            "or restore the file"
        )


def _largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` as integers that sum to ``total`` (Hamilton's method)."""
    norm = sum(weights.values())
    exact = {name: total * w / norm for name, w in weights.items()}
    shares = {name: math.floor(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: (shares[n] - exact[n], n))[: total - sum(shares.values())]:
        shares[name] += 1
    return shares


class EpochPlan:
    """Which QA positions each (rank, loader worker) slot reads in an epoch (see the module docstring).

    Args:
        shards: Every shard of the split.
        world_size: DDP ranks.
        num_workers: Loader workers per rank (0 counts as 1: the main process).
        batch_size: Pairs per batch; a worker's share is whole batches.
        seed: Seed of the per-pass shard orders.
        shuffle: Shuffle shard order per pass (training); otherwise manifest order.
        drop_last: Every rank gets the same number of full batches and the epoch's last
            ``< world_size * batch_size`` pairs wait for the next pass (training). Without it every
            pair is read once and ranks differ by at most one pair (evaluation).
        weights: Dataset name -> relative share of the epoch's pairs. A dataset whose share is
            larger than its size is read more than once per epoch (each pass in a new order), a
            smaller one partly, continuing next epoch where it stopped. ``None``: each pair once.
        samples_per_epoch: Pairs per epoch with ``weights`` (default: all pairs of the split).
    """

    def __init__(
        self,
        shards: Sequence[ShardInfo],
        world_size: int = 1,
        num_workers: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        weights: Mapping[str, float] | None = None,
        samples_per_epoch: int | None = None,
    ):
        if world_size < 1 or batch_size < 1:
            raise ValueError(f"world_size and batch_size must be >= 1, got {world_size} and {batch_size}")
        self.world_size, self.num_workers = world_size, max(1, num_workers)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.shards: dict[str, list[ShardInfo]] = {}
        for shard in sorted(shards, key=lambda s: s.url):
            if shard.num_qa > 0:
                self.shards.setdefault(shard.dataset, []).append(shard)
        self.sizes = {d: sum(s.num_qa for s in group) for d, group in self.shards.items()}
        self.quotas = self._quotas(weights, samples_per_epoch)
        self.total = sum(self.quotas.values())
        self.targets = [self._target(slot) for slot in range(self.world_size * self.num_workers)]
        self.allocation = self._allocate()

    def _quotas(self, weights: Mapping[str, float] | None, samples_per_epoch: int | None) -> dict[str, int]:
        if weights is None:
            if samples_per_epoch is None:
                return dict(self.sizes)
            weights = self.sizes
        unknown, missing = sorted(set(weights) - set(self.sizes)), sorted(set(self.sizes) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"dataset weights must name exactly the datasets of the split, {sorted(self.sizes)}: "
                + (f"unknown {unknown}" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"missing {missing} (give 0 to leave one out)" if missing else "")
            )
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"dataset weights must be >= 0 with one > 0, got {dict(weights)}")
        total = sum(self.sizes.values()) if samples_per_epoch is None else samples_per_epoch
        return _largest_remainder(total, {d: float(weights[d]) for d in sorted(self.sizes)})

    def _target(self, slot: int) -> int:
        """Pairs slot ``slot`` yields: whole batches; with ``drop_last`` the same number per rank."""
        rank, worker = divmod(slot, self.num_workers)
        if self.drop_last:
            rank_items = self.total // (self.world_size * self.batch_size) * self.batch_size
        else:
            rank_items = self.total // self.world_size + (rank < self.total % self.world_size)
        batches = math.ceil(rank_items / self.batch_size)
        # The loader takes batches from its workers round-robin: worker w makes batches w, w + W, ...
        mine = batches // self.num_workers + (worker < batches % self.num_workers)
        items = mine * self.batch_size
        if batches and worker == (batches - 1) % self.num_workers:
            items -= batches * self.batch_size - rank_items  # the rank's last, partial batch
        return items

    def _allocate(self) -> dict[str, list[tuple[int, int]]]:
        """Per dataset, the ``[start, stop)`` offsets into its epoch quota that each slot reads.

        Each slot takes every dataset in proportion to the dataset's quota (so every worker mixes
        all datasets), rounded by largest remainder; where a dataset has fewer pairs left than that,
        the rest comes from the datasets with pairs to spare. Pairs left over after all slots are
        full (``drop_last``) are not read this epoch.
        """
        left = dict(self.quotas)
        counts: dict[str, list[int]] = {d: [] for d in self.quotas}
        for slot, target in enumerate(self.targets):
            share = _largest_remainder(target, self.quotas) if target else dict.fromkeys(self.quotas, 0)
            taken = {d: min(n, left[d]) for d, n in share.items()}
            short = target - sum(taken.values())
            for d in sorted(taken):
                extra = min(short, left[d] - taken[d])
                taken[d] += extra
                short -= extra
            if short:  # cannot happen: the quotas hold at least the sum of the targets
                raise AssertionError(f"epoch plan: slot {slot} is {short} pairs short")
            for d, n in taken.items():
                counts[d].append(n)
                left[d] -= n
        return {d: list(pairwise([0, *accumulate(ns)])) for d, ns in counts.items()}

    def rank_length(self, rank: int) -> int:
        """Pairs rank ``rank`` yields in an epoch (the loader's length in pairs)."""
        w = self.num_workers
        return sum(self.targets[rank * w : (rank + 1) * w])

    def slot_counts(self, rank: int, worker: int) -> dict[str, int]:
        """Pairs per dataset that slot (``rank``, ``worker``) reads in an epoch."""
        slot = rank * self.num_workers + worker
        return {d: ranges[slot][1] - ranges[slot][0] for d, ranges in self.allocation.items()}

    def pass_order(self, dataset: str, index: int) -> list[ShardInfo]:
        """The shards of ``dataset`` in the order of pass ``index`` over it."""
        order = list(self.shards[dataset])
        if self.shuffle:
            random.Random(f"{self.seed}:{dataset}:{index}").shuffle(order)  # str seeds: same in every process
        return order

    def segments(self, epoch: int, rank: int, worker: int) -> dict[str, list[Segment]]:
        """The shard segments slot (``rank``, ``worker``) reads in ``epoch``, per dataset, in order."""
        out = {}
        for dataset, quota in self.quotas.items():
            a, b = self.allocation[dataset][rank * self.num_workers + worker]
            out[dataset] = self._segments(dataset, epoch * quota + a, epoch * quota + b)
        return out

    def _segments(self, dataset: str, begin: int, end: int) -> list[Segment]:
        size, segments = self.sizes[dataset], []
        for index in range(begin // size, math.ceil(end / size)) if end > begin else ():
            lo, hi = max(begin, index * size) - index * size, min(end, (index + 1) * size) - index * size
            offset = 0
            for shard in self.pass_order(dataset, index):
                start, stop = max(lo, offset), min(hi, offset + shard.num_qa)
                if start < stop:
                    segments.append(Segment(shard, start - offset, stop - offset))
                offset += shard.num_qa
        return segments

    def worker_batches_done(self, batches: int, worker: int) -> int:
        """Batches worker ``worker`` has made once the loader has handed out ``batches`` (round-robin)."""
        return batches // self.num_workers + (worker < batches % self.num_workers)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records to check that a resumed run plans the same epochs."""
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "quotas": dict(self.quotas),
            "sizes": dict(self.sizes),
        }


def interleave(
    streams: Mapping[str, Iterator[Any]], counts: Mapping[str, int], rng: random.Random
) -> Iterator[Any]:
    """Items from each stream in random order, ``counts[name]`` from each, drawn by what is left.

    webdataset's ``RandomMix`` draws with fixed probabilities, so one dataset runs out early and the
    end of an epoch is one dataset alone; drawing in proportion to the remaining counts spreads
    every dataset evenly over the whole epoch and ends them together. A stream that ends before
    its count (bad input was skipped) simply stops being drawn from.
    """
    left = {name: n for name, n in sorted(counts.items()) if n > 0}
    while left:
        pick = rng.randrange(sum(left.values()))
        for name, n in left.items():  # noqa: B007 - the loop finds `name`
            if pick < n:
                break
            pick -= n
        item = next(streams[name], None)
        if item is None:
            del left[name]
            continue
        left[name] -= 1
        if not left[name]:
            del left[name]
        yield item


class QAStream(IterableDataset):
    """One rank's QA pairs of an epoch: its workers' slots of an :class:`EpochPlan`, read from the shards.

    ``epoch`` and ``skip_batches`` (batches of this epoch already trained on, when resuming) are set
    before each iteration (the DataModule's loader does it); workers get a copy when they start.
    With ``counters`` (a tensor in shared memory, one row per loader worker and one column per
    reason of :data:`REASONS`), each worker keeps its row equal to the QA pairs it lost so far, so the
    main process adds up every worker's counts without anything riding in the batches.

    Args:
        plan: The epoch plan of the split.
        rank: This process's DDP rank.
        bad: What to do with bad input (:class:`BadInput`).
        num_samples: Expected ECG length (from the manifest), or None for any.
        shuffle_buffer: Pairs held for shuffling within a worker (0: no shuffle).
        item_filter: A stage applied to the pairs before shuffling (the evaluation subset). The
            stream has no length then.
        pad: Top a slot that lost pairs to bad input back up to its target by reading its share
            again (training: every rank must make the same number of batches). Evaluation does not
            pad: a repeated pair would count twice.
        checksums: Verifies each shard against the manifest's sha256 before reading it (None: no check).
        counters: ``(workers, len(REASONS))`` int64 tensor in shared memory (see above), or None.
    """

    def __init__(
        self,
        plan: EpochPlan,
        rank: int,
        bad: BadInput,
        num_samples: int | None = None,
        shuffle_buffer: int = 0,
        item_filter: Any = None,
        pad: bool = True,
        checksums: ShardChecksums | None = None,
        counters: torch.Tensor | None = None,
    ):
        self.plan, self.rank, self.bad, self.num_samples = plan, rank, bad, num_samples
        self.counters = counters
        self.shuffle_buffer, self.item_filter, self.pad = shuffle_buffer, item_filter, pad
        self.checksums = checksums
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self) -> int:
        if self.item_filter is not None:
            raise TypeError("a filtered QA stream has no length known in advance")
        return self.plan.rank_length(self.rank)

    def _publish(self, worker: int) -> None:
        """Write this worker's pairs lost so far into its row of the shared counters."""
        if self.counters is not None:
            self.counters[worker] = torch.tensor([self.bad.counts[r] for r in REASONS])

    def _read(self, segments: list[Segment], checked: CheckedQA) -> Iterator[dict[str, Any]]:
        bad = checked.bad
        for segment in segments:
            damaged = self.checksums.problem(segment.shard) if self.checksums is not None else None
            if damaged is not None:
                bad.report(segment.shard.url, None, "sha256 mismatch", damaged, segment.stop - segment.start)
                continue
            urls = iter([{"url": segment.shard.url}])
            samples = tarfile_samples(urls, handler=bad, rename_files=bad.see_member)
            yield from checked.segment(wds.decode(handler=bad)(samples), segment)

    def _slot(self, worker: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.plan.seed}:{self.epoch}:{self.rank}:{worker}")
        segments = self.plan.segments(self.epoch, self.rank, worker)
        streams = {
            d: self._read(segs, CheckedQA(self.bad.for_stream(), self.num_samples))
            for d, segs in segments.items()
        }
        items = interleave(streams, self.plan.slot_counts(self.rank, worker), rng)
        if self.item_filter is not None:
            items = self.item_filter(items)
        if self.shuffle_buffer > 1:
            items = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(items)
        return items

    def _padded(self, worker: int, target: int) -> Iterator[dict[str, Any]]:
        """The slot's pairs; with ``pad``, read again from its start until ``target`` pairs came out."""
        produced = 0
        for attempt in count():
            self.bad.muted = attempt > 0  # the same bad input again: already reported
            before = produced
            for item in self._slot(worker):
                if produced == target:
                    return
                yield item
                produced += 1
            if produced >= target or not self.pad or self.item_filter is not None:
                return
            if produced == before:
                segments = self.plan.segments(self.epoch, self.rank, worker).values()
                shards = sorted({s.shard.url for group in segments for s in group})
                raise RuntimeError(
                    f"rank {self.rank}, loader worker {worker}: no readable QA pair in its share of "
                    f"{shards} (see the bad-input warnings above)"
                )
            if attempt == 0:
                log.warning(
                    "rank %d, loader worker %d: bad input left %d of its %d pairs this epoch; it repeats "
                    "its own pairs so that every rank makes the same number of batches",
                    self.rank,
                    worker,
                    produced,
                    target,
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers round-robin starting with worker 0, and the plan's
        # batch k comes from plan worker k mod W. Resuming after k batches, loader worker 0 plays plan
        # worker k mod W, so the next batch is the one the interrupted run would have trained on next.
        worker = (loader_worker + self.skip_batches) % workers
        if workers != self.plan.num_workers:
            raise RuntimeError(
                f"the epoch plan is for {self.plan.num_workers} loader workers, the loader has {workers}"
            )
        self.bad.reset()
        self._publish(worker)
        published = 0
        target = self.plan.targets[self.rank * workers + worker]
        skip = self.plan.worker_batches_done(self.skip_batches, worker) * self.plan.batch_size
        for item in islice(self._padded(worker, target), skip, None):
            lost = sum(self.bad.counts.values())
            if lost != published:
                self._publish(worker)
                published = lost
            item["epoch"] = self.epoch  # seeds per-epoch image distortions (ecglm.render.ECGPrintout)
            yield item
        self._publish(worker)
        if self.bad.counts:
            log.warning(
                "%s at the end of its stream: QA pairs lost to bad input, by reason: %s",
                f"loader worker {worker}" if info else "the loader",
                dict(sorted(self.bad.counts.items())),
            )
