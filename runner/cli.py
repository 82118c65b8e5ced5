"""The `dify-batch` command line: parses flags and job files, prints, maps errors to exit codes.

The only module importing click or tqdm. Heavy libraries (pandas, pyarrow, httpx) are imported inside the commands, so
`dify-batch --help` stays fast. Exit codes: 0 all rows succeeded, 1 fatal error, 2 usage, 3 some rows failed, 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import RunnerError, UsageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
REPO_ROOT = Path(__file__).resolve().parent.parent


def _fail(message: str, code: int = EXIT_FATAL) -> None:
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """One `Error: …` line and an exit code instead of a traceback (`--debug` shows the traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("DIFY_BATCH_DEBUG") == "1"
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("Interrupted; the checkpoint is kept — rerun the same command to continue.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except UsageError as exc:
            if debug:
                raise
            _fail(str(exc), EXIT_USAGE)
        except RunnerError as exc:
            if debug:
                raise
            _fail(str(exc))
        except Exception as exc:  # a bug of ours: still one line, with a way to see more
            if debug:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")

    return wrapper


class OneLineErrors(click.Group):
    """Usage errors as one `Error: …` line (exit 2), like every other error, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(EXIT_OK)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{where}", EXIT_USAGE)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dify-batch")
def main() -> None:
    """Run a Dify app (workflow, chat or completion) over every row of a table — concurrently, with retries,
    checkpointed so that a rerun sends only what is not done yet.

    \b
    Quick start:
      dify-batch demo                                    # everything on the built-in simulator
      export DIFY_API_KEY=app-...
      dify-batch validate --input data.csv --base-url https://dify.example.com/v1
      dify-batch run --input data.csv --output out.csv --base-url https://dify.example.com/v1
    """


# ---- job options ------------------------------------------------------------------------------------------------------

JOB_OPTIONS: list[Callable[..., Any]] = [
    click.argument("job_file", required=False, type=click.Path(path_type=Path, dir_okay=False)),
    click.option("--input", "input", type=click.Path(path_type=Path), help="Input table: .csv .tsv .parquet .jsonl .xlsx"),
    click.option("--output", type=click.Path(path_type=Path), help="Output table (format by extension)."),
    click.option("--errors", type=click.Path(path_type=Path), help="Failed-rows report [<output stem>.errors.csv]."),
    click.option("--base-url", help="Dify API base URL, with or without /v1 [env DIFY_BASE_URL, else http://localhost/v1]."),
    click.option("--api-key-env", metavar="NAME", help="Environment variable holding the app's API key [DIFY_API_KEY]."),
    click.option("--app-type", type=click.Choice(["workflow", "chat", "completion"]), help="Endpoint family [workflow]."),
    click.option("--map", "maps", multiple=True, metavar="VAR=COLUMN", help="App input <- column (repeatable)."),
    click.option("--key-column", metavar="COL", help="Row identity for resume [stable hash of the mapped values]."),
    click.option("--query-column", metavar="COL", help="Column holding the chat query (chat/completion)."),
    click.option("--conversation-column", metavar="COL", help="Rows with the same value form one conversation (chat)."),
    click.option("--files-column", metavar="COL",
                 help="Files (paths or URLs, ';'-separated) attached to each message as `files` (app's file upload)."),
    click.option("--files-root", type=click.Path(path_type=Path),
                 help="Folder local file paths are relative to [input's folder]."),
    click.option("--encoding", help="Input CSV/TSV encoding [detected: UTF-8, UTF-8-BOM, GBK/GB18030]."),
    click.option("--workflow-id", help="Run this published workflow version (POST /workflows/{id}/run)."),
    click.option("--user", help="Dify `user` field [dify-batch]."),
    click.option("--state", type=click.Path(path_type=Path), help="Checkpoint database [<output>.state.sqlite]."),
    click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]

RUN_OPTIONS: list[Callable[..., Any]] = [
    click.option("--concurrency", type=click.IntRange(min=1), help="Parallel requests [8]."),
    click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="Requests-per-minute cap [none]."),
    click.option("--max-attempts", type=click.IntRange(min=1), help="Tries per row for transient errors [5]."),
    click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Per-request read timeout, s [300]."),
    click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True),
                 help="A stream with no payload frame for this long is interrupted and the run looked up, s [120]."),
    click.option("--max-wall", type=click.FloatRange(min=0, min_open=True),
                 help="Stop cleanly after this many seconds; rerun to continue [none]."),
    click.option("--max-down", type=click.FloatRange(min=0, min_open=True),
                 help="Give up when the server stays unreachable this long, s [300]."),
    click.option("--response-mode", type=click.Choice(["streaming", "blocking"]), help="[streaming]"),
    click.option("--fresh", is_flag=True, default=None, help="Ignore (delete) the existing checkpoint."),
    click.option("--no-progress", is_flag=True, help="No progress bar [bar when stderr is a terminal]."),
    click.option("--summary-json", type=click.Path(path_type=Path), help="Also write the summary as JSON here."),
    click.option("--safe-csv", is_flag=True, default=None,
                 help="Neutralise output cells starting with = + - @ in CSV (always done in XLSX)."),
    click.option("--insecure", is_flag=True, default=None, help="Do not verify TLS certificates (warns)."),
]


def with_options(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def spec_from_flags(job_file: Path | None, flags: dict[str, Any], *, require_output: bool = True) -> Any:
    from .spec import build_spec, parse_map_pairs

    values = {k: v for k, v in flags.items() if k not in ("maps", "job_file", "debug", "no_progress")}
    values["mapping"] = parse_map_pairs(flags.get("maps") or ())
    return build_spec(job_file, values, require_output=require_output)


# ---- run ----------------------------------------------------------------------------------------------------------


@main.command()
@with_options(JOB_OPTIONS + RUN_OPTIONS)
@handle_errors
def run(job_file: Path | None, no_progress: bool, debug: bool, **flags: Any) -> None:
    """Run the app once per row and write the table back with its outputs.

    Flags override JOB_FILE (TOML). Rerunning the same command sends only rows not yet succeeded.
    Exit codes: 0 all succeeded, 1 fatal error, 2 usage, 3 some rows failed, 130 interrupted.
    """
    from .job import run_job, write_summary_json

    spec = spec_from_flags(job_file, flags)
    progress = ProgressBar(enabled=not no_progress and sys.stderr.isatty())
    try:
        summary = run_job(spec, on_progress=progress.update, on_start=progress.start,
                          on_notice=lambda text: click.echo(text, err=True), handle_signals=True)
    finally:
        progress.close()
    if spec.summary_json:
        write_summary_json(spec.summary_json, summary)
    _print_summary(summary)
    if summary.stopped == "max_wall":
        _fail(f"stopped after --max-wall {spec.max_wall:g} s with {summary.pending} rows not done; "
              "rerun the same command to continue")
    sys.exit(summary.exit_code)


def _print_summary(summary: Any) -> None:
    extras = "".join([
        f", {summary.duplicates} duplicate rows sent once" if summary.duplicates else "",
        f", {summary.recovered} recovered by run lookup" if summary.recovered else "",
    ])
    line = (
        f"{summary.succeeded - summary.skipped} succeeded, {summary.failed} failed, {summary.skipped} skipped "
        f"(already done){extras}, "
        f"{summary.retries} retries, {summary.total_tokens} tokens, {summary.wall_s:.1f} s, {summary.rows_per_s:.1f} rows/s"
    )
    if summary.stopped == "interrupted":
        click.echo(f"Interrupted: {line}; {summary.pending} rows pending — rerun the same command to continue.", err=True)
        return
    click.echo(f"Done: {line}")
    if summary.output:
        failed = f" ({summary.failed} failed rows)" if summary.failed else ""
        click.echo(f"Output: {summary.output}  Errors: {summary.errors}{failed}")


class ProgressBar:
    """tqdm on stderr, driven by the library's progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, rows: int, todo: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=todo, unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, progress: Any) -> None:
        if self.bar is None:
            return
        self.bar.n = progress.done
        self.bar.set_postfix_str(f"ok={progress.succeeded} failed={progress.failed} retries={progress.retries}",
                                 refresh=False)
        self.bar.refresh() if self.bar.n == self.bar.total else self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- validate / status / export -------------------------------------------------------------------------------------


@main.command()
@with_options(JOB_OPTIONS)
@click.option("--max-problems", type=click.IntRange(min=1), default=50, show_default=True, help="Row problems to list.")
@handle_errors
def validate(job_file: Path | None, debug: bool, max_problems: int, **flags: Any) -> None:
    """Check the input and the mapping against the app's /parameters without spending a single run."""
    from .job import validate_job

    spec = spec_from_flags(job_file, flags, require_output=False)
    report = validate_job(spec)
    pairs = ", ".join(f"{var}<-{col}" for var, col in report.mapping.items()) or "(no inputs)"
    click.echo(f"Mapping: {pairs}")
    for line in report.problems[:max_problems]:
        click.echo(line)
    if len(report.problems) > max_problems:
        click.echo(f"... and {len(report.problems) - max_problems} more")
    if report.problems:
        _fail(f"{len(report.problems)} problem(s) in {report.rows} rows of {spec.input} (listed above)")
    click.echo(f"OK: {report.rows} rows, every mapped value fits the app's inputs.")


@main.command()
@with_options(JOB_OPTIONS)
@handle_errors
def status(job_file: Path | None, debug: bool, **flags: Any) -> None:
    """Done / failed / pending counts from the checkpoint (safe while a run is going on)."""
    from .job import checkpoint_counts

    spec = spec_from_flags(job_file, flags, require_output=False)
    counts = checkpoint_counts(spec)
    pending = counts.get("pending", 0) + counts.get("running", 0)
    click.echo(f"succeeded {counts.get('succeeded', 0)}  failed {counts.get('failed', 0)}  "
               f"pending {pending}  total {counts.get('total', 0)}  ({spec.state_path})")


@main.command()
@with_options(JOB_OPTIONS)
@click.option("--safe-csv", is_flag=True, default=None, help="Neutralise output cells starting with = + - @ in CSV.")
@handle_errors
def export(job_file: Path | None, debug: bool, **flags: Any) -> None:
    """Rewrite the output table and errors report from the checkpoint — at any time, even mid-run."""
    from .job import export_job

    spec = spec_from_flags(job_file, flags)
    output, errors, rows, failed = export_job(spec)
    click.echo(f"Exported {rows} rows to {output}; {failed} failed rows in {errors}")


# ---- simulator and demo -----------------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=5001, show_default=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Simulator config (.json or .toml); flags override it.")
@click.option("--mode", type=click.Choice(["workflow", "chat", "advanced-chat", "agent-chat", "completion"]),
              help="App mode [workflow].")
@click.option("--latency", help="fixed:0.2 | uniform:0.1,0.5 | lognormal:MEDIAN,P99 (seconds) [0].")
@click.option("--fault", "faults", multiple=True, metavar="KIND[:PROB][:match=TEXT][:times=N]",
              help="Fault injection (repeatable): 429 too_many_400 500 502_html completion_error rate_limit_error "
                   "failed_run drop_stream error_event stall stall_midrun.")
@click.option("--seed", type=int, help="Seed for random latency and faults [0].")
@click.option("--max-active", type=click.IntRange(min=0), help="Per-app concurrency cap (0 = none).")
@click.option("--cap-style", type=click.Choice(["429", "400"]), help="How the cap answers [429].")
@click.option("--api-key-env", default="DIFY_API_KEY", show_default=True,
              help="Accept the key in this environment variable (else app-simulator-key).")
def simulate(config_file: Path | None, api_key_env: str, **flags: Any) -> None:
    """Serve a local Dify Service API simulator (for trying jobs with no Dify and no internet)."""
    from . import simulator

    try:
        config = simulator.SimConfig.from_file(config_file) if config_file else simulator.SimConfig()
        _apply_sim_flags(config, flags, os.environ.get(api_key_env))
    except (ValueError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)
    _check_port_free(flags["host"], flags["port"])
    click.echo(f"Dify simulator ({config.app_mode} app) on http://{flags['host']}:{flags['port']}/v1 — "
               f"key: the value of ${api_key_env}" if os.environ.get(api_key_env) else
               f"Dify simulator ({config.app_mode} app) on http://{flags['host']}:{flags['port']}/v1 — "
               f"key: {config.api_key}", err=True)
    simulator.serve(config, host=flags["host"], port=flags["port"])


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} — is another simulator running? "
                  "choose another --port")


def _apply_sim_flags(config: Any, flags: dict[str, Any], api_key: str | None) -> None:
    from . import simulator

    if flags.get("mode"):
        config.app_mode = flags["mode"]
    if flags.get("latency"):
        config.latency = simulator.parse_latency(flags["latency"])
    if flags.get("faults"):
        config.faults = [simulator.parse_fault(text) for text in flags["faults"]]
    if flags.get("seed") is not None:
        config.seed = flags["seed"]
    if flags.get("max_active") is not None:
        config.max_active_requests = flags["max_active"]
    if flags.get("cap_style"):
        config.cap_style = flags["cap_style"]
    if api_key:
        config.api_key = api_key


@main.command()
@click.option("--output-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("dify-batch-demo"),
              show_default=True, help="Where the demo writes its output table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def demo(output_dir: Path, no_progress: bool, debug: bool) -> None:
    """Run jobs/demo.toml on sample_data/ against the built-in simulator (no Dify, no internet needed)."""
    from dataclasses import replace

    from .job import run_job
    from .simulator import SimConfig, SimulatorServer
    from .spec import build_spec

    job = REPO_ROOT / "jobs" / "demo.toml"
    sim_config = REPO_ROOT / "jobs" / "demo-simulator.toml"
    if not job.exists() or not sim_config.exists():
        raise RunnerError(f"demo files not found under {REPO_ROOT}: run the demo from a source checkout (pip install -e .)")
    output_dir.mkdir(parents=True, exist_ok=True)
    with SimulatorServer(SimConfig.from_file(sim_config)) as server:
        spec = build_spec(job, {"base_url": server.url}, env={})
        spec = replace(spec, output=output_dir / spec.output.name, errors=None, state=None, fresh=True)
        click.echo(f"Simulated Dify app on {server.url}; running {job.relative_to(REPO_ROOT)} on {spec.input.name} …")
        progress = ProgressBar(enabled=not no_progress and sys.stderr.isatty())
        try:
            summary = run_job(spec, api_key=server.sim.config.api_key, on_progress=progress.update,
                              on_start=progress.start, handle_signals=True)
        finally:
            progress.close()
    _print_summary(summary)
    click.echo(f"Open {spec.output} to see every input row with its outputs and _status / _error columns.")
    sys.exit(summary.exit_code)


# ---- inspect ------------------------------------------------------------------------------------------------------


@main.command()
@click.option("--base-url", help="Dify API base URL [env DIFY_BASE_URL, else http://localhost/v1].")
@click.option("--api-key-env", default="DIFY_API_KEY", show_default=True, metavar="NAME")
@click.option("--input", "input_path", type=click.Path(path_type=Path), help="Guess the column mapping from this table.")
@click.option("-o", "--output-job", type=click.Path(path_type=Path, dir_okay=False), help="Write a job file here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@handle_errors
def inspect(base_url: str | None, api_key_env: str, input_path: Path | None, output_job: Path | None,
            debug: bool) -> None:
    """Show the app behind the key (mode and inputs) and optionally write a ready-to-edit job file."""
    from .inspect import describe_app, job_file_text, table_columns

    base = base_url or os.environ.get("DIFY_BASE_URL") or "http://localhost/v1"
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise RunnerError(f"no API key: set the environment variable {api_key_env} to the app's API key (app-…)")
    app = describe_app(base, key)
    for line in app.lines():
        click.echo(line)
    if output_job:
        if not output_job.parent.is_dir():
            raise RunnerError(f"folder does not exist: {output_job.parent}")
        relative = Path(os.path.relpath(input_path.resolve(), output_job.resolve().parent)) if input_path else None
        columns = table_columns(input_path) if input_path else []
        output_job.write_text(job_file_text(app, base, api_key_env, relative, columns), encoding="utf-8")
        click.echo(f"Wrote {output_job}: edit it, then `dify-batch validate {output_job}`.")


if __name__ == "__main__":  # pragma: no cover
    main()
