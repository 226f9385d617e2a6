"""Shard checksums: a shard whose file no longer matches the sha256 its manifest records is not read."""

from __future__ import annotations

from ecglm.data.shards import cached_sha256
from ecglm.data.stream.plan import ShardInfo


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
