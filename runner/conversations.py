"""`ConversationCache`: which Dify conversation each of your users is in, kept in a small SQLite file (WAL) so a bot
keeps its conversations across restarts; `ask` continues a user's conversation and starts a new one when Dify has
lost the stored one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import NotFoundError, StateError
from .models import RunResult
from .sync import Dify

_SCHEMA = """CREATE TABLE IF NOT EXISTS conversations (
    user TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    updated_at REAL NOT NULL
)"""


class ConversationCache:
    """user id -> conversation id, persisted in SQLite at `path` (":memory:" for none). One file per Dify app:
    conversation ids belong to the app. Safe to share between threads and between processes using the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the conversation cache {path}: {exc}") from exc
        try:
            self._execute("PRAGMA journal_mode=WAL")
            self._execute(_SCHEMA)
        except StateError:
            self._db.close()
            raise

    def get(self, user: str) -> str | None:
        rows = self._execute("SELECT conversation_id FROM conversations WHERE user = ?", (user,))
        return str(rows[0][0]) if rows else None

    def set(self, user: str, conversation_id: str) -> None:
        self._execute(
            "INSERT INTO conversations (user, conversation_id, updated_at) VALUES (?, ?, ?) ON CONFLICT(user) "
            "DO UPDATE SET conversation_id = excluded.conversation_id, updated_at = excluded.updated_at",
            (user, conversation_id, time.time()),
        )

    def forget(self, user: str) -> None:
        """The user's next `ask` starts a new conversation."""
        self._execute("DELETE FROM conversations WHERE user = ?", (user,))

    def ask(self, client: Dify, user: str, query: str, **kwargs: Any) -> RunResult:
        """Send `query` in `user`'s conversation (a new one the first time) and remember the conversation id.

        When Dify answers 404 "Conversation Not Exists." for the stored id (conversation deleted, another app, or a
        new Dify database), the id is forgotten and the query is sent once more in a new conversation. `kwargs` go to
        `Dify.chat` (`inputs`, `files`, ...); pass the same `inputs` on every call: Dify reads them only when a
        conversation starts.
        """
        stored = self.get(user)
        try:
            result = client.chat(query, user, conversation_id=stored, **kwargs)
        except NotFoundError as exc:
            if stored is None or exc.code != "conversation_not_exists":
                raise
            self.forget(user)
            result = client.chat(query, user, **kwargs)
        if result.conversation_id:
            self.set(user, result.conversation_id)
        return result

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ConversationCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConversationCache({str(self.path)!r})"

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"conversation cache {self.path}: {exc}") from exc
