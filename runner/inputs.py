"""Input tables (CSV, TSV, Parquet, JSONL, XLSX) read as an iterator of row batches, plus encoding detection.

Rows are plain dicts with values kept as they are: CSV/TSV cells are always strings ("" when empty), Parquet and
JSONL give native values (None when missing), XLSX gives openpyxl's cell values ("" when empty).
Memory does not grow with the number of rows; every problem surfaces as one-line `InputFileError`.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import charset_normalizer
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .errors import InputFileError

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".parquet", ".jsonl", ".xlsx")
SAMPLE_BYTES = 1 << 20  # encoding detection looks at this much of the file
CSV_BLOCK_BYTES = 4 << 20  # one CSV row (with embedded newlines) must fit in a block
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_RAGGED = re.compile(r"Expected (\d+) columns, got (\d+): ?(.*)", re.DOTALL)

Row = dict[str, Any]


@dataclass(eq=False)
class TableReader:
    """An opened, validated input table. `iter_batches` may be called again; each call starts from the top."""

    path: Path
    format: str
    columns: list[str]
    encoding: str | None = None
    schema: pa.Schema | None = None
    has_bom: bool = False
    _row_count: int | None = field(default=None, repr=False)

    def iter_batches(self, batch_rows: int = 5000) -> Iterator[list[Row]]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        batches = {
            "csv": _csv_batches,
            "tsv": _csv_batches,
            "parquet": _parquet_batches,
            "jsonl": _jsonl_batches,
            "xlsx": _xlsx_batches,
        }[self.format]
        return batches(self, batch_rows)


def open_table(path: str | Path, *, encoding: str | None = None) -> TableReader:
    """Open `path` and check it eagerly: header, column names and at least one data row."""
    p = Path(path)
    fmt = _check_file(p)
    if encoding is not None:
        encoding = _known_encoding(p, encoding)
    openers = {"csv": _open_csv, "tsv": _open_csv, "parquet": _open_parquet, "jsonl": _open_jsonl, "xlsx": _open_xlsx}
    return openers[fmt](p, fmt, encoding)


def count_rows(reader: TableReader) -> int:
    """Number of data rows: Parquet from its metadata, JSONL from the scan at open, others by streaming the file."""
    if reader._row_count is not None:
        return reader._row_count
    if reader.format in ("csv", "tsv") and _arrow_reads(reader):
        with _csv_errors(reader):
            reader._row_count = sum(rb.num_rows for rb in _csv_stream(reader.path, reader))
    else:
        reader._row_count = sum(len(batch) for batch in reader.iter_batches())
    return reader._row_count


def detect_encoding(path: Path) -> str:
    """Encoding of a text file from its first MB: a BOM, then UTF-8, then GB18030, then charset-normalizer's guess."""
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
        whole_file = not f.read(1)
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    for candidate in ("utf-8", "gb18030"):
        if _decodes(sample, candidate, final=whole_file):
            return candidate
    # UTF-16/32 without a BOM is a typical misguess on short Latin-1 samples, and tables are never written that way.
    for guess in charset_normalizer.from_bytes(sample):
        if not guess.encoding.startswith(("utf_16", "utf_32")):
            return str(guess.encoding)
    raise InputFileError(f"{path}: cannot tell the text encoding; give the encoding explicitly")


def _decodes(sample: bytes, encoding: str, *, final: bool) -> bool:
    # An incremental decoder lets a multibyte character cut at the end of the sample pass as "unfinished".
    try:
        codecs.getincrementaldecoder(encoding)().decode(sample, final=final)
    except UnicodeDecodeError:
        return False
    return True


# --- checks shared by all formats -------------------------------------------------------------------------------


def _check_file(p: Path) -> str:
    if not p.exists():
        raise InputFileError(f"input file not found: {p}")
    if p.is_dir():
        raise InputFileError(f"input path is a folder, not a file: {p}")
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = repr(ext) if ext else "(none)"
        raise InputFileError(f"unsupported input file type {shown}: {p} (supported: {', '.join(SUPPORTED_EXTENSIONS)})")
    try:
        with open(p, "rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        raise InputFileError(f"cannot read input file: {p} ({exc.strerror or exc})") from exc
    if empty:
        raise InputFileError(f"input file is empty (no header row): {p}")
    return ext[1:]


def _known_encoding(p: Path, encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError as exc:
        raise InputFileError(f"{p}: unknown encoding {encoding!r}") from exc


def _check_columns(p: Path, columns: list[str], where: str = "header") -> None:
    empty = [i for i, name in enumerate(columns, 1) if not name.strip()]
    if empty:
        raise InputFileError(f"{p}: empty column name in the {where} (column {', '.join(map(str, empty))})")
    duplicates = [name for name, count in Counter(columns).items() if count > 1]
    if duplicates:
        names = ", ".join(repr(n) for n in duplicates)
        raise InputFileError(f"{p}: duplicate column name in the {where}: {names}")


def _no_rows(p: Path) -> InputFileError:
    return InputFileError(f"{p}: header only, no data rows")


def _has_bom(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4).startswith(_BOMS)


def _rebatch(record_batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[list[Row]]:
    """Arrow record batches of any size -> lists of exactly `batch_rows` dicts (the last may be shorter)."""
    buffer: list[Row] = []
    for rb in record_batches:
        offset = 0
        while offset < rb.num_rows:
            take = min(batch_rows - len(buffer), rb.num_rows - offset)
            buffer.extend(rb.slice(offset, take).to_pylist())
            offset += take
            if len(buffer) == batch_rows:
                yield buffer
                buffer = []
    if buffer:
        yield buffer


# --- CSV / TSV --------------------------------------------------------------------------------------------------


def _open_csv(p: Path, fmt: str, encoding: str | None) -> TableReader:
    reader = TableReader(p, fmt, [], encoding or detect_encoding(p), has_bom=_has_bom(p))
    if _arrow_reads(reader):
        with _csv_errors(reader):
            reader.columns = list(_csv_stream(p, reader, typed=False).schema.names)
            _check_columns(p, reader.columns)
            has_rows = any(rb.num_rows for rb in _csv_stream(p, reader))
    else:
        with _text_errors(reader):
            records = _text_records(reader)
            reader.columns = next(records, (0, []))[1]
            if not reader.columns:
                raise InputFileError(f"input file is empty (no header row): {p}")
            _check_columns(p, reader.columns)
            has_rows = next(records, None) is not None
            records.close()
    if not has_rows:
        raise _no_rows(p)
    return reader


def _arrow_reads(reader: TableReader) -> bool:
    # pyarrow parses UTF-8 natively. Its transcoding of other encodings runs a Python codec on a reader thread and can
    # hang or abort the interpreter when a stream is dropped unfinished (apache/arrow#43892), so those files go
    # through the csv module instead.
    return reader.encoding in ("utf-8", "utf-8-sig")


def _csv_batches(reader: TableReader, batch_rows: int) -> Iterator[list[Row]]:
    if _arrow_reads(reader):
        with _csv_errors(reader):
            yield from _rebatch(_csv_stream(reader.path, reader), batch_rows)
        return
    with _text_errors(reader):
        yield from _batched(_text_rows(reader), batch_rows)


def _csv_stream(p: Path, reader: TableReader, *, typed: bool = True) -> pa_csv.CSVStreamingReader:
    read = pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES)  # UTF-8; pyarrow skips a BOM itself
    parse = pa_csv.ParseOptions(delimiter=_delimiter(reader), newlines_in_values=True)
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(reader.columns, pa.string()) if typed else None)
    return pa_csv.open_csv(p, read_options=read, parse_options=parse, convert_options=convert)


def _delimiter(reader: TableReader) -> str:
    return "\t" if reader.format == "tsv" else ","


@contextmanager
def _csv_errors(reader: TableReader) -> Iterator[None]:
    """Turns pyarrow's CSV errors (which carry no line numbers) into InputFileError naming the line."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        raise _csv_error(reader, exc) from exc


def _csv_error(reader: TableReader, exc: BaseException) -> InputFileError:
    p, text = reader.path, str(exc)
    if "Empty CSV file" in text:
        return InputFileError(f"input file is empty (no header row): {p}")
    ragged = _RAGGED.search(text)
    if ragged:
        expected, found = int(ragged[1]), int(ragged[2])
        line = _find_ragged_line(reader, expected)
        if line is not None:
            return InputFileError(f"{p} line {line[0]}: expected {expected} fields, found {line[1]}")
        return InputFileError(f"{p}: expected {expected} fields, found {found} in row {ragged[3][:80]!r}")
    if "straddling" in text:
        return InputFileError(
            f'{p}: a quoted field never ends (unbalanced ") or one row is larger than {CSV_BLOCK_BYTES >> 20} MB'
        )
    if "invalid UTF8" in text:
        return _decode_error(reader)
    return InputFileError(f"{p}: cannot parse as {reader.format.upper()} ({text})")


def _find_ragged_line(reader: TableReader, expected: int) -> tuple[int, int] | None:
    """(first line, field count) of the first record whose field count differs from the header's."""
    try:
        for line, record in _text_records(reader, errors="replace"):
            if len(record) != expected:
                return line, len(record)
    except csv.Error:
        return None  # the csv module disagrees with pyarrow on this file: fall back to pyarrow's text
    return None


def _text_records(reader: TableReader, errors: str = "strict") -> Generator[tuple[int, list[str]], None, None]:
    """(first line, fields) of each non-blank record, parsed by the csv module in the file's encoding."""
    # Let one field be as large as pyarrow allows; the limit is process-wide but only ever raised here.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_BLOCK_BYTES))
    with open(reader.path, encoding=reader.encoding, errors=errors, newline="") as f:
        records = csv.reader(f, delimiter=_delimiter(reader))
        next_line = 1
        for record in records:
            start, next_line = next_line, records.line_num + 1
            if record:
                yield start, record


def _text_rows(reader: TableReader) -> Iterator[Row]:
    records = _text_records(reader)
    next(records, None)  # the header
    width = len(reader.columns)
    for line, record in records:
        if len(record) != width:
            raise InputFileError(f"{reader.path} line {line}: expected {width} fields, found {len(record)}")
        yield dict(zip(reader.columns, record, strict=True))


@contextmanager
def _text_errors(reader: TableReader) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as exc:
        raise _decode_error(reader) from exc
    except csv.Error as exc:
        raise InputFileError(f"{reader.path}: cannot parse as {reader.format.upper()} ({exc})") from exc


def _decode_error(reader: TableReader) -> InputFileError:
    line, byte = _find_undecodable(reader.path, reader.encoding or "utf-8")
    return InputFileError(
        f"{reader.path} line {line}: cannot decode byte 0x{byte:02x} as {reader.encoding}; give the right encoding"
    )


def _find_undecodable(p: Path, encoding: str) -> tuple[int, int]:
    """(line, first bad byte) of the first undecodable sequence, read in chunks so memory stays flat."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(p, "rb") as f:
        while True:
            chunk = f.read(SAMPLE_BYTES)
            data = decoder.getstate()[0] + chunk  # what the decoder will look at, so exc.start indexes into it
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                return line + data.count(b"\n", 0, exc.start), data[exc.start]
            if not chunk:
                return line, 0
            line += chunk.count(b"\n")


# --- Parquet ----------------------------------------------------------------------------------------------------


def _parquet_file(p: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(f"not a valid Parquet file: {p} ({exc})") from exc


def _open_parquet(p: Path, fmt: str, encoding: str | None) -> TableReader:
    with _parquet_file(p) as pf:
        schema, rows = pf.schema_arrow, pf.metadata.num_rows
    columns = list(schema.names)
    _check_columns(p, columns, "schema")
    if rows == 0:
        raise _no_rows(p)
    return TableReader(p, fmt, columns, None, schema, _row_count=rows)


def _parquet_batches(reader: TableReader, batch_rows: int) -> Iterator[list[Row]]:
    with _parquet_file(reader.path) as pf:
        try:
            yield from _rebatch(pf.iter_batches(batch_size=batch_rows), batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise InputFileError(f"not a valid Parquet file: {reader.path} ({exc})") from exc


# --- JSONL ------------------------------------------------------------------------------------------------------


def _open_jsonl(p: Path, fmt: str, encoding: str | None) -> TableReader:
    keys: dict[str, None] = {}
    rows = 0
    for obj in _jsonl_objects(p, encoding):
        keys.update(dict.fromkeys(obj))  # dict keeps first-appearance order
        rows += 1
    if rows == 0:
        raise InputFileError(f"{p}: no JSON objects (no data rows)")
    if not keys:
        raise InputFileError(f"{p}: the JSON objects have no keys (no columns)")
    columns = list(keys)
    _check_columns(p, columns, "JSON keys")
    return TableReader(p, fmt, columns, encoding, has_bom=_has_bom(p), _row_count=rows)


def _jsonl_objects(p: Path, encoding: str | None) -> Iterator[dict[str, Any]]:
    # Bytes are decoded line by line so an error names its exact line.
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and encoding is None:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = _decode_line(p, number, raw, encoding or "utf-8")
            if text.strip():
                yield _parse_object(p, number, text)


def _decode_line(p: Path, number: int, raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        raise InputFileError(f"{p} line {number}: cannot decode byte 0x{bad:02x} as {encoding}") from exc


def _parse_object(p: Path, number: int, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{p} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise InputFileError(f"{p} line {number}: expected a JSON object, found {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _jsonl_batches(reader: TableReader, batch_rows: int) -> Iterator[list[Row]]:
    objects = _jsonl_objects(reader.path, reader.encoding)
    yield from _batched(({column: obj.get(column) for column in reader.columns} for obj in objects), batch_rows)


def _batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- XLSX -------------------------------------------------------------------------------------------------------


def _sheet_rows(p: Path) -> Generator[tuple[Any, ...], None, None]:
    """Rows of the first sheet as value tuples; the workbook is closed when the iterator ends or is dropped."""
    import openpyxl  # only XLSX users pay for the import
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openpyxl warns about styles/extensions it skips; not the user's problem
            workbook = openpyxl.load_workbook(p, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise InputFileError(f"not a valid XLSX file: {p} ({exc})") from exc
    try:
        yield from workbook.worksheets[0].iter_rows(values_only=True)
    finally:
        workbook.close()


def _is_blank(values: tuple[Any, ...]) -> bool:
    return all(v is None or v == "" for v in values)


def _xlsx_header(p: Path, rows: Iterator[tuple[Any, ...]]) -> list[str]:
    header = list(next(rows, ()))
    while header and (header[-1] is None or header[-1] == ""):
        header.pop()  # formatting can stretch the sheet's width past the last named column
    if not header:
        raise InputFileError(f"input file is empty (no header row): {p}")
    columns = ["" if v is None else str(v) for v in header]
    _check_columns(p, columns)
    return columns


def _open_xlsx(p: Path, fmt: str, encoding: str | None) -> TableReader:
    rows = _sheet_rows(p)
    try:
        columns = _xlsx_header(p, rows)
        if all(_is_blank(values) for values in rows):
            raise _no_rows(p)
    finally:
        rows.close()
    return TableReader(p, fmt, columns)


def _xlsx_batches(reader: TableReader, batch_rows: int) -> Iterator[list[Row]]:
    rows = _sheet_rows(reader.path)
    try:
        next(rows, None)
        yield from _batched(_xlsx_dicts(reader, rows), batch_rows)
    finally:
        rows.close()


def _xlsx_dicts(reader: TableReader, rows: Iterator[tuple[Any, ...]]) -> Iterator[Row]:
    """Data rows as dicts, empty cells as ""; blank rows are held back so trailing ones are dropped."""
    width, blanks = len(reader.columns), 0
    for number, values in enumerate(rows, 2):
        if _is_blank(values):
            blanks += 1
            continue
        if any(v is not None and v != "" for v in values[width:]):
            raise InputFileError(f"{reader.path} row {number}: a value lies right of the last named column")
        for _ in range(blanks):
            yield dict.fromkeys(reader.columns, "")
        blanks = 0
        padded = list(values[:width]) + [None] * (width - len(values))
        yield {c: ("" if v is None else v) for c, v in zip(reader.columns, padded, strict=True)}
