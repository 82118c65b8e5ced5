"""The local Dify simulator against its spec (shared/dify-api.md), over real HTTP on loopback."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from dify_client import ChatClient, CompletionClient, DifyClient

from runner.simulator import (
    FAULT_KINDS,
    RUN_PRICE,
    FaultRule,
    Latency,
    SimConfig,
    SimulatorServer,
    chat_answer,
    completion_answer,
    parse_fault,
    parse_latency,
    workflow_outputs,
)

KEY = "app-simulator-key"
FORM = [
    {"text-input": {"variable": "text", "label": "Text", "type": "text-input", "required": True, "max_length": 12}},
    {"select": {"variable": "tone", "label": "Tone", "type": "select", "required": False, "options": ["dry", "warm"]}},
    {"number": {"variable": "n", "label": "N", "type": "number", "required": False}},
    {
        "file": {
            "variable": "doc",
            "label": "Doc",
            "type": "file",
            "required": False,
            "allowed_file_types": ["document"],
            "allowed_file_upload_methods": ["local_file", "remote_url"],
        }
    },
]

Start = Callable[..., SimulatorServer]


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[SimulatorServer] = []

    def _start(**overrides: Any) -> SimulatorServer:
        settings: dict[str, Any] = {"ping_interval": 0.05, "hidden_rejection_seconds": 0.4}
        settings.update(overrides)
        server = SimulatorServer(SimConfig(**settings)).start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


def client(server: SimulatorServer, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def frames_of(text: str) -> list[Any]:
    """Raw SSE text -> ["ping" | payload dict]; fails on anything else (no [DONE], no event: lines on payloads)."""
    frames: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block == "event: ping":
            frames.append("ping")
        else:
            assert block.startswith("data: ") and "\n" not in block, block
            frames.append(json.loads(block[len("data: ") :]))
    assert text.endswith("\n\n")
    return frames


def events(frames: list[Any]) -> list[str]:
    return [f["event"] for f in frames if f != "ping"]


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[Any], float]:
    began = time.monotonic()
    with http.stream("POST", path, json={**body, "response_mode": "streaming"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    return frames_of(raw), time.monotonic() - began


def iter_frames(response: httpx.Response) -> Iterator[Any]:
    for line in response.iter_lines():
        if line == "event: ping":
            yield "ping"
        elif line.startswith("data: "):
            yield json.loads(line[6:])


def run_body(text: str = "hello", user: str = "u1", **inputs: Any) -> dict[str, Any]:
    return {"inputs": {"text": text, **inputs}, "user": user}


# ---------------------------------------------------------------------------------------------------------------
# Auth, routing, metadata
# ---------------------------------------------------------------------------------------------------------------


def test_auth_errors_are_401_json(start: Start) -> None:
    server = start()
    cases = [
        ({}, "Authorization header must be provided and start with 'Bearer'"),
        ({"Authorization": "Basic abc"}, "Authorization scheme must be 'Bearer'"),
        ({"Authorization": "Bearer app-wrong"}, "Access token is invalid"),
    ]
    for headers, message in cases:
        response = httpx.post(f"{server.url}/workflows/run", json=run_body(), headers=headers)
        assert response.status_code == 401
        assert response.json() == {"code": "unauthorized", "message": message, "status": 401}
    assert server.sim.count("/workflows/run", "401") == 3
    assert server.sim.runs == {}


def test_unknown_path_is_json_404_and_wrong_method_405(start: Start) -> None:
    server = start()
    with client(server) as http:
        missing = http.get("/nothing-here")
        wrong_method = http.post("/parameters")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"


def test_paths_outside_v1_answer_an_html_page(start: Start) -> None:
    server = start()
    base = server.url.removesuffix("/v1")
    for path in ("/", "/apps"):
        response = httpx.get(base + path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "<html" in response.text


def test_parameters_and_info_shapes(start: Start) -> None:
    server = start(input_form=FORM, app_name="Summariser", upload_limit_mb=7)
    with client(server) as http:
        params = http.get("/parameters", params={"user": "u1"}).json()
        info = http.get("/info").json()
    assert params["user_input_form"] == FORM
    assert params["system_parameters"]["file_size_limit"] == 7
    assert params["file_upload"]["image"]["enabled"] is False
    assert {"opening_statement", "suggested_questions", "speech_to_text"} <= set(params)
    assert info == {
        "name": "Summariser",
        "description": info["description"],
        "tags": [],
        "mode": "workflow",
        "author_name": info["author_name"],
    }


def test_default_input_form_is_one_required_text_input(start: Start) -> None:
    server = start()
    with client(server) as http:
        form = http.get("/parameters").json()["user_input_form"]
    assert form == [
        {
            "text-input": {
                "variable": "text",
                "label": "Text",
                "type": "text-input",
                "required": True,
                "max_length": 200,
                "default": "",
                "options": [],
            }
        }
    ]


# ---------------------------------------------------------------------------------------------------------------
# Workflows
# ---------------------------------------------------------------------------------------------------------------


def test_workflow_blocking_answer_shape(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.05))
    with client(server) as http:
        response = http.post("/workflows/run", json=run_body("héllo", extra_key="ignored"))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"task_id", "workflow_run_id", "data"}
    data = body["data"]
    assert set(data) == {
        "id", "workflow_id", "status", "outputs", "error", "elapsed_time",
        "total_tokens", "total_steps", "created_at", "finished_at",
    }  # fmt: skip
    assert data["id"] == body["workflow_run_id"]
    assert data["status"] == "succeeded" and data["error"] is None
    assert data["outputs"] == workflow_outputs({"text": "héllo"})
    assert data["elapsed_time"] >= 0.05 and data["total_tokens"] > 0
    assert server.sim.runs[data["id"]]["status"] == "succeeded"


def test_workflow_streaming_frames(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.3))
    with client(server) as http:
        with http.stream("POST", "/workflows/run", json={**run_body("héllo"), "response_mode": "streaming"}) as r:
            raw = r.read()
    assert "héllo".encode() in raw  # raw UTF-8, not \u escapes
    assert b"[DONE]" not in raw
    frames = frames_of(raw.decode())
    assert frames[0] == "ping"
    assert frames.count("ping") >= 3  # keep-alives while the LLM node runs
    assert events(frames) == [
        "workflow_started", "node_started", "node_finished", "node_started",
        "text_chunk", "text_chunk", "text_chunk", "node_finished", "node_started", "node_finished",
        "workflow_finished",
    ]  # fmt: skip
    assert frames[-1]["event"] == "workflow_finished"
    payloads = [f for f in frames if f != "ping"]
    run_id = payloads[0]["workflow_run_id"]
    assert all(f["workflow_run_id"] == run_id and f["task_id"] == payloads[0]["task_id"] for f in payloads)
    llm_done = payloads[7]["data"]
    assert llm_done["node_type"] == "llm"
    assert llm_done["execution_metadata"] == {"total_tokens": llm_done["execution_metadata"]["total_tokens"],
                                              "total_price": RUN_PRICE, "currency": "USD"}  # fmt: skip
    expected = workflow_outputs({"text": "héllo"})
    assert "".join(f["data"]["text"] for f in payloads if f["event"] == "text_chunk") == expected["text"]
    finished = frames[-1]["data"]
    assert finished["status"] == "succeeded" and finished["outputs"] == expected and finished["id"] == run_id
    assert server.sim.count("/workflows/run", "succeeded") == 1


def test_pinned_workflow_version(start: Start) -> None:
    server = start()
    workflow_id = server.sim.config.workflow_id
    with client(server) as http:
        ok = http.post(f"/workflows/{workflow_id}/run", json=run_body())
        unknown = http.post("/workflows/00000000-0000-4000-8000-000000000000/run", json=run_body())
        malformed = http.post("/workflows/draft/run", json=run_body())
    assert ok.status_code == 200 and ok.json()["data"]["workflow_id"] == workflow_id
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    assert malformed.status_code == 400 and malformed.json()["code"] == "bad_request"


def test_lookup_shows_running_then_final_run(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.4))
    with client(server) as http:
        with http.stream("POST", "/workflows/run", json={**run_body("x"), "response_mode": "streaming"}) as r:
            frames = iter_frames(r)
            started = next(f for f in frames if f != "ping")
            running = http.get(f"/workflows/run/{started['workflow_run_id']}").json()
            list(frames)
        final = http.get(f"/workflows/run/{started['workflow_run_id']}").json()
        missing = http.get("/workflows/run/00000000-0000-4000-8000-000000000000")
    assert running["status"] == "running" and running["finished_at"] is None
    assert set(final) == {
        "id", "workflow_id", "status", "inputs", "outputs", "error", "total_steps", "total_tokens",
        "created_at", "finished_at", "elapsed_time",
    }  # fmt: skip
    assert final["status"] == "succeeded" and final["outputs"] == workflow_outputs({"text": "x"})
    assert isinstance(final["inputs"], str) and json.loads(final["inputs"]) == {"text": "x"}
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_stop_ends_streaming_run_as_stopped(start: Start) -> None:
    server = start()
    with client(server) as http:
        http.post("/workflows/run", json=run_body(user="stopper"))  # end user exists: no race with the stop call
        server.sim.config.latency = Latency("fixed", 5.0)
        began = time.monotonic()
        with http.stream(
            "POST", "/workflows/run", json={**run_body(user="stopper"), "response_mode": "streaming"}
        ) as r:
            frames = iter_frames(r)
            task_id = next(f for f in frames if f != "ping")["task_id"]
            answer = http.post(f"/workflows/tasks/{task_id}/stop", json={"user": "stopper"})
            rest = [f for f in frames if f != "ping"]
    assert answer.json() == {"result": "success"}
    assert rest[-1]["event"] == "workflow_finished" and rest[-1]["data"]["status"] == "stopped"
    assert time.monotonic() - began < 3
    assert server.sim.count("/workflows/run", "stopped") == 1


def test_stop_by_another_user_is_ignored(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.2))
    with client(server) as http:
        with http.stream("POST", "/workflows/run", json={**run_body(user="owner"), "response_mode": "streaming"}) as r:
            frames = iter_frames(r)
            task_id = next(f for f in frames if f != "ping")["task_id"]
            answer = http.post(f"/workflows/tasks/{task_id}/stop", json={"user": "intruder"})
            rest = [f for f in frames if f != "ping"]
    assert answer.json() == {"result": "success"}
    assert rest[-1]["data"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": {"text": "a"}}, "Arg user must be provided."),
        ({"inputs": ["a"], "user": "u"}, "Input should be a valid dictionary"),
        ({"inputs": {}, "user": "u"}, "text is required in input form"),
        ({"inputs": {"text": ""}, "user": "u"}, "text is required in input form"),
        ({"inputs": {"text": "x" * 13}, "user": "u"}, "text in input form must be less than 12 characters"),
        ({"inputs": {"text": "a", "tone": "loud"}, "user": "u"},
         "tone in input form must be one of the following: ['dry', 'warm']"),
        ({"inputs": {"text": "a", "n": "many"}, "user": "u"}, "n in input form must be a valid number"),
        ({"inputs": {"text": "a", "doc": "a.pdf"}, "user": "u"}, "doc in input form must be a file"),
        ({"inputs": {"text": "a", "doc": {"type": "document", "transfer_method": "local_file",
                                          "upload_file_id": "00000000-0000-4000-8000-000000000000"}}, "user": "u"},
         "Invalid upload file"),
        ({"inputs": {"text": "a", "doc": {"type": "image", "transfer_method": "remote_url",
                                          "url": "https://example.com/a.png"}}, "user": "u"},
         "Detected file type does not match the specified type. Please verify the file."),
    ],
)  # fmt: skip
def test_blocking_validation_errors_are_400_invalid_param(start: Start, body: dict[str, Any], message: str) -> None:
    server = start(input_form=FORM)
    with client(server) as http:
        response = http.post("/workflows/run", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_param"
    assert message in response.json()["message"]
    assert server.sim.runs == {}


def test_valid_inputs_are_converted_and_unknown_keys_ignored(start: Start) -> None:
    server = start(input_form=FORM)
    with client(server) as http:
        body = run_body("ok", tone="warm", n="3", other="ignored")
        body["inputs"]["doc"] = {"type": "document", "transfer_method": "remote_url", "url": "https://x.org/r.pdf"}
        outputs = http.post("/workflows/run", json=body).json()["data"]["outputs"]
    assert outputs == workflow_outputs({"text": "ok", "tone": "warm", "n": 3, "doc": "https://x.org/r.pdf"})


def test_streaming_hides_validation_rejection(start: Start) -> None:
    server = start(input_form=FORM, hidden_rejection_seconds=0.3)
    with client(server) as http:
        frames, took = stream(http, "/workflows/run", {"inputs": {}, "user": "u"})
    assert frames == ["ping"]
    assert took >= 0.3
    assert server.sim.count("/workflows/run", "rejected") == 1
    assert server.sim.requests[-1].error == "text is required in input form"


def test_streaming_rejection_pings_only_once_then_silence(start: Start) -> None:
    server = start(hidden_rejection_seconds=0.3, ping_interval=0.02)
    with client(server) as http:
        frames, _ = stream(http, "/workflows/run", {"inputs": {"text": "x" * 300}, "user": "u"})
    assert frames == ["ping"]


def test_app_mode_mismatch_errors(start: Start) -> None:
    workflow = start()
    chat = start(app_mode="chat")
    with client(workflow) as http:
        not_chat = http.post("/chat-messages", json={"inputs": {}, "query": "hi", "user": "u"})
        not_completion = http.post("/completion-messages", json={"inputs": {}, "user": "u"})
    with client(chat) as http:
        not_workflow = http.post("/workflows/run", json=run_body())
    assert (not_chat.status_code, not_chat.json()["code"]) == (400, "not_chat_app")
    assert (not_completion.status_code, not_completion.json()["code"]) == (400, "app_unavailable")
    assert (not_workflow.status_code, not_workflow.json()["code"]) == (400, "not_workflow_app")


# ---------------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("429", 429, "too_many_requests"),
        ("too_many_400", 400, "invalid_param"),
        ("500", 500, "internal_server_error"),
        ("completion_error", 400, "completion_request_error"),
        ("rate_limit_error", 429, "rate_limit_error"),
    ],
)
@pytest.mark.parametrize("mode", ["blocking", "streaming"])
def test_error_faults_answer_json_before_any_run(start: Start, kind: str, status: int, code: str, mode: str) -> None:
    server = start(faults=[FaultRule(kind)], max_active_requests=4)
    with client(server) as http:
        response = http.post("/workflows/run", json={**run_body(), "response_mode": mode})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == code
    if kind in ("429", "too_many_400"):
        assert response.json()["message"].startswith("Too many requests.")
        assert response.json()["message"].endswith("maximum concurrent requests allowed is 4.")
    assert server.sim.runs == {}
    assert server.sim.count(outcome=str(status)) == 1


def test_502_fault_is_an_nginx_html_page(start: Start) -> None:
    server = start(faults=["502_html"])
    with client(server) as http:
        response = http.post("/workflows/run", json=run_body())
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "502 Bad Gateway" in response.text and "nginx" in response.text


def test_failed_run_is_http_200_with_failed_status(start: Start) -> None:
    server = start(faults=["failed_run"])
    with client(server) as http:
        blocking = http.post("/workflows/run", json=run_body()).json()["data"]
        frames, _ = stream(http, "/workflows/run", run_body())
    assert blocking["status"] == "failed" and blocking["error"].startswith("Node LLM run failed:")
    finished = frames[-1]
    assert finished["event"] == "workflow_finished"
    assert finished["data"]["status"] == "failed" and finished["data"]["error"].startswith("Node LLM run failed:")
    assert server.sim.count("/workflows/run", "failed") == 2


def test_error_event_fault_is_in_band_when_streaming(start: Start) -> None:
    server = start(faults=["error_event"])
    with client(server) as http:
        frames, _ = stream(http, "/workflows/run", run_body())
        blocking = http.post("/workflows/run", json=run_body())
    assert events(frames) == ["workflow_started", "error"]
    error = frames[-1]
    assert set(error) == {"event", "workflow_run_id", "code", "status", "message"}
    assert (error["code"], error["status"]) == ("completion_request_error", 400)
    assert error["workflow_run_id"] == frames[1]["workflow_run_id"]
    assert blocking.status_code == 400 and blocking.json()["code"] == "completion_request_error"
    assert server.sim.runs[error["workflow_run_id"]]["status"] == "failed"


def test_drop_stream_closes_early_while_run_succeeds_server_side(start: Start) -> None:
    server = start(faults=["drop_stream"], latency=Latency("fixed", 0.2))
    with client(server) as http:
        frames, took = stream(http, "/workflows/run", run_body("dropped"))
        assert events(frames) == ["workflow_started", "node_started", "node_finished", "node_started"]
        assert took < 0.2
        run_id = frames[1]["workflow_run_id"]
        assert http.get(f"/workflows/run/{run_id}").json()["status"] == "running"
        time.sleep(0.3)
        final = http.get(f"/workflows/run/{run_id}").json()
        blocking = http.post("/workflows/run", json=run_body("dropped")).json()["data"]
    assert final["status"] == "succeeded" and final["outputs"] == workflow_outputs({"text": "dropped"})
    assert blocking["status"] == "succeeded"
    assert server.sim.count("/workflows/run", "dropped") == 1


def test_stall_fault_pings_without_starting_a_run(start: Start) -> None:
    server = start(faults=["stall"], hidden_rejection_seconds=0.3)
    with client(server) as http:
        frames, took = stream(http, "/workflows/run", run_body())
    assert set(frames) == {"ping"} and len(frames) >= 3
    assert took >= 0.3
    assert server.sim.runs == {}
    assert server.sim.count("/workflows/run", "stalled") == 1


def test_stall_midrun_goes_silent_while_run_succeeds(start: Start) -> None:
    server = start(faults=["stall_midrun"], latency=Latency("fixed", 0.1), hidden_rejection_seconds=0.4)
    with client(server) as http:
        frames, took = stream(http, "/workflows/run", run_body("quiet"))
    assert events(frames) == ["workflow_started", "node_started", "node_finished", "node_started"]
    assert frames[-1] == "ping" and took >= 0.4
    run = server.sim.runs[frames[1]["workflow_run_id"]]
    assert run["status"] == "succeeded"


def test_blocking_stall_ends_in_gateway_timeout(start: Start) -> None:
    server = start(faults=["stall_midrun"], hidden_rejection_seconds=0.2)
    with client(server) as http:
        response = http.post("/workflows/run", json=run_body())
    assert response.status_code == 504 and "Gateway Time-out" in response.text
    assert [run["status"] for run in server.sim.runs.values()] == ["succeeded"]


def test_fault_times_counts_per_request_content(start: Start) -> None:
    server = start(faults=["500:1:match=ROW-1:times=2"])
    with client(server) as http:
        row1 = [http.post("/workflows/run", json=run_body("ROW-1")).status_code for _ in range(4)]
        row1_other_content = http.post("/workflows/run", json=run_body("ROW-1 b")).status_code
        row2 = [http.post("/workflows/run", json=run_body("ROW-2")).status_code for _ in range(2)]
    assert row1 == [500, 500, 200, 200]
    assert row1_other_content == 500
    assert row2 == [200, 200]
    assert server.sim.runs_for("ROW-1") == 5


def test_fault_probability_is_seeded(start: Start) -> None:
    outcomes = []
    for _ in range(2):
        server = start(faults=[FaultRule("500", probability=0.5)], seed=7)
        with client(server) as http:
            outcomes.append([http.post("/workflows/run", json=run_body(f"r{i}")).status_code for i in range(12)])
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 500}


# ---------------------------------------------------------------------------------------------------------------
# Concurrency cap, disconnects
# ---------------------------------------------------------------------------------------------------------------


def _concurrent(calls: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def work(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


@pytest.mark.parametrize(
    ("cap_style", "status", "code"), [("429", 429, "too_many_requests"), ("400", 400, "invalid_param")]
)
def test_concurrency_cap_rejects_at_once(start: Start, cap_style: str, status: int, code: str) -> None:
    server = start(max_active_requests=2, cap_style=cap_style, latency=Latency("fixed", 0.4))

    def post() -> tuple[int, str, float]:
        began = time.monotonic()
        response = httpx.post(
            f"{server.url}/workflows/run", json=run_body(), headers={"Authorization": f"Bearer {KEY}"}
        )
        return response.status_code, response.json().get("code", ""), time.monotonic() - began

    results = _concurrent([post] * 5)
    assert sorted(r[0] for r in results) == sorted([200, 200] + [status] * 3)
    rejected = [r for r in results if r[0] == status]
    assert all(r[1] == code and r[2] < 0.3 for r in rejected)
    assert server.sim.max_in_flight == 2
    assert server.sim.in_flight == 0


def test_streams_hold_the_slot_and_client_disconnect_frees_it(start: Start) -> None:
    server = start(max_active_requests=1, latency=Latency("fixed", 5.0))
    with client(server) as http:
        with http.stream("POST", "/workflows/run", json={**run_body("a"), "response_mode": "streaming"}) as r:
            frames = iter_frames(r)  # keep a reference: a closed iterator closes the connection
            next(f for f in frames if f != "ping")
            assert http.post("/workflows/run", json=run_body("b")).status_code == 429
        deadline = time.monotonic() + 2
        while server.sim.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.sim.in_flight == 0
        server.sim.config.latency = Latency("fixed", 0.0)
        assert http.post("/workflows/run", json=run_body("c")).status_code == 200
    assert server.sim.count("/workflows/run", "dropped") == 1


# ---------------------------------------------------------------------------------------------------------------
# Chat, agent, completion
# ---------------------------------------------------------------------------------------------------------------


def chat_body(query: str, user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"inputs": {"text": "ctx"}, "query": query, "user": user, **extra}


def test_chat_conversation_counts_turns(start: Start) -> None:
    server = start(app_mode="chat")
    with client(server) as http:
        first = http.post("/chat-messages", json=chat_body("hello")).json()
        conversation_id = first["conversation_id"]
        second = http.post("/chat-messages", json=chat_body("again", conversation_id=conversation_id)).json()
        fresh = http.post("/chat-messages", json=chat_body("new", conversation_id="")).json()
        unknown = http.post(
            "/chat-messages", json=chat_body("x", conversation_id="00000000-0000-4000-8000-00000000000a")
        )
        foreign = http.post("/chat-messages", json=chat_body("x", user="u2", conversation_id=conversation_id))
        malformed = http.post("/chat-messages", json=chat_body("x", conversation_id="not-a-uuid"))
        no_query = http.post("/chat-messages", json={"inputs": {}, "user": "u1"})
    assert set(first) == {"event", "task_id", "id", "message_id", "conversation_id", "mode", "answer", "metadata",
                          "created_at"}  # fmt: skip
    assert first["event"] == "message" and first["mode"] == "chat"
    assert first["answer"] == chat_answer("hello", 1, {"text": "ctx"})
    assert second["answer"] == chat_answer("again", 2, {"text": "ctx"}) and "[turn 2]" in second["answer"]
    assert second["conversation_id"] == conversation_id
    assert fresh["conversation_id"] != conversation_id and "[turn 1]" in fresh["answer"]
    usage = first["metadata"]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["total_price"] == RUN_PRICE and usage["currency"] == "USD"
    assert first["metadata"]["retriever_resources"] == []
    for response in (unknown, foreign):
        assert response.status_code == 404
        assert response.json() == {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
    assert malformed.status_code == 400 and no_query.status_code == 400


def test_chat_streaming_frames(start: Start) -> None:
    server = start(app_mode="chat", latency=Latency("fixed", 0.15))
    with client(server) as http:
        frames, _ = stream(http, "/chat-messages", chat_body("stream me"))
    assert frames[0] == "ping" and "ping" in frames[1:]
    names = events(frames)
    assert names[-1] == "message_end" and names.count("message") >= 2
    payloads = [f for f in frames if f != "ping"]
    answer = "".join(f["answer"] for f in payloads if f["event"] == "message")
    assert answer == chat_answer("stream me", 1, {"text": "ctx"})
    assert len({f["conversation_id"] for f in payloads}) == 1 and len({f["message_id"] for f in payloads}) == 1
    assert frames[-1]["metadata"]["usage"]["total_price"] == RUN_PRICE


def test_advanced_chat_stream_has_workflow_events_around_message_end(start: Start) -> None:
    server = start(app_mode="advanced-chat", latency=Latency("fixed", 0.05))
    with client(server) as http:
        frames, _ = stream(http, "/chat-messages", chat_body("hi"))
        payloads = [f for f in frames if f != "ping"]
        run = http.get(f"/workflows/run/{payloads[0]['workflow_run_id']}").json()
    names = events(frames)
    assert names[0] == "workflow_started" and names[-2:] == ["message_end", "workflow_finished"]
    started = payloads[0]
    assert started["conversation_id"] and started["message_id"]
    assert frames[-1]["data"]["status"] == "succeeded"
    assert run["status"] == "succeeded" and run["outputs"] == {"answer": chat_answer("hi", 1, {"text": "ctx"})}


def test_agent_chat_refuses_blocking_and_streams_agent_messages(start: Start) -> None:
    server = start(app_mode="agent-chat")
    with client(server) as http:
        blocking = http.post("/chat-messages", json=chat_body("hi"))
        implicit = http.post("/chat-messages", json={**chat_body("hi"), "response_mode": None})
        frames, _ = stream(http, "/chat-messages", chat_body("hi"))
    for response in (blocking, implicit):
        assert response.status_code == 400
        assert response.json()["message"] == "Agent Chat App does not support blocking mode"
    names = events(frames)
    assert "agent_message" in names and "message" not in names and names[-1] == "message_end"


def test_chat_failures_and_drop_stream(start: Start) -> None:
    server = start(app_mode="chat", faults=["failed_run:1:match=FAIL", "drop_stream:1:match=DROP"])
    with client(server) as http:
        failed_blocking = http.post("/chat-messages", json=chat_body("FAIL"))
        failed_stream, _ = stream(http, "/chat-messages", chat_body("FAIL"))
        dropped, _ = stream(http, "/chat-messages", chat_body("DROP"))
    assert failed_blocking.status_code == 400 and failed_blocking.json()["code"] == "completion_request_error"
    assert events(failed_stream) == ["error"]
    assert events(dropped) == ["message"]


def test_advanced_chat_failure_and_chat_error_event(start: Start) -> None:
    advanced = start(app_mode="advanced-chat", faults=["failed_run"])
    chat = start(app_mode="chat", faults=["error_event"])
    with client(advanced) as http:
        failed, _ = stream(http, "/chat-messages", chat_body("x"))
        failed_blocking = http.post("/chat-messages", json=chat_body("x"))
    with client(chat) as http:
        errored, _ = stream(http, "/chat-messages", chat_body("x"))
    assert events(failed)[-2:] == ["workflow_finished", "error"]
    assert failed[-2]["data"]["status"] == "failed" and failed[-1]["message"].startswith("Run failed: ")
    assert failed_blocking.status_code == 400
    assert events(errored) == ["error"] and errored[-1]["code"] == "completion_request_error"
    assert advanced.sim.count("/chat-messages", "failed") == 2 and chat.sim.count("/chat-messages", "error") == 1


def test_connection_lingers_after_terminal_event_when_asked(start: Start) -> None:
    server = start(linger_after_terminal=0.3)
    with client(server) as http:
        frames, took = stream(http, "/workflows/run", run_body())
    assert frames[-1]["event"] == "workflow_finished" and took >= 0.3


def test_completion_app(start: Start) -> None:
    server = start(app_mode="completion")
    with client(server) as http:
        blocking = http.post("/completion-messages", json={"inputs": {"text": "t"}, "user": "u"}).json()
        frames, _ = stream(http, "/completion-messages", {"inputs": {"text": "t"}, "query": "q", "user": "u"})
        missing_inputs = http.post("/completion-messages", json={"user": "u"})
        wrong_route = http.post("/chat-messages", json=chat_body("x"))
    assert blocking["mode"] == "completion" and "conversation_id" not in blocking
    assert blocking["answer"] == completion_answer("", {"text": "t"})
    payloads = [f for f in frames if f != "ping"]
    assert "".join(f["answer"] for f in payloads if f["event"] == "message") == completion_answer("q", {"text": "t"})
    assert payloads[-1]["event"] == "message_end"
    assert missing_inputs.status_code == 400 and missing_inputs.json()["code"] == "invalid_param"
    assert wrong_route.json()["code"] == "not_chat_app"


# ---------------------------------------------------------------------------------------------------------------
# Files and end users
# ---------------------------------------------------------------------------------------------------------------


def upload(http: httpx.Client, name: str, user: str | None, size: int = 10) -> httpx.Response:
    data = {"user": user} if user else {}
    return http.post("/files/upload", files={"file": (name, b"x" * size)}, data=data)


def doc_input(upload_id: str, kind: str = "document") -> dict[str, Any]:
    return {"type": kind, "transfer_method": "local_file", "upload_file_id": upload_id}


def test_upload_then_use_in_a_run(start: Start) -> None:
    server = start(input_form=FORM)
    with client(server) as http:
        uploaded = upload(http, "notes.pdf", "alice")
        file_id = uploaded.json()["id"]
        ok = http.post("/workflows/run", json={"inputs": {"text": "a", "doc": doc_input(file_id)}, "user": "alice"})
        other_user = http.post(
            "/workflows/run", json={"inputs": {"text": "a", "doc": doc_input(file_id)}, "user": "bob"}
        )
        wrong_type = http.post(
            "/workflows/run", json={"inputs": {"text": "a", "doc": doc_input(file_id, "image")}, "user": "alice"}
        )
        bad_id = http.post("/workflows/run", json={"inputs": {"text": "a", "doc": doc_input("123")}, "user": "alice"})
    assert uploaded.status_code == 201
    body = uploaded.json()
    assert set(body) == {"id", "name", "size", "extension", "mime_type", "created_by", "created_at"}
    assert (body["name"], body["size"], body["extension"]) == ("notes.pdf", 10, "pdf")
    assert body["mime_type"] == "application/pdf"
    assert body["created_by"] == server.sim.end_users["alice"][0]
    assert ok.json()["data"]["outputs"] == workflow_outputs({"text": "a", "doc": "notes.pdf"})
    assert other_user.status_code == 400 and other_user.json()["message"] == "Invalid upload file"
    assert wrong_type.json()["message"].startswith("Detected file type does not match")
    assert bad_id.json()["message"] == "Invalid upload file id format"


def test_upload_errors(start: Start) -> None:
    server = start(upload_limit_mb=1)
    with client(server) as http:
        no_file = http.post("/files/upload", data={"user": "u"})
        too_big = upload(http, "big.bin", "u", size=1024 * 1024 + 1)
        odd_extension = upload(http, "data.weird", None)
    assert (no_file.status_code, no_file.json()["code"]) == (400, "no_file_uploaded")
    assert too_big.status_code == 413
    assert too_big.json() == {"code": "file_too_large", "message": "File size exceeded.", "status": 413}
    assert odd_extension.status_code == 201
    assert odd_extension.json()["created_by"] == server.sim.end_users["DEFAULT-USER"][0]


def test_chat_files_are_checked_and_mentioned(start: Start) -> None:
    server = start(app_mode="chat")
    with client(server) as http:
        file_id = upload(http, "cat.png", "u1").json()["id"]
        answer = http.post("/chat-messages", json=chat_body("look", files=[doc_input(file_id, "image")])).json()
        foreign = http.post("/chat-messages", json=chat_body("look", user="u2", files=[doc_input(file_id, "image")]))
    assert answer["answer"] == chat_answer("look", 1, {"text": "ctx"}, ["cat.png"])
    assert foreign.status_code == 400 and foreign.json()["message"] == "Invalid upload file"


def test_end_user_race_splits_conversations(start: Start) -> None:
    server = start(app_mode="chat", latency=Latency("fixed", 0.3))

    def first_message() -> str:
        with client(server) as http:
            return str(http.post("/chat-messages", json=chat_body("hi", user="racer")).json()["conversation_id"])

    conversations = _concurrent([first_message, first_message])
    end_users = server.sim.end_users["racer"]
    assert len(end_users) == 2
    server.sim.config.latency = Latency("fixed", 0.0)
    with client(server) as http:
        statuses = {
            c: http.post("/chat-messages", json=chat_body("again", user="racer", conversation_id=c)).status_code
            for c in conversations
        }
    owner = {c: server.sim.conversations[c]["end_user_id"] for c in conversations}
    assert statuses == {c: 200 if owner[c] == end_users[0] else 404 for c in conversations}


def test_end_user_race_catches_uploads_during_the_first_run(start: Start) -> None:
    server = start(input_form=FORM, latency=Latency("fixed", 0.4))
    with client(server) as http:
        first = threading.Thread(
            target=lambda: httpx.post(
                f"{server.url}/workflows/run", json=run_body(user="newbie"), headers={"Authorization": f"Bearer {KEY}"}
            )
        )
        first.start()
        time.sleep(0.15)
        early_id = upload(http, "early.pdf", "newbie").json()["id"]
        first.join(5)
        late_id = upload(http, "late.pdf", "newbie").json()["id"]
        server.sim.config.latency = Latency("fixed", 0.0)
        early = http.post(
            "/workflows/run", json={"inputs": {"text": "a", "doc": doc_input(early_id)}, "user": "newbie"}
        )
        late = http.post("/workflows/run", json={"inputs": {"text": "a", "doc": doc_input(late_id)}, "user": "newbie"})
    assert early.status_code == 400 and early.json()["message"] == "Invalid upload file"
    assert late.status_code == 200
    assert len(server.sim.end_users["newbie"]) == 2


def test_without_end_user_race_one_value_is_one_end_user(start: Start) -> None:
    server = start(app_mode="chat", latency=Latency("fixed", 0.2), end_user_race=False)

    def first_message() -> int:
        with client(server) as http:
            return http.post("/chat-messages", json=chat_body("hi", user="calm")).status_code

    assert _concurrent([first_message, first_message]) == [200, 200]
    assert len(server.sim.end_users["calm"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# Records, server lifecycle
# ---------------------------------------------------------------------------------------------------------------


def test_records_count_and_reset(start: Start) -> None:
    server = start(faults=["500:1:match=BAD"])
    with client(server) as http:
        http.post("/workflows/run", json=run_body("good-1"))
        http.post("/workflows/run", json=run_body("BAD"))
        http.post("/workflows/run", json={**run_body("good-1"), "response_mode": "streaming"})
        http.get("/parameters")
    sim = server.sim
    assert sim.count() == 4
    assert sim.count("/workflows/run") == 3 and sim.count("workflows/run", "succeeded") == 2
    assert sim.count(outcome="500") == 1 and sim.count("/parameters", "ok") == 1
    assert sim.runs_for("good-1") == 2 and sim.runs_for("BAD") == 1
    record = sim.requests[0]
    assert (record.user, record.inputs, record.response_mode, record.status_code) == (
        "u1",
        {"text": "good-1"},
        None,
        200,
    )
    assert record.run_id in sim.runs and record.ended is not None and record.ended >= record.started
    sim.reset_records()
    assert sim.count() == 0 and sim.runs_for("good-1") == 0
    assert len(sim.runs) == 2  # state survives; only the records are cleared


def test_restart_keeps_port_and_state(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.3))
    port = server.port
    with client(server) as http:
        run_id = http.post("/workflows/run", json=run_body()).json()["workflow_run_id"]
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/info", headers={"Authorization": f"Bearer {KEY}"})
    server.start()
    assert server.port == port
    with client(server) as http:
        assert http.get(f"/workflows/run/{run_id}").json()["status"] == "succeeded"


def test_restart_cuts_open_streams_and_runs_still_finish(start: Start) -> None:
    server = start(latency=Latency("fixed", 0.4))
    with client(server) as http:
        with http.stream("POST", "/workflows/run", json={**run_body(), "response_mode": "streaming"}) as r:
            frames = iter_frames(r)
            run_id = next(f for f in frames if f != "ping")["workflow_run_id"]
            server.restart()
            rest = list(frames)
    assert "workflow_finished" not in [f["event"] for f in rest if f != "ping"]  # EOF without a terminal event

    def blocking() -> httpx.Response:
        return httpx.post(f"{server.url}/workflows/run", json=run_body(), headers={"Authorization": f"Bearer {KEY}"})

    cut: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: cut.append(blocking()))
    waiter.start()
    time.sleep(0.1)
    server.restart()
    waiter.join(5)
    assert cut[0].status_code == 502  # the gateway saw its upstream go away
    time.sleep(0.45)
    assert server.sim.runs[run_id]["status"] == "succeeded"
    assert server.sim.in_flight == 0


# ---------------------------------------------------------------------------------------------------------------
# Official SDK (dify-client 0.1.10)
# ---------------------------------------------------------------------------------------------------------------


def test_official_sdk_talks_to_the_simulator(start: Start) -> None:
    workflow, chat, completion = start(), start(app_mode="chat"), start(app_mode="completion")
    sdk = DifyClient(KEY)
    sdk.base_url = workflow.url
    params = sdk.get_application_parameters("sdk-user")
    assert params.status_code == 200 and params.json()["user_input_form"][0]["text-input"]["variable"] == "text"
    body = {"inputs": {"text": "sdk"}, "response_mode": "blocking", "user": "sdk-user"}
    blocking = sdk._send_request("POST", "/workflows/run", body)
    assert blocking.json()["data"]["outputs"] == workflow_outputs({"text": "sdk"})
    streamed = sdk._send_request("POST", "/workflows/run", {**body, "response_mode": "streaming"}, stream=True)
    lines = [line.decode() for line in streamed.iter_lines() if line.startswith(b"data: ")]
    streamed.close()
    assert json.loads(lines[-1][6:])["data"]["status"] == "succeeded"

    chat_client = ChatClient(KEY)
    chat_client.base_url = chat.url
    first = chat_client.create_chat_message({"text": "c"}, "hi", "sdk-user").json()
    second = chat_client.create_chat_message(
        {"text": "c"}, "more", "sdk-user", conversation_id=first["conversation_id"]
    )
    assert "[turn 2]" in second.json()["answer"]

    completion_client = CompletionClient(KEY)
    completion_client.base_url = completion.url
    answer = completion_client.create_completion_message({"text": "c"}, "blocking", "sdk-user").json()
    assert answer["answer"] == completion_answer("", {"text": "c"})
    response = completion_client.create_completion_message({"text": "c"}, "streaming", "sdk-user")
    assert isinstance(response, requests.Response)
    assert any(b"message_end" in line for line in response.iter_lines())
    response.close()


# ---------------------------------------------------------------------------------------------------------------
# Configuration parsing
# ---------------------------------------------------------------------------------------------------------------


def test_parse_latency() -> None:
    assert parse_latency("0.2") == Latency("fixed", 0.2)
    assert parse_latency("fixed:1") == Latency("fixed", 1.0)
    assert parse_latency("uniform:0.1,0.5") == Latency("uniform", 0.1, 0.5)
    assert parse_latency("lognormal:0.5,8") == Latency("lognormal", 0.5, 8.0)
    for bad in ("", "fast", "uniform:0.5", "uniform:2,1", "lognormal:0,3", "fixed:-1", "gamma:1,2"):
        with pytest.raises(ValueError, match="latency"):
            parse_latency(bad)


def test_latency_samples_follow_their_distribution() -> None:
    rng = random.Random(1)
    assert Latency("fixed", 0.3).sample(rng) == 0.3
    uniform = [Latency("uniform", 1, 2).sample(rng) for _ in range(200)]
    assert all(1 <= x <= 2 for x in uniform)
    lognormal = sorted(Latency("lognormal", 0.5, 8).sample(rng) for _ in range(4000))
    assert 0.4 < lognormal[2000] < 0.6
    assert 5 < lognormal[3960] < 13


def test_parse_fault() -> None:
    assert parse_fault("500") == FaultRule("500")
    assert parse_fault("429:0.1") == FaultRule("429", 0.1)
    assert parse_fault("drop_stream:0.5:match=ROW-7") == FaultRule("drop_stream", 0.5, "ROW-7")
    assert parse_fault("failed_run:1:match=X:times=2") == FaultRule("failed_run", 1.0, "X", 2)
    assert parse_fault("stall:match=a:b") == FaultRule("stall", 1.0, "a:b")
    assert set(FAULT_KINDS) >= {"429", "502_html", "stall_midrun"}
    for bad in ("boom", "500:2", "500:x", "500:1:times=0", "500:1:color=red"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_config_from_toml_and_json(tmp_path: Any) -> None:
    toml_file = tmp_path / "sim.toml"
    toml_file.write_text(
        'app_mode = "chat"\nlatency = "lognormal:0.5,8"\nfaults = ["429:0.1", "500:1:match=X:times=2"]\n'
        "max_active_requests = 3\ncap_style = 400\n",
        encoding="utf-8",
    )
    config = SimConfig.from_file(toml_file)
    assert config.app_mode == "chat" and config.latency == Latency("lognormal", 0.5, 8.0)
    assert config.faults == [FaultRule("429", 0.1), FaultRule("500", 1.0, "X", 2)]
    assert (config.max_active_requests, config.cap_style) == (3, "400")
    json_file = tmp_path / "sim.json"
    json_file.write_text(json.dumps({"latency": 0.25, "input_form": FORM}), encoding="utf-8")
    assert SimConfig.from_file(json_file).latency == Latency("fixed", 0.25)
    json_file.write_text(json.dumps({"latnecy": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="latnecy"):
        SimConfig.from_file(json_file)
    with pytest.raises(ValueError, match="app_mode"):
        SimConfig(app_mode="chatbot")
