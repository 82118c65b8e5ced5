"""SQLite state of one job: its fingerprint, one row per input row (status, outputs, run ids), uploads, conversations.

A committed row survives kill -9 and power loss (WAL, synchronous=FULL); an advisory lock keeps two runs off one state.
One connection is shared by the event-loop thread and one writer thread, so every call takes `self._lock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .errors import StateError

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "succeeded", "failed")
CHUNK = 900  # stays under SQLite's historic limit of 999 bound parameters
RUN_IDS = ("workflow_run_id", "task_id", "conversation_id", "message_id")
_RESERVED_META = ("fingerprint", "schema_version")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_rows (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    row_index INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    outputs TEXT, error TEXT, error_code TEXT, http_status INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, elapsed_s REAL,
    workflow_run_id TEXT, task_id TEXT,
    total_tokens INTEGER, total_price REAL, currency TEXT,
    conversation_id TEXT, message_id TEXT,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS rows_by_index ON job_rows (row_index);
CREATE INDEX IF NOT EXISTS rows_by_status ON job_rows (status, row_index);
CREATE TABLE IF NOT EXISTS output_columns (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL, user TEXT NOT NULL, upload_id TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (sha256, user)
);
CREATE TABLE IF NOT EXISTS conversations (conv_key TEXT PRIMARY KEY, conversation_id TEXT NOT NULL);
"""

_ROW_COLUMNS = (
    "key, row_index, status, outputs, error, error_code, http_status, attempts, elapsed_s, workflow_run_id, task_id, "
    "total_tokens, total_price, currency, conversation_id, message_id"
)
_UPDATABLE = [c.strip() for c in _ROW_COLUMNS.split(",")][1:]
_SAVE_SQL = (
    f"INSERT INTO job_rows ({_ROW_COLUMNS}, updated_at) VALUES ({', '.join('?' * 17)}) ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in [*_UPDATABLE, "updated_at"])
)
_START_SQL = (
    "UPDATE job_rows SET status = 'running', "
    + ", ".join(f"{name} = COALESCE(?, {name})" for name in RUN_IDS)
    + ", updated_at = ? WHERE key = ?"
)
_REGISTER_SQL = (
    "INSERT INTO job_rows (key, row_index) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET row_index = excluded.row_index WHERE job_rows.row_index != excluded.row_index"
)


@dataclass(frozen=True)
class RowState:
    """What the checkpoint knows about one input row."""

    key: str
    row_index: int
    status: str  # pending | running | succeeded | failed
    outputs: dict[str, Any] | None = None
    error: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    attempts: int = 0
    elapsed_s: float | None = None
    workflow_run_id: str | None = None
    task_id: str | None = None
    total_tokens: int | None = None
    total_price: float | None = None
    currency: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None


def _row_state(row: tuple[Any, ...]) -> RowState:
    outputs = json.loads(row[3]) if row[3] is not None else None
    return RowState(row[0], row[1], row[2], outputs, *row[4:])


def _row_params(state: RowState, now: float) -> tuple[Any, ...]:
    if state.status not in STATUSES:
        raise ValueError(f"unknown row status {state.status!r}")
    outputs = None if state.outputs is None else json.dumps(state.outputs, ensure_ascii=False, default=str)
    return (
        state.key, state.row_index, state.status, outputs, state.error, state.error_code, state.http_status,
        state.attempts, state.elapsed_s, state.workflow_run_id, state.task_id, state.total_tokens, state.total_price,
        state.currency, state.conversation_id, state.message_id, now,
    )  # fmt: skip


def _start_params(key: str, ids: dict[str, Any], now: float) -> tuple[Any, ...]:
    values = [None if ids.get(name) is None else str(ids[name]) for name in RUN_IDS]
    return (*values, now, key)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _normalized(fingerprint: dict[str, Any]) -> dict[str, Any]:
    # JSON round trip so tuples/lists and int keys compare the way they will be stored
    return dict(json.loads(json.dumps(fingerprint, sort_keys=True, default=str)))


def _differing_fields(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return sorted(name for name in set(stored) | set(given) if stored.get(name) != given.get(name))


def _take_lock(path: Path) -> IO[str]:
    lock_path = Path(f"{path}.lock")
    try:
        handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the Checkpoint
    except OSError as exc:
        raise StateError(f"cannot create the checkpoint lock {lock_path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise StateError(
            f"another dify-batch run is using the checkpoint {path} (pid {pid}); "
            "wait for it to finish or use another --state"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _release_lock(handle: IO[str]) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _delete_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot delete the old checkpoint {path}{suffix}: {exc.strerror or exc}") from exc


class Checkpoint:
    """The state database of one job. Open with `Checkpoint.open(...)`; use as a context manager."""

    def __init__(self, path: Path, conn: sqlite3.Connection, fingerprint: dict[str, Any], lock: IO[str] | None):
        self.path = path
        self.fingerprint = fingerprint
        self._conn = conn
        self._lock_file = lock
        self._lock = threading.Lock()
        self._columns_seen = self._load_output_columns()

    @classmethod
    def open(
        cls,
        path: str | Path,
        fingerprint: dict[str, Any],
        *,
        fresh: bool = False,
        lock: bool = True,
        check_fingerprint: bool = True,
    ) -> Checkpoint:
        """Open or create the state at `path` for the job described by `fingerprint` (JSON-able, no secrets).

        `lock=False` skips the run lock, for read-only commands mid-job; it never creates a state.
        `check_fingerprint=False` adopts the stored fingerprint (status/export do not know the whole job); the state
        must exist.
        """
        path = Path(path)
        if fresh and not lock:
            raise ValueError("fresh=True needs lock=True: never wipe a state another run may be using")
        if not path.parent.is_dir():
            raise StateError(f"the folder for the checkpoint {path} does not exist: {path.parent}")
        handle = _take_lock(path) if lock else None
        try:
            if fresh:
                _delete_db(path)
            creating = not path.exists() or path.stat().st_size == 0
            if creating and not (lock and check_fingerprint):
                raise StateError(f"no checkpoint at {path}: nothing has run with this --state yet")
            conn = _connect(path, creating)
            stored = _check_fingerprint(conn, path, fingerprint if check_fingerprint else None)
        except BaseException:
            if handle is not None:
                _release_lock(handle)
            raise
        return cls(path, conn, stored, handle)

    # -- rows -------------------------------------------------------------------------------------------------------

    def register_rows(self, rows: Iterable[tuple[str, int]]) -> None:
        """Insert new keys as pending; existing keys only get their (possibly new) row_index. One transaction."""
        with self._lock, self._conn:
            self._conn.executemany(_REGISTER_SQL, rows)

    def statuses(self, keys: Sequence[str]) -> dict[str, str]:
        """Status by key; keys never registered are absent."""
        found: dict[str, str] = {}
        with self._lock:
            for chunk in _chunks(keys):
                sql = f"SELECT key, status FROM job_rows WHERE key IN ({','.join('?' * len(chunk))})"
                found.update(self._conn.execute(sql, chunk).fetchall())
        return found

    def get_rows(self, keys: Sequence[str], *, with_outputs: bool = True) -> dict[str, RowState]:
        """Row states by key; `with_outputs=False` skips decoding outputs (the scheduler only needs status and ids)."""
        found: dict[str, RowState] = {}
        columns = _ROW_COLUMNS if with_outputs else _ROW_COLUMNS.replace("outputs,", "NULL,", 1)
        with self._lock:
            for chunk in _chunks(keys):
                sql = f"SELECT {columns} FROM job_rows WHERE key IN ({','.join('?' * len(chunk))})"
                found.update((row[0], _row_state(row)) for row in self._conn.execute(sql, chunk))
        return found

    def mark_started(self, key: str, ids: dict[str, Any]) -> None:
        """Mark a row running and remember the run ids known so far; missing/None ids keep what was stored, names other
        than workflow_run_id, task_id, conversation_id, message_id are ignored.

        Committed with synchronous=NORMAL: it survives kill -9 at once and a power loss from the next durable commit on,
        which keeps this per-request call free of an fsync.
        """
        with self._lock:
            self._conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with self._conn:
                    self._conn.execute(_START_SQL, _start_params(key, ids, time.time()))
            finally:
                self._conn.execute("PRAGMA synchronous = FULL")

    def save_results(self, states: Sequence[RowState]) -> None:
        """Store a batch of row states in one durable transaction (group commit)."""
        self.apply_batch((), states)

    def apply_batch(self, started: Sequence[tuple[str, dict[str, Any]]], states: Sequence[RowState]) -> None:
        """mark_started for each (key, ids), then save `states`: one durable transaction for a writer thread's batch."""
        now = time.time()
        starts = [_start_params(key, ids, now) for key, ids in started]
        params = [_row_params(state, now) for state in states]
        with self._lock, self._conn:
            self._conn.executemany(_START_SQL, starts)
            self._conn.executemany(_SAVE_SQL, params)
            self._add_output_columns(states)

    def last_update(self) -> float | None:
        """When any row last changed (saved or marked started): part of the signature of an export."""
        with self._lock:
            value = self._conn.execute("SELECT MAX(updated_at) FROM job_rows").fetchone()[0]
        return float(value) if value is not None else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            found = dict(self._conn.execute("SELECT status, COUNT(*) FROM job_rows GROUP BY status").fetchall())
        counts = {status: int(found.get(status, 0)) for status in STATUSES}
        counts["total"] = sum(found.values())
        return counts

    def iter_rows(self, *, status: str | None = None, batch: int = 5000) -> Iterator[RowState]:
        """Rows in row_index order, read page by page so neither memory nor the lock is held for the whole table."""
        where, index = ("", "rows_by_index") if status is None else ("status = ? AND ", "rows_by_status")
        sql = (
            f"SELECT id, {_ROW_COLUMNS} FROM job_rows INDEXED BY {index} "
            f"WHERE {where}(row_index, id) > (?, ?) ORDER BY row_index, id LIMIT ?"
        )
        last: tuple[int, int] = (-(2**63), -(2**63))
        while True:
            args = ([] if status is None else [status]) + [*last, batch]
            with self._lock:
                page = self._conn.execute(sql, args).fetchall()
            yield from (_row_state(row[1:]) for row in page)
            if len(page) < batch:
                return
            last = (page[-1][2], page[-1][0])

    def running_with_run_id(self) -> list[RowState]:
        """Rows a crash left running whose workflow run id is known: look them up instead of posting them again."""
        sql = f"SELECT {_ROW_COLUMNS} FROM job_rows WHERE status = 'running' AND workflow_run_id IS NOT NULL"
        with self._lock:
            return [_row_state(row) for row in self._conn.execute(sql + " ORDER BY row_index")]

    def reset_running(self) -> None:
        """Running rows without a run id were never seen by the server (or cannot be looked up): back to pending."""
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE job_rows SET status = 'pending' WHERE status = 'running' AND workflow_run_id IS NULL"
            )

    # -- caches and metadata ----------------------------------------------------------------------------------------

    def upload_id(self, sha256: str, user: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT upload_id FROM uploads WHERE sha256 = ? AND user = ?", (sha256, user)
            ).fetchone()
        return None if row is None else str(row[0])

    def save_upload(self, sha256: str, user: str, upload_id: str, name: str) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO uploads (sha256, user, upload_id, name, created_at) VALUES (?, ?, ?, ?, ?)",
                (sha256, user, upload_id, name, time.time()),
            )

    def conversation_id(self, conv_key: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT conversation_id FROM conversations WHERE conv_key = ?", (conv_key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def save_conversation(self, conv_key: str, conversation_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO conversations (conv_key, conversation_id) VALUES (?, ?)",
                (conv_key, conversation_id),
            )

    def meta(self, name: str) -> Any:
        """A value stored with set_meta (JSON round-tripped), or None."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, name: str, value: Any) -> None:
        if name in _RESERVED_META:
            raise ValueError(f"meta name {name!r} is reserved by the checkpoint")
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value, ensure_ascii=False))
            )

    def output_columns(self) -> list[str]:
        """Union of the outputs keys of succeeded rows, in first-seen order."""
        with self._lock:
            return self._load_output_columns()

    def _load_output_columns(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT name FROM output_columns ORDER BY seq")]

    def _add_output_columns(self, states: Sequence[RowState]) -> None:
        seen = set(self._columns_seen)
        for state in states:
            if state.status != "succeeded" or not state.outputs:
                continue
            for name in state.outputs:
                if name not in seen:
                    seen.add(name)
                    self._columns_seen.append(name)
                    sql = "INSERT OR IGNORE INTO output_columns (name, seq) VALUES (?, ?)"
                    self._conn.execute(sql, (name, len(self._columns_seen)))

    # -- lifetime ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database and release the run lock; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
            if self._lock_file is not None:
                _release_lock(self._lock_file)
                self._lock_file = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _connect(path: Path, creating: bool) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise StateError(
                f"{path} is not a dify-batch checkpoint; rerun with --fresh to replace it or choose another --state"
            )
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA cache_size = -32768")
        if creating or "job_rows" not in tables:
            conn.executescript(_SCHEMA)
        return conn
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise StateError(
            f"checkpoint {path} is not a usable SQLite database ({exc}); rerun with --fresh to replace it "
            "or choose another --state"
        ) from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise


def _check_fingerprint(conn: sqlite3.Connection, path: Path, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """Store the fingerprint of a new state; refuse a state written for another job."""
    try:
        rows = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('fingerprint', 'schema_version')"))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateError(f"checkpoint {path} is not a usable SQLite database ({exc})") from exc
    if "fingerprint" not in rows:
        if fingerprint is None:
            conn.close()
            raise StateError(f"checkpoint {path} has no job fingerprint; rerun the job with --fresh")
        given = _normalized(fingerprint)
        with conn:
            sql = "INSERT INTO meta (name, value) VALUES (?, ?)"
            conn.execute(sql, ("fingerprint", json.dumps(given, sort_keys=True)))
            conn.execute(sql, ("schema_version", str(SCHEMA_VERSION)))
        return given
    if int(rows.get("schema_version", "0")) != SCHEMA_VERSION:
        conn.close()
        raise StateError(f"checkpoint {path} was written by another version of dify-batch; rerun with --fresh")
    stored: dict[str, Any] = json.loads(rows["fingerprint"])
    if fingerprint is None:
        return stored
    differ = _differing_fields(stored, _normalized(fingerprint))
    if differ:
        conn.close()
        raise StateError(
            f"checkpoint {path} belongs to another job ({', '.join(differ)} differ); "
            "rerun with --fresh to start over or choose another --state"
        )
    return stored
