"""CLI commands around `run`: inspect, status, export, demo, simulate flags, --help speed-critical imports."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from .conftest import invoke, read_csv, run_args, start_server, texts_csv, write_csv

DEMO_FORM = [
    {"text-input": {"variable": "product_name", "label": "Product", "type": "text-input", "required": True,
                    "max_length": 100}},
    {"select": {"variable": "category", "label": "Category", "type": "select", "required": True,
                "options": ["books", "toys"]}},
]


def test_inspect_prints_inputs_and_writes_a_job_file_with_guessed_mapping(tmp_path: Path) -> None:
    write_csv(tmp_path / "data.csv", ["sku", "name", "Category"], [["1", "x", "books"]])
    (tmp_path / "jobs").mkdir()
    with start_server(input_form=DEMO_FORM, app_name="Enricher") as srv:
        result = invoke("inspect", "--base-url", srv.url, "--input", "data.csv", "-o", "jobs/job.toml")
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == "App: Enricher  mode: workflow  -> --app-type workflow"
        assert lines[1] == "  product_name  text-input  required  max 100 chars"
        assert lines[2] == "  category  select  required  options: books | toys"
        job = tomllib.loads((tmp_path / "jobs" / "job.toml").read_text(encoding="utf-8"))
        assert job["input"] == "../data.csv" and job["base_url"] == srv.url
        assert job["map"] == {"product_name": "name", "category": "Category"}
        validated = invoke("validate", "jobs/job.toml")
    assert validated.exit_code == 0, validated.output


def test_status_and_export_mid_way(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 10)
    with start_server() as srv:
        assert invoke(*run_args(srv, "--input", "in.csv", "--output", "out.csv", "--limit", "4")).exit_code == 0
    status = invoke("status", "--input", "in.csv", "--output", "out.csv")
    assert status.exit_code == 0
    assert status.output.startswith("succeeded 4  failed 0  pending 0  total 4")
    (tmp_path / "out.csv").unlink()
    exported = invoke("export", "--input", "in.csv", "--output", "out.csv")
    assert exported.exit_code == 0, exported.output
    assert exported.output.strip() == "Exported 10 rows to out.csv; 0 failed rows in out.errors.csv"
    rows = read_csv(tmp_path / "out.csv")
    assert [r["_status"] for r in rows] == ["succeeded"] * 4 + ["pending"] * 6


def test_status_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    texts_csv(tmp_path / "in.csv", 2)
    result = invoke("status", "--input", "in.csv", "--output", "out.csv")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no checkpoint at out.csv.state.sqlite")


def test_demo_runs_on_the_builtin_simulator(tmp_path: Path) -> None:
    result = invoke("demo", "--no-progress", "--output-dir", "demo-out")
    assert result.exit_code == 0, result.output
    assert "Done: 30 succeeded, 0 failed" in result.output
    rows = read_csv(tmp_path / "demo-out" / "products.out.csv")
    assert len(rows) == 30 and rows[0]["sku"] == "00001"
    assert all(r["_status"] == "succeeded" and r["text"].startswith("Processed: ") for r in rows)


def test_simulate_rejects_a_bad_fault_spec() -> None:
    result = invoke("simulate", "--fault", "explode:0.5")
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "explode" in result.output


def test_help_does_not_import_heavy_libraries() -> None:
    code = ("import sys; from runner.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('pandas', 'pyarrow', 'httpx', 'aiohttp', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip().splitlines()[-1] == "[]"
