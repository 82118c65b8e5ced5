"""JobSpec: everything one batch job needs, merged from flags, environment, a TOML job file and defaults.

Precedence: command-line flags > environment > job file > defaults. Paths in a job file are relative to the job file's folder.
The API key itself is never part of a spec: only the name of the environment variable that holds it.
"""

from __future__ import annotations

import codecs
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, UsageError
from .models import APP_TYPES

DEFAULT_BASE_URL = "http://localhost/v1"
RESPONSE_MODES = ("streaming", "blocking")
OUTPUT_EXTENSIONS = (".csv", ".tsv", ".parquet", ".jsonl", ".xlsx")
PATH_FIELDS = ("input", "output", "errors", "state", "files_root", "summary_json")


@dataclass(frozen=True)
class JobSpec:
    input: Path
    output: Path
    errors: Path | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "DIFY_API_KEY"
    app_type: str = "workflow"
    mapping: dict[str, str] = field(default_factory=dict)
    key_column: str | None = None
    query_column: str | None = None
    conversation_column: str | None = None
    files_column: str | None = None
    files_root: Path | None = None
    workflow_id: str | None = None
    concurrency: int = 8
    rpm: float | None = None
    max_attempts: int = 5
    timeout: float = 300.0
    stall_timeout: float = 120.0
    start_timeout: float = 60.0
    max_wall: float | None = None
    max_down: float = 300.0
    response_mode: str = "streaming"
    user: str = "dify-batch"
    state: Path | None = None
    fresh: bool = False
    limit: int | None = None
    encoding: str | None = None
    safe_csv: bool = False
    insecure: bool = False
    summary_json: Path | None = None

    @property
    def errors_path(self) -> Path:
        return self.errors or self.output.with_name(self.output.stem + ".errors.csv")

    @property
    def state_path(self) -> Path:
        return self.state or self.output.with_name(self.output.name + ".state.sqlite")

    @property
    def files_dir(self) -> Path:
        return self.files_root or self.input.parent


SPEC_FIELDS = {f.name for f in fields(JobSpec)}


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into spec-field values; paths made relative to the file's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read job file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"invalid TOML in {path}: {exc}") from exc
    return _normalise_job_dict(data, path)


def _normalise_job_dict(data: dict[str, Any], path: Path) -> dict[str, Any]:
    values = dict(data)
    if "map" in values:
        values["mapping"] = values.pop("map")
    if "api_key" in values:
        raise UsageError(f"{path}: do not put the API key in a job file; set api_key_env (default DIFY_API_KEY) instead")
    unknown = sorted(set(values) - SPEC_FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(SPEC_FIELDS | {"map"}), n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"{path}: unknown setting(s): {', '.join(unknown)}{hint}")
    mapping = values.get("mapping", {})
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UsageError(f"{path}: [map] must be a table of input = \"column\" strings")
    for name in PATH_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = Path(os.path.normpath(path.parent / values[name]))
    return values


def parse_map_pairs(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`VAR=COLUMN` strings from repeated --map flags."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        var, sep, column = pair.partition("=")
        if not sep or not var.strip() or not column.strip():
            raise UsageError(f"--map {pair!r}: expected VAR=COLUMN")
        mapping[var.strip()] = column.strip()
    return mapping


def build_spec(
    job_file: Path | None, flags: Mapping[str, Any], env: Mapping[str, str] | None = None, *, require_output: bool = True
) -> JobSpec:
    """Merge defaults < job file < environment < flags into a validated JobSpec."""
    env = os.environ if env is None else env
    values: dict[str, Any] = load_job_file(job_file) if job_file else {}
    if env.get("DIFY_BASE_URL"):
        values["base_url"] = env["DIFY_BASE_URL"]
    flag_map = dict(flags.get("mapping") or {})
    for name, value in flags.items():
        if value is not None and name != "mapping" and name in SPEC_FIELDS:
            values[name] = value
    if flag_map:
        values["mapping"] = {**values.get("mapping", {}), **flag_map}
    if "input" not in values:
        raise UsageError("no input file: pass --input PATH or set input in the job file")
    if "output" not in values:
        if require_output:
            raise UsageError("no output file: pass --output PATH or set output in the job file")
        values["output"] = Path(values["input"]).with_suffix(".out.csv")
    try:
        return validate_spec(JobSpec(**_coerce_paths(values)))
    except (TypeError, UsageError) as exc:
        if job_file is None:
            raise
        raise UsageError(f"{job_file}: {exc}") from exc


def _coerce_paths(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for name in PATH_FIELDS:
        if out.get(name) is not None:
            out[name] = Path(out[name]).expanduser()
    return out


def validate_spec(spec: JobSpec) -> JobSpec:
    """Reject values that cannot work, naming the setting."""
    if spec.app_type not in APP_TYPES:
        raise UsageError(f"app_type {spec.app_type!r}: choose one of {', '.join(APP_TYPES)}")
    if spec.response_mode not in RESPONSE_MODES:
        raise UsageError(f"response_mode {spec.response_mode!r}: choose streaming or blocking")
    for name in ("concurrency", "max_attempts"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
    for name in ("timeout", "stall_timeout", "start_timeout", "max_down"):
        if not isinstance(getattr(spec, name), int | float) or getattr(spec, name) <= 0:
            raise UsageError(f"{name} must be a number > 0, got {getattr(spec, name)!r}")
    if spec.rpm is not None and spec.rpm <= 0:
        raise UsageError(f"rpm must be > 0, got {spec.rpm!r}")
    if spec.max_wall is not None and spec.max_wall <= 0:
        raise UsageError(f"max_wall must be > 0, got {spec.max_wall!r}")
    if spec.limit is not None and spec.limit < 1:
        raise UsageError(f"limit must be >= 1, got {spec.limit!r}")
    if spec.app_type == "chat" and not spec.query_column:
        raise UsageError("chat apps need the question column: pass --query-column COLUMN")
    if spec.output.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise UsageError(f"--output {spec.output}: unsupported file type; use one of {', '.join(OUTPUT_EXTENSIONS)}")
    if spec.encoding:
        try:
            codecs.lookup(spec.encoding)
        except LookupError:
            raise UsageError(f"--encoding {spec.encoding}: unknown encoding (try utf-8, utf-8-sig, gbk, gb18030)") from None
    if not spec.user.strip():
        raise UsageError("user must not be empty")
    return replace(spec, base_url=spec.base_url.strip())


def read_api_key(spec: JobSpec, env: Mapping[str, str] | None = None) -> str:
    """The API key from the environment variable the spec names."""
    env = os.environ if env is None else env
    key = env.get(spec.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"no API key: set the environment variable {spec.api_key_env} to the app's API key (app-…)")
    return key
