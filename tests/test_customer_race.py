"""Work on one customer never interleaves: races run end to end on the
in-memory store, which gives the other tasks a turn at every call.

The applier and the local expiry sweep share one `Core`, as in the service;
two tasks start after every pair of delays (counted in turns of the event
loop) in both orders, so every interleaving of their store calls is tried.
Whatever the order:
- a renewal racing the expiry sweep never leaves a perk taken back and not
  given back: either the sweep saw the old expiry first (on_expire, then
  on_active again as a new cycle) or the renewal came first (nothing runs);
- two polls seeing the same new item grant it once;
- an answer read before another never undoes what the later one stored.
Within one `Store` object blocks for one customer wait for each other: no
commit is ever refused as changed meanwhile (that is for other processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings, load_settings
from daemon.diff import Mark, Phase
from daemon.expiry import sweep_expiries
from daemon.sources import Answer
from daemon.state import CustomerChange, CustomerChanged, CustomerTxn, Store, open_store
from daemon.state import memory as memory_backend
from daemon.wiring import Core
from tests.conftest import ITEM_A, MINECRAFT_CUSTOMER, ManualClock, customer, item
from tests.fakes.paynow_api import iso

CONFIG = """
paynow: {api_url: "http://127.0.0.1:9"}
sync: {state_db: state.sqlite3, expiry_grace_seconds: 0}
customers: [{token: tok-a, label: alice}]
servers:
  survival: {platform: minecraft, host: 127.0.0.1, port: 1, password: pw}
products:
  vip:
    on_active: ["grant {item.id}"]
    on_expire: ["take {item.id}"]
    on_revoke: ["take {item.id}"]
"""

T0 = datetime.fromisoformat("2026-01-01T12:00:00+00:00")
ALICE = customer(MINECRAFT_CUSTOMER)
KEY = (ITEM_A, "survival")
# Turns of the event loop a task waits before it starts: more than either
# task's store calls take, so that each starts before, during and after the other.
DELAYS = range(10)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return load_settings(path, env={})


def answer(state: str, expires_at: datetime, read_at: datetime) -> Answer:
    vip = item(ITEM_A, state, customer_id=ALICE.id, expires_at=iso(expires_at))
    return Answer(ALICE, [vip], complete=True, read_at=read_at)


class Refusals:
    """Wraps a store; counts the commits refused as changed meanwhile."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str) -> AsyncIterator[CustomerTxn]:
        async with self.store.customer(customer_id) as txn:
            yield _CountingTxn(txn, self)


class _CountingTxn:
    def __init__(self, txn: CustomerTxn, refusals: Refusals) -> None:
        self.txn = txn
        self.refusals = refusals
        self.known = txn.known

    async def commit(self, change: CustomerChange) -> list[int]:
        try:
            return await self.txn.commit(change)
        except CustomerChanged:
            self.refusals.refused += 1
            raise


async def after(turns: int, work: Awaitable[Any]) -> Any:
    for _ in range(turns):
        await asyncio.sleep(0)
    return await work


def interleavings() -> Iterator[tuple[int, int, bool]]:
    """(first task's delay, second's, whether the second is started first)."""
    return itertools.product(DELAYS, DELAYS, (False, True))


@contextlib.asynccontextmanager
async def fresh_core(settings: Settings, url: str) -> AsyncIterator[tuple[Core, Refusals]]:
    memory_backend.forget(url)
    store = Refusals(open_store(url))
    try:
        yield Core(settings, store, ManualClock(T0)), store
    finally:
        await store.close()
        memory_backend.forget(url)


async def run_both(
    first: Awaitable[Any], second: Awaitable[Any], delays: tuple[int, int, bool]
) -> tuple[Any, Any]:
    """Both, each after its delay, the second created first if asked; their results."""
    a, b, second_first = delays
    if second_first:
        two = asyncio.create_task(after(b, second))
        one = asyncio.create_task(after(a, first))
    else:
        one = asyncio.create_task(after(a, first))
        two = asyncio.create_task(after(b, second))
    results = await asyncio.gather(one, two)
    return results[0], results[1]


async def history(store: Store) -> tuple[list[tuple[str, int]], Mark | None]:
    """The item's journal (event, cycle) in order, and its mark now."""
    rows = [(r.event, r.cycle) for r in await store.rows() if r.item_id == ITEM_A]
    async with store.customer(ALICE.id) as txn:
        return rows, txn.known.marks.get(KEY)


# --- a renewal racing the local expiry sweep ----------------------------------------


async def renewal_races_the_sweep(
    settings: Settings, url: str, delays: tuple[int, int, bool]
) -> tuple[list[tuple[str, int]], Mark | None, int, int]:
    async with fresh_core(settings, url) as (core, store):
        clock = core.clock
        assert isinstance(clock, ManualClock)
        await core.applier.apply(answer("active", T0 + timedelta(hours=1), T0), label="alice")
        clock.advance(hours=1, seconds=1)  # its expiry has passed: the sweep will take it
        renewal = answer("active", T0 + timedelta(days=31), clock.now())
        swept, _ = await run_both(
            sweep_expiries(core.applier), core.applier.apply(renewal, label="alice"), delays
        )
        rows, mark = await history(store.store)
        return rows, mark, swept, store.refused


def test_a_renewal_racing_the_expiry_sweep_never_leaves_the_perk_taken_away(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"memory://{tmp_path}"
    seen = set()
    for delays in interleavings():
        rows, mark, swept, refused = asyncio.run(renewal_races_the_sweep(settings, url, delays))
        assert refused == 0, delays
        if swept:  # the sweep went first: taken back, then given back as a new cycle
            assert rows == [("on_active", 1), ("on_expire", 1), ("on_active", 2)], delays
            assert mark == Mark(Phase.GRANTED, 2), delays
        else:  # the renewal went first: nothing to take back
            assert rows == [("on_active", 1)], delays
            assert mark == Mark(Phase.GRANTED, 1), delays
        seen.add(swept)
    assert seen == {0, 1}  # both orders happened


# --- two polls of one customer -----------------------------------------------------


async def two_polls(
    settings: Settings, url: str, delays: tuple[int, int, bool]
) -> tuple[list[tuple[str, int]], Mark | None, int]:
    async with fresh_core(settings, url) as (core, store):
        later = T0 + timedelta(days=30)
        first = answer("active", later, T0)
        second = answer("active", later, T0 + timedelta(seconds=1))
        await run_both(
            core.applier.apply(first, label="alice"),
            core.applier.apply(second, label="alice"),
            delays,
        )
        rows, mark = await history(store.store)
        return rows, mark, store.refused


def test_two_polls_of_one_customer_grant_a_new_item_once(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"memory://{tmp_path}"
    for delays in interleavings():
        rows, mark, refused = asyncio.run(two_polls(settings, url, delays))
        assert rows == [("on_active", 1)], delays
        assert mark == Mark(Phase.GRANTED, 1), delays
        assert refused == 0, delays


async def stale_poll(
    settings: Settings, url: str, delays: tuple[int, int, bool]
) -> tuple[list[tuple[str, int]], Mark | None, str, int]:
    async with fresh_core(settings, url) as (core, store):
        later = T0 + timedelta(days=30)
        older = answer("active", later, T0)  # read first, applied in any order
        newer = answer("revoked", later, T0 + timedelta(seconds=1))
        await run_both(
            core.applier.apply(older, label="alice"),
            core.applier.apply(newer, label="alice"),
            delays,
        )
        rows, mark = await history(store.store)
        async with store.store.customer(ALICE.id) as txn:
            state = txn.known.items[ITEM_A].state
        return rows, mark, state, store.refused


def test_an_answer_read_earlier_never_undoes_a_later_one(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"memory://{tmp_path}"
    for delays in interleavings():
        rows, mark, state, refused = asyncio.run(stale_poll(settings, url, delays))
        assert state == "revoked", delays
        # Granted then revoked, or (the revoke seen first) never granted at all.
        assert rows in ([("on_active", 1), ("on_revoke", 1)], []), delays
        assert mark in (Mark(Phase.ENDED, 1), None), delays
        assert refused == 0, delays
