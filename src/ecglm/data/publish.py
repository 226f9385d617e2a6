"""Shards into object storage: a folder built locally, copied to an fsspec URL, the manifest last.

Builders write local folders (atomically, idempotently); :func:`publish` copies one to ``s3://``,
``gs://`` or any writable fsspec URL so that every node of a cluster can stream it
(:class:`ecglm.data.stream.remote.RemoteShards`). Each shard is written once: an object already
there with the size the manifest records is kept (a copy interrupted and run again goes on where it
stopped; object stores make each upload visible whole or not at all). ``manifest.json`` goes last,
so a reader never takes a half-copied dataset for a whole one: without a manifest there is none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ecglm.data.shards import MANIFEST_NAME, read_manifest, split_shards
from ecglm.data.splits import SPLITS
from ecglm.data.stream.remote import join

log = logging.getLogger(__name__)


def publish(folder: str | Path, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Copy the shards of ``folder`` and then its manifest to ``url``; ``{"written": n, "kept": n}``.

    Credentials come from the store's library and its usual environment (``AWS_*``, ``~/.aws``,
    ``GOOGLE_APPLICATION_CREDENTIALS``), ``storage_options`` for the rest (an ``endpoint_url``).
    """
    import fsspec

    folder = Path(folder)
    manifest = read_manifest(folder)
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    entries = {e["path"]: e for split in SPLITS if split in manifest.get("splits", {})
               for e in split_shards(manifest["splits"][split])}  # fmt: skip
    written = kept = 0
    for name, entry in sorted(entries.items()):
        target = join(root, name)
        try:
            size = fs.size(target)
        except FileNotFoundError:
            size = None
        if size is not None and size == entry.get("bytes", (folder / name).stat().st_size):
            kept += 1
            continue
        fs.put_file(str(folder / name), target)
        written += 1
    fs.put_file(str(folder / MANIFEST_NAME), join(root, MANIFEST_NAME))
    log.info("%s: %d shards written, %d already there, then %s", url, written, kept, MANIFEST_NAME)
    return {"written": written, "kept": kept}
