"""Crash safety: a run killed with SIGKILL, or stopped with SIGINT/SIGTERM, resumes without losing or duplicating rows."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from runner.simulator import Latency

from .conftest import API_KEY, read_csv, start_server, texts_csv


def cli_process(url: str, src: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DIFY_API_KEY": API_KEY, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = [sys.executable, "-m", "runner", "run", "--base-url", url, "--input", str(src), "--output", str(out),
            "--no-progress", *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def done_rows(state: Path) -> int:
    if not state.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM job_rows WHERE status IN ('succeeded','failed')").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def wait_until(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def posts_per_row(srv: object) -> Counter[str]:
    return Counter(r.inputs.get("text") for r in srv.sim.requests  # type: ignore[attr-defined]
                   if r.endpoint == "/workflows/run" and r.status_code == 200)


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, mode: str) -> None:
    n, concurrency = 80, 8
    src = texts_csv(tmp_path / "in.csv", n)
    out = tmp_path / "out.csv"
    with start_server(latency=Latency("uniform", 0.05, 0.3), seed=5) as srv:
        proc = cli_process(srv.url, src, out, "--concurrency", str(concurrency), "--response-mode", mode)
        wait_until(lambda: done_rows(tmp_path / "out.csv.state.sqlite") >= 20)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert not out.exists()
        rerun = cli_process(srv.url, src, out, "--concurrency", str(concurrency), "--response-mode", mode)
        stdout, stderr = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, stderr.decode()
        posts = posts_per_row(srv)
    rows = read_csv(out)
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(n)]
    assert all(r["_status"] == "succeeded" for r in rows)
    assert set(posts) == {f"row {i}" for i in range(n)}
    reposted = sum(count - 1 for count in posts.values())
    # In flight at the kill: the requests being answered (<= concurrency) plus rows whose answer had arrived but
    # whose commit had not finished (the writer thread commits within milliseconds: at most a couple).
    assert reposted <= concurrency + 2, posts.most_common(5)


def test_sigint_stops_cleanly_with_exit_130_and_rerun_finishes(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 60)
    out = tmp_path / "out.csv"
    with start_server(latency=Latency("fixed", 0.2)) as srv:
        proc = cli_process(srv.url, src, out, "--concurrency", "4")
        wait_until(lambda: done_rows(tmp_path / "out.csv.state.sqlite") >= 4)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr.decode()
        assert "rerun the same command to continue" in stderr.decode()
        assert "Traceback" not in stderr.decode()
        done_before = done_rows(tmp_path / "out.csv.state.sqlite")
        assert 4 <= done_before < 60
        rerun = cli_process(srv.url, src, out, "--concurrency", "8")
        rerun.communicate(timeout=60)
        assert rerun.returncode == 0
        posts = posts_per_row(srv)
    assert sum(posts.values()) == 60  # every in-flight row finished before the stop: nothing sent twice
    assert [r["_status"] for r in read_csv(out)] == ["succeeded"] * 60


def test_sigterm_is_a_clean_stop_too(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 40)
    with start_server(latency=Latency("fixed", 0.2)) as srv:
        proc = cli_process(srv.url, src, tmp_path / "out.csv", "--concurrency", "2")
        wait_until(lambda: done_rows(tmp_path / "out.csv.state.sqlite") >= 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr.decode()


def test_second_run_on_the_same_state_is_refused(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 30)
    with start_server(latency=Latency("fixed", 0.2)) as srv:
        first = cli_process(srv.url, src, tmp_path / "out.csv", "--concurrency", "2")
        wait_until(lambda: done_rows(tmp_path / "out.csv.state.sqlite") >= 1)
        second = cli_process(srv.url, src, tmp_path / "out.csv")
        _, stderr = second.communicate(timeout=30)
        first.communicate(timeout=60)
    assert second.returncode == 1
    assert stderr.decode().startswith("Error: another dify-batch run is using the checkpoint")
    assert first.returncode == 0
    assert [r["_status"] for r in read_csv(tmp_path / "out.csv")] == ["succeeded"] * 30
