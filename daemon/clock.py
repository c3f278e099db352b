"""Time, as the rest of perksync reads it: passed in, so that tests can set it.

Decisions that depend on the time (is an item's expiry past its grace, when
was a command journaled or delivered) read `Clock.now()`; waits and
intervals read `Clock.monotonic()`. The service and `--sync-now` use
`SystemClock`; tests hand in a clock they move by hand, so that "a day
later" needs no sleep.
"""

from __future__ import annotations

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


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
