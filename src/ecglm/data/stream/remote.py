"""Shards in object storage: ``data_dir`` as an fsspec URL (``https://``, ``s3://``, ``gs://``, ...).

fsspec (with aiohttp for HTTP, s3fs for S3, gcsfs for GCS) does the I/O: it lists nothing here (the
manifest lists the shards), it opens each shard as a buffered file that fetches byte ranges, and it
takes credentials from each library's usual environment and config (``AWS_*`` variables,
``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from a recipe. webdataset's tar reader
reads that file as it reads a local one.

Written here, because neither library does it: :class:`ShardReader`, a file-like object between the
two that

- hashes the bytes as the tar reader consumes them (sha256 on the fly, no second read);
- retries a failed read (a dropped connection, a 5xx, a stalled server past its read timeout) with
  bounded exponential backoff, and resumes at the byte it stopped at: by a ranged read where the
  store serves ranges (every object store, most HTTP servers), else by reading the object again from
  its start and discarding the bytes already passed on. Either way the tar reader sees every byte
  once, so no QA pair is yielded twice or lost;
- after its retries raises :class:`ShardUnreachable`, naming the URL and the reason, which the
  stream counts as the shard lost (or raises under ``strict``).

:class:`RemoteShards` holds the settings (picklable, so it travels to loader workers) and the optional
local cache (:attr:`RemoteShards.cache_dir`): a shard fetched once is kept on disk, checked against
its sha256 before it is used, written to a temporary file and moved in place with ``os.replace`` so
that several processes on one node never read a partial copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ecglm.data")

#: Protocols read as local files (the path, without the protocol).
LOCAL_PROTOCOLS = ("file", "local")


def is_remote(location: str | os.PathLike | None) -> bool:
    """Whether ``location`` is a URL read through fsspec (``s3://...``), not a local path or ``file://``."""
    if location is None or isinstance(location, os.PathLike):
        return False
    text = str(location)
    return "://" in text and text.split("://", 1)[0].lower() not in LOCAL_PROTOCOLS


def local_path(location: str | os.PathLike) -> Path:
    """A local path or ``file://`` URL as a path."""
    text = str(location)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser()


def join(base: str, name: str) -> str:
    """``base`` URL and the object ``name`` under it."""
    return base.rstrip("/") + "/" + name


class ShardUnreachable(OSError):
    """A shard that could not be read after the retries: its URL and the reason."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason

    def __reduce__(self):  # picklable through loader workers' error queues
        return type(self), (self.url, self.reason)


def _no_ranges(err: ValueError) -> bool:
    """fsspec's words for a server that serves no byte ranges (or a stream that cannot seek)."""
    return any(word in str(err).lower() for word in ("range", "seek"))


def _permanent(err: BaseException) -> bool:
    """Errors no retry mends: the object is missing or access is refused.

    fsspec's HTTP filesystem raises FileNotFoundError for any failed look-up (a 503 too), the
    HTTP status on its cause: only 401, 403, 404 and 410 are taken as final there.
    """
    if not isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = getattr(err.__cause__, "status", None)
    if err.__cause__ is not None and status is None:
        return False  # the server could not be reached: retried
    return status is None or status in (401, 403, 404, 410)


@dataclass
class RemoteShards:
    """How shards are read from object storage: fsspec options, retries and the local cache.

    Args:
        storage_options: Options for the fsspec filesystem (e.g. ``{"endpoint_url": ...}`` for an
            S3-compatible store, ``{"anon": True}``); credentials belong in the library's environment.
        retries: Tries after the first failed read of a shard before it is counted as lost.
        backoff: Seconds before the first retry; doubled each retry, at most ``max_backoff``.
        max_backoff: The longest wait between two tries.
        timeout: Seconds a read may wait for bytes before it fails and is retried (a stalled server).
        block_size: Bytes per ranged read.
        cache_dir: Keep each shard read here (one file per shard, named by its sha256), checked
            against the manifest before use. None: no cache.
        cache_gb: Bound of the cache (10**9 bytes); the least recently used shards are dropped.
    """

    storage_options: dict[str, Any] = field(default_factory=dict)
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    timeout: float = 60.0
    block_size: int = 8 << 20
    cache_dir: str | None = None
    cache_gb: float | None = None

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.timeout <= 0:
            raise ValueError(
                f"retries, backoff and max_backoff must be >= 0 and timeout > 0; got retries={self.retries}, "
                f"backoff={self.backoff}, max_backoff={self.max_backoff}, timeout={self.timeout}"
            )
        self._fs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = {}  # filesystems (their event loops, sessions) are made again in each worker
        return state

    @classmethod
    def for_location(
        cls,
        location: str | os.PathLike | None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        cache_gb: float | None = None,
        **settings: Any,
    ) -> RemoteShards | None:
        """The settings to read shards at ``location`` with, or None where it is a local folder."""
        if not is_remote(location):
            return None
        return cls(dict(storage_options or {}), cache_dir=cache_dir, cache_gb=cache_gb, **settings)

    def filesystem(self, url: str) -> Any:
        """The fsspec filesystem of ``url``'s protocol, with a read timeout, made once per process."""
        import fsspec

        protocol = url.split("://", 1)[0].lower()
        if self.__dict__.get("_pid") != os.getpid():  # a forked loader worker: its own event loop
            self._fs, self._pid = {}, os.getpid()
        if protocol not in self._fs:
            options = dict(self.storage_options)
            if protocol in ("http", "https"):
                import aiohttp

                client = dict(options.pop("client_kwargs", {}))
                client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_read=self.timeout))
                options["client_kwargs"] = client
            elif protocol in ("s3", "s3a"):
                config = dict(options.pop("config_kwargs", {}))
                config.setdefault("read_timeout", self.timeout)
                config.setdefault("connect_timeout", self.timeout)
                config.setdefault("retries", {"max_attempts": 1})  # the retries are ShardReader's
                options["config_kwargs"] = config
            self._fs[protocol] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        return self._fs[protocol]

    def read_bytes(self, url: str) -> bytes:
        """A small object (the manifest) whole, with the same retries."""
        with self.open(url) as reader:
            return reader.read()

    def read_manifest(self, base: str) -> dict:
        """``base/manifest.json`` read through fsspec."""
        url = join(base, "manifest.json")
        try:
            return json.loads(self.read_bytes(url))
        except ShardUnreachable as err:
            raise FileNotFoundError(
                f"no dataset manifest at {url} ({err.reason}): write the shards there first (ecglm shard "
                "--config CONFIG --out_dir URL writes the shards, then manifest.json), and check the "
                "credentials of the store in the environment (e.g. AWS_PROFILE, AWS_ENDPOINT_URL)"
            ) from err

    def open(self, url: str) -> ShardReader:
        return ShardReader(self, url)

    def wait(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (0 for the first retry)."""
        return min(self.max_backoff, self.backoff * 2**attempt)

    # ---- the local cache ----------------------------------------------------------------------

    def cached(self, url: str, sha256: str | None) -> Path | None:
        """The cached copy of a shard when it is there and matches ``sha256``; a damaged copy is dropped."""
        if self.cache_dir is None or sha256 is None:
            return None
        path = Path(self.cache_dir) / f"{sha256}.tar"
        if not path.is_file():
            return None
        from ecglm.data.shards import cached_sha256

        if cached_sha256(path) == sha256:
            with contextlib.suppress(OSError):  # recently used: the last to be dropped (its mtime, which
                os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))  # keys the digest, stays)
            return path
        log.warning("cached copy %s of %s does not match its sha256: dropped, fetched again", path, url)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None

    def fetch(self, url: str, sha256: str) -> tuple[Path | None, str]:
        """Copy a shard into the cache, hashing it as it comes; ``(path, digest)``, path None on a mismatch.

        The copy goes to a temporary file in the cache folder and is moved in place (``os.replace``,
        atomic on one filesystem) only once its sha256 matches: another process sees the whole file or none.
        """
        folder = Path(self.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".tar")
        try:
            with os.fdopen(fd, "wb") as out, self.open(url) as reader:
                while block := reader.read(1 << 20):
                    out.write(block)
                digest = reader.hexdigest()
            if digest != sha256:
                return None, digest
            path = folder / f"{sha256}.tar"
            os.replace(tmp, path)
            from ecglm.data.shards import remember_sha256

            with contextlib.suppress(FileNotFoundError):  # another process sharing the cache may have
                remember_sha256(path, digest)  # dropped it already: nothing to remember then
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._evict(keep=path)
        return path, digest

    def _evict(self, keep: Path) -> None:
        if self.cache_gb is None:
            return
        budget = self.cache_gb * 1e9
        files = []
        for path in Path(self.cache_dir).glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                files.append((stat.st_atime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= budget:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # a reader that has it open keeps reading it (POSIX)
                total -= size


class ShardReader(io.RawIOBase):
    """A shard's bytes through fsspec, hashed as they are read, with retries that resume where they stopped.

    Hand-written: fsspec's files fetch ranges but do not retry a failed fetch (s3fs retries some
    errors inside one request, aiohttp none) and nothing hashes a stream as it is consumed.
    ``read`` returns the next bytes of the object whatever failed in between: after an error it
    waits (:meth:`RemoteShards.wait`), opens the object again and seeks to the byte it stood at (a
    ranged read); a server that ignores ranges is read again from the start and the bytes already
    passed on are discarded. After ``retries`` failed tries in a row it raises
    :class:`ShardUnreachable`.
    """

    def __init__(self, remote: RemoteShards, url: str):
        super().__init__()
        self.remote, self.url = remote, url
        self.fs = remote.filesystem(url)
        self.digest = hashlib.sha256()
        self.position = 0
        self.retried = 0  # tries that failed, over the whole read
        self.ranges = True  # the server serves byte ranges (until it shows otherwise)
        self.ended = False  # read to the end: the digest is the whole object's
        self._file: Any = None

    def readable(self) -> bool:
        return True

    def __repr__(self) -> str:  # webdataset puts the stream's repr into its error messages
        return f"<ShardReader {self.url}>"

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def _open(self) -> Any:
        if self.ranges:
            try:
                f = self.fs.open(self.url, "rb", block_size=self.remote.block_size, cache_type="readahead")
                if self.position:
                    f.seek(self.position)
                return f
            except ValueError as err:  # fsspec's HTTP file on a server without ranges
                if not _no_ranges(err):
                    raise
                self.ranges = False
        f = self.fs.open(self.url, "rb", block_size=0)  # a plain stream: skip what was passed on
        left = self.position
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise EOFError(f"{self.url} ends at byte {self.position - left}, before byte {self.position}")
            left -= len(chunk)
        return f

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def read(self, size: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                if self._file is None:
                    self._file = self._open()
                data = self._file.read(size)
                break
            except ValueError as err:
                if self.ranges and _no_ranges(err):  # ranges refused mid-read
                    self.ranges = False
                    self._close_file()
                    continue
                error: BaseException = err
            except Exception as err:  # any failure of the store is retried
                error = err
            self._close_file()
            if _permanent(error):
                raise ShardUnreachable(self.url, f"{type(error).__name__}: {error}") from error
            failures += 1
            self.retried += 1
            if failures > self.remote.retries:
                raise ShardUnreachable(
                    self.url,
                    f"{failures} tries failed at byte {self.position}; last: {type(error).__name__}: {error}",
                ) from error
            wait = self.remote.wait(failures - 1)
            log.info("reading %s failed at byte %d (%s); try %d in %.1f s", self.url, self.position, error,
                     failures + 1, wait)  # fmt: skip
            time.sleep(wait)
        self.digest.update(data)
        self.position += len(data)
        if not data and size != 0:
            self.ended = True
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (the tar reader stops at its end-of-archive marker), so the digest is whole."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self._close_file()
        super().close()
