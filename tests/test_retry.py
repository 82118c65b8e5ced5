"""Retry policy: the should_retry / is_fatal_for_job table, back-off bounds, the rpm bucket and the adaptive limit.

Nothing here really sleeps: fake sleeps, a fake clock, and a virtual-time event loop for the throttling simulation.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from runner.errors import (
    AuthError,
    BadRequestError,
    ConfigError,
    DifyError,
    ForbiddenError,
    InputFileError,
    NotDifyError,
    NotFoundError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    RunFailedError,
    ServerError,
    StreamInterruptedError,
    TransportError,
    UploadError,
)
from runner.retry import AdaptiveLimit, RateLimiter, backoff_delay, is_fatal_for_job, retry_policy, should_retry

T = TypeVar("T")

# (error, should_retry, is_fatal_for_job)
CASES: list[tuple[BaseException, bool, bool]] = [
    (TransportError("refused", code="connect"), True, False),
    (TransportError("timed out", code="timeout"), True, False),
    (TransportError("reset", code="network"), True, False),
    (RateLimitedError("429", status=429, code="too_many_requests"), True, False),
    (RateLimitedError("400 Too many requests", status=400, code="invalid_param"), True, False),
    (RateLimitedError("provider 429", status=429, code="rate_limit_error"), True, False),
    (RateLimitedError("cloudflare 1015", status=429, code="html_page"), True, False),
    (ProviderError("provider hiccup", status=400, code="completion_request_error"), True, False),
    (ServerError("500", status=500, code="internal_server_error"), True, False),
    (ServerError("502 html", status=502, code="html_page"), True, False),
    (StreamInterruptedError("stream ended", status=200, code="stream_eof"), True, False),
    (StreamInterruptedError("still running", status=200, code="still_running"), True, False),
    (QuotaExceededError("upgrade your plan", status=429, code="rate_limit_error"), False, True),
    (AuthError("401", status=401, code="unauthorized"), False, True),
    (ForbiddenError("403", status=403, code="forbidden"), False, True),
    (ForbiddenError("403", status=403, code="workflow_version_execution_not_allowed"), False, True),
    (NotDifyError("html page", status=200, code="not_json"), False, True),
    (NotFoundError("route", status=404, code="route_not_found"), False, True),
    (NotFoundError("app", status=404, code="app_not_found"), False, True),
    (NotFoundError("version", status=404, code="workflow_not_found"), False, True),
    (NotFoundError("conversation", status=404, code="conversation_not_exists"), False, False),
    (NotFoundError("run", status=404, code="run_not_found"), False, False),
    (NotFoundError("generic", status=404, code="not_found"), False, False),
    (BadRequestError("bad input", status=400, code="invalid_param"), False, False),
    (BadRequestError("never started", status=200, code="stream_not_started"), False, False),
    (BadRequestError("unpublished", status=400, code="app_unavailable"), False, True),
    (BadRequestError("wrong app", status=400, code="not_workflow_app"), False, True),
    (BadRequestError("no provider", status=400, code="provider_not_initialize"), False, True),
    (UploadError("too large", status=413, code="file_too_large"), False, False),
    (RunFailedError("node failed", status=200, code="workflow_failed"), False, False),
    (RunFailedError("stopped", status=200, code="workflow_stopped"), False, False),
    (DifyError("some other dify error"), False, False),
    (ConfigError("bad mapping"), False, False),
    (InputFileError("missing file"), False, False),
    (ValueError("not ours"), False, False),
    (asyncio.CancelledError(), False, False),
]


@pytest.mark.parametrize(("error", "retry", "fatal"), CASES, ids=lambda v: getattr(v, "code", None) or repr(v)[:30])
def test_retry_and_fatal_table(error: BaseException, retry: bool, fatal: bool) -> None:
    assert should_retry(error) is retry
    assert is_fatal_for_job(error) is fatal


def test_every_dify_error_class_is_in_the_table() -> None:
    covered = {type(error) for error, _, _ in CASES}
    assert {cls for cls in _subclasses(DifyError)} <= covered


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


# ---- back-off ---------------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        samples = [backoff_delay(attempt, rng=rng) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling and min(samples) < 0.2 * ceiling  # spread over the whole range


def test_backoff_respects_base_and_cap_and_huge_attempts() -> None:
    rng = random.Random(1)
    assert all(backoff_delay(3, base=0.5, cap=100, rng=rng) <= 2.0 for _ in range(100))
    assert all(backoff_delay(10_000, cap=15.0, rng=rng) <= 15.0 for _ in range(100))
    assert all(0.0 <= backoff_delay(0, rng=rng) <= 1.0 for _ in range(100))


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    assert [backoff_delay(4, rng=random.Random(3)) for _ in range(3)] == [backoff_delay(4, rng=random.Random(3))] * 3


def test_retry_policy_retries_transient_errors_with_injected_sleep() -> None:
    sleeps: list[float] = []
    calls: list[int] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ServerError("502", status=502)
        return "ok"

    async def go() -> str:
        async for attempt in retry_policy(5, sleep=fake_sleep, rng=random.Random(0)):
            with attempt:
                return await flaky()
        raise AssertionError("unreachable")

    assert asyncio.run(go()) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 2.0


@pytest.mark.parametrize(("error", "expected_calls"), [
    (AuthError("401", status=401), 1),
    (RateLimitedError("429", status=429), 4),
])
def test_retry_policy_stops_at_permanent_errors_and_after_max_attempts(error: DifyError, expected_calls: int) -> None:
    calls: list[int] = []

    async def no_sleep(_: float) -> None:
        return None

    async def failing() -> None:
        calls.append(1)
        raise error

    async def go() -> None:
        async for attempt in retry_policy(4, sleep=no_sleep):
            with attempt:
                await failing()

    with pytest.raises(type(error)):
        asyncio.run(go())
    assert len(calls) == expected_calls


# ---- RateLimiter ------------------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_requests_evenly() -> None:
    fake = FakeTime()
    limiter = RateLimiter(60, clock=fake.clock, sleep=fake.sleep)

    async def go() -> None:
        for _ in range(5):
            await limiter.acquire()

    asyncio.run(go())
    assert fake.sleeps == [pytest.approx(1.0)] * 4 and fake.now == pytest.approx(4.0)


def test_rate_limiter_allows_one_seconds_burst_then_the_rate() -> None:
    fake = FakeTime()
    limiter = RateLimiter(600, clock=fake.clock, sleep=fake.sleep)

    async def go() -> None:
        for _ in range(15):
            await limiter.acquire()

    asyncio.run(go())
    assert len(fake.sleeps) == 5 and all(s == pytest.approx(0.1) for s in fake.sleeps)


def test_rate_limiter_refills_while_idle() -> None:
    fake = FakeTime()
    limiter = RateLimiter(60, clock=fake.clock, sleep=fake.sleep)

    async def go() -> None:
        await limiter.acquire()
        fake.now += 10.0  # idle for a while: the bucket holds at most one token
        await limiter.acquire()
        await limiter.acquire()

    asyncio.run(go())
    assert fake.sleeps == [pytest.approx(1.0)]


def test_rate_limiter_concurrent_callers_get_successive_slots() -> None:
    fake = FakeTime()
    recorded: list[float] = []

    async def record_only(seconds: float) -> None:  # clock frozen: each caller's wait is its reservation
        recorded.append(seconds)

    limiter = RateLimiter(30, clock=fake.clock, sleep=record_only)

    async def go() -> None:
        await asyncio.gather(*(limiter.acquire() for _ in range(4)))

    asyncio.run(go())
    assert sorted(recorded) == [pytest.approx(2.0), pytest.approx(4.0), pytest.approx(6.0)]


@pytest.mark.parametrize("rpm", [0, -5])
def test_rate_limiter_rejects_non_positive_rpm(rpm: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rpm)


# ---- AdaptiveLimit ----------------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_adaptive_limit_blocks_at_the_limit_and_wakes_in_order() -> None:
    async def go() -> list[int]:
        limit = AdaptiveLimit(2)
        order: list[int] = []
        await limit.acquire()
        await limit.acquire()

        async def waiter(n: int) -> None:
            await limit.acquire()
            order.append(n)

        tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
        await asyncio.sleep(0)
        assert order == [] and limit.in_flight == 2
        limit.release()
        await asyncio.sleep(0)
        limit.release()
        await asyncio.sleep(0)
        assert order == [0, 1] and limit.in_flight == 2
        limit.release()
        await asyncio.gather(*tasks)
        return order

    assert run(go()) == [0, 1, 2]


def test_adaptive_limit_cuts_to_what_the_server_accepted() -> None:
    async def go() -> AdaptiveLimit:
        limit = AdaptiveLimit(50)
        for _ in range(12):
            await limit.acquire()
        limit.on_throttled()  # 12 in flight, this one refused: the server holds the other 11
        limit.release()
        return limit

    limit = run(go())
    assert limit.limit == 11 and limit.in_flight == 11


def test_a_burst_of_rejections_refines_one_cut_without_compounding() -> None:
    async def go() -> AdaptiveLimit:
        limit = AdaptiveLimit(50)
        for _ in range(50):
            await limit.acquire()
        for _ in range(40):  # the server accepted 10; the other 40 come back refused one after another
            limit.on_throttled()
            limit.release()
        return limit

    limit = run(go())
    assert limit.limit == 10 and limit.in_flight == 10


def test_adaptive_limit_never_goes_below_one() -> None:
    async def go() -> int:
        limit = AdaptiveLimit(5)
        await limit.acquire()
        limit.on_throttled()
        limit.release()
        return limit.limit

    assert run(go()) == 1


def test_adaptive_limit_recovers_additively_up_to_the_maximum() -> None:
    async def go() -> list[int]:
        limit = AdaptiveLimit(6)
        for _ in range(4):
            await limit.acquire()
        limit.on_throttled()  # cut to 3 and remember that 4 was refused
        limit.release()
        for _ in range(3):
            limit.release()
        seen = [limit.limit]
        for _ in range(200):
            await limit.acquire()
            limit.on_success()
            limit.release()
            seen.append(limit.limit)
        return seen

    seen = run(go())
    assert seen[0] == 3 and max(seen) == 6 and seen[-1] == 6
    steps = [seen.index(level) for level in (4, 5, 6)]
    assert steps[0] == 12  # next to the refused level: four times the usual 3 successes
    assert steps[1] - steps[0] == 4 and steps[2] - steps[1] == 5  # then the usual `limit` successes per step


def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def go() -> AdaptiveLimit:
        limit = AdaptiveLimit(1)
        await limit.acquire()
        task = asyncio.create_task(limit.acquire())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        limit.release()
        await asyncio.wait_for(limit.acquire(), 1)
        return limit

    assert run(go()).in_flight == 1


# ---- the goal: a server capped at 10, a job allowed 50 ------------------------------------------------------------


class _VirtualSelector:
    """Selector that never waits: it moves the loop's clock to the next timer instead."""

    def __init__(self, real: Any, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> Any:
        events = self._real.select(0)
        if not events and timeout:
            self._loop.virtual_now += timeout
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.virtual_now = 0.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.virtual_now


async def simulate(cap: int, maximum: int, rows: int, seed: int) -> tuple[float, float]:
    """Rows through AdaptiveLimit against a server that refuses (in 0.15 s) beyond `cap` concurrent runs of ~1 s;
    refused rows back off with full jitter like the runner. Returns (throughput / cap, rejected share)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    limit = AdaptiveLimit(maximum)
    active = accepted = rejected = 0

    async def request() -> bool:
        nonlocal active, accepted, rejected
        if active >= cap:
            await asyncio.sleep(0.15)
            rejected += 1
            return False
        active += 1
        accepted += 1
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        active -= 1
        return True

    window = asyncio.Semaphore(4 * maximum)

    async def row() -> None:
        async with window:
            attempt = 0
            while True:
                await limit.acquire()
                try:
                    ok = await request()
                    limit.on_success() if ok else limit.on_throttled()
                finally:
                    limit.release()
                if ok:
                    return
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, rng=rng))

    start = loop.time()
    await asyncio.gather(*(row() for _ in range(rows)))
    return rows / (loop.time() - start) / cap, rejected / (rejected + accepted)


@pytest.mark.parametrize("seed", [1, 2])
def test_adaptive_limit_keeps_throughput_near_the_cap_with_few_rejections(seed: int) -> None:
    loop = VirtualTimeLoop()
    try:
        throughput, rejected_share = loop.run_until_complete(simulate(cap=10, maximum=50, rows=800, seed=seed))
    finally:
        loop.close()
    assert throughput >= 0.9
    assert rejected_share < 0.10
