"""Output tables (CSV, TSV, Parquet, JSONL, XLSX), written batch by batch to a temp file and renamed into place.

An existing output is only replaced by a complete new file; on any failure the temp file goes and the old output stays.
Cell conventions for text formats: None -> "", bools -> "true"/"false", dicts/lists -> compact JSON text.
"""

from __future__ import annotations

import base64
import csv
import errno
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime, time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError

OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".xlsx": "xlsx"}
XLSX_MAX_DATA_ROWS = 1_048_575  # Excel's 1,048,576 rows minus the header
PARQUET_ROW_GROUP_ROWS = 50_000  # small batches are pooled so the file does not end up with thousands of row groups
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INFER_CHUNK = 1000

Row = dict[str, Any]


def output_format(path: str | Path) -> str:
    """The format name ("csv", "tsv", "parquet", "jsonl" or "xlsx") from the file extension."""
    ext = Path(path).suffix.lower()
    if ext not in OUTPUT_FORMATS:
        shown = repr(ext) if ext else "(none)"
        raise OutputError(f"unsupported output file type {shown}: {path} (supported: {', '.join(OUTPUT_FORMATS)})")
    return OUTPUT_FORMATS[ext]


def neutralise_formula(value: Any) -> Any:
    """Prefix "'" to strings a spreadsheet would run as a formula (OWASP CSV injection); plain numbers like -5 pass."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


# --- value conversion -------------------------------------------------------------------------------------------


def _plain_text(value: Any) -> str:
    """Text for values JSON has no type for (also json.dumps' fallback): dates ISO 8601, bytes base64."""
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain_text)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return _json_text(value)
    return _plain_text(value)


# --- Parquet schema inference -----------------------------------------------------------------------------------


def infer_arrow_schema(
    input_schema: pa.Schema | None,
    input_columns: list[str],
    output_samples: Mapping[str, Iterable[Any]],
    meta_types: Mapping[str, pa.DataType],
) -> pa.Schema:
    """Input columns keep their Parquet types (string without one); output columns get a type fitting every value."""
    types: dict[str, pa.DataType] = {}
    for column in input_columns:
        known = input_schema is not None and column in input_schema.names
        types[column] = input_schema.field(column).type if known else pa.string()  # type: ignore[union-attr]
    for column, values in output_samples.items():
        types[column] = infer_type(values)
    types.update(meta_types)
    return pa.schema(list(types.items()))


def infer_type(values: Iterable[Any]) -> pa.DataType:
    """int64, float64 (ints mixed with floats), bool, a nested type when all dicts/lists agree, else string."""
    kinds: set[str] = set()
    nested = _NestedType()
    for value in values:
        if value is None:
            continue
        kinds.add(_kind(value))
        if kinds == {"nested"}:
            nested.add(value)
    return _type_for(kinds, nested.result())


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict | list):
        return "nested"
    return "str" if isinstance(value, str) else "other"


class _NestedType:
    """Folds dict/list values into one Arrow type, a chunk at a time so memory stays flat."""

    def __init__(self) -> None:
        self.type: pa.DataType | None = None
        self.failed = False
        self.chunk: list[Any] = []

    def add(self, value: Any) -> None:
        if not self.failed:
            self.chunk.append(value)
            if len(self.chunk) == _INFER_CHUNK:
                self._merge()

    def result(self) -> pa.DataType | None:
        if self.chunk and not self.failed:
            self._merge()
        return None if self.failed else self.type

    def _merge(self) -> None:
        chunk, self.chunk = self.chunk, []
        try:
            found = pa.array(chunk).type
            if self.type is not None:
                schemas = [pa.schema([("v", self.type)]), pa.schema([("v", found)])]
                found = pa.unify_schemas(schemas, promote_options="permissive").field("v").type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            self.failed = True  # the values disagree: they will be written as JSON text
            return
        self.type = found


def _type_for(kinds: set[str], nested: pa.DataType | None) -> pa.DataType:
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    if kinds == {"nested"} and nested is not None and _parquet_writable(nested):
        return nested
    return pa.string()


def _parquet_writable(t: pa.DataType) -> bool:
    """Parquet cannot store a struct without fields (what `{}` infers to)."""
    if pa.types.is_struct(t):
        children = [t.field(i).type for i in range(t.num_fields)]
        return bool(children) and all(_parquet_writable(c) for c in children)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _parquet_writable(t.value_type)
    return True


# --- the writer -------------------------------------------------------------------------------------------------


class TableWriter:
    """One output table, written to a temp file beside `path` and renamed over it by `commit()`.

    As a context manager a clean exit commits and an exception aborts. `neutralise_columns` (None: all columns)
    are guarded against formula injection: always in XLSX, in CSV/TSV only with `safe_formulas=True`.
    `arrow_schema` (Parquet only, see `infer_arrow_schema`) types the columns; columns it lacks are strings.
    `bom` starts CSV/TSV with a UTF-8 BOM so Excel reads them as UTF-8.
    """

    def __init__(
        self,
        path: str | Path,
        columns: list[str],
        *,
        arrow_schema: pa.Schema | None = None,
        safe_formulas: bool = False,
        bom: bool = False,
        neutralise_columns: Iterable[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.format = output_format(path)
        self.columns = list(columns)
        self.rows_written = 0
        self._state = "open"
        guarded = set(self.columns if neutralise_columns is None else neutralise_columns)
        if self.format in ("jsonl", "parquet") or (self.format != "xlsx" and not safe_formulas):
            guarded = set()
        self._temp = _create_temp(self.path)
        try:
            with _os_errors(self.path):
                self._sink = _open_sink(self, arrow_schema, bom, guarded)
        except BaseException:
            _remove(self._temp)
            raise

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write_rows(self, rows: list[Row]) -> None:
        """Append rows (dicts; missing keys are None, extra keys ignored). A failure aborts the writer."""
        self._check_open()
        try:
            with _os_errors(self.path):
                self._sink.write(rows)
        except BaseException:
            self.abort()
            raise
        self.rows_written += len(rows)

    def commit(self) -> None:
        """Finish the file and move it over `path`. Calling it again is a no-op."""
        if self._state == "committed":
            return
        self._check_open()
        try:
            with _os_errors(self.path):
                self._sink.close()
                _fsync(self._temp)
                os.replace(self._temp, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"

    def abort(self) -> None:
        """Drop the temp file; an existing output at `path` is left as it was."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._sink.discard()
        _remove(self._temp)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"TableWriter for {self.path} is already {self._state}")


def write_table_atomic(path: str | Path, columns: list[str], batches: Iterable[list[Row]], **options: Any) -> int:
    """Write all batches through one `TableWriter`; returns the number of rows written."""
    with TableWriter(path, columns, **options) as writer:
        for batch in batches:
            writer.write_rows(batch)
    return writer.rows_written


def _create_temp(path: Path) -> Path:
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise OutputError(f"output path is a folder, not a file: {path}")
    temp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    with _os_errors(path):
        open(temp, "xb").close()
    return temp


@contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputError(_os_message(path, exc)) from exc


def _os_message(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


def _fsync(path: Path) -> None:
    # The rename must not land before the data does, or a crash could leave an empty file in place of the old one.
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- one sink per format: write(rows), close() to finish the file, discard() to drop it ----------------------------


def _open_sink(writer: TableWriter, schema: pa.Schema | None, bom: bool, guarded: set[str]) -> _Sink:
    if writer.format in ("csv", "tsv"):
        return _CsvSink(writer, "\t" if writer.format == "tsv" else ",", bom, guarded)
    if writer.format == "jsonl":
        return _JsonlSink(writer)
    if writer.format == "parquet":
        return _ParquetSink(writer, schema)
    return _XlsxSink(writer, guarded)


class _Sink:
    def write(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _TextFileSink(_Sink):
    file: IO[str]

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # e.g. the disk is full: the file is being thrown away anyway


class _CsvSink(_TextFileSink):
    def __init__(self, writer: TableWriter, delimiter: str, bom: bool, guarded: set[str]) -> None:
        self.columns = writer.columns
        self.guarded = [column in guarded for column in self.columns]
        self.file = open(writer._temp, "w", encoding="utf-8-sig" if bom else "utf-8", newline="")
        self.csv = csv.writer(self.file, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        self.csv.writerow(self.columns)

    def write(self, rows: list[Row]) -> None:
        self.csv.writerows(self._cells(row) for row in rows)

    def _cells(self, row: Row) -> list[str]:
        cells = [_cell_text(row.get(column)) for column in self.columns]
        return [neutralise_formula(c) if g else c for c, g in zip(cells, self.guarded, strict=True)]


class _JsonlSink(_TextFileSink):
    def __init__(self, writer: TableWriter) -> None:
        self.columns = writer.columns
        self.file = open(writer._temp, "w", encoding="utf-8", newline="\n")

    def write(self, rows: list[Row]) -> None:
        self.file.writelines(_json_text({c: row.get(c) for c in self.columns}) + "\n" for row in rows)


class _ParquetSink(_Sink):
    def __init__(self, writer: TableWriter, schema: pa.Schema | None) -> None:
        self.path = writer.path
        self.schema = _aligned_schema(writer.columns, schema)
        self.parquet = pq.ParquetWriter(writer._temp, self.schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write(self, rows: list[Row]) -> None:
        arrays = [_arrow_array(self.path, f, [row.get(f.name) for row in rows]) for f in self.schema]
        self.pending.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.pending_rows += len(rows)
        if self.pending_rows >= PARQUET_ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.parquet.write_table(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self.parquet.close()

    def discard(self) -> None:
        self.pending = []
        try:
            self.parquet.close()
        except OSError:
            pass


def _aligned_schema(columns: list[str], schema: pa.Schema | None) -> pa.Schema:
    """Fields in `columns` order; schema metadata (e.g. pandas') is dropped: it no longer describes the table."""
    known = {} if schema is None else {f.name: f for f in schema}
    return pa.schema([known.get(c, pa.field(c, pa.string())) for c in columns])


def _arrow_array(path: Path, field: pa.Field, values: list[Any]) -> pa.Array:
    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        values = [None if v is None else _cell_text(v) for v in values]
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise OutputError(f"cannot write {path}: column {field.name!r} has a value that is not {field.type}") from exc


class _XlsxSink(_Sink):
    def __init__(self, writer: TableWriter, guarded: set[str]) -> None:
        from openpyxl import Workbook  # only XLSX users pay for the import

        self.path, self.temp, self.columns = writer.path, writer._temp, writer.columns
        self.guarded = [column in guarded for column in self.columns]
        self.workbook = Workbook(write_only=True)
        self.sheet = self.workbook.create_sheet()
        self.sheet.append([self._cell(c) for c in self.columns])
        self.rows = 0

    def write(self, rows: list[Row]) -> None:
        if self.rows + len(rows) > XLSX_MAX_DATA_ROWS:
            raise OutputError(
                f"cannot write {self.path}: XLSX holds at most {XLSX_MAX_DATA_ROWS:,} data rows; use CSV or Parquet"
            )
        for row in rows:
            values = [_xlsx_value(row.get(c)) for c in self.columns]
            guarded = zip(values, self.guarded, strict=True)
            self.sheet.append([self._cell(neutralise_formula(v) if g else v) for v, g in guarded])
        self.rows += len(rows)

    def _cell(self, value: Any) -> Any:
        # openpyxl turns strings starting with "=" into formulas and "#N/A"-like ones into errors; keep them text.
        if isinstance(value, str) and value.startswith(("=", "#")):
            from openpyxl.cell import WriteOnlyCell

            cell = WriteOnlyCell(self.sheet, value=value)
            cell.data_type = "s"
            return cell
        return value

    def close(self) -> None:
        self.workbook.save(self.temp)

    def discard(self) -> None:
        # Finish openpyxl's scratch sheet so its row generator is not left dangling, then delete the scratch file
        # now rather than at interpreter exit.
        try:
            self.sheet.close()
            writer = getattr(self.sheet, "_writer", None)
            if writer is not None:
                writer.cleanup()
        except (OSError, ValueError):
            pass


def _xlsx_value(value: Any) -> Any:
    """A value openpyxl can store: text is stripped of control characters XML cannot carry."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, datetime | date | time) and getattr(value, "tzinfo", None) is None:
        return value  # Excel has no time zones, so aware datetimes become ISO text below
    text = value if isinstance(value, str) else _cell_text(value)
    return _ILLEGAL_XML.sub("", text)


_ILLEGAL_XML = re.compile(r"[\000-\010\013\014\016-\037]")
