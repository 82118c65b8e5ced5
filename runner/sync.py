"""`Dify`, a blocking client for scripts and notebooks: one private event loop in a background thread drives one async
`DifyClient`, so each call simply waits for its answer — also inside Jupyter, where the caller's thread already runs a
loop. `StreamedChat` hands over text chunks as they arrive; `file_input` turns an upload into a Dify file value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Coroutine, Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, TypeVar

from .dify import DifyClient
from .errors import ConfigError
from .mapping import AMBIGUOUS, EXTENSIONS
from .models import AppParameters, RunResult
from .spec import DEFAULT_BASE_URL

T = TypeVar("T")
_END = object()  # queued after the last chunk of a stream


class Dify:
    """A synchronous Dify Service API client for one app key; safe to share between threads.

    `api_key` defaults to the environment variable `api_key_env`, `base_url` to `DIFY_BASE_URL`, else
    http://localhost/v1. Chat, completion and workflow calls stream under the hood (agent apps only stream, and Dify
    Cloud cuts silent requests at ~100 s) but return when the answer is complete. Errors are `runner.errors` classes.
    Extra keyword arguments go to `DifyClient` (`stall_timeout`, `start_timeout`, `verify`, ...).
    """

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, *, timeout: float = 300.0,
        api_key_env: str = "DIFY_API_KEY", **client_options: Any,
    ) -> None:
        key = api_key or os.environ.get(api_key_env) or ""
        if not key.strip():
            raise ConfigError(f"no Dify API key: pass api_key=... or set {api_key_env}")
        url = base_url or os.environ.get("DIFY_BASE_URL") or DEFAULT_BASE_URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dify-client-loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:  # created on its own loop: the HTTP pool belongs to that loop
            self._client = self._call(_new_client(url, key, timeout, client_options))
        except BaseException:
            _shutdown(self._loop, self._thread, None)
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._client)

    @property
    def base_url(self) -> str:
        return self._client.base_url

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"Dify(base_url={self._client._display_base!r}{state})"

    # ---- calls ------------------------------------------------------------------------------------------------

    def chat(
        self, query: str, user: str, conversation_id: str | None = None, inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None, *, response_mode: str = "streaming",
    ) -> RunResult:
        """One chat message; `result.outputs["answer"]`, `result.conversation_id` to continue the conversation."""
        return self._call(self._client.chat(query, user, inputs=inputs, conversation_id=conversation_id,
                                            files=files, response_mode=response_mode))

    def chat_stream(
        self, query: str, user: str, conversation_id: str | None = None, inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> StreamedChat:
        """Send at once; iterate the returned `StreamedChat` for text chunks, then read its `.result`."""
        chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        return StreamedChat(self._submit(self._client.chat(
            query, user, inputs=inputs, conversation_id=conversation_id, files=files, on_text=chunks.put,
        )), chunks)

    def completion(
        self, inputs: dict[str, Any], user: str, query: str = "", files: list[dict[str, Any]] | None = None, *,
        response_mode: str = "streaming",
    ) -> RunResult:
        """One completion-app message; the text is `result.outputs["answer"]`."""
        return self._call(self._client.completion(inputs, user, query=query, files=files,
                                                  response_mode=response_mode))

    def completion_stream(
        self, inputs: dict[str, Any], user: str, query: str = "", files: list[dict[str, Any]] | None = None,
    ) -> StreamedChat:
        chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        return StreamedChat(self._submit(self._client.completion(inputs, user, query=query, files=files,
                                                                 on_text=chunks.put)), chunks)

    def run_workflow(
        self, inputs: dict[str, Any], user: str, *, response_mode: str = "streaming", workflow_id: str | None = None,
    ) -> RunResult:
        """Run a workflow app; `result.outputs` holds the End node's variables. A failed run raises RunFailedError."""
        return self._call(self._client.run_workflow(inputs, user, response_mode=response_mode,
                                                    workflow_id=workflow_id))

    def upload_file(self, path: str | Path, user: str) -> dict[str, Any]:
        """Upload under `user` (only that user's runs may use it); returns Dify's record: `id`, `name`, ..."""
        return self._call(self._client.upload_file(path, user))

    def attach(self, path: str | Path, user: str, *, type: str | None = None) -> dict[str, Any]:
        """Upload `path` and return the file value to pass in `files=[...]` or as a file input of a workflow."""
        return file_input(self.upload_file(path, user), type=type)

    def parameters(self) -> AppParameters:
        return self._call(self._client.parameters())

    def info(self) -> dict[str, Any]:
        return self._call(self._client.info())

    # ---- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel what is still running, close the connections and stop the loop thread; idempotent."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a Dify client cannot be closed from one of its own callbacks")
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Dify:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("this Dify client is closed")
        if threading.current_thread() is self._thread:
            coro.close()  # waiting here would block the very loop that has to answer
            raise RuntimeError("a Dify call cannot be made from one of its own callbacks")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return _wait(self._submit(coro))


class StreamedChat:
    """A message being streamed: iterate it for the text chunks as they arrive; afterwards `.result` is the
    `RunResult` (reading it first waits for the end). Errors are raised by the loop and by `.result`.

    Chunks are the server's raw pieces; if Dify's moderation replaces the answer (`message_replace`), the final
    `.result.outputs["answer"]` is the one to keep.
    """

    def __init__(self, future: concurrent.futures.Future[RunResult], chunks: queue.SimpleQueue[Any]) -> None:
        self._future = future
        self._chunks = chunks
        self._parts: list[str] = []
        self._ended = False
        future.add_done_callback(lambda _: chunks.put(_END))  # after the last chunk, also when cancelled

    def __iter__(self) -> Iterator[str]:
        while not self._ended:
            try:
                item = self._chunks.get()
            except BaseException:  # Ctrl-C while waiting: do not leave the request running
                self._future.cancel()
                raise
            if item is _END:
                self._ended = True
                break
            self._parts.append(item)
            yield item
        _wait(self._future)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def result(self) -> RunResult:
        for _ in self:  # drain what the caller did not read
            pass
        return _wait(self._future)

    def close(self) -> None:
        """Stop reading: the request is cancelled (the server may still finish the run)."""
        self._future.cancel()

    def __enter__(self) -> StreamedChat:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "streaming"
        return f"StreamedChat({state}, {len(self._parts)} chunks read)"


def file_input(upload: dict[str, Any], type: str | None = None) -> dict[str, Any]:
    """The Dify file value for an upload record (`Dify.upload_file`'s answer): pass it in `files=[...]` or as a
    workflow file input. `type` (document, image, audio, video, custom) defaults to what the file name says."""
    upload_id = upload.get("id") if isinstance(upload, dict) else None
    if not upload_id:
        raise ConfigError(f"not an upload record (no 'id'): {upload!r}")
    kind = type or _file_type(str(upload.get("name") or ""), str(upload.get("extension") or ""))
    return {"type": kind, "transfer_method": "local_file", "upload_file_id": str(upload_id)}


def _file_type(name: str, extension: str) -> str:
    ext = (extension or PurePosixPath(name).suffix).lstrip(".").lower()
    candidates = AMBIGUOUS.get(ext) or tuple(t for t, exts in EXTENSIONS.items() if ext in exts)
    return candidates[0] if candidates else "custom"


async def _new_client(url: str, key: str, timeout: float, options: dict[str, Any]) -> DifyClient:
    return DifyClient(url, key, timeout=timeout, **options)


def _wait(future: concurrent.futures.Future[T]) -> T:
    try:
        return future.result()
    except BaseException:  # Ctrl-C while waiting: cancel the request too (a no-op when it already ended)
        future.cancel()
        raise


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: DifyClient | None) -> None:
    """Runs once, from `close()` or when the `Dify` object is collected: it must not refer to that object."""
    if threading.current_thread() is thread:  # collected on the loop thread itself: waiting would deadlock
        loop.call_soon(loop.stop)
        return
    if thread.is_alive():
        with contextlib.suppress(Exception):  # closing must not fail; the loop is stopped below regardless
            asyncio.run_coroutine_threadsafe(_close_all(client), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=15)
    if not thread.is_alive() and not loop.is_closed():
        loop.close()


async def _close_all(client: DifyClient | None) -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if client is not None:
        await client.aclose()
    await asyncio.get_running_loop().shutdown_default_executor()
