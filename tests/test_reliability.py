"""Reliability end to end on loopback: a mix of every injected fault, the server going away mid-job, SIGKILL at random
moments across many resumes, and output write failures — no row lost, none duplicated, no hang, runs billed ~once per row.
"""

from __future__ import annotations

import errno
import math
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import runner.outputs
import runner.simulator
from runner.simulator import FaultRule, Latency, RequestRecord, SimulatorServer, create_app

from .conftest import invoke, read_csv, run_args, start_server, texts_csv, write_csv
from .test_resume import cli_process, done_rows, wait_until
from .test_run import expected_text

RUN = "/workflows/run"
# Faults after which a new POST is the only way to get the row done (no run, or the run itself failed).
REPOST_NEEDED = {"429", "too_many_400", "500", "502_html", "completion_error", "error_event"}


def run_posts(srv: SimulatorServer) -> dict[str, list[RequestRecord]]:
    """Workflow-run POSTs per row text, in the order the server saw them."""
    posts: dict[str, list[RequestRecord]] = defaultdict(list)
    for rec in list(srv.sim.requests):
        if rec.endpoint == RUN and rec.inputs is not None:
            posts[str(rec.inputs.get("text"))].append(rec)
    return posts


def state_counts(state: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(conn.execute("SELECT status, count(*) FROM job_rows GROUP BY status").fetchall())


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# ---- every fault at once ------------------------------------------------------------------------------------------

PERMANENT = {  # marker in the row's text -> (fault, error_code, http_status, words of Dify's message)
    "POISON": ("failed_run", "workflow_failed", "200", "Node LLM run failed: [openai] Error: Error code: 500"),
    "PROVIDERDOWN": ("completion_error", "completion_request_error", "400", "[openai] Error: APITimeoutError"),
    "EVENTFAIL": ("error_event", "completion_request_error", "400", "[openai] Error: APITimeoutError"),
    "HANG": ("stall", "stream_not_started", "200", "Dify hides request rejections in streaming mode"),
}
TRANSIENT = [  # each hits a row at most once (times=1), at these rates per request
    ("429", 0.04), ("too_many_400", 0.03), ("500", 0.05), ("502_html", 0.05), ("completion_error", 0.05),
    ("error_event", 0.05), ("drop_stream", 0.08), ("stall_midrun", 0.06),
]


def test_fault_mix_fails_only_doomed_rows_and_bills_about_one_run_per_row(
    tmp_path: Path, fast_backoff: None, capsys: pytest.CaptureFixture[str]
) -> None:
    n, max_attempts = 80, 7  # 6 transient kinds that cost an attempt, each at most once: 7 attempts always suffice
    markers = {3: "POISON", 23: "POISON", 43: "POISON", 63: "POISON", 11: "PROVIDERDOWN", 31: "EVENTFAIL",
               51: "HANG", 71: "HANG"}
    rows = [[f"{i:03d}", f"item {i:03d}" + (f" {markers[i]}" if i in markers else "")] for i in range(n)]
    write_csv(tmp_path / "in.csv", ["id", "text"], rows)
    faults = [FaultRule(kind, match=marker) for marker, (kind, *_) in PERMANENT.items()]
    faults += [FaultRule(kind, probability=p, times=1) for kind, p in TRANSIENT]
    with start_server(faults=faults, seed=20, latency=Latency("lognormal", 0.02, 0.4)) as srv:
        result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--key-column", "id",
                                  "--concurrency", "12", "--max-attempts", str(max_attempts), "--stall-timeout", "0.3",
                                  "--summary-json", "summary.json"))
        posts = run_posts(srv)
        billed = len(srv.sim.runs)  # runs the server created: what the app owner pays for
    assert result.exit_code == 3, result.output
    out = read_csv(tmp_path / "out.csv")
    assert [r["id"] for r in out] == [f"{i:03d}" for i in range(n)]
    report = {r["key"]: r for r in read_csv(tmp_path / "out.errors.csv")}
    assert sorted(report) == sorted(f"{i:03d}" for i in markers)
    for row in out:
        marker = markers.get(int(row["id"]))
        if marker is None:
            assert row["_status"] == "succeeded", row
            assert row["output.text"] == expected_text(row["text"])
            assert row["_error"] == ""
            continue
        _, code, http_status, words = PERMANENT[marker]
        line = report[row["id"]]
        assert row["_status"] == "failed" and words in row["_error"], row
        assert (line["row"], line["error_code"], line["http_status"]) == (str(int(row["id"]) + 1), code, http_status)
        assert line["message"] == row["_error"] and line["attempts"] == row["_attempts"]
        retried = marker in ("PROVIDERDOWN", "EVENTFAIL")
        assert line["attempts"] == str(max_attempts if retried else 1), line
        assert len(posts[row["text"]]) == int(line["attempts"])

    good = [r["text"] for r in out if int(r["id"]) not in markers]
    hit = Counter(rec.fault for text in good for rec in posts[text] if rec.fault)
    for text in good:  # a POST is repeated only after a fault that leaves no run to recover
        assert all(rec.fault in REPOST_NEEDED for rec in posts[text][:-1]), [(r.fault, r.outcome) for r in posts[text]]
    assert hit["drop_stream"] + hit["stall_midrun"] > 0 and sum(hit[k] for k in REPOST_NEEDED) > 0, hit
    succeeded = len(good)
    all_posts = sum(len(p) for p in posts.values())
    good_posts = sum(len(posts[t]) for t in good)
    with capsys.disabled():
        print(f"\n[fault mix] faults hit on good rows: {dict(hit)}; POSTs {all_posts}, runs created {billed}, "
              f"succeeded rows {succeeded}: POSTs/succeeded {all_posts / succeeded:.2f}, billed runs/succeeded "
              f"{billed / succeeded:.2f}, POSTs per good row {good_posts / succeeded:.2f}")
    assert good_posts / succeeded <= 1.6
    assert billed / succeeded <= 1.6
    assert all_posts / succeeded <= 2.0


# ---- the server goes away ------------------------------------------------------------------------------------------


def outage_when(srv: SimulatorServer, posts: int, down_for: float | None) -> threading.Thread:
    """Stop the server once it has seen `posts` run POSTs; start it again on the same port after `down_for` s."""

    def outage() -> None:
        wait_until(lambda: srv.sim.count(RUN) >= posts, timeout=60)
        srv.stop()
        if down_for is not None:
            time.sleep(down_for)
            srv.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    return thread


def reposts(srv: SimulatorServer) -> int:
    return sum(len(p) - 1 for p in run_posts(srv).values())


# Stopping the simulator with requests in flight can leave a server-side socket to the garbage collector (the runner
# itself runs in a subprocess here, so these warnings can only come from the simulator thread).
SIMULATOR_STOP_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def cut_by_outage(srv: SimulatorServer) -> list[RequestRecord]:
    """Run POSTs the stopping server cut: streams closed under the client, blocking calls answered 502."""
    return [rec for rec in list(srv.sim.requests) if rec.endpoint == RUN and rec.outcome in ("dropped", "502")]


@SIMULATOR_STOP_LEAK
@pytest.mark.parametrize("mode", ["streaming", "blocking"])
def test_server_down_for_a_while_mid_job_the_job_waits_and_finishes(tmp_path: Path, mode: str) -> None:
    n, concurrency = 40, 8
    src = texts_csv(tmp_path / "in.csv", n)
    out = tmp_path / "out.csv"
    with start_server(latency=Latency("uniform", 0.05, 0.25), seed=8) as srv:
        outage = outage_when(srv, posts=12, down_for=1.5)
        # A stopped uvicorn may leave an accepted connection open and silent: --timeout bounds the wait for it.
        proc = cli_process(srv.url, src, out, "--concurrency", str(concurrency), "--response-mode", mode,
                           "--timeout", "10")
        _, stderr = proc.communicate(timeout=90)
        outage.join(5)
        assert proc.returncode == 0, stderr.decode()
        again, cut = reposts(srv), cut_by_outage(srv)
    rows = read_csv(out)
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(n)]
    assert all(r["_status"] == "succeeded" and r["output.text"] == expected_text(r["text"]) for r in rows)
    print(f"\n[outage {mode}] requests cut by the outage: {len(cut)}; rows re-posted: {again} (concurrency {concurrency})")
    assert again <= len(cut)  # only requests the outage cut are sent again, each once
    if mode == "streaming":
        assert len(cut) <= 2 * concurrency  # the outage cut the streams in flight, not the whole job


@SIMULATOR_STOP_LEAK
def test_server_down_longer_than_max_down_exits_with_clear_error_and_resumable_state(tmp_path: Path) -> None:
    n, concurrency = 60, 8
    src = texts_csv(tmp_path / "in.csv", n)
    out = tmp_path / "out.csv"
    state = tmp_path / "out.csv.state.sqlite"
    with start_server(latency=Latency("uniform", 0.05, 0.25), seed=9) as srv:
        outage = outage_when(srv, posts=20, down_for=None)
        started = time.monotonic()
        proc = cli_process(srv.url, src, out, "--concurrency", str(concurrency), "--max-down", "1")
        stdout, stderr = proc.communicate(timeout=60)
        gave_up_after = time.monotonic() - started
        outage.join(5)
        assert proc.returncode == 1, stderr.decode()
        line = error_line(stderr.decode())
        assert f"cannot connect to {srv.url}" in line and "still unreachable after 1 s" in line, line
        assert "rerun the same command to continue" in line
        assert not out.exists() and stdout == b""
        counts = state_counts(state)
        assert counts.get("failed", 0) == 0  # an outage is not the rows' fault
        assert 0 < counts.get("succeeded", 0) < n and sum(counts.values()) == n, counts

        # The checkpoint is usable as it is: `export` writes what is done, the rest marked pending.
        exported = invoke("export", "--input", src, "--output", out)
        assert exported.exit_code == 0, exported.output
        statuses = Counter(r["_status"] for r in read_csv(out))
        assert statuses["succeeded"] == counts["succeeded"] and statuses["pending"] == n - counts["succeeded"]

        srv.start()  # same port, state kept
        rerun = cli_process(srv.url, src, out, "--concurrency", str(concurrency))
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, stderr.decode()
        again = reposts(srv)
    rows = read_csv(out)
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(n)]
    assert all(r["_status"] == "succeeded" and r["output.text"] == expected_text(r["text"]) for r in rows)
    print(f"\n[max-down] gave up after {gave_up_after:.1f} s; rows re-posted on resume: {again}")
    assert again <= concurrency


def test_max_wall_bounds_a_job_whose_runs_all_hang(tmp_path: Path) -> None:
    """Every run goes silent after starting and never finishes: --max-wall still ends the job, no row is failed for it."""
    src = texts_csv(tmp_path / "in.csv", 20)
    with start_server(faults=[FaultRule("stall_midrun")], latency=Latency("fixed", 600),
                      hidden_rejection_seconds=600) as srv:
        started = time.monotonic()
        proc = cli_process(srv.url, src, tmp_path / "out.csv", "--concurrency", "4", "--stall-timeout", "0.5",
                           "--timeout", "1", "--max-wall", "2")
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - started
    assert proc.returncode == 1, stderr.decode()
    line = error_line(stderr.decode())
    assert line.startswith("Error: stopped after --max-wall 2 s with ") and "rerun the same command" in line, line
    counts = state_counts(tmp_path / "out.csv.state.sqlite")
    assert counts.get("succeeded", 0) == 0 and counts.get("failed", 0) == 0, counts
    print(f"\n[max-wall 2] a job of hanging runs ended after {took:.1f} s")


class Gateway:
    """nginx in front of the simulator: while `down`, it answers 502 Bad Gateway itself (Dify's API is restarting)."""

    PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.down = False
        self.answered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.down:
            return await self.app(scope, receive, send)
        self.answered += 1
        headers = [(b"content-type", b"text/html"), (b"content-length", str(len(self.PAGE)).encode())]
        await send({"type": "http.response.start", "status": 502, "headers": headers})
        await send({"type": "http.response.body", "body": self.PAGE})


def test_gateway_outage_mid_job_pauses_the_job_instead_of_failing_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_backoff: None
) -> None:
    """The usual self-hosted set-up: nginx stays up while the API container restarts, so "down" is 502, not refused."""
    gateways: list[Gateway] = []

    def behind_nginx(sim: Any) -> Gateway:
        gateways.append(Gateway(create_app(sim)))
        return gateways[-1]

    monkeypatch.setattr(runner.simulator, "create_app", behind_nginx)
    src = texts_csv(tmp_path / "in.csv", 60)
    with start_server(latency=Latency("uniform", 0.05, 0.25), seed=8) as srv:
        def outage() -> None:
            wait_until(lambda: srv.sim.count(RUN) >= 20)
            gateways[0].down = True
            time.sleep(2)
            gateways[0].down = False

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv", "--concurrency", "8"))
        thread.join(10)
    print(f"\n[gateway outage] 502 pages served: {gateways[0].answered}; {result.output.splitlines()[0]}")
    assert gateways[0].answered > 0
    assert result.exit_code == 0, result.output
    assert [r["_status"] for r in read_csv(tmp_path / "out.csv")] == ["succeeded"] * 60


@SIMULATOR_STOP_LEAK
def test_streams_cut_by_an_outage_are_looked_up_not_reposted(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 24)
    with start_server(latency=Latency("uniform", 0.3, 0.5), seed=3) as srv:
        outage = outage_when(srv, posts=10, down_for=2.5)  # longer than the client's 2 s lookup poll
        proc = cli_process(srv.url, src, tmp_path / "out.csv", "--concurrency", "8")
        _, stderr = proc.communicate(timeout=60)
        outage.join(5)
        assert proc.returncode == 0, stderr.decode()
        cut, again = cut_by_outage(srv), reposts(srv)
    assert cut and all(rec.run_id for rec in cut)  # the outage did cut streams whose run id the client had
    assert again == 0


# ---- SIGKILL at random moments ------------------------------------------------------------------------------------


@dataclass
class Cycle:
    """One process of a job: where its requests start in the server's records, and what the kill left behind."""

    first: int
    mode: str
    killed_at: float | None = None
    durable: set[str] = field(default_factory=set)  # rows with a committed result right after the kill
    recoverable: set[str] = field(default_factory=set)  # rows left running with a committed run id


def kill_cycle(srv: SimulatorServer, src: Path, out: Path, rng: random.Random, concurrency: int, kill: bool) -> Cycle:
    """Start the job and SIGKILL it at a random moment (`killed_at` stays None if it finished first or `not kill`)."""
    cycle = Cycle(first=len(srv.sim.requests), mode=rng.choice(["streaming", "streaming", "blocking"]))
    state = out.with_name(out.name + ".state.sqlite")
    before = done_rows(state)
    proc = cli_process(srv.url, src, out, "--concurrency", str(concurrency), "--response-mode", cycle.mode)
    try:
        if not kill:
            proc.wait(timeout=60)
        elif rng.random() < 0.25:  # anywhere in start-up: imports, /parameters, checkpoint creation, row registration
            proc.wait(timeout=rng.uniform(0.0, 1.2))
        else:  # mid-run, after a random number of rows became durable
            target = before + rng.randint(1, 10)
            deadline = time.monotonic() + 30
            while proc.poll() is None and done_rows(state) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.wait(timeout=rng.uniform(0.0, 0.08))
    except subprocess.TimeoutExpired:
        cycle.killed_at = time.monotonic()
        proc.kill()
        proc.communicate(timeout=10)
        if state.exists():
            cycle.durable, cycle.recoverable = rows_after_kill(state)
        return cycle
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr.decode()
    return cycle


def rows_after_kill(state: Path) -> tuple[set[str], set[str]]:
    state_counts(state)  # still a sound SQLite database after every kill
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT row_index, status, workflow_run_id FROM job_rows").fetchall()
    durable = {f"row {i}" for i, status, _ in rows if status in ("succeeded", "failed")}
    return durable, {f"row {i}" for i, status, run_id in rows if status == "running" and run_id}


def check_job(srv: SimulatorServer, out: Path, n: int, cycles: list[Cycle], concurrency: int, stats: Counter[str]) -> None:
    rows = read_csv(out)
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(n)]  # every row exactly once, in order
    assert all(r["_status"] == "succeeded" and r["output.text"] == expected_text(r["text"]) for r in rows)
    records = list(srv.sim.requests)
    bounds = [c.first for c in cycles] + [len(records)]
    posted = [{str(r.inputs.get("text")): r for r in records[a:b] if r.endpoint == RUN and r.inputs}
              for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for k, cycle in enumerate(cycles[:-1]):
        later = set().union(*posted[k + 1:])
        again = set(posted[k]) & later  # POSTed before kill k and POSTed again after it
        assert not again & cycle.durable, "a row whose result was committed was sent again"
        assert not again & cycle.recoverable, "a row left running with a known run id was sent again, not looked up"
        assert cycle.killed_at is not None
        answered = {text for text in again if (posted[k][text].ended or math.inf) < cycle.killed_at}
        assert len(again - answered) <= concurrency, (cycle.mode, len(again), len(answered))
        stats["kills"] += 1
        stats["reposted"] += len(again)
        stats["answered, not yet committed"] += len(answered)
        stats["max reposted at one kill"] = max(stats["max reposted at one kill"], len(again))


def kill_loop(tmp_path: Path, kills: int, seed: int) -> Counter[str]:
    n, concurrency = 80, 8
    rng = random.Random(seed)
    src = texts_csv(tmp_path / "in.csv", n)
    stats: Counter[str] = Counter()
    with start_server(latency=Latency("uniform", 0.02, 0.25), seed=seed) as srv:
        while stats["kills"] < kills:
            stats["jobs"] += 1
            out = tmp_path / f"out{stats['jobs']}.csv"
            cycles = [kill_cycle(srv, src, out, rng, concurrency, kill=True)]
            while cycles[-1].killed_at is not None:
                more = stats["kills"] + len(cycles) < kills
                cycles.append(kill_cycle(srv, src, out, rng, concurrency, kill=more))
            check_job(srv, out, n, cycles, concurrency, stats)
    return stats


# Read at import: the autouse fixture clears DIFY_* variables before each test.
KILL_SEED = int(os.environ.get("DIFY_BATCH_KILL_SEED", "2024"))
KILL_SEED_GIVEN = "DIFY_BATCH_KILL_SEED" in os.environ
SOAK = os.environ.get("DIFY_BATCH_SOAK") == "1"
SOAK_KILLS = int(os.environ.get("DIFY_BATCH_KILLS", "150"))


def test_sigkill_at_random_moments_never_loses_or_duplicates_rows(tmp_path: Path) -> None:
    seed = KILL_SEED
    stats = kill_loop(tmp_path, kills=20, seed=seed)
    print(f"\n[sigkill] seed {seed}: {dict(stats)} (concurrency 8)")
    assert stats["kills"] >= 20


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak loop: set DIFY_BATCH_SOAK=1 (and DIFY_BATCH_KILLS, DIFY_BATCH_KILL_SEED)")
def test_sigkill_soak(tmp_path: Path) -> None:
    seed = KILL_SEED if KILL_SEED_GIVEN else random.randrange(1 << 30)
    stats = kill_loop(tmp_path, kills=SOAK_KILLS, seed=seed)
    print(f"\n[sigkill soak] seed {seed}: {dict(stats)} (concurrency 8)")


# ---- output write failures ----------------------------------------------------------------------------------------


def test_output_path_turning_into_a_folder_mid_run_is_a_clear_error_and_export_recovers(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.csv"
    with start_server(latency=Latency("fixed", 0.05)) as srv:
        blocker = threading.Thread(target=lambda: (wait_until(lambda: srv.sim.count(RUN) >= 5), out.mkdir()),
                                   daemon=True)
        blocker.start()
        result = invoke(*run_args(srv, "--input", src, "--output", out, "--concurrency", "2"))
        blocker.join(5)
        assert result.exit_code == 1, result.output
        assert error_line(result.output) == f"Error: output path is a folder, not a file: {out}"
        assert state_counts(tmp_path / "out.csv.state.sqlite") == {"succeeded": 30}  # every paid run is kept
        out.rmdir()
        exported = invoke("export", "--input", src, "--output", out)
        assert exported.exit_code == 0, exported.output
        assert exported.output.strip() == f"Exported 30 rows to {out}; 0 failed rows in {tmp_path / 'out.errors.csv'}"
        srv.sim.reset_records()
        assert invoke(*run_args(srv, "--input", src, "--output", out)).exit_code == 0
        assert srv.sim.count(RUN) == 0
    rows = read_csv(out)
    assert [r["_status"] for r in rows] == ["succeeded"] * 30
    assert [r["output.text"] for r in rows] == [expected_text(f"row {i}") for i in range(30)]


def test_output_path_that_is_a_folder_is_refused_before_any_run(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 5)
    (tmp_path / "out.csv").mkdir()
    with start_server() as srv:
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        runs = srv.sim.count(RUN)
    assert result.exit_code == 1
    assert error_line(result.output) == "Error: output path is a folder, not a file: out.csv"
    assert runs == 0


def test_output_folder_removed_mid_run_is_a_clear_error_and_export_recovers(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 20)
    (tmp_path / "results").mkdir()
    out = tmp_path / "results" / "out.csv"
    state = tmp_path / "job.sqlite"
    with start_server(latency=Latency("fixed", 0.05)) as srv:
        remover = threading.Thread(target=lambda: (wait_until(lambda: srv.sim.count(RUN) >= 5), out.parent.rmdir()),
                                   daemon=True)
        remover.start()
        result = invoke(*run_args(srv, "--input", src, "--output", out, "--state", state, "--concurrency", "2"))
        remover.join(5)
        assert result.exit_code == 1, result.output
        assert "output folder does not exist" in error_line(result.output)
        assert state_counts(state) == {"succeeded": 20}
        out.parent.mkdir()
        assert invoke("export", "--input", src, "--output", out, "--state", state).exit_code == 0
    assert [r["_status"] for r in read_csv(out)] == ["succeeded"] * 20


def test_disk_full_while_writing_keeps_old_output_and_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = texts_csv(tmp_path / "in.csv", 12)
    out = tmp_path / "out.csv"
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", src, "--output", out, "--limit", "4")).exit_code == 0
        old = out.read_bytes()

        def full(path: Path) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        with monkeypatch.context() as patch:
            patch.setattr(runner.outputs, "_fsync", full)  # where a full disk surfaces for buffered writes
            result = invoke(*run_args(srv, "--input", src, "--output", out))
        assert result.exit_code == 1, result.output
        assert error_line(result.output) == f"Error: disk full while writing {out}"
        assert out.read_bytes() == old  # the old output stays whole
        assert not list(tmp_path.glob(".out.csv.*.tmp"))  # and no half-written temp file is left behind
        assert state_counts(tmp_path / "out.csv.state.sqlite") == {"succeeded": 12}
        srv.sim.reset_records()
        exported = invoke("export", "--input", src, "--output", out)
        assert exported.exit_code == 0, exported.output
        assert srv.sim.count() == 0  # export never calls Dify
    rows = read_csv(out)
    assert len(rows) == 12 and all(r["_status"] == "succeeded" for r in rows)
