from __future__ import annotations

import codecs
import errno
import json
import os
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl import load_workbook

from runner import outputs
from runner.errors import OutputError
from runner.inputs import open_table
from runner.outputs import TableWriter, infer_arrow_schema, neutralise_formula, output_format, write_table_atomic

TRICKY = [
    {"id": "007", "text": 'say "hi", then\nleave', "zh": "今天天气怎么样？", "empty": "", "price": "1.50"},
    {"id": "008", "text": "=SUM(A1:A9)", "zh": "北京,上海", "empty": "", "price": "-2"},
]


def read_all(path: Path) -> list[dict[str, Any]]:
    return [row for batch in open_table(path).iter_batches() for row in batch]


def write(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None, **options: Any) -> Path:
    write_table_atomic(path, columns or list(rows[0]), [rows], **options)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- formats -----------------------------------------------------------------------------------------------------


def test_output_format_follows_the_extension() -> None:
    assert [output_format(f"x{ext}") for ext in (".csv", ".TSV", ".parquet", ".jsonl", ".xlsx")] == [
        "csv",
        "tsv",
        "parquet",
        "jsonl",
        "xlsx",
    ]


def test_unsupported_output_extension_lists_the_supported_ones() -> None:
    with pytest.raises(OutputError) as info:
        output_format("out.xls")
    supported = "(supported: .csv, .tsv, .parquet, .jsonl, .xlsx)"
    assert str(info.value) == f"unsupported output file type '.xls': out.xls {supported}"


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet", "xlsx"])
def test_round_trip_keeps_tricky_text_values(tmp_path: Path, ext: str) -> None:
    first = write(tmp_path / f"in.{ext}", TRICKY, neutralise_columns=())
    second = tmp_path / f"out.{ext}"
    reader = open_table(first)
    write_table_atomic(second, reader.columns, reader.iter_batches(), arrow_schema=reader.schema, neutralise_columns=())
    assert read_all(second) == read_all(first) == TRICKY


def test_csv_round_trip_of_gbk_input_keeps_chinese_text(tmp_path: Path) -> None:
    source = tmp_path / "gbk.csv"
    source.write_bytes("名字,城市\n张三,北京\n".encode("gbk"))
    reader = open_table(source)
    out = write_table_atomic(tmp_path / "out.csv", reader.columns, reader.iter_batches(), bom=True)
    assert out == 1
    assert (tmp_path / "out.csv").read_bytes().startswith(codecs.BOM_UTF8)
    assert read_all(tmp_path / "out.csv") == [{"名字": "张三", "城市": "北京"}]


def test_parquet_round_trip_keeps_native_types(tmp_path: Path) -> None:
    table = pa.table({"i": [1, None], "f": [0.1, 2.0], "b": [True, None], "l": [[1], []], "d": [{"k": "v"}, None]})
    pq.write_table(table, tmp_path / "in.parquet")
    reader = open_table(tmp_path / "in.parquet")
    write_table_atomic(tmp_path / "out.parquet", reader.columns, reader.iter_batches(), arrow_schema=reader.schema)
    assert pq.read_table(tmp_path / "out.parquet").equals(table)


def test_jsonl_round_trip_keeps_native_values(tmp_path: Path) -> None:
    rows = [{"n": 1, "f": 2.5, "b": False, "nested": {"a": [1, None]}, "none": None, "zh": "你好"}]
    path = write(tmp_path / "r.jsonl", rows)
    assert read_all(path) == rows
    expected = '{"n":1,"f":2.5,"b":false,"nested":{"a":[1,null]},"none":null,"zh":"你好"}\n'
    assert path.read_text(encoding="utf-8") == expected


def test_xlsx_round_trip_keeps_numbers_and_turns_none_into_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "r.xlsx", [{"n": 1, "f": 2.5, "b": True, "s": "007", "none": None}])
    assert read_all(path) == [{"n": 1, "f": 2.5, "b": True, "s": "007", "none": ""}]


def test_csv_cells_none_empty_bools_lowercase_nested_as_compact_json(tmp_path: Path) -> None:
    row = {
        "none": None,
        "t": True,
        "f": False,
        "i": 3,
        "x": 0.1,
        "d": {"答": [1, "二"]},
        "day": date(2024, 5, 1),
        "at": datetime(2024, 5, 1, 8, 30),
        "dec": Decimal("1.10"),
        "raw": b"\x00\xff",
    }
    path = write(tmp_path / "c.csv", [row])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == ',true,false,3,0.1,"{""答"":[1,""二""]}",2024-05-01,2024-05-01T08:30:00,1.10,AP8='


def test_csv_has_bom_only_when_asked(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.csv", [{"a": "中"}])
    bom = write(tmp_path / "bom.csv", [{"a": "中"}], bom=True)
    assert not plain.read_bytes().startswith(codecs.BOM_UTF8)
    assert bom.read_bytes() == codecs.BOM_UTF8 + "a\r\n中\r\n".encode()


def test_rows_follow_the_column_order_and_missing_keys_are_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "o.csv", [{"b": "2", "a": "1", "extra": "x"}, {"a": "3"}], columns=["a", "b"])
    assert path.read_bytes() == b"a,b\r\n1,2\r\n3,\r\n"


# --- Parquet schema inference ------------------------------------------------------------------------------------


def test_infer_schema_keeps_input_parquet_types_and_uses_string_without_them() -> None:
    schema = pa.schema([("id", pa.int32()), ("when", pa.timestamp("ms"))])
    assert infer_arrow_schema(schema, ["id", "when"], {}, {}) == schema
    assert infer_arrow_schema(None, ["id", "text"], {}, {}) == pa.schema([("id", pa.string()), ("text", pa.string())])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, None, 2], pa.int64()),
        ([1, 2.5, None], pa.float64()),
        ([True, None, False], pa.bool_()),
        (["a", None], pa.string()),
        ([None, None], pa.string()),
        ([], pa.string()),
        ([1, "a"], pa.string()),
        ([True, 1], pa.string()),
        ([2**64], pa.string()),
        ([{"a": 1}, {"a": 2, "b": "x"}, None], pa.struct([("a", pa.int64()), ("b", pa.string())])),
        ([[1], [2.5], []], pa.list_(pa.float64())),
        ([{"a": 1}, {"a": "x"}], pa.string()),
        ([{"a": 1}, [1]], pa.string()),
        ([{"a": 1}, "text"], pa.string()),
        ([{}], pa.string()),
    ],
)
def test_infer_schema_gives_output_columns_a_type_fitting_all_values(values: list[Any], expected: pa.DataType) -> None:
    schema = infer_arrow_schema(None, [], {"out": iter(values)}, {})
    assert schema.field("out").type == expected


def test_infer_schema_merges_nested_types_across_chunks() -> None:
    values = [{"a": 1}] * 1500 + [{"a": 1.5, "b": [True]}] * 10
    assert outputs.infer_type(values) == pa.struct([("a", pa.float64()), ("b", pa.list_(pa.bool_()))])


def test_infer_schema_applies_meta_types_last() -> None:
    schema = infer_arrow_schema(None, ["q"], {"answer": ["x"]}, {"_status": pa.string(), "_attempts": pa.int64()})
    assert schema == pa.schema([("q", pa.string()), ("answer", pa.string()), ("_status", pa.string()), ("_attempts", pa.int64())])


def test_parquet_output_with_nested_int_float_and_none_columns(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"q": "1", "n": 1, "f": 1, "d": {"a": [1, 2]}, "mixed": {"a": 1}, "none": None},
        {"q": "2", "n": None, "f": 2.5, "d": None, "mixed": [1, "x"], "none": None},
    ]
    samples = {c: [r[c] for r in rows] for c in ("n", "f", "d", "mixed", "none")}
    schema = infer_arrow_schema(None, ["q"], samples, {})
    path = write(tmp_path / "o.parquet", rows, arrow_schema=schema)
    table = pq.read_table(path)
    assert table.schema.field("n").type == pa.int64() and table.schema.field("f").type == pa.float64()
    assert table.to_pylist() == [
        {"q": "1", "n": 1, "f": 1.0, "d": {"a": [1, 2]}, "mixed": '{"a":1}', "none": None},
        {"q": "2", "n": None, "f": 2.5, "d": None, "mixed": '[1,"x"]', "none": None},
    ]


def test_parquet_without_schema_writes_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "o.parquet", [{"a": 1, "b": None, "c": True}])
    assert pq.read_table(path).to_pylist() == [{"a": "1", "b": None, "c": "true"}]


def test_parquet_value_that_does_not_fit_names_the_column(tmp_path: Path) -> None:
    schema = pa.schema([("n", pa.int64())])
    with pytest.raises(OutputError) as info:
        write(tmp_path / "o.parquet", [{"n": "seven"}], arrow_schema=schema)
    assert str(info.value) == f"cannot write {tmp_path / 'o.parquet'}: column 'n' has a value that is not int64"
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.parquet").exists()


def test_parquet_small_batches_are_pooled_into_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "o.parquet"
    batches = [[{"n": i * 10 + j} for j in range(10)] for i in range(12_000)]
    schema = pa.schema([("n", pa.int64())])
    assert write_table_atomic(path, ["n"], batches, arrow_schema=schema) == 120_000
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 120_000 and meta.num_row_groups == 3
    assert pq.read_table(path).column("n").to_pylist() == list(range(120_000))


# --- formula injection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=SUM(A1)", "'=SUM(A1)"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-5", "-5"),
        ("+1.5e3", "+1.5e3"),
        ("plain", "plain"),
        ("", ""),
        (-5, -5),
        (None, None),
    ],
)
def test_neutralise_formula(value: Any, expected: Any) -> None:
    assert neutralise_formula(value) == expected


def test_csv_is_not_neutralised_by_default(tmp_path: Path) -> None:
    path = write(tmp_path / "o.csv", [{"in": "=1+1", "out": "=2+2"}], neutralise_columns={"out"})
    assert read_all(path) == [{"in": "=1+1", "out": "=2+2"}]


def test_csv_safe_formulas_neutralises_only_the_given_columns(tmp_path: Path) -> None:
    rows = [{"in": "=1+1", "out": "=2+2"}]
    path = write(tmp_path / "o.tsv", rows, neutralise_columns={"out"}, safe_formulas=True)
    assert read_all(path) == [{"in": "=1+1", "out": "'=2+2"}]


def test_xlsx_always_neutralises_the_given_columns_and_keeps_other_text_as_text(tmp_path: Path) -> None:
    path = write(tmp_path / "o.xlsx", [{"in": "=1+1", "err": "#N/A", "out": "@SUM(A1)"}], neutralise_columns={"out"})
    sheet = load_workbook(path).active
    cells = [[(c.value, c.data_type) for c in row] for row in sheet.iter_rows(min_row=2)]
    assert cells == [[("=1+1", "s"), ("#N/A", "s"), ("'@SUM(A1)", "s")]]


def test_xlsx_drops_control_characters_xml_cannot_hold(tmp_path: Path) -> None:
    path = write(tmp_path / "o.xlsx", [{"a": "bell\x07 and\ttab\nnewline"}])
    assert read_all(path) == [{"a": "bell and\ttab\nnewline"}]


def test_xlsx_over_the_row_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.xlsx"
    writer = TableWriter(path, ["a"])
    writer._sink.rows = outputs.XLSX_MAX_DATA_ROWS  # type: ignore[attr-defined]  # as if the sheet were full
    with pytest.raises(OutputError) as info:
        writer.write_rows([{"a": 1}])
    assert str(info.value) == f"cannot write {path}: XLSX holds at most 1,048,575 data rows; use CSV or Parquet"
    assert leftovers(tmp_path) == [] and not path.exists()


# --- atomic writes and errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet", "xlsx"])
def test_existing_output_survives_a_failed_write(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"out.{ext}"
    write(path, [{"a": "old"}])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with TableWriter(path, ["a"]) as writer:
            writer.write_rows([{"a": "new"}])
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_commit_replaces_the_existing_output_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = write(tmp_path / "out.csv", [{"a": "old"}])
    writer = TableWriter(path, ["a"])
    assert len(leftovers(tmp_path)) == 1  # the new table is built beside the old one
    writer.write_rows([{"a": "new"}])
    assert read_all(path) == [{"a": "old"}]
    writer.commit()
    writer.commit()  # a second commit is harmless (the context manager commits too)
    assert read_all(path) == [{"a": "new"}]
    assert leftovers(tmp_path) == []


def test_abort_removes_the_temp_file_and_blocks_further_writes(tmp_path: Path) -> None:
    writer = TableWriter(tmp_path / "out.jsonl", ["a"])
    writer.write_rows([{"a": 1}])
    writer.abort()
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(RuntimeError, match="already aborted"):
        writer.write_rows([{"a": 2}])


def test_missing_output_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "no" / "such"
    with pytest.raises(OutputError) as info:
        TableWriter(folder / "out.csv", ["a"])
    assert str(info.value) == f"output folder does not exist: {folder}"


def test_output_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out.csv").mkdir()
    with pytest.raises(OutputError) as info:
        TableWriter(tmp_path / "out.csv", ["a"])
    assert str(info.value) == f"output path is a folder, not a file: {tmp_path / 'out.csv'}"


def test_disk_full_is_reported_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Any, rows: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs._CsvSink, "write", full)
    path = tmp_path / "out.csv"
    with pytest.raises(OutputError) as info:
        with TableWriter(path, ["a"]) as writer:
            writer.write_rows([{"a": 1}])
    assert str(info.value) == f"disk full while writing {path}"
    assert leftovers(tmp_path) == []


def test_locked_output_is_reported_and_old_file_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "out.csv", [{"a": "old"}])

    def denied(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("runner.outputs.os.replace", denied)
    with pytest.raises(OutputError) as info:
        write(path, [{"a": "new"}])
    assert str(info.value) == f"permission denied writing {path}"
    assert read_all(path) == [{"a": "old"}] and leftovers(tmp_path) == []


def test_jsonl_output_is_one_object_per_line_even_with_newlines_in_values(tmp_path: Path) -> None:
    path = write(tmp_path / "o.jsonl", [{"a": "x\ny"}, {"a": None}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"a": "x\ny"}, {"a": None}]
