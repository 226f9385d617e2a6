"""Streaming ECG-QA data for Lightning: WebDataset shards -> QA pairs -> tokenised, padded batches.

A shard sample holds one ECG and every QA pair about it; pairs are expanded while streaming, so an
ECG is stored once however many questions use it. Tokenisation runs in the loader's workers with
the DataModule's prompt style (:mod:`ecglm.prompts`), bound to the backbone's tokenizer.

This file holds :class:`ECGQADataModule`; it also gives the names its users import from here, from
where they live: the shard builder protocol (:mod:`ecglm.data.shards`), the seeded subsets and
few-shot demonstrations (:mod:`ecglm.data.selection`), the loader (:mod:`ecglm.data.loader`), the
collator (:mod:`ecglm.data.collate`) and the stream's bad-input handling (:mod:`ecglm.data.stream`).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from ecglm._deprecation import moved_names, warn_deprecated
from ecglm.batch import ECGQABatch
from ecglm.data.collate import QACollator
from ecglm.data.controls import ECGDonors
from ecglm.data.loader import StreamLoader
from ecglm.data.selection import SubsetFilter, read_qa_text, select_demonstrations, subset_fraction
from ecglm.data.shards import MANIFEST_NAME, ShardBuilder, read_manifest, split_shards
from ecglm.data.splits import SPLITS
from ecglm.data.stream import (
    REASONS,
    BadInput,
    BadSampleError,
    CheckedQA,
    EpochPlan,
    QAStream,
    ShardChecksums,
    ShardInfo,
    expand_qa,
)
from ecglm.data.stream.remote import RemoteShards, join, local_path
from ecglm.encoders import Preprocessing, check_preprocessing
from ecglm.errors import EcglmError
from ecglm.prompts import ChatTemplate, PromptStyle
from ecglm.render import ECGPrintout

__all__ = [
    "BadInput",
    "BadSampleError",
    "CheckedQA",
    "ECGQADataModule",
    "QACollator",
    "ShardBuilder",
    "StreamLoader",
    "SubsetFilter",
    "expand_qa",
    "read_qa_text",
    "select_demonstrations",
    "subset_fraction",
]

# Names this module only imported before it was split, served from their own modules with a warning.
__getattr__ = moved_names(
    __name__, {"hash_uniform": "ecglm.data.splits:hash_uniform", "answer_text": "ecglm.answers:answer_text"}
)

log = logging.getLogger("ecglm.data")

# Lightning warns that an IterableDataset's __len__ "could be inaccurate" with several loader workers;
# a QAStream's length is exact (EpochPlan sizes every worker's share), so here the warning misleads.
warnings.filterwarnings("ignore", "Your `IterableDataset` has `__len__` defined", UserWarning)


class ECGQADataModule(L.LightningDataModule):
    """ECG-QA from a folder of WebDataset shards with a ``manifest.json`` (splits train / val / test).

    The model side hands over what the loaders need from it — the bound prompt style, ECG tokens per
    ECG, the encoder's preprocessing and the few-shot system prompts — through :meth:`attach`, which
    :func:`ecglm.wiring.connect` calls (the ``ecglm`` command does it); nothing is read from the Trainer.

    Args:
        data_dir: Folder with the shards and manifest: a local path (or ``file://`` URL), or any
            fsspec URL (``s3://bucket/mix/``, ``https://host/mix/``, ``gs://...``) read through
            fsspec with the store's credentials from its usual environment (docs/data.md, "data in
            object storage").
        prompt: How questions and answers are written and tokenised (``ecglm.prompts`` entry point or
            import path; default ``chat``, the tokenizer's chat template): system prompt,
            ``max_length``, ``min_answer_tokens``.
        builder: Builds the shards into ``data_dir`` if they are missing (e.g.
            :class:`ecglm.data.synthetic.SyntheticHeartQA`); without one, the folder must exist.
        batch_size: Training batch size (QA pairs).
        eval_batch_size: Batch size for validation and generation in test.
        num_workers: Loader worker processes (tokenisation runs there).
        shuffle_buffer: QA pairs each loader worker holds for shuffling the training stream.
        seed: Seed of the shard and sample shuffles.
        weights: Dataset name -> relative share of each training epoch (e.g. ``{ecgqa-ptbxl: 1,
            ecgqa-mimic-iv-ecg: 1, pulse-ecg-instruct: 0.5}``); a share larger than a dataset's size
            repeats it within the epoch, a smaller one reads part of it and goes on from there the
            next epoch. ``None``: every training pair once per epoch. Must name every dataset of
            the training split (0 leaves one out).
        samples_per_epoch: Training pairs per epoch with ``weights`` (default: the split's size).
        include_comparison: Stream the comparison (two-ECG) questions of the manifest's comparison
            shards with the rest (a batch row then holds two ECGs, ``batch.ecg_counts``).
        strict: Raise :class:`BadSampleError` at the first bad input (corrupt or truncated tar, a
            shard whose sha256 does not match the manifest, missing or unreadable ``.npy``, wrong
            shape, NaN/Inf, invalid JSON or non-UTF-8 text, empty question or answer), naming shard
            and key. By default such input is skipped and logged as a WARNING on ``ecglm.data`` with
            shard, key and reason (see :class:`BadInput`); ``skipped`` holds the QA pairs lost by
            reason in the pass over a loader started last, and ``train_skipped`` those of the
            current training epoch, gathered from every loader worker (each writes its row of a
            counter tensor in shared memory; nothing rides in the batches); each worker also logs
            its own summary when its stream ends. :class:`ecglm.data.monitor.SkippedInputLogger`
            logs them during training.
        verify_checksums: Check each shard against the sha256 in the manifest before reading it,
            once per shard per process (a mismatch is bad input: skipped, or raised under
            ``strict``). ``False`` skips the check (it reads each shard file once more, mostly from
            the OS cache).
        packed: Padding-free training batches: each batch's QA pairs laid end to end in one row,
            each numbered from position 0 (:func:`ecglm.batch.pack`, the layout of transformers'
            ``DataCollatorWithFlattening``); same loss, no compute spent on padding. Needs a backbone
            that takes packed rows (attention-only LLMs; not Qwen3.5's linear-attention layers, and
            not with ``prefix_reuse``): :func:`ecglm.wiring.connect` checks it. Validation and
            generation batches stay padded.
        pack_tokens: With ``packed``, the most tokens per row; a batch then takes several rows.
            ``None``: one row per batch, the layout for flash-attention kernels (cost per QA pair).
            SDPA and eager attention mask a packed row as a whole and cost its length squared:
            bound it (e.g. 256-512) there (``benchmarks/packing.py``).
        image: The image-ECG path (:class:`ecglm.render.ECGPrintout`): each ECG reaches the model as
            a printout drawn from the stored signal in the loader workers (distorted per QA pair and
            epoch on training batches), or as the dataset's own image where its shards hold images
            (ECGInstruct). Its ``size`` defaults to the image size the model reads, its ``fs`` to
            the manifest's sampling rate. ``None``: signals, as stored.
        storage_options, retries, retry_backoff, read_timeout, cache_dir, cache_gb: With a remote
            ``data_dir``, fsspec options (not credentials), tries after a failed read before a shard
            counts as lost, the first wait (doubled each try), the seconds a read may stall, and the
            local shard cache and its bound in GB (:class:`ecglm.data.stream.remote.RemoteShards`).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        prompt: PromptStyle | None = None,
        builder: ShardBuilder | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        strict: bool = False,
        weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        include_comparison: bool = True,
        verify_checksums: bool = True,
        packed: bool = False,
        pack_tokens: int | None = None,
        image: ECGPrintout | None = None,
        storage_options: dict[str, Any] | None = None,
        retries: int = 5,
        retry_backoff: float = 1.0,
        read_timeout: float = 60.0,
        cache_dir: str | None = None,
        cache_gb: float | None = None,
    ):
        super().__init__()
        remote = {"retries": retries, "backoff": retry_backoff, "timeout": read_timeout}
        self.remote = RemoteShards.for_location(data_dir, storage_options, cache_dir, cache_gb, **remote)
        self.image = image
        self.packed, self.pack_tokens = packed, pack_tokens
        self.verify_checksums = verify_checksums
        self.include_comparison = include_comparison
        self._data_dir: Path | str | None = None
        if data_dir is not None:
            self._data_dir = str(data_dir).rstrip("/") if self.remote is not None else local_path(data_dir)
        self.builder = builder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.weights = dict(weights) if weights is not None else None
        self.samples_per_epoch = samples_per_epoch
        # Per kind of pass ("train", "eval"): QA pairs lost to bad input, a row per loader worker and a
        # column per reason, in shared memory that the workers write (QAStream.counters).
        self._skips: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._pass = "eval"  # the kind of pass started last
        self.epoch = 0  # the training epoch to stream when there is no Trainer
        self._train_position = {"epoch": 0, "batches": 0}  # training batches handed out this epoch
        self._resume: dict[str, Any] | None = None
        self._train_plan: EpochPlan | None = None
        self.prompt = prompt if prompt is not None else ChatTemplate()
        self.attached = False  # the prompt style is bound to the model's tokenizer (attach)
        self.num_ecg_tokens: int | None = None
        self.system_prompts: dict[str, str] | Callable[[], dict[str, str] | None] | None = None
        self.preprocessing: Preprocessing | None = None
        self.manifest: dict | None = None
        self._test_subset: tuple[dict[str, float], int] | None = None
        self._test_split = "test"  # the split ``ecglm evaluate`` answers (set_test_subset's ``split``)

    @property
    def data_dir(self) -> Path | str:
        """The folder of the shards and their manifest (``data_dir``; a URL string when remote); an error
        when none was given."""
        if self._data_dir is None:
            raise EcglmError(
                "data_dir is not set: give the folder of the shards (data.init_args.data_dir; ecglm shard "
                "writes one, and with a builder the shards are built there on first use)"
            )
        return self._data_dir

    @property
    def _manifest_path(self) -> str:
        if self.remote is not None:
            return join(self.data_dir, MANIFEST_NAME)
        return str(self.data_dir / MANIFEST_NAME)

    def _read_manifest(self) -> dict:
        if self.remote is not None:
            return self.remote.read_manifest(self.data_dir)
        return read_manifest(self.data_dir)

    def prepare_data(self) -> None:
        if self.builder is not None and self.remote is not None:
            raise EcglmError(
                f"data_dir {self.data_dir} is remote: a builder writes local folders; write the shards there "
                "with `ecglm shard --config CONFIG --out_dir URL` and leave data.init_args.builder unset"
            )
        if self.builder is not None:
            self.builder.build(self.data_dir)

    def attach(
        self,
        prompt: PromptStyle,
        num_ecg_tokens: int,
        system_prompts: dict[str, str] | Callable[[], dict[str, str] | None] | None = None,
        preprocessing: Preprocessing | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Tell the loaders how to tokenise: a prompt style bound to the backbone's tokenizer, and
        ``num_ecg_tokens`` positions per ECG.

        ``system_prompts``: per dataset (few-shot prompts with its demonstrations), or a function
        that gives them, called each time a loader is built (the model's, whose demonstrations a
        checkpoint may replace after this call). ``preprocessing``: what the encoder expects, checked
        against the manifest's in :meth:`setup`. ``image_size``: ``(height, width)`` of the images the
        model reads (an image encoder's or a vision-language backbone's), which the ``image``
        component draws at unless the recipe sets its own size.
        """
        if image_size is not None and self.image is None:
            raise ValueError(
                "the model reads ECG images but the data side draws none: set data.init_args.image "
                "(class_path: ecglm.render.ECGPrintout)"
            )
        if image_size is None and self.image is not None:
            raise ValueError(
                "data.init_args.image draws ECG images but the model reads signals: use an image "
                "encoder (image-vit, image-cnn, hf-vision) or a vision-language backbone (hf-vision-language)"
            )
        if self.image is not None and self.image.size is None:
            self.image = replace(self.image, size=tuple(image_size))
        self.prompt, self.num_ecg_tokens, self.attached = prompt, num_ecg_tokens, True
        self.system_prompts, self.preprocessing = system_prompts, preprocessing

    @property
    def formatter(self) -> PromptStyle | None:
        """Deprecated since 0.2.0 (removed in 0.3.0): :attr:`prompt`, once attached."""
        warn_deprecated("ECGQADataModule.formatter", "ECGQADataModule.prompt")
        return self.prompt if self.attached else None

    def setup(self, stage: str | None = None) -> None:
        self.manifest = self._read_manifest()
        missing = [s for s in SPLITS if s not in self.manifest.get("splits", {})]
        if missing:
            raise ValueError(f"{self._manifest_path} has no split(s) {missing}; rebuild the shards")
        unread = {
            split: info["comparison"].get("num_qa", 0)
            for split, info in self.manifest["splits"].items()
            if info.get("comparison", {}).get("num_qa")
        }
        if unread and not self.include_comparison:
            rank_zero_warn(
                f"{self._manifest_path} holds comparison (two-ECG) questions, {unread} QA pairs "
                "by split, which include_comparison=False leaves out of training and evaluation"
            )
        if self.manifest.get("images") and self.image is None:
            raise ValueError(
                f"{self._manifest_path} holds ECG pictures, not signals: set "
                "data.init_args.image (class_path: ecglm.render.ECGPrintout) and use an image encoder or "
                "a vision-language backbone"
            )
        fs = self.manifest.get("preprocessing", {}).get("sampling_rate")
        if self.image is not None and self.image.fs is None and fs is not None:
            self.image = replace(self.image, fs=float(fs))
        if self.preprocessing is not None and "preprocessing" in self.manifest:
            # Warns loudly (PreprocessingMismatchWarning) for each field that differs.
            check_preprocessing(self.preprocessing, self.manifest["preprocessing"], self._manifest_path)

    def _urls(self, split: str, shards: list[dict[str, Any]] | None = None) -> list[str]:
        """Paths of ``shards`` (default: the split's single-ECG shards); a missing one is an error."""
        urls = []
        for shard in self.manifest["splits"][split]["shards"] if shards is None else shards:
            if self.remote is not None:  # a missing object is counted as lost when it is read
                urls.append(join(self.data_dir, shard["path"]))
                continue
            path = self.data_dir / shard["path"]
            if not path.exists():
                raise FileNotFoundError(f"shard {path} listed in {self._manifest_path} is missing")
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
            self.manifest = self._read_manifest()
        opener = self.remote.open if self.remote is not None else None
        items = (qa for url in self._urls("train") for qa in read_qa_text(opener(url) if opener else url))
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
        """Per-dataset system prompts, as attached (a function is called now: a checkpoint loaded since
        :meth:`attach` may have replaced the model's demonstrations)."""
        prompts = self.system_prompts() if callable(self.system_prompts) else self.system_prompts
        if prompts:
            missing = sorted(set(self.qa_counts(split)) - set(prompts))
            if missing:
                warnings.warn(
                    f"the {split} split has datasets {missing} without few-shot demonstrations (recorded for "
                    f"{sorted(prompts)}): their prompts carry none",
                    stacklevel=2,
                )
        return prompts

    def qa_counts(self, split: str) -> dict[str, int]:
        """QA pairs per dataset in ``split`` from the manifest (``splits[split]["datasets"]`` in mixtures)."""
        info = self.manifest["splits"][split]
        counts = Counter(info.get("datasets") or {self.manifest.get("dataset", "unknown"): info["num_qa"]})
        if self.include_comparison:
            counts.update(info.get("comparison", {}).get("datasets", {}))
        return dict(counts)

    def eval_groups(self, split: str = "test") -> tuple[list[str], list[str] | None]:
        """Dataset names and question types of ``split`` (``None`` when the manifest does not list them)."""
        if self.manifest is None:
            self.manifest = self._read_manifest()
        split = self._test_split if split == "test" else split  # what the test loop reads (set_test_subset)
        info = self.manifest["splits"][split]
        types = info.get("question_types")
        if types is not None and self.include_comparison:
            types = set(types) | set(info.get("comparison", {}).get("question_types", ()))
        return sorted(self.qa_counts(split)), sorted(types) if types is not None else None

    def set_test_subset(
        self, samples_per_dataset: int | dict[str, int] | None, seed: int, split: str = "test"
    ) -> dict[str, int]:
        """Evaluate on about ``samples_per_dataset`` QA pairs per dataset of ``split``, chosen by ``seed``.

        Each pair is kept with probability ``n / count`` by a hash of (seed, key), so the subset is
        reproducible, identical under any worker or rank split, and needs no pass over the data; its
        size is binomial around ``n`` (the report states the real count). ``None`` (or a dataset
        missing from a dict) keeps every pair; the test loop then reads ``split`` (``train``: the
        questions a model trained on). Returns the expected size per dataset."""
        if split not in SPLITS:
            raise ValueError(f"evaluate.split is {split!r}: give one of {list(SPLITS)}")
        if self.manifest is None:
            self.manifest = self._read_manifest()
        self._test_split = split
        counts = self.qa_counts(split)
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
                f"samples per dataset name {unknown}, which {self._manifest_path} does not hold "
                f"(its {split} split has {sorted(counts)})",
                stacklevel=2,
            )
        rates = {d: min(1.0, wanted[d] / n) if n else 1.0 for d, n in counts.items()}
        self._test_subset = (rates, seed)
        return {d: min(wanted[d], n) for d, n in counts.items()}

    def _shards(self, split: str) -> list[ShardInfo]:
        """The split's shards with their dataset and QA count, as the manifest lists them."""
        info = self.manifest["splits"][split]
        only = list(info.get("datasets") or [self.manifest.get("dataset", "unknown")])
        entries = split_shards(info) if self.include_comparison else list(info["shards"])
        shards = []
        for url, entry in zip(self._urls(split, entries), entries, strict=True):
            if "num_qa" not in entry:
                raise ValueError(
                    f"shard {entry['path']} in {self._manifest_path} has no num_qa: the shards "
                    "were built by an older ecglm; build them again (ecglm shard --config ..., or delete "
                    "the folder and let the builder run)"
                )
            datasets = list(entry.get("datasets") or (only if len(only) == 1 else ["mixed"]))
            if len(datasets) > 1 and self.weights is not None and split == "train":
                raise ValueError(
                    f"shard {entry['path']} in {self._manifest_path} holds several datasets "
                    f"{datasets}; weights need one dataset per shard (build the shards again)"
                )
            name = datasets[0] if len(datasets) == 1 else "+".join(sorted(datasets))
            shards.append(
                ShardInfo(url, name, int(entry["num_qa"]), entry.get("num_samples"), entry.get("sha256"))
            )
        return shards

    def _world(self) -> tuple[int, int]:
        """(world size, rank): the Trainer's, else torch.distributed's, else a single process."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(
        self,
        split: str,
        batch_size: int,
        train: bool,
        for_generation: bool,
        subset: tuple[dict[str, float], int] | None = None,
    ) -> DataLoader:
        if not self.attached:
            raise RuntimeError(
                "ECGQADataModule is not connected to a model: ecglm.wiring.connect(model, datamodule) hands "
                "it the tokenizer and ECG token count (the ecglm command does it), or attach(...) them"
            )
        world, rank = self._world()
        shards = self._shards(split)
        plan = EpochPlan(
            shards,
            world_size=world,
            num_workers=self.num_workers,
            batch_size=batch_size,
            seed=self.seed,
            shuffle=train,
            drop_last=train,
            weights=self.weights if train else None,
            samples_per_epoch=self.samples_per_epoch if train else None,
        )
        if train and plan.rank_length(rank) == 0:
            raise ValueError(
                f"the {split} split of {self.data_dir} has {plan.total} QA pairs per epoch, fewer than one "
                f"batch of {batch_size} for each of {world} rank(s)"
            )
        bad = BadInput({s.url: s.num_samples for s in shards}, strict=self.strict)
        num_samples = self.manifest.get("preprocessing", {}).get("num_samples")
        stream = QAStream(
            plan,
            rank,
            bad,
            num_samples,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            item_filter=SubsetFilter(*subset) if subset is not None else None,
            pad=train,
            checksums=self._checksums(split, shards),
            counters=torch.zeros((max(1, self.num_workers), len(REASONS)), dtype=torch.long).share_memory_(),
            remote=self.remote,
        )
        collate = QACollator(
            self.prompt,
            self.num_ecg_tokens,
            for_generation=for_generation,
            with_prompts=split == "val",
            system_prompts=self._loader_system_prompts(split),
            packed=self.packed and train,
            pack_tokens=self.pack_tokens,
            # The shuffled-ECG control, drawn reproducibly per evaluation seed.
            donors=ECGDonors(seed=subset[1] if subset else self.seed) if for_generation else None,
            images=self.image,
        )
        if train:
            self._train_plan = plan
        return StreamLoader(
            stream,
            on_iter=self._start_train_epoch if train else self._start_eval,
            position=self.state_dict if train else None,
            resume=self.load_state_dict if train else None,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def _checksums(self, split: str, shards: list[ShardInfo]) -> ShardChecksums | None:
        if not self.verify_checksums:
            return None
        manifest = self._manifest_path
        unrecorded = [s.url for s in shards if s.sha256 is None]
        if unrecorded:
            rank_zero_warn(
                f"{len(unrecorded)} shard(s) of the {split} split have no sha256 in {manifest} (e.g. "
                f"{unrecorded[0]}) and are streamed unverified: build the shards again to record one, or "
                "set verify_checksums=False"
            )
        return ShardChecksums(str(manifest))

    def _start_eval(self, stream: QAStream) -> None:
        self._pass, self._skips["eval"] = "eval", stream.counters

    def _start_train_epoch(self, stream: QAStream) -> None:
        """Before each pass over the training loader: which epoch, and where to resume in it."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self.epoch
        skip = 0
        if self._resume is not None:
            resume, self._resume = self._resume, None
            if resume["plan"] != stream.plan.describe():
                rank_zero_warn(
                    "the checkpoint's stream position was recorded under another epoch plan "
                    f"({resume['plan']}; now {stream.plan.describe()}): the epoch restarts from its first "
                    "batch. Resume with the same devices, num_workers, batch_size, seed and weights to "
                    "continue exactly where it stopped."
                )
            elif resume["epoch"] == epoch:
                skip = resume["batches"]
        stream.epoch, stream.skip_batches = epoch, skip
        self._train_position = {"epoch": epoch, "batches": skip}
        self._pass, self._skips["train"] = "train", stream.counters

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts training batches: the stream position a checkpoint records."""
        training = self.trainer.training if self.trainer is not None else self._pass == "train"
        if training and isinstance(batch, ECGQABatch):
            self._train_position["batches"] += 1
        return batch

    def _skipped(self, kind: str) -> Counter[str]:
        counters = self._skips[kind]
        if counters is None:
            return Counter()
        return Counter({r: int(n) for r, n in zip(REASONS, counters.sum(0).tolist(), strict=True) if n})

    @property
    def skipped(self) -> Counter[str]:
        """QA pairs lost to bad input by reason in the pass started last (every worker's, so far)."""
        return self._skipped(self._pass)

    @property
    def train_skipped(self) -> Counter[str]:
        """QA pairs lost to bad input by reason in the current training epoch (every worker's)."""
        return self._skipped("train")

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position: the epoch and how many of its batches were handed out.

        Every rank hands out the same number of batches per epoch, so rank 0's position (the one a
        checkpoint keeps) is every rank's.
        """
        if self._train_plan is None:
            return {}
        return {**self._train_position, "plan": self._train_plan.describe()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream after the batches a checkpoint's run had already trained on."""
        self._resume = dict(state_dict) if state_dict else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True, for_generation=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False, for_generation=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(
            self._test_split, self.eval_batch_size, train=False, for_generation=True, subset=self._test_subset
        )

    def predict_dataloader(self) -> DataLoader:
        """``ecglm predict``: every QA pair of the test split, as generation batches."""
        return self._loader("test", self.eval_batch_size, train=False, for_generation=True)
