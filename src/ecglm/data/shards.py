"""Deterministic WebDataset shard and manifest writing shared by all ecglm dataset builders.

A sample is a dict with ``__key__`` (no dots: WebDataset splits a tar member name at the first
dot of its basename into key and field), ``ecg.npy`` (stored as float16) and ``json`` (a dict).
The same samples always give byte-identical shards, so a manifest's sha256 sums identify a build,
and a builder can write a damaged shard again alone (:func:`check_build`, :func:`repair_shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import webdataset as wds

from ecglm.data.images import IMAGE_MEMBERS
from ecglm.data.splits import SPLITS
from ecglm.errors import EcglmError
from ecglm.io import atomic_write_bytes, commit, partial_path

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# TarWriter stamps every member with time.time() unless given an mtime; a fixed one keeps
# shards byte-identical across builds. uid/gid are 0 and uname/gname "bigdata" by default.
TAR_MTIME = 0.0


class ShardBuilder(Protocol):
    """Anything that can write a shard set with a ``manifest.json`` into a folder, idempotently."""

    def build(self, out_dir: str | Path) -> dict[str, Any]: ...


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """Deterministic UTF-8 JSON: sorted keys, no NaN, numpy scalars and arrays as plain values."""
    separators = None if indent else (",", ":")
    text = json.dumps(
        obj, sort_keys=True, indent=indent, separators=separators, allow_nan=False, default=_json_default
    )
    return text.encode("utf-8")


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample __key__ must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(
            f"sample __key__ {key!r} contains a dot; WebDataset would split it into key and field"
        )
    return key


def _encode_sample(sample: dict) -> dict[str, Any]:
    key = _check_key(sample.get("__key__"))
    images = [m for m in IMAGE_MEMBERS if m in sample]
    if images and set(sample) == {"__key__", "json", images[0]} and isinstance(sample[images[0]], bytes):
        return {"__key__": key, images[0]: sample[images[0]], "json": json_bytes(sample["json"])}
    unknown = set(sample) - {"__key__", "ecg.npy", "json"}
    if unknown or "ecg.npy" not in sample or "json" not in sample:
        raise ValueError(
            f"sample {key!r} must have exactly __key__, json and ecg.npy (or the bytes of one of "
            f"{', '.join(IMAGE_MEMBERS)}); got {sorted(sample)}"
        )
    with np.errstate(over="ignore"):  # overflow is reported below, naming the sample
        ecg = np.asarray(sample["ecg.npy"]).astype(np.float16)
    if not np.isfinite(ecg).all():
        raise ValueError(f"sample {key!r}: ecg.npy has NaN/inf values or values beyond float16 range")
    return {"__key__": key, "ecg.npy": npy_bytes(ecg), "json": json_bytes(sample["json"])}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: str | Path) -> str:
    """:func:`sha256_file`, computed once per process while the file keeps its size and mtime.

    Streaming checks every shard it reads, each epoch; a file rewritten since changes its mtime.
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(Path(path))
    return _DIGESTS[key]


def remember_sha256(path: str | Path, digest: str) -> None:
    """Record the sha256 of a file hashed as it was written (a fetched shard) for :func:`cached_sha256`."""
    stat = os.stat(path)
    _DIGESTS[(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)] = digest


class _ShardFile:
    """One tar shard being written beside its path (:func:`ecglm.io.partial_path`); :meth:`close` checksums
    it and commits it in place (:func:`ecglm.io.commit`)."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, partial_path(path)
        self.stream = open(self.tmp, "wb")  # noqa: SIM115 - closed in close() / abort()
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=TAR_MTIME)
        self.keys: set[str] = set()
        self.num_qa = 0
        self.datasets: Counter[str] = Counter()

    def write(self, sample: dict[str, Any], meta: dict) -> None:
        key = sample["__key__"]
        if key in self.keys:
            raise ValueError(f"duplicate sample __key__ {key!r} in shard {self.path.name}")
        self.keys.add(key)
        self.writer.write(sample)
        qa = len(meta.get("qa", ())) if isinstance(meta, dict) else 0
        self.num_qa += qa
        self.datasets[str(meta.get("dataset", "unknown")) if isinstance(meta, dict) else "unknown"] += qa

    @property
    def bytes_written(self) -> int:
        # tarfile's offset counts every member written; the stream's position lags behind its buffer.
        return self.writer.tarstream.offset

    def close(self) -> dict[str, Any]:
        self.writer.close()  # ends the tar; the stream it was given stays open
        self.stream.close()
        digest = sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        commit(self.tmp, self.path)
        return {
            "path": self.path.name,
            "num_samples": len(self.keys),
            "num_qa": self.num_qa,
            "datasets": dict(sorted(self.datasets.items())),
            "bytes": size,
            "sha256": digest,
        }

    def abort(self) -> None:
        # Else tarfile flushes into the closed file when collected; the error being handled matters more.
        with contextlib.suppress(Exception):
            self.writer.close()
        self.stream.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[dict],
    out_dir: Path,
    prefix: str,
    max_samples_per_shard: int | None = 1000,
    max_shard_mb: float | None = None,
) -> list[dict]:
    """Write ``out_dir/{prefix}-{i:06d}.tar`` shards atomically; return one manifest entry per shard.

    A shard is closed once it holds ``max_samples_per_shard`` samples or reaches ``max_shard_mb``
    megabytes (10**6 bytes; a sample is never split, so a shard ends just past the limit), whichever
    comes first; ``None`` disables a limit. Samples are streamed into the tar as they come: memory
    holds one sample and the current shard's keys, not the data set. Each entry has the shard's
    ``path``, ``num_samples``, ``num_qa`` (length of each sample's ``json["qa"]`` list), QA pairs
    per ``datasets`` (``json["dataset"]``), ``bytes`` and ``sha256`` - what the streaming DataModule
    plans an epoch from without opening a shard. Keys must be unique; duplicates are caught within a
    shard (a builder makes keys unique across shards from record ids).
    """
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1 (or None), got {max_samples_per_shard}")
    if max_shard_mb is not None and max_shard_mb <= 0:
        raise ValueError(f"max_shard_mb must be > 0 (or None), got {max_shard_mb}")
    if max_samples_per_shard is None and max_shard_mb is None:
        raise ValueError("give max_samples_per_shard, max_shard_mb or both")
    max_bytes = None if max_shard_mb is None else max_shard_mb * 1e6
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    current: _ShardFile | None = None
    try:
        for sample in samples:
            encoded = _encode_sample(sample)
            if current is None:
                current = _ShardFile(out_dir / f"{prefix}-{len(shards):06d}.tar")
            current.write(encoded, sample["json"])
            full = max_samples_per_shard is not None and len(current.keys) >= max_samples_per_shard
            if full or (max_bytes is not None and current.bytes_written >= max_bytes):
                shards.append(current.close())
                current = None
        if current is not None:
            shards.append(current.close())
            current = None
    finally:
        if current is not None:
            current.abort()
    return shards


def write_shard(samples: Iterable[dict], path: Path) -> dict:
    """Write every one of ``samples`` into the single shard ``path``, atomically; its manifest entry."""
    shard = _ShardFile(Path(path))
    try:
        for sample in samples:
            shard.write(_encode_sample(sample), sample["json"])
    except BaseException:
        shard.abort()
        raise
    return shard.close()


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomically write ``out_dir/manifest.json`` (indent 2, sorted keys)."""
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, json_bytes(manifest, indent=2) + b"\n")


def shards_intact(out_dir: Path, shards: Iterable[dict]) -> bool:
    """True when every listed shard exists in ``out_dir`` and matches its recorded sha256."""
    return all(
        (out_dir / s["path"]).is_file() and sha256_file(out_dir / s["path"]) == s["sha256"] for s in shards
    )


def split_shards(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shard entry of one split of a manifest: its single-ECG shards, then its comparison shards."""
    return info["shards"] + info.get("comparison", {}).get("shards", [])


def shards_built(out_dir: str | Path, **expected: Any) -> bool:
    """True when ``out_dir`` holds a manifest whose top-level entries equal ``expected`` (a builder's
    ``params``, ``version``, ...) and every shard of every split (:data:`SPLITS`) matches its sha256."""
    manifest, damage = check_build(out_dir, **expected)
    return manifest is not None and not damage


def _problem(path: Path, entry: dict[str, Any]) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        return f"{size} bytes, manifest.json records {entry['bytes']}"
    digest = sha256_file(path)
    if digest == entry["sha256"]:
        return None
    return f"sha256 {digest[:12]}..., manifest.json records {entry['sha256'][:12]}..."


def check_build(out_dir: str | Path, **expected: Any) -> tuple[dict | None, dict[str, str]]:
    """``(manifest, damage)``: the manifest of ``out_dir`` when its top-level entries equal ``expected``
    (else None: nothing, or something else, was built there), and what is wrong with each of its
    shards that no longer matches it, by file name (``missing``, the size or sha256 found)."""
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
        if not all(manifest[key] == value for key, value in expected.items()):
            return None, {}
        shards = [shard for split in SPLITS for shard in split_shards(manifest["splits"][split])]
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}
    damage = {s["path"]: problem for s in shards if (problem := _problem(out_dir / s["path"], s))}
    return manifest, damage


#: A builder's samples of one run of shards (those named ``{prefix}-NNNNNN.tar``) from sample ``start``
#: of the run on; ``previous`` is the run's intact shard before it (None for the first shard).
RunSamples = Callable[[str, int, "Path | None"], Iterable[dict]]
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")


def shard_runs(manifest: dict) -> dict[str, list[dict[str, Any]]]:
    """The manifest's shard entries by run (file name without ``-NNNNNN.tar``), each run in file order."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        for entry in split_shards(manifest["splits"][split]):
            match = _SHARD_NAME.match(entry["path"])
            runs.setdefault(match["prefix"] if match else entry["path"], []).append(entry)
    return {prefix: sorted(entries, key=lambda e: e["path"]) for prefix, entries in runs.items()}


def last_sample(path: Path) -> tuple[str, dict] | None:
    """The ``__key__`` and ``json`` of the last sample of a shard (its tar members are read in order)."""
    with tarfile.open(path) as tar:
        members = [member for member in tar if member.isfile()]
        if not members:
            return None
        key = members[-1].name.split(".", 1)[0]
        meta = next(m for m in reversed(members) if m.name == f"{key}.json")
        return key, json.loads(tar.extractfile(meta).read())


def last_key(path: Path) -> str | None:
    """The ``__key__`` of the last sample of a shard."""
    last = last_sample(path)
    return None if last is None else last[0]


def repair_shards(
    out_dir: str | Path, manifest: dict, damage: dict[str, str], samples: RunSamples, dataset: str
) -> bool:
    """Write each damaged shard again, alone, from its builder's ``samples``; True when every one now
    matches ``manifest`` (False: the sources changed since the build, so the builder builds anew).

    The shards are deterministic, so a shard written again from the same sources is byte-identical. A
    WARNING names what was found and what is written again; the other shards are not touched.
    """
    out_dir = Path(out_dir)
    runs = shard_runs(manifest)
    total = sum(len(entries) for entries in runs.values())
    found = ", ".join(f"{path} ({problem})" for path, problem in sorted(damage.items()))
    log.warning(
        "%s in %s: %d of its %d shards do not match manifest.json: %s; writing %s again from the sources "
        "(shards are deterministic), the other shards are kept",
        dataset, out_dir, len(damage), total, found, "it" if len(damage) == 1 else "them",
    )  # fmt: skip
    for prefix, entries in runs.items():
        start = 0
        for i, entry in enumerate(entries):
            if entry["path"] in damage:
                previous = out_dir / entries[i - 1]["path"] if i else None
                run = islice(iter(samples(prefix, start, previous)), entry["num_samples"])
                written = write_shard(run, out_dir / entry["path"])
                if written["sha256"] != entry["sha256"]:
                    log.warning(
                        "%s in %s: %s written again differs from manifest.json (%d samples, sha256 %s...; "
                        "recorded: %d, %s...): the sources changed since the build; building all shards anew",
                        dataset, out_dir, entry["path"], written["num_samples"], written["sha256"][:12],
                        entry["num_samples"], entry["sha256"][:12],
                    )  # fmt: skip
                    return False
            start += entry["num_samples"]
    log.info(
        "%s in %s: %s written again, each matches manifest.json", dataset, out_dir, ", ".join(sorted(damage))
    )
    return True


class ForeignShardsError(EcglmError, ValueError):
    """A builder's out_dir holds another data set's shards, which building there would delete."""


def refuse_foreign_shards(out_dir: str | Path, dataset: str) -> None:
    """Raise :class:`ForeignShardsError` when ``out_dir``'s manifest names a data set other than
    ``dataset``: a builder rebuilds a stale build of its own data set (other params, damaged shards),
    never another's (a recipe's builder pointed at pair shards or a day-long ECG-QA build)."""
    out_dir = Path(out_dir)
    try:
        found = read_manifest(out_dir).get("dataset")
    except (OSError, ValueError, AttributeError):
        return  # no manifest, or not one: nothing a build could lose
    if found is not None and found != dataset:
        raise ForeignShardsError(
            f"{out_dir} holds {found} shards ({out_dir / MANIFEST_NAME}); building {dataset} there would "
            "delete them: give this build another folder (data.init_args.data_dir, or ecglm shard "
            f"--out_dir), or leave data.init_args.builder unset to train on the {found} shards"
        )


def read_manifest(out_dir: Path) -> dict:
    """Load ``out_dir/manifest.json``; a missing one means the dataset was never built there."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no dataset manifest at {path}: build the dataset into {Path(out_dir)} first "
            "(its builder's build(out_dir), e.g. ecglm.data.synthetic.SyntheticHeartQA().build(out_dir)), "
            "which writes the shards and then manifest.json"
        )
    return json.loads(path.read_text(encoding="utf-8"))
