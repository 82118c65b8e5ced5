"""Bad input: each case gets one `Error:` line naming the problem, a non-zero exit, and spends zero Dify runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.simulator import SimulatorServer

from .conftest import invoke, run_args, start_server, texts_csv, write_csv


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def run_refused(srv: SimulatorServer, *args: str | Path, code: int = 1) -> str:
    result = invoke(*run_args(srv, *args))
    assert result.exit_code == code, result.output
    assert srv.sim.count("/workflows/run") == 0
    return error_line(result.output)


@pytest.fixture
def srv() -> SimulatorServer:
    with start_server() as server:
        yield server


def test_missing_input_file(srv: SimulatorServer) -> None:
    line = run_refused(srv, "--input", "nope.csv", "--output", "out.csv")
    assert "input file not found" in line and "nope.csv" in line


def test_unsupported_extension(srv: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("a,b\n1,2\n", encoding="utf-8")
    line = run_refused(srv, "--input", "data.txt", "--output", "out.csv")
    assert "data.txt" in line and ".csv" in line


def test_unsupported_output_extension(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    line = run_refused(srv, "--input", "in.csv", "--output", "out.docx", code=2)
    assert "out.docx" in line and ".parquet" in line


def test_empty_file_and_header_only(srv: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "empty.csv" in run_refused(srv, "--input", "empty.csv", "--output", "out.csv")
    (tmp_path / "header.csv").write_text("id,text\n", encoding="utf-8")
    line = run_refused(srv, "--input", "header.csv", "--output", "out.csv")
    assert "header.csv" in line and "no data rows" in line


def test_mapped_column_missing_names_columns_and_suggests(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["id", "txt"], [["1", "a"]])
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv", "--map", "text=txet")
    assert "'txet'" in line and "id, txt" in line and "did you mean 'txt'" in line


def test_unknown_app_input_in_map(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv", "--map", "texte=text")
    assert "no input 'texte'" in line and "text" in line


def test_required_input_not_mapped(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["id", "body"], [["1", "a"]])
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv")
    assert "required input 'text'" in line and "--map text=COLUMN" in line


def test_duplicate_key_values_are_named(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "a"], ["2", "b"], ["1", "c"]])
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv", "--key-column", "id")
    assert "duplicate values in key column 'id'" in line and "'1' (rows 1 and 3)" in line


def test_invalid_toml_names_the_line(srv: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('input = "in.csv"\noutput = \n', encoding="utf-8")
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "invalid TOML in job.toml" in line and "line 2" in line


def test_unknown_flag_and_bad_value_are_usage_errors() -> None:
    assert invoke("run", "--concurency", "3").exit_code == 2
    result = invoke("run", "--concurrency", "zero")
    assert result.exit_code == 2 and "--concurrency" in result.output


def test_wrong_api_key_stops_at_once(srv: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts_csv(tmp_path / "in.csv", 5)
    monkeypatch.setenv("DIFY_API_KEY", "app-wrong")
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv")
    assert "401" in line and "DIFY_API_KEY" in line and "app-wrong" not in line
    assert srv.sim.count() <= 1  # one /parameters call, no per-row retries


def test_missing_api_key(srv: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    monkeypatch.delenv("DIFY_API_KEY")
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv")
    assert "DIFY_API_KEY" in line


def test_unreachable_base_url(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    result = invoke("run", "--base-url", "http://127.0.0.1:9/v1", "--input", "in.csv", "--output", "out.csv",
                    "--no-progress")
    assert result.exit_code == 1
    assert "127.0.0.1:9" in error_line(result.output)


def test_base_url_that_is_not_dify(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    not_api = srv.url.removesuffix("/v1") + "/apps"
    result = invoke("run", "--base-url", not_api, "--input", "in.csv", "--output", "out.csv", "--no-progress")
    assert result.exit_code == 1
    assert "Dify" in error_line(result.output)


def test_app_of_another_type(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    with start_server(app_mode="advanced-chat") as chat_srv:
        line = run_refused(chat_srv, "--input", "in.csv", "--output", "out.csv")
        assert chat_srv.sim.count("/chat-messages") == 0
    assert "'advanced-chat' app" in line and "--app-type chat" in line


def test_truncated_parquet(srv: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1\x00\x01garbage")
    line = run_refused(srv, "--input", "bad.parquet", "--output", "out.csv")
    assert "bad.parquet" in line and "Parquet" in line


def test_ragged_csv_names_the_line(srv: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,text\n1,a\n2,b,extra\n", encoding="utf-8")
    line = run_refused(srv, "--input", "in.csv", "--output", "out.csv")
    assert "in.csv" in line and "line 3" in line


def test_output_folder_missing(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    line = run_refused(srv, "--input", "in.csv", "--output", "no/such/dir/out.csv")
    assert "output folder does not exist" in line


def test_too_long_and_bad_option_are_row_errors_in_run(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["text", "lang"], [["ok", "en"], ["x" * 250, "en"], ["ok2", "de"]])
    result = invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv"))
    assert result.exit_code == 3
    assert srv.sim.count("/workflows/run") == 1
    report = (tmp_path / "out.errors.csv").read_text(encoding="utf-8-sig")
    assert "250 characters" in report and "'de'" in report


def test_validate_reports_row_problems_without_spending_runs(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["text", "lang"], [["ok", "en"], ["x" * 250, "en"], ["ok2", "de"]])
    result = invoke("validate", "--base-url", srv.url, "--input", "in.csv")
    assert result.exit_code == 1
    assert "row 2: 'text' is 250 characters" in result.output and "row 3:" in result.output
    assert error_line(result.output) == "Error: 2 problem(s) in 3 rows of in.csv (listed above)"
    assert srv.sim.count("/workflows/run") == 0


def test_validate_ok(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 4)
    result = invoke("validate", "--base-url", srv.url, "--input", "in.csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["Mapping: text<-text", "OK: 4 rows, every mapped value fits the app's inputs."]


def test_validate_names_duplicate_keys_per_row(srv: SimulatorServer, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "a"], ["2", "b"], ["1", "c"]])
    result = invoke("validate", "--base-url", srv.url, "--input", "in.csv", "--key-column", "id")
    assert result.exit_code == 1
    assert "row 3: duplicate key '1' (also row 1)" in result.output.splitlines()


def test_usage_errors_are_one_line_too() -> None:
    result = invoke("run", "--concurency", "3")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "Error: No such option '--concurency'. (Did you mean one of: '--concurrency', '--insecure'?) "
        "(see 'dify-batch run --help')"]


def test_output_that_is_the_input_is_refused(srv: SimulatorServer, tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    line = run_refused(srv, "--input", "in.csv", "--output", "in.csv")
    assert "is the input file" in line
    assert (tmp_path / "in.csv").read_text(encoding="utf-8").startswith("id,text")


def test_unknown_job_setting_suggests_the_closest(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('input = "in.csv"\noutput = "o.csv"\nkey_colum = "id"\n', encoding="utf-8")
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert error_line(result.output) == "Error: job.toml: unknown setting(s): key_colum — did you mean 'key_column'?"


def test_simulate_on_a_busy_port_is_one_clear_error() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = invoke("simulate", "--port", str(busy.getsockname()[1]))
    assert result.exit_code == 1
    assert error_line(result.output).startswith("Error: cannot listen on 127.0.0.1:")
