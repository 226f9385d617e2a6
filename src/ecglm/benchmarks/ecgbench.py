"""ECGBench (PULSE's benchmark) in the layout its authors distribute: per subset ``<subset>.json``, a JSON
list of ``{id, image, conversations: [{from: human, value}, {from: gpt, value}]}``, the images under
``images/``; and predictions as JSON lines in the layout PULSE's inference writes (``question_id``,
``prompt``, ``text``; other tools' ``id`` / ``response`` are read too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecglm.errors import EcglmError


class BenchmarkError(EcglmError, ValueError):
    """A benchmark folder, subset or predictions file that cannot be read as the layout says."""


Kind = Literal["labels", "choice", "ecgqa", "judge"]


@dataclass(frozen=True)
class Subset:
    """One ECGBench subset: how it is scored (``kind``), its label space (multi-label subsets) and the
    number of items the published files hold (PULSE's script skips a file of another length)."""

    name: str
    kind: Kind
    labels: tuple[str, ...] = ()
    size: int | None = None


SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset("ptb-test", "labels", ("NORM", "MI", "STTC", "CD", "HYP")),
        Subset("ptb-test-report", "judge"),
        Subset("code15-test", "labels", ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"), size=1400),
        Subset(
            "cpsc-test", "labels", ("NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE"), 2061
        ),
        Subset("csn-test-no-cot", "choice", size=1611),
        Subset("g12-test-no-cot", "choice", size=2026),
        Subset("mmmu-ecg", "choice", size=200),
        Subset("ecgqa-test", "ecgqa", size=1317),
        Subset("arena", "judge", size=50),
    )
}

#: The subsets scored without a judge, in the order PULSE's script scores them (its one seeded random
#: generator is drawn from in this order: mmmu-ecg, then csn, then g12).
SCORED = (
    "mmmu-ecg",
    "ptb-test",
    "cpsc-test",
    "csn-test-no-cot",
    "g12-test-no-cot",
    "ecgqa-test",
    "code15-test",
)


@dataclass(frozen=True)
class Item:
    """One question: its id, image path (relative to ``images/``), question and gold answer as stored
    (a string, or a list of strings for ecgqa-test on the hub)."""

    id: str
    image: str
    question: str
    gold: Any


def subset(name: str) -> Subset:
    if name not in SUBSETS:
        raise BenchmarkError(f"unknown ECGBench subset {name!r}; subsets: {', '.join(SUBSETS)}")
    return SUBSETS[name]


def _text(value: Any) -> str:
    # The hub stores ecgqa-test's values as lists of strings; a question is its strings joined.
    return "\n".join(value) if isinstance(value, list) else str(value)


@dataclass(frozen=True)
class Conversation:
    """One multi-turn item (``arena``): its id, image path (relative to ``images/``) and its turns,
    ``({question, answer}, ...)`` with the gold answers."""

    id: str
    image: str
    turns: tuple[dict[str, str], ...]


def _rows(data: str | Path, name: str) -> tuple[Path, list]:
    subset(name)
    path = Path(data) / f"{name}.json"
    if not path.is_file():
        raise BenchmarkError(
            f"{path}: no such file; --data is a folder with <subset>.json per subset and images/, as PULSE's"
            " README writes it from the hub dataset PULSE-ECG/ECGBench (ecglm benchmark fetch --out DIR)"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: not a JSON list of items ({err})") from None
    if not isinstance(rows, list):
        raise BenchmarkError(f"{path}: expected a JSON list of {{id, image, conversations}} items")
    return path, rows


def read_subset(data: str | Path, name: str) -> list[Item]:
    """The items of subset ``name`` in ``data`` (``data/<name>.json``)."""
    path, rows = _rows(data, name)
    items = []
    for i, row in enumerate(rows):
        turns = row.get("conversations") or row.get("conversation") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns:
            raise BenchmarkError(f"{path}: item {i} has no 'conversations' list")
        # mmmu-ecg's published script keys its gold answers by "No"; the hub's files carry "id".
        ident = row.get("id", row.get("No"))
        if ident is None:
            raise BenchmarkError(f"{path}: item {i} has no 'id'")
        first, last = turns[0], turns[-1]
        question = first.get("value", first.get("question", ""))
        gold = last.get("value", last.get("answer", "")) if len(turns) > 1 or "answer" in last else ""
        items.append(
            Item(str(ident), str(row.get("image", row.get("image_path", ""))), _text(question), gold)
        )
    return items


def read_conversations(data: str | Path, name: str = "arena") -> list[Conversation]:
    """The multi-turn items of ``data/<name>.json``: each item's ``conversations`` as turns of
    ``{question, answer}`` (arena's layout) or as alternating ``{from: human}`` / ``{from: gpt}``
    values (the other subsets' layout)."""
    path, rows = _rows(data, name)
    conversations = []
    for i, row in enumerate(rows):
        ident = row.get("id") if isinstance(row, dict) else None
        if ident is None:
            raise BenchmarkError(f"{path}: item {i} has no 'id'")
        turns = _turns(row.get("conversations") or row.get("conversation"))
        if not turns:
            raise BenchmarkError(
                f"{path}: item {ident!r}: 'conversations' must be a non-empty list of {{question, answer}}"
                " turns (or of alternating {from: human, value} and {from: gpt, value} messages)"
            )
        image = str(row.get("image", row.get("image_path", "")))
        conversations.append(Conversation(str(ident), image, turns))
    return conversations


def _turns(messages: Any) -> tuple[dict[str, str], ...] | None:
    """``({question, answer}, ...)`` from either layout of a conversation, ``None`` if it has neither."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    if all("question" in m for m in messages):
        pairs = [(m["question"], m.get("answer", "")) for m in messages]
    else:
        speakers = [m.get("from") for m in messages]
        if len(messages) % 2 or speakers != ["human", "gpt"] * (len(messages) // 2):
            return None
        asked, answered = messages[::2], messages[1::2]
        pairs = [(q.get("value", ""), a.get("value", "")) for q, a in zip(asked, answered, strict=True)]
    return tuple({"question": _text(q), "answer": _text(a)} for q, a in pairs)


def prediction_id(row: dict[str, Any]) -> str | None:
    ident = row.get("question_id", row.get("id"))
    return None if ident is None else str(ident)


def prediction_text(row: dict[str, Any]) -> str:
    return str(row.get("text", row.get("response", "")))


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON lines predictions file, in order; a last line cut short is ignored (a killed
    run), any other bad line refused naming the file and line."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as err:
        raise BenchmarkError(f"{path}: cannot read it ({err.strerror or err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a line a kill cut short
                continue
            raise BenchmarkError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict) or prediction_id(row) is None:
            raise BenchmarkError(f"{path}:{number}: a prediction needs 'question_id' (or 'id') and 'text'")
        rows.append(row)
    return rows


def predictions_file(predictions: str | Path, name: str) -> Path | None:
    """Subset ``name``'s predictions under ``predictions``: ``<name>.jsonl``, or PULSE's
    ``<name>/step-final.jsonl`` (the one ``.jsonl`` file of a folder named for the subset)."""
    root = Path(predictions)
    if root.is_file():
        return root
    direct = root / f"{name}.jsonl"
    if direct.is_file():
        return direct
    folder = root / name
    found = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if len(found) > 1:
        raise BenchmarkError(f"{folder}: {len(found)} .jsonl files; give one with --predictions FILE")
    return found[0] if found else None
