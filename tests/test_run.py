"""`dify-batch run` end to end against the simulator on loopback: outputs, order, formats, resume, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.simulator import FaultRule, Latency, workflow_outputs

from .conftest import API_KEY, invoke, read_csv, run_args, start_server, texts_csv, write_csv


def expected_text(text: str, lang: str | None = None) -> str:
    """The simulated workflow's `text` output; the input column is also `text`, so it lands in `output.text`."""
    inputs: dict[str, object] = {"text": text}
    if lang:
        inputs["lang"] = lang
    return str(workflow_outputs(inputs)["text"])


def test_run_writes_every_row_with_outputs_in_input_order(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 60)
    with start_server(latency=Latency("uniform", 0.0, 0.08), seed=3) as srv:
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv", "--concurrency", "16"))
        assert srv.sim.count("/workflows/run") == 60
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out.csv")
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(60)]
    for r in rows:
        assert r["output.text"] == expected_text(r["text"])
        assert r["length"] == str(len(expected_text(r["text"])) - len("Processed: "))
        assert r["_status"] == "succeeded" and r["_error"] == "" and r["_attempts"] == "1"
        assert r["_workflow_run_id"]
    assert list(rows[0])[:2] == ["id", "text"] and list(rows[0])[-6:] == [
        "_status", "_error", "_attempts", "_elapsed_s", "_workflow_run_id", "_total_tokens"]
    assert "Done: 60 succeeded, 0 failed, 0 skipped (already done)" in result.output
    assert read_csv(tmp_path / "out.errors.csv") == []


def test_rerun_of_finished_job_sends_zero_requests(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 12)
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        first = (tmp_path / "out.csv").read_text(encoding="utf-8")
        srv.sim.reset_records()
        again = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        assert srv.sim.count("/workflows/run") == 0
    assert again.exit_code == 0
    assert "Done: 0 succeeded, 0 failed, 12 skipped (already done)" in again.output
    assert (tmp_path / "out.csv").read_text(encoding="utf-8") == first


def test_failed_rows_exit_3_with_report_and_are_retried_on_rerun(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "fine"], ["2", "BROKEN please"], ["3", "fine too"]])
    with start_server(faults=[FaultRule("failed_run", match="BROKEN")]) as srv:
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        assert result.exit_code == 3, result.output
        rows = read_csv(tmp_path / "out.csv")
        assert [r["_status"] for r in rows] == ["succeeded", "failed", "succeeded"]
        assert rows[1]["_error"].startswith("Node LLM run failed")
        report = read_csv(tmp_path / "out.errors.csv")
        assert [(r["key"], r["row"], r["error_code"], r["http_status"]) for r in report] == [
            (report[0]["key"], "2", "workflow_failed", "200")]
        assert "1 failed" in result.output
        srv.sim.reset_records()
        srv.sim.config.faults = []
        rerun = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        assert srv.sim.count("/workflows/run") == 1  # only the failed row is sent again
    assert rerun.exit_code == 0
    assert [r["_status"] for r in read_csv(tmp_path / "out.csv")] == ["succeeded"] * 3


@pytest.mark.parametrize("mode", ["streaming", "blocking"])
def test_transient_faults_are_retried_and_only_bad_rows_fail(tmp_path: Path, mode: str) -> None:
    rows = [[str(i), f"item {i}" + (" POISON" if i % 10 == 3 else "")] for i in range(40)]
    src = write_csv(tmp_path / "in.csv", ["id", "text"], rows)
    faults = [
        FaultRule("429", probability=0.3, times=1),
        FaultRule("500", probability=0.2, times=1),
        FaultRule("completion_error", probability=0.2, times=1),
        FaultRule("502_html", probability=0.1, times=1),
        FaultRule("too_many_400", probability=0.1, times=1),
        FaultRule("failed_run", match="POISON"),
    ]
    with start_server(faults=faults, seed=11) as srv:
        # Each transient rule fires at most once per row: six attempts always reach the success.
        result = invoke(*run_args(srv, "--input", src, "--output", "out.parquet", "--response-mode", mode,
                                  "--key-column", "id", "--max-attempts", "6"))
    assert result.exit_code == 3, result.output
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in table] == [str(i) for i in range(40)]
    for r in table:
        if "POISON" in r["text"]:
            assert r["_status"] == "failed" and "Node LLM run failed" in r["_error"]
        else:
            assert r["_status"] == "succeeded", r
            assert r["output.text"] == expected_text(r["text"])


def test_formats_round_trip_parquet_jsonl_xlsx_tsv(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"], "score": [0.5, None, 2.0]})
    pq.write_table(table, tmp_path / "in.parquet")
    with start_server() as srv:
        for out in ("out.parquet", "out.jsonl", "out.xlsx", "out.tsv", "out.csv"):
            result = invoke(*run_args(srv, "--input", tmp_path / "in.parquet", "--output", out))
            assert result.exit_code == 0, (out, result.output)
    back = pq.read_table(tmp_path / "out.parquet")
    assert back.schema.field("id").type == pa.int64() and back.schema.field("score").type == pa.float64()
    assert back.column("score").to_pylist() == [0.5, None, 2.0]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == [1, 2, 3] and lines[0]["_status"] == "succeeded"
    import openpyxl

    sheet = openpyxl.load_workbook(tmp_path / "out.xlsx").active
    values = list(sheet.iter_rows(values_only=True))
    assert values[0][:2] == ("id", "text") and len(values) == 4
    tsv = (tmp_path / "out.tsv").read_text(encoding="utf-8").splitlines()
    assert tsv[0].startswith("id\ttext\tscore\t")


def test_jsonl_and_xlsx_inputs(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": "007", "text": "你好"}\n{"id": "008", "text": "bye"}\n', encoding="utf-8")
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["id", "text"])
    book.active.append(["007", "hello"])
    book.save(tmp_path / "in.xlsx")
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", tmp_path / "in.jsonl", "--output", "a.csv")).exit_code == 0
        assert invoke(*run_args(srv, "--input", tmp_path / "in.xlsx", "--output", "b.csv")).exit_code == 0
    a = read_csv(tmp_path / "a.csv")
    assert [(r["id"], r["text"]) for r in a] == [("007", "你好"), ("008", "bye")]
    assert a[0]["output.text"] == expected_text("你好")
    assert read_csv(tmp_path / "b.csv")[0]["id"] == "007"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk"])
def test_tricky_csv_values_survive_unchanged(tmp_path: Path, encoding: str) -> None:
    rows = [["007", 'quote " and, comma', ""], ["010", "line one\nline two", "zh"], ["000", "中文文本，全角逗号", "en"]]
    src = write_csv(tmp_path / "in.csv", ["id", "text", "lang"], rows, encoding=encoding)
    with start_server() as srv:
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        sent = [r.inputs for r in srv.sim.requests if r.endpoint == "/workflows/run"]
    assert result.exit_code == 0, result.output
    out = read_csv(tmp_path / "out.csv")
    assert [(r["id"], r["text"], r["lang"]) for r in out] == [tuple(r) for r in rows]
    assert {"text": 'quote " and, comma'} in sent  # empty optional cell is not sent
    assert out[2]["output.text"] == expected_text("中文文本，全角逗号", "en")


def test_output_names_clashing_with_input_columns_get_prefix(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", ["text", "length"], [["x", "mine"]])
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
    row = read_csv(tmp_path / "out.csv")[0]
    assert list(row)[:4] == ["text", "length", "output.text", "output.length"]
    assert row["length"] == "mine" and row["output.text"] == expected_text("x") and row["output.length"] == "6"


def test_limit_runs_only_first_rows_then_full_run_continues(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 10)
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv", "--limit", "3")).exit_code == 0
        assert len(read_csv(tmp_path / "out.csv")) == 3
        srv.sim.reset_records()
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        assert srv.sim.count("/workflows/run") == 7
    assert len(read_csv(tmp_path / "out.csv")) == 10


def test_identical_rows_are_sent_once_and_share_the_result(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "in.csv", ["text"], [["same"], ["other"], ["same"]])
    with start_server() as srv:
        result = invoke(*run_args(srv, "--input", src, "--output", "out.csv"))
        assert srv.sim.count("/workflows/run") == 2
    assert result.exit_code == 0
    out = read_csv(tmp_path / "out.csv")
    assert out[0]["output.text"] == out[2]["output.text"] and out[2]["_status"] == "succeeded"
    assert "1 duplicate rows sent once" in result.output


def test_job_file_with_flag_override_and_summary_json(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    src = write_csv(tmp_path / "data" / "in.csv", ["body"], [["hello"], ["world"]])
    with start_server() as srv:
        (tmp_path / "job.toml").write_text(
            f'input = "data/in.csv"\noutput = "data/out.csv"\nbase_url = "{srv.url}"\nconcurrency = 2\n'
            '[map]\ntext = "body"\n', encoding="utf-8")
        result = invoke("run", "job.toml", "--no-progress", "--output", "flag.jsonl", "--summary-json", "s.json")
    assert result.exit_code == 0, result.output
    assert src.exists() and (tmp_path / "flag.jsonl").exists() and not (tmp_path / "data" / "out.csv").exists()
    summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert summary["succeeded"] == 2 and summary["failed"] == 0 and summary["exit_code"] == 0
    assert API_KEY not in (tmp_path / "s.json").read_text(encoding="utf-8")


def test_state_of_another_job_is_refused_unless_fresh(tmp_path: Path) -> None:
    a = texts_csv(tmp_path / "a.csv", 3)
    b = texts_csv(tmp_path / "b.csv", 3, prefix="other")
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", a, "--output", "out.csv")).exit_code == 0
        refused = invoke(*run_args(srv, "--input", b, "--output", "out.csv"))
        assert refused.exit_code == 1
        assert "belongs to another job (input differ)" in refused.output and "--fresh" in refused.output
        srv.sim.reset_records()
        assert invoke(*run_args(srv, "--input", b, "--output", "out.csv", "--fresh")).exit_code == 0
        assert srv.sim.count("/workflows/run") == 3


def test_rerun_of_finished_job_rewrites_output_only_when_something_changed(tmp_path: Path) -> None:
    src = texts_csv(tmp_path / "in.csv", 5)
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        written = (tmp_path / "out.csv").stat().st_mtime_ns
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        assert (tmp_path / "out.csv").stat().st_mtime_ns == written  # identical output is not rewritten
        (tmp_path / "out.csv").write_text("edited by hand\n", encoding="utf-8")
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        assert len(read_csv(tmp_path / "out.csv")) == 5  # a changed output file is written again
        (tmp_path / "out.csv").unlink()
        assert invoke(*run_args(srv, "--input", src, "--output", "out.csv")).exit_code == 0
        assert len(read_csv(tmp_path / "out.csv")) == 5
        assert srv.sim.count("/workflows/run") == 5
