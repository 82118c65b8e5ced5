"""Dify's SSE streams without I/O: an incremental byte decoder, and accumulators that turn workflow / chat / completion
events into a `RunResult` (outputs from `workflow_finished`, answers joined from `message` chunks, prices summed).
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

from .models import RunResult

FAILED_STATUSES = ("failed", "stopped", "paused")


class SSEDecoder:
    """Incremental decoder of a Dify SSE byte stream into JSON payload dicts.

    Works on bytes (frames and UTF-8 sequences may be split anywhere); `event: ping`, comments, and non-JSON data are
    dropped; CR, LF and CRLF line ends are all accepted.
    """

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        self._pending: list[bytes] = []
        self._data: list[bytes] = []
        # Frames of these events still count as life but are not parsed: most frames of a stream are progress
        # events nobody reads, and decoding each one was a visible part of the client's CPU per row.
        self._skip = tuple(prefix for name in skip for prefix in (f'{{"event": "{name}"'.encode(),
                                                                    f'{{"event":"{name}"'.encode()))

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending = []
        tail = b""
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):  # may be half of a CRLF: decide with the next chunk
                chunk, tail = chunk[:-1], b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop() + tail
        if rest:
            self._pending.append(rest)
        return self._lines(lines)

    def flush(self) -> list[dict[str, Any]]:
        """At EOF: a last frame without its blank line still counts."""
        lines = [b"".join(self._pending).rstrip(b"\r")] if self._pending else []
        self._pending = []
        return self._lines([*lines, b""])

    def _lines(self, lines: list[bytes]) -> list[dict[str, Any]]:
        frames = []
        for line in lines:
            if not line:
                if self._data:
                    data = b"\n".join(self._data)
                    self._data = []
                    if self._skip and data.startswith(self._skip):
                        frames.append(SKIPPED)
                        continue
                    payload = json_or_none(data)
                    if isinstance(payload, dict):
                        frames.append(payload)
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value[:1] == b" " else value)
        return frames


SKIPPED: dict[str, Any] = {}  # a frame the decoder counted but did not parse


class WorkflowEvents:
    """Accumulates a workflow stream; `feed` returns True at the terminal event."""

    # Never read: ids come from workflow_started, prices from node_finished, outputs from workflow_finished.
    SKIP = ("node_started", "text_chunk", "text_replace", "iteration_started", "iteration_next", "loop_started",
            "loop_next", "parallel_branch_started", "agent_log")

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.task_id: str | None = None
        self.finished: dict[str, Any] | None = None
        self.error_event: dict[str, Any] | None = None
        self.price: Decimal | None = None
        self.currency: str | None = None

    def ids(self) -> dict[str, Any]:
        return {k: v for k, v in (("workflow_run_id", self.run_id), ("task_id", self.task_id)) if v}

    def feed(self, event: dict[str, Any]) -> bool:
        name = event.get("event")
        data = as_dict(event.get("data"))
        started_id = data.get("id") if name == "workflow_started" else None
        self.run_id = self.run_id or event.get("workflow_run_id") or started_id
        self.task_id = self.task_id or event.get("task_id")
        if name == "node_finished":
            self._add_price(data.get("execution_metadata"))
        elif name in ("workflow_finished", "workflow_paused"):
            self.finished = {**data, "status": "paused"} if name == "workflow_paused" else data
            return True
        elif name == "error":
            self.error_event = event
            return True
        return False

    def _add_price(self, metadata: Any) -> None:
        if not isinstance(metadata, dict) or metadata.get("total_price") in (None, ""):
            return
        try:
            self.price = (self.price or Decimal(0)) + Decimal(str(metadata["total_price"]))
        except InvalidOperation:
            return
        self.currency = self.currency or metadata.get("currency")

    def result(self) -> RunResult:
        assert self.finished is not None
        price = float(self.price) if self.price is not None else None
        return workflow_result(self.finished, run_id=self.run_id, task_id=self.task_id, price=price,
                               currency=self.currency)


class MessageEvents:
    """Accumulates a chat / completion / chatflow stream; `feed` returns True at `message_end` or `error`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.parts: list[str] = []
        self.metadata: dict[str, Any] | None = None
        self.error_event: dict[str, Any] | None = None
        self.workflow_failed: dict[str, Any] | None = None
        self.conversation_id: str | None = None
        self.message_id: str | None = None
        self.task_id: str | None = None
        self.run_id: str | None = None

    def ids(self) -> dict[str, Any]:
        pairs = (("conversation_id", self.conversation_id), ("message_id", self.message_id),
                 ("task_id", self.task_id), ("workflow_run_id", self.run_id))
        return {k: v for k, v in pairs if v}

    def feed(self, event: dict[str, Any]) -> bool:
        name = event.get("event")
        self.conversation_id = self.conversation_id or event.get("conversation_id") or None
        self.message_id = self.message_id or event.get("message_id") or None
        self.task_id = self.task_id or event.get("task_id") or None
        self.run_id = self.run_id or event.get("workflow_run_id") or None
        if name in ("message", "agent_message"):
            self.parts.append(str(event.get("answer") or ""))
        elif name == "message_replace":
            self.parts = [str(event.get("answer") or "")]
        elif name == "message_end":
            self.metadata = as_dict(event.get("metadata"))
            return True
        elif name == "error":
            self.error_event = event
            return True
        elif name == "workflow_finished" and isinstance(event.get("data"), dict):
            if event["data"].get("status") in FAILED_STATUSES:
                self.workflow_failed = event["data"]
        return False

    def result(self, status: str = "succeeded") -> RunResult:
        return message_result("".join(self.parts), self.metadata or {}, status=status, mode=self.mode,
                              conversation_id=self.conversation_id, message_id=self.message_id,
                              task_id=self.task_id, run_id=self.run_id)


def workflow_result(
    data: dict[str, Any], *, run_id: str | None = None, task_id: str | None = None, price: float | None = None,
    currency: str | None = None,
) -> RunResult:
    outputs = data.get("outputs")
    if isinstance(outputs, str):  # some versions store / return outputs as a JSON string
        outputs = json_or_none(outputs.encode()) if outputs else {}
    if outputs is not None and not isinstance(outputs, dict):
        outputs = {"output": outputs}
    if price is None and data.get("total_price") not in (None, ""):
        price = to_float(data.get("total_price"))
    return RunResult(
        status=str(data.get("status") or "unknown"), outputs=outputs or {}, error=data.get("error") or None,
        workflow_run_id=data.get("id") or run_id, task_id=task_id, elapsed_s=to_float(data.get("elapsed_time")),
        total_tokens=to_int(data.get("total_tokens")), total_price=price, currency=currency or data.get("currency"),
    )


def message_result(
    answer: str, metadata: dict[str, Any], *, status: str, mode: str, conversation_id: str | None,
    message_id: str | None, task_id: str | None, run_id: str | None = None,
) -> RunResult:
    usage = as_dict(metadata.get("usage"))
    resources = metadata.get("retriever_resources")
    return RunResult(
        status=status, outputs={"answer": answer}, workflow_run_id=run_id, task_id=task_id,
        elapsed_s=to_float(usage.get("latency")), total_tokens=to_int(usage.get("total_tokens")),
        total_price=to_float(usage.get("total_price")), currency=usage.get("currency"),
        conversation_id=(conversation_id or None) if mode == "chat" else None, message_id=message_id,
        usage=dict(usage), retriever_resources=list(resources) if isinstance(resources, list) else None,
    )


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def to_float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def to_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
