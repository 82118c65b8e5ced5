"""Shared fixtures: an isolated environment per test, a simulator on a free loopback port, helpers to run the CLI."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from runner.cli import main
from runner.simulator import SimConfig, SimulatorServer

API_KEY = "app-TEST-9f8e7d6c5b4a-SECRET"

FORM = [
    {"text-input": {"variable": "text", "label": "Text", "type": "text-input", "required": True, "max_length": 200}},
    {"select": {"variable": "lang", "label": "Language", "type": "select", "required": False,
                "options": ["en", "zh", "fr"]}},
]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("DIFY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DIFY_API_KEY", API_KEY)
    monkeypatch.chdir(tmp_path)
    yield


def sim_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"api_key": API_KEY, "input_form": FORM, "ping_interval": 0.05,
                              "hidden_rejection_seconds": 1.0}
    values.update(overrides)
    return SimConfig(**values)


@pytest.fixture
def server() -> Iterator[SimulatorServer]:
    with SimulatorServer(sim_config()) as srv:
        yield srv


def start_server(**overrides: Any) -> SimulatorServer:
    return SimulatorServer(sim_config(**overrides)).start()


def write_csv(path: Path, header: list[str], rows: list[list[Any]], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def texts_csv(path: Path, n: int, *, prefix: str = "row") -> Path:
    return write_csv(path, ["id", "text"], [[f"{i:04d}", f"{prefix} {i}"] for i in range(n)])


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, prog_name="dify-batch")


def run_args(srv: SimulatorServer, *args: str | Path) -> list[str]:
    return ["run", "--base-url", srv.url, "--no-progress", *[str(a) for a in args]]


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same full-jitter retry back-off at 1/50 of its scale, so tests with dozens of retries do not really wait.

    In-process runs only (CliRunner, run_job); the pause while the server is unreachable is not scaled.
    """
    import runner.retry

    original = runner.retry.backoff_delay

    def scaled(attempt: int, *, base: float = 1.0, cap: float = 60.0, rng: Any = None) -> float:
        return original(attempt, base=base / 50, cap=cap / 50, rng=rng)

    monkeypatch.setattr(runner.retry, "backoff_delay", scaled)
