"""Shards of preference pairs for DPO, from JSON lines: a chosen and a rejected answer to a question about
an ECG, the ECG taken from an existing shard set (by record key) or read from an ECG file.

Two inputs, either or both:

- ``pairs``: JSON-lines files, one pair per line::

      {"record": "synthetic_train_000012", "question": "Is the rhythm regular or irregular?",
       "chosen": "irregular", "rejected": "regular", "question_type": "rhythm"}

  ``record`` is the key of a sample of ``ecg_shards`` (or a QA key such as ``..._qa1``, as
  ``ecglm evaluate`` writes them); ``ecg`` instead names an ECG file (any format ``ecglm.readers``
  reads, ``FILE#KEY`` for a record in a file of many). Optional: ``answer`` (the reference the
  evaluation scores against; default ``chosen``), ``question_type`` (default ``unknown``), ``split``
  (of a pair on an ECG file; default ``split``), ``fs`` and ``leads`` (of files that do not state them).
- ``predictions``: ``ecglm evaluate``'s ``predictions_seed*.jsonl``: each wrong answer under
  ``condition`` becomes a pair, the reference answer chosen and the model's own answer rejected
  (the usual way to get pairs without annotators: the model's mistakes against the gold answers).

A pair on a shard record keeps that record's split, so pairs made from predictions of held-out
questions stay held out (to train on the model's mistakes, evaluate it on training questions). The
pairs of one ECG become the QA pairs of one sample (``answer``, ``chosen``, ``rejected`` and
``question_type`` each); the same pair given twice (one question in several seeds' predictions) is
written once and counted as a duplicate.

A bad line (not JSON, a missing or empty field, chosen equal to rejected, an unknown record, an
unreadable ECG file, a split that contradicts its record's) is skipped with a WARNING naming
``file:line`` and what is wrong, and counted by reason in the manifest's ``skipped``; ``strict``
raises at the first instead. No usable pair at all is an error.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from ecglm.answers import answer_text
from ecglm.data.shards import (
    MANIFEST_NAME,
    check_build,
    read_manifest,
    refuse_foreign_shards,
    sha256_file,
    split_shards,
    write_manifest,
    write_shards,
)
from ecglm.data.splits import SPLITS, hash_uniform
from ecglm.errors import EcglmError
from ecglm.metrics.normalize import answer_items

log = logging.getLogger(__name__)

DATASET = "preference-pairs"
VERSION = 1
#: What a pair line must give (besides ``record`` or ``ecg``).
PAIR_FIELDS = ("question", "chosen", "rejected")
#: What a predictions line must give.
PREDICTION_FIELDS = ("key", "condition", "reference", "prediction", "question")
_QA_SUFFIX = re.compile(r"_qa\d+$")


class PreferencePairsError(EcglmError, ValueError):
    """A preference-pairs input that cannot be built into shards; the message names the file and line."""


@dataclass
class _Sample:
    """The pairs of one ECG, in input order."""

    key: str
    split: str
    ecg: np.ndarray
    meta: dict[str, Any]
    qa: list[dict[str, Any]] = field(default_factory=list)


class PreferencePairs:
    """Build train / val / test shards of preference pairs (``chosen`` / ``rejected`` beside ``answer``).

    Args:
        pairs: JSON-lines files of pairs (one per line; see the module's documentation).
        predictions: ``ecglm evaluate`` predictions files; each wrong answer under ``condition`` is a
            pair (reference chosen, prediction rejected). Their keys are records of ``ecg_shards``.
        ecg_shards: The shard set (folder with ``manifest.json``) whose records ``record`` keys and
            predictions' keys name; its preprocessing also applies to ECG files.
        condition: The predictions' condition made into pairs (``ecg``: the model saw the real ECG).
        split: The split of pairs on ECG files that name none.
        sampling_rate, seconds: The preprocessing of ECG files when there is no ``ecg_shards``.
        max_samples_per_shard: ECGs per shard.
        strict: Raise at the first bad line (default: skip it with a WARNING and count it).
        right_answers: Also make a pair of each right answer in ``predictions``: the reference chosen,
            another reference answer of the same question rejected (DPO on mistakes alone learns the
            mistakes' class balance; docs/training.md).
    """

    dataset = DATASET

    def __init__(
        self,
        pairs: list[str] | None = None,
        predictions: list[str] | None = None,
        ecg_shards: str | None = None,
        condition: str = "ecg",
        split: str = "train",
        sampling_rate: int = 250,
        seconds: float = 10.0,
        max_samples_per_shard: int = 1000,
        strict: bool = False,
        right_answers: bool = False,
    ):
        if not pairs and not predictions:
            raise PreferencePairsError("PreferencePairs needs `pairs` (JSON lines) or `predictions` files")
        if predictions and ecg_shards is None:
            raise PreferencePairsError(
                "predictions name records by key: give `ecg_shards`, the shard set the evaluation read"
            )
        if split not in SPLITS:
            raise PreferencePairsError(f"split is {split!r}: use one of {list(SPLITS)}")
        self.pairs = [Path(p) for p in pairs or []]
        self.predictions = [Path(p) for p in predictions or []]
        self.ecg_shards = None if ecg_shards is None else Path(ecg_shards)
        self.condition, self.split = condition, split
        self.sampling_rate, self.seconds = sampling_rate, seconds
        self.max_samples_per_shard, self.strict = max_samples_per_shard, strict
        self.right_answers = right_answers
        #: Lines not used, by reason (``not JSON``, ``missing field``, ``unknown record``, ...).
        self.skipped: Counter[str] = Counter()
        #: Lines that were fine but gave no new pair (``duplicate``, ``correct answer``, ``other condition``).
        self.unused: Counter[str] = Counter()
        for path in (*self.pairs, *self.predictions):
            if not path.is_file():
                raise PreferencePairsError(
                    f"{path} does not exist: give a JSON-lines file of pairs or predictions"
                )

    # --- identity -----------------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        """Everything the shards depend on, inputs by their sha256 (a changed file rebuilds)."""
        shards_digest = None
        if self.ecg_shards is not None and (self.ecg_shards / MANIFEST_NAME).is_file():
            shards_digest = sha256_file(self.ecg_shards / MANIFEST_NAME)
        return {
            "pairs": {str(p): sha256_file(p) for p in self.pairs},
            "predictions": {str(p): sha256_file(p) for p in self.predictions},
            "ecg_shards": None if self.ecg_shards is None else {str(self.ecg_shards): shards_digest},
            "condition": self.condition,
            "split": self.split,
            "sampling_rate": self.sampling_rate,
            "seconds": self.seconds,
            "max_samples_per_shard": self.max_samples_per_shard,
            **({"right_answers": True} if self.right_answers else {}),  # earlier builds stay up to date
        }

    # --- reading ------------------------------------------------------------------------------------

    def _bad(self, path: Path, line: int, reason: str, detail: str) -> None:
        message = f"{path}:{line}: {reason}: {detail}"
        if self.strict:
            raise PreferencePairsError(
                f"{message} (strict: fix the line, or build without strict to skip it)"
            )
        self.skipped[reason] += 1
        log.warning("skipped: %s", message)

    def _lines(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number, object)`` of each non-blank line that is a JSON object."""
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as err:
                    self._bad(path, number, "not JSON", str(err))
                    continue
                if not isinstance(item, dict):
                    self._bad(path, number, "not an object", f"a JSON {type(item).__name__}, not {{...}}")
                    continue
                yield number, item

    def _text_fields(self, path: Path, number: int, item: dict, names: tuple[str, ...]) -> bool:
        missing = [n for n in names if n not in item]
        if missing:
            self._bad(
                path, number, "missing field", f"no {', '.join(map(repr, missing))} (has {sorted(item)})"
            )
            return False
        empty = [n for n in names if not isinstance(item[n], str) or not item[n].strip()]
        if empty:
            self._bad(path, number, "empty field", f"{', '.join(map(repr, empty))} must be non-empty text")
            return False
        return True

    def _shard_records(self, wanted: set[str]) -> dict[str, tuple[str, np.ndarray, dict]]:
        """``{key: (split, ecg, json)}`` of the ``wanted`` samples of ``ecg_shards`` (one pass)."""
        if self.ecg_shards is None or not wanted:
            return {}
        manifest = read_manifest(self.ecg_shards)
        found: dict[str, tuple[str, np.ndarray, dict]] = {}
        for split in SPLITS:
            for entry in split_shards(manifest["splits"].get(split, {"shards": []})):
                with tarfile.open(self.ecg_shards / entry["path"]) as tar:
                    members = {m.name: m for m in tar if m.isfile()}
                    for name in members:
                        key, _, member = name.partition(".")
                        if member != "json" or key not in wanted:
                            continue
                        meta = json.loads(tar.extractfile(members[name]).read())
                        ecg = np.load(BytesIO(tar.extractfile(members[f"{key}.ecg.npy"]).read()))
                        found[key] = (split, ecg, meta)
        return found

    def _file_ecg(self, spec: str, item: dict) -> np.ndarray:
        """The first window of an ECG file, preprocessed as the shards' ECGs are."""
        from ecglm.ecg import Preprocessing
        from ecglm.records import prepare, read_recording

        pre = self._preprocessing()
        recording = read_recording(spec, item.get("fs"), item.get("leads"))
        return prepare(recording, Preprocessing(pre["sampling_rate"], pre["num_samples"]))[0]

    def _preprocessing(self) -> dict[str, Any]:
        if self.ecg_shards is not None:
            spec = read_manifest(self.ecg_shards).get("preprocessing")
            if spec:
                return spec
        from ecglm.data.preprocess import PreprocessConfig
        from ecglm.ecg import Preprocessing

        spec = Preprocessing(self.sampling_rate, round(self.sampling_rate * self.seconds))
        return PreprocessConfig.of(spec).manifest_entry()

    def _candidates(self) -> list[tuple[Path, int, dict[str, Any]]]:
        """Every usable line as ``(file, line, pair)``; a pair has ``record`` or ``ecg``, ``question``,
        ``answer``, ``chosen``, ``rejected``, ``question_type`` and maybe ``split``."""
        out = []
        for path in self.pairs:
            for number, item in self._lines(path):
                if not self._text_fields(path, number, item, PAIR_FIELDS):
                    continue
                sources = [n for n in ("record", "ecg") if isinstance(item.get(n), str) and item[n].strip()]
                if len(sources) != 1:
                    self._bad(
                        path,
                        number,
                        "missing field",
                        "give exactly one of 'record' (a key) or 'ecg' (a file)",
                    )
                    continue
                if sources == ["record"] and self.ecg_shards is None:
                    self._bad(path, number, "unknown record", "a 'record' key needs `ecg_shards`")
                    continue
                if "split" in item and item["split"] not in SPLITS:
                    self._bad(path, number, "bad split", f"{item['split']!r} is not one of {list(SPLITS)}")
                    continue
                pair = {
                    "question": item["question"],
                    "answer": item.get("answer") if isinstance(item.get("answer"), str) else item["chosen"],
                    "chosen": item["chosen"],
                    "rejected": item["rejected"],
                    "question_type": str(item.get("question_type") or "unknown"),
                    **{k: item[k] for k in ("record", "ecg", "split", "fs", "leads") if k in item},
                }
                out.append((path, number, pair))
        right: list[tuple[Path, int, dict[str, Any]]] = []
        answers: dict[str, set[str]] = {}  # each question's reference answers, over every file
        for path in self.predictions:
            for number, item in self._lines(path):
                if not self._text_fields(path, number, item, PREDICTION_FIELDS[:2]):
                    continue
                if item["condition"] != self.condition:
                    self.unused["other condition"] += 1
                    continue
                if isinstance(item.get("reference"), list):  # a label set, written as the prompts write it
                    item["reference"] = answer_text(item["reference"])
                if not self._text_fields(path, number, item, PREDICTION_FIELDS[2:]):
                    continue
                # As the evaluation scored it (``correct``), else compared as the metrics compare answers.
                correct = item.get("correct")
                if not isinstance(correct, bool):
                    correct = answer_items(item["prediction"]) == answer_items(item["reference"])
                answers.setdefault(item["question"], set()).add(item["reference"].strip())
                if correct:
                    if self.right_answers:
                        right.append((path, number, item))
                    else:
                        self.unused["correct answer"] += 1
                    continue
                pair = {
                    "record": item["key"],
                    "question": item["question"],
                    "answer": item["reference"],
                    "chosen": item["reference"],
                    "rejected": item["prediction"].strip(),
                    "question_type": str(item.get("question_type") or "unknown"),
                }
                out.append((path, number, pair))
        return out + self._right_answer_pairs(right, answers)

    def _right_answer_pairs(
        self, right: list[tuple[Path, int, dict[str, Any]]], answers: dict[str, set[str]]
    ) -> list[tuple[Path, int, dict[str, Any]]]:
        """A pair for each right answer (``right_answers``): the reference chosen, and rejected another
        answer that the predictions give as the reference of the same question, picked by a hash of the
        record key (the same pairs on every build). The mistakes alone carry the model's error balance
        (a model that calls most rhythms regular yields pairs that mostly reject ``regular``); with
        these, every answer of a question is rejected about as often as the questions ask for it."""
        out = []
        for path, number, item in right:
            reference = item["reference"].strip()
            given = answers[item["question"]]
            others = sorted(a for a in given if answer_items(a) != answer_items(reference))
            if not others:
                self.unused["right answer, no other answer"] += 1
                continue
            rejected = others[int(hash_uniform(f"{item['key']}/{item['question']}") * len(others))]
            pair = {
                "record": item["key"],
                "question": item["question"],
                "answer": reference,
                "chosen": reference,
                "rejected": rejected,
                "question_type": str(item.get("question_type") or "unknown"),
            }
            out.append((path, number, pair))
        return out

    def samples(self) -> dict[str, list[_Sample]]:
        """The samples of each split: one per ECG, holding its pairs, in the order lines name them."""
        candidates = self._candidates()
        wanted = set()
        for _, _, pair in candidates:
            if "record" in pair:
                wanted |= {pair["record"], _QA_SUFFIX.sub("", pair["record"])}
        records = self._shard_records(wanted)
        by_key: dict[str, _Sample] = {}
        seen: set[tuple] = set()
        for path, number, pair in candidates:
            if pair["chosen"].strip() == pair["rejected"].strip():
                self._bad(path, number, "chosen equals rejected", f"both are {pair['chosen']!r}")
                continue
            if "record" in pair:
                key = pair["record"] if pair["record"] in records else _QA_SUFFIX.sub("", pair["record"])
                if key not in records:
                    self._bad(
                        path,
                        number,
                        "unknown record",
                        f"{pair['record']!r} is not a sample of {self.ecg_shards}",
                    )
                    continue
                split, ecg, meta = records[key]
                if pair.get("split", split) != split:
                    self._bad(
                        path, number, "bad split",
                        f"{pair['split']!r}, but record {key!r} is in the {split} split of {self.ecg_shards}",
                    )  # fmt: skip
                    continue
            else:
                try:
                    ecg = self._file_ecg(pair["ecg"], pair)
                except (EcglmError, OSError, ValueError) as err:
                    self._bad(path, number, "unreadable ECG", str(err))
                    continue
                split = pair.get("split", self.split)
                key = re.sub(r"[^A-Za-z0-9_-]", "_", pair["ecg"])
                meta = {"dataset": DATASET, "record_id": pair["ecg"], "split": split}
            identity = (key, pair["question"], pair["chosen"], pair["rejected"])
            if identity in seen:
                self.unused["duplicate"] += 1
                continue
            seen.add(identity)
            if key not in by_key:
                kept = {k: v for k, v in meta.items() if k not in ("qa", "conversations", "split")}
                by_key[key] = _Sample(key, split, ecg, {**kept, "split": split})
            qa = {k: pair[k] for k in ("question", "answer", "chosen", "rejected", "question_type")}
            by_key[key].qa.append(qa)
        if not by_key:
            raise PreferencePairsError(
                f"no usable preference pair in {[str(p) for p in (*self.pairs, *self.predictions)]} "
                f"(skipped: {dict(self.skipped)}; unused: {dict(self.unused)})"
            )
        return {s: [x for x in by_key.values() if x.split == s] for s in SPLITS}

    # --- building -----------------------------------------------------------------------------------

    def is_built(self, out_dir: str | Path) -> bool:
        manifest, damage = check_build(out_dir, params=self.params, version=VERSION)
        return manifest is not None and not damage

    def build(self, out_dir: str | Path) -> dict[str, Any]:
        """Write the pairs' shards and ``manifest.json`` to ``out_dir`` (unless built from these inputs).

        A damaged shard set is built again whole (the inputs are read whole anyway)."""
        out_dir = Path(out_dir)
        built, damage = check_build(out_dir, params=self.params, version=VERSION)
        if built is not None and not damage:
            return built
        refuse_foreign_shards(out_dir, DATASET)
        started = time.perf_counter()
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self.skipped.clear()
        self.unused.clear()
        by_split = self.samples()
        splits = {}
        for split in SPLITS:
            for stale in out_dir.glob(f"{split}-??????.tar*"):
                stale.unlink()
            samples = [
                {"__key__": s.key, "ecg.npy": s.ecg, "json": {**s.meta, "qa": s.qa}} for s in by_split[split]
            ]
            shards = write_shards(iter(samples), out_dir, split, self.max_samples_per_shard)
            datasets = Counter(s.meta.get("dataset", DATASET) for s in by_split[split] for _ in s.qa)
            splits[split] = {
                "num_ecgs": len(samples),
                "num_qa": sum(len(s.qa) for s in by_split[split]),
                "datasets": dict(sorted(datasets.items())),
                "question_types": sorted({qa["question_type"] for s in by_split[split] for qa in s.qa}),
                "shards": shards,
            }
        pre = self._preprocessing()
        manifest = {
            "dataset": DATASET,
            "params": self.params,
            "version": VERSION,
            "splits": splits,
            "preprocessing": pre,
            "skipped": dict(sorted(self.skipped.items())),
            "unused": dict(sorted(self.unused.items())),
        }
        if self.skipped:
            manifest["dropped"] = manifest["skipped"]  # what `ecglm shard` prints
        write_manifest(out_dir, manifest)
        log.info(
            "built %s in %s in %.1f s: %s pairs (skipped lines: %s; unused: %s)",
            DATASET, out_dir, time.perf_counter() - started,
            {s: info["num_qa"] for s, info in splits.items()}, dict(self.skipped), dict(self.unused),
        )  # fmt: skip
        return manifest
