"""Columns -> app inputs: the mapping checked against the app's `/parameters` before any run is spent, per-row checks
and conversions, row keys, and file cells turned into checked file references and Dify file values.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import ConfigError, InputFileError
from .models import APP_TYPES, AppParameters, InputDef

TEXT_TYPES = ("text-input", "paragraph", "select", "external_data_tool")
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "on", "t", "是", "对"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "off", "f", "否", "不"})
MAX_LISTED = 20  # columns / inputs named in one error line

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "gif", "webp", "svg"),
    "audio": ("mp3", "m4a", "wav", "webm", "amr", "mpga"),
    "video": ("mp4", "mov", "mpeg", "webm"),
    "document": (
        "txt", "md", "markdown", "mdx", "pdf", "html", "htm", "xlsx", "xls", "docx", "csv", "eml", "msg", "pptx", "ppt",
        "xml", "epub",
    ),
}  # fmt: skip
# Dify versions disagree on webm / mpga (audio in some, video in others): newest first; the allowed types decide.
AMBIGUOUS = {"webm": ("video", "audio"), "mpga": ("audio", "video")}
DEFAULT_SIZE_LIMITS_MB = {"image": 10, "audio": 50, "video": 100, "file": 15}


# -- mapping -------------------------------------------------------------------------------------------------------


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown}, … ({len(names) - MAX_LISTED} more)"


def _suggestion(name: str, candidates: Sequence[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    match = [lowered[name.lower()]] if name.lower() in lowered else difflib.get_close_matches(name, candidates, n=1)
    return f" — did you mean '{match[0]}'?" if match else ""


def _check_column(column: str, columns: Sequence[str], where: str, prefix: str = "") -> None:
    if column not in columns:
        raise ConfigError(
            f"{prefix}column '{column}' not found in {where}; columns are: {_listing(columns)}"
            + _suggestion(column, columns)
        )


def resolve_mapping(
    explicit: dict[str, str],
    columns: Sequence[str],
    params: AppParameters,
    *,
    app_type: str,
    query_column: str | None = None,
    conversation_column: str | None = None,
    key_column: str | None = None,
    input_name: str = "the input",
) -> dict[str, str]:
    """Return {variable: column}: explicit pairs checked, same-named columns added, required inputs all covered."""
    columns = list(columns)
    variables = [d.variable for d in params.inputs]
    for variable, column in explicit.items():
        if variable not in variables:
            raise ConfigError(
                f"--map {variable}={column}: the app has no input '{variable}'; its inputs are: {_listing(variables)}"
                + _suggestion(variable, variables)
            )
        _check_column(column, columns, input_name)
    _check_flag_columns(app_type, columns, input_name, query_column, conversation_column, key_column)
    mapping = dict(explicit)
    for variable in variables:
        if variable not in mapping and variable in columns:
            mapping[variable] = variable
    _check_required_mapped(params, mapping)
    return {d.variable: mapping[d.variable] for d in params.inputs if d.variable in mapping}


def _check_flag_columns(
    app_type: str, columns: list[str], where: str, query: str | None, conversation: str | None, key: str | None
) -> None:
    if app_type not in APP_TYPES:
        raise ConfigError(f"unknown app type '{app_type}'; expected one of: {', '.join(APP_TYPES)}")
    if app_type == "chat" and query is None:
        raise ConfigError("a chat app needs the message text: add --query-column COLUMN")
    if app_type == "workflow" and query is not None:
        raise ConfigError("--query-column is for chat and completion apps; a workflow takes only inputs (--map)")
    if app_type != "chat" and conversation is not None:
        raise ConfigError("--conversation-column is for chat apps only")
    for flag, column in (("--query-column", query), ("--conversation-column", conversation), ("--key-column", key)):
        if column is not None:
            _check_column(column, columns, where, prefix=f"{flag} {column}: ")


def _check_required_mapped(params: AppParameters, mapping: dict[str, str]) -> None:
    # external data tools are filled by the server-side extension, not by the caller
    missing = [
        d.variable for d in params.inputs if d.required and d.variable not in mapping and d.type != "external_data_tool"
    ]
    if len(missing) == 1:
        raise ConfigError(f"the app's required input '{missing[0]}' is not mapped: add --map {missing[0]}=COLUMN")
    if missing:
        names = ", ".join(f"'{v}'" for v in missing)
        adds = " ".join(f"--map {v}=COLUMN" for v in missing)
        raise ConfigError(f"the app's required inputs {names} are not mapped: add {adds}")


# -- cell values ---------------------------------------------------------------------------------------------------


def is_empty(value: Any) -> bool:
    """None, "", NaN and pandas' NA / NaT all mean "no value" in a table cell."""
    value = _plain(value)
    if value is None or (isinstance(value, str) and value == ""):
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _plain(value: Any) -> Any:
    # numpy scalars and arrays (pandas / pyarrow cells) -> the Python values they hold
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def as_text(value: Any) -> str:
    """A cell as the text Dify should see: 3.0 from a float column is "3", dates ISO, nested values JSON."""
    value = _plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _short(value: Any) -> str:
    text = as_text(value).replace("\n", " ")
    return repr(text if len(text) <= 40 else text[:37] + "...")


def as_number(value: Any) -> int | float:
    value = _plain(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        number = value
    else:
        text = as_text(value).strip()
        try:
            return int(text)
        except ValueError:
            number = float(text)  # raises ValueError for text that is no number
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return int(number) if number.is_integer() else number


def as_bool(value: Any) -> bool:
    value = _plain(value)
    if isinstance(value, bool):
        return value
    word = as_text(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{word!r} is not true/false")


def as_json_object(value: Any) -> dict[str, Any]:
    parsed = value if isinstance(value, dict) else json.loads(as_text(value))
    if not isinstance(parsed, dict):
        raise ValueError(f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def row_problems(values: dict[str, Any], params: AppParameters) -> list[str]:
    """What is wrong with one row's raw cell values ({variable: cell}) for this app; [] when fine. Files are checked
    by parse_file_cell."""
    problems: list[str] = []
    for d in params.inputs:
        value = values.get(d.variable)
        if is_empty(value):
            if d.required and d.type != "external_data_tool":
                problems.append(f"'{d.variable}' is required but empty")
            continue
        problem = _value_problem(d, value)
        if problem:
            problems.append(problem)
    return problems


def _value_problem(d: InputDef, value: Any) -> str | None:
    if d.is_file:
        return None
    if d.type in TEXT_TYPES:
        text = as_text(value)
        if d.type == "select" and d.options and text not in d.options:
            return f"'{d.variable}' is {_short(text)}, which is not one of the app's options: {_listing(d.options)}"
        if d.max_length and len(text) > d.max_length:
            return f"'{d.variable}' is {len(text)} characters, the app allows {d.max_length}"
        return None
    converters = {"number": (as_number, "not a number"), "checkbox": (as_bool, "not true/false")}
    if d.type in converters:
        convert, what = converters[d.type]
        try:
            convert(value)
        except ValueError:
            return f"'{d.variable}' is {_short(value)}, {what}"
    if d.type == "json_object":
        try:
            as_json_object(value)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return f"'{d.variable}' is not a valid JSON object: {exc}"
    return None


def build_inputs(row: dict[str, Any], mapping: dict[str, str], params: AppParameters) -> dict[str, Any]:
    """The `inputs` object for one row. Empty cells are left out (Dify then applies the input's default); file inputs
    keep the raw cell for the caller to turn into file values. Raises InputFileError for a value that cannot convert."""
    inputs: dict[str, Any] = {}
    for variable, column in mapping.items():
        value = row.get(column)
        if is_empty(value):
            continue
        d = params.get(variable) or InputDef(variable, "text-input")
        try:
            inputs[variable] = _convert(d, value)
        except ValueError as exc:
            problem = f"column '{column}' for input '{variable}': {_short(value)} is invalid ({exc})"
            raise InputFileError(problem) from exc
    return inputs


def _convert(d: InputDef, value: Any) -> Any:
    if d.is_file:
        return value
    if d.type == "number":
        return as_number(value)
    if d.type == "checkbox":
        return as_bool(value)
    if d.type == "json_object":
        return as_json_object(value)
    return as_text(value)


def key_for_row(row: dict[str, Any], mapping: dict[str, str], key_column: str | None) -> str:
    """The row's checkpoint key: the key column as text, else a stable hash of the mapped values (20 hex digits).

    Identical rows get identical keys; the caller numbers repeats ("#2", "#3"). Values are hashed in their text form,
    so a CSV "3" and a Parquet 3 or 3.0 give the same key.
    """
    if key_column is not None:
        value = row.get(key_column)
        if is_empty(value):
            raise InputFileError(f"the key column '{key_column}' is empty")
        return as_text(value)
    content = {name: None if is_empty(row.get(c)) else as_text(row.get(c)) for name, c in mapping.items()}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# -- files ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRef:
    """One file a row points at: a local file under the files root, or a URL the server fetches."""

    kind: str  # local | url
    value: str  # absolute resolved path, or the URL
    file_type: str  # document | image | audio | video | custom
    name: str
    size: int | None = None


def parse_file_cell(
    cell: Any, input_def: InputDef, *, files_root: Path, size_limits_mb: dict[str, int]
) -> list[FileRef]:
    """The files of one cell of a `file` / `file-list` input, checked (root, existence, size, type, method)."""
    items = _file_items(cell, input_def)
    if input_def.type == "file" and len(items) > 1:
        raise InputFileError(f"input '{input_def.variable}' takes one file, got {len(items)}")
    if input_def.max_length and len(items) > input_def.max_length:
        raise InputFileError(
            f"input '{input_def.variable}' takes at most {input_def.max_length} files, got {len(items)}"
        )
    root = Path(files_root).resolve()
    return [_file_ref(item, input_def, root, size_limits_mb) for item in items]


def _file_items(cell: Any, input_def: InputDef) -> list[str]:
    cell = _plain(cell)
    if is_empty(cell):
        return []
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            cell = json.loads(cell)
        except ValueError as exc:
            raise InputFileError(f"input '{input_def.variable}': {_short(cell)} is not a valid JSON list") from exc
    if isinstance(cell, list | tuple):
        items = [as_text(item).strip() for item in cell if not is_empty(item)]
    elif input_def.type == "file-list":
        items = [part.strip() for part in as_text(cell).split(";")]
    else:
        items = [as_text(cell).strip()]
    return [item for item in items if item]


def _file_ref(item: str, d: InputDef, root: Path, limits: dict[str, int]) -> FileRef:
    scheme = urlsplit(item).scheme.lower()
    if scheme in ("http", "https"):
        _check_method(d, "remote_url", item)
        name = PurePosixPath(unquote(urlsplit(item).path)).name or urlsplit(item).netloc
        return FileRef("url", item, _file_type(name, d, item), name)
    if "://" in item:
        raise InputFileError(f"only http and https URLs are supported: {item}")
    _check_method(d, "local_file", item)
    path = _local_path(item, root)
    name = Path(item).name
    file_type = _file_type(name, d, item)
    size = path.stat().st_size
    _check_size(item, file_type, size, limits)
    return FileRef("local", str(path), file_type, name, size)


def _check_method(d: InputDef, method: str, item: str) -> None:
    allowed = d.allowed_file_upload_methods
    if allowed and method not in allowed:
        what = "URLs" if method == "remote_url" else "local files"
        raise InputFileError(f"input '{d.variable}' does not accept {what} (allowed: {', '.join(allowed)}): {item}")


def _local_path(item: str, root: Path) -> Path:
    # resolve() follows symlinks, so a link inside the root pointing outside it is caught here too
    path = (root / item).resolve()
    if not path.is_relative_to(root):
        raise InputFileError(f"file path escapes the files root: {item}")
    if not path.exists():
        raise InputFileError(f"file not found: {item}")
    if not path.is_file():
        raise InputFileError(f"not a file: {item}")
    return path


def _extension(name: str) -> str:
    return PurePosixPath(name).suffix.lstrip(".").lower()


def _file_type(name: str, d: InputDef, item: str) -> str:
    """The Dify file type to send for `name`, or InputFileError when the input does not allow it."""
    ext = _extension(name)
    candidates = AMBIGUOUS.get(ext) or tuple(t for t, exts in EXTENSIONS.items() if ext in exts) or ("custom",)
    allowed = d.allowed_file_types
    if not allowed:
        return candidates[0]
    for file_type in candidates:
        if file_type in allowed and file_type != "custom":
            return file_type
    extensions = [e.lstrip(".").lower() for e in d.allowed_file_extensions]
    if "custom" in allowed and (not extensions or ext in extensions):
        return "custom"
    kinds = ", ".join(
        f"custom ({', '.join('.' + e for e in extensions)})" if t == "custom" and extensions else t for t in allowed
    )
    label = PurePosixPath(name).name or item
    raise InputFileError(f"'{label}' has type {candidates[0]}; input '{d.variable}' allows: {kinds}")


def _check_size(item: str, file_type: str, size: int, limits: dict[str, int]) -> None:
    size_class = file_type if file_type in ("image", "audio", "video") else "file"
    limit_mb = limits.get(size_class) or DEFAULT_SIZE_LIMITS_MB[size_class]
    if size > limit_mb * 1024 * 1024:
        what = f"{size_class} files" if size_class != "file" else "documents and other files"
        mb = f"{size / 1024 / 1024:.1f} MB"
        raise InputFileError(f"file too large: {item} is {mb}; the server accepts at most {limit_mb} MB for {what}")


def message_files_def(params: AppParameters) -> InputDef | None:
    """The app's message-file feature (`file_upload` in /parameters) as a file-list input; None when it is off.

    Newer Dify lists allowed types and methods at the top level; older versions only have the `image` block.
    """
    feature = params.raw.get("file_upload") or {}
    image = feature.get("image") or {}
    if not (feature.get("enabled") or image.get("enabled")):
        return None
    types = feature.get("allowed_file_types") or (["image"] if image.get("enabled") else [])
    methods = feature.get("allowed_file_upload_methods") or image.get("transfer_methods") or []
    limit = feature.get("number_limits") or image.get("number_limits")
    return InputDef(
        variable="files", type="file-list", max_length=int(limit) if limit else None,
        allowed_file_types=tuple(types), allowed_file_extensions=tuple(feature.get("allowed_file_extensions") or ()),
        allowed_file_upload_methods=tuple(methods),
    )


def file_input_value(
    refs: list[FileRef], upload_ids: dict[str, str], input_def: InputDef
) -> dict[str, Any] | list[dict[str, Any]]:
    """The Dify value of a file input: one object for `file`, a list for `file-list`.

    `upload_ids` maps FileRef.value (the absolute path) to the id /files/upload returned for the run's user.
    """
    objects = [_file_object(ref, upload_ids) for ref in refs]
    if input_def.type == "file-list":
        return objects
    if len(objects) != 1:
        raise ValueError(f"input '{input_def.variable}' takes exactly one file, got {len(objects)}")
    return objects[0]


def _file_object(ref: FileRef, upload_ids: dict[str, str]) -> dict[str, Any]:
    if ref.kind == "url":
        return {"type": ref.file_type, "transfer_method": "remote_url", "url": ref.value}
    if ref.value not in upload_ids:
        raise KeyError(f"no upload id for {ref.value}: upload local files before building inputs")
    return {"type": ref.file_type, "transfer_method": "local_file", "upload_file_id": upload_ids[ref.value]}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
