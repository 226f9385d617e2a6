"""Streaming ECG-QA data for Lightning: WebDataset shards -> QA pairs -> tokenised, padded batches.

A shard sample holds one ECG and every QA pair about it; pairs are expanded while streaming, so an
ECG is stored once however many questions use it. Tokenisation runs in the loader's workers with
the backbone's :class:`~ecglm.backbones.ChatFormatter`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ecglm.backbones import IGNORE_INDEX, ChatFormatter
from ecglm.data.shards import read_manifest

SPLITS = ("train", "val", "test")


class ShardBuilder(Protocol):
    """Anything that can write a shard set with a ``manifest.json`` into a folder, idempotently."""

    def build(self, out_dir: str | Path) -> dict[str, Any]: ...


def expand_qa(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One item per QA pair, each with its ECG."""
    for sample in samples:
        meta = sample["json"]
        for i, qa in enumerate(meta["qa"]):
            yield {
                "key": f"{sample['__key__']}_qa{i}",
                "ecg": sample["ecg.npy"],
                "question": qa["question"],
                "answer": qa["answer"],
                "question_type": qa.get("question_type", "unknown"),
            }


class QACollator:
    """Tokenise and pad QA items into a batch; picklable, so it runs in loader workers.

    Batches are left-padded, so every answer ends at the last position (the backbone then computes
    logits for the answer span only); generation batches hold prompts without the answer and carry
    the reference answers as strings.
    """

    def __init__(self, formatter: ChatFormatter, num_ecg_tokens: int, for_generation: bool = False):
        self.formatter = formatter
        self.num_ecg_tokens = num_ecg_tokens
        self.for_generation = for_generation

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        k = self.num_ecg_tokens
        encoded = [
            self.formatter.encode(it["question"], None if self.for_generation else it["answer"], k)
            for it in items
        ]
        length = max(len(e.input_ids) for e in encoded)
        batch_size = len(items)
        input_ids = torch.full((batch_size, length), self.formatter.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        ecg_mask = torch.zeros((batch_size, length), dtype=torch.bool)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            start = length - n
            input_ids[row, start : start + n] = torch.tensor(e.input_ids)
            labels[row, start : start + n] = torch.tensor(e.labels)
            attention_mask[row, start : start + n] = 1
            ecg_mask[row, start + e.ecg_start : start + e.ecg_start + k] = True
        batch = {
            "ecg": torch.from_numpy(np.stack([np.asarray(it["ecg"], dtype=np.float32) for it in items])),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "ecg_mask": ecg_mask,
            "key": [it["key"] for it in items],
            "question_type": [it["question_type"] for it in items],
            "answer": [it["answer"] for it in items],
        }
        if not self.for_generation:
            batch["labels"] = labels
        return batch


class ECGQADataModule(L.LightningDataModule):
    """ECG-QA from a folder of WebDataset shards with a ``manifest.json`` (splits train / val / test).

    Args:
        data_dir: Folder with the shards and manifest.
        builder: Builds the shards into ``data_dir`` if they are missing (e.g.
            :class:`ecglm.data.synthetic.SyntheticHeartQA`); without one, the folder must exist.
        batch_size: Training batch size (QA pairs).
        eval_batch_size: Batch size for validation and generation in test.
        num_workers: Loader worker processes (tokenisation runs there).
        shuffle_buffer: QA pairs held for shuffling the training stream.
        seed: Seed of the shard and sample shuffles.
    """

    def __init__(
        self,
        data_dir: str = "shards/quickstart",
        builder: ShardBuilder | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.builder = builder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.formatter: ChatFormatter | None = None
        self.num_ecg_tokens: int | None = None
        self.manifest: dict | None = None

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder.build(self.data_dir)

    def attach(self, formatter: ChatFormatter, num_ecg_tokens: int) -> None:
        """Tell the loaders how to tokenise (done from the model in :meth:`setup` under a Trainer)."""
        self.formatter, self.num_ecg_tokens = formatter, num_ecg_tokens

    def setup(self, stage: str | None = None) -> None:
        self.manifest = read_manifest(self.data_dir)
        missing = [s for s in SPLITS if s not in self.manifest.get("splits", {})]
        if missing:
            raise ValueError(
                f"{self.data_dir / 'manifest.json'} has no split(s) {missing}; rebuild the shards"
            )
        model = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        if model is not None:
            self.attach(model.backbone.formatter, model.num_ecg_tokens)

    def _urls(self, split: str) -> list[str]:
        urls = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["path"]
            if not path.exists():
                raise FileNotFoundError(
                    f"shard {path} listed in {self.data_dir / 'manifest.json'} is missing"
                )
            urls.append(str(path))
        return urls

    def _loader(self, split: str, batch_size: int, train: bool, for_generation: bool) -> DataLoader:
        if self.formatter is None:
            raise RuntimeError(
                "ECGQADataModule needs attach(formatter, num_ecg_tokens) or a Trainer with a model"
            )
        urls = self._urls(split)
        num_qa = self.manifest["splits"][split]["num_qa"]
        world = self.trainer.world_size if self.trainer else 1
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if train else False,
            detshuffle=True,
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            empty_check=False,
        ).decode()
        dataset = dataset.compose(expand_qa)
        if train:
            dataset = dataset.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, num_qa))
        per_rank = num_qa // world if train else math.ceil(num_qa / world)
        dataset = dataset.with_length(per_rank)
        collate = QACollator(self.formatter, self.num_ecg_tokens, for_generation=for_generation)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=min(self.num_workers, len(urls)),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True, for_generation=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False, for_generation=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False, for_generation=True)
