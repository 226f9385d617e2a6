"""One rank's QA pairs of an epoch, read from the shards: :class:`QAStream`, the ``IterableDataset``
the DataModule's loaders iterate, and :func:`interleave`, which mixes a slot's datasets."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from itertools import count, islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples

from ecglm.data.stream.bad_input import REASONS, UNREACHABLE, BadInput
from ecglm.data.stream.checksums import ShardChecksums
from ecglm.data.stream.plan import EpochPlan, Segment
from ecglm.data.stream.qa import CheckedQA
from ecglm.data.stream.remote import RemoteShards, ShardReader, ShardUnreachable

log = logging.getLogger("ecglm.data")


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
        remote: The shard urls are fsspec URLs read through :class:`RemoteShards` (retries, resume,
            cache); None: local files.
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
        remote: RemoteShards | None = None,
    ):
        self.remote = remote
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
            if self.remote is not None:
                yield from self._read_remote(segment, checked)
                continue
            damaged = self.checksums.problem(segment.shard) if self.checksums is not None else None
            if damaged is not None:
                bad.report(segment.shard.url, None, "sha256 mismatch", damaged, segment.stop - segment.start)
                continue
            urls = iter([{"url": segment.shard.url}])
            samples = tarfile_samples(urls, handler=bad, rename_files=bad.see_member)
            yield from checked.segment(wds.decode(handler=bad)(samples), segment)

    def _read_remote(self, segment: Segment, checked: CheckedQA) -> Iterator[dict[str, Any]]:
        """One segment of a shard in object storage: from the cache, or streamed and hashed on the way.

        With a cache the shard is fetched whole (hashed as it comes) and checked before any pair of it
        is used, as a local shard is. Streamed, its sha256 is known at its end: the segment that reads
        to the end checks it, and a mismatch counts the segment's pairs as bad input (``strict``: raises).
        """
        bad, shard, remote = checked.bad, segment.shard, self.remote
        expected = shard.sha256 if self.checksums is not None else None
        mismatch = "the shard's sha256 is {}, the manifest records {}: it changed or was damaged after it "
        mismatch += "was built; build the shards again (ecglm shard) or restore the object"
        source: Any = None
        if remote.cache_dir is not None and expected is not None:
            path = remote.cached(shard.url, expected)
            if path is None:
                try:
                    path, digest = remote.fetch(shard.url, expected)
                except ShardUnreachable as err:
                    bad.start_segment(shard.url)
                    bad._unreachable(err)
                    bad.end_segment(shard.url, "unknown", segment.stop - segment.start)
                    return
                if path is None:
                    bad.report(shard.url, None, "sha256 mismatch", mismatch.format(digest, expected),
                               segment.stop - segment.start)  # fmt: skip
                    return
            source = open(path, "rb")  # noqa: SIM115 - closed below
        else:
            source = remote.open(shard.url)
        try:
            sources = iter([{"url": shard.url, "stream": source}])
            files = tar_file_expander(sources, handler=bad, rename_files=bad.see_member)
            samples = group_by_keys(files, handler=bad)
            # One pair held back: the reader of the stream stops asking after the slot's last pair, so the
            # end-of-shard check runs before that pair is passed on, not after.
            yielded, held = 0, None
            for item in checked.segment(wds.decode(handler=bad)(samples), segment):
                if held is not None:
                    yield held
                held, yielded = item, yielded + 1
            if isinstance(source, ShardReader) and expected is not None and segment.complete:
                self._check_streamed(source, shard.url, expected, yielded, bad, mismatch)
            if held is not None:
                yield held
        finally:
            source.close()

    @staticmethod
    def _check_streamed(
        source: ShardReader, url: str, expected: str, yielded: int, bad: BadInput, mismatch: str
    ) -> None:
        """At a streamed shard's end: does the digest of its bytes match the manifest's?"""
        if url in bad.broken:
            return  # read in part: no digest of the whole
        try:
            source.drain()  # the tar reader stops at its end marker: hash the padding after it
        except ShardUnreachable as err:
            bad.report(url, None, UNREACHABLE, f"{err.reason}; its sha256 was not checked", 0)
            return
        if source.ended and source.hexdigest() != expected:
            detail = mismatch.format(source.hexdigest(), expected)
            detail += f"; the {yielded} pairs of it read before its end showed this were used"
            bad.report(url, None, "sha256 mismatch", detail, yielded)

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
