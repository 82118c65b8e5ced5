"""The synchronous `Dify` client, `StreamedChat`, `file_input`, `ConversationCache`, and `on_text` of DifyClient,
against the simulator on a real loopback port."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from runner.conversations import ConversationCache
from runner.dify import DifyClient
from runner.errors import AuthError, ConfigError, ProviderError, RunFailedError, StateError
from runner.simulator import SimulatorServer, completion_answer, workflow_outputs
from runner.sync import Dify, StreamedChat, file_input

from .conftest import API_KEY, start_server


@pytest.fixture
def chat_server() -> Iterator[SimulatorServer]:
    srv = start_server(app_mode="chat", input_form=[], hidden_rejection_seconds=0.2)
    yield srv
    srv.stop()


@pytest.fixture
def dify(chat_server: SimulatorServer) -> Iterator[Dify]:
    with Dify(base_url=chat_server.url) as client:
        yield client


def chat_posts(srv: SimulatorServer) -> int:
    return srv.sim.count("/chat-messages")


# ---- Dify: calls ------------------------------------------------------------------------------------------------


def test_chat_returns_the_whole_answer_and_continues_the_conversation(dify: Dify, chat_server: SimulatorServer) -> None:
    first = dify.chat("hello", "alice")
    second = dify.chat("again", "alice", conversation_id=first.conversation_id)
    assert first.ok and first.outputs["answer"] == "[turn 1] You said: hello"
    assert second.outputs["answer"] == "[turn 2] You said: again"
    assert second.conversation_id == first.conversation_id
    assert {rec.response_mode for rec in chat_server.sim.requests if rec.endpoint == "/chat-messages"} == {"streaming"}


def test_chat_blocking_mode_on_request(dify: Dify, chat_server: SimulatorServer) -> None:
    result = dify.chat("hello", "alice", response_mode="blocking")
    assert result.outputs["answer"] == "[turn 1] You said: hello"
    assert chat_server.sim.requests[-1].response_mode == "blocking"


def test_chat_stream_yields_chunks_then_the_result(dify: Dify) -> None:
    stream = dify.chat_stream("tell me a story", "bob")
    chunks = list(stream)
    assert len(chunks) >= 2
    assert "".join(chunks) == stream.text == stream.result.outputs["answer"] == "[turn 1] You said: tell me a story"
    assert stream.result.conversation_id
    follow_up = dify.chat_stream("more", "bob", conversation_id=stream.result.conversation_id)
    assert follow_up.result.outputs["answer"] == "[turn 2] You said: more"  # .result alone drains the chunks
    assert follow_up.text == "[turn 2] You said: more"


def test_chat_stream_can_be_left_early_and_still_gives_the_result(dify: Dify) -> None:
    with dify.chat_stream("hello there", "carol") as stream:
        first = next(iter(stream))
        assert stream.result.outputs["answer"].startswith(first)
    assert isinstance(stream, StreamedChat) and "done" in repr(stream)


def test_chat_stream_raises_the_error_from_the_loop_and_from_result() -> None:
    with start_server(app_mode="chat", input_form=[], faults=["error_event:1:match=BOOM"]) as srv, \
            Dify(base_url=srv.url) as client:
        stream = client.chat_stream("BOOM", "dave")
        with pytest.raises(ProviderError):
            for _ in stream:
                pass
        with pytest.raises(ProviderError):
            _ = stream.result


def test_upload_a_document_then_ask_about_it(dify: Dify, tmp_path: Path) -> None:
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF-1.4 tiny")
    upload = dify.upload_file(doc, "erin")
    assert upload["name"] == "report.pdf" and upload["id"]
    answer = dify.chat("summarise it", "erin", files=[file_input(upload)]).outputs["answer"]
    assert answer == "[turn 1] You said: summarise it | files: report.pdf"
    notes = tmp_path / "notes.md"
    notes.write_text("# notes", encoding="utf-8")
    attached = dify.attach(notes, "erin")
    assert attached["type"] == "document" and attached["transfer_method"] == "local_file"
    assert "files: notes.md" in dify.chat("and this?", "erin", files=[attached]).outputs["answer"]


@pytest.mark.parametrize(("name", "kind"), [("a.PDF", "document"), ("b.png", "image"), ("c.mp3", "audio"),
                                            ("d.mp4", "video"), ("e.webm", "video"), ("f.xyz", "custom"), ("g", "custom")])
def test_file_input_type_follows_the_file_name(name: str, kind: str) -> None:
    assert file_input({"id": "u-1", "name": name}) == {"type": kind, "transfer_method": "local_file",
                                                        "upload_file_id": "u-1"}


def test_file_input_explicit_type_wins_and_needs_an_upload_record() -> None:
    assert file_input({"id": "u-1", "name": "a.txt"}, type="custom")["type"] == "custom"
    with pytest.raises(ConfigError, match="not an upload record"):
        file_input({"name": "a.txt"})


def test_run_workflow_returns_outputs() -> None:
    with start_server() as srv, Dify(base_url=srv.url) as client:
        result = client.run_workflow({"text": "hello"}, "frank")
        assert result.ok and result.workflow_run_id
        assert result.outputs == workflow_outputs({"text": "hello"})


def test_run_workflow_failed_run_raises_run_failed() -> None:
    with start_server(faults=["failed_run:1:match=bad"]) as srv, Dify(base_url=srv.url) as client:
        with pytest.raises(RunFailedError) as caught:
            client.run_workflow({"text": "bad"}, "frank")
        assert caught.value.result.status == "failed"


def test_completion_and_its_stream() -> None:
    with start_server(app_mode="completion") as srv, Dify(base_url=srv.url) as client:
        expected = completion_answer("go", {"text": "abc"})
        assert client.completion({"text": "abc"}, "gina", query="go").outputs["answer"] == expected
        stream = client.completion_stream({"text": "abc"}, "gina", query="go")
        assert "".join(stream) == expected and stream.result.conversation_id is None


def test_parameters_and_info(dify: Dify) -> None:
    assert dify.parameters().inputs == ()
    assert dify.info()["mode"] == "chat"
    with start_server() as srv, Dify(base_url=srv.url) as client:
        text = client.parameters().get("text")
        assert text is not None and text.required


def test_agent_chat_app_works_through_chat() -> None:
    with start_server(app_mode="agent-chat", input_form=[]) as srv, Dify(base_url=srv.url) as client:
        assert client.chat("plan my day", "hank").outputs["answer"] == "[turn 1] You said: plan my day"
        stream = client.chat_stream("and tomorrow", "hank")
        assert len(list(stream)) >= 2 and stream.result.outputs["answer"] == "[turn 1] You said: and tomorrow"
        assert client.chat("blocking?", "hank", response_mode="blocking").ok  # falls back to streaming


# ---- Dify: configuration, errors, threads, loops ----------------------------------------------------------------


def test_key_and_base_url_come_from_the_environment(chat_server: SimulatorServer, monkeypatch: Any) -> None:
    monkeypatch.setenv("DIFY_BASE_URL", chat_server.url)
    with Dify() as client:
        assert client.base_url == chat_server.url
        assert client.chat("hi", "ivy").ok
    monkeypatch.delenv("DIFY_API_KEY")
    monkeypatch.setenv("MY_APP_KEY", API_KEY)
    with Dify(api_key_env="MY_APP_KEY") as client:
        assert client.chat("hi", "ivy").ok


def test_missing_key_is_a_config_error_naming_the_variable(monkeypatch: Any) -> None:
    monkeypatch.delenv("DIFY_API_KEY")
    with pytest.raises(ConfigError, match="DIFY_API_KEY"):
        Dify()
    with pytest.raises(ConfigError, match="OTHER_KEY"):
        Dify(api_key_env="OTHER_KEY")


def test_default_base_url_is_localhost() -> None:
    with Dify() as client:
        assert client.base_url == "http://localhost/v1"


def test_wrong_key_raises_auth_error_without_the_key(chat_server: SimulatorServer) -> None:
    secret = "app-WRONG-d3adb33f-very-secret"
    with Dify(secret, chat_server.url) as client:
        assert secret not in repr(client)
        for call in (lambda: client.chat("hi", "jack"), lambda: list(client.chat_stream("hi", "jack")),
                     client.parameters):
            with pytest.raises(AuthError) as caught:
                call()
            assert secret not in str(caught.value) and secret not in repr(caught.value)


def test_bad_base_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="base URL"):
        Dify(base_url="ftp://example")


def test_works_when_called_inside_a_running_event_loop(chat_server: SimulatorServer) -> None:
    async def notebook_cell() -> tuple[str, str]:
        with Dify(base_url=chat_server.url) as client:  # created and used while this loop runs, as in Jupyter
            answer = client.chat("from a cell", "kate").outputs["answer"]
            streamed = "".join(client.chat_stream("streamed", "kate"))
            await asyncio.sleep(0)
            return answer, streamed

    answer, streamed = asyncio.run(asyncio.wait_for(notebook_cell(), 10))
    assert answer == "[turn 1] You said: from a cell" and streamed == "[turn 1] You said: streamed"


def test_one_client_serves_several_threads(dify: Dify) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: dify.chat(f"q{i}", f"user-{i}").outputs["answer"], range(8)))
    assert answers == [f"[turn 1] You said: q{i}" for i in range(8)]


def test_close_stops_the_loop_thread_and_later_calls_fail(chat_server: SimulatorServer) -> None:
    client = Dify(base_url=chat_server.url)
    assert client.chat("hi", "liam").ok
    client.close()
    client.close()
    assert not client._thread.is_alive() and "closed" in repr(client)
    with pytest.raises(RuntimeError, match="closed"):
        client.chat("again", "liam")
    assert "dify-client-loop" not in {t.name for t in threading.enumerate() if t.is_alive()}


def test_calling_the_client_from_its_own_callback_fails_instead_of_hanging(dify: Dify) -> None:
    errors: list[BaseException] = []

    def reenter(_: dict[str, Any]) -> None:
        try:
            dify.info()
        except RuntimeError as exc:
            errors.append(exc)

    assert dify._call(dify._client.chat("hi", "mia", on_started=reenter)).ok
    assert errors and "callbacks" in str(errors[0])


# ---- ConversationCache ------------------------------------------------------------------------------------------


def test_cache_get_set_forget_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "conversations.db"
    with ConversationCache(path) as cache:
        assert cache.get("u") is None
        cache.set("u", "c-1")
        cache.set("u", "c-2")
        cache.set("v", "c-3")
        assert (cache.get("u"), cache.get("v")) == ("c-2", "c-3")
        cache.forget("u")
        assert cache.get("u") is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_cache_errors_are_state_errors(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot open"):
        ConversationCache(tmp_path / "missing-dir" / "c.db")
    cache = ConversationCache(":memory:")
    cache.close()
    with pytest.raises(StateError):
        cache.get("u")


def test_ask_continues_the_conversation_across_a_restart(dify: Dify, tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with ConversationCache(path) as cache:
        first = cache.ask(dify, "user-7", "hi")
        assert cache.ask(dify, "user-8", "hello").outputs["answer"].startswith("[turn 1]")
    with ConversationCache(path) as cache:  # the bot restarted
        second = cache.ask(dify, "user-7", "still there?")
        assert second.outputs["answer"] == "[turn 2] You said: still there?"
        assert cache.get("user-7") == first.conversation_id == second.conversation_id


@pytest.mark.parametrize("response_mode", ["streaming", "blocking"])
def test_ask_starts_a_new_conversation_once_when_the_stored_one_is_gone(
    dify: Dify, chat_server: SimulatorServer, response_mode: str
) -> None:
    with ConversationCache(":memory:") as cache:
        lost = str(uuid.uuid4())
        cache.set("nora", lost)
        result = cache.ask(dify, "nora", "hello?", response_mode=response_mode)
        assert result.outputs["answer"] == "[turn 1] You said: hello?"
        assert cache.get("nora") == result.conversation_id != lost
        assert chat_posts(chat_server) == 2
        # streaming hides the 404; the client asks GET /messages once the stream closes without starting
        assert chat_server.sim.count("/messages") == (1 if response_mode == "streaming" else 0)


def test_ask_keeps_the_stored_conversation_on_other_errors() -> None:
    with start_server(app_mode="chat", input_form=[], faults=["completion_error:1:match=FAIL"]) as srv, \
            Dify(base_url=srv.url) as client, ConversationCache(":memory:") as cache:
        first = cache.ask(client, "omar", "hi")
        with pytest.raises(ProviderError):
            cache.ask(client, "omar", "FAIL now")
        assert cache.get("omar") == first.conversation_id
        assert chat_posts(srv) == 2


# ---- DifyClient on_text (the async layer the sync client streams through) ----------------------------------------


def _texts(srv: SimulatorServer, method: str, *args: Any, **kwargs: Any) -> tuple[list[str], str]:
    async def go() -> tuple[list[str], str]:
        chunks: list[str] = []
        async with DifyClient(srv.url, API_KEY) as client:
            result = await getattr(client, method)(*args, on_text=chunks.append, **kwargs)
        return chunks, result.outputs["answer"]

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["chat", "advanced-chat", "agent-chat"])
def test_on_text_gets_each_message_chunk_as_it_arrives(mode: str) -> None:
    with start_server(app_mode=mode, input_form=[]) as srv:
        chunks, answer = _texts(srv, "chat", "hello", "pia")
    assert len(chunks) >= 2 and "".join(chunks) == answer == "[turn 1] You said: hello"


def test_on_text_gets_a_blocking_answer_as_one_chunk() -> None:
    with start_server(app_mode="chat", input_form=[]) as srv:
        chunks, answer = _texts(srv, "chat", "hello", "quinn", response_mode="blocking")
    assert chunks == [answer] == ["[turn 1] You said: hello"]


def test_on_text_works_for_completion() -> None:
    with start_server(app_mode="completion") as srv:
        chunks, answer = _texts(srv, "completion", {"text": "x"}, "rita", query="go")
    assert len(chunks) >= 2 and "".join(chunks) == answer == completion_answer("go", {"text": "x"})
