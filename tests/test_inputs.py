from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl import Workbook

from runner import inputs
from runner.errors import InputFileError
from runner.inputs import SUPPORTED_EXTENSIONS, count_rows, detect_encoding, open_table


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def read_all(path: Path, **kwargs: Any) -> list[dict[str, Any]]:
    return [row for batch in open_table(path, **kwargs).iter_batches() for row in batch]


def write_xlsx(path: Path, rows: list[list[Any]], extra_sheet: bool = False) -> Path:
    workbook = Workbook()
    sheet = workbook.active
    for row in rows:
        sheet.append(row)
    if extra_sheet:
        workbook.create_sheet("second").append(["other"])
    workbook.save(path)
    return path


def error_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(InputFileError) as info:
        read_all(path, **kwargs)
    return str(info.value)


# --- CSV values --------------------------------------------------------------------------------------------------


def test_csv_keeps_leading_zeros_and_decimal_text(tmp_path: Path) -> None:
    path = write_text(tmp_path / "ids.csv", "id,price\n007,1.50\n0012,1e3\n")
    assert read_all(path) == [{"id": "007", "price": "1.50"}, {"id": "0012", "price": "1e3"}]


def test_csv_empty_cells_are_empty_strings_and_null_words_stay_text(tmp_path: Path) -> None:
    path = write_text(tmp_path / "empty.csv", 'a,b,c,d\n,"",NA,nan\nnull,None,,\n')
    assert read_all(path) == [
        {"a": "", "b": "", "c": "NA", "d": "nan"},
        {"a": "null", "b": "None", "c": "", "d": ""},
    ]


def test_csv_quotes_commas_and_embedded_newlines(tmp_path: Path) -> None:
    path = write_text(tmp_path / "q.csv", 'k,text\n1,"say ""hi"", then\nleave"\n2,"a\r\nb"\n')
    assert read_all(path) == [{"k": "1", "text": 'say "hi", then\nleave'}, {"k": "2", "text": "a\r\nb"}]


def test_csv_chinese_text_in_utf8(tmp_path: Path) -> None:
    path = write_text(tmp_path / "zh.csv", "名字,问题\n张三,今天天气怎么样？\n")
    reader = open_table(path)
    assert (reader.encoding, reader.has_bom, reader.columns) == ("utf-8", False, ["名字", "问题"])
    assert read_all(path) == [{"名字": "张三", "问题": "今天天气怎么样？"}]


def test_utf8_bom_is_detected_and_not_part_of_the_header(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bom.csv", codecs.BOM_UTF8 + "id,名字\n1,李四\n".encode())
    reader = open_table(path)
    assert (reader.encoding, reader.has_bom, reader.columns) == ("utf-8-sig", True, ["id", "名字"])
    assert read_all(path) == [{"id": "1", "名字": "李四"}]


def test_gbk_csv_is_detected(tmp_path: Path) -> None:
    path = write_text(tmp_path / "gbk.csv", "名字,城市\n张三,北京\n王五,\n", "gbk")
    reader = open_table(path)
    assert (reader.encoding, reader.has_bom) == ("gb18030", False)
    assert read_all(path) == [{"名字": "张三", "城市": "北京"}, {"名字": "王五", "城市": ""}]


def test_gb18030_characters_outside_gbk_are_read(tmp_path: Path) -> None:
    path = write_text(tmp_path / "gb18030.csv", "字,说明\n𠀀,四字节\n€,欧元\n", "gb18030")
    assert detect_encoding(path) == "gb18030"
    assert read_all(path) == [{"字": "𠀀", "说明": "四字节"}, {"字": "€", "说明": "欧元"}]


def test_explicit_encoding_overrides_detection(tmp_path: Path) -> None:
    path = write_text(tmp_path / "gbk.csv", "名字\n张三\n", "gbk")
    reader = open_table(path, encoding="GBK")
    assert reader.encoding == "gbk"
    assert read_all(path, encoding="GBK") == [{"名字": "张三"}]


def test_utf16_csv_with_bom_is_read(tmp_path: Path) -> None:
    path = write_text(tmp_path / "u16.csv", "名字,n\n张三,007\n", "utf-16")
    reader = open_table(path)
    assert (reader.encoding, reader.has_bom, reader.columns) == ("utf-16", True, ["名字", "n"])
    assert read_all(path) == [{"名字": "张三", "n": "007"}]


def test_gbk_csv_keeps_quotes_newlines_and_batches_in_order(tmp_path: Path) -> None:
    body = "".join(f'{i:05d},"第{i}行, ""引号""\n换行"\n' for i in range(12_000))
    path = write_text(tmp_path / "gbk.csv", "编号,内容\n" + body, "gbk")
    batches = list(open_table(path).iter_batches())
    assert [len(b) for b in batches] == [5000, 5000, 2000]
    assert batches[2][-1] == {"编号": "11999", "内容": '第11999行, "引号"\n换行'}


def test_dropping_a_gbk_reader_midway_lets_python_exit(tmp_path: Path) -> None:
    # pyarrow's own transcoding hangs or aborts the interpreter here (apache/arrow#43892); we must not use it.
    path = write_text(tmp_path / "gbk.csv", "名字\n" + "张三\n" * 200_000, "gbk")
    code = f"from runner.inputs import open_table; next(open_table({str(path)!r}).iter_batches())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_latin1_csv_falls_back_to_charset_normalizer(tmp_path: Path) -> None:
    path = write_text(tmp_path / "latin.csv", "name,city\nJosé,München\n", "latin-1")
    assert read_all(path) == [{"name": "José", "city": "München"}]


def test_utf8_char_straddling_the_detection_sample_boundary_is_still_utf8(tmp_path: Path) -> None:
    head = b"text\n" + b"x" * (inputs.SAMPLE_BYTES - 6)  # "中" (3 bytes) starts on the sample's last byte
    path = write_bytes(tmp_path / "cut.csv", head + "中文\nend\n".encode())
    assert len(head) == inputs.SAMPLE_BYTES - 1
    assert detect_encoding(path) == "utf-8"
    rows = read_all(path)
    assert rows[0]["text"].endswith("x中文") and rows[1] == {"text": "end"}


def test_gbk_char_straddling_the_detection_sample_boundary_is_still_gb18030(tmp_path: Path) -> None:
    head = "文本\n".encode("gbk") + b"x" * (inputs.SAMPLE_BYTES - 6)
    path = write_bytes(tmp_path / "cut.csv", head + "中文\n".encode("gbk"))
    assert len(head) == inputs.SAMPLE_BYTES - 1
    assert detect_encoding(path) == "gb18030"
    assert read_all(path)[0]["文本"].endswith("x中文")


def test_tsv_is_split_on_tabs_only(tmp_path: Path) -> None:
    path = write_text(tmp_path / "t.tsv", 'id\ttext\n007\ta, b\n008\t"tab\there"\n')
    reader = open_table(path)
    assert (reader.format, reader.columns) == ("tsv", ["id", "text"])
    assert read_all(path) == [{"id": "007", "text": "a, b"}, {"id": "008", "text": "tab\there"}]


def test_uppercase_extension_is_accepted(tmp_path: Path) -> None:
    path = write_text(tmp_path / "UP.CSV", "a\n1\n")
    assert open_table(path).format == "csv"


# --- batches -----------------------------------------------------------------------------------------------------


def test_12000_row_csv_comes_in_batches_of_at_most_5000_in_order(tmp_path: Path) -> None:
    path = write_text(tmp_path / "big.csv", "n,s\n" + "".join(f"{i},row {i}\n" for i in range(12_000)))
    batches = list(open_table(path).iter_batches(batch_rows=5000))
    assert [len(b) for b in batches] == [5000, 5000, 2000]
    assert [row["n"] for b in batches for row in b] == [str(i) for i in range(12_000)]


def test_iter_batches_starts_over_on_each_call(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.csv", "a\n1\n2\n3\n")
    reader = open_table(path)
    first = [r["a"] for b in reader.iter_batches(batch_rows=2) for r in b]
    assert first == [r["a"] for b in reader.iter_batches(batch_rows=2) for r in b] == ["1", "2", "3"]


def test_csv_blocks_are_rebatched_across_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "CSV_BLOCK_BYTES", 1024)
    path = write_text(tmp_path / "b.csv", "n\n" + "".join(f"{i}\n" for i in range(3000)))
    batches = list(open_table(path).iter_batches(batch_rows=700))
    assert [len(b) for b in batches] == [700, 700, 700, 700, 200]
    assert [row["n"] for b in batches for row in b] == [str(i) for i in range(3000)]


def test_count_rows_for_every_format(tmp_path: Path) -> None:
    csv_path = write_text(tmp_path / "a.csv", "a\n1\n2\n3\n")
    parquet_path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), parquet_path)
    jsonl_path = write_text(tmp_path / "a.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    xlsx_path = write_xlsx(tmp_path / "a.xlsx", [["a"], [1], [2], [3], [4], [None]])
    counts = [count_rows(open_table(p)) for p in (csv_path, parquet_path, jsonl_path, xlsx_path)]
    assert counts == [3, 2, 2, 4]


# --- Parquet, JSONL, XLSX values ---------------------------------------------------------------------------------


def test_parquet_gives_native_values_and_its_schema(tmp_path: Path) -> None:
    table = pa.table(
        {
            "i": [1, None],
            "f": [1.5, 2.0],
            "s": ["007", None],
            "b": [True, False],
            "l": [[1, 2], []],
            "d": [{"k": "v"}, None],
        }
    )
    path = tmp_path / "n.parquet"
    pq.write_table(table, path)
    reader = open_table(path)
    assert reader.schema == table.schema and reader.encoding is None and reader.columns == list("ifsbld")
    assert read_all(path) == [
        {"i": 1, "f": 1.5, "s": "007", "b": True, "l": [1, 2], "d": {"k": "v"}},
        {"i": None, "f": 2.0, "s": None, "b": False, "l": [], "d": None},
    ]


def test_parquet_batches_follow_batch_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"n": list(range(2500))}), path, row_group_size=1000)
    batches = list(open_table(path).iter_batches(batch_rows=600))
    assert [len(b) for b in batches] == [600, 600, 600, 600, 100]
    assert [r["n"] for b in batches for r in b] == list(range(2500))


def test_jsonl_columns_in_first_appearance_order_and_missing_keys_are_none(tmp_path: Path) -> None:
    lines = [{"b": 1, "a": "x"}, {"c": [1, {"d": None}], "a": "y"}, {"a": "z", "b": 2.5}]
    path = write_text(tmp_path / "r.jsonl", "\n".join(json.dumps(obj, ensure_ascii=False) for obj in lines) + "\n\n")
    reader = open_table(path)
    assert reader.columns == ["b", "a", "c"] and reader.encoding is None
    assert read_all(path) == [
        {"b": 1, "a": "x", "c": None},
        {"b": None, "a": "y", "c": [1, {"d": None}]},
        {"b": 2.5, "a": "z", "c": None},
    ]


def test_jsonl_with_bom_and_chinese_text(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "r.jsonl", codecs.BOM_UTF8 + '{"问题": "你好"}\n'.encode())
    reader = open_table(path)
    assert reader.has_bom and reader.columns == ["问题"]
    assert read_all(path) == [{"问题": "你好"}]


def test_xlsx_reads_first_sheet_with_empty_cells_as_empty_strings(tmp_path: Path) -> None:
    rows: list[list[Any]] = [
        ["id", "name", "score"],
        ["007", "张三", 1.5],
        [8, None, None],
        [None, None, None],
        ["9", "x", 3],
    ]
    path = write_xlsx(tmp_path / "t.xlsx", [*rows, [None, None, None], [None]], extra_sheet=True)
    reader = open_table(path)
    assert (reader.format, reader.encoding, reader.schema) == ("xlsx", None, None)
    assert reader.columns == ["id", "name", "score"]
    assert read_all(path) == [
        {"id": "007", "name": "张三", "score": 1.5},
        {"id": 8, "name": "", "score": ""},
        {"id": "", "name": "", "score": ""},  # a blank row between data rows is kept; trailing ones are dropped
        {"id": "9", "name": "x", "score": 3},
    ]


def test_xlsx_ignores_unnamed_empty_columns_right_of_the_header(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "t.xlsx", [["a", "b", None], [1, 2, None]])
    assert read_all(path) == [{"a": 1, "b": 2}]


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    assert error_of(path) == f"input file not found: {path}"


def test_directory_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    assert error_of(folder) == f"input path is a folder, not a file: {folder}"


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = write_text(tmp_path / "data.xls", "a\n1\n")
    message = error_of(path)
    assert message.startswith(f"unsupported input file type '.xls': {path}")
    assert all(ext in message for ext in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.parquet", "empty.jsonl", "empty.xlsx"])
def test_empty_file_has_no_header(tmp_path: Path, name: str) -> None:
    path = write_bytes(tmp_path / name, b"")
    assert error_of(path) == f"input file is empty (no header row): {path}"


def test_bom_only_csv_is_empty(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bom.csv", codecs.BOM_UTF8 + b"\n")
    assert error_of(path) == f"input file is empty (no header row): {path}"


def test_header_only_csv_is_reported_at_open(tmp_path: Path) -> None:
    path = write_text(tmp_path / "h.csv", "a,b\n\n")
    with pytest.raises(InputFileError, match="header only, no data rows") as info:
        open_table(path)
    assert str(info.value) == f"{path}: header only, no data rows"


def test_header_only_xlsx_and_empty_parquet_are_reported_at_open(tmp_path: Path) -> None:
    xlsx = write_xlsx(tmp_path / "h.xlsx", [["a", "b"], [None, None]])
    parquet = tmp_path / "h.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), parquet)
    for path in (xlsx, parquet):
        with pytest.raises(InputFileError) as info:
            open_table(path)
        assert str(info.value) == f"{path}: header only, no data rows"


def test_duplicate_column_names_are_named(tmp_path: Path) -> None:
    path = write_text(tmp_path / "d.csv", "id,text,id,x,text\n1,2,3,4,5\n")
    assert error_of(path) == f"{path}: duplicate column name in the header: 'id', 'text'"


def test_empty_column_name_gives_its_position(tmp_path: Path) -> None:
    path = write_text(tmp_path / "e.csv", "id,,text\n1,2,3\n")
    assert error_of(path) == f"{path}: empty column name in the header (column 2)"


def test_xlsx_duplicate_header_is_named(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "d.xlsx", [["a", "a"], [1, 2]])
    assert error_of(path) == f"{path}: duplicate column name in the header: 'a'"


def test_ragged_csv_row_names_its_line(tmp_path: Path) -> None:
    text = 'a,b,c\n1,2,3\n"multi\nline",2,3\n4,5,6\n\n7,8,9,10\n'  # the bad record starts on physical line 7
    path = write_text(tmp_path / "r.csv", text)
    assert error_of(path) == f"{path} line 7: expected 3 fields, found 4"


def test_ragged_gbk_row_names_its_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "r.csv", '名字,城市\n张三,北京\n"多\n行",上海\n李四\n', "gbk")
    assert error_of(path) == f"{path} line 5: expected 2 fields, found 1"


def test_header_only_gbk_csv_is_reported_at_open(tmp_path: Path) -> None:
    path = write_text(tmp_path / "h.csv", "名字,城市\n", "gbk")
    with pytest.raises(InputFileError) as info:
        open_table(path, encoding="gbk")
    assert str(info.value) == f"{path}: header only, no data rows"


def test_short_tsv_row_names_its_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "r.tsv", "a\tb\n1\t2\n3\n")
    assert error_of(path) == f"{path} line 3: expected 2 fields, found 1"


def test_ragged_row_found_mid_iteration_names_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "CSV_BLOCK_BYTES", 1024)
    path = write_text(tmp_path / "late.csv", "a,b\n" + "1,2\n" * 2000 + "3,4,5\n")
    reader = open_table(path)  # the first block is fine
    with pytest.raises(InputFileError) as info:
        for _ in reader.iter_batches():
            pass
    assert str(info.value) == f"{path} line 2002: expected 2 fields, found 3"


def test_unbalanced_quote_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "CSV_BLOCK_BYTES", 1024)
    path = write_text(tmp_path / "q.csv", "a,b\n1,2\n" + '3,"open\n' + "4,5\n" * 1000)
    assert error_of(path).startswith(f'{path}: a quoted field never ends (unbalanced ")')


def test_undecodable_bytes_with_explicit_encoding_name_the_line(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bad.csv", b"a,b\n1,2\n3,\xff\xfe\n")
    assert error_of(path, encoding="utf-8") == (f"{path} line 3: cannot decode byte 0xff as utf-8; give the right encoding")


def test_undecodable_gbk_bytes_name_the_line(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bad.csv", "名字\n张三\n".encode("gbk") + b"\xff\xff\n")
    assert error_of(path, encoding="gbk") == f"{path} line 3: cannot decode byte 0xff as gbk; give the right encoding"


def test_unknown_encoding_name_is_rejected(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.csv", "a\n1\n")
    assert error_of(path, encoding="klingon") == f"{path}: unknown encoding 'klingon'"


def test_binary_file_is_not_valid_parquet(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "junk.parquet", b"\x00\x01 this is not parquet at all")
    assert error_of(path).startswith(f"not a valid Parquet file: {path} (")


def test_truncated_parquet_is_not_valid(tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"a": list(range(1000))}), whole)
    path = write_bytes(tmp_path / "cut.parquet", whole.read_bytes()[:-100])
    assert error_of(path).startswith(f"not a valid Parquet file: {path} (")


def test_invalid_json_names_its_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "bad.jsonl", '{"a": 1}\n\n{"a": 2,}\n')
    reason = "Expecting property name enclosed in double quotes at column 9"
    assert error_of(path) == f"{path} line 3: invalid JSON ({reason})"


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = write_text(tmp_path / "arr.jsonl", '{"a": 1}\n[1, 2]\n')
    assert error_of(path) == f"{path} line 2: expected a JSON object, found an array"


def test_jsonl_undecodable_line_is_named(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bad.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    assert error_of(path) == f"{path} line 2: cannot decode byte 0xff as utf-8"


def test_jsonl_without_objects_has_no_rows(tmp_path: Path) -> None:
    path = write_text(tmp_path / "blank.jsonl", "\n\n")
    assert error_of(path) == f"{path}: no JSON objects (no data rows)"


def test_junk_xlsx_is_not_valid(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "junk.xlsx", b"PK not really a zip")
    assert error_of(path).startswith(f"not a valid XLSX file: {path} (")


def test_xlsx_value_right_of_the_header_is_reported(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "w.xlsx", [["a", "b"], [1, 2], [3, 4, "stray"]])
    assert error_of(path) == f"{path} row 3: a value lies right of the last named column"
