"""RetryPolicy and RateLimiter, with a fake clock and sleep: no real waits."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import pytest

from daemon.paynow import (
    MIN_RETRY_SECONDS,
    PayNowAuthError,
    PayNowError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowTimeout,
    PayNowUnavailable,
    RateLimiter,
    RetryPolicy,
)


class FakeTime:
    """A clock that only moves when slept on (or when an attempt says it took time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.overrun = 0.0  # extra seconds each sleep takes (a suspended machine)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.overrun


class Attempts:
    """Attempts that fail as scripted (an error) or succeed (anything else),
    each taking `cost` seconds of fake time (or its whole timeout, if `hang`)."""

    def __init__(
        self, fake: FakeTime, outcomes: Sequence[Any], cost: float = 0.0, hang: bool = False
    ) -> None:
        self.fake = fake
        self.outcomes = list(outcomes)
        self.cost = cost
        self.hang = hang
        self.timeouts: list[float] = []

    async def __call__(self, time_limit: float) -> Any:
        self.timeouts.append(time_limit)
        self.fake.now += time_limit if self.hang else self.cost
        outcome = self.outcomes[min(len(self.timeouts), len(self.outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def policy(fake: FakeTime, **kwargs: Any) -> RetryPolicy:
    return RetryPolicy(clock=fake.clock, sleep=fake.sleep, **kwargs)


def run(policy: RetryPolicy, attempts: Attempts, limiter: RateLimiter | None = None) -> Any:
    return asyncio.run(policy.run(attempts, limiter))


def fails(
    policy: RetryPolicy, attempts: Attempts, exc_type: type[PayNowError] = PayNowError
) -> PayNowError:
    with pytest.raises(exc_type) as info:
        run(policy, attempts)
    error = info.value
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


def unavailable(**kwargs: Any) -> PayNowUnavailable:
    return PayNowUnavailable(
        "PayNow customer: HTTP 503 service-unavailable", status=503, code="x", **kwargs
    )


# --------------------------------------------------------------------- attempts


def test_an_answer_at_the_first_attempt_is_returned_at_once() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [b"body"])
    assert run(policy(fake, timeout_seconds=7.0), attempts) == b"body"
    assert attempts.timeouts == [7.0] and fake.sleeps == []


@pytest.mark.parametrize("final", [PayNowAuthError("no"), PayNowNotFound("gone")])
def test_a_final_error_is_not_retried(final: PayNowError) -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [unavailable(), final])
    error = fails(policy(fake), attempts)
    assert error is final and error.attempts == 2
    assert len(attempts.timeouts) == 2 and len(fake.sleeps) == 1


def test_retryable_errors_are_retried_then_the_answer_returned() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [unavailable(), PayNowTimeout("slow"), b"ok"])
    assert run(policy(fake), attempts) == b"ok"
    assert len(attempts.timeouts) == 3 and len(fake.sleeps) == 2


@pytest.mark.parametrize("exc_type", [PayNowUnavailable, PayNowTimeout, PayNowRateLimited])
def test_max_attempts_gives_up_with_the_last_error(exc_type: type[PayNowError]) -> None:
    fake = FakeTime()
    last = exc_type("PayNow customer: HTTP 5xx", status=502, code="bad-gateway", trace_id="t1")
    attempts = Attempts(fake, [unavailable(), unavailable(), last])
    error = fails(policy(fake, max_attempts=3), attempts, exc_type)
    assert type(error) is exc_type
    assert str(error) == "PayNow customer: HTTP 5xx; giving up after 3 attempts"
    assert (error.status, error.code, error.trace_id, error.attempts) == (
        502,
        "bad-gateway",
        "t1",
        3,
    )
    assert len(attempts.timeouts) == 3 and len(fake.sleeps) == 2


def test_backoff_doubles_up_to_its_maximum_with_jitter_in_the_upper_half() -> None:
    fake = FakeTime()
    asked: list[tuple[float, float]] = []

    def jitter(low: float, high: float) -> float:
        asked.append((low, high))
        return high

    retry = RetryPolicy(
        clock=fake.clock,
        sleep=fake.sleep,
        jitter=jitter,
        max_attempts=7,
        retry_budget_seconds=1000.0,
        backoff_base_seconds=0.5,
        backoff_max_seconds=4.0,
    )
    fails(retry, Attempts(fake, [unavailable()]))
    assert fake.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert asked == [(c / 2, c) for c in fake.sleeps]


def test_real_jitter_stays_within_each_ceiling() -> None:
    fake = FakeTime()
    retry = policy(fake, max_attempts=6, retry_budget_seconds=1000.0, backoff_base_seconds=1.0)
    fails(retry, Attempts(fake, [unavailable()]))
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0]
    assert all(c / 2 <= s <= c for s, c in zip(fake.sleeps, ceilings, strict=True))


# ------------------------------------------------------------------ Retry-After


def test_retry_after_is_waited_instead_of_the_backoff() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowRateLimited("429", status=429, retry_after=7.0), b"ok"])
    assert run(policy(fake, backoff_base_seconds=0.01), attempts) == b"ok"
    assert fake.sleeps == [7.0]


def test_retry_after_beyond_the_budget_gives_up_at_once() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowRateLimited("PayNow customer: HTTP 429", retry_after=30)])
    error = fails(policy(fake, retry_budget_seconds=2.0), attempts, PayNowRateLimited)
    assert str(error) == (
        "PayNow customer: HTTP 429; giving up: Retry-After 30s exceeds the remaining "
        "retry budget (2.0s)"
    )
    assert error.attempts == 1 and fake.sleeps == []


def test_no_retry_that_would_leave_less_than_the_minimum() -> None:
    # After waiting 0.95 s of a 1 s budget the retry would have 50 ms: too
    # short to be worth it.
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowRateLimited("429", retry_after=0.95)])
    error = fails(policy(fake, retry_budget_seconds=1.0), attempts, PayNowRateLimited)
    assert "giving up after 1 attempts in 0.0s (retry budget 1s)" in str(error)
    assert fake.sleeps == [] and len(attempts.timeouts) == 1


def test_a_retry_gets_what_is_left_of_the_budget_if_less_than_the_timeout() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowRateLimited("429", retry_after=0.75), b"ok"])
    assert run(policy(fake, retry_budget_seconds=1.0, timeout_seconds=5.0), attempts) == b"ok"
    assert attempts.timeouts == [5.0, pytest.approx(0.25)]
    assert MIN_RETRY_SECONDS < 0.25


def test_the_minimum_is_the_timeout_when_that_is_shorter() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowRateLimited("429", retry_after=0.95), b"ok"])
    retry = policy(fake, retry_budget_seconds=1.0, timeout_seconds=0.04)
    assert run(retry, attempts) == b"ok"
    assert attempts.timeouts == [0.04, 0.04]


# ----------------------------------------------------------------------- budget


def test_attempts_that_time_out_use_up_the_budget() -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [PayNowTimeout("PayNow customer: timed out")], hang=True)
    retry = policy(
        fake, max_attempts=100, retry_budget_seconds=5.0, timeout_seconds=2.0,
        backoff_base_seconds=0.1, backoff_max_seconds=0.1, jitter=lambda lo, hi: hi,
    )  # fmt: skip
    error = fails(retry, attempts, PayNowTimeout)
    # 2 s, 0.1 s wait, 2 s, 0.1 s wait, then 0.8 s left: the third attempt is cut to it.
    assert attempts.timeouts == [2.0, 2.0, pytest.approx(0.8)]
    assert error.attempts == 3
    assert str(error).startswith("PayNow customer: timed out; giving up after 3 attempts in 5.0s")
    assert "(retry budget 5s)" in str(error)


def test_a_sleep_that_overran_the_budget_makes_no_attempt() -> None:
    fake = FakeTime()
    fake.overrun = 10.0
    attempts = Attempts(fake, [unavailable()])
    error = fails(policy(fake, retry_budget_seconds=5.0), attempts, PayNowUnavailable)
    assert len(attempts.timeouts) == 1 and len(fake.sleeps) == 1
    assert re.search(r"giving up after 1 attempts in 10\.\ds \(retry budget 5s\)$", str(error))


def test_every_attempt_waits_for_the_rate_limiter() -> None:
    class Counting(RateLimiter):
        acquired = 0

        async def acquire(self) -> None:
            self.acquired += 1

    fake = FakeTime()
    limiter = Counting(None)
    attempts = Attempts(fake, [unavailable(), unavailable(), b"ok"])
    assert run(policy(fake), attempts, limiter) == b"ok"
    assert limiter.acquired == 3


def test_each_retry_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    attempts = Attempts(fake, [unavailable(), unavailable(), b"ok"])
    with caplog.at_level(logging.WARNING, logger="daemon.paynow"):
        run(policy(fake, max_attempts=4, jitter=lambda lo, hi: hi), attempts)
    assert [r.getMessage() for r in caplog.records] == [
        "PayNow customer: HTTP 503 service-unavailable; retrying in 0.50s (attempt 2 of 4)",
        "PayNow customer: HTTP 503 service-unavailable; retrying in 1.00s (attempt 3 of 4)",
    ]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"timeout_seconds": 0}, "timeout_seconds must be > 0"),
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"retry_budget_seconds": -1}, "retry_budget_seconds must be >= 0"),
    ],
)
def test_policy_settings_are_checked(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        RetryPolicy(**kwargs)


# ----------------------------------------------------------------- rate limiter


def test_rate_limiter_unit() -> None:
    now = [100.0]
    limiter = RateLimiter(10, clock=lambda: now[0])
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    now[0] += 1.0  # long idle: under the limit again, no wait
    assert limiter.reserve() == 0.0
    now[0] += 0.05  # half an interval later: wait the other half
    assert limiter.reserve() == pytest.approx(0.05)

    burst = RateLimiter(10, burst=3, clock=lambda: now[0])
    assert [burst.reserve() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])

    for unlimited in (RateLimiter(0), RateLimiter(None)):
        assert unlimited.unlimited
        assert all(unlimited.reserve() == 0.0 for _ in range(1000))


def test_rate_limiter_does_not_sleep_under_the_limit() -> None:
    async def main() -> float:
        limiter = RateLimiter(50)
        await limiter.acquire()
        await asyncio.sleep(0.03)
        started = time.perf_counter()
        await limiter.acquire()
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.005
