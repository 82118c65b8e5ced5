"""A local Dify Service API (Starlette app) that behaves like the real server, quirks included.

Owns the simulated state (runs, conversations, uploads, end users, request records), latency and fault
injection, and `SimulatorServer`, a real uvicorn server in a thread for tests, `demo`, `simulate` and benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import mimetypes
import random
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:  # uvicorn is imported when a server starts: it pulls in click, which only cli.py may load
    import uvicorn

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

APP_MODES = ("workflow", "chat", "advanced-chat", "agent-chat", "completion")
CHAT_MODES = ("chat", "advanced-chat", "agent-chat")
FAULT_KINDS = (
    "429", "too_many_400", "500", "502_html", "completion_error", "failed_run",
    "drop_stream", "error_event", "stall", "stall_midrun", "rate_limit_error",
)  # fmt: skip
# Faults answered with an HTTP error before any run exists (both response modes).
PRE_RUN_FAULTS = ("429", "too_many_400", "500", "502_html", "completion_error", "rate_limit_error")
DEFAULT_WORKFLOW_ID = "5d8a3c3e-6f0b-4d8e-9a52-7f1c2b9e4a10"
APP_ID = "0b7c1f3a-2d4e-4c6b-8a9f-1e2d3c4b5a69"
# Price of the one LLM node of every run (and of every chat/completion message), as Dify reports it.
RUN_PRICE = "0.000123"
_LN_P99 = 2.326  # z-score of the 99th percentile


@dataclass
class Latency:
    """How long each run / message takes server-side."""

    kind: str = "fixed"  # fixed | uniform | lognormal
    a: float = 0.0  # fixed: seconds; uniform: min; lognormal: median
    b: float = 0.0  # uniform: max; lognormal: p99

    def sample(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "lognormal":
            sigma = (math.log(self.b) - math.log(self.a)) / _LN_P99
            return rng.lognormvariate(math.log(self.a), sigma)
        return self.a


_LATENCY_HELP = "expected SECONDS, fixed:SECONDS, uniform:MIN,MAX or lognormal:MEDIAN,P99"


def parse_latency(text: str) -> Latency:
    """Parse "0.2", "fixed:0.2", "uniform:0.1,0.5" or "lognormal:0.5,8"."""
    spec = str(text).strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        kind, rest = "fixed", spec
    kind = kind.strip().lower()
    try:
        numbers = [float(part) for part in rest.split(",")]
    except ValueError:
        raise ValueError(f"invalid latency {text!r}: {_LATENCY_HELP}") from None
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise ValueError(f"invalid latency {text!r}: seconds must be finite and >= 0")
    if kind == "fixed" and len(numbers) == 1:
        return Latency("fixed", numbers[0])
    if kind in ("uniform", "lognormal") and len(numbers) == 2:
        low, high = numbers
        if high < low:
            raise ValueError(f"invalid latency {text!r}: the second number must be >= the first")
        if kind == "lognormal" and low <= 0:
            raise ValueError(f"invalid latency {text!r}: the lognormal median must be > 0")
        return Latency(kind, low, high)
    raise ValueError(f"invalid latency {text!r}: {_LATENCY_HELP}")


@dataclass
class FaultRule:
    """One injected failure: which kind, how often, for which requests, how many times per request content."""

    kind: str
    probability: float = 1.0
    match: str | None = None
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be between 0 and 1, got {self.probability}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"fault times must be >= 1, got {self.times}")


def parse_fault(text: str) -> FaultRule:
    """Parse "KIND", "KIND:0.1", "KIND:0.1:match=MARKER", "KIND:1:match=X:times=2" (options in any order)."""
    parts = str(text).strip().split(":")
    options: dict[str, str] = {}
    probability = 1.0
    rest = parts[1:]
    try:
        if rest and "=" not in rest[0]:
            probability = float(rest.pop(0))
        key = None
        for part in rest:
            name, eq, value = part.partition("=")
            if eq and name.strip() in ("match", "times"):
                key = name.strip()
                options[key] = value
            elif key == "match":  # the marker itself contained ":"
                options["match"] += ":" + part
            else:
                raise ValueError(f"unknown option {part!r}")
        times = int(options["times"]) if "times" in options else None
        return FaultRule(parts[0].strip(), probability, options.get("match") or None, times)
    except ValueError as exc:
        raise ValueError(
            f"invalid fault {text!r}: {exc} (expected KIND[:PROBABILITY][:match=TEXT][:times=N])"
        ) from None


def _default_input_form() -> list[dict[str, Any]]:
    text = {"variable": "text", "label": "Text", "type": "text-input", "required": True, "max_length": 200}
    return [{"text-input": {**text, "default": "", "options": []}}]


@dataclass
class SimConfig:
    """Everything that shapes the simulated app; `from_file` reads the same keys from JSON or TOML."""

    api_key: str = "app-simulator-key"
    app_mode: str = "workflow"
    app_name: str = "Simulated app"
    input_form: list[dict[str, Any]] = field(default_factory=_default_input_form)
    latency: Latency = field(default_factory=Latency)
    max_active_requests: int = 0
    cap_style: str = "429"
    faults: list[FaultRule] = field(default_factory=list)
    seed: int = 0
    ping_interval: float = 10.0
    hidden_rejection_seconds: float = 300.0
    workflow_id: str = DEFAULT_WORKFLOW_ID
    end_user_race: bool = True
    upload_limit_mb: int = 15
    # The real server keeps the connection open ~1 s after the terminal event; 0 closes at once.
    linger_after_terminal: float = 0.0
    # The app's "file upload" feature (chat/completion message files), as /parameters reports it; None = off.
    file_upload: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.latency = _to_latency(self.latency)
        self.faults = [_to_fault(item) for item in self.faults]
        if self.app_mode not in APP_MODES:
            raise ValueError(f"unknown app_mode {self.app_mode!r}; expected one of: {', '.join(APP_MODES)}")
        if self.cap_style not in ("429", "400"):
            raise ValueError(f"cap_style must be '429' or '400', got {self.cap_style!r}")
        if self.max_active_requests < 0:
            raise ValueError("max_active_requests must be >= 0")
        _form_fields(self.input_form)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown simulator setting(s): {', '.join(unknown)}")
        values = dict(data)
        if "cap_style" in values:
            values["cap_style"] = str(values["cap_style"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> SimConfig:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"simulator config must be .json or .toml: {path}")
        if not isinstance(data, dict):
            raise ValueError(f"simulator config must be an object/table: {path}")
        return cls.from_dict(data)


def _to_latency(value: Any) -> Latency:
    if isinstance(value, Latency):
        return value
    if isinstance(value, dict):
        return Latency(**value)
    return parse_latency(str(value))


def _to_fault(value: Any) -> FaultRule:
    if isinstance(value, FaultRule):
        return value
    if isinstance(value, dict):
        return FaultRule(**value)
    return parse_fault(str(value))


def _form_fields(input_form: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(type, spec) per Start-node variable of a `/parameters`-shaped user_input_form."""
    result = []
    for item in input_form:
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"input_form items must be one-key objects like {{'text-input': {{...}}}}: {item!r}")
        ((kind, spec),) = item.items()
        if not isinstance(spec, dict) or not spec.get("variable"):
            raise ValueError(f"input_form item needs a 'variable': {item!r}")
        result.append((str(spec.get("type") or kind), spec))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Deterministic answers (tests compute expected values with these)
# ----------------------------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "|".join(_show(item) for item in value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _describe(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in sorted(inputs.items()) if v is not None and v != "")


def workflow_outputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs of a workflow run for `inputs` as the server sees them (form variables only, files as names/urls)."""
    body = _describe(inputs)
    return {"text": f"Processed: {body}", "length": len(body)}


def chat_answer(query: str, turn: int, inputs: dict[str, Any], files: list[str] | tuple[str, ...] = ()) -> str:
    answer = f"[turn {turn}] You said: {query}"
    body = _describe(inputs)
    if body:
        answer += f" | inputs: {body}"
    if files:
        answer += f" | files: {', '.join(files)}"
    return answer


def completion_answer(query: str, inputs: dict[str, Any], files: list[str] | tuple[str, ...] = ()) -> str:
    answer = f"Completion: {query}" if query else "Completion:"
    body = _describe(inputs)
    if body:
        answer += f" | inputs: {body}"
    if files:
        answer += f" | files: {', '.join(files)}"
    return answer


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


# ----------------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------------

RUN_ENDPOINTS = ("/workflows/run", "/workflows/{workflow_id}/run", "/chat-messages", "/completion-messages")


@dataclass(eq=False)
class RequestRecord:
    """One request as the server saw it. `outcome`: succeeded | failed | stopped | dropped (stream ended early,
    client gone or drop_stream) | rejected (hidden streaming rejection) | stalled | error (in-band error event) |
    ok (non-run 2xx) | the HTTP status as text for error answers ("400", "429", ...)."""

    endpoint: str
    method: str
    started: float
    inputs: dict[str, Any] | None = None
    query: str | None = None
    user: str | None = None
    response_mode: str | None = None
    conversation_id: str | None = None
    outcome: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    status_code: int | None = None
    ended: float | None = None
    fault: str | None = None
    error: str | None = None
    end_user_id: str | None = None


class _Ctx:
    """Bookkeeping of one run/message request while it holds resources (slot, first-user window)."""

    __slots__ = ("record", "end_user", "first_user", "slot", "wake", "disconnected", "fault", "task")

    def __init__(self, record: RequestRecord, end_user: str, first_user: str | None) -> None:
        self.record = record
        self.end_user = end_user
        self.first_user = first_user
        self.slot = False
        self.wake = asyncio.Event()
        self.disconnected = False
        self.fault: str | None = None
        self.task: _Task | None = None


class _Task:
    """One run or message in progress server-side; finishes on its own timer whatever the client does."""

    __slots__ = (
        "task_id", "run_id", "message_id", "conversation_id", "end_user", "user", "streaming", "planned",
        "status", "error", "latency", "started", "deadline", "created_at", "finished_at", "elapsed", "timer",
        "finished", "listener", "inputs", "outputs", "answer", "run", "prompt_tokens", "completion_tokens", "nodes",
    )  # fmt: skip

    def __init__(self, ctx: _Ctx, latency: float, streaming: bool) -> None:
        self.task_id = str(uuid.uuid4())
        self.run_id: str | None = None
        self.message_id: str | None = None
        self.conversation_id: str | None = None
        self.end_user = ctx.end_user
        self.user = ctx.record.user or ""
        self.streaming = streaming
        self.planned = "succeeded"
        self.status = "running"
        self.error: str | None = None
        self.latency = latency
        self.started = time.monotonic()
        self.deadline = self.started + latency
        self.created_at = int(time.time())
        self.finished_at: int | None = None
        self.elapsed = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False
        self.listener: _Ctx | None = ctx
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.answer = ""
        self.run: dict[str, Any] | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.nodes: dict[str, str] = {}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + (self.completion_tokens if self.status == "succeeded" else 0)


class Simulator:
    """State and records of one simulated app. Mutated only on the server's event loop; safe to read elsewhere."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.requests: list[RequestRecord] = []
        self.runs: dict[str, dict[str, Any]] = {}
        self.conversations: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.end_users: dict[str, list[str]] = {}  # user value -> end-user ids; the first one is what it resolves to
        self.in_flight = 0
        self.max_in_flight = 0
        self._form = _form_fields(self.config.input_form)
        self._tasks: dict[str, _Task] = {}
        self._first_pending: set[str] = set()
        self._fault_hits: dict[tuple[int, str], int] = {}
        self._active: set[_Ctx] = set()
        self._closing = False
        self._app: Starlette | None = None

    @property
    def app(self) -> Starlette:
        if self._app is None:
            self._app = create_app(self)
        return self._app

    def count(self, endpoint: str | None = None, outcome: str | None = None) -> int:
        if endpoint is not None and not endpoint.startswith("/"):
            endpoint = "/" + endpoint
        return sum(
            1
            for rec in list(self.requests)
            if (endpoint is None or rec.endpoint == endpoint) and (outcome is None or rec.outcome == outcome)
        )

    def runs_for(self, text: str) -> int:
        """Run/message POSTs (any outcome) whose inputs or query contain `text`: what a row cost."""
        return sum(
            1
            for rec in list(self.requests)
            if rec.endpoint in RUN_ENDPOINTS and text in _haystack(rec.inputs, rec.query)
        )

    def reset_records(self) -> None:
        self.requests = []
        self.max_in_flight = self.in_flight

    # -- bookkeeping used by the HTTP layer ------------------------------------------------------------------

    def _record(self, method: str, endpoint: str) -> RequestRecord:
        rec = RequestRecord(endpoint=endpoint, method=method, started=time.monotonic())
        self.requests.append(rec)
        return rec

    def _end_user(self, value: str, hold_first: bool) -> tuple[str, bool]:
        """Resolve `user` to an end-user id, reproducing the race: a value still in its first request is unknown."""
        ids = self.end_users.get(value)
        if ids is None:
            end_user = str(uuid.uuid4())
            self.end_users[value] = [end_user]
            if hold_first:
                self._first_pending.add(value)
            return end_user, hold_first
        if self.config.end_user_race and value in self._first_pending:
            end_user = str(uuid.uuid4())
            ids.append(end_user)
            return end_user, False
        return ids[0], False

    def _open_ctx(self, record: RequestRecord, user: str) -> _Ctx:
        end_user, first = self._end_user(user, hold_first=True)
        record.end_user_id = end_user
        ctx = _Ctx(record, end_user, user if first else None)
        self._active.add(ctx)
        return ctx

    def _close_ctx(self, ctx: _Ctx) -> None:
        if ctx.slot:
            self.in_flight -= 1
            ctx.slot = False
        if ctx.first_user is not None:
            self._first_pending.discard(ctx.first_user)
            ctx.first_user = None
        if ctx.task is not None and ctx.task.listener is ctx:
            ctx.task.listener = None
        self._active.discard(ctx)
        ctx.record.ended = time.monotonic()

    def _take_slot(self, ctx: _Ctx) -> bool:
        cap = self.config.max_active_requests
        if cap and self.in_flight >= cap:
            return False
        self.in_flight += 1
        ctx.slot = True
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return True

    def _pick_fault(self, inputs: dict[str, Any] | None, query: str | None) -> str | None:
        if not self.config.faults:
            return None
        haystack = _haystack(inputs, query)
        content = json.dumps([inputs, query], sort_keys=True, default=str)
        for index, rule in enumerate(self.config.faults):
            if rule.match and rule.match not in haystack:
                continue
            key = (index, content)
            if rule.times is not None and self._fault_hits.get(key, 0) >= rule.times:
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            self._fault_hits[key] = self._fault_hits.get(key, 0) + 1
            return rule.kind
        return None

    def _schedule(self, task: _Task) -> None:
        self._tasks[task.task_id] = task
        loop = asyncio.get_running_loop()
        task.timer = loop.call_later(max(0.0, task.deadline - time.monotonic()), self._finish_task, task)

    def _finish_task(self, task: _Task) -> None:
        if task.finished:
            return
        task.finished = True
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None
        task.status = task.planned
        task.elapsed = round(time.monotonic() - task.started, 6)
        task.finished_at = int(time.time())
        self._tasks.pop(task.task_id, None)
        if task.run is not None:
            ok = task.status == "succeeded"
            task.run.update(
                status=task.status, outputs=task.outputs if ok else {}, error=task.error,
                total_steps=3 if ok else 2, total_tokens=task.total_tokens,
                finished_at=task.finished_at, elapsed_time=task.elapsed,
            )  # fmt: skip
        if task.listener is not None:
            task.listener.wake.set()

    def _stop_task(self, task_id: str, end_user: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or not task.streaming or task.end_user != end_user:
            return
        task.planned, task.error = "stopped", None
        self._finish_task(task)

    def _finish_due_tasks(self) -> None:
        now = time.monotonic()
        for task in [t for t in self._tasks.values() if t.deadline <= now]:
            self._finish_task(task)

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """A (re)started server: runs that were in progress keep running on the new loop."""
        self._closing = False
        for task in list(self._tasks.values()):
            delay = max(0.0, task.deadline - time.monotonic())
            task.timer = loop.call_later(delay, self._finish_task, task)

    def _begin_close(self) -> None:
        self._closing = True
        for ctx in list(self._active):
            ctx.wake.set()


def _haystack(inputs: dict[str, Any] | None, query: str | None) -> str:
    values = [query or ""]
    for value in (inputs or {}).values():
        values.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))
    return "\n".join(values)


# ----------------------------------------------------------------------------------------------------------------
# HTTP layer
# ----------------------------------------------------------------------------------------------------------------

PING = b"event: ping\n\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_HTML_PAGE = (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Dify</title></head>'
    '<body><div id="__next"></div><script src="/_next/static/chunks/main.js"></script></body></html>'
)
_NGINX = "<html>\r\n<head><title>{0}</title></head>\r\n<body>\r\n<center><h1>{0}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"  # noqa: E501
_TOO_MANY = "Too many requests. Please try again later. The maximum concurrent requests allowed is {}."
_COMPLETION_ERROR = "[openai] Error: APITimeoutError: Request timed out."
_RATE_LIMIT = "[openai] Rate Limit Error, Error code: 429 - Rate limit reached for requests"
_NODE_FAILED = "Node LLM run failed: [openai] Error: Error code: 500 - The server had an error processing your request."
_FILE_MISMATCH = "Detected file type does not match the specified type. Please verify the file."
_MODE_MISMATCH = "Please check if your app mode matches the right API route."
_SERVER_ERROR = (
    "The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application."
)
_NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually please check your spelling "
    "and try again."
)
_FILE_TYPES = {
    "image": ("jpg", "jpeg", "png", "webp", "gif", "svg"),
    "audio": ("mp3", "m4a", "wav", "amr", "mpga"),
    "video": ("mp4", "mov", "mpeg", "webm"),
    "document": (
        "txt", "md", "markdown", "mdx", "pdf", "html", "htm", "xlsx", "xls", "vtt", "properties",
        "doc", "docx", "csv", "eml", "msg", "pptx", "ppt", "xml", "epub", "json",
    ),
}  # fmt: skip
_EXT_TYPE = {ext: kind for kind, exts in _FILE_TYPES.items() for ext in exts}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj).encode(), status_code=status, media_type="application/json")


def _frame(obj: dict[str, Any]) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()


class _ApiError(Exception):
    """An answer other than success; `html` for gateway-style pages."""

    def __init__(self, status: int, code: str = "", message: str = "", html: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.html = status, code, message, html

    def response(self) -> Response:
        if self.html is not None:
            return Response(self.html, status_code=self.status, media_type="text/html")
        return _json({"code": self.code, "message": self.message, "status": self.status}, self.status)


def _invalid(message: str) -> _ApiError:
    return _ApiError(400, "invalid_param", message)


def _payload_error(model: str, name: str, problem: str) -> _ApiError:
    return _invalid(f"1 validation error for {model}\n{name}\n  {problem}")


def _gateway(status: int, title: str) -> _ApiError:
    return _ApiError(status, html=_NGINX.format(f"{status} {title}"))


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _pieces(text: str, count: int = 3) -> list[str]:
    size = max(1, math.ceil(len(text) / count))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


@dataclass
class _Args:
    inputs: dict[str, Any]
    query: str
    files: list[Any]
    streaming: bool
    conversation_id: str | None = None


class _Api:
    """Routes, validation and answer shapes; all state lives in the Simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.cfg = sim.config
        self.routes: list[tuple[str, list[str], str, _Handler]] = [
            ("POST", ["workflows", "run"], "/workflows/run", self.run_workflow),
            ("POST", ["workflows", "*", "run"], "/workflows/{workflow_id}/run", self.run_workflow),
            ("GET", ["workflows", "run", "*"], "/workflows/run/{workflow_run_id}", self.get_run),
            ("POST", ["workflows", "tasks", "*", "stop"], "/workflows/tasks/{task_id}/stop", self.stop),
            ("POST", ["chat-messages"], "/chat-messages", self.chat),
            ("POST", ["chat-messages", "*", "stop"], "/chat-messages/{task_id}/stop", self.stop),
            ("POST", ["completion-messages"], "/completion-messages", self.completion),
            ("POST", ["completion-messages", "*", "stop"], "/completion-messages/{task_id}/stop", self.stop),
            ("POST", ["files", "upload"], "/files/upload", self.upload),
            ("GET", ["parameters"], "/parameters", self.parameters),
            ("GET", ["info"], "/info", self.info),
            ("GET", ["meta"], "/meta", self.meta),
            ("GET", ["messages"], "/messages", self.messages),
        ]

    # -- routing and auth ------------------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        path = request.url.path
        if path != "/v1" and not path.startswith("/v1/"):
            return _outside_api(request.method)
        segments = [s for s in path[3:].split("/") if s]
        allowed = False
        for method, pattern, name, handler in self.routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if method != request.method:
                allowed = True
                continue
            rec = self.sim._record(request.method, name)
            try:
                self._check_auth(request)
                return await handler(request, rec, *params)
            except _ApiError as exc:
                return self._fail(rec, exc)
        rec = self.sim._record(request.method, path[3:] or "/")
        if allowed:
            return self._fail(
                rec, _ApiError(405, "method_not_allowed", "The method is not allowed for the requested URL.")
            )
        return self._fail(rec, _ApiError(404, "not_found", _NOT_FOUND))

    def _check_auth(self, request: Request) -> None:
        header = request.headers.get("authorization")
        parts = header.split(None, 1) if header else []
        if len(parts) < 2:
            raise _ApiError(401, "unauthorized", "Authorization header must be provided and start with 'Bearer'")
        if parts[0].lower() != "bearer":
            raise _ApiError(401, "unauthorized", "Authorization scheme must be 'Bearer'")
        if parts[1].strip() != self.cfg.api_key:
            raise _ApiError(401, "unauthorized", "Access token is invalid")

    def _fail(self, rec: RequestRecord, exc: _ApiError) -> Response:
        rec.status_code, rec.error = exc.status, exc.message or None
        rec.outcome = rec.outcome if rec.outcome in ("stalled", "failed") else str(exc.status)
        rec.ended = time.monotonic()
        return exc.response()

    def _ok(self, rec: RequestRecord, body: Any, status: int = 200, outcome: str = "ok") -> Response:
        rec.status_code, rec.outcome, rec.ended = status, outcome, time.monotonic()
        return _json(body, status)

    # -- run / message endpoints -----------------------------------------------------------------------------

    async def run_workflow(self, request: Request, rec: RequestRecord, workflow_id: str | None = None) -> Response:
        return await self._run(request, rec, "workflow", workflow_id)

    async def chat(self, request: Request, rec: RequestRecord) -> Response:
        return await self._run(request, rec, "chat", None)

    async def completion(self, request: Request, rec: RequestRecord) -> Response:
        return await self._run(request, rec, "completion", None)

    async def _run(self, request: Request, rec: RequestRecord, kind: str, workflow_id: str | None) -> Response:
        body = await _json_body(request)
        _fill_record(rec, body)
        ctx = self.sim._open_ctx(rec, _user_arg(body))
        streamed = False
        try:
            self._check_mode(kind)
            args = _parse_args(kind, body)
            if workflow_id is not None:
                self._check_workflow_id(workflow_id)
            if not self.sim._take_slot(ctx):
                raise self._too_many(429 if self.cfg.cap_style == "429" else 400)
            ctx.fault = rec.fault = self.sim._pick_fault(args.inputs, args.query)
            if ctx.fault in PRE_RUN_FAULTS:
                raise self._fault_error(ctx.fault)
            if self.cfg.app_mode == "agent-chat" and not args.streaming:
                raise _invalid("Agent Chat App does not support blocking mode")
            if args.streaming:
                streamed = True
                return _EventStream(self.sim, ctx, self._stream_body(ctx, args))
            return await self._blocking(ctx, args)
        finally:
            if not streamed:
                self.sim._close_ctx(ctx)

    def _check_mode(self, kind: str) -> None:
        mode = self.cfg.app_mode
        if kind == "workflow" and mode != "workflow":
            raise _ApiError(400, "not_workflow_app", _MODE_MISMATCH)
        if kind == "chat" and mode not in CHAT_MODES:
            raise _ApiError(400, "not_chat_app", _MODE_MISMATCH)
        if kind == "completion" and mode != "completion":
            raise _ApiError(400, "app_unavailable", "App unavailable, please check your app configurations.")

    def _check_workflow_id(self, workflow_id: str) -> None:
        if not _is_uuid(workflow_id):
            raise _ApiError(400, "bad_request", f"Invalid workflow_id format: '{workflow_id}'. ")
        if workflow_id != self.cfg.workflow_id:
            raise _ApiError(404, "not_found", f"Workflow not found with id: {workflow_id}")

    def _too_many(self, status: int) -> _ApiError:
        message = _TOO_MANY.format(self.cfg.max_active_requests or 10)
        return _ApiError(status, "too_many_requests" if status == 429 else "invalid_param", message)

    def _fault_error(self, kind: str) -> _ApiError:
        if kind in ("429", "too_many_400"):
            return self._too_many(429 if kind == "429" else 400)
        if kind == "500":
            return _ApiError(500, "internal_server_error", _SERVER_ERROR)
        if kind == "502_html":
            return _gateway(502, "Bad Gateway")
        if kind == "rate_limit_error":
            return _ApiError(429, "rate_limit_error", _RATE_LIMIT)
        return _ApiError(400, "completion_request_error", _COMPLETION_ERROR)

    async def _blocking(self, ctx: _Ctx, args: _Args) -> Response:
        rec = ctx.record
        if ctx.fault == "stall":
            rec.outcome = "stalled"
            await self._wait(ctx, self.cfg.hidden_rejection_seconds)
            raise _gateway(504, "Gateway Time-out")
        task = self._accept(ctx, args)
        if ctx.fault == "error_event":
            rec.outcome = "failed"
            raise _ApiError(400, "completion_request_error", _COMPLETION_ERROR)
        if ctx.fault == "stall_midrun":
            task.listener, rec.outcome = None, "stalled"
            await self._wait(ctx, self.cfg.hidden_rejection_seconds)
            raise _gateway(504, "Gateway Time-out")
        await self._wait(ctx, None, until_done=True)
        if not task.finished:  # the server is shutting down under the request
            raise _gateway(502, "Bad Gateway")
        if self.cfg.app_mode == "workflow":
            body = {"task_id": task.task_id, "workflow_run_id": task.run_id, "data": self._run_data(task)}
            return self._ok(rec, body, outcome=task.status)
        if task.status == "failed":
            rec.outcome = "failed"
            raise self._message_failure(task)
        return self._ok(rec, self._blocking_message(task), outcome=task.status)

    def _message_failure(self, task: _Task) -> _ApiError:
        if self.cfg.app_mode == "advanced-chat":
            return _invalid(f"Run failed: {task.error}")
        return _ApiError(400, "completion_request_error", task.error or _COMPLETION_ERROR)

    async def _wait(self, ctx: _Ctx, seconds: float | None, until_done: bool = False) -> None:
        async for _ in self._ticks(ctx, seconds, pings=False, until_done=until_done):
            pass

    async def _ticks(
        self, ctx: _Ctx, seconds: float | None, pings: bool = True, until_done: bool = False
    ) -> AsyncIterator[bytes]:
        """Wait for `seconds` (None: no limit), or until the run ends if `until_done`; stop early if the client
        leaves or the server closes. Yields a ping every ping_interval when `pings`."""
        deadline = math.inf if seconds is None else time.monotonic() + seconds
        interval = self.cfg.ping_interval if pings and self.cfg.ping_interval > 0 else math.inf
        while not (self._interrupted(ctx) or (until_done and ctx.task is not None and ctx.task.finished)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            timeout = min(remaining, interval)
            ctx.wake.clear()
            try:
                await asyncio.wait_for(ctx.wake.wait(), None if timeout == math.inf else timeout)
            except TimeoutError:
                if timeout < remaining:
                    yield PING

    def _interrupted(self, ctx: _Ctx) -> bool:
        return ctx.disconnected or self.sim._closing

    # -- accepting a request: validation, conversation, task -------------------------------------------------

    def _accept(self, ctx: _Ctx, args: _Args) -> _Task:
        """Validate like the app generator does and start the run; raises _ApiError (hidden when streaming)."""
        mode = self.cfg.app_mode
        conversation = None
        if mode in CHAT_MODES and args.conversation_id:
            conversation = self.sim.conversations.get(args.conversation_id)
            if conversation is None or conversation["end_user_id"] != ctx.end_user:
                raise _ApiError(404, "not_found", "Conversation Not Exists.")
            inputs = conversation["inputs"]  # like Dify: later turns reuse the conversation's first inputs
        else:
            inputs = self._validate_inputs(args.inputs, ctx.end_user)
        files = [self._file_name(item, {"variable": "files"}, ctx.end_user) for item in args.files]
        latency = 0.0 if ctx.fault == "error_event" else self.cfg.latency.sample(self.sim.rng)
        task = _Task(ctx, latency, args.streaming)
        task.inputs = inputs
        ctx.task = task
        ctx.record.task_id = task.task_id
        if ctx.fault in ("failed_run", "error_event"):
            task.planned = "failed"
            task.error = _NODE_FAILED if ctx.fault == "failed_run" else _COMPLETION_ERROR
        if mode == "workflow":
            self._prepare_workflow(task)
        else:
            self._prepare_message(task, args, files, conversation)
        if ctx.fault == "error_event":
            self.sim._finish_task(task)
        else:
            self.sim._schedule(task)
        return task

    def _prepare_workflow(self, task: _Task) -> None:
        task.outputs = workflow_outputs(task.inputs)
        task.prompt_tokens = 20 + _tokens(_describe(task.inputs))
        task.completion_tokens = _tokens(task.outputs["text"])
        self._new_run(task)

    def _prepare_message(self, task: _Task, args: _Args, files: list[str], conversation: dict[str, Any] | None) -> None:
        mode = self.cfg.app_mode
        task.message_id = str(uuid.uuid4())
        if mode == "completion":
            task.answer = completion_answer(args.query, task.inputs, files)
        else:
            if conversation is None:
                conversation = self._new_conversation(task)
            conversation["turns"] += 1
            task.conversation_id = conversation["id"]
            task.answer = chat_answer(args.query, conversation["turns"], task.inputs, files)
        task.prompt_tokens = 20 + _tokens(args.query + _describe(task.inputs))
        task.completion_tokens = _tokens(task.answer)
        if task.planned == "failed" and mode != "advanced-chat":
            task.error = _COMPLETION_ERROR
        if mode == "advanced-chat":
            task.outputs = {"answer": task.answer}
            self._new_run(task)

    def _new_conversation(self, task: _Task) -> dict[str, Any]:
        conversation: dict[str, Any] = {
            "id": str(uuid.uuid4()), "end_user_id": task.end_user, "user": task.user,
            "inputs": task.inputs, "turns": 0, "created_at": task.created_at,
        }  # fmt: skip
        self.sim.conversations[conversation["id"]] = conversation
        return conversation

    def _new_run(self, task: _Task) -> None:
        task.run_id = str(uuid.uuid4())
        task.nodes = {node: str(uuid.uuid4()) for node in ("start", "llm", "end")}
        task.run = {
            "id": task.run_id, "workflow_id": self.cfg.workflow_id, "status": "running", "inputs": task.inputs,
            "outputs": {}, "error": None, "total_steps": 0, "total_tokens": 0, "created_at": task.created_at,
            "finished_at": None, "elapsed_time": 0.0, "task_id": task.task_id, "user": task.user,
            "end_user_id": task.end_user, "conversation_id": task.conversation_id, "message_id": task.message_id,
        }  # fmt: skip
        self.sim.runs[task.run_id] = task.run
        if task.listener is not None:
            task.listener.record.run_id = task.run_id

    def _validate_inputs(self, raw: dict[str, Any], end_user: str) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        for kind, spec in self.sim._form:
            value = _check_value(kind, spec, raw.get(spec["variable"]))
            if kind == "file" and isinstance(value, dict):
                value = self._file_name(value, spec, end_user)
            elif kind == "file-list" and isinstance(value, list):
                value = [self._file_name(item, spec, end_user) for item in value]
            shown[spec["variable"]] = value
        return shown

    def _file_name(self, obj: Any, spec: dict[str, Any], end_user: str) -> str:
        """Check one file object like Dify's file factory; return the name (upload) or url the run sees."""
        if not isinstance(obj, dict):
            raise _invalid(f"{spec['variable']} in input form must be a file")
        method = obj.get("transfer_method")
        if method == "local_file":
            upload_id = obj.get("upload_file_id")
            if not upload_id:
                raise _invalid("Invalid upload file id")
            if not _is_uuid(upload_id):
                raise _invalid("Invalid upload file id format")
            upload = self.sim.uploads.get(str(upload_id))
            if upload is None or upload["created_by"] != end_user:
                raise _invalid("Invalid upload file")
            name, extension = upload["name"], upload["extension"]
        elif method == "remote_url":
            name = obj.get("url") or obj.get("remote_url")
            if not name:
                raise _invalid("Invalid file url")
            extension = _extension(str(name).split("?")[0].split("#")[0])
        else:
            raise _invalid(f"Invalid transfer method: {method}")
        _check_file_type(obj.get("type"), extension, spec, method, str(name))
        return str(name)

    # -- streaming -------------------------------------------------------------------------------------------

    def _stream_body(self, ctx: _Ctx, args: _Args) -> AsyncGenerator[bytes, None]:
        if ctx.fault == "stall":
            return self._stall(ctx)
        try:
            task = self._accept(ctx, args)
        except _ApiError as exc:
            return self._hidden_rejection(ctx, exc)
        if self.cfg.app_mode == "workflow":
            return self._workflow_stream(ctx, task)
        return self._message_stream(ctx, task)

    async def _hidden_rejection(self, ctx: _Ctx, exc: _ApiError) -> AsyncGenerator[bytes, None]:
        ctx.record.outcome, ctx.record.error = "rejected", exc.message
        yield PING
        await self._wait(ctx, self.cfg.hidden_rejection_seconds)

    async def _stall(self, ctx: _Ctx) -> AsyncGenerator[bytes, None]:
        ctx.record.outcome = "stalled"
        yield PING
        async for ping in self._ticks(ctx, self.cfg.hidden_rejection_seconds):
            yield ping

    async def _stall_midrun(self, ctx: _Ctx, task: _Task) -> AsyncGenerator[bytes, None]:
        task.listener, ctx.record.outcome = None, "stalled"
        async for ping in self._ticks(ctx, self.cfg.hidden_rejection_seconds):
            yield ping

    async def _workflow_stream(self, ctx: _Ctx, task: _Task) -> AsyncGenerator[bytes, None]:
        yield PING
        yield self._wf_frame(task, "workflow_started", self._started_data(task))
        if ctx.fault == "error_event":
            ctx.record.outcome = "error"
            yield self._error_frame(task, "completion_request_error", 400, task.error or "")
            return
        yield self._wf_frame(task, "node_started", self._node_started(task, "start"))
        yield self._wf_frame(task, "node_finished", self._node_finished(task, "start"))
        yield self._wf_frame(task, "node_started", self._node_started(task, "llm"))
        if ctx.fault == "drop_stream":
            task.listener, ctx.record.outcome = None, "dropped"
            return
        if ctx.fault == "stall_midrun":
            async for ping in self._stall_midrun(ctx, task):
                yield ping
            return
        async for ping in self._ticks(ctx, None, until_done=True):
            yield ping
        if self._interrupted(ctx) or not task.finished:
            return
        for frame in self._workflow_tail(task):
            yield frame
        ctx.record.outcome = task.status
        await self._wait(ctx, self.cfg.linger_after_terminal)

    def _workflow_tail(self, task: _Task) -> list[bytes]:
        frames = []
        if task.status == "succeeded":
            for piece in _pieces(task.outputs["text"]):
                data = {"text": piece, "from_variable_selector": ["llm", "text"]}
                frames.append(self._wf_frame(task, "text_chunk", data))
        if task.status != "stopped":
            frames.append(self._wf_frame(task, "node_finished", self._node_finished(task, "llm")))
        if task.status == "succeeded":
            frames.append(self._wf_frame(task, "node_started", self._node_started(task, "end")))
            frames.append(self._wf_frame(task, "node_finished", self._node_finished(task, "end")))
        frames.append(self._wf_frame(task, "workflow_finished", self._finished_data(task)))
        return frames

    async def _message_stream(self, ctx: _Ctx, task: _Task) -> AsyncGenerator[bytes, None]:
        mode = self.cfg.app_mode
        yield PING
        if mode == "advanced-chat":
            yield self._wf_frame(task, "workflow_started", self._started_data(task))
            yield self._wf_frame(task, "node_started", self._node_started(task, "start"))
            yield self._wf_frame(task, "node_finished", self._node_finished(task, "start"))
            yield self._wf_frame(task, "node_started", self._node_started(task, "llm"))
        elif mode == "agent-chat":
            yield self._msg_frame(task, "agent_thought", _agent_thought(task))
        if ctx.fault == "error_event":
            ctx.record.outcome = "error"
            yield self._error_frame(task, "completion_request_error", 400, task.error or "")
            return
        if ctx.fault == "drop_stream" and mode == "advanced-chat":
            task.listener, ctx.record.outcome = None, "dropped"
            return
        if ctx.fault == "stall_midrun":
            async for ping in self._stall_midrun(ctx, task):
                yield ping
            return
        async for ping in self._ticks(ctx, None, until_done=True):
            yield ping
        if self._interrupted(ctx) or not task.finished:
            return
        for frame in self._message_tail(ctx, task):
            yield frame
            if ctx.record.outcome == "dropped":
                return
        ctx.record.outcome = task.status
        await self._wait(ctx, self.cfg.linger_after_terminal)

    def _message_tail(self, ctx: _Ctx, task: _Task) -> list[bytes]:
        advanced = self.cfg.app_mode == "advanced-chat"
        if task.status == "failed":
            frames = [self._wf_frame(task, "workflow_finished", self._finished_data(task))] if advanced else []
            code, message = (
                ("invalid_param", f"Run failed: {task.error}")
                if advanced
                else ("completion_request_error", task.error or _COMPLETION_ERROR)
            )
            return [*frames, self._error_frame(task, code, 400, message)]
        frames = []
        if task.status == "succeeded":
            event = "agent_message" if self.cfg.app_mode == "agent-chat" else "message"
            for piece in _pieces(task.answer):
                frames.append(self._msg_frame(task, event, {"answer": piece, "from_variable_selector": None}))
                if ctx.fault == "drop_stream":
                    ctx.record.outcome = "dropped"
                    return frames
        if advanced and task.status == "succeeded":
            frames.append(self._wf_frame(task, "node_finished", self._node_finished(task, "llm")))
        usage = {"usage": self._usage(task), "retriever_resources": []}
        frames.append(self._msg_frame(task, "message_end", {"metadata": usage, "files": []}))
        if advanced:
            frames.append(self._wf_frame(task, "workflow_finished", self._finished_data(task)))
        return frames

    # -- answer shapes ---------------------------------------------------------------------------------------

    def _wf_frame(self, task: _Task, event: str, data: dict[str, Any]) -> bytes:
        frame: dict[str, Any] = {"event": event}
        if task.conversation_id is not None:
            frame.update(conversation_id=task.conversation_id, message_id=task.message_id, created_at=task.created_at)
        frame.update(task_id=task.task_id, workflow_run_id=task.run_id, data=data)
        return _frame(frame)

    def _msg_frame(self, task: _Task, event: str, extra: dict[str, Any]) -> bytes:
        frame: dict[str, Any] = {"event": event}
        if task.conversation_id is not None:
            frame["conversation_id"] = task.conversation_id
        frame.update(message_id=task.message_id, created_at=task.created_at, task_id=task.task_id, id=task.message_id)
        frame.update(extra)
        return _frame(frame)

    def _error_frame(self, task: _Task, code: str, status: int, message: str) -> bytes:
        frame: dict[str, Any] = {"event": "error"}
        if task.run_id is not None:
            frame["workflow_run_id"] = task.run_id
        if task.conversation_id is not None:
            frame["conversation_id"] = task.conversation_id
        if task.message_id is not None:
            frame.update(message_id=task.message_id, task_id=task.task_id)
        frame.update(code=code, status=status, message=message)
        return _frame(frame)

    def _started_data(self, task: _Task) -> dict[str, Any]:
        inputs = {**task.inputs, "sys.files": [], "sys.user_id": task.user, "sys.app_id": APP_ID}
        inputs.update({"sys.workflow_id": self.cfg.workflow_id, "sys.workflow_run_id": task.run_id})
        return {"id": task.run_id, "workflow_id": self.cfg.workflow_id, "inputs": inputs,
                "created_at": task.created_at, "reason": "initial"}  # fmt: skip

    def _node_started(self, task: _Task, node: str) -> dict[str, Any]:
        node_type, title, index, previous = _NODES[node]
        if node == "end" and task.message_id is not None:
            node_type, title = "answer", "Answer"
        return {"id": task.nodes[node], "node_id": node, "node_type": node_type, "title": title, "index": index,
                "predecessor_node_id": previous, "inputs": None, "created_at": task.created_at, "extras": {},
                "iteration_id": None, "loop_id": None}  # fmt: skip

    def _node_finished(self, task: _Task, node: str) -> dict[str, Any]:
        data = self._node_started(task, node)
        ok = node != "llm" or task.status == "succeeded"
        outputs = {"start": task.inputs, "llm": {"text": task.outputs.get("text", task.answer)}, "end": task.outputs}
        metadata = None
        if node == "llm":
            metadata = {"total_tokens": task.total_tokens, "total_price": RUN_PRICE, "currency": "USD"}
        data.update(process_data=None, outputs=outputs[node] if ok else None, status="succeeded" if ok else "failed",
                    error=None if ok else task.error, elapsed_time=task.elapsed if node == "llm" else 0.001,
                    execution_metadata=metadata, finished_at=task.finished_at or task.created_at, files=[])  # fmt: skip
        return data

    def _run_data(self, task: _Task) -> dict[str, Any]:
        run = task.run or {}
        return {"id": task.run_id, "workflow_id": self.cfg.workflow_id, "status": task.status,
                "outputs": run.get("outputs", {}), "error": task.error, "elapsed_time": task.elapsed,
                "total_tokens": task.total_tokens, "total_steps": run.get("total_steps", 0),
                "created_at": task.created_at, "finished_at": task.finished_at}  # fmt: skip

    def _finished_data(self, task: _Task) -> dict[str, Any]:
        data = self._run_data(task)
        data.update(created_by={"id": task.end_user, "user": task.user}, exceptions_count=0, files=[])
        return data

    def _usage(self, task: _Task) -> dict[str, Any]:
        return {
            "prompt_tokens": task.prompt_tokens, "prompt_unit_price": "0.001", "prompt_price_unit": "0.001",
            "prompt_price": "0.000060", "completion_tokens": task.completion_tokens,
            "completion_unit_price": "0.002", "completion_price_unit": "0.001", "completion_price": "0.000063",
            "total_tokens": task.prompt_tokens + task.completion_tokens, "total_price": RUN_PRICE,
            "currency": "USD", "latency": task.elapsed,
        }  # fmt: skip

    def _blocking_message(self, task: _Task) -> dict[str, Any]:
        body: dict[str, Any] = {"event": "message", "task_id": task.task_id, "id": task.message_id,
                                "message_id": task.message_id}  # fmt: skip
        if task.conversation_id is not None:
            body["conversation_id"] = task.conversation_id
        body.update(mode=self.cfg.app_mode, answer=task.answer, created_at=task.created_at,
                    metadata={"usage": self._usage(task), "retriever_resources": []})  # fmt: skip
        return body

    # -- other endpoints -------------------------------------------------------------------------------------

    async def get_run(self, request: Request, rec: RequestRecord, run_id: str) -> Response:
        if self.cfg.app_mode not in ("workflow", "advanced-chat"):
            raise _ApiError(400, "not_workflow_app", _MODE_MISMATCH)
        self.sim._finish_due_tasks()  # runs whose timer died with a stopped server still end on time
        run = self.sim.runs.get(run_id)
        if run is None:
            raise _ApiError(404, "not_found", "Workflow run not found.")
        rec.run_id = run_id
        keys = ("id", "workflow_id", "status", "inputs", "outputs", "error", "total_steps", "total_tokens",
                "created_at", "finished_at", "elapsed_time")  # fmt: skip
        body = {key: run[key] for key in keys}
        body["inputs"] = _dumps(run["inputs"])
        return self._ok(rec, body)

    async def stop(self, request: Request, rec: RequestRecord, task_id: str) -> Response:
        body = await _json_body(request)
        _fill_record(rec, body)
        end_user, _ = self.sim._end_user(_user_arg(body), hold_first=False)
        rec.end_user_id, rec.task_id = end_user, task_id
        route = rec.endpoint.split("/")[1]
        self._check_mode({"workflows": "workflow", "chat-messages": "chat"}.get(route, "completion"))
        self.sim._stop_task(task_id, end_user)
        return self._ok(rec, {"result": "success"})

    async def upload(self, request: Request, rec: RequestRecord) -> Response:
        async with request.form() as form:
            parts = form.getlist("file")
            user = form.get("user")
            rec.user = user if isinstance(user, str) and user else "DEFAULT-USER"
            if not parts or not isinstance(parts[0], UploadFile):
                raise _ApiError(400, "no_file_uploaded", "Please upload your file.")
            if len(parts) > 1:
                raise _ApiError(400, "too_many_files", "Only one file is allowed.")
            part = parts[0]
            if not part.filename:
                raise _ApiError(400, "filename_not_exists_error", "The specified filename does not exist.")
            content = await part.read()
        if len(content) > self.cfg.upload_limit_mb * 1024 * 1024:
            raise _ApiError(413, "file_too_large", "File size exceeded.")
        end_user, _ = self.sim._end_user(rec.user, hold_first=False)
        rec.end_user_id = end_user
        return self._ok(rec, self._store_upload(part, content, end_user), status=201)

    def _store_upload(self, part: UploadFile, content: bytes, end_user: str) -> dict[str, Any]:
        name = part.filename or ""
        extension = _extension(name)
        mime = part.content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        if mime == "application/octet-stream":
            mime = mimetypes.guess_type(name)[0] or mime
        upload: dict[str, Any] = {"id": str(uuid.uuid4()), "name": name, "size": len(content), "extension": extension,
                  "mime_type": mime, "created_by": end_user, "created_at": int(time.time())}  # fmt: skip
        self.sim.uploads[upload["id"]] = {**upload, "sha256": hashlib.sha256(content).hexdigest()}
        return upload

    async def parameters(self, request: Request, rec: RequestRecord) -> Response:
        return self._ok(rec, _parameters(self.cfg))

    async def info(self, request: Request, rec: RequestRecord) -> Response:
        body = {"name": self.cfg.app_name, "description": "A simulated Dify app (dify-batch simulator).",
                "tags": [], "mode": self.cfg.app_mode, "author_name": "dify-batch"}  # fmt: skip
        return self._ok(rec, body)

    async def meta(self, request: Request, rec: RequestRecord) -> Response:
        return self._ok(rec, {"tool_icons": {}})

    async def messages(self, request: Request, rec: RequestRecord) -> Response:
        """`GET /messages?conversation_id=&user=`: a conversation's history (turn count only here); 404 if unknown."""
        if self.cfg.app_mode not in CHAT_MODES:
            raise _ApiError(400, "not_chat_app", _MODE_MISMATCH)
        rec.user = request.query_params.get("user")
        end_user, _ = self.sim._end_user(rec.user or "", hold_first=False)
        conversation = self.sim.conversations.get(request.query_params.get("conversation_id", ""))
        if conversation is None or conversation["end_user_id"] != end_user:
            raise _ApiError(404, "not_found", "Conversation Not Exists.")
        data = [{"id": f"turn-{n}", "conversation_id": conversation["id"]} for n in range(conversation["turns"])]
        return self._ok(rec, {"limit": 20, "has_more": False, "data": data[-20:]})


_NODES: dict[str, tuple[str, str, int, str | None]] = {
    "start": ("start", "Start", 1, None),
    "llm": ("llm", "LLM", 2, "start"),
    "end": ("end", "End", 3, "llm"),
}


_Handler = Callable[..., Awaitable[Response]]


def _match(pattern: list[str], segments: list[str]) -> list[str] | None:
    if len(pattern) != len(segments):
        return None
    params = []
    for expected, actual in zip(pattern, segments, strict=True):
        if expected == "*":
            params.append(actual)
        elif expected != actual:
            return None
    return params


def _outside_api(method: str) -> Response:
    if method in ("GET", "HEAD"):
        return Response(_HTML_PAGE, media_type="text/html")
    return Response(_NGINX.format("405 Not Allowed"), status_code=405, media_type="text/html")


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _ApiError(
            400, "bad_request", "The browser (or proxy) sent a request that this server could not understand."
        )
    return body


def _fill_record(rec: RequestRecord, body: dict[str, Any]) -> None:
    inputs = body.get("inputs")
    rec.inputs = inputs if isinstance(inputs, dict) else None
    query = body.get("query")
    rec.query = query if isinstance(query, str) else None
    user = body.get("user")
    rec.user = str(user) if user else None
    mode = body.get("response_mode")
    rec.response_mode = mode if isinstance(mode, str) else None
    conversation = body.get("conversation_id")
    rec.conversation_id = conversation if isinstance(conversation, str) and conversation else None


def _user_arg(body: dict[str, Any]) -> str:
    user = body.get("user")
    if not user:
        raise _invalid("Arg user must be provided.")
    return str(user)


def _parse_args(kind: str, body: dict[str, Any]) -> _Args:
    """The request payload checks the controllers do with pydantic (all 400 invalid_param)."""
    model = {"workflow": "WorkflowRunPayload", "chat": "ChatRequestPayload"}.get(kind, "CompletionRequestPayload")
    if "inputs" not in body:
        raise _payload_error(model, "inputs", "Field required")
    if not isinstance(body["inputs"], dict):
        raise _payload_error(model, "inputs", "Input should be a valid dictionary")
    query = body.get("query", None if kind == "chat" else "")
    if query is None and kind == "chat":
        raise _payload_error(model, "query", "Field required")
    if kind != "workflow" and not isinstance(query, str):
        raise _payload_error(model, "query", "Input should be a valid string")
    files = body.get("files") or []
    if not isinstance(files, list):
        raise _payload_error(model, "files", "Input should be a valid list")
    mode = body.get("response_mode")
    if mode not in (None, "blocking", "streaming"):
        raise _payload_error(model, "response_mode", "Input should be 'blocking' or 'streaming'")
    args = _Args(body["inputs"], query if isinstance(query, str) else "", files, mode == "streaming")
    conversation = body.get("conversation_id")
    if kind == "chat" and conversation is not None and str(conversation).strip():
        if not _is_uuid(str(conversation).strip()):
            raise _payload_error(model, "conversation_id", "Value error, conversation_id must be a valid UUID")
        args.conversation_id = str(uuid.UUID(str(conversation).strip()))
    return args


def _check_value(kind: str, spec: dict[str, Any], value: Any) -> Any:
    """One input value, checked and converted like BaseAppGenerator._validate_inputs (empty required = missing)."""
    name = spec["variable"]
    required = bool(spec.get("required"))
    if value is None or (required and (value == "" or value == [])):
        if required:
            raise _invalid(f"{name} is required in input form")
        value = spec.get("default")
        if value is None or value == "":
            return value
    if kind in ("file", "file-list") and value == "":
        return None
    if kind in ("text-input", "select", "paragraph") and not isinstance(value, str):
        raise _invalid(f"(type '{kind}') {name} in input form must be a string")
    if kind == "number":
        return _number(name, value)
    max_length = spec.get("max_length")
    if kind == "select" and value not in (spec.get("options") or []):
        raise _invalid(f"{name} in input form must be one of the following: {spec.get('options') or []}")
    if kind in ("text-input", "paragraph") and max_length and len(value) > max_length:
        raise _invalid(f"{name} in input form must be less than {max_length} characters")
    if kind == "file" and not isinstance(value, dict):
        raise _invalid(f"{name} in input form must be a file")
    if kind == "file-list":
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise _invalid(f"{name} in input form must be a list of files")
        if max_length and len(value) > max_length:
            raise _invalid(f"{name} in input form must be less than {max_length} files")
    if kind == "checkbox" and isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if kind == "json_object" and value and not isinstance(value, dict):
        raise _invalid(f"{name} in input form must be a dict")
    return value


def _number(name: str, value: Any) -> int | float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise _invalid(f"{name} in input form must be a valid number")
    if not value.strip():
        return None
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise _invalid(f"{name} in input form must be a valid number") from None


def _extension(name: str) -> str:
    tail = name.rsplit("/", 1)[-1]
    return tail.rsplit(".", 1)[-1].lower() if "." in tail else ""


def _check_file_type(declared: Any, extension: str, spec: dict[str, Any], method: str, name: str) -> None:
    detected = _EXT_TYPE.get(extension, "custom") if extension else None
    declared = declared or detected or "custom"
    if declared not in ("document", "image", "audio", "video", "custom"):
        raise _invalid(_FILE_MISMATCH)
    if detected is not None and declared != "custom" and declared != detected:
        raise _invalid(_FILE_MISMATCH)
    allowed_types = spec.get("allowed_file_types") or []
    if allowed_types and declared not in allowed_types:
        raise _invalid(_FILE_MISMATCH)
    allowed_extensions = [str(e).lower().lstrip(".") for e in spec.get("allowed_file_extensions") or []]
    if declared == "custom" and allowed_extensions and extension not in allowed_extensions:
        raise _invalid(f"File validation failed for file: {name}")
    allowed_methods = spec.get("allowed_file_upload_methods") or []
    if allowed_methods and method not in allowed_methods:
        raise _invalid(f"File validation failed for file: {name}")


def _agent_thought(task: _Task) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "position": 1, "thought": "", "observation": "", "tool": "", "tool_labels": {},
            "tool_input": "", "message_files": []}  # fmt: skip


def _parameters(cfg: SimConfig) -> dict[str, Any]:
    limit = cfg.upload_limit_mb
    image = {"enabled": False, "number_limits": 3, "detail": "high", "transfer_methods": ["remote_url", "local_file"]}
    file_upload = cfg.file_upload if cfg.file_upload is not None else {"image": image}
    return {
        "opening_statement": "", "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": False}, "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "voice": "", "language": ""}, "retriever_resource": {"enabled": False},
        "annotation_reply": {"enabled": False}, "more_like_this": {"enabled": False},
        "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
        "user_input_form": cfg.input_form, "file_upload": file_upload,
        "system_parameters": {"file_size_limit": limit, "image_file_size_limit": 10, "audio_file_size_limit": 50,
                              "video_file_size_limit": 100, "workflow_file_upload_limit": 10},
    }  # fmt: skip


class _EventStream(Response):
    """An SSE answer that notices client disconnects at once and always gives the concurrency slot back."""

    def __init__(self, sim: Simulator, ctx: _Ctx, body: AsyncGenerator[bytes, None]) -> None:  # noqa: D107
        self.sim, self.ctx, self.body_iterator = sim, ctx, body
        self.status_code, self.background = 200, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        ctx.record.status_code = 200
        watcher = asyncio.ensure_future(_watch_disconnect(receive, ctx))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            ctx.disconnected = True
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()
            if ctx.record.outcome is None:
                ctx.record.outcome = "dropped"
            self.sim._close_ctx(ctx)


async def _watch_disconnect(receive: Receive, ctx: _Ctx) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    ctx.disconnected = True
    ctx.wake.set()


def create_app(sim: Simulator) -> Starlette:
    """The Starlette app of `sim`: the Service API under /v1, an HTML page elsewhere."""
    api = _Api(sim)
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", api.dispatch, methods=methods)])


# ----------------------------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------------------------


class SimulatorServer:
    """The simulator on a real uvicorn server in a background thread (port 0 = a free port)."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = Simulator(config or SimConfig())
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> SimulatorServer:
        import uvicorn

        if self._thread is not None:
            return self
        # proto=IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted connections (else +40 ms per request).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.sim.app, log_level="warning", access_log=False, lifespan="off", http="h11", ws="none"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=asyncio.run, args=(self._serve(server, sock),), daemon=True)
        thread.name = f"dify-simulator-{self.port}"
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + 10
        while not (server.started and self._stopping is not None):
            if not thread.is_alive() or time.monotonic() > deadline:
                self._thread = None
                raise RuntimeError(f"simulator failed to start on {self.host}:{self.port}")
            time.sleep(0.002)
        return self

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        # uvicorn's own serve() polls for exit every 0.1 s and sleeps 0.1 s on shutdown; tests start hundreds
        # of servers, so drive startup here and close in milliseconds instead.
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.sim._attach_loop(self._loop)
        if not server.config.loaded:
            server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        await self._stopping.wait()
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()
        sock.close()
        for _ in range(3):  # let transports finish closing before the loop goes away
            await asyncio.sleep(0)

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        # End open streams and waiting requests first, so nothing is cancelled mid-flight.
        self._loop.call_soon_threadsafe(self.sim._begin_close)
        deadline = time.monotonic() + 2
        while self.sim._active and time.monotonic() < deadline:
            time.sleep(0.002)
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self._thread = self._server = self._loop = self._stopping = None

    def restart(self) -> None:
        """Stop, then serve again on the same port; the simulator's state is kept."""
        self.stop()
        self.start()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 5001) -> None:
    """Serve the simulator until interrupted (for `dify-batch simulate`)."""
    import uvicorn

    app = Simulator(config).app
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", http="h11", ws="none")
