"""Bad input met while streaming: one handler that raises (``strict``) or logs and counts it, by reason.

Every problem a shard can have (a broken tar, an unreadable member, a bad sample or QA pair, a
sha256 that does not match the manifest) is one of :data:`REASONS`; :class:`BadInput` reports it as
a WARNING naming shard and key and counts the QA pairs it costs, which the DataModule gathers from
its loader workers (``ecglm.data.monitor`` logs them as metrics).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

from webdataset.autodecode import DecodingError
from webdataset.tariterators import base_plus_ext

from ecglm.data.stream.remote import ShardUnreachable
from ecglm.errors import EcglmError

TAR_ERROR = "corrupt or truncated tar"
#: A remote shard that could not be read after the retries (:class:`ShardUnreachable`).
UNREACHABLE = "unreachable shard"
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
    UNREACHABLE,
)

log = logging.getLogger("ecglm.data")


class BadSampleError(EcglmError, ValueError):
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
        elif self.unsized not in (
            TAR_ERROR,
            UNREACHABLE,
        ):  # after a tar error, what else goes wrong is its symptom
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

    def _unreachable(self, exn: ShardUnreachable) -> None:
        # The rest of the shard is lost; its pairs are the segment's shortfall (end_segment).
        self.broken.add(exn.url)
        self.report(exn.url, None, UNREACHABLE, f"{exn.reason}; the rest of this shard is lost")

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
            if isinstance(exn, ShardUnreachable):
                self._unreachable(exn)
                return False
            if isinstance(exn, DecodingError):
                self._decoding_error(exn)
                return True
            self._tar_error(exn)
        except BadSampleError as error:
            raise error from exn
        last = exn.args[-1] if exn.args else None
        return last is None or last in self.urls
