"""Row identity: which key each input row has, streamed batch by batch, and the pre-run pass that registers rows.

A row's key is its --key-column value, or a stable hash of what is sent for it (mapped values, query, conversation and turn),
so identical rows are sent once and share the result. Every pass over the input (register, run, export) derives keys the same way.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import InputFileError
from .inputs import TableReader
from .mapping import key_for_row
from .spec import JobSpec


@dataclass(frozen=True)
class KeyedRow:
    index: int  # 0-based data row number in the input
    key: str
    row: dict[str, Any]


def iter_keyed_batches(reader: TableReader, spec: JobSpec, mapping: dict[str, str]) -> Iterator[list[KeyedRow]]:
    """The input's rows with their keys, in input order, at most spec.limit rows."""
    hashed = _hashed_columns(spec, mapping)
    turns: dict[str, int] = {}
    index = 0
    for batch in reader.iter_batches():
        if spec.limit is not None and index >= spec.limit:
            return
        if spec.limit is not None:
            batch = batch[: spec.limit - index]
        keyed = []
        for row in batch:
            keyed.append(KeyedRow(index, _row_key(row, index, spec, hashed, turns), row))
            index += 1
        yield keyed


def _hashed_columns(spec: JobSpec, mapping: dict[str, str]) -> dict[str, str]:
    columns = dict(mapping)
    if spec.query_column:
        columns["\x00query"] = spec.query_column
    if spec.conversation_column:
        columns["\x00conversation"] = spec.conversation_column
    return columns


def _row_key(row: dict[str, Any], index: int, spec: JobSpec, hashed: dict[str, str], turns: dict[str, int]) -> str:
    if spec.key_column:
        value = row.get(spec.key_column)
        if value is None or str(value) == "":
            raise InputFileError(f"{spec.input} row {index + 1}: key column '{spec.key_column}' is empty")
        return str(value)
    key = key_for_row(row, hashed, None)
    if spec.conversation_column:
        # Two identical turns of one conversation ("yes", "yes") are different messages.
        conversation = str(row.get(spec.conversation_column, ""))
        turns[conversation] = turns.get(conversation, 0) + 1
        key = f"{key}#{turns[conversation]}"
    return key


@dataclass(frozen=True)
class Plan:
    rows: int  # input rows in scope (after --limit)
    unique: int  # distinct keys: the rows that need a result


class KeySet:
    """The keys seen so far in one pass over the input, on disk (flat memory at millions of rows)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="dify-batch-")
        self._db = sqlite3.connect(Path(self._dir.name) / "seen.sqlite")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, row INTEGER)")

    def add(self, batch: list[KeyedRow]) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
        """Record a batch: (new keys with their first row, repeats as (key, first row, this row))."""
        first: dict[str, int] = {}
        for item in batch:
            first.setdefault(item.key, item.index)
        known = dict(self._known(list(first)))
        new = [(k, i) for k, i in first.items() if k not in known]
        self._db.executemany("INSERT INTO seen VALUES (?, ?)", new)
        repeats = []
        for item in batch:
            owner = known.get(item.key, first[item.key])
            if owner != item.index:
                repeats.append((item.key, owner, item.index))
        return new, repeats

    def _known(self, keys: list[str]) -> Iterator[tuple[str, int]]:
        for start in range(0, len(keys), 900):
            chunk = keys[start : start + 900]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(f"SELECT key, row FROM seen WHERE key IN ({marks})", chunk)

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> KeySet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def register_rows(reader: TableReader, spec: JobSpec, mapping: dict[str, str], store: Checkpoint) -> Plan:
    """One pass before any run: refuse duplicate key-column values, record every key in the checkpoint."""
    rows = unique = 0
    duplicates: list[tuple[str, int, int]] = []
    with KeySet() as seen:
        for batch in iter_keyed_batches(reader, spec, mapping):
            rows += len(batch)
            new, repeats = seen.add(batch)
            store.register_rows(new)
            unique += len(new)
            if spec.key_column:
                duplicates += repeats[: 6 - len(duplicates)]
    if duplicates:
        raise InputFileError(_duplicate_message(spec, duplicates))
    return Plan(rows=rows, unique=unique)


def _duplicate_message(spec: JobSpec, duplicates: list[tuple[str, int, int]]) -> str:
    shown = "; ".join(f"{key!r} (rows {a + 1} and {b + 1})" for key, a, b in duplicates[:5])
    more = " and more" if len(duplicates) > 5 else ""
    return f"duplicate values in key column '{spec.key_column}' of {spec.input}: {shown}{more} — keys must be unique"
