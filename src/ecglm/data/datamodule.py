"""Streaming ECG-QA data for Lightning: WebDataset shards -> QA pairs -> tokenised, padded batches.

A shard sample holds one ECG and every QA pair about it; pairs are expanded while streaming, so an
ECG is stored once however many questions use it. Tokenisation runs in the loader's workers with
the backbone's :class:`~ecglm.backbones.ChatFormatter`.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.autodecode import DecodingError
from webdataset.tariterators import base_plus_ext

from ecglm.backbones import IGNORE_INDEX, ChatFormatter
from ecglm.data.shards import read_manifest
from ecglm.encoders import check_preprocessing
from ecglm.metrics import answer_text

SPLITS = ("train", "val", "test")
NUM_LEADS = 12

log = logging.getLogger("ecglm.data")


class ShardBuilder(Protocol):
    """Anything that can write a shard set with a ``manifest.json`` into a folder, idempotently."""

    def build(self, out_dir: str | Path) -> dict[str, Any]: ...


def expand_qa(samples: Iterator[dict[str, Any]], first: int = 0) -> Iterator[dict[str, Any]]:
    """One item per QA pair, each with its ECG; pair ``i`` of a sample is keyed ``{key}_qa{first + i}``."""
    for sample in samples:
        meta = sample["json"]
        for i, qa in enumerate(meta["qa"], start=first):
            yield {
                "key": f"{sample['__key__']}_qa{i}",
                "ecg": sample["ecg.npy"],
                "question": qa["question"],
                "answer": qa["answer"],
                "question_type": qa.get("question_type", "unknown"),
                "dataset": meta.get("dataset", "unknown"),
            }


class BadSampleError(ValueError):
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
    ``ecglm.data`` logger naming shard and key; ``counts`` holds skips by reason in the process that
    runs the pipeline (a loader worker keeps its own and logs a summary when its stream ends).
    ``shards`` maps each url to its sample count in the manifest (or None), to notice a tar that
    ends early without an error (tarfile reads a corrupt header past the first as the end).
    Picklable, so it travels to loader workers.
    """

    def __init__(self, shards: dict[str, int | None], strict: bool = False):
        self.shards, self.strict = dict(shards), strict
        self.urls = sorted(self.shards, key=len, reverse=True)
        self.counts: Counter[str] = Counter()
        self.reset()

    def reset(self) -> None:
        """Start a new pass over the shards."""
        self.counts.clear()
        self.read: Counter[str] = Counter()  # samples per shard that came out of the tar
        self.broken: set[str | None] = set()  # shards with a tar error already reported
        self.last_member: str | None = None
        self.done_key: str | None = None  # the last sample past the tar stages

    def report(self, url: Any, key: Any, reason: str, detail: str) -> None:
        message = f"shard {url}, key {key}: {reason}: {detail}"
        if self.strict:
            raise BadSampleError(message)
        self.counts[reason] += 1
        log.warning("skipped bad input: %s", message)

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
                "corrupt or truncated tar",
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
        self.report(url, key, "corrupt or truncated tar", detail + "; the rest of this shard is lost")

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
            if isinstance(exn, DecodingError):
                self.passed(exn.url, exn.key)
                cause = exn.__cause__
                problem = "non-UTF-8 text" if isinstance(cause, UnicodeDecodeError) else f"unreadable {exn.k}"
                self.report(exn.url, exn.key, problem, f"{type(cause).__name__}: {cause}")
                return True
            self._tar_error(exn)
        except BadSampleError as error:
            raise error from exn
        last = exn.args[-1] if exn.args else None
        return last is None or last in self.urls


def _empty(text: Any) -> bool:
    if isinstance(text, list):
        return not any(isinstance(t, str) and t.strip() for t in text)
    return not isinstance(text, str) or not text.strip()


class CheckedQA:
    """:func:`expand_qa` behind checks: each bad sample or QA pair goes to ``bad`` (:class:`BadInput`).

    A sample needs a JSON object with a ``qa`` list and a finite ``(12, num_samples)`` ECG
    (``num_samples`` from the manifest's preprocessing; any length when it is not recorded); a QA
    pair without question or answer is dropped alone, the ECG's other pairs are kept. Runs before
    any shuffle, so samples arrive shard by shard and a shard's end is where its url changes.
    """

    def __init__(self, bad: BadInput, num_samples: int | None = None):
        self.bad, self.num_samples = bad, num_samples

    def _problem(self, sample: dict[str, Any]) -> tuple[str, str] | None:
        meta, ecg = sample.get("json"), sample.get("ecg.npy")
        if meta is None:
            return "missing json", "the sample has no json member (its QA pairs are unknown)"
        if not isinstance(meta, dict) or not isinstance(meta.get("qa"), list):
            return "invalid json", f"expected an object with a 'qa' list, got {str(meta)[:80]!r}"
        if ecg is None:
            return "missing ecg.npy", "the sample's QA pairs refer to an ECG that is not in the shard"
        if not isinstance(ecg, np.ndarray):
            return "unreadable ecg.npy", f"decoded to {type(ecg).__name__}, not an array"
        width = self.num_samples if self.num_samples is not None else ecg.shape[-1] if ecg.ndim else -1
        if ecg.shape != (NUM_LEADS, width):
            return (
                "wrong shape",
                f"ecg.npy has shape {ecg.shape}, expected ({NUM_LEADS}, {self.num_samples or 'N'})",
            )
        if not np.isfinite(ecg).all():
            return "non-finite ecg", f"ecg.npy holds {int((~np.isfinite(ecg)).sum())} NaN/Inf values"
        return None

    def _pairs(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = sample["json"]
        for i, qa in enumerate(meta["qa"]):
            missing = [f for f in ("question", "answer") if not isinstance(qa, dict) or _empty(qa.get(f))]
            if missing:
                self.bad.report(
                    sample.get("__url__"),
                    f"{sample['__key__']}_qa{i}",
                    "empty QA",
                    f"empty or missing {' and '.join(missing)}",
                )
                continue
            yield from expand_qa(iter([{**sample, "json": {**meta, "qa": [qa]}}]), first=i)

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.bad.reset()
        url = key = None
        for sample in samples:
            if sample.get("__url__") != url:
                if url is not None:
                    self.bad.check_count(url, key)
                url = sample.get("__url__")
            key = sample.get("__key__")
            self.bad.passed(url, key)
            problem = self._problem(sample)
            if problem is not None:
                self.bad.report(url, key, *problem)
                continue
            yield from self._pairs(sample)
        if url is not None:
            self.bad.check_count(url, key)
        if self.bad.counts:
            worker = get_worker_info()
            log.warning(
                "%s skipped bad input at the end of its stream: %s",
                f"loader worker {worker.id}" if worker else "the loader",
                dict(sorted(self.bad.counts.items())),
            )


def subset_fraction(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, key)``: the evaluation subset keeps keys below a rate.

    Hashing the key (not drawing from a stream RNG) gives the same subset for a seed however the
    stream is split across loader workers and DDP ranks, without a pass over the data.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def read_qa_text(path: str | Path) -> Iterator[dict[str, Any]]:
    """The QA pairs of one shard as :func:`expand_qa` yields them, without the ECG.

    Only the ``json`` members are read: tarfile seeks over the ECG arrays, so a pass over a split
    costs its headers and metadata, not its signals.
    """
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = base_plus_ext(member.name) if member.isfile() else (None, None)
            if field != "json":
                continue
            meta = json.loads(tar.extractfile(member).read())
            for i, qa in enumerate(meta["qa"]):
                yield {
                    "key": f"{key}_qa{i}",
                    "question": qa["question"],
                    "answer": qa["answer"],
                    "question_type": qa.get("question_type", "unknown"),
                    "dataset": meta.get("dataset", "unknown"),
                }


def select_demonstrations(
    items: Iterable[dict[str, Any]], seed: int, per_dataset: int, max_chars: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """Per dataset, the ``per_dataset`` QA pairs with the smallest :func:`subset_fraction` of ``(seed, key)``.

    A hash rank, not a stream RNG: the draw does not depend on the order of the pairs (shard order,
    shuffling, loader workers, DDP ranks), and the first of ``n + 1`` draws are the ``n`` draws.
    ``max_chars`` skips pairs whose question and answer text are longer together. Demonstrations
    are plain strings, the answer as the model reads it (lists joined with ", "), best rank first.
    """
    heaps: dict[str, list[tuple[float, str]]] = {}
    kept: dict[str, dict[str, str]] = {}
    for item in items:
        answer = answer_text(item["answer"])
        if max_chars is not None and len(item["question"]) + len(answer) > max_chars:
            continue
        entry = (-subset_fraction(seed, item["key"]), item["key"])
        heap = heaps.setdefault(item["dataset"], [])
        if len(heap) < per_dataset:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            kept.pop(heapq.heapreplace(heap, entry)[1], None)
        else:
            continue
        kept[item["key"]] = {
            "key": item["key"],
            "dataset": item["dataset"],
            "question": item["question"],
            "answer": answer,
            "question_type": item["question_type"],
        }
    return {
        dataset: [kept[key] for _, key in sorted(heaps[dataset], reverse=True)] for dataset in sorted(heaps)
    }


class SubsetFilter:
    """Keeps a QA pair of dataset ``d`` with probability ``rates[d]`` (Bernoulli by key hash); picklable."""

    def __init__(self, rates: dict[str, float], seed: int):
        self.rates, self.seed = rates, seed

    def __call__(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            rate = self.rates.get(item["dataset"], 1.0)
            if rate >= 1.0 or subset_fraction(self.seed, item["key"]) < rate:
                yield item


class QACollator:
    """Tokenise and pad QA items into a batch; picklable, so it runs in loader workers.

    Batches are left-padded, so every answer ends at the last position (the backbone then computes
    logits for the answer span only). Generation batches (``for_generation``) hold prompts without
    the answer, the reference answers as strings, and under ``text_only`` the same prompts with no
    ECG positions (the text-only ablation). ``with_prompts`` adds the generation prompts to a
    teacher-forced batch (``batch["prompt"]``), for metrics on generated answers during validation.
    ``system_prompts`` maps a dataset name to the system prompt of its items (few-shot prompts with
    that dataset's demonstrations); other items get the formatter's own.
    """

    def __init__(
        self,
        formatter: ChatFormatter,
        num_ecg_tokens: int,
        for_generation: bool = False,
        with_prompts: bool = False,
        system_prompts: dict[str, str] | None = None,
    ):
        self.formatter = formatter
        self.num_ecg_tokens = num_ecg_tokens
        self.for_generation = for_generation
        self.with_prompts = with_prompts
        self.system_prompts = dict(system_prompts or {})

    def _pad(self, items: list[dict[str, Any]], with_answer: bool, num_ecg_tokens: int) -> dict[str, Any]:
        k = num_ecg_tokens
        # ECG-QA answers are lists; the model reads and writes them as "a, b" (metrics compare sets).
        encoded = [
            self.formatter.encode(
                it["question"],
                answer_text(it["answer"]) if with_answer else None,
                k,
                system_prompt=self.system_prompts.get(it.get("dataset", "unknown")),
            )
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
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "ecg_mask": ecg_mask}
        if with_answer:
            out["labels"] = labels
        return out

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._pad(items, not self.for_generation, self.num_ecg_tokens)
        batch.update(
            {
                "ecg": torch.from_numpy(np.stack([np.asarray(it["ecg"], dtype=np.float32) for it in items])),
                "key": [it["key"] for it in items],
                "question_type": [it["question_type"] for it in items],
                "dataset": [it.get("dataset", "unknown") for it in items],
                "answer": [it["answer"] for it in items],
            }
        )
        if self.for_generation:
            batch["text_only"] = self._pad(items, with_answer=False, num_ecg_tokens=0)
        elif self.with_prompts:
            batch["prompt"] = self._pad(items, with_answer=False, num_ecg_tokens=self.num_ecg_tokens)
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
        strict: Raise :class:`BadSampleError` at the first bad input (corrupt or truncated tar,
            missing or unreadable ``.npy``, wrong shape, NaN/Inf, invalid JSON or non-UTF-8 text,
            empty question or answer), naming shard and key. By default such input is skipped and
            logged as a WARNING on ``ecglm.data`` with shard, key and reason (see :class:`BadInput`);
            ``skipped`` holds the counts by reason of the last loader iterated in this process
            (``num_workers=0``; workers log their own summary when their stream ends).
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
        strict: bool = False,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.builder = builder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.skipped: Counter[str] = Counter()
        self.formatter: ChatFormatter | None = None
        self.num_ecg_tokens: int | None = None
        self.system_prompts: dict[str, str] | None = None
        self.manifest: dict | None = None
        self._test_subset: tuple[dict[str, float], int] | None = None

    def prepare_data(self) -> None:
        if self.builder is not None:
            self.builder.build(self.data_dir)

    def attach(
        self, formatter: ChatFormatter, num_ecg_tokens: int, system_prompts: dict[str, str] | None = None
    ) -> None:
        """Tell the loaders how to tokenise (done from the model in :meth:`setup` under a Trainer).

        ``system_prompts`` (per dataset, e.g. with few-shot demonstrations) is used without a Trainer;
        under one, each loader takes them from the model's ``system_prompts()`` when it is built.
        """
        self.formatter, self.num_ecg_tokens = formatter, num_ecg_tokens
        self.system_prompts = system_prompts

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
            expected = getattr(model.encoder, "preprocessing", None)
            if expected is not None and "preprocessing" in self.manifest:
                # Warns loudly (PreprocessingMismatchWarning) for each field that differs.
                check_preprocessing(
                    expected, self.manifest["preprocessing"], str(self.data_dir / "manifest.json")
                )

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

    def sample_demonstrations(
        self, seed: int, per_dataset: int = 1, max_chars: int | None = None
    ) -> dict[str, list[dict[str, str]]]:
        """Few-shot demonstrations: ``per_dataset`` QA pairs per dataset of the training split, by ``seed``.

        Text only (the ECGs are not read). The same seed and shards give the same demonstrations,
        whatever the shard order, loader workers or ranks (see :func:`select_demonstrations`). A
        dataset of the training split with no pair short enough for ``max_chars`` gets none (warned).
        """
        if per_dataset < 1:
            raise ValueError(f"per_dataset must be at least 1, got {per_dataset}")
        if self.manifest is None:
            self.manifest = read_manifest(self.data_dir)
        items = (qa for url in self._urls("train") for qa in read_qa_text(url))
        demonstrations = select_demonstrations(items, seed, per_dataset, max_chars)
        missing = sorted(set(self.qa_counts("train")) - set(demonstrations))
        if missing:
            warnings.warn(
                f"no few-shot demonstration for {missing}: no training pair of at most max_chars={max_chars} "
                "characters; their prompts carry no demonstration",
                stacklevel=2,
            )
        return demonstrations

    def _loader_system_prompts(self, split: str) -> dict[str, str] | None:
        """Per-dataset system prompts: the model's under a Trainer, else the attached ones."""
        model = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        if model is not None and hasattr(model, "system_prompts"):
            self.system_prompts = model.system_prompts()
        if self.system_prompts:
            missing = sorted(set(self.qa_counts(split)) - set(self.system_prompts))
            if missing:
                warnings.warn(
                    f"the {split} split has datasets {missing} without few-shot demonstrations (recorded for "
                    f"{sorted(self.system_prompts)}): their prompts carry none",
                    stacklevel=2,
                )
        return self.system_prompts

    def qa_counts(self, split: str) -> dict[str, int]:
        """QA pairs per dataset in ``split`` from the manifest (``splits[split]["datasets"]`` in mixtures)."""
        info = self.manifest["splits"][split]
        return dict(info.get("datasets") or {self.manifest.get("dataset", "unknown"): info["num_qa"]})

    def eval_groups(self, split: str = "test") -> tuple[list[str], list[str] | None]:
        """Dataset names and question types of ``split`` (``None`` when the manifest does not list them)."""
        if self.manifest is None:
            self.manifest = read_manifest(self.data_dir)
        types = self.manifest["splits"][split].get("question_types")
        return sorted(self.qa_counts(split)), sorted(types) if types is not None else None

    def set_test_subset(self, samples_per_dataset: int | dict[str, int] | None, seed: int) -> dict[str, int]:
        """Evaluate on about ``samples_per_dataset`` QA pairs per dataset, chosen by ``seed``.

        Each pair is kept with probability ``n / count`` by a hash of (seed, key), so the subset is
        reproducible, identical under any worker or rank split, and needs no pass over the data; its
        size is binomial around ``n`` (the report states the real count). ``None`` (or a dataset
        missing from a dict) keeps every pair. Returns the expected size per dataset.
        """
        if self.manifest is None:
            self.manifest = read_manifest(self.data_dir)
        counts = self.qa_counts("test")
        if samples_per_dataset is None:
            self._test_subset = None
            return counts
        wanted = (
            dict.fromkeys(counts, samples_per_dataset)
            if isinstance(samples_per_dataset, int)
            else {d: samples_per_dataset.get(d, n) for d, n in counts.items()}
        )
        unknown = (
            sorted(set(samples_per_dataset) - set(counts)) if isinstance(samples_per_dataset, dict) else []
        )
        if unknown:
            warnings.warn(
                f"samples per dataset name {unknown}, which {self.data_dir / 'manifest.json'} does not hold "
                f"(its test split has {sorted(counts)})",
                stacklevel=2,
            )
        rates = {d: min(1.0, wanted[d] / n) if n else 1.0 for d, n in counts.items()}
        self._test_subset = (rates, seed)
        return {d: min(wanted[d], n) for d, n in counts.items()}

    def _loader(
        self,
        split: str,
        batch_size: int,
        train: bool,
        for_generation: bool,
        subset: tuple[dict[str, float], int] | None = None,
    ) -> DataLoader:
        if self.formatter is None:
            raise RuntimeError(
                "ECGQADataModule needs attach(formatter, num_ecg_tokens) or a Trainer with a model"
            )
        urls = self._urls(split)
        num_qa = self.manifest["splits"][split]["num_qa"]
        world = self.trainer.world_size if self.trainer else 1
        sizes = {
            str(self.data_dir / s["path"]): s.get("num_samples")
            for s in self.manifest["splits"][split]["shards"]
        }
        bad = BadInput({url: sizes.get(url) for url in urls}, strict=self.strict)
        self.skipped = bad.counts
        dataset = wds.WebDataset(
            urls,
            handler=bad,
            shardshuffle=len(urls) if train else False,
            detshuffle=True,
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            empty_check=False,
            rename_files=bad.see_member,
        ).decode(handler=bad)
        num_samples = self.manifest.get("preprocessing", {}).get("num_samples")
        dataset = dataset.compose(CheckedQA(bad, num_samples))
        if subset is not None:
            # The subset's size is only known in expectation: no length, so no loop stops early.
            dataset = dataset.compose(SubsetFilter(*subset))
        else:
            if train:
                dataset = dataset.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, num_qa))
            per_rank = num_qa // world if train else math.ceil(num_qa / world)
            dataset = dataset.with_length(per_rank)
        collate = QACollator(
            self.formatter,
            self.num_ecg_tokens,
            for_generation=for_generation,
            with_prompts=split == "val",
            system_prompts=self._loader_system_prompts(split),
        )
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
        return self._loader(
            "test", self.eval_batch_size, train=False, for_generation=True, subset=self._test_subset
        )
