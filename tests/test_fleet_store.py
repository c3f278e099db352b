"""What hosts sharing one PostgreSQL database keep there (daemon/state/shared.py):
joining with the settings fingerprint, leases and their fencing tokens, the
hosts `status` lists, webhook hints taken once, notifications per schema.

Two stores opened on one schema stand for two hosts (each has its own pool).
The fenced attempt is in the Store contract (tests/test_store_contract.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from daemon.state import open_store
from daemon.state.postgres import PostgresStore
from daemon.state.shared import HINTS, JOURNAL, HostRecord
from tests.postgres_db import empty_schema

pytestmark = pytest.mark.timeout(120)

WEB1 = HostRecord("web-1:11:aa", "web-1", 11, "eu", "settings-A")
WEB2 = HostRecord("web-2:22:bb", "web-2", 22, "eu", "settings-A")
POLL = ["poll"]


@pytest.fixture
def url() -> Iterator[str]:
    with empty_schema() as url:
        yield url


def hosts_on(url: str, test: Callable[..., Awaitable[None]], count: int = 2) -> None:
    """Run `test(store, store, …)`: `count` stores on one schema, closed after."""

    async def run() -> None:
        stores = [open_store(url) for _ in range(count)]
        assert all(isinstance(s, PostgresStore) for s in stores)
        try:
            await test(*stores)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())


def test_one_host_at_a_time_holds_a_lease_and_a_new_holder_gets_a_new_token(url: str) -> None:
    async def test(one: PostgresStore, two: PostgresStore) -> None:
        await one.join(WEB1, 120)
        await two.join(WEB2, 120)
        (first,) = (await one.tick(WEB1, POLL, 60, 5)).leases
        (standby,) = (await two.tick(WEB2, POLL, 60, 5)).leases
        assert first.held and first.was_holder is None
        assert not standby.held and standby.was_host == "web-1 pid 11"
        (renewed,) = (await one.tick(WEB1, POLL, 60, 5)).leases
        assert renewed.token == first.token  # a renewal keeps the token
        assert await one.release(WEB1) == ["poll"]  # a graceful stop
        (taken,) = (await two.tick(WEB2, POLL, 60, 5)).leases
        assert first.token is not None and taken.token == first.token + 1
        assert (taken.was_host, taken.was_stopped) == ("web-1 pid 11", True)
        # web-1 (stopped) takes nothing again; only a new process would join anew.
        (after,) = (await one.tick(WEB1, POLL, 60, 5)).leases
        assert not after.held

    hosts_on(url, test)


def test_hosts_ticking_at_the_same_moment_never_share_a_lease(url: str) -> None:
    async def test(*stores: PostgresStore) -> None:
        hosts = [HostRecord(f"h{i}:{i}:00", f"h{i}", i, None, "settings-A") for i in range(4)]
        for store, host in zip(stores, hosts, strict=True):
            await store.join(host, 120)
        wanted = ["poll", "server:a", "server:b"]
        for _ in range(5):
            ticks = await asyncio.gather(
                *(s.tick(h, wanted, 60, 5) for s, h in zip(stores, hosts, strict=True))
            )
            for name in wanted:
                holders = [
                    (store, host)
                    for store, host, tick in zip(stores, hosts, ticks, strict=True)
                    for lease in tick.leases
                    if lease.name == name and lease.held
                ]
                assert len(holders) == 1, (name, holders)
                store, host = holders[0]
                assert await store.release(host, [name]) == [name]  # free for the next round

    hosts_on(url, test, count=4)


def test_a_host_with_other_settings_is_refused_while_the_fleet_runs(url: str) -> None:
    other = HostRecord("web-3:33:cc", "web-3", 33, "eu", "settings-B")

    async def test(one: PostgresStore, two: PostgresStore) -> None:
        first = await one.join(WEB1, 120)
        assert first.stored is None and not first.replaced
        await one.tick(WEB1, POLL, 60, 5)
        refused = await two.join(other, 120)
        assert refused.refused_by is not None and refused.refused_by.pid == 11
        assert refused.stored is not None and refused.stored.fingerprint == "settings-A"
        assert [h.pid for h in await two.hosts(300)] == [11]  # the refused one is not listed
        # Every host stopped: the new settings replace the fleet's.
        await one.release(WEB1)
        replaced = await two.join(other, 120)
        assert replaced.replaced and replaced.stored is not None
        assert (await two.fleet_settings()).fingerprint == "settings-B"  # type: ignore[union-attr]
        assert (await two.tick(other, POLL, 60, 5)).leases[0].held
        # A host with the old settings takes nothing, and learns why.
        again = HostRecord("web-1:12:dd", "web-1", 12, "eu", "settings-A")
        assert (await one.join(again, 120)).refused_by is not None  # web-3 is alive
        stale = await one.tick(WEB1, POLL, 60, 5)
        assert not stale.leases[0].held and stale.fingerprint == "settings-B"

    hosts_on(url, test)


def test_status_lists_each_host_with_its_leases(url: str) -> None:
    async def test(one: PostgresStore, two: PostgresStore) -> None:
        await one.join(WEB1, 120)
        await two.join(WEB2, 120)
        await one.tick(WEB1, ["poll", "server:lobby"], 60, 5)
        await two.tick(WEB2, ["poll", "server:arena"], 60, 5)
        listed = {h.hostname: h for h in await one.hosts(300)}
        assert list(listed["web-1"].holds) == ["poll", "server:lobby"]
        assert list(listed["web-2"].holds) == ["server:arena"]
        assert (listed["web-1"].site, listed["web-1"].stopped_at) == ("eu", None)
        await two.release(WEB2)
        stopped = {h.hostname: h for h in await one.hosts(300)}["web-2"]
        assert stopped.stopped_at is not None and list(stopped.holds) == []

    hosts_on(url, test)


def test_each_webhook_hint_is_taken_by_one_host_once(url: str) -> None:
    async def test(one: PostgresStore, two: PostgresStore) -> None:
        customers = [f"c{i}" for i in range(40)]
        for i, customer in enumerate(customers):
            await one.add_hint(customer, f"evt-{i}")
        await one.add_hint(None, "evt-new-items")
        taken: list[str | None] = []
        while True:
            a, b = await asyncio.gather(one.take_hints(7), two.take_hints(7))
            if not a and not b:
                break
            taken += a + b
        assert sorted(taken, key=str) == sorted([*customers, None], key=str)

    hosts_on(url, test)


@pytest.fixture
def elsewhere_url() -> Iterator[str]:
    with empty_schema() as url:
        yield url


def test_notifications_reach_the_other_hosts_of_the_same_schema_only(
    url: str, elsewhere_url: str
) -> None:
    async def test(one: PostgresStore, two: PostgresStore) -> None:
        heard: list[tuple[str, str]] = []
        arrived = asyncio.Event()

        def notice(kind: str, payload: str) -> None:
            heard.append((kind, payload))
            arrived.set()

        elsewhere = open_store(elsewhere_url)
        assert isinstance(elsewhere, PostgresStore)
        listening = await two.listen(notice)
        try:
            assert listening.alive
            await elsewhere.notify(JOURNAL, "not-ours")
            await one.notify(JOURNAL, "lobby")
            await asyncio.wait_for(arrived.wait(), 10)
            arrived.clear()
            await one.add_hint("c1", "evt-1")
            await asyncio.wait_for(arrived.wait(), 10)
        finally:
            await listening.close()
            await elsewhere.close()
        assert heard == [(JOURNAL, "lobby"), (HINTS, "")]

    hosts_on(url, test)
