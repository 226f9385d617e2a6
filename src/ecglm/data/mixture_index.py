"""The mixture builder's index: record tables and every QA pair of one build, in a SQLite file in the
output folder while building, grouped by ECG (or ECG pair) as the shards are written. Not in Python
dicts: the full mixture has ~800K records and ~1.9M QA pairs, and the builder's memory should not grow
with them. Internal to :mod:`ecglm.data.mixture`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby, islice
from pathlib import Path
from typing import Any

from ecglm.data.sources import ECGRecord


@dataclass
class Group:
    """Everything one dataset asks about one ECG (or one pair of ECGs) in one split."""

    records: tuple[ECGRecord, ...]  # one, or two for a comparison question
    qa: list[dict[str, Any]]
    conversations: list[list[dict[str, str]]]

    @property
    def pair(self) -> bool:
        return len(self.records) == 2


_SCHEMA = """
CREATE TABLE records (
    source TEXT NOT NULL, record_id INTEGER NOT NULL, patient_id INTEGER NOT NULL,
    path TEXT NOT NULL, split TEXT NOT NULL, PRIMARY KEY (source, record_id)
) WITHOUT ROWID;
CREATE TABLE items (
    seq INTEGER PRIMARY KEY, dataset TEXT NOT NULL, split TEXT, source TEXT NOT NULL,
    id1 INTEGER NOT NULL, id2 INTEGER, pair INTEGER NOT NULL, conversation INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE patients (
    split TEXT NOT NULL, source TEXT NOT NULL, patient_id INTEGER NOT NULL,
    PRIMARY KEY (split, source, patient_id)
) WITHOUT ROWID;
"""
_MATCHES = "r.source = items.source AND r.record_id = {}"
_UNKNOWN = "NOT EXISTS (SELECT 1 FROM records AS r WHERE {})"
_UNKNOWN_ID1 = _UNKNOWN.format(_MATCHES.format("items.id1"))
_UNKNOWN_ID2 = f"(id2 IS NOT NULL AND {_UNKNOWN.format(_MATCHES.format('items.id2'))})"
_GROUP_ROWS = """
SELECT i.source, i.id1, i.id2, i.conversation, i.payload,
       a.patient_id, a.path, a.split, b.patient_id, b.path, b.split
FROM items AS i
JOIN records AS a ON a.source = i.source AND a.record_id = i.id1
LEFT JOIN records AS b ON b.source = i.source AND b.record_id = i.id2
WHERE i.split = ? AND i.dataset = ? AND i.pair = ?
ORDER BY i.source, i.id1, i.id2, i.conversation, i.seq
"""


class QAIndex:
    """The record tables and every QA pair / conversation of one build, in a temporary SQLite file.

    ``items`` holds one row per QA pair (ECG-QA) or conversation (PULSE) in the order read, its
    payload as JSON; :meth:`groups` reads them back grouped by ECG (or ECG pair) in sorted order,
    the rows of a group in the order read, so the shards do not depend on how SQLite stores them.
    SQLite's page cache is capped (``cache_size``), so memory stays flat whatever the data size.
    """

    CACHE_KIB = 32 * 1024
    BATCH = 10_000

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)  # left by a build that was killed
        self.path = path
        # Autocommit; bulk loads open their own transactions. No journal, no fsync: the file is
        # scratch space, rebuilt from the sources if a build fails.
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{self.CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self._patients: list[tuple[str, str, int]] = []

    def __enter__(self) -> QAIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def _insert_many(self, sql: str, rows: Iterable[tuple]) -> None:
        rows = iter(rows)
        while batch := list(islice(rows, self.BATCH)):
            self.db.execute("BEGIN")
            self.db.executemany(sql, batch)
            self.db.execute("COMMIT")

    def add_records(self, records: Iterable[ECGRecord]) -> None:
        # OR REPLACE: a later row with the same id wins, as in read_ptbxl / read_mimic's dicts.
        rows = ((r.source, r.record_id, r.patient_id, str(r.path), r.split) for r in records)
        self._insert_many("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)", rows)

    def add_items(self, items: Iterable[tuple]) -> None:
        """``(dataset, split or None, source, id1, id2 or None, conversation, payload)`` rows."""
        rows = ((d, s, src, a, b, b is not None, c, p) for d, s, src, a, b, c, p in items)
        sql = "INSERT INTO items (dataset, split, source, id1, id2, pair, conversation, payload) VALUES "
        self._insert_many(sql + "(?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def has_record(self, source: str, record_id: int) -> bool:
        query = "SELECT 1 FROM records WHERE source = ? AND record_id = ?"
        return self.db.execute(query, (source, record_id)).fetchone() is not None

    def drop_unknown(self, datasets: Iterable[str]) -> int:
        """Delete the items of ``datasets`` naming a record (either of a pair) not in the tables."""
        datasets = list(datasets)
        where = f"dataset IN ({', '.join('?' * len(datasets))}) AND ({_UNKNOWN_ID1} OR {_UNKNOWN_ID2})"
        return self.db.execute(f"DELETE FROM items WHERE {where}", datasets).rowcount

    def drop_pairs(self) -> int:
        return self.db.execute("DELETE FROM items WHERE pair = 1").rowcount

    def finish_items(self) -> None:
        """Give PULSE items their record's split and index items in the order :meth:`groups` reads."""
        record_split = f"SELECT r.split FROM records AS r WHERE {_MATCHES.format('items.id1')}"
        self.db.execute(f"UPDATE items SET split = ({record_split}) WHERE split IS NULL")
        # seq (the rowid) ends every index entry, so rows of one group come back in insertion order.
        self.db.execute(
            "CREATE INDEX items_by_group ON items (split, dataset, pair, source, id1, id2, conversation)"
        )

    def datasets(self, split: str, pair: bool) -> list[str]:
        query = "SELECT DISTINCT dataset FROM items WHERE split = ? AND pair = ? ORDER BY dataset"
        return [row[0] for row in self.db.execute(query, (split, pair))]

    def num_records(self, split: str, dataset: str, pair: bool) -> int:
        """Records to preprocess for one dataset in one split (for a progress bar)."""
        query = (
            "SELECT count(*) FROM (SELECT DISTINCT source, id1, id2 FROM items"
            " WHERE split = ? AND dataset = ? AND pair = ?)"
        )
        return self.db.execute(query, (split, dataset, pair)).fetchone()[0] * (2 if pair else 1)

    def groups(self, split: str, dataset: str, pair: bool) -> Iterator[Group]:
        """The groups of one dataset in one split by ``(source, id1, id2)``, read as they are consumed."""
        rows = self.db.execute(_GROUP_ROWS, (split, dataset, pair))
        for _, group_rows in groupby(rows, key=lambda row: row[:3]):
            group_rows = list(group_rows)
            source, id1, id2 = group_rows[0][:3]
            first = group_rows[0][5:]
            records = [ECGRecord(source, id1, first[0], Path(first[1]), first[2])]
            if id2 is not None:
                records.append(ECGRecord(source, id2, first[3], Path(first[4]), first[5]))
            group = Group(tuple(records), [], [])
            for row in group_rows:
                (group.conversations if row[3] else group.qa).append(json.loads(row[4]))
            yield group

    def add_patients(self, split: str, records: Iterable[ECGRecord]) -> None:
        self._patients += [(split, r.source, r.patient_id) for r in records]
        if len(self._patients) >= self.BATCH:
            self._flush_patients()

    def _flush_patients(self) -> None:
        self.db.executemany("INSERT OR IGNORE INTO patients VALUES (?, ?, ?)", self._patients)
        self._patients = []

    def patient_overlap(self, a: str, b: str) -> int:
        """Patients (per source) with written samples in both splits."""
        self._flush_patients()
        query = (
            "SELECT count(*) FROM patients AS p JOIN patients AS q ON q.split = ?"
            " AND q.source = p.source AND q.patient_id = p.patient_id WHERE p.split = ?"
        )
        return self.db.execute(query, (b, a)).fetchone()[0]
