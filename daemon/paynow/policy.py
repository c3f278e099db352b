"""How often and how many times PayNow is asked: the rate limit and the retries.

Neither knows what is asked: `RetryPolicy.run` drives attempts (any coroutine
that takes a timeout) and decides by the `retryable` flag of the
`PayNowError` an attempt raised.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from daemon.paynow.errors import PayNowError

log = logging.getLogger(__name__)

T = TypeVar("T")

# A retry is only made if it leaves the attempt at least this long (or the
# whole timeout, if shorter): one cut to a few milliseconds could only time
# out, and would then report a timeout instead of what PayNow said.
MIN_RETRY_SECONDS: Final = 0.1


class RateLimiter:
    """Process-wide request rate limit (GCRA, i.e. a token bucket).

    `rate` requests per second on average with bursts of up to `burst`
    requests; `rate` of 0 or None means unlimited. `acquire()` returns at once
    while under the limit; otherwise it reserves the next free slot and sleeps
    until then, so waiters are served in arrival order. One event loop only.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is not None and rate < 0:
            raise ValueError("rate must be >= 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = rate or 0.0
        self.burst = burst
        self._interval = 1.0 / self.rate if self.rate else 0.0
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next request

    @property
    def unlimited(self) -> bool:
        return self._interval == 0.0

    def reserve(self) -> float:
        """Take the next slot; return how many seconds to wait for it (0 = now)."""
        if self._interval == 0.0:
            return 0.0
        now = self._clock()
        tat = self._tat if self._tat > now else now
        self._tat = tat + self._interval
        wait = tat - self._tolerance - now
        return wait if wait > 0.0 else 0.0

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0.0:
            await asyncio.sleep(wait)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of one request: up to `max_attempts` attempts, all within
    `retry_budget_seconds` from the first; exponential backoff with jitter
    between them, or the `Retry-After` PayNow asked for.

    The first attempt gets the whole `timeout_seconds`; a retry gets what is
    left of the budget if that is less. A retry that would leave less than
    `MIN_RETRY_SECONDS` (or the timeout, if shorter) is not made, nor is one
    whose `Retry-After` is beyond the budget. `clock`, `sleep` and `jitter`
    are the event loop's clock, `asyncio.sleep` and `random.uniform` unless
    a test gives its own.
    """

    max_attempts: int = 4
    retry_budget_seconds: float = 30.0
    timeout_seconds: float = 10.0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 8.0
    clock: Callable[[], float] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[float, float], float] = random.uniform

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.retry_budget_seconds < 0:
            raise ValueError("retry_budget_seconds must be >= 0")

    async def run(
        self,
        attempt: Callable[[float], Awaitable[T]],
        rate_limiter: RateLimiter | None = None,
    ) -> T:
        """`await attempt(timeout)` until it returns, raises a final error, or
        the attempts or the budget run out (then the last error is raised,
        saying so). Every attempt first waits for `rate_limiter`."""
        clock = self.clock or asyncio.get_running_loop().time
        started = clock()
        deadline = started + self.retry_budget_seconds
        min_attempt = min(MIN_RETRY_SECONDS, self.timeout_seconds)
        timeout = self.timeout_seconds
        attempts = 0
        while True:
            attempts += 1
            if rate_limiter is not None:
                await rate_limiter.acquire()
            try:
                return await attempt(timeout)
            except PayNowError as exc:
                exc.attempts = attempts
                if not exc.retryable:
                    raise
                failure = exc
            now = clock()
            delay, reason = self._next(failure, attempts, now - started, deadline - now)
            if reason:
                raise failure.after_attempts(reason, attempts)
            log.warning(
                "%s; retrying in %.2fs (attempt %d of %d)",
                failure.message,
                delay,
                attempts + 1,
                self.max_attempts,
            )
            await self.sleep(delay)
            left = deadline - clock()
            if left < min_attempt:  # the sleep overran: no time left worth an attempt
                reason = self._out_of_budget(attempts, clock() - started)
                raise failure.after_attempts(reason, attempts)
            timeout = self.timeout_seconds if left >= self.timeout_seconds else max(left, 0.001)

    def _next(
        self, failure: PayNowError, attempts: int, elapsed: float, remaining: float
    ) -> tuple[float, str]:
        """(how long to wait before the next attempt, "") or (0, why there is none)."""
        if attempts >= self.max_attempts:
            return 0.0, f"giving up after {attempts} attempts"
        retry_after = failure.retry_after
        if retry_after is not None and retry_after > remaining:
            return 0.0, (
                f"giving up: Retry-After {retry_after:g}s exceeds the remaining retry "
                f"budget ({max(remaining, 0.0):.1f}s)"
            )
        delay = self.backoff(attempts, retry_after)
        if delay + min(MIN_RETRY_SECONDS, self.timeout_seconds) >= remaining:
            return 0.0, self._out_of_budget(attempts, elapsed)
        return delay, ""

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Seconds to wait after `attempts` failed ones: `retry_after` if PayNow
        sent one, else a random wait in the upper half of base * 2^(n-1)."""
        if retry_after is not None:
            return retry_after
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempts - 1))
        return self.jitter(ceiling / 2, ceiling)

    def _out_of_budget(self, attempts: int, elapsed: float) -> str:
        return (
            f"giving up after {attempts} attempts in {elapsed:.1f}s "
            f"(retry budget {self.retry_budget_seconds:g}s)"
        )
