"""The async scheduler: sends each pending row once, many at a time, within the concurrency / RPM budget, and records results.

Owns: bounded concurrency that shrinks when Dify pushes back, per-conversation ordering, the first-request-alone rule for a new
`user`, retries (tenacity, policy from retry.py), pausing while the server is unreachable, recovering runs left in flight by a
crash, group-committing results to the checkpoint before reporting them, and clean stops (Ctrl-C, SIGTERM, --max-wall).
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, RowState
from .dify import DifyClient
from .errors import (
    DifyError,
    InputFileError,
    NotFoundError,
    RateLimitedError,
    RunFailedError,
    RunnerError,
    ServerError,
    StreamInterruptedError,
    TransportError,
)
from .mapping import build_inputs, file_input_value, is_empty, message_files_def, parse_file_cell, row_problems, sha256_file
from .models import AppParameters, RunResult
from .plan import KeyedRow, iter_keyed_batches
from .retry import AdaptiveLimit, RateLimiter, backoff_delay, is_fatal_for_job, retry_policy
from .spec import JobSpec

Sleep = Callable[[float], Any]


@dataclass(frozen=True)
class Progress:
    """Counts for this run, sent to `on_progress` after each row's result is durable."""

    total: int  # rows this run has to send (not done before)
    succeeded: int
    failed: int
    skipped: int  # done by an earlier run
    retries: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


@dataclass
class Counters:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    duplicates: int = 0
    requests: int = 0
    retries: int = 0
    recovered: int = 0
    throttled: int = 0
    tokens: int = 0
    price: float = 0.0
    todo: int = 0


class JobAborted(RunnerError):
    """Raised inside the scheduler when one error must stop the whole job (bad key, app gone, server down too long)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RowNotStarted(Exception):
    """The job is stopping and this row had not been sent yet: it stays pending."""


class StateWriter:
    """A thread that group-commits checkpoint writes, so SQLite never serialises the job.

    A row is reported done only after the transaction holding it has committed.
    """

    def __init__(self, store: Checkpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="dify-batch-state", daemon=True)
        self._thread.start()

    def started(self, key: str, ids: dict[str, str]) -> None:
        self._queue.put(("start", key, ids))

    async def save(self, state: RowState) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(("save", state, future))
        await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < 500:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = [item for item in items if item is not None]
            self._apply(done)
            if len(done) < len(items):
                return

    def _apply(self, items: list[Any]) -> None:
        error: BaseException | None = None
        try:
            self._store.apply_batch(
                [(item[1], item[2]) for item in items if item[0] == "start"],
                [item[1] for item in items if item[0] == "save"],
            )
        except BaseException as exc:  # reported to every waiting row; the job then stops
            error = exc
        futures = [item[2] for item in items if item[0] == "save"]
        if futures:  # one wake-up of the event loop per committed batch, not per row
            self._loop.call_soon_threadsafe(_resolve, futures, error)


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class ServerHealth:
    """Pauses every row while the server is unreachable, probing with back-off; gives up after `max_down` seconds."""

    def __init__(self, client: DifyClient, max_down: float, sleep: Sleep, clock: Callable[[], float]) -> None:
        self._client = client
        self._max_down = max_down
        self._sleep = sleep
        self._clock = clock
        self._up = asyncio.Event()
        self._up.set()
        self._probe: asyncio.Task[None] | None = None
        self.outages = 0

    async def wait_up(self) -> None:
        await self._up.wait()
        if self._probe is not None and self._probe.done() and self._probe.exception():
            raise JobAborted(self._probe.exception())  # type: ignore[arg-type]

    async def probe_down(self) -> bool:
        """One /parameters call now: is the whole server down, or did only one request fail?"""
        try:
            await self._client.parameters()
        except (TransportError, ServerError) as exc:
            return _is_gateway_down(exc) or (isinstance(exc, TransportError) and _is_connect_error(exc))
        except DifyError:
            return False
        return False

    async def report_down(self, error: DifyError) -> None:
        if self._up.is_set():
            self._up.clear()
            self.outages += 1
            self._probe = asyncio.create_task(self._wait_for_server(error))
        await self._up.wait()
        if self._probe is not None and self._probe.exception():
            raise JobAborted(self._probe.exception())  # type: ignore[arg-type]

    async def _wait_for_server(self, error: DifyError) -> None:
        started = self._clock()
        attempt = 0
        try:
            while True:
                attempt += 1
                await self._sleep(min(backoff_delay(attempt, base=1.0, cap=15.0) + 0.5, 15.0))
                try:
                    await self._client.parameters()
                    return
                except (TransportError, ServerError) as exc:
                    if isinstance(exc, ServerError) and not _is_gateway_down(exc):
                        return  # it answers: up, if unwell; the rows' own retries decide
                    error = exc
                    if self._clock() - started > self._max_down:
                        raise TransportError(
                            f"{error.message} — still unreachable after {self._max_down:.0f} s; "
                            "rerun the same command to continue", status=None, code=error.code,
                        ) from exc
        finally:
            self._up.set()


@dataclass
class Scheduler:
    spec: JobSpec
    client: DifyClient
    store: Checkpoint
    params: AppParameters
    mapping: dict[str, str]
    reader: Any
    on_progress: Callable[[Progress], None] | None = None
    sleep: Sleep = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    counters: Counters = field(default_factory=Counters)
    stop_reason: str | None = None
    grace_s: float = 30.0

    def __post_init__(self) -> None:
        self.limit = AdaptiveLimit(self.spec.concurrency)
        self.rpm = RateLimiter(self.spec.rpm, clock=self.clock, sleep=self.sleep) if self.spec.rpm else None
        self.window = asyncio.Semaphore(max(4 * self.spec.concurrency, 64))
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.chains: dict[str, asyncio.Task[None]] = {}
        self.uploads: dict[tuple[str, str], asyncio.Future[str]] = {}
        self.message_files = message_files_def(self.params)
        self.end_user_ready = False
        self.verified: dict[str, bool] = {}  # conversation key -> still exists on the server
        self.fatal: BaseException | None = None
        self.health = ServerHealth(self.client, self.spec.max_down, self.sleep, self.clock)
        self.writer = StateWriter(self.store, asyncio.get_running_loop())

    # ---- the main loop -------------------------------------------------------------------------------------------

    async def run(self, todo: int) -> None:
        self.counters.todo = todo
        self.end_user_ready = self.store.meta(f"end_user:{self.spec.user}") == "1"
        try:
            for batch in iter_keyed_batches(self.reader, self.spec, self.mapping):
                if not await self._schedule_batch(batch, self.end_user_ready):
                    break
            await self._drain()
        finally:
            await asyncio.to_thread(self.writer.close)
        if self.fatal is not None:
            raise self.fatal

    async def _schedule_batch(self, batch: list[KeyedRow], ready: bool) -> bool:
        states = self.store.get_rows([item.key for item in batch], with_outputs=False)
        for item in batch:
            state = states[item.key]
            if state.row_index != item.index:
                self.counters.duplicates += 1
                continue
            if state.status == "succeeded":
                continue
            await self.window.acquire()
            if self.stopping.is_set():
                self.window.release()
                return False
            task = self._spawn(item, state)
            if not ready:
                # Real Dify creates end users without a uniqueness check: let the first request for this `user` finish alone.
                await asyncio.wait([task])
                ready = self.end_user_ready
        return True

    def _spawn(self, item: KeyedRow, state: RowState) -> asyncio.Task[None]:
        conversation = self._conversation_key(item)
        previous = self.chains.get(conversation) if conversation is not None else None
        task = asyncio.create_task(self._row_after(previous, item, state))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if conversation is not None:
            self.chains[conversation] = task
            task.add_done_callback(lambda t: self.chains.pop(conversation, None) if self.chains.get(conversation) is t else None)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.window.release()
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self._abort(task.exception())  # type: ignore[arg-type]

    async def _drain(self) -> None:
        while self.tasks:
            await asyncio.wait(set(self.tasks))

    def request_stop(self, reason: str) -> None:
        """Stop scheduling new rows; rows in flight finish (or are cancelled by a second request)."""
        if self.stopping.is_set():
            self.cancel_in_flight()
            return
        self.stop_reason = reason
        self.stopping.set()
        # Rows in flight get a grace period to finish; after that they are cancelled. A cancelled streaming row keeps
        # its run id in the checkpoint and is looked up (not re-sent) by the next run.
        asyncio.get_running_loop().call_later(self.grace_s, self.cancel_in_flight)

    def cancel_in_flight(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def _abort(self, error: BaseException) -> None:
        self.fatal = error.cause if isinstance(error, JobAborted) else error
        self.stopping.set()
        self.cancel_in_flight()

    def _conversation_key(self, item: KeyedRow) -> str | None:
        column = self.spec.conversation_column
        return None if column is None else str(item.row.get(column, ""))

    # ---- one row -------------------------------------------------------------------------------------------------

    async def _row_after(self, previous: asyncio.Task[None] | None, item: KeyedRow, state: RowState) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        if self.stopping.is_set():
            return
        try:
            final = await self._process(item, state)
        except JobAborted as exc:
            self._abort(exc)
            return
        except RowNotStarted:
            return
        if final.status == "succeeded" or final.http_status is not None:
            self.store_end_user_ready()  # a request reached the server, so it has created the end user
        await self.writer.save(final)
        self._count(final)

    def store_end_user_ready(self) -> None:
        if not self.end_user_ready:
            self.end_user_ready = True
            self.store.set_meta(f"end_user:{self.spec.user}", "1")

    def _count(self, final: RowState) -> None:
        c = self.counters
        if final.status == "succeeded":
            c.succeeded += 1
        else:
            c.failed += 1
        c.tokens += final.total_tokens or 0
        c.price += final.total_price or 0.0
        if self.on_progress is not None:
            self.on_progress(Progress(c.todo, c.succeeded, c.failed, c.skipped, c.retries))

    async def _process(self, item: KeyedRow, state: RowState) -> RowState:
        started = self.clock()
        if state.status == "running" and state.workflow_run_id and self.spec.app_type == "workflow":
            recovered = await self._recover(state)
            if recovered is not None:
                return recovered
        attempts = 0

        def count_attempt() -> int:
            nonlocal attempts
            attempts += 1
            return attempts

        try:
            request = self._prepare(item)
            result = await self._with_retries(item, request, count_attempt)
        except (DifyError, InputFileError) as exc:
            return _failure(state, exc, state.attempts + attempts, self.clock() - started)
        return self._succeeded_state(state, result, state.attempts + attempts, self.clock() - started)

    async def _recover(self, state: RowState) -> RowState | None:
        """A crash left this row running with a known run id: look it up instead of paying for it again."""
        assert state.workflow_run_id is not None
        try:
            result = await self.client.wait_for_workflow_run(state.workflow_run_id)
        except RunFailedError as exc:
            self.counters.recovered += 1
            return _failure(state, exc, state.attempts, None)
        except DifyError as exc:
            if is_fatal_for_job(exc):
                raise JobAborted(exc) from exc
            return None  # unknown or unreachable run: send the row again
        if result.status == "running":
            return None
        self.counters.recovered += 1
        return self._succeeded_state(state, result, state.attempts, result.elapsed_s)

    def _prepare(self, item: KeyedRow) -> dict[str, Any]:
        """Inputs, query and file references for a row; InputFileError / DifyError-free checks before any request."""
        values = {var: item.row.get(col) for var, col in self.mapping.items()}
        problems = row_problems(values, self.params)
        if problems:
            raise InputFileError("; ".join(problems))
        inputs = build_inputs(item.row, self.mapping, self.params)
        files = {}
        for var, column in self.mapping.items():
            definition = self.params.get(var)
            if definition is None or not definition.is_file or is_empty(item.row.get(column)):
                continue
            refs = parse_file_cell(item.row.get(column), definition, files_root=self.spec.files_dir,
                                   size_limits_mb=self.params.file_size_limits_mb)
            if refs:
                files[var] = refs
        query = str(item.row.get(self.spec.query_column, "")) if self.spec.query_column else ""
        attached = []
        if self.spec.files_column and self.message_files is not None:
            attached = parse_file_cell(item.row.get(self.spec.files_column), self.message_files,
                                       files_root=self.spec.files_dir, size_limits_mb=self.params.file_size_limits_mb)
        return {"inputs": inputs, "files": files, "query": query, "attached": attached}

    async def _with_retries(
        self, item: KeyedRow, request: dict[str, Any], count_attempt: Callable[[], int]
    ) -> RunResult:
        def before_sleep(_: Any) -> None:
            self.counters.retries += 1

        retrying = retry_policy(self.spec.max_attempts, sleep=self.sleep).copy(before_sleep=before_sleep)
        async for attempt in retrying:
            with attempt:
                count_attempt()
                return await self._send(item, request)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _send(self, item: KeyedRow, request: dict[str, Any]) -> RunResult:
        inputs, attached = await self._with_files(request)
        while True:
            await self.health.wait_up()
            if self.rpm is not None:
                await self.rpm.acquire()
            await self.limit.acquire()
            if self.stopping.is_set():
                self.limit.release()
                raise RowNotStarted()
            lost_run: str | None = None
            failure: DifyError
            try:
                self.counters.requests += 1
                result = await self._call(item, inputs, request["query"], attached)
                self.limit.on_success()
                return result
            except RateLimitedError:
                self.counters.throttled += 1
                self.limit.on_throttled()
                raise
            except TransportError as exc:
                if not _is_connect_error(exc):
                    raise
                failure = exc
            except StreamInterruptedError as exc:
                # The stream broke and the lookup of its run could not connect: the server went down mid-run.
                if not (exc.run_id and isinstance(exc.__cause__, TransportError) and _is_connect_error(exc.__cause__)):
                    raise
                failure, lost_run = exc.__cause__, exc.run_id
            except ServerError as exc:
                if not _is_gateway_down(exc):
                    raise
                failure = exc
            except DifyError as exc:
                if is_fatal_for_job(exc):
                    raise JobAborted(exc) from exc
                raise
            finally:
                self.limit.release()
            if isinstance(failure, ServerError) and not await self.health.probe_down():
                raise failure  # only this request met the gateway error: an ordinary retry
            # The server is unreachable: wait for it to come back; this is not the row's fault.
            await self.health.report_down(failure)
            if lost_run is not None:
                return await self._look_up_after_outage(lost_run)

    async def _look_up_after_outage(self, run_id: str) -> RunResult:
        """The run was accepted before the outage: look it up rather than paying for it again."""
        result = await self.client.wait_for_workflow_run(run_id)
        if result.status == "running":
            raise StreamInterruptedError(f"run {run_id} was still running after the server came back", status=200,
                                         code="still_running", run_id=run_id)
        self.counters.recovered += 1
        return result

    async def _with_files(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The row's inputs with file values (local files uploaded once), and the message attachments."""
        inputs = dict(request["inputs"])
        for var, refs in request["files"].items():
            definition = self.params.get(var)
            assert definition is not None
            ids = {ref.value: await self._upload(ref.value) for ref in refs if ref.kind == "local"}
            inputs[var] = file_input_value(refs, ids, definition)
        attached = None
        if request["attached"] and self.message_files is not None:
            ids = {ref.value: await self._upload(ref.value) for ref in request["attached"] if ref.kind == "local"}
            attached = file_input_value(request["attached"], ids, self.message_files)
        return inputs, attached

    async def _call(self, item: KeyedRow, inputs: dict[str, Any], query: str, files: Any) -> RunResult:
        spec = self.spec
        on_started = self._on_started(item)
        if spec.app_type == "workflow":
            return await self.client.run_workflow(
                inputs, spec.user, response_mode=spec.response_mode, workflow_id=spec.workflow_id, files=files,
                on_started=on_started,
            )
        if spec.app_type == "completion":
            return await self.client.completion(
                inputs, spec.user, query=query, response_mode=spec.response_mode, files=files, on_started=on_started
            )
        conversation = self._conversation_key(item)
        conversation_id = self.store.conversation_id(conversation) if conversation is not None else None
        if conversation is not None and conversation_id:
            await self._check_conversation(conversation, conversation_id)
        result = await self.client.chat(
            query, spec.user, inputs=inputs, conversation_id=conversation_id, response_mode=spec.response_mode,
            files=files, on_started=on_started,
        )
        if conversation is not None and result.conversation_id and result.conversation_id != conversation_id:
            self.store.save_conversation(conversation, result.conversation_id)
        return result

    async def _check_conversation(self, conversation: str, conversation_id: str) -> None:
        """A conversation continued from an earlier run may be gone; streaming would hide the 404, so ask once."""
        if conversation not in self.verified:
            self.verified[conversation] = await self.client.conversation_exists(conversation_id, self.spec.user)
        if not self.verified[conversation]:
            raise NotFoundError(
                f"conversation {conversation_id} ({self.spec.conversation_column} = {conversation!r}) no longer exists "
                "on the server (Conversation Not Exists.); rerun with --fresh to start new conversations",
                status=404, code="conversation_not_exists",
            )

    def _on_started(self, item: KeyedRow) -> Callable[[dict[str, Any]], None]:
        def record(ids: dict[str, Any]) -> None:
            self.writer.started(item.key, {k: str(v) for k, v in ids.items() if v})
            conversation = self._conversation_key(item)
            if conversation is not None and ids.get("conversation_id") and not self.store.conversation_id(conversation):
                self.store.save_conversation(conversation, str(ids["conversation_id"]))
                self.verified[conversation] = True  # created by this run: no need to ask the server

        return record

    async def _upload(self, path: str) -> str:
        digest = await asyncio.to_thread(sha256_file, Path(path))
        slot = (digest, self.spec.user)
        if slot not in self.uploads:
            self.uploads[slot] = asyncio.ensure_future(self._upload_once(path, digest))
        future = self.uploads[slot]
        try:
            return await asyncio.shield(future)
        except DifyError:
            if self.uploads.get(slot) is future:
                del self.uploads[slot]  # let a retry upload again
            raise

    async def _upload_once(self, path: str, digest: str) -> str:
        cached = self.store.upload_id(digest, self.spec.user)
        if cached:
            return cached
        self.counters.requests += 1
        answer = await self.client.upload_file(path, self.spec.user)
        self.store.save_upload(digest, self.spec.user, str(answer["id"]), str(answer.get("name", "")))
        return str(answer["id"])

    # ---- results -------------------------------------------------------------------------------------------------

    def _succeeded_state(self, state: RowState, result: RunResult, attempts: int, elapsed: float | None) -> RowState:
        if result.status != "succeeded" and result.status != "partial-succeeded":
            error = RunFailedError(result.error or f"run ended {result.status}", status=200,
                                   code=f"workflow_{result.status}", run_id=result.workflow_run_id, result=result)
            return _failure(state, error, attempts, elapsed)
        if result.recovered:
            self.counters.recovered += 1
        return replace(
            state, status="succeeded", outputs=self._outputs(result), error=None, error_code=None, http_status=None,
            attempts=attempts, elapsed_s=elapsed, workflow_run_id=result.workflow_run_id or state.workflow_run_id,
            task_id=result.task_id, total_tokens=result.total_tokens, total_price=result.total_price,
            currency=result.currency, conversation_id=result.conversation_id, message_id=result.message_id,
        )

    def _outputs(self, result: RunResult) -> dict[str, Any]:
        if self.spec.app_type == "workflow":
            return dict(result.outputs)
        outputs: dict[str, Any] = {"answer": result.outputs.get("answer", "")}
        if self.spec.app_type == "chat":
            outputs["conversation_id"] = result.conversation_id
        outputs["message_id"] = result.message_id
        for name in ("prompt_tokens", "completion_tokens"):
            outputs[name] = result.usage.get(name)
        outputs["total_price"] = result.total_price
        outputs["currency"] = result.currency
        if result.retriever_resources:
            outputs["retriever_resources"] = result.retriever_resources
        return outputs


def _failure(state: RowState, error: BaseException, attempts: int, elapsed: float | None) -> RowState:
    status = getattr(error, "status", None)
    code = getattr(error, "code", None) or ("invalid_row" if isinstance(error, InputFileError) else None)
    run_id = getattr(error, "run_id", None) or state.workflow_run_id
    return replace(
        state, status="failed", outputs=None, error=_one_line(str(error)), error_code=code, http_status=status,
        attempts=attempts, elapsed_s=elapsed, workflow_run_id=run_id,
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _is_gateway_down(error: DifyError) -> bool:
    """An HTML 502/503 page from the proxy in front of Dify: the API behind it is down (restart, deploy)."""
    return isinstance(error, ServerError) and error.code == "html_page" and error.status in (502, 503)


def _is_connect_error(error: TransportError) -> bool:
    return error.code in ("connect_error", "connection_refused", "dns_error", "connect")


def install_signal_handlers(scheduler: Scheduler) -> Callable[[], None]:
    """SIGINT / SIGTERM: first stops scheduling, second cancels rows in flight. Returns the undo function."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, scheduler.request_stop, "interrupted")
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def undo() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return undo


__all__ = ["Counters", "JobAborted", "Progress", "Scheduler", "install_signal_handlers"]
