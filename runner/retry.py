"""Retry policy as data: which errors are worth another try (`should_retry`), which stop the whole job
(`is_fatal_for_job`), back-off with full jitter, a requests-per-minute token bucket and an adaptive concurrency limit.

Pure functions plus two small schedulers with injectable clock and sleep, so tests never really wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import tenacity

from .errors import (
    AuthError,
    BadRequestError,
    DifyError,
    ForbiddenError,
    NotDifyError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
    StreamInterruptedError,
    TransportError,
)

Sleep = Callable[[float], Awaitable[Any]]

RETRYABLE: tuple[type[DifyError], ...] = (
    TransportError, RateLimitedError, ProviderError, ServerError, StreamInterruptedError,
)
FATAL: tuple[type[DifyError], ...] = (AuthError, ForbiddenError, NotDifyError, QuotaExceededError)
# NotFoundError codes (set by dify.py): the app, its route or the pinned workflow version is gone, so every row fails.
FATAL_NOT_FOUND_CODES = frozenset({"route_not_found", "app_not_found", "workflow_not_found"})
# 400 codes that describe the app's setup rather than the row: every row would fail the same way.
FATAL_BAD_REQUEST_CODES = frozenset({
    "app_unavailable", "not_workflow_app", "not_chat_app", "not_completion_app",
    "provider_not_initialize", "provider_quota_exceeded", "model_currently_not_support",
})


def should_retry(error: BaseException) -> bool:
    """True when sending the same request again may succeed (network, throttling, provider or server hiccups)."""
    return isinstance(error, RETRYABLE)


def is_fatal_for_job(error: BaseException) -> bool:
    """True when the error will hit every row alike, so the job must stop instead of failing rows one by one.

    Connection failures are not decided here: the runner waits for the server to come back.
    """
    if isinstance(error, FATAL):
        return True
    if isinstance(error, NotFoundError):
        return error.code in FATAL_NOT_FOUND_CODES
    if isinstance(error, BadRequestError):
        return error.code in FATAL_BAD_REQUEST_CODES
    return False


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None) -> float:
    """Seconds before retry `attempt` (1 = first): full jitter, uniform in [0, min(cap, base * 2**(attempt - 1))]."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


def retry_policy(
    max_attempts: int = 5, *, base: float = 1.0, cap: float = 60.0, sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> tenacity.AsyncRetrying:
    """The whole retry policy as one tenacity object: `async for attempt in retry_policy(): with attempt: ...`."""
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max_attempts),
        wait=lambda state: backoff_delay(state.attempt_number, base=base, cap=cap, rng=rng),
        retry=tenacity.retry_if_exception(should_retry),
        sleep=sleep,
        reraise=True,
    )


class RateLimiter:
    """Token bucket for requests per minute; bursts up to one second's worth (at least one request).

    Each caller reserves the next free slot at once (FIFO by arrival) and sleeps until it comes.
    """

    def __init__(
        self, rpm: float, *, clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        if rpm <= 0:
            raise ValueError(f"rpm must be positive, got {rpm!r}")
        self.rpm = rpm
        self._rate = rpm / 60.0
        self._capacity = max(1.0, self._rate)
        self._tokens = self._capacity
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()

    async def acquire(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        if self._tokens < 0:
            await self._sleep(-self._tokens / self._rate)


class AdaptiveLimit:
    """Concurrency limit that follows the server's capacity: the whole job slows down rather than every worker
    hammering a server that says "too many requests", then probes upwards again.

    Protocol: `await acquire()`; send; then `on_success()` or `on_throttled()` *before* `release()`, so that a
    throttled request still counts in `in_flight` and `in_flight - 1` is what the server accepted alongside it.
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, got {maximum!r}")
        self.maximum = maximum
        self._limit = maximum
        self._in_flight = 0
        self._successes = 0
        self._refused_at: int | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_acquire(self) -> bool:
        if self._in_flight >= self._limit or self._waiters:
            return False
        self._in_flight += 1
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._in_flight -= 1  # the slot was handed over just as we were cancelled: give it back
                self._wake()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def on_success(self) -> None:
        """Additive increase: one more slot after `limit` successes in a row, up to `maximum`; four times as many
        when the next step reaches the level the server last refused, so probing its cap costs few rejections."""
        self._successes += 1
        near_cap = self._refused_at is not None and self._limit + 1 >= self._refused_at
        if self._successes >= self._limit * (4 if near_cap else 1) and self._limit < self.maximum:
            self._limit += 1
            self._successes = 0
            if near_cap:
                self._refused_at = None  # held there without a rejection: the cap moved up
            self._wake()

    def on_throttled(self) -> None:
        """Cut the limit to what the server accepted alongside this request (`in_flight - 1`, at least 1).

        No cool-down window is needed: later rejections of the same burst see fewer requests in flight, so they
        refine the one cut down to what the server holds and never compound below it. (Ignoring them for a window
        instead kept 35-50 % of requests rejected in the cap-10 / maximum-50 simulation of tests/test_retry.py.)
        """
        self._successes = 0
        self._refused_at = self._in_flight
        self._limit = min(self._limit, max(1, self._in_flight - 1))

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)
