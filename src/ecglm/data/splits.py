"""The splits every shard set has, and the hash that places a patient in a split or a QA pair in a subset.

A hash of a name, not a draw from a random stream: the same name lands in the same place in every
process, on every platform, whatever order the data is read in and however it is split across loader
workers and ranks, without a pass over the data.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def hash_uniform(name: str) -> float:
    """A number in [0, 1), uniform over names and fixed by ``name`` (8 bytes of its BLAKE2b digest)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
