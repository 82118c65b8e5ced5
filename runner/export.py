"""Export: join the input table with the checkpoint into the output table (input order) and the failed-rows report.

Streams the input again batch by batch and looks results up by key, so memory stays flat whatever the row count.
Works at any time, mid-run included: rows without a result yet are written with `_status` "pending".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, RowState
from .inputs import TableReader
from .outputs import TableWriter, infer_arrow_schema, output_format
from .plan import KeyedRow, iter_keyed_batches
from .spec import JobSpec

META_COLUMNS = ("_status", "_error", "_attempts", "_elapsed_s", "_workflow_run_id", "_total_tokens")
ERROR_COLUMNS = ("key", "row", "error_code", "http_status", "message", "attempts")


@dataclass(frozen=True)
class ExportResult:
    output: Path
    errors: Path
    rows: int
    failed: int


def result_columns(input_columns: list[str], output_keys: list[str]) -> list[tuple[str, str]]:
    """(output key, column name) pairs; a name that clashes with an input or meta column is prefixed `output.`."""
    taken = set(input_columns) | set(META_COLUMNS)
    return [(key, f"output.{key}" if key in taken else key) for key in output_keys]


def export_results(reader: TableReader, spec: JobSpec, mapping: dict[str, str], store: Checkpoint) -> ExportResult:
    """Write the output table and the errors report from the checkpoint, atomically."""
    outputs = result_columns(reader.columns, store.output_columns())
    columns = [*reader.columns, *(name for _, name in outputs), *META_COLUMNS]
    schema = _arrow_schema(reader, spec, store, outputs)
    writer = TableWriter(
        spec.output, columns, arrow_schema=schema, safe_formulas=spec.safe_csv,
        neutralise_columns={name for _, name in outputs} | {"_error"}, bom=_wants_bom(reader),
    )
    rows = 0
    with writer:
        for batch in iter_keyed_batches(reader, spec, mapping):
            states = store.get_rows([item.key for item in batch])
            writer.write_rows([_output_row(item, states.get(item.key), outputs) for item in batch])
            rows += len(batch)
        writer.commit()
    failed = write_errors_report(spec.errors_path, store, safe_formulas=spec.safe_csv)
    return ExportResult(spec.output, spec.errors_path, rows, failed)


def _wants_bom(reader: TableReader) -> bool:
    # Excel reads UTF-8 CSV as the local code page unless it starts with a BOM: keep Chinese text readable for GBK users.
    return reader.has_bom or (reader.encoding or "").lower().replace("-", "") in ("gbk", "gb18030", "gb2312")


def _output_row(item: KeyedRow, state: RowState | None, outputs: list[tuple[str, str]]) -> dict[str, Any]:
    row = dict(item.row)
    values = (state.outputs or {}) if state and state.status == "succeeded" else {}
    for key, name in outputs:
        row[name] = values.get(key)
    row.update(_meta(state))
    return row


def _meta(state: RowState | None) -> dict[str, Any]:
    if state is None or state.status not in ("succeeded", "failed"):
        return {"_status": "pending", "_error": None, "_attempts": state.attempts if state else 0,
                "_elapsed_s": None, "_workflow_run_id": state.workflow_run_id if state else None, "_total_tokens": None}
    return {
        "_status": state.status,
        "_error": state.error if state.status == "failed" else None,
        "_attempts": state.attempts,
        "_elapsed_s": round(state.elapsed_s, 3) if state.elapsed_s is not None else None,
        "_workflow_run_id": state.workflow_run_id,
        "_total_tokens": state.total_tokens,
    }


def _arrow_schema(reader: TableReader, spec: JobSpec, store: Checkpoint, outputs: list[tuple[str, str]]) -> Any:
    if output_format(spec.output) != "parquet":
        return None
    import pyarrow as pa

    samples = {name: _output_values(store, key) for key, name in outputs}
    meta = {"_status": pa.string(), "_error": pa.string(), "_attempts": pa.int64(), "_elapsed_s": pa.float64(),
            "_workflow_run_id": pa.string(), "_total_tokens": pa.int64()}
    return infer_arrow_schema(reader.schema, reader.columns, samples, meta)


def _output_values(store: Checkpoint, key: str) -> Iterator[Any]:
    for state in store.iter_rows(status="succeeded"):
        yield (state.outputs or {}).get(key)


def write_errors_report(path: Path, store: Checkpoint, *, safe_formulas: bool = False) -> int:
    """The failed rows (key, row number, code, HTTP status, message, attempts) as CSV; header only when none failed.

    Error messages quote server text (which may quote model output), so --safe-csv neutralises them too.
    """
    failed = 0
    with TableWriter(path, list(ERROR_COLUMNS), safe_formulas=safe_formulas, neutralise_columns={"message"}) as writer:
        batch: list[dict[str, Any]] = []
        for state in store.iter_rows(status="failed"):
            batch.append({"key": state.key, "row": state.row_index + 1, "error_code": state.error_code,
                          "http_status": state.http_status, "message": state.error, "attempts": state.attempts})
            failed += 1
            if len(batch) >= 5000:
                writer.write_rows(batch)
                batch = []
        writer.write_rows(batch)
        writer.commit()
    return failed
