"""Chat and completion apps in batches, per-conversation ordering, and file inputs — against the simulator on loopback."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import pytest

from runner.simulator import Latency, chat_answer, completion_answer

from .conftest import invoke, read_csv, run_args, start_server, write_csv

CHAT_FORM = [{"text-input": {"variable": "tone", "label": "Tone", "type": "text-input", "required": False}}]


def chat_args(srv: object, *args: str | Path) -> list[str]:
    return run_args(srv, "--app-type", "chat", *args)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
def test_chat_rows_get_answer_and_ids(tmp_path: Path, mode: str) -> None:
    write_csv(tmp_path / "in.csv", ["q"], [["hello"], ["你好，世界"]])
    with start_server(app_mode="chat", input_form=CHAT_FORM) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv", "--query-column", "q",
                                   "--response-mode", mode))
        assert srv.sim.count("/chat-messages") == 2
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out.csv")
    assert [r["answer"] for r in rows] == [chat_answer("hello", 1, {}), chat_answer("你好，世界", 1, {})]
    assert all(r["conversation_id"] and r["message_id"] and r["_status"] == "succeeded" for r in rows)
    assert rows[0]["conversation_id"] != rows[1]["conversation_id"]  # no conversation column: each row on its own
    assert int(rows[0]["_total_tokens"]) > 0 and rows[0]["prompt_tokens"]


def test_chat_needs_query_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["q"], [["hello"]])
    with start_server(app_mode="chat", input_form=CHAT_FORM) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv"))
    assert result.exit_code == 2 and "Error: chat apps need the question column: pass --query-column" in result.output


def test_conversations_keep_order_and_run_in_parallel(tmp_path: Path) -> None:
    rng = random.Random(4)
    turns = [(f"user{u}", t) for u in range(6) for t in range(1, 6)]
    rng.shuffle(turns)
    # Keep each user's turns in increasing order in the file, interleaved with other users.
    ordered: dict[str, list[int]] = defaultdict(list)
    rows = []
    for user, _ in turns:
        ordered[user].append(len(ordered[user]) + 1)
        rows.append([user, f"{user} message {ordered[user][-1]}"])
    write_csv(tmp_path / "in.csv", ["customer", "message"], rows)
    with start_server(app_mode="chat", input_form=CHAT_FORM, latency=Latency("uniform", 0.01, 0.12), seed=9) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv", "--query-column", "message",
                                   "--conversation-column", "customer", "--concurrency", "8"))
        assert srv.sim.max_in_flight > 1
    assert result.exit_code == 0, result.output
    out = read_csv(tmp_path / "out.csv")
    by_user: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in out:
        by_user[row["customer"]].append(row)
    for user, user_rows in by_user.items():
        assert [re.match(r"\[turn (\d+)\]", r["answer"]).group(1) for r in user_rows] == [  # type: ignore[union-attr]
            str(i) for i in range(1, len(user_rows) + 1)], user
        assert len({r["conversation_id"] for r in user_rows}) == 1
    assert len({rows[0]["conversation_id"] for rows in by_user.values()}) == 6


def test_resumed_job_continues_the_same_conversations(tmp_path: Path) -> None:
    rows = [["alice", "a1"], ["bob", "b1"], ["alice", "a2"], ["bob", "b2"], ["alice", "a3"]]
    write_csv(tmp_path / "in.csv", ["who", "q"], rows)
    args = ["--input", "in.csv", "--output", "out.csv", "--query-column", "q", "--conversation-column", "who"]
    with start_server(app_mode="chat", input_form=CHAT_FORM) as srv:
        assert invoke(*chat_args(srv, *args, "--limit", "2")).exit_code == 0
        assert invoke(*chat_args(srv, *args)).exit_code == 0
        assert srv.sim.count("/chat-messages") == 5
    out = read_csv(tmp_path / "out.csv")
    assert [r["answer"].split("]")[0] for r in out] == ["[turn 1", "[turn 1", "[turn 2", "[turn 2", "[turn 3"]
    assert out[0]["conversation_id"] == out[2]["conversation_id"] == out[4]["conversation_id"]


def test_expired_conversation_is_a_row_error_not_a_crash(tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["who", "q"], [["alice", "a1"], ["alice", "a2"]])
    args = ["--input", "in.csv", "--output", "out.csv", "--query-column", "q", "--conversation-column", "who"]
    with start_server(app_mode="chat", input_form=CHAT_FORM) as srv:
        assert invoke(*chat_args(srv, *args, "--limit", "1")).exit_code == 0
        srv.sim.conversations.clear()  # the server forgot it (deleted, or another Dify)
        result = invoke(*chat_args(srv, *args))
    assert result.exit_code == 3, result.output
    failed = read_csv(tmp_path / "out.csv")[1]
    assert failed["_status"] == "failed" and "Conversation Not Exists" in failed["_error"]


def test_agent_app_in_blocking_mode_is_sent_streaming_with_a_note(tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["q"], [["plan my trip"], ["and the hotel"]])
    with start_server(app_mode="agent-chat", input_form=CHAT_FORM) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv", "--query-column", "q",
                                   "--response-mode", "blocking"))
    assert result.exit_code == 0, result.output
    assert "only answers in streaming mode" in result.output
    assert read_csv(tmp_path / "out.csv")[0]["answer"] == chat_answer("plan my trip", 1, {})


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
def test_completion_app_with_inputs_and_optional_query(tmp_path: Path, mode: str) -> None:
    form = [{"paragraph": {"variable": "topic", "label": "Topic", "type": "paragraph", "required": True}}]
    write_csv(tmp_path / "in.csv", ["topic", "q"], [["cats", ""], ["dogs", "short please"]])
    with start_server(app_mode="completion", input_form=form) as srv:
        result = invoke(*run_args(srv, "--app-type", "completion", "--input", "in.csv", "--output", "out.jsonl",
                                  "--query-column", "q", "--response-mode", mode))
    assert result.exit_code == 0, result.output
    import json

    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert out[0]["answer"] == completion_answer("", {"topic": "cats"})
    assert out[1]["answer"] == completion_answer("short please", {"topic": "dogs"})
    assert "conversation_id" not in out[0]


# ---- files ------------------------------------------------------------------------------------------------------------

FILE_FORM = [
    {"text-input": {"variable": "text", "label": "Text", "type": "text-input", "required": True}},
    {"file": {"variable": "doc", "label": "Doc", "type": "file", "required": False,
              "allowed_file_types": ["document"], "allowed_file_upload_methods": ["local_file", "remote_url"]}},
    {"file-list": {"variable": "pics", "label": "Pictures", "type": "file-list", "required": False, "max_length": 3,
                   "allowed_file_types": ["image"], "allowed_file_upload_methods": ["local_file", "remote_url"]}},
]


def test_same_file_in_many_rows_is_uploaded_once(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "manual.pdf").write_bytes(b"%PDF-1.4 manual")
    write_csv(tmp_path / "in.csv", ["text", "doc"], [[f"q{i}", "docs/manual.pdf"] for i in range(100)])
    with start_server(input_form=FILE_FORM) as srv:
        result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--concurrency", "16"))
        assert srv.sim.count("/files/upload") == 1
        assert srv.sim.count("/workflows/run", outcome="succeeded") == 100
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out.csv")
    assert all("doc=manual.pdf" in r["output.text"] or "manual.pdf" in r["text"] or "manual.pdf" in str(r)
               for r in rows)


def test_new_user_uploads_do_not_race_the_end_user_creation(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    rows = []
    for i in range(24):
        (tmp_path / "f" / f"{i}.txt").write_text(f"file {i}", encoding="utf-8")
        rows.append([f"q{i}", f"f/{i}.txt"])
    write_csv(tmp_path / "in.csv", ["text", "doc"], rows)
    with start_server(input_form=FILE_FORM, latency=Latency("fixed", 0.05), end_user_race=True) as srv:
        result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--concurrency", "8",
                                  "--user", "fresh-user"))
        assert len(srv.sim.end_users["fresh-user"]) == 1
    assert result.exit_code == 0, result.output


def test_urls_file_lists_and_bad_paths(tmp_path: Path) -> None:
    root = tmp_path / "files"
    root.mkdir()
    (root / "a.png").write_bytes(b"\x89PNG a")
    (root / "b.jpg").write_bytes(b"\xff\xd8 b")
    (tmp_path / "secret.txt").write_text("outside", encoding="utf-8")
    (root / "link.pdf").symlink_to(tmp_path / "secret.txt")
    rows = [
        ["ok", "https://example.com/report.pdf", "a.png;b.jpg"],
        ["json list", "", '["a.png", "https://example.com/c.webp"]'],
        ["escape", "../secret.txt", ""],
        ["symlink", "link.pdf", ""],
        ["missing", "nope.pdf", ""],
        ["wrong type", "a.png", ""],
    ]
    write_csv(tmp_path / "in.csv", ["text", "doc", "pics"], rows)
    with start_server(input_form=FILE_FORM) as srv:
        result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--files-root", root))
        uploads = srv.sim.count("/files/upload")
        runs = srv.sim.count("/workflows/run")
    assert result.exit_code == 3, result.output
    out = {r["text"]: r for r in read_csv(tmp_path / "out.csv")}
    assert out["ok"]["_status"] == "succeeded" and "report.pdf" in out["ok"]["output.text"]
    assert "a.png|b.jpg" in out["ok"]["output.text"]
    assert out["json list"]["_status"] == "succeeded" and "c.webp" in out["json list"]["output.text"]
    assert "escapes the files root" in out["escape"]["_error"] and "../secret.txt" in out["escape"]["_error"]
    assert "escapes the files root" in out["symlink"]["_error"]
    assert "file not found" in out["missing"]["_error"] and "nope.pdf" in out["missing"]["_error"]
    assert "document" in out["wrong type"]["_error"]
    assert uploads == 2  # a.png and b.jpg, once each
    assert runs == 2  # bad rows cost no run


def test_files_column_attaches_documents_to_chat_messages(tmp_path: Path) -> None:
    (tmp_path / "contract.pdf").write_bytes(b"%PDF contract")
    write_csv(tmp_path / "in.csv", ["q", "attachments"],
              [["summarise it", "contract.pdf"], ["and this one?", "https://example.com/terms.pdf"], ["no file", ""]])
    feature = {"enabled": True, "allowed_file_types": ["document"], "allowed_file_upload_methods":
               ["local_file", "remote_url"], "number_limits": 2}
    with start_server(app_mode="chat", input_form=CHAT_FORM, file_upload=feature) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv", "--query-column", "q",
                                   "--files-column", "attachments"))
        assert srv.sim.count("/files/upload") == 1
    assert result.exit_code == 0, result.output
    out = read_csv(tmp_path / "out.csv")
    assert out[0]["answer"] == chat_answer("summarise it", 1, {}, ["contract.pdf"])
    assert out[1]["answer"] == chat_answer("and this one?", 1, {}, ["https://example.com/terms.pdf"])
    assert out[2]["answer"] == chat_answer("no file", 1, {})


def test_files_column_refused_when_the_app_takes_no_files(tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["q", "attachments"], [["hi", "a.pdf"]])
    with start_server(app_mode="chat", input_form=CHAT_FORM) as srv:
        result = invoke(*chat_args(srv, "--input", "in.csv", "--output", "out.csv", "--query-column", "q",
                                   "--files-column", "attachments"))
        assert srv.sim.count("/chat-messages") == 0
    assert result.exit_code == 1
    assert "Error: --files-column: the app does not accept files with its messages" in result.output
