"""The test clock, and the service's waits that sleep on whichever clock it is given."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.delivery import wait_any
from tests.conftest import ManualClock

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_a_manual_clock_stands_still_until_moved() -> None:
    clock: Clock = ManualClock(T0)
    assert isinstance(clock, ManualClock)
    start = clock.monotonic()
    assert clock.now() == T0
    clock.advance(90, days=2)
    assert clock.now() == T0 + timedelta(days=2, seconds=90)
    assert clock.monotonic() == start + 2 * 86_400 + 90
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(-1)


def test_setting_the_wall_time_leaves_the_monotonic_time() -> None:
    clock = ManualClock(T0)
    start = clock.monotonic()
    clock.set(datetime(2025, 6, 1, 14, tzinfo=timezone(timedelta(hours=2))))
    assert clock.now() == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert clock.now().tzinfo is UTC
    assert clock.monotonic() == start
    with pytest.raises(ValueError, match="naive"):
        clock.set(datetime(2025, 6, 1))


def test_sleepers_wake_when_the_clock_reaches_them() -> None:
    async def scenario() -> None:
        clock = ManualClock(T0)
        woke: list[float] = []

        async def sleep(seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(seconds)

        tasks = [asyncio.create_task(sleep(s)) for s in (5, 10, 0)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert woke == [0] and clock.sleeping == 2
        clock.advance(4.9)
        await asyncio.sleep(0)
        assert woke == [0]
        clock.advance(0.1)
        await asyncio.sleep(0)
        assert woke == [0, 5] and clock.sleeping == 1
        clock.advance(days=1)
        await asyncio.gather(*tasks)
        assert woke == [0, 5, 10] and clock.sleeping == 0

    asyncio.run(scenario())


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_wait_any_times_out_on_the_clock_it_is_given() -> None:
    async def scenario() -> None:
        clock = ManualClock(T0)
        event = asyncio.Event()
        waiting = asyncio.create_task(wait_any(event, within=30, clock=clock))
        await turns(3)
        assert not waiting.done() and clock.sleeping == 1
        clock.advance(29)
        await turns(3)
        assert not waiting.done()
        clock.advance(1)
        assert await waiting is False
        # An event set first wins, and the clock's sleeper is not left behind.
        waiting = asyncio.create_task(wait_any(event, within=30, clock=clock))
        await turns(3)
        event.set()
        assert await waiting is True
        assert clock.sleeping == 0
        # The system clock's timeout is real time.
        assert await wait_any(asyncio.Event(), within=0.01, clock=SYSTEM_CLOCK) is False

    asyncio.run(scenario())
