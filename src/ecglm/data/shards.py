"""Deterministic WebDataset shard and manifest writing shared by all ecglm dataset builders.

A sample is a dict with ``__key__`` (no dots: WebDataset splits a tar member name at the first
dot of its basename into key and field), ``ecg.npy`` (stored as float16) and ``json`` (a dict).
The same samples always give byte-identical shards, so a manifest's sha256 sums identify a build.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ecglm.io import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
# TarWriter stamps every member with time.time() unless given an mtime; a fixed one keeps
# shards byte-identical across builds. uid/gid are 0 and uname/gname "bigdata" by default.
TAR_MTIME = 0.0


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
    unknown = set(sample) - {"__key__", "ecg.npy", "json"}
    if unknown or "ecg.npy" not in sample or "json" not in sample:
        raise ValueError(f"sample {key!r} must have exactly __key__, ecg.npy and json; got {sorted(sample)}")
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


def _write_one_shard(samples: list[dict], path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in samples:
                writer.write(sample)
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def write_shards(
    samples: Iterable[dict], out_dir: Path, prefix: str, max_samples_per_shard: int = 1000
) -> list[dict]:
    """Write ``out_dir/{prefix}-{i:06d}.tar`` shards atomically; return their path, size and sha256."""
    if max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    shards = []
    for index, chunk in enumerate(_chunks(samples, max_samples_per_shard)):
        encoded = [_encode_sample(sample) for sample in chunk]
        for sample in encoded:
            if sample["__key__"] in seen:
                raise ValueError(f"duplicate sample __key__ {sample['__key__']!r}")
            seen.add(sample["__key__"])
        name = f"{prefix}-{index:06d}.tar"
        digest = _write_one_shard(encoded, out_dir / name)
        shards.append({"path": name, "num_samples": len(encoded), "sha256": digest})
    return shards


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomically write ``out_dir/manifest.json`` (indent 2, sorted keys)."""
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, json_bytes(manifest, indent=2) + b"\n")


def shards_intact(out_dir: Path, shards: Iterable[dict]) -> bool:
    """True when every listed shard exists in ``out_dir`` and matches its recorded sha256."""
    return all(
        (out_dir / s["path"]).is_file() and sha256_file(out_dir / s["path"]) == s["sha256"] for s in shards
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
