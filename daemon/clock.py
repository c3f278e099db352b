"""Time, as the rest of perksync reads it: passed in, so that tests can set it.

Decisions that depend on the time (is an item's expiry past its grace, when
was a command journaled or delivered, is a poll stale) read `Clock.now()`;
intervals read `Clock.monotonic()`, and the service's own waits (the
heartbeat, a server's retry backoff) are `Clock.sleep()`. The service and
`--sync-now` use `SystemClock`; tests hand in a clock they move by hand, so
that "a day later" needs no sleep. (APScheduler fires its jobs on the wall
clock whatever the clock says: see daemon/scheduler.py.)
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `monotonic()` has moved on by `seconds`."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
