"""run_job / validate_job / export_job: one batch job from spec to output, the library entry points the CLI wraps.

Order matters: everything that can be checked without spending a run (input file, output folder, API key, app type,
mapping, duplicate keys) is checked before the first run is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .checkpoint import Checkpoint
from .dify import DifyClient
from .errors import ConfigError, NotFoundError, OutputError, RunnerError
from .executor import Progress, Scheduler, install_signal_handlers
from .export import export_results
from .inputs import TableReader, open_table
from .mapping import message_files_def, resolve_mapping, row_problems
from .models import AppParameters
from .outputs import output_format
from .plan import KeySet, iter_keyed_batches, register_rows
from .spec import JobSpec, read_api_key

APP_MODES = {
    "workflow": ("workflow",),
    "chat": ("chat", "advanced-chat", "agent-chat", "agent"),
    "completion": ("completion",),
}


@dataclass(frozen=True)
class JobSummary:
    rows: int
    succeeded: int
    failed: int
    pending: int
    skipped: int  # already done before this run
    duplicates: int  # rows identical to an earlier row: sent once, result shared
    requests: int
    retries: int
    recovered: int
    throttled: int
    total_tokens: int
    total_price: float
    wall_s: float
    output: str | None
    errors: str | None
    state: str
    stopped: str | None = None  # "interrupted" | "max_wall"
    notices: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        sent = self.succeeded + self.failed - self.skipped
        return sent / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.stopped == "interrupted":
            return 130
        if self.stopped:
            return 1
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(rows_per_s=round(self.rows_per_s, 3), exit_code=self.exit_code)
        return data


Notice = Callable[[str], None]


def make_client(spec: JobSpec, api_key: str, transport: Any = None) -> DifyClient:
    return DifyClient(
        spec.base_url, api_key, timeout=spec.timeout, stall_timeout=spec.stall_timeout,
        start_timeout=spec.start_timeout, verify=not spec.insecure, transport=transport,
        max_connections=max(64, spec.concurrency * 2),
    )


def transport_notices(spec: JobSpec) -> list[str]:
    notes = []
    parts = urlsplit(spec.base_url if "://" in spec.base_url else f"http://{spec.base_url}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        notes.append(f"warning: {spec.base_url} is plain http: the API key travels in clear text; use https")
    if spec.insecure:
        notes.append("warning: --insecure: TLS certificates are not verified")
    return notes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_output_paths(spec: JobSpec) -> None:
    """Everything about the output side that can be known before a run is paid for."""
    output_format(spec.output)
    for path in (spec.output, spec.errors_path, spec.state_path):
        if not path.parent.is_dir():
            raise OutputError(f"output folder does not exist: {path.parent}")
        if path.is_dir():
            raise OutputError(f"output path is a folder, not a file: {path}")
        if path.resolve() == spec.input.resolve():
            raise OutputError(f"{path} is the input file: choose another --output (the input is never overwritten)")


async def inspect_app(client: DifyClient, spec: JobSpec) -> tuple[AppParameters, dict[str, Any]]:
    """`/parameters` (checks key and reachability) and `/info` (checks the app type)."""
    params = await client.parameters()
    try:
        info = await client.info()
    except NotFoundError:
        info = {}  # older Dify without /info: skip the app-type check
    mode = info.get("mode")
    if mode and mode not in APP_MODES[spec.app_type]:
        wanted = next((kind for kind, modes in APP_MODES.items() if mode in modes), None)
        hint = f"; use --app-type {wanted}" if wanted else ""
        raise ConfigError(f"the app behind this key is a '{mode}' app, not a {spec.app_type} app{hint}")
    return params, info


def fingerprint(spec: JobSpec, mapping: dict[str, str], client: DifyClient) -> dict[str, Any]:
    return {
        "input": str(spec.input.resolve()),
        "app_type": spec.app_type,
        "base_url": client.base_url,
        "mapping": dict(sorted(mapping.items())),
        "key_column": spec.key_column,
        "query_column": spec.query_column,
        "conversation_column": spec.conversation_column,
        "files_column": spec.files_column,
        "workflow_id": spec.workflow_id,
    }


def open_input(spec: JobSpec) -> TableReader:
    return open_table(spec.input, encoding=spec.encoding)


def run_job(
    spec: JobSpec,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_notice: Notice | None = None,
    on_start: Callable[[int, int], None] | None = None,
    api_key: str | None = None,
    transport: Any = None,
    handle_signals: bool = False,
) -> JobSummary:
    """Run the job: every row not yet succeeded is sent; the output and errors report are written at the end."""
    return asyncio.run(
        _run_job(spec, on_progress, on_notice or (lambda _: None), on_start, api_key, transport, handle_signals)
    )


async def _run_job(
    spec: JobSpec,
    on_progress: Callable[[Progress], None] | None,
    notice: Notice,
    on_start: Callable[[int, int], None] | None,
    api_key: str | None,
    transport: Any,
    handle_signals: bool,
) -> JobSummary:
    started = time.monotonic()
    reader = open_input(spec)
    check_output_paths(spec)
    key = api_key if api_key is not None else read_api_key(spec)
    notes = transport_notices(spec)
    for note in notes:
        notice(note)
    async with make_client(spec, key, transport) as client:
        params, _ = await inspect_app(client, spec)
        mapping = _mapping(spec, reader, params)
        with Checkpoint.open(spec.state_path, fingerprint(spec, mapping, client), fresh=spec.fresh) as store:
            plan = await asyncio.to_thread(register_rows, reader, spec, mapping, store)
            before = store.counts()
            todo = plan.unique - before.get("succeeded", 0)
            if on_start is not None:
                on_start(plan.rows, max(todo, 0))
            scheduler = Scheduler(spec, client, store, params, mapping, reader, on_progress=on_progress)
            stopped = await _schedule(scheduler, spec, max(todo, 0), handle_signals)
            if getattr(client, "streaming_only", False) and spec.response_mode == "blocking":
                notes.append("note: this agent app only answers in streaming mode; requests were sent streaming")
                notice(notes[-1])
            if stopped is None:
                await asyncio.to_thread(_export_if_changed, reader, spec, mapping, store, plan.rows)
            return _summary(spec, plan.rows, store, scheduler, before, started, stopped, notes)


def _export_if_changed(reader: TableReader, spec: JobSpec, mapping: dict[str, str], store: Checkpoint, rows: int) -> None:
    """Write output and errors report, unless they are exactly what the last export wrote from the same state.

    A rerun of a finished 1M-row job would otherwise spend most of its time rewriting an identical output.
    """
    before = _export_signature(spec, store, rows)
    if before is not None and store.meta("exported") == before:
        return
    export_results(reader, spec, mapping, store)
    store.set_meta("exported", _export_signature(spec, store, rows))


def _export_signature(spec: JobSpec, store: Checkpoint, rows: int) -> dict[str, Any] | None:
    """What the output depends on: the input file, the checkpoint's contents, the output files and the options."""
    try:
        files = [spec.input.stat(), spec.output.stat(), spec.errors_path.stat()]
    except OSError:
        return None
    return {
        "files": [[str(p), f.st_size, f.st_mtime_ns] for p, f in zip(
            (spec.input, spec.output, spec.errors_path), files, strict=True)],
        "rows": rows, "counts": store.counts(), "last_update": store.last_update(), "safe_csv": spec.safe_csv,
    }


def _mapping(spec: JobSpec, reader: TableReader, params: AppParameters) -> dict[str, str]:
    if spec.files_column:
        if spec.files_column not in reader.columns:
            raise ConfigError(f"--files-column {spec.files_column}: column '{spec.files_column}' not found in "
                              f"{spec.input}; columns are: {', '.join(reader.columns)}")
        if message_files_def(params) is None:
            raise ConfigError("--files-column: the app does not accept files with its messages (turn on "
                              "'File upload' in the app's features in Dify)")
    return resolve_mapping(
        spec.mapping, reader.columns, params, app_type=spec.app_type, query_column=spec.query_column,
        conversation_column=spec.conversation_column, key_column=spec.key_column, input_name=str(spec.input),
    )


async def _schedule(scheduler: Scheduler, spec: JobSpec, todo: int, handle_signals: bool) -> str | None:
    undo = install_signal_handlers(scheduler) if handle_signals else (lambda: None)
    loop = asyncio.get_running_loop()
    timer = loop.call_later(spec.max_wall, scheduler.request_stop, "max_wall") if spec.max_wall else None
    try:
        await scheduler.run(todo)
    finally:
        undo()
        if timer is not None:
            timer.cancel()
    return scheduler.stop_reason


def _summary(
    spec: JobSpec, rows: int, store: Checkpoint, scheduler: Scheduler, before: dict[str, int], started: float,
    stopped: str | None, notes: list[str],
) -> JobSummary:
    counts = store.counts()
    c = scheduler.counters
    return JobSummary(
        rows=rows, succeeded=counts.get("succeeded", 0), failed=counts.get("failed", 0),
        pending=counts.get("pending", 0) + counts.get("running", 0), skipped=before.get("succeeded", 0),
        duplicates=c.duplicates, requests=c.requests, retries=c.retries, recovered=c.recovered, throttled=c.throttled,
        total_tokens=c.tokens, total_price=round(c.price, 6), wall_s=round(time.monotonic() - started, 3),
        output=None if stopped else str(spec.output), errors=None if stopped else str(spec.errors_path),
        state=str(spec.state_path), stopped=stopped, notices=notes,
    )


def write_summary_json(path: Path, summary: JobSummary) -> None:
    try:
        path.write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write summary {path}: {exc.strerror or exc}") from exc


# ---- validate / status / export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    rows: int
    mapping: dict[str, str]
    problems: list[str]  # "row N: ..." lines
    params: AppParameters


def validate_job(spec: JobSpec, *, api_key: str | None = None, transport: Any = None, max_problems: int = 50) -> ValidationReport:
    """Read the whole input and the app's /parameters; check mapping, required values, limits, options, duplicate keys."""
    return asyncio.run(_validate(spec, api_key, transport, max_problems))


async def _validate(spec: JobSpec, api_key: str | None, transport: Any, max_problems: int) -> ValidationReport:
    reader = open_input(spec)
    key = api_key if api_key is not None else read_api_key(spec)
    async with make_client(spec, key, transport) as client:
        params, _ = await inspect_app(client, spec)
    mapping = _mapping(spec, reader, params)
    problems: list[str] = []
    rows = 0
    with KeySet() as seen:
        for batch in iter_keyed_batches(reader, spec, mapping):
            repeats = {index: first for _, first, index in seen.add(batch)[1]} if spec.key_column else {}
            for item in batch:
                rows += 1
                found = row_problems({var: item.row.get(col) for var, col in mapping.items()}, params)
                if item.index in repeats:
                    found.append(f"duplicate key {item.key!r} (also row {repeats[item.index] + 1})")
                problems += [f"row {item.index + 1}: {p}" for p in found]
    if rows == 0:
        raise RunnerError(f"{spec.input} has no data rows")
    return ValidationReport(rows, mapping, problems, params)


def checkpoint_counts(spec: JobSpec) -> dict[str, int]:
    if not spec.state_path.exists():
        raise RunnerError(f"no checkpoint at {spec.state_path}: the job has not run yet (or pass --state PATH)")
    with Checkpoint.open(spec.state_path, {}, lock=False, check_fingerprint=False) as store:
        return store.counts()


def export_job(spec: JobSpec) -> tuple[Path, Path, int, int]:
    """Rewrite output and errors report from the checkpoint; safe while a run is going on."""
    if not spec.state_path.exists():
        raise RunnerError(f"no checkpoint at {spec.state_path}: nothing to export (or pass --state PATH)")
    reader = open_input(spec)
    check_output_paths(spec)
    with Checkpoint.open(spec.state_path, {}, lock=False, check_fingerprint=False) as store:
        mapping = store.fingerprint.get("mapping") or {}
        result = export_results(reader, spec, mapping, store)
    return result.output, result.errors, result.rows, result.failed
