"""DifyClient against httpx.MockTransport (every status / body / stream shape), plus a few runs on the simulator."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.dify import DifyClient, normalize_base_url
from runner.errors import (
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
from runner.sse import SSEDecoder

KEY = "app-Sup3rSecretKeyDoNotLeak"
BASE = "http://dify.test/v1"
RUN_ID = "fd1c0a2e-run"
TASK_ID = "9da2-task"
PING = b"event: ping\n\n"
Handler = Callable[[httpx.Request], Any]


# ---- helpers --------------------------------------------------------------------------------------------------------


class Recorder:
    """A MockTransport handler that answers from a list/callable and records requests."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.bodies: list[Any] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        content = await request.aread()
        self.bodies.append(json.loads(content) if request.headers.get("content-type") == "application/json" else None)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else answer

    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]


def make_client(handler: Handler, **kwargs: Any) -> DifyClient:
    kwargs.setdefault("sleep", _no_sleep)
    return DifyClient(BASE, KEY, transport=httpx.MockTransport(handler), **kwargs)


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def call(handler: Handler, method: str, *args: Any, client_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    async def go() -> Any:
        async with make_client(handler, **(client_kwargs or {})) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


def dify_error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": message, "status": status})


def html(status: int, body: str = "<html><head><title>oops</title></head><body>nginx</body></html>") -> httpx.Response:
    return httpx.Response(status, text=body, headers={"content-type": "text/html"})


def frame(obj: dict[str, Any], *, ascii_only: bool = False) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=ascii_only).encode() + b"\n\n"


def wf(event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event": event, "task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": data or {}}


def sse(chunks: list[bytes], *, gap: float = 0.0, tail: Callable[[], AsyncIterator[bytes]] | None = None,
        ) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            if gap:
                await asyncio.sleep(gap)
            yield chunk
        if tail is not None:
            async for chunk in tail():
                yield chunk

    return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=body())


async def pings_forever() -> AsyncIterator[bytes]:
    while True:
        await asyncio.sleep(0.03)
        yield PING


async def silence() -> AsyncIterator[bytes]:
    await asyncio.sleep(30)
    yield b""


STARTED = wf("workflow_started", {"id": RUN_ID, "workflow_id": "e46", "inputs": {"text": "hi"}})
NODE_LLM = wf("node_finished", {"node_type": "llm", "execution_metadata": {
    "total_tokens": 20, "total_price": "0.0001350", "currency": "USD"}})
NODE_LLM2 = wf("node_finished", {"node_type": "llm", "execution_metadata": {
    "total_tokens": 10, "total_price": "0.0000650", "currency": "USD"}})
FINISHED = wf("workflow_finished", {"id": RUN_ID, "status": "succeeded", "outputs": {"text": "Grüße, 世界"},
                                    "error": None, "elapsed_time": 0.875, "total_tokens": 30, "total_steps": 3})
RUN_LOOKUP = {"id": RUN_ID, "workflow_id": "e46", "status": "succeeded", "inputs": '{"text": "hi"}',
              "outputs": {"text": "from lookup"}, "error": None, "total_steps": 3, "total_tokens": 30,
              "elapsed_time": 1.5, "created_at": 1705407629, "finished_at": 1705407631}


def workflow_stream() -> list[bytes]:
    """A realistic stream: pings between frames, unknown events, text chunks, raw and escaped non-ASCII."""
    return [
        PING, frame(STARTED), PING,
        frame(wf("node_started", {"node_id": "llm", "title": "LLM 模型"}), ascii_only=True),
        frame({"event": "agent_log", "data": {"x": 1}}), frame({"event": "some_future_event"}), PING,
        frame(wf("text_chunk", {"text": "not the output"})), frame(NODE_LLM), frame(NODE_LLM2),
        frame(FINISHED),
    ]


# ---- base URL -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("http://localhost", "http://localhost/v1"),
    ("http://localhost/", "http://localhost/v1"),
    ("http://localhost/v1/", "http://localhost/v1"),
    ("https://api.dify.ai/v1", "https://api.dify.ai/v1"),
    ("  http://10.0.0.5:8080/v1  ", "http://10.0.0.5:8080/v1"),
    ("http://host/dify", "http://host/dify/v1"),
    ("http://host/dify/v1/workflows/run", "http://host/dify/v1"),
    ("HTTPS://Example.COM", "https://example.com/v1"),
])
def test_normalize_base_url(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize("bad", ["", "   ", "localhost:5001", "ftp://host/v1", "http://", "http://host/v1?x=1"])
def test_normalize_base_url_rejects_non_http(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_base_url(bad)


def test_client_repr_and_base_url_hide_the_key() -> None:
    client = make_client(Recorder(httpx.Response(200, json={})))
    assert client.base_url == BASE
    assert KEY not in repr(client) and "dify.test" in repr(client)
    asyncio.run(client.aclose())


def test_missing_api_key_is_config_error() -> None:
    with pytest.raises(ConfigError, match="DIFY_API_KEY"):
        DifyClient(BASE, "  ")


# ---- status / body -> error -------------------------------------------------------------------------------------

ERROR_CASES = [
    (dify_error(401, "unauthorized", "Access token is invalid"), AuthError, "unauthorized"),
    (dify_error(403, "forbidden", "The app's API service has been disabled."), ForbiddenError, "forbidden"),
    (dify_error(404, "not_found", "The requested URL was not found on the server."), NotFoundError,
     "route_not_found"),
    (dify_error(400, "invalid_param", "text is required in input form"), BadRequestError, "invalid_param"),
    (dify_error(400, "app_unavailable", "App unavailable"), BadRequestError, "app_unavailable"),
    (dify_error(400, "completion_request_error", "[openai] Bad gateway"), ProviderError, "completion_request_error"),
    (dify_error(400, "invalid_param", "Too many requests. Please try again later. The maximum concurrent "
                "requests allowed is 2."), RateLimitedError, "invalid_param"),
    (dify_error(413, "file_too_large", "File size exceeded."), UploadError, "file_too_large"),
    (dify_error(415, "unsupported_file_type", "File type not allowed."), UploadError, "unsupported_file_type"),
    (dify_error(429, "too_many_requests", "Too many requests."), RateLimitedError, "too_many_requests"),
    (dify_error(429, "rate_limit_error", "Rate limit exceeded, please upgrade your plan or try tomorrow"),
     QuotaExceededError, "rate_limit_error"),
    (dify_error(429, "rate_limit_error", "[openai] Rate limit reached for gpt-4o"), RateLimitedError,
     "rate_limit_error"),
    (dify_error(500, "internal_server_error", "Internal Server Error"), ServerError, "internal_server_error"),
    (html(502, "<html><title>502 Bad Gateway</title><center>nginx</center></html>"), ServerError, "html_page"),
    (html(524), ServerError, "html_page"),
    (html(429, "<html>error code: 1015 You are being rate limited</html>"), RateLimitedError, "html_page"),
    (html(413, "<html><title>413 Request Entity Too Large</title></html>"), UploadError, "html_page"),
    (html(404), NotDifyError, "html_page"),
    (html(200), NotDifyError, "not_json"),
    (httpx.Response(200, text="hello, not json"), NotDifyError, "not_json"),
    (httpx.Response(301, headers={"location": "https://dify.test/v1/parameters"}), NotDifyError, "not_json"),
    (httpx.Response(503, text="upstream connect error"), ServerError, "not_json"),
]


@pytest.mark.parametrize(("answer", "error_class", "code"), ERROR_CASES)
def test_http_answers_map_to_error_classes(answer: httpx.Response, error_class: type, code: str) -> None:
    with pytest.raises(DifyError) as caught:
        call(Recorder(answer), "parameters")
    error = caught.value
    assert type(error) is error_class
    assert error.code == code
    assert error.status == answer.status_code
    assert error.url == f"{BASE}/parameters"
    assert f"{BASE}/parameters" in str(error)


def test_401_message_names_the_url_and_the_env_var() -> None:
    with pytest.raises(AuthError) as caught:
        call(Recorder(dify_error(401, "unauthorized", "Access token is invalid")), "parameters")
    assert str(caught.value) == (
        f"401 unauthorized from {BASE}/parameters: Access token is invalid — check DIFY_API_KEY"
    )


def test_gateway_html_gets_a_short_message() -> None:
    with pytest.raises(ServerError) as caught:
        call(Recorder(html(502, "<html>" + "x" * 5000 + "</html>")), "parameters")
    assert str(caught.value) == f"502 Bad Gateway (HTML page from a proxy) from {BASE}/parameters"


def test_200_html_page_is_not_dify_with_a_hint() -> None:
    async def go() -> None:
        client = DifyClient("http://host/app/xyz", KEY, transport=httpx.MockTransport(lambda r: html(200)))
        async with client:
            await client.parameters()

    with pytest.raises(NotDifyError) as caught:
        asyncio.run(go())
    assert "answered with an HTML page — is the base URL a Dify API? (try http://host/v1)" in str(caught.value)


def test_not_found_codes_tell_missing_route_from_missing_item() -> None:
    conversation = Recorder(dify_error(404, "not_found", "Conversation Not Exists."))
    with pytest.raises(NotFoundError) as caught:
        call(conversation, "chat", "hi", "u", conversation_id="c-1", response_mode="blocking")
    assert caught.value.code == "conversation_not_exists"
    version = Recorder(dify_error(404, "not_found", "Workflow not found"))
    with pytest.raises(NotFoundError) as caught:
        call(version, "run_workflow", {}, "u", workflow_id="wf-9", response_mode="blocking")
    assert caught.value.code == "workflow_not_found"


def test_connect_error_is_transport_error_with_code_connect() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(TransportError) as caught:
        call(refuse, "parameters")
    assert caught.value.code == "connect"
    assert str(caught.value) == f"cannot connect to {BASE}: connection refused"


def test_timeout_is_transport_error_with_code_timeout() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(TransportError) as caught:
        call(slow, "run_workflow", {}, "u", response_mode="blocking")
    assert caught.value.code == "timeout"
    assert caught.value.url == f"{BASE}/workflows/run"


def test_refused_connection_through_the_aiohttp_transport() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go() -> None:
        async with DifyClient(f"http://127.0.0.1:{port}", KEY, connect_timeout=2.0) as client:
            await client.parameters()

    with pytest.raises(TransportError) as caught:
        asyncio.run(go())
    assert caught.value.code == "connect"
    assert str(caught.value) == f"cannot connect to http://127.0.0.1:{port}/v1: connection refused"


def test_the_api_key_never_appears_in_errors() -> None:
    leaky = [answer for answer, _, _ in ERROR_CASES]
    leaky.append(dify_error(400, "invalid_param", f"bad header Bearer {KEY}"))  # even if a server echoes it

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused ({request.headers['authorization']!r})", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    errors: list[BaseException] = []
    for handler in [Recorder(answer) for answer in leaky] + [refuse, slow]:
        for method, args in (("parameters", ()), ("run_workflow", ({}, "u"))):
            try:
                call(handler, method, *args)
            except DifyError as exc:
                errors.append(exc)
    errors.append(_run_failed_error())
    assert {type(e) for e in errors} >= {AuthError, ForbiddenError, NotFoundError, BadRequestError, ProviderError,
                                        RateLimitedError, QuotaExceededError, UploadError, ServerError,
                                        NotDifyError, TransportError, RunFailedError}
    for error in errors:
        chain: BaseException | None = error
        while chain is not None:
            assert KEY not in str(chain) and KEY not in repr(chain), (type(error), chain)
            assert all(KEY not in str(arg) for arg in chain.args)
            chain = chain.__cause__


def _run_failed_error() -> BaseException:
    failed = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {"id": RUN_ID, "status": "failed",
                                                                      "error": "boom", "outputs": {}}}
    try:
        call(Recorder(httpx.Response(200, json=failed)), "run_workflow", {}, "u", response_mode="blocking")
    except RunFailedError as exc:
        return exc
    raise AssertionError("expected RunFailedError")


# ---- parameters / info ------------------------------------------------------------------------------------------


PARAMETERS = {
    "opening_statement": "",
    "user_input_form": [
        {"text-input": {"variable": "text", "label": "Text", "type": "text-input", "required": True,
                        "max_length": 48, "default": "", "options": []}},
        {"paragraph": {"variable": "notes", "label": "Notes", "required": False, "max_length": 0}},
        {"select": {"variable": "lang", "label": "Language", "required": True, "options": ["en", "de"]}},
        {"number": {"variable": "n", "label": "N", "required": False}},
        {"file-list": {"variable": "docs", "label": "Docs", "required": False, "max_length": 5,
                       "allowed_file_types": ["document"], "allowed_file_extensions": [".pdf"],
                       "allowed_file_upload_methods": ["local_file"]}},
        {"external_data_tool": {"variable": "ext", "label": "Ext"}},
        {"broken": "not a dict"},
    ],
    "file_upload": {"image": {"enabled": False}},
    "system_parameters": {"file_size_limit": 15, "image_file_size_limit": 10, "audio_file_size_limit": 50,
                          "video_file_size_limit": 100, "workflow_file_upload_limit": 10},
}


def test_parameters_parse_the_input_form_and_upload_limits() -> None:
    recorder = Recorder(httpx.Response(200, json=PARAMETERS))
    params = call(recorder, "parameters")
    assert [(d.variable, d.type) for d in params.inputs] == [
        ("text", "text-input"), ("notes", "paragraph"), ("lang", "select"), ("n", "number"), ("docs", "file-list"),
        ("ext", "external_data_tool")]
    text, notes, lang, _, docs, _ = params.inputs
    assert text.required and text.max_length == 48 and text.label == "Text"
    assert notes.max_length is None and not notes.required
    assert lang.options == ("en", "de")
    assert docs.is_file and docs.max_length == 5 and docs.allowed_file_types == ("document",)
    assert docs.allowed_file_extensions == (".pdf",) and docs.allowed_file_upload_methods == ("local_file",)
    assert params.file_size_limits_mb == {"file": 15, "image": 10, "audio": 50, "video": 100}
    assert params.raw == PARAMETERS
    request = recorder.requests[0]
    assert request.url == f"{BASE}/parameters" and request.headers["authorization"] == f"Bearer {KEY}"


def test_parameters_without_input_form_is_not_dify() -> None:
    with pytest.raises(NotDifyError):
        call(Recorder(httpx.Response(200, json={"status": "ok"})), "parameters")


def test_info_returns_the_json() -> None:
    info = {"name": "App", "description": "", "tags": [], "mode": "workflow", "author_name": "me"}
    assert call(Recorder(httpx.Response(200, json=info)), "info") == info


# ---- workflow, blocking -----------------------------------------------------------------------------------------


def test_blocking_workflow_result_is_parsed_and_ids_reported_after_the_answer() -> None:
    answer = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {
        "id": RUN_ID, "workflow_id": "e46", "status": "succeeded", "outputs": {"text": "Nice to meet you."},
        "error": None, "elapsed_time": 0.875, "total_tokens": 3562, "total_steps": 8}}
    recorder = Recorder(httpx.Response(200, json=answer))
    seen: list[dict[str, Any]] = []
    result = call(recorder, "run_workflow", {"text": "hi"}, "batch-1", response_mode="blocking",
                  trace_id="row-7", files=[], on_started=seen.append)
    assert result.ok and result.outputs == {"text": "Nice to meet you."}
    assert (result.workflow_run_id, result.task_id, result.total_tokens, result.elapsed_s) == (
        RUN_ID, TASK_ID, 3562, 0.875)
    assert not result.recovered and result.total_price is None
    assert seen == [{"workflow_run_id": RUN_ID, "task_id": TASK_ID}]
    assert recorder.bodies[0] == {"inputs": {"text": "hi"}, "response_mode": "blocking", "user": "batch-1",
                                  "files": [], "trace_id": "row-7"}
    assert recorder.requests[0].url == f"{BASE}/workflows/run"


def test_pinned_workflow_version_uses_its_path() -> None:
    answer = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {"id": RUN_ID, "status": "succeeded"}}
    recorder = Recorder(httpx.Response(200, json=answer))
    call(recorder, "run_workflow", {}, "u", response_mode="blocking", workflow_id="wf-1")
    assert recorder.requests[0].url == f"{BASE}/workflows/wf-1/run"


@pytest.mark.parametrize(("status", "code"), [("failed", "workflow_failed"), ("stopped", "workflow_stopped")])
def test_http_200_failed_run_is_run_failed_error(status: str, code: str) -> None:
    answer = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {
        "id": RUN_ID, "status": status, "outputs": {}, "error": "Reached maximum retries", "elapsed_time": 3}}
    with pytest.raises(RunFailedError) as caught:
        call(Recorder(httpx.Response(200, json=answer)), "run_workflow", {}, "u", response_mode="blocking")
    error = caught.value
    assert error.code == code and error.message == "Reached maximum retries" and error.run_id == RUN_ID
    assert error.result.status == status and error.result.workflow_run_id == RUN_ID


def test_partial_succeeded_is_returned_not_raised() -> None:
    answer = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {
        "id": RUN_ID, "status": "partial-succeeded", "outputs": {"a": 1}}}
    result = call(Recorder(httpx.Response(200, json=answer)), "run_workflow", {}, "u", response_mode="blocking")
    assert result.status == "partial-succeeded" and result.outputs == {"a": 1} and not result.ok


def test_unknown_response_mode_is_config_error() -> None:
    with pytest.raises(ConfigError):
        call(Recorder(httpx.Response(200, json={})), "run_workflow", {}, "u", response_mode="fast")


# ---- workflow, streaming ----------------------------------------------------------------------------------------


def test_streaming_workflow_takes_outputs_from_workflow_finished_and_sums_prices() -> None:
    recorder = Recorder(sse(workflow_stream()))
    seen: list[dict[str, Any]] = []
    result = call(recorder, "run_workflow", {"text": "hi"}, "u", on_started=seen.append)
    assert result.ok and result.outputs == {"text": "Grüße, 世界"}
    assert result.workflow_run_id == RUN_ID and result.task_id == TASK_ID
    assert result.total_tokens == 30 and result.elapsed_s == 0.875
    assert result.total_price == pytest.approx(0.0002) and result.currency == "USD"
    assert seen == [{"workflow_run_id": RUN_ID, "task_id": TASK_ID}]
    assert recorder.bodies[0]["response_mode"] == "streaming"


def test_a_stream_split_into_odd_chunks_parses_the_same() -> None:
    whole = b"".join(workflow_stream())
    sizes = [1, 2, 3, 5, 7, 11, 13, 17]
    chunks, at, i = [], 0, 0
    while at < len(whole):  # splits land inside JSON, inside "\n\n" and inside multi-byte UTF-8 characters
        chunks.append(whole[at:at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    result = call(Recorder(sse(chunks)), "run_workflow", {}, "u")
    assert result.outputs == {"text": "Grüße, 世界"} and result.total_price == pytest.approx(0.0002)


def test_sse_decoder_accepts_crlf_and_cr_line_ends_split_anywhere() -> None:
    text = b'event: ping\r\n\r\ndata: {"event": "a", "x": "\xc3\xa9"}\r\n\r\ndata: {"event": "b"}\r\rdata: [DONE]\n\n'
    for cut in range(1, len(text)):
        decoder = SSEDecoder()
        frames = decoder.feed(text[:cut]) + decoder.feed(text[cut:]) + decoder.flush()
        assert frames == [{"event": "a", "x": "é"}, {"event": "b"}], cut


def test_sse_decoder_keeps_a_last_frame_without_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"event": "workflow_finished"}') == []
    assert decoder.flush() == [{"event": "workflow_finished"}]


def test_streaming_failed_run_is_run_failed_error() -> None:
    failed = wf("workflow_finished", {"id": RUN_ID, "status": "failed", "error": "Node LLM run failed", "outputs": {}})
    with pytest.raises(RunFailedError) as caught:
        call(Recorder(sse([PING, frame(STARTED), frame(NODE_LLM), frame(failed)])), "run_workflow", {}, "u")
    assert caught.value.code == "workflow_failed" and caught.value.message == "Node LLM run failed"
    assert caught.value.result.total_price == pytest.approx(0.000135)


def test_in_band_error_event_is_classified_with_the_run_id() -> None:
    error = {"event": "error", "workflow_run_id": RUN_ID, "code": "completion_request_error", "status": 400,
             "message": "[openai] Connection error"}
    with pytest.raises(ProviderError) as caught:
        call(Recorder(sse([PING, frame(STARTED), frame(error)])), "run_workflow", {}, "u")
    assert caught.value.run_id == RUN_ID and caught.value.task_id == TASK_ID
    assert caught.value.code == "completion_request_error" and "[openai] Connection error" in str(caught.value)


def test_in_band_internal_error_is_server_error() -> None:
    error = {"event": "error", "code": "internal_server_error", "status": 500, "message": "boom"}
    with pytest.raises(ServerError):
        call(Recorder(sse([frame(STARTED), frame(error)])), "run_workflow", {}, "u")


def lookup_then(*answers: Any) -> Callable[[httpx.Request], httpx.Response]:
    """GET /workflows/run/<id> answers in turn; POSTs answer a stream that ends early."""
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return sse([PING, frame(STARTED), frame(NODE_LLM)])  # EOF before workflow_finished
        assert request.url.path == f"/v1/workflows/run/{RUN_ID}"
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)

    return handler


def test_eof_before_workflow_finished_recovers_by_lookup_without_reposting() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    recorder = Recorder(lookup_then({**RUN_LOOKUP, "status": "running", "outputs": {}}, RUN_LOOKUP))
    result = call(recorder, "run_workflow", {"text": "hi"}, "u", client_kwargs={"sleep": sleep, "poll_interval": 2})
    assert result.ok and result.recovered
    assert result.outputs == {"text": "from lookup"} and result.workflow_run_id == RUN_ID
    assert result.task_id == TASK_ID and result.total_tokens == 30
    assert len(recorder.posts()) == 1
    assert sleeps == [2]


def test_recovered_run_that_failed_is_run_failed_error() -> None:
    recorder = Recorder(lookup_then({**RUN_LOOKUP, "status": "failed", "error": "LLM timeout", "outputs": None}))
    with pytest.raises(RunFailedError) as caught:
        call(recorder, "run_workflow", {}, "u")
    assert caught.value.result.recovered and caught.value.message == "LLM timeout"


def test_lookup_404_after_a_broken_stream_is_stream_interrupted() -> None:
    recorder = Recorder(lookup_then(dify_error(404, "not_found", "Workflow run not found")))
    with pytest.raises(StreamInterruptedError) as caught:
        call(recorder, "run_workflow", {}, "u")
    assert caught.value.run_id == RUN_ID and caught.value.task_id == TASK_ID
    assert caught.value.code == "stream_eof"
    assert isinstance(caught.value.__cause__, NotFoundError)
    assert len(recorder.posts()) == 1


def test_run_still_running_after_recover_timeout_is_stream_interrupted() -> None:
    running = {**RUN_LOOKUP, "status": "running"}
    recorder = Recorder(lookup_then(running))
    with pytest.raises(StreamInterruptedError) as caught:
        call(recorder, "run_workflow", {}, "u", client_kwargs={"poll_interval": 1.0, "recover_timeout": 5.0})
    assert caught.value.code == "still_running" and caught.value.run_id == RUN_ID
    assert len([r for r in recorder.requests if r.method == "GET"]) == 6


def test_connection_dropped_mid_stream_recovers_by_lookup() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield frame(STARTED)
        raise httpx.ReadError("peer closed connection without sending complete message body")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken())
        return httpx.Response(200, json=RUN_LOOKUP)

    result = call(handler, "run_workflow", {}, "u")
    assert result.recovered and result.outputs == {"text": "from lookup"}


def test_stall_after_start_recovers_by_lookup() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return sse([PING, frame(STARTED)], tail=pings_forever)  # pings keep coming, payload does not
        return httpx.Response(200, json=RUN_LOOKUP)

    result = call(handler, "run_workflow", {}, "u", client_kwargs={"stall_timeout": 0.2, "start_timeout": 5})
    assert result.recovered and result.ok


def test_stream_that_never_starts_is_a_permanent_error() -> None:
    recorder = Recorder(sse([PING], tail=pings_forever))
    with pytest.raises(BadRequestError) as caught:
        call(recorder, "run_workflow", {}, "u", client_kwargs={"start_timeout": 0.2, "stall_timeout": 5})
    assert caught.value.code == "stream_not_started"
    assert "never started within 0.2 s" in str(caught.value) and "--response-mode blocking" in str(caught.value)
    assert [r.method for r in recorder.requests] == ["POST"]  # nothing to look up


def test_server_closing_the_stream_before_the_run_started_is_the_same_permanent_error() -> None:
    with pytest.raises(BadRequestError) as caught:  # what the real server does after its 300 s, sooner here
        call(Recorder(sse([PING])), "run_workflow", {}, "u")
    assert caught.value.code == "stream_not_started" and "closed by the server" in str(caught.value)


def test_connection_dropped_before_any_frame_is_stream_interrupted_without_run_id() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield PING
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    answer = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=broken())
    with pytest.raises(StreamInterruptedError) as caught:
        call(Recorder(answer), "run_workflow", {}, "u")
    assert caught.value.run_id is None and caught.value.code == "stream_dropped"


def test_json_answer_to_a_streaming_request_is_parsed_as_blocking() -> None:
    answer = {"task_id": TASK_ID, "workflow_run_id": RUN_ID, "data": {"id": RUN_ID, "status": "succeeded",
                                                                      "outputs": {"x": 1}}}
    result = call(Recorder(httpx.Response(200, json=answer)), "run_workflow", {}, "u")
    assert result.outputs == {"x": 1}


def test_error_before_the_stream_starts_is_raised_like_blocking() -> None:
    with pytest.raises(RateLimitedError):
        call(Recorder(dify_error(429, "too_many_requests", "Too many requests.")), "run_workflow", {}, "u")


# ---- lookup / stop ----------------------------------------------------------------------------------------------


def test_get_workflow_run_accepts_string_inputs_and_running_status() -> None:
    recorder = Recorder(httpx.Response(200, json={**RUN_LOOKUP, "status": "running", "outputs": "{}"}))
    result = call(recorder, "get_workflow_run", RUN_ID)
    assert result.status == "running" and result.outputs == {} and result.workflow_run_id == RUN_ID


def test_get_workflow_run_of_old_server_with_nulls_is_not_found() -> None:
    nulls = {k: None for k in RUN_LOOKUP}
    with pytest.raises(NotFoundError) as caught:
        call(Recorder(httpx.Response(200, json=nulls)), "get_workflow_run", "nope")
    assert caught.value.code == "run_not_found"


def test_wait_for_workflow_run_returns_the_last_result_when_time_is_up() -> None:
    recorder = Recorder(httpx.Response(200, json={**RUN_LOOKUP, "status": "running"}))
    result = call(recorder, "wait_for_workflow_run", RUN_ID, client_kwargs={"poll_interval": 2, "timeout": 10})
    assert result.status == "running" and len(recorder.requests) == 6


@pytest.mark.parametrize(("app_type", "path"), [
    ("workflow", "/v1/workflows/tasks/t-1/stop"), ("chat", "/v1/chat-messages/t-1/stop"),
    ("advanced-chat", "/v1/chat-messages/t-1/stop"), ("completion", "/v1/completion-messages/t-1/stop")])
def test_stop_task_posts_the_user_to_the_app_types_path(app_type: str, path: str) -> None:
    recorder = Recorder(httpx.Response(200, json={"result": "success"}))
    assert call(recorder, "stop_task", "t-1", "u-9", app_type) is None
    assert recorder.requests[0].url.path == path and recorder.bodies[0] == {"user": "u-9"}


# ---- chat / completion ------------------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_price": "0.00001",
         "completion_price": "0.00002", "total_price": "0.0000300", "currency": "USD", "latency": 1.25}
RESOURCES = [{"position": 1, "dataset_id": "d", "document_name": "a.pdf", "score": 0.9, "content": "x"}]


def msg(event: str, **extra: Any) -> dict[str, Any]:
    return {"event": event, "task_id": TASK_ID, "id": "m-1", "message_id": "m-1", "conversation_id": "c-1",
            "created_at": 1, **extra}


def test_blocking_chat_result() -> None:
    answer = {"event": "message", "task_id": TASK_ID, "id": "m-1", "message_id": "m-1", "conversation_id": "c-1",
              "mode": "chat", "answer": "Hello!", "metadata": {"usage": USAGE, "retriever_resources": RESOURCES},
              "created_at": 1}
    recorder = Recorder(httpx.Response(200, json=answer))
    seen: list[dict[str, Any]] = []
    result = call(recorder, "chat", "hi", "u", inputs={"a": 1}, conversation_id="c-1", response_mode="blocking",
                  on_started=seen.append)
    assert result.ok and result.outputs == {"answer": "Hello!"}
    assert (result.conversation_id, result.message_id, result.task_id) == ("c-1", "m-1", TASK_ID)
    assert result.total_tokens == 15 and result.total_price == pytest.approx(0.00003) and result.currency == "USD"
    assert result.usage == USAGE and result.retriever_resources == RESOURCES and result.elapsed_s == 1.25
    assert recorder.bodies[0] == {"query": "hi", "inputs": {"a": 1}, "user": "u", "auto_generate_name": False,
                                  "conversation_id": "c-1", "response_mode": "blocking"}
    assert seen == [{"conversation_id": "c-1", "message_id": "m-1", "task_id": TASK_ID}]


def test_streaming_chat_joins_chunks_and_applies_message_replace() -> None:
    frames = [PING, frame(msg("message", answer="Hel")), frame(msg("agent_thought", thought="hmm")),
              frame(msg("message", answer="lo wörld")), frame(msg("message_replace", answer="Redacted")),
              frame(msg("message", answer=", again")), PING,
              frame(msg("message_end", metadata={"usage": USAGE, "retriever_resources": RESOURCES}, files=[]))]
    seen: list[dict[str, Any]] = []
    result = call(Recorder(sse(frames)), "chat", "hi", "u", on_started=seen.append)
    assert result.outputs == {"answer": "Redacted, again"} and result.conversation_id == "c-1"
    assert result.usage == USAGE and result.total_price == pytest.approx(0.00003)
    assert seen == [{"conversation_id": "c-1", "message_id": "m-1", "task_id": TASK_ID}]


def test_streaming_chat_answer_without_replace_is_joined() -> None:
    frames = [frame(msg("agent_message", answer="A")), frame(msg("agent_message", answer="B")),
              frame(msg("message_end", metadata={"usage": USAGE}))]
    assert call(Recorder(sse(frames)), "chat", "hi", "u").outputs == {"answer": "AB"}


def test_advanced_chat_stream_stops_at_message_end() -> None:
    started = {**wf("workflow_started", {"id": RUN_ID}), "conversation_id": "c-1", "message_id": "m-1"}
    frames = [PING, frame(started), frame(msg("message", answer="Hi")),
              frame(msg("message_end", metadata={"usage": USAGE}))]
    seen: list[dict[str, Any]] = []

    async def go() -> Any:
        async with make_client(Recorder(sse(frames, tail=silence)), stall_timeout=60) as client:
            return await asyncio.wait_for(client.chat("hi", "u", on_started=seen.append), 5)

    result = asyncio.run(go())  # the tail never ends: returning at all shows we stopped at message_end
    assert result.outputs == {"answer": "Hi"} and result.workflow_run_id == RUN_ID
    assert seen == [{"conversation_id": "c-1", "message_id": "m-1", "task_id": TASK_ID, "workflow_run_id": RUN_ID}]


def test_chat_error_event_is_provider_error() -> None:
    frames = [frame(msg("message", answer="Hi")),
              frame({"event": "error", "task_id": TASK_ID, "message_id": "m-1", "status": 400,
                     "code": "completion_request_error", "message": "quota"})]
    with pytest.raises(ProviderError) as caught:
        call(Recorder(sse(frames)), "chat", "hi", "u")
    assert caught.value.task_id == TASK_ID


def test_chat_stream_cut_before_message_end_is_stream_interrupted_with_partial_answer() -> None:
    with pytest.raises(StreamInterruptedError) as caught:
        call(Recorder(sse([frame(msg("message", answer="Hal"))])), "chat", "hi", "u")
    assert caught.value.task_id == TASK_ID and caught.value.result.outputs == {"answer": "Hal"}
    assert caught.value.result.conversation_id == "c-1"


def test_chat_silent_after_start_is_stream_interrupted() -> None:
    with pytest.raises(StreamInterruptedError) as caught:
        call(Recorder(sse([frame(msg("message", answer="Hal"))], tail=silence)), "chat", "hi", "u",
             client_kwargs={"stall_timeout": 0.2})
    assert caught.value.code == "stream_stalled"


def test_chat_pinging_after_start_is_alive_until_the_request_timeout() -> None:
    # A message cannot be looked up, so a stream that still pings is not cut at stall_timeout (a re-post would bill
    # twice); the request timeout bounds it.
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError) as caught:
        call(Recorder(sse([frame(msg("message", answer="Hal"))], tail=pings_forever)), "chat", "hi", "u",
             client_kwargs={"stall_timeout": 0.1, "timeout": 0.6})
    assert caught.value.code == "stream_stalled"
    assert time.monotonic() - started >= 0.5


def test_chat_stream_that_never_starts_asks_whether_the_conversation_exists() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return sse([PING])  # Dify hides the 404 of an unknown conversation when streaming
        assert request.url.path == "/v1/messages"
        assert dict(request.url.params) == {"conversation_id": "c-gone", "user": "alice", "limit": "1"}
        return dify_error(404, "not_found", "Conversation Not Exists.")

    with pytest.raises(NotFoundError) as caught:
        call(handler, "chat", "hi", "alice", conversation_id="c-gone")
    assert caught.value.code == "conversation_not_exists" and caught.value.url == f"{BASE}/chat-messages"
    assert "Conversation Not Exists." in str(caught.value)


def test_chat_stream_that_never_starts_with_a_known_conversation_is_stream_not_started() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return sse([PING])
        return httpx.Response(200, json={"limit": 1, "has_more": False, "data": [{"id": "m"}]})

    with pytest.raises(BadRequestError) as caught:
        call(handler, "chat", "hi", "alice", conversation_id="c-1")
    assert caught.value.code == "stream_not_started"


def test_on_text_gets_streamed_chunks_and_a_blocking_answer_whole() -> None:
    frames = [frame(msg("message", answer="Hel")), frame(msg("message", answer="lo")),
              frame(msg("message_end", metadata={}))]
    chunks: list[str] = []
    call(Recorder(sse(frames)), "chat", "hi", "u", on_text=chunks.append)
    assert chunks == ["Hel", "lo"]
    blocking = {"event": "message", "message_id": "m", "answer": "Whole", "metadata": {}}
    chunks.clear()
    call(Recorder(httpx.Response(200, json=blocking)), "completion", {}, "u", response_mode="blocking",
         on_text=chunks.append)
    assert chunks == ["Whole"]


@pytest.mark.parametrize(("answer", "exists"), [
    (httpx.Response(200, json={"limit": 1, "has_more": False, "data": []}), True),
    (dify_error(404, "not_found", "Conversation Not Exists."), False),
])
def test_conversation_exists(answer: httpx.Response, exists: bool) -> None:
    assert call(Recorder(answer), "conversation_exists", "c-1", "u") is exists


def test_conversation_exists_on_a_server_without_the_route_raises() -> None:
    with pytest.raises(NotFoundError) as caught:
        call(Recorder(dify_error(404, "not_found", "The requested URL was not found on the server.")),
             "conversation_exists", "c-1", "u")
    assert caught.value.code == "route_not_found"


@pytest.mark.parametrize("refusal", [
    dify_error(400, "invalid_param", "Agent Chat App does not support blocking mode"),
    dify_error(400, "bad_request", "Agent App only supports streaming response mode."),
])
def test_agent_app_blocking_falls_back_to_streaming_once_and_remembers(refusal: httpx.Response) -> None:
    stream = sse([frame(msg("agent_message", answer="ok")), frame(msg("message_end", metadata={}))])

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return refusal if body["response_mode"] == "blocking" else stream

    async def go() -> tuple[list[Any], bool]:
        recorder = Recorder(handler)
        async with make_client(recorder) as client:
            first = await client.chat("hi", "u", response_mode="blocking")
            second_stream = sse([frame(msg("agent_message", answer="again")), frame(msg("message_end"))])
            recorder.answers = [lambda r: second_stream]
            second = await client.chat("hi", "u", response_mode="blocking")
            modes = [b["response_mode"] for b in recorder.bodies]
            return [first.outputs["answer"], second.outputs["answer"], modes], client.streaming_only

    (first, second, modes), streaming_only = asyncio.run(go())
    assert (first, second) == ("ok", "again")
    assert modes == ["blocking", "streaming", "streaming"] and streaming_only


def test_other_bad_requests_are_not_retried_as_streaming() -> None:
    recorder = Recorder(dify_error(400, "invalid_param", "query is required"))
    with pytest.raises(BadRequestError):
        call(recorder, "chat", "", "u", response_mode="blocking")
    assert len(recorder.requests) == 1


def test_completion_blocking_and_streaming() -> None:
    blocking = {"event": "message", "task_id": TASK_ID, "id": "m-2", "message_id": "m-2", "mode": "completion",
                "answer": "Done.", "metadata": {"usage": USAGE}, "created_at": 1}
    recorder = Recorder(httpx.Response(200, json=blocking))
    result = call(recorder, "completion", {"topic": "x"}, "u", query="write", response_mode="blocking")
    assert result.outputs == {"answer": "Done."} and result.message_id == "m-2" and result.conversation_id is None
    assert recorder.requests[0].url.path == "/v1/completion-messages"
    assert recorder.bodies[0] == {"inputs": {"topic": "x"}, "query": "write", "user": "u", "response_mode": "blocking"}
    frames = [frame({"event": "message", "task_id": TASK_ID, "message_id": "m-3", "answer": "Do"}),
              frame({"event": "message", "task_id": TASK_ID, "message_id": "m-3", "answer": "ne"}),
              frame({"event": "message_end", "task_id": TASK_ID, "message_id": "m-3", "metadata": {"usage": USAGE}})]
    streamed = call(Recorder(sse(frames)), "completion", {}, "u")
    assert streamed.outputs == {"answer": "Done"} and streamed.message_id == "m-3" and streamed.total_tokens == 15


# ---- upload -----------------------------------------------------------------------------------------------------


def test_upload_sends_the_file_part_and_the_user_field(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.4 hello")
    answer = {"id": "72fa", "name": "report.pdf", "size": 14, "extension": "pdf", "mime_type": "application/pdf"}
    recorder = Recorder(httpx.Response(201, json=answer))
    assert call(recorder, "upload_file", path, "batch-1") == answer
    request = recorder.requests[0]
    assert request.url.path == "/v1/files/upload" and request.method == "POST"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    body = request.content
    assert b'Content-Disposition: form-data; name="user"\r\n\r\nbatch-1' in body
    assert b'name="file"; filename="report.pdf"\r\nContent-Type: application/pdf\r\n\r\n%PDF-1.4 hello' in body


def test_upload_name_and_type_can_be_given(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x")
    recorder = Recorder(httpx.Response(201, json={"id": "1"}))
    call(recorder, "upload_file", path, "u", filename="a.png", mime_type="image/png")
    assert b'filename="a.png"\r\nContent-Type: image/png' in recorder.requests[0].content


def test_upload_of_a_missing_file_is_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError):
        call(Recorder(httpx.Response(201, json={})), "upload_file", tmp_path / "nope.pdf", "u")


def test_upload_too_large_is_upload_error(tmp_path: Path) -> None:
    path = tmp_path / "big.pdf"
    path.write_bytes(b"x")
    with pytest.raises(UploadError) as caught:
        call(Recorder(dify_error(413, "file_too_large", "File size exceeded.")), "upload_file", path, "u")
    assert caught.value.url == f"{BASE}/files/upload"


# ---- against the simulator (real loopback server, default aiohttp transport) ------------------------------------

simulator = pytest.importorskip("runner.simulator")


def _counting_transport(opened: list[int]) -> httpx.AsyncBaseTransport:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    trace = aiohttp.TraceConfig()

    async def on_connection(*_: Any) -> None:
        opened.append(1)

    trace.on_connection_create_end.append(on_connection)
    return AiohttpTransport(client=lambda: aiohttp.ClientSession(trace_configs=[trace]))


@pytest.fixture(scope="module")
def sim_server() -> Any:
    config = simulator.SimConfig(latency="0.05", ping_interval=0.05, faults=[
        simulator.FaultRule("drop_stream", match="DROP-ME"), simulator.FaultRule("error_event", match="ERROR-ME"),
        simulator.FaultRule("stall_midrun", match="STALL-MID"), simulator.FaultRule("stall", match="STALL-START")])
    with simulator.SimulatorServer(config) as server:
        yield server


def test_simulator_workflow_blocking_and_streaming(sim_server: Any) -> None:
    async def go() -> list[Any]:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key) as client:
            params = await client.parameters()
            blocking = await client.run_workflow({"text": "hello"}, "sim-user", response_mode="blocking")
            streaming = await client.run_workflow({"text": "hello"}, "sim-user", response_mode="streaming")
            return [params, blocking, streaming]

    params, blocking, streaming = asyncio.run(go())
    assert [d.variable for d in params.inputs] == ["text"]
    assert blocking.ok and streaming.ok and blocking.outputs.keys() == streaming.outputs.keys()
    assert streaming.total_price is not None and streaming.currency == "USD" and not streaming.recovered


def test_simulator_dropped_stream_is_recovered_with_one_post(sim_server: Any) -> None:
    async def go() -> Any:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key, poll_interval=0.05) as client:
            return await client.run_workflow({"text": "row DROP-ME 1"}, "sim-user")

    result = asyncio.run(go())
    assert result.ok and result.recovered and result.workflow_run_id
    assert sim_server.sim.runs_for("DROP-ME 1") == 1


def test_simulator_stalls_mid_run_and_before_start(sim_server: Any) -> None:
    async def go(text: str, start_timeout: float, stall_timeout: float) -> Any:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key, poll_interval=0.05,
                              stall_timeout=stall_timeout, start_timeout=start_timeout) as client:
            return await client.run_workflow({"text": text}, "sim-user")

    result = asyncio.run(go("row STALL-MID", 10, 0.3))  # pings keep coming, events do not: look the run up
    assert result.ok and result.recovered and sim_server.sim.runs_for("STALL-MID") == 1
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(go("row STALL-START", 0.3, 10))
    assert caught.value.code == "stream_not_started" and sim_server.sim.runs_for("STALL-START") == 1


def test_simulator_error_event_is_provider_error(sim_server: Any) -> None:
    async def go() -> Any:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key) as client:
            return await client.run_workflow({"text": "row ERROR-ME"}, "sim-user")

    with pytest.raises(ProviderError) as caught:
        asyncio.run(go())
    assert caught.value.run_id


def test_simulator_connections_are_reused_across_rows(sim_server: Any) -> None:
    opened: list[int] = []

    async def go() -> list[Any]:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key,
                              transport=_counting_transport(opened)) as client:
            gate = asyncio.Semaphore(4)

            async def row(i: int) -> Any:
                async with gate:
                    mode = "streaming" if i % 2 else "blocking"
                    return await client.run_workflow({"text": f"reuse {i}"}, "sim-user", response_mode=mode)

            return await asyncio.gather(*(row(i) for i in range(40)))

    results = asyncio.run(go())
    assert all(r.ok for r in results)
    assert len(opened) <= 8  # 40 rows, 4 at a time: the pool, not one connection per row


def test_simulator_upload(sim_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello", encoding="utf-8")

    async def go() -> Any:
        async with DifyClient(sim_server.url, sim_server.sim.config.api_key) as client:
            return await client.upload_file(path, "sim-user")

    answer = asyncio.run(go())
    assert answer["name"] == "notes.txt" and answer["size"] == 5 and answer["id"]


def test_decoder_counts_but_does_not_parse_skipped_progress_frames() -> None:
    from runner.sse import SKIPPED, SSEDecoder, WorkflowEvents

    decoder = SSEDecoder(WorkflowEvents.SKIP)
    frames = decoder.feed(b'data: {"event": "node_started", "data": {not json}}\n\n'
                          b'data: {"event": "workflow_finished", "data": {"status": "succeeded"}}\n\n')
    assert frames[0] is SKIPPED and frames[1]["event"] == "workflow_finished"
