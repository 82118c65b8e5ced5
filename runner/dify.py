"""The only module that speaks HTTP: `DifyClient`, an async client of the Dify Service API (httpx, aiohttp transport).

It owns the stall / interruption rules of streams (decoding itself is in `sse.py`), recovery of broken workflow streams
by run lookup (never by re-posting), and the one table that turns HTTP statuses and bodies into `runner.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx

from . import __version__
from .errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    DifyError,
    ForbiddenError,
    InputFileError,
    NotDifyError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    RunFailedError,
    ServerError,
    StreamInterruptedError,
    TransportError,
    UploadError,
)
from .models import AppParameters, InputDef, RunResult
from .sse import (
    FAILED_STATUSES,
    MessageEvents,
    SSEDecoder,
    WorkflowEvents,
    as_dict,
    json_or_none,
    message_result,
    to_int,
    workflow_result,
)

OnStarted = Callable[[dict[str, Any]], None]
OnText = Callable[[str], None]
Sleep = Callable[[float], Awaitable[Any]]

RESPONSE_MODES = ("blocking", "streaming")
_QUOTA_WORDS = ("upgrade your plan", "daily", "monthly", "quota")
_STREAMING_ONLY_WORDS = ("does not support blocking", "only supports streaming")
_STOP_PATHS = {"workflow": "/workflows/tasks", "completion": "/completion-messages"}
_CHAT_TYPES = ("chat", "advanced-chat", "agent-chat", "agent")
_SIZE_LIMIT_KEYS = {"file": "file_size_limit", "image": "image_file_size_limit",
                    "audio": "audio_file_size_limit", "video": "video_file_size_limit"}


def normalize_base_url(url: str) -> str:
    """`http://host`, `http://host/v1/`, `https://api.dify.ai/v1` -> `<scheme>://<host>[/prefix]/v1` (no end slash)."""
    text = (url or "").strip()
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid Dify base URL {text!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the Dify base URL must start with http:// or https:// and name a host, got {text!r}")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"the Dify base URL must not carry a query or fragment, got {text!r}")
    segments = [part for part in parsed.path.split("/") if part]
    if "v1" in segments:  # a pasted endpoint URL (…/v1/workflows/run) keeps only its API root
        segments = segments[: len(segments) - segments[::-1].index("v1")]
    else:
        segments.append("v1")
    return str(parsed.copy_with(path="/" + "/".join(segments))).rstrip("/")


# ---- status / body -> error ---------------------------------------------------------------------------------------


def error_for_status(
    status: int, code: str | None, message: str, url: str, *, run_id: str | None = None, task_id: str | None = None
) -> DifyError:
    """The error class for a Dify JSON error `{code, message, status}` (HTTP answer or in-band `error` event)."""
    lowered = message.lower()
    kwargs: dict[str, Any] = {"status": status, "code": code, "url": url, "run_id": run_id, "task_id": task_id}
    text = f"{status} {code or 'error'} from {url}: {message}"
    if status == 401:
        return AuthError(f"401 unauthorized from {url}: {message} — check DIFY_API_KEY", **kwargs)
    if status == 403:
        return ForbiddenError(text, **kwargs)
    if status == 404:
        return NotFoundError(text, **{**kwargs, "code": _not_found_code(code, lowered, url)})
    if status in (413, 415):
        return UploadError(text, **kwargs)
    if "too many requests" in lowered or code == "too_many_requests":
        return RateLimitedError(text, **kwargs)
    if status == 429:
        quota = code == "rate_limit_error" and any(word in lowered for word in _QUOTA_WORDS)
        return (QuotaExceededError if quota else RateLimitedError)(text, **kwargs)
    if code == "completion_request_error":
        return ProviderError(text, **kwargs)
    if status >= 500:
        return ServerError(text, **kwargs)
    return BadRequestError(text, **kwargs)


def _not_found_code(code: str | None, lowered: str, url: str) -> str:
    """Dify says `not_found` for everything; the job needs to know whether the app/route or just one item is missing."""
    if "requested url was not found" in lowered:
        return "route_not_found"
    if "app not found" in lowered or "app no longer exists" in lowered:
        return "app_not_found"
    if "conversation not exists" in lowered:
        return "conversation_not_exists"
    if "/workflows/run/" in url:
        return "run_not_found"
    if re.search(r"/workflows/[^/]+/run$", url):
        return "workflow_not_found"
    return code or "not_found"


def _proxy_error(response: httpx.Response, url: str, origin_hint: str) -> DifyError:
    """An answer that is not Dify JSON: a gateway / Cloudflare / web-server page, or plain text."""
    status = response.status_code
    body = response.content[:20000]
    html = _looks_html(response)
    head = f"{status} {response.reason_phrase or ''}".strip()
    what = "HTML page from a proxy" if html else "not a Dify JSON answer"
    kwargs: dict[str, Any] = {"status": status, "code": "html_page" if html else "not_json", "url": url}
    if status == 429 or (status == 403 and b"1015" in body):
        cloudflare = ", Cloudflare error 1015" if b"1015" in body else ""
        return RateLimitedError(f"{head} ({what}{cloudflare}) from {url}", **kwargs)
    if 300 <= status < 400:
        where = response.headers.get("location", "elsewhere")
        return NotDifyError(f"{url} redirected ({status}) to {where} — use that address as the base URL", **kwargs)
    classes: dict[int, type[DifyError]] = {401: AuthError, 403: ForbiddenError, 413: UploadError, 415: UploadError}
    if status in classes:
        return classes[status](f"{head} ({what}) from {url}", **kwargs)
    if status >= 500:
        return ServerError(f"{head} ({what}) from {url}", **kwargs)
    page = "an HTML page" if html else "something that is not Dify JSON"
    return NotDifyError(f"{url} answered {head} with {page} — is the base URL a Dify API?{origin_hint}", **kwargs)


def _looks_html(response: httpx.Response) -> bool:
    ctype = response.headers.get("content-type", "").lower()
    return "html" in ctype or response.content[:200].lstrip()[:1] == b"<"


def _transport_kind(exc: httpx.RequestError) -> tuple[str, str]:
    """(code, reason) for an httpx transport failure; the aiohttp transport maps causes loosely, so read the cause."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        os_error = cause.os_error
        if isinstance(cause, aiohttp.ClientSSLError):
            return "connect", f"TLS error: {os_error}"
        if isinstance(os_error, ConnectionRefusedError):
            return "connect", "connection refused"
        if isinstance(cause, getattr(aiohttp, "ClientConnectorDNSError", ())) or "name" in str(os_error).lower():
            return "connect", "host name not found (DNS)"
        return "connect", str(os_error) or type(os_error).__name__
    if isinstance(cause, asyncio.TimeoutError) or (cause is None and isinstance(exc, httpx.TimeoutException)):
        return "timeout", "timed out"
    if cause is None and isinstance(exc, httpx.ConnectError):
        reason = str(exc)
        return "connect", "connection refused" if "refused" in reason.lower() else reason or "connect error"
    return "network", str(cause or exc) or type(cause or exc).__name__


# ---- results ------------------------------------------------------------------------------------------------------


def _raise_if_failed(result: RunResult, url: str) -> RunResult:
    """HTTP 200 but the run ended failed / stopped / paused: a row failure carrying the result."""
    if result.status not in FAILED_STATUSES:
        return result
    message = result.error or (
        "the workflow paused for human input, which a batch run cannot give" if result.status == "paused"
        else f"the workflow run ended {result.status}"
    )
    raise RunFailedError(message, status=200, code=f"workflow_{result.status}", url=url,
                         run_id=result.workflow_run_id, task_id=result.task_id, result=result)


def _input_def(item: Any) -> InputDef | None:
    if not isinstance(item, dict) or not item:
        return None
    kind, spec = next(iter(item.items()))
    if not isinstance(spec, dict) or not spec.get("variable"):
        return None
    max_length = to_int(spec.get("max_length"))

    def strings(key: str) -> tuple[str, ...]:
        value = spec.get(key)
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    return InputDef(
        variable=str(spec["variable"]), type=str(kind), label=str(spec.get("label") or ""),
        required=bool(spec.get("required", False)), max_length=max_length or None, options=strings("options"),
        allowed_file_types=strings("allowed_file_types"), allowed_file_extensions=strings("allowed_file_extensions"),
        allowed_file_upload_methods=strings("allowed_file_upload_methods"),
    )


class _TextEvents(MessageEvents):
    """MessageEvents that also hands each `message` / `agent_message` chunk to `on_text` as it arrives."""

    def __init__(self, mode: str, on_text: OnText) -> None:
        super().__init__(mode)
        self._on_text = on_text

    def feed(self, event: dict[str, Any]) -> bool:
        if event.get("event") in ("message", "agent_message") and event.get("answer"):
            self._on_text(str(event["answer"]))
        return super().feed(event)


def _tell_answer(result: RunResult, on_text: OnText | None) -> RunResult:
    """A blocking answer arrives whole: `on_text` gets it as one chunk, so callers always see the text."""
    answer = result.outputs.get("answer")
    if on_text is not None and answer:
        on_text(str(answer))
    return result


def _says_streaming_only(error: BadRequestError) -> bool:
    return any(word in (error.message or "").lower() for word in _STREAMING_ONLY_WORDS)


# ---- the client ---------------------------------------------------------------------------------------------------


class DifyClient:
    """One app key against one Dify server; one pooled `httpx.AsyncClient` for its lifetime.

    `timeout` bounds waiting for an HTTP answer (a whole blocking run); streams are bounded instead by
    `start_timeout` (no first payload frame) and `stall_timeout` (no payload frame after the start; pings don't count).
    """

    DRAIN_TIMEOUT = 5.0  # how long a finished stream may take to reach EOF in the background before it is cut

    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 300.0, stall_timeout: float = 60.0,
        start_timeout: float = 30.0, connect_timeout: float = 10.0, poll_interval: float = 2.0,
        recover_timeout: float | None = None, transport: httpx.AsyncBaseTransport | None = None, verify: bool = True,
        max_connections: int = 256, sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self._key = (api_key or "").strip()
        if not self._key:
            raise ConfigError("no Dify API key given (set DIFY_API_KEY)")
        if not self._key.isascii() or not self._key.isprintable() or " " in self._key:
            raise ConfigError("the Dify API key contains spaces, control or non-ASCII characters — check DIFY_API_KEY")
        self.timeout, self.stall_timeout, self.start_timeout = timeout, stall_timeout, start_timeout
        self.poll_interval = poll_interval
        self.recover_timeout = timeout if recover_timeout is None else recover_timeout
        self.streaming_only = False  # set when the app refused blocking mode (agent apps)
        self._sleep = sleep
        self._drains: dict[asyncio.Task[None], httpx.Response] = {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if transport is None:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(verify=verify, limits=limits)
        self._http = httpx.AsyncClient(
            transport=transport, verify=verify, limits=limits, follow_redirects=False,
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=None),
            headers={"Authorization": f"Bearer {self._key}", "User-Agent": f"dify-batch/{__version__}"},
        )
        url = httpx.URL(self.base_url)
        self._display_base = str(url.copy_with(username=None, password=None))
        self._origin = str(url.copy_with(path="/", username=None, password=None)).rstrip("/")

    def __repr__(self) -> str:
        return f"DifyClient(base_url={self._display_base!r})"

    async def __aenter__(self) -> DifyClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        drains = dict(self._drains)
        for task in drains:  # closing: keeping those connections for reuse no longer matters
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        for response in drains.values():  # a task cancelled before it ran never reached its own `finally`
            await _close_quietly(response)
        await self._http.aclose()

    # ---- app metadata -------------------------------------------------------------------------------------------

    async def parameters(self) -> AppParameters:
        payload = await self._get_json("/parameters")
        form = payload.get("user_input_form")
        if not isinstance(form, list):
            raise NotDifyError(f"{self._url('/parameters')} answered JSON without user_input_form — not a Dify "
                               f"Service API?{self._origin_hint()}", status=200, code="not_dify",
                               url=self._url("/parameters"))
        system = as_dict(payload.get("system_parameters"))
        limits = {name: to_int(system.get(key)) for name, key in _SIZE_LIMIT_KEYS.items()}
        inputs = tuple(d for d in (_input_def(item) for item in form) if d is not None)
        return AppParameters(inputs=inputs, file_size_limits_mb={k: v for k, v in limits.items() if v is not None},
                             raw=payload)

    async def info(self) -> dict[str, Any]:
        return await self._get_json("/info")

    # ---- runs ---------------------------------------------------------------------------------------------------

    async def run_workflow(
        self, inputs: dict[str, Any], user: str, *, response_mode: str = "streaming", workflow_id: str | None = None,
        files: list[Any] | None = None, trace_id: str | None = None, on_started: OnStarted | None = None,
    ) -> RunResult:
        path = f"/workflows/{quote(workflow_id, safe='')}/run" if workflow_id else "/workflows/run"
        body: dict[str, Any] = {"inputs": inputs, "response_mode": _mode(response_mode), "user": user}
        if files is not None:
            body["files"] = files
        if trace_id:
            body["trace_id"] = trace_id
        if response_mode == "blocking":
            payload = await self._post_json(path, body)
            return self._blocking_workflow(payload, path, on_started)
        events = WorkflowEvents()
        outcome, answer = await self._stream(path, body, events, on_started)
        if answer is not None:
            return self._blocking_workflow(answer, path, on_started)
        url = self._url(path)
        if outcome == "done":
            if events.error_event is not None:
                raise self._event_error(events.error_event, url, events.run_id, events.task_id)
            return self._checked(events.result(), url)
        if outcome in _UNSTARTED:
            raise self._not_started(url, outcome)
        return await self._recover(events.run_id, events.task_id, url, outcome)

    async def chat(
        self, query: str, user: str, *, inputs: dict[str, Any] | None = None, conversation_id: str | None = None,
        response_mode: str = "streaming", files: list[Any] | None = None, on_started: OnStarted | None = None,
        on_text: OnText | None = None, auto_generate_name: bool = False,
    ) -> RunResult:
        """`auto_generate_name` is off by default: Dify would spend one extra LLM call per new conversation on it."""
        body: dict[str, Any] = {"query": query, "inputs": inputs or {}, "user": user,
                                "auto_generate_name": auto_generate_name}
        if conversation_id:
            body["conversation_id"] = conversation_id
        if files is not None:
            body["files"] = files
        return await self._message("/chat-messages", body, response_mode, on_started, "chat", on_text)

    async def completion(
        self, inputs: dict[str, Any], user: str, *, query: str = "", response_mode: str = "streaming",
        files: list[Any] | None = None, on_started: OnStarted | None = None, on_text: OnText | None = None,
    ) -> RunResult:
        body: dict[str, Any] = {"inputs": inputs, "query": query, "user": user}
        if files is not None:
            body["files"] = files
        return await self._message("/completion-messages", body, response_mode, on_started, "completion", on_text)

    async def conversation_exists(self, conversation_id: str, user: str) -> bool:
        """True when the conversation is still there for `user` (`GET /messages`); streaming hides this 404."""
        try:
            await self._get_json(f"/messages?conversation_id={quote(conversation_id, safe='')}"
                                 f"&user={quote(user, safe='')}&limit=1")
        except NotFoundError as exc:
            if exc.code == "conversation_not_exists":
                return False
            raise
        return True

    async def get_workflow_run(self, run_id: str) -> RunResult:
        path = f"/workflows/run/{quote(run_id, safe='')}"
        payload = await self._get_json(path)
        if payload.get("id") is None and payload.get("status") is None:  # old servers: 200 with nulls
            raise NotFoundError(f"404 run_not_found from {self._url(path)}: workflow run {run_id} not found",
                                status=404, code="run_not_found", url=self._url(path), run_id=run_id)
        result = workflow_result(payload, run_id=run_id)
        return replace(result, error=self._scrub(result.error)) if result.error else result

    async def wait_for_workflow_run(self, run_id: str) -> RunResult:
        """Poll until the run leaves `running`; after `recover_timeout` s returns the last (still running) result."""
        waited = 0.0
        while True:
            result = await self.get_workflow_run(run_id)
            if result.status != "running" or waited >= self.recover_timeout:
                return result
            await self._sleep(self.poll_interval)
            waited += self.poll_interval

    async def stop_task(self, task_id: str, user: str, app_type: str = "workflow") -> None:
        prefix = "/chat-messages" if app_type in _CHAT_TYPES else _STOP_PATHS.get(app_type)
        if prefix is None:
            raise ConfigError(f"unknown app type {app_type!r} (workflow, chat or completion)")
        await self._post_json(f"{prefix}/{quote(task_id, safe='')}/stop", {"user": user})

    async def upload_file(
        self, path: str | Path, user: str, *, filename: str | None = None, mime_type: str | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        name = filename or path.name
        mime = mime_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        response = await self._send("POST", "/files/upload", files={"file": (name, content, mime)}, data={"user": user})
        return self._json(response, "/files/upload")

    # ---- chat / completion --------------------------------------------------------------------------------------

    async def _message(
        self, path: str, body: dict[str, Any], response_mode: str, on_started: OnStarted | None, mode: str,
        on_text: OnText | None = None,
    ) -> RunResult:
        if _mode(response_mode) == "blocking" and not self.streaming_only:
            try:
                payload = await self._post_json(path, {**body, "response_mode": "blocking"})
                return _tell_answer(self._blocking_message(payload, mode, on_started), on_text)
            except BadRequestError as exc:
                if not _says_streaming_only(exc):
                    raise
                self.streaming_only = True  # agent apps only stream; the batch runner reports this
        events = MessageEvents(mode) if on_text is None else _TextEvents(mode, on_text)
        outcome, answer = await self._stream(path, {**body, "response_mode": "streaming"}, events, on_started)
        if answer is not None:
            return _tell_answer(self._blocking_message(answer, mode, on_started), on_text)
        url = self._url(path)
        if outcome == "done" and events.error_event is not None:
            raise self._event_error(events.error_event, url, events.run_id, events.task_id)
        if outcome == "done":
            return events.result()
        if outcome in _UNSTARTED:
            if body.get("conversation_id"):
                await self._check_conversation(str(body["conversation_id"]), str(body.get("user", "")), url)
            raise self._not_started(url, outcome)
        if events.workflow_failed is not None:
            failed = workflow_result(events.workflow_failed, run_id=events.run_id, task_id=events.task_id)
            self._checked(failed, url)
        raise StreamInterruptedError(
            f"the stream from {url} {_OUTCOME_WORDS[outcome]} before message_end; the answer is incomplete",
            status=200, code=f"stream_{outcome}", url=url, run_id=events.run_id, task_id=events.task_id,
            result=events.result(status="interrupted"),
        )

    def _blocking_message(self, payload: dict[str, Any], mode: str, on_started: OnStarted | None) -> RunResult:
        metadata = as_dict(payload.get("metadata"))
        result = message_result(
            str(payload.get("answer") or ""), metadata, status="succeeded", mode=mode,
            conversation_id=payload.get("conversation_id"), message_id=payload.get("message_id") or payload.get("id"),
            task_id=payload.get("task_id"),
        )
        ids = {"conversation_id": result.conversation_id, "message_id": result.message_id, "task_id": result.task_id}
        _notify(on_started, {k: v for k, v in ids.items() if v})
        return result

    def _blocking_workflow(self, payload: dict[str, Any], path: str, on_started: OnStarted | None) -> RunResult:
        data = payload.get("data")
        if not isinstance(data, dict):
            raise NotDifyError(f"{self._url(path)} answered JSON without a run `data` object — not a Dify workflow "
                               "API?", status=200, code="not_dify", url=self._url(path))
        result = workflow_result(data, run_id=payload.get("workflow_run_id"), task_id=payload.get("task_id"))
        ids = {"workflow_run_id": result.workflow_run_id, "task_id": result.task_id}
        _notify(on_started, {k: v for k, v in ids.items() if v})
        return self._checked(result, self._url(path))

    # ---- streaming ----------------------------------------------------------------------------------------------

    async def _stream(
        self, path: str, body: dict[str, Any], events: WorkflowEvents | MessageEvents, on_started: OnStarted | None
    ) -> tuple[str, dict[str, Any] | None]:
        """POST and read SSE into `events`: (outcome, None) with outcome "done", "eof", "stalled", "dropped",
        "not_started" (start_timeout) or "closed_unstarted" (EOF before any payload frame); or
        ("json", payload) when the server answered a plain JSON body instead of a stream."""
        response = await self._send("POST", path, json=body, stream=True)
        handed_off = False
        try:
            ctype = response.headers.get("content-type", "").lower()
            if "json" in ctype or "html" in ctype:
                await self._read_body(response, path)
                return "json", self._json(response, path)
            chunks = response.aiter_bytes()
            outcome = await self._read_events(chunks, events, on_started)
            if outcome == "done":
                self._release_later(response, chunks)
                handed_off = True
            return outcome, None
        finally:
            if not handed_off:
                await _close_quietly(response)

    async def _read_events(
        self, chunks: AsyncIterator[bytes], events: WorkflowEvents | MessageEvents, on_started: OnStarted | None
    ) -> str:
        decoder = SSEDecoder(events.SKIP if isinstance(events, WorkflowEvents) else ())
        notified = on_started is None
        started = False

        def take(frames: list[dict[str, Any]]) -> bool:
            nonlocal notified, started
            for event in frames:
                started = True
                terminal = events.feed(event)
                if not notified and events.ids():
                    notified = True
                    _notify(on_started, events.ids())
                if terminal:
                    return True
            return False

        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.start_timeout) as deadline:
                # A workflow whose stream goes quiet is looked up by run id, so only payload frames count as life.
                # A chat/completion message cannot be looked up (a re-post is a second billed message): once it has
                # started, keep-alive pings count as life too.
                # `timeout` still bounds such a stream as a whole, so pings forever cannot hang the job.
                pings_count = isinstance(events, MessageEvents)
                hard_end = loop.time() + self.timeout
                async for chunk in chunks:
                    frames = decoder.feed(chunk)
                    if frames or (pings_count and started and chunk):
                        later = loop.time() + self.stall_timeout
                        later = min(later, hard_end) if pings_count else later
                        # Moving the deadline makes a new timer: do it at most about once a second, not per frame.
                        if abs(later - (deadline.when() or 0.0)) > min(1.0, self.stall_timeout / 10):
                            deadline.reschedule(later)
                    if frames and take(frames):
                        return "done"
            if take(decoder.flush()):
                return "done"
            return "eof" if started else "closed_unstarted"  # the real server ends a hidden rejection so, in time
        except TimeoutError:
            return "stalled" if started else "not_started"
        except (httpx.TransportError, httpx.DecodingError):
            return "dropped"

    def _release_later(self, response: httpx.Response, chunks: AsyncIterator[bytes]) -> None:
        """Give the connection back to the pool without making the caller wait for the server's EOF (Dify keeps a
        finished stream open ~1 s); closing a half-read response would kill the keep-alive connection instead."""
        task = asyncio.create_task(self._drain(response, chunks))
        self._drains[task] = response
        task.add_done_callback(lambda done: self._drains.pop(done, None))

    async def _drain(self, response: httpx.Response, chunks: AsyncIterator[bytes]) -> None:
        try:
            async with asyncio.timeout(self.DRAIN_TIMEOUT):
                async for _ in chunks:
                    pass
        except (TimeoutError, httpx.HTTPError):
            pass
        finally:
            await _close_quietly(response)

    async def _recover(self, run_id: str | None, task_id: str | None, url: str, outcome: str) -> RunResult:
        """The stream broke after the run started: look the run up (never re-post: each POST is a new billed run)."""
        words = _OUTCOME_WORDS[outcome]
        if not run_id:
            raise StreamInterruptedError(f"the stream from {url} {words} before the run id was known", status=200,
                                         code=f"stream_{outcome}", url=url, task_id=task_id)
        try:
            result = await self.wait_for_workflow_run(run_id)
        except DifyError as exc:
            raise StreamInterruptedError(
                f"the stream from {url} {words} and run {run_id} could not be looked up: {exc.message}",
                status=exc.status, code=f"stream_{outcome}", url=url, run_id=run_id, task_id=task_id,
            ) from exc
        if result.status == "running":
            raise StreamInterruptedError(
                f"the stream from {url} {words} and run {run_id} was still running after {self.recover_timeout:g} s",
                status=200, code="still_running", url=url, run_id=run_id, task_id=task_id, result=result,
            )
        return self._checked(replace(result, recovered=True, task_id=task_id), url)

    def _not_started(self, url: str, outcome: str) -> BadRequestError:
        how = (f"never started within {self.start_timeout:g} s" if outcome == "not_started"
               else "was closed by the server before the run started")
        return BadRequestError(
            f"the stream from {url} opened but {how} — Dify hides request rejections in streaming mode; run "
            "`dify-batch validate` or try --response-mode blocking to see the server's reason",
            status=200, code="stream_not_started", url=url,
        )

    async def _check_conversation(self, conversation_id: str, user: str, url: str) -> None:
        """A chat stream that never starts often means an unknown conversation (Dify hides the 404 when streaming):
        ask the read-only `GET /messages`, which states it, and raise that instead of a vague "never started"."""
        try:
            exists = await self.conversation_exists(conversation_id, user)
        except DifyError:
            return  # could not tell: report the stream that never started
        if not exists:
            raise NotFoundError(
                f"404 conversation_not_exists from {url}: Conversation Not Exists. (conversation {conversation_id}, "
                f"user {user!r}; asked GET /messages because the stream never started)",
                status=404, code="conversation_not_exists", url=url,
            )

    def _event_error(self, event: dict[str, Any], url: str, run_id: str | None, task_id: str | None) -> DifyError:
        status = to_int(event.get("status")) or 500
        message = self._scrub(str(event.get("message") or "error event without a message"))
        return error_for_status(status, event.get("code"), message, url, run_id=run_id or event.get("workflow_run_id"),
                                task_id=task_id)

    # ---- plumbing: the one place where httpx exceptions and HTTP statuses become DifyErrors ----------------------

    def _url(self, path: str) -> str:
        return self._display_base + path

    def _origin_hint(self) -> str:
        return "" if self._display_base == self._origin + "/v1" else f" (try {self._origin}/v1)"

    def _checked(self, result: RunResult, url: str) -> RunResult:
        """A finished run's result, its error text scrubbed of the key (a node may echo headers), failures raised."""
        if result.error and self._key in result.error:
            result = replace(result, error=self._scrub(result.error))
        return _raise_if_failed(result, url)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***")[:1000]

    def _scrub_chain(self, exc: BaseException) -> None:
        """Lower layers may quote a header value (h11 does for illegal ones): keep the key out of the `from` chain."""
        chain: BaseException | None = exc
        while chain is not None:
            if any(self._key in str(arg) for arg in chain.args):
                chain.args = tuple(self._scrub(str(arg)) for arg in chain.args)
            chain = chain.__cause__ or chain.__context__

    @contextlib.contextmanager
    def _transport_errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except httpx.RequestError as exc:  # transport failures, and a body that cannot be decoded
            code, reason = _transport_kind(exc)
            if code == "connect":
                message = f"cannot connect to {self._display_base}: {reason}"
            elif code == "timeout":
                message = f"no answer from {self._url(path)} in time ({reason})"
            else:
                message = f"connection to {self._display_base} failed: {self._scrub(reason)}"
            self._scrub_chain(exc)
            raise TransportError(message, code=code, url=self._url(path)) from exc

    async def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """Send a request; non-2xx answers are raised as the matching DifyError."""
        request = self._http.build_request(method, self.base_url + path, **kwargs)
        with self._transport_errors(path):
            if "files" in kwargs:
                await request.aread()  # multipart as one body with a Content-Length, whatever the transport
            response = await self._http.send(request, stream=stream)
        if response.is_success:
            return response
        try:
            await self._read_body(response, path)
        finally:
            await _close_quietly(response)
        raise self._status_error(response, path)

    async def _read_body(self, response: httpx.Response, path: str) -> None:
        with self._transport_errors(path):
            await response.aread()

    def _status_error(self, response: httpx.Response, path: str) -> DifyError:
        url = self._url(path)
        payload = json_or_none(response.content)
        if isinstance(payload, dict) and ("code" in payload or "message" in payload):
            code = str(payload.get("code") or "") or None
            message = self._scrub(str(payload.get("message") or ""))
            return error_for_status(response.status_code, code, message, url)
        return _proxy_error(response, url, self._origin_hint())

    def _json(self, response: httpx.Response, path: str) -> dict[str, Any]:
        payload = json_or_none(response.content)
        if isinstance(payload, dict):
            return payload
        url = self._url(path)
        what = "an HTML page" if _looks_html(response) else "something that is not JSON"
        raise NotDifyError(f"{url} answered with {what} — is the base URL a Dify API?{self._origin_hint()}",
                           status=response.status_code, code="not_json", url=url)

    async def _get_json(self, path: str) -> dict[str, Any]:
        return self._json(await self._send("GET", path), path)

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(await self._send("POST", path, json=body), path)


_OUTCOME_WORDS = {"eof": "ended", "stalled": "went silent", "dropped": "broke off"}
_UNSTARTED = ("not_started", "closed_unstarted")


def _mode(response_mode: str) -> str:
    if response_mode not in RESPONSE_MODES:
        raise ConfigError(f"response_mode must be 'blocking' or 'streaming', got {response_mode!r}")
    return response_mode


def _notify(on_started: OnStarted | None, ids: dict[str, Any]) -> None:
    if on_started is not None and ids:
        on_started(ids)


async def _close_quietly(response: httpx.Response) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await response.aclose()
