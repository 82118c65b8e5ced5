from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ConfigError, InputFileError
from runner.mapping import (
    FileRef,
    build_inputs,
    file_input_value,
    key_for_row,
    parse_file_cell,
    resolve_mapping,
    row_problems,
    sha256_file,
)
from runner.models import AppParameters, InputDef

PARAMS = AppParameters(
    inputs=(
        InputDef("text", "paragraph", required=True, max_length=200),
        InputDef("lang", "select", required=True, options=("en", "de")),
        InputDef("n", "number"),
        InputDef("flag", "checkbox"),
        InputDef("cfg", "json_object"),
        InputDef("doc", "file", allowed_file_types=("document",)),
    )
)
COLUMNS = ["id", "text", "lang"]


def resolve(explicit: dict[str, str] | None = None, columns: list[str] | None = None, **kwargs: Any) -> dict[str, str]:
    kwargs.setdefault("app_type", "workflow")
    kwargs.setdefault("input_name", "data.csv")
    return resolve_mapping(explicit or {}, COLUMNS if columns is None else columns, PARAMS, **kwargs)


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- resolve_mapping ------------------------------------------------------------------------------------------------


def test_same_named_columns_are_mapped_automatically() -> None:
    assert resolve() == {"text": "text", "lang": "lang"}


def test_explicit_pairs_win_and_follow_the_apps_input_order() -> None:
    columns = ["body", "language", "count", "lang"]
    mapping = resolve({"n": "count", "text": "body", "lang": "language"}, columns)
    assert list(mapping.items()) == [("text", "body"), ("lang", "language"), ("n", "count")]


def test_unknown_variable_is_refused_listing_inputs_with_a_suggestion() -> None:
    assert config_error(explicit={"text2": "text"}) == (
        "--map text2=text: the app has no input 'text2'; its inputs are: text, lang, n, flag, cfg, doc"
        " — did you mean 'text'?"
    )


def test_unknown_variable_without_close_match_has_no_suggestion() -> None:
    assert config_error(explicit={"zzzz": "text"}).endswith("its inputs are: text, lang, n, flag, cfg, doc")


def test_unknown_column_is_refused_listing_columns_with_a_suggestion() -> None:
    assert config_error(explicit={"text": "txt"}) == (
        "column 'txt' not found in data.csv; columns are: id, text, lang — did you mean 'text'?"
    )


def test_column_suggestion_ignores_case() -> None:
    assert config_error(explicit={"text": "TEXT"}).endswith("did you mean 'text'?")


def test_long_column_list_is_shortened_to_one_line() -> None:
    columns = [f"col{i}" for i in range(30)] + ["text", "lang"]
    message = config_error(explicit={"n": "missing"}, columns=columns)
    assert "col19, … (12 more)" in message and "col20" not in message


def test_required_input_left_unmapped_is_refused() -> None:
    message = config_error(columns=["id", "text"])
    assert message == "the app's required input 'lang' is not mapped: add --map lang=COLUMN"


def test_all_missing_required_inputs_are_named() -> None:
    assert config_error(columns=["id"]) == (
        "the app's required inputs 'text', 'lang' are not mapped: add --map text=COLUMN --map lang=COLUMN"
    )


def test_required_external_data_tool_needs_no_column() -> None:
    params = AppParameters(inputs=(InputDef("ext", "external_data_tool", required=True),))
    assert resolve_mapping({}, ["a"], params, app_type="completion") == {}


def test_chat_app_needs_a_query_column() -> None:
    assert config_error(app_type="chat") == "a chat app needs the message text: add --query-column COLUMN"
    assert resolve(app_type="chat", query_column="text") == {"text": "text", "lang": "lang"}


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"app_type": "chat", "query_column": "qestion"}, "--query-column qestion"),
        ({"app_type": "chat", "query_column": "text", "conversation_column": "thread"}, "--conversation-column thread"),
        ({"key_column": "ID"}, "--key-column ID"),
    ],
)
def test_flag_columns_must_exist(kwargs: dict[str, Any], flag: str) -> None:
    message = config_error(**kwargs)
    column = flag.split()[1]
    assert message.startswith(f"{flag}: column '{column}' not found in data.csv; columns are: id, text, lang")


def test_key_column_suggestion() -> None:
    assert config_error(key_column="ID").endswith("did you mean 'id'?")


def test_query_column_is_refused_for_workflow_apps() -> None:
    assert "--query-column is for chat and completion apps" in config_error(query_column="text")


def test_conversation_column_is_refused_outside_chat_apps() -> None:
    message = config_error(app_type="completion", conversation_column="id")
    assert message == "--conversation-column is for chat apps only"


def test_unknown_app_type_is_refused() -> None:
    assert config_error(app_type="agent").startswith("unknown app type 'agent'")


# ---- row_problems ---------------------------------------------------------------------------------------------------


def ok_row(**values: Any) -> dict[str, Any]:
    return {"text": "hello", "lang": "en", **values}


def test_valid_row_has_no_problems() -> None:
    assert row_problems(ok_row(n="3.5", flag="yes", cfg='{"a": 1}', doc="x.pdf"), PARAMS) == []


@pytest.mark.parametrize("empty", [None, "", math.nan])
def test_required_empty_value_is_a_problem(empty: Any) -> None:
    assert row_problems(ok_row(lang=empty), PARAMS) == ["'lang' is required but empty"]


def test_missing_variable_counts_as_empty() -> None:
    assert row_problems({"text": "hi"}, PARAMS) == ["'lang' is required but empty"]


def test_optional_empty_values_are_fine() -> None:
    assert row_problems(ok_row(n="", flag=None, cfg=math.nan), PARAMS) == []


def test_text_longer_than_max_length() -> None:
    assert row_problems(ok_row(text="x" * 250), PARAMS) == ["'text' is 250 characters, the app allows 200"]


def test_text_input_max_length_counts_characters_not_bytes() -> None:
    params = AppParameters(inputs=(InputDef("t", "text-input", max_length=3),))
    assert row_problems({"t": "你好吗"}, params) == []
    assert row_problems({"t": "你好吗?"}, params) == ["'t' is 4 characters, the app allows 3"]


def test_select_value_must_be_an_option() -> None:
    assert row_problems(ok_row(lang="fr"), PARAMS) == ["'lang' is 'fr', which is not one of the app's options: en, de"]


@pytest.mark.parametrize("value", ["abc", "1,5", "nan", "inf"])
def test_number_must_parse(value: str) -> None:
    assert row_problems(ok_row(n=value), PARAMS) == [f"'n' is '{value}', not a number"]


def test_checkbox_must_be_true_or_false() -> None:
    assert row_problems(ok_row(flag="maybe"), PARAMS) == ["'flag' is 'maybe', not true/false"]


def test_json_object_must_be_valid_json() -> None:
    [problem] = row_problems(ok_row(cfg="{bad"), PARAMS)
    assert problem.startswith("'cfg' is not a valid JSON object: Expecting property name")


def test_json_object_must_be_an_object() -> None:
    [problem] = row_problems(ok_row(cfg="[1, 2]"), PARAMS)
    assert problem == "'cfg' is not a valid JSON object: must be a JSON object, got list"


def test_several_problems_are_all_reported() -> None:
    assert len(row_problems({"text": "x" * 201, "lang": "xx", "n": "?"}, PARAMS)) == 3


# ---- build_inputs ---------------------------------------------------------------------------------------------------

MAP = {"text": "text", "lang": "lang", "n": "n", "flag": "flag", "cfg": "cfg", "doc": "doc"}


def test_text_from_numbers_has_no_float_noise() -> None:
    params = AppParameters(inputs=(InputDef("a", "text-input"), InputDef("b", "select"), InputDef("c", "paragraph")))
    inputs = build_inputs({"a": 3.0, "b": 7, "c": 2.5}, {"a": "a", "b": "b", "c": "c"}, params)
    assert inputs == {"a": "3", "b": "7", "c": "2.5"}


def test_numpy_scalars_from_parquet_become_plain_values() -> None:
    np = pytest.importorskip("numpy")
    inputs = build_inputs({"text": np.float64(12.0), "lang": np.str_("en"), "n": np.int64(5)}, MAP, PARAMS)
    assert inputs == {"text": "12", "lang": "en", "n": 5}
    assert type(inputs["n"]) is int
    assert build_inputs({"text": np.array([1, 2]), "n": np.float32("nan")}, MAP, PARAMS) == {"text": "[1, 2]"}


@pytest.mark.parametrize(
    ("cell", "number"), [("42", 42), (" 2.50 ", 2.5), ("3.0", 3), (7.0, 7), (1.25, 1.25), ("-1e3", -1000)]
)
def test_number_inputs_are_parsed(cell: Any, number: float) -> None:
    value = build_inputs({"n": cell}, {"n": "n"}, PARAMS)["n"]
    assert value == number and type(value) is type(number)


@pytest.mark.parametrize("cell", ["true", "TRUE", "1", "yes", "是", 1, True])
def test_checkbox_true_words(cell: Any) -> None:
    assert build_inputs({"flag": cell}, {"flag": "flag"}, PARAMS) == {"flag": True}


@pytest.mark.parametrize("cell", ["false", "0", "no", "否", 0, False])
def test_checkbox_false_words(cell: Any) -> None:
    assert build_inputs({"flag": cell}, {"flag": "flag"}, PARAMS) == {"flag": False}


def test_json_object_is_parsed() -> None:
    assert build_inputs({"cfg": '{"a": [1, 2]}'}, {"cfg": "cfg"}, PARAMS) == {"cfg": {"a": [1, 2]}}
    assert build_inputs({"cfg": {"b": 1}}, {"cfg": "cfg"}, PARAMS) == {"cfg": {"b": 1}}


def test_empty_optional_values_are_omitted() -> None:
    pd = pytest.importorskip("pandas")
    row = {"text": "hi", "lang": "en", "n": math.nan, "flag": "", "cfg": None, "doc": pd.NA}
    assert build_inputs(row, MAP, PARAMS) == {"text": "hi", "lang": "en"}


def test_file_inputs_keep_the_raw_cell() -> None:
    assert build_inputs({"doc": "a.pdf"}, {"doc": "doc"}, PARAMS) == {"doc": "a.pdf"}


def test_unconvertible_value_is_input_file_error() -> None:
    with pytest.raises(InputFileError, match="column 'count' for input 'n': 'abc' is invalid"):
        build_inputs({"count": "abc"}, {"n": "count"}, PARAMS)


# ---- key_for_row ----------------------------------------------------------------------------------------------------


def test_key_column_value_is_the_key() -> None:
    assert key_for_row({"id": "A-1"}, {}, "id") == "A-1"
    assert key_for_row({"id": 12.0}, {}, "id") == "12"


def test_empty_key_column_value_is_refused() -> None:
    with pytest.raises(InputFileError, match="the key column 'id' is empty"):
        key_for_row({"id": ""}, {}, "id")


def test_same_values_give_the_same_key() -> None:
    mapping = {"text": "text", "lang": "lang"}
    first = key_for_row({"text": "hi", "lang": "en", "other": 1}, mapping, None)
    second = key_for_row({"lang": "en", "other": 2, "text": "hi"}, {"lang": "lang", "text": "text"}, None)
    assert first == second
    assert len(first) == 20 and int(first, 16) >= 0


def test_different_values_give_different_keys() -> None:
    mapping = {"text": "text"}
    assert key_for_row({"text": "a"}, mapping, None) != key_for_row({"text": "b"}, mapping, None)


def test_key_is_the_same_for_csv_text_and_parquet_numbers() -> None:
    mapping = {"n": "n"}
    assert key_for_row({"n": "3"}, mapping, None) == key_for_row({"n": 3.0}, mapping, None)


def test_key_is_stable_across_releases() -> None:
    assert key_for_row({"text": "hi"}, {"text": "text"}, None) == hashlib.sha256(b'{"text": "hi"}').hexdigest()[:20]


# ---- parse_file_cell ------------------------------------------------------------------------------------------------

DOC = InputDef("doc", "file", allowed_file_types=("document",))
DOCS = InputDef("docs", "file-list", max_length=3)
ANY = InputDef("any", "file")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    files = tmp_path / "files"
    (files / "docs").mkdir(parents=True)
    for name in ("docs/a.pdf", "docs/b.txt", "photo.JPG", "clip.webm", "tool.exe", "pack.zip", "noext"):
        (files / name).write_bytes(b"data")
    (tmp_path / "outside.pdf").write_bytes(b"secret")
    return files


def parse(cell: Any, d: InputDef, root: Path, limits: dict[str, int] | None = None) -> list[FileRef]:
    return parse_file_cell(cell, d, files_root=root, size_limits_mb=limits or {})


def file_error(cell: Any, d: InputDef, root: Path, limits: dict[str, int] | None = None) -> str:
    with pytest.raises(InputFileError) as info:
        parse(cell, d, root, limits)
    return str(info.value)


def test_local_file_resolves_under_the_root(root: Path) -> None:
    assert parse("docs/a.pdf", DOC, root) == [FileRef("local", str(root / "docs/a.pdf"), "document", "a.pdf", 4)]


@pytest.mark.parametrize("empty", [None, "", math.nan, "[]"])
def test_empty_cell_has_no_files(root: Path, empty: Any) -> None:
    assert parse(empty, DOCS, root) == []


def test_dotdot_escaping_the_root_is_refused(root: Path) -> None:
    assert file_error("../outside.pdf", DOC, root) == "file path escapes the files root: ../outside.pdf"
    assert file_error("docs/../../x.pdf", DOC, root) == "file path escapes the files root: docs/../../x.pdf"


def test_absolute_path_outside_the_root_is_refused(root: Path) -> None:
    outside = str(root.parent / "outside.pdf")
    assert file_error(outside, DOC, root) == f"file path escapes the files root: {outside}"


def test_absolute_path_inside_the_root_is_allowed(root: Path) -> None:
    assert parse(str(root / "docs" / "a.pdf"), DOC, root)[0].value == str(root / "docs" / "a.pdf")


def test_symlink_pointing_outside_the_root_is_refused(root: Path) -> None:
    os.symlink(root.parent / "outside.pdf", root / "link.pdf")
    assert file_error("link.pdf", DOC, root) == "file path escapes the files root: link.pdf"


def test_symlinked_folder_pointing_outside_the_root_is_refused(root: Path) -> None:
    os.symlink(root.parent, root / "up")
    assert file_error("up/outside.pdf", DOC, root) == "file path escapes the files root: up/outside.pdf"


def test_symlink_inside_the_root_is_followed(root: Path) -> None:
    os.symlink(root / "docs" / "a.pdf", root / "alias.pdf")
    [ref] = parse("alias.pdf", DOC, root)
    assert (ref.value, ref.name) == (str(root / "docs" / "a.pdf"), "alias.pdf")


def test_root_given_relative_or_through_a_symlink_still_works(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.symlink(root, root.parent / "root-link")
    monkeypatch.chdir(root.parent)
    assert parse("docs/a.pdf", DOC, Path("root-link"))[0].value == str(root / "docs" / "a.pdf")


def test_missing_file_is_refused(root: Path) -> None:
    assert file_error("docs/missing.pdf", DOC, root) == "file not found: docs/missing.pdf"


def test_folder_is_not_a_file(root: Path) -> None:
    assert file_error("docs", ANY, root) == "not a file: docs"


@pytest.mark.parametrize(
    "cell", ["docs/a.pdf;docs/b.txt", " docs/a.pdf ; docs/b.txt ;", '["docs/a.pdf", "docs/b.txt"]']
)
def test_file_list_is_split_on_semicolons_or_read_as_json(root: Path, cell: str) -> None:
    assert [ref.name for ref in parse(cell, DOCS, root)] == ["a.pdf", "b.txt"]


def test_file_list_accepts_a_list_cell(root: Path) -> None:
    assert [ref.name for ref in parse(["docs/a.pdf", "photo.JPG"], DOCS, root)] == ["a.pdf", "photo.JPG"]


def test_file_list_accepts_a_numpy_array_from_parquet(root: Path) -> None:
    np = pytest.importorskip("numpy")
    cell = np.array(["docs/a.pdf", "docs/b.txt"], dtype=object)
    assert [ref.name for ref in parse(cell, DOCS, root)] == ["a.pdf", "b.txt"]


def test_bad_json_list_is_refused(root: Path) -> None:
    assert file_error('["docs/a.pdf"', DOCS, root) == "input 'docs': '[\"docs/a.pdf\"' is not a valid JSON list"


def test_file_list_respects_max_count(root: Path) -> None:
    cell = "docs/a.pdf;docs/b.txt;photo.JPG;noext"
    assert file_error(cell, DOCS, root) == "input 'docs' takes at most 3 files, got 4"


def test_single_file_input_takes_one_value(root: Path) -> None:
    assert file_error('["docs/a.pdf", "docs/b.txt"]', DOC, root) == "input 'doc' takes one file, got 2"
    assert file_error("docs/a.pdf;docs/b.txt", DOC, root) == "file not found: docs/a.pdf;docs/b.txt"


@pytest.mark.parametrize(
    ("name", "file_type"),
    [("docs/a.pdf", "document"), ("docs/b.txt", "document"), ("photo.JPG", "image"), ("clip.webm", "video"),
     ("tool.exe", "custom"), ("noext", "custom")],
)  # fmt: skip
def test_type_comes_from_the_extension(root: Path, name: str, file_type: str) -> None:
    assert parse(name, ANY, root)[0].file_type == file_type


def test_ambiguous_extension_takes_the_allowed_type(root: Path) -> None:
    audio = InputDef("voice", "file", allowed_file_types=("audio",))
    assert parse("clip.webm", audio, root)[0].file_type == "audio"


def test_type_not_allowed_by_the_input_is_refused(root: Path) -> None:
    assert file_error("tool.exe", DOC, root) == "'tool.exe' has type custom; input 'doc' allows: document"
    assert file_error("photo.JPG", DOC, root) == "'photo.JPG' has type image; input 'doc' allows: document"


def test_custom_type_must_match_the_allowed_extensions(root: Path) -> None:
    custom = InputDef("pkg", "file", allowed_file_types=("document", "custom"), allowed_file_extensions=(".ZIP",))
    assert parse("pack.zip", custom, root)[0].file_type == "custom"
    assert parse("docs/a.pdf", custom, root)[0].file_type == "document"
    message = file_error("tool.exe", custom, root)
    assert message == "'tool.exe' has type custom; input 'pkg' allows: document, custom (.zip)"


def test_custom_without_extension_list_takes_any_file(root: Path) -> None:
    custom = InputDef("pkg", "file", allowed_file_types=("custom",))
    assert parse("photo.JPG", custom, root)[0].file_type == "custom"


def sparse(path: Path, mb: float) -> None:
    with open(path, "wb") as handle:
        handle.truncate(int(mb * 1024 * 1024))


def test_document_over_the_default_limit_is_refused(root: Path) -> None:
    sparse(root / "big.pdf", 15.5)
    message = file_error("big.pdf", DOC, root)
    assert message == (
        "file too large: big.pdf is 15.5 MB; the server accepts at most 15 MB for documents and other files"
    )


def test_image_limit_is_its_own(root: Path) -> None:
    sparse(root / "big.png", 12)
    assert "at most 10 MB for image files" in file_error("big.png", ANY, root)
    sparse(root / "ok.png", 9.9)
    assert parse("ok.png", ANY, root)[0].size == int(9.9 * 1024 * 1024)


def test_limits_from_parameters_override_the_defaults(root: Path) -> None:
    sparse(root / "mid.pdf", 2)
    assert "at most 1 MB" in file_error("mid.pdf", DOC, root, {"file": 1})
    sparse(root / "big.mp4", 150)
    assert parse("big.mp4", ANY, root, {"video": 200})[0].file_type == "video"


def test_url_becomes_a_remote_reference(root: Path) -> None:
    url = "https://example.com/files/My%20Report.pdf?sig=abc"
    assert parse(url, DOC, root) == [FileRef("url", url, "document", "My Report.pdf", None)]


def test_url_without_extension_is_custom(root: Path) -> None:
    assert parse("http://example.com/download", ANY, root)[0].file_type == "custom"
    assert file_error("http://example.com/", DOC, root) == "'example.com' has type custom; input 'doc' allows: document"


def test_url_refused_when_the_input_takes_only_local_files(root: Path) -> None:
    local_only = InputDef("doc", "file", allowed_file_upload_methods=("local_file",))
    assert file_error("https://x.org/a.pdf", local_only, root) == (
        "input 'doc' does not accept URLs (allowed: local_file): https://x.org/a.pdf"
    )
    assert parse("docs/a.pdf", local_only, root)[0].kind == "local"


def test_local_file_refused_when_the_input_takes_only_urls(root: Path) -> None:
    url_only = InputDef("doc", "file", allowed_file_upload_methods=("remote_url",))
    assert file_error("docs/a.pdf", url_only, root) == (
        "input 'doc' does not accept local files (allowed: remote_url): docs/a.pdf"
    )


def test_other_url_schemes_are_refused(root: Path) -> None:
    assert file_error("ftp://x.org/a.pdf", DOC, root) == "only http and https URLs are supported: ftp://x.org/a.pdf"


# ---- file_input_value / sha256_file ---------------------------------------------------------------------------------


def test_single_file_value_is_one_object() -> None:
    ref = FileRef("local", "/data/a.pdf", "document", "a.pdf", 4)
    assert file_input_value([ref], {"/data/a.pdf": "up-1"}, DOC) == {
        "type": "document", "transfer_method": "local_file", "upload_file_id": "up-1"
    }


def test_file_list_value_is_a_list_mixing_uploads_and_urls() -> None:
    refs = [
        FileRef("local", "/data/a.png", "image", "a.png", 4),
        FileRef("url", "https://x.org/b.pdf", "document", "b.pdf"),
    ]
    assert file_input_value(refs, {"/data/a.png": "up-2"}, DOCS) == [
        {"type": "image", "transfer_method": "local_file", "upload_file_id": "up-2"},
        {"type": "document", "transfer_method": "remote_url", "url": "https://x.org/b.pdf"},
    ]


def test_local_file_without_upload_id_is_a_bug() -> None:
    with pytest.raises(KeyError, match="no upload id"):
        file_input_value([FileRef("local", "/data/a.pdf", "document", "a.pdf", 4)], {}, DOC)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 100_000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 100_000).hexdigest()
