"""ECGInstruct (PULSE) as its authors publish it: a LLaVA-style JSON list of conversations, each about
one ECG image file, read into image shards (the image-ECG path's data; the signal path reads the
PTB-XL and MIMIC-IV-ECG records behind those images instead, :mod:`ecglm.data.mixture`).

Each item ``{"id", "image": "<path under image_root>", "conversations": [{"from": "human" | "gpt",
"value"}, ...]}`` becomes one sample: the image file's bytes as stored (``image.png`` / ``image.jpg``,
never re-encoded) and a JSON with the first turn as its QA pair and the whole conversation when it
has more turns (trained on every answer, as the signal path's PULSE samples). An item whose image is
missing or unreadable is skipped and counted, naming the item and file, or raises in ``strict``
mode. The split is drawn per image file by hashing (ECGInstruct has a training split only). A
:class:`~ecglm.data.source.ShardSource` (entry point ``ecg-instruct-images`` of ``ecglm.sources``).
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import ijson

from ecglm.data.source import ShardSource, SourceRecord
from ecglm.data.sources import pulse_conversation

log = logging.getLogger(__name__)

DATASET = "ecg-instruct-images"
QUESTION_TYPE = "ecg-instruct"
VERSION = 1
SUFFIXES = {".png": "image.png", ".jpg": "image.jpg", ".jpeg": "image.jpeg"}


class ECGInstructImages(ShardSource):
    """Build train / val / test image shards from ECGInstruct's JSON and image folder.

    Args:
        json_path: ``ECGInstruct.json`` (a JSON list; parsed incrementally with ijson).
        image_root: Folder the items' ``image`` paths are relative to.
        val_fraction, test_fraction: Shares of the image files held out, drawn by hashing the path
            with ``seed``.
        seed: Seed of the split.
        max_samples_per_shard: Samples per shard.
        strict: Raise at the first missing or unreadable image (default: skip and count it).
        limit: Read only the first ``limit`` items (a quick subset); ``None``: all.
    """

    dataset = DATASET
    version = VERSION
    question_types = (QUESTION_TYPE,)

    def __init__(
        self,
        json_path: str,
        image_root: str,
        val_fraction: float = 0.01,
        test_fraction: float = 0.01,
        seed: int = 0,
        max_samples_per_shard: int = 1000,
        strict: bool = False,
        limit: int | None = None,
    ):
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave a training split"
            )
        self.json_path, self.image_root = Path(json_path), Path(image_root)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.max_samples_per_shard, self.strict, self.limit = max_samples_per_shard, strict, limit
        #: Items not written, by reason (``missing image``, ``unreadable image``, ``no conversation``, ...).
        self.skipped: Counter[str] = Counter()
        self._repairing = False

    @property
    def params(self) -> dict[str, Any]:
        return {
            "json_path": str(self.json_path),
            "image_root": str(self.image_root),
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "limit": self.limit,
        }

    def split_of(self, image: str | SourceRecord) -> str:
        """The split of an image file (a path under ``image_root``, or its record), by a hash of the path."""
        if isinstance(image, SourceRecord):
            image = str(image.location)
        u = zlib.crc32(f"{self.seed}|{image}".encode()) / 2**32
        if u < self.test_fraction:
            return "test"
        return "val" if u < self.test_fraction + self.val_fraction else "train"

    def _skip(self, reason: str, index: int, item_id: str, detail: str) -> None:
        message = f"{self.json_path}: item {index} (id {item_id!r}): {reason}: {detail}"
        if self.strict:
            raise ValueError(message)
        self.skipped[reason] += 1
        # Writing a damaged shard again reads the items before it: their skips were reported by the build.
        log.log(logging.INFO if self._repairing else logging.WARNING, "skipped: %s", message)

    def _run_samples(self, split: str, start: int, previous: Path | None) -> Iterator[dict[str, Any]]:
        """Samples ``start, start + 1, ...`` of ``split`` (a run of shards is a split), for writing a damaged
        shard again (:func:`repair_shards`): the JSON is read from its start and the split's images up
        to the shard's end, since which items are usable (and so where a shard starts) depends on them."""
        self._repairing = True
        try:
            yield from islice(self.samples(split), start, None)
        finally:
            self._repairing = False

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        """The usable items of ``split`` as samples, in file order (one pass over the JSON; only the
        split's image files are read, one at a time)."""
        from PIL import Image, UnidentifiedImageError

        with open(self.json_path, "rb") as f:
            if f.read(4096).lstrip()[:1] != b"[":
                raise ValueError(f"{self.json_path} must hold a JSON list of LLaVA-style items")
            f.seek(0)
            keys: set[str] = set()
            for index, item in enumerate(ijson.items(f, "item", use_float=True)):
                if self.limit is not None and index >= self.limit:
                    break
                item_id = str(item.get("id", index)) if isinstance(item, dict) else str(index)
                if not isinstance(item, dict) or not item.get("image"):
                    if split == "train":  # counted in one pass only
                        self._skip("no image", index, item_id, "the item names no image file")
                    continue
                if self.split_of(str(item["image"])) != split:
                    continue
                conversation = pulse_conversation(item.get("conversations") or [])
                if not conversation:
                    self._skip("no conversation", index, item_id, "no complete human/gpt turn")
                    continue
                path = self.image_root / item["image"]
                member = SUFFIXES.get(path.suffix.lower())
                if member is None:
                    self._skip("unreadable image", index, item_id, f"{path}: not a .png / .jpg file")
                    continue
                if not path.is_file():
                    self._skip("missing image", index, item_id, f"{path} does not exist")
                    continue
                data = path.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.verify()  # header and checksums; a truncated file fails here
                except (OSError, UnidentifiedImageError) as err:
                    self._skip("unreadable image", index, item_id, f"{path}: {err}")
                    continue
                key = re.sub(r"[^A-Za-z0-9_-]", "_", item_id)
                if key in keys:
                    key = f"{key}_{index}"
                keys.add(key)
                meta: dict[str, Any] = {
                    "qa": [{**conversation[0], "question_type": QUESTION_TYPE}],
                    "dataset": DATASET,
                    "image": str(item["image"]),
                }
                if len(conversation) > 1:
                    meta["conversations"] = [conversation]
                yield {"__key__": key, member: data, "json": meta}

    def records(self) -> Iterator[SourceRecord]:
        """Every item that names an image, in file order: its id, its image path as both the location and
        the "patient" (ECGInstruct names no patients; the split is per image file), its turns as labels."""
        with open(self.json_path, "rb") as f:
            for index, item in enumerate(ijson.items(f, "item", use_float=True)):
                if self.limit is not None and index >= self.limit:
                    return
                if isinstance(item, dict) and item.get("image"):
                    image = str(item["image"])
                    turns = {"conversations": item.get("conversations") or []}
                    yield SourceRecord(str(item.get("id", index)), image, location=image, labels=turns)

    def items(self, record: SourceRecord) -> list[dict[str, Any]]:
        """The item's first human / gpt turn as its QA pair (the whole conversation is kept with it)."""
        conversation = pulse_conversation(record.labels["conversations"])
        return [{**conversation[0], "question_type": QUESTION_TYPE}] if conversation else []

    def _start_build(self) -> None:
        self.skipped.clear()

    def manifest_extras(self) -> dict[str, Any]:
        return {"images": True, "skipped": dict(sorted(self.skipped.items()))}
