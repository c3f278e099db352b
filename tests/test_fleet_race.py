"""One customer across hosts: a poll on one host and the expiry sweep on
another, on one PostgreSQL schema, never interleave (each host has its own
`Store` object and `Core`, as separate processes do). The same race within
one process is tests/test_customer_race.py.

Whatever the overlap, a renewal racing the sweep never leaves the perk taken
back and not given back: either the sweep's expiry landed first (on_expire,
then on_active again as a new cycle) or the renewal's (nothing runs). A
commit that lost the race stores nothing and is decided again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeVar

import asyncpg
import pytest

from daemon.config import Settings
from daemon.diff import Mark, Phase
from daemon.expiry import sweep_expiries
from daemon.state import open_store
from daemon.wiring import Core
from tests.conftest import ManualClock
from tests.postgres_db import empty_schema
from tests.test_customer_race import T0, Refusals, answer, history
from tests.test_customer_race import settings as settings

pytestmark = pytest.mark.timeout(300)

# How long after the sweep starts the renewal starts (milliseconds; below zero:
# before): the one starts before, during and after the other's statements.
# Further ones only until the sweep has gone first (a busy machine is slower).
ROUNDS = list(range(-20, 61, 4))
LATER = [100, 200, 400, 800, 1600]
T = TypeVar("T")
TABLES = "customers, items, marks, journal, links"


async def renewal_on_one_host_sweep_on_another(
    settings: Settings, url: str
) -> tuple[list[str], set[int]]:
    """Every round from an empty state; what went wrong (empty: nothing), and
    what the sweep did (1: it went first; 0: the renewal did)."""
    problems: list[str] = []
    outcomes: set[int] = set()
    for lag in ROUNDS + LATER:
        if lag in LATER and 1 in outcomes:
            break
        poller, sweeper = Refusals(open_store(url)), Refusals(open_store(url))
        try:
            one = Core(settings, poller, ManualClock(T0))
            two = Core(settings, sweeper, ManualClock(T0 + timedelta(hours=1, seconds=1)))
            await one.applier.apply(answer("active", T0 + timedelta(hours=1), T0), label="alice")
            renewal = answer("active", T0 + timedelta(days=31), two.clock.now())
            await sweeper.pending_counts()  # connected: the race is of statements alone
            swept, _ = await asyncio.gather(
                after(max(0, -lag), sweep_expiries(two.applier)),
                after(max(0, lag), one.applier.apply(renewal, label="alice")),
            )
            rows, mark = await history(poller.store)
            expected = (
                ([("on_active", 1), ("on_expire", 1), ("on_active", 2)], Mark(Phase.GRANTED, 2))
                if swept
                else ([("on_active", 1)], Mark(Phase.GRANTED, 1))
            )
            outcomes.add(swept)
            if (rows, mark) != expected:
                problems.append(f"{lag} ms: swept {swept}, {rows}, {mark}")
        finally:
            await poller.close()
            await sweeper.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"TRUNCATE {TABLES}")
        finally:
            await conn.close()
    return problems, outcomes


async def after(milliseconds: float, work: Awaitable[T]) -> T:
    await asyncio.sleep(milliseconds / 1000)  # staggers the start; proves nothing
    return await work


def test_a_renewal_on_one_host_racing_the_sweep_on_another_keeps_the_perk(
    settings: Settings,
) -> None:
    with empty_schema() as url:
        problems, outcomes = asyncio.run(renewal_on_one_host_sweep_on_another(settings, url))
    assert problems == []
    assert outcomes == {0, 1}  # both orders happened
