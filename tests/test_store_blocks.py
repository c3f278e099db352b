"""Customer blocks under load, the per-customer locks, and the in-memory backend.

The contract itself (one suite for every backend) is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.diff import Mark, Phase
from daemon.state import (
    BACKENDS,
    CustomerChange,
    CustomerChanged,
    SeenItem,
    Store,
    StoreError,
    open_store,
)
from daemon.state import memory as memory_backend
from daemon.state.blocks import CustomerLocks
from daemon.state.memory import MemoryStore
from tests.test_store_contract import T0, entry, known, run_async, seen

# --- the locks ---------------------------------------------------------------------


@run_async
async def test_a_customer_lock_lives_only_while_a_block_holds_or_awaits_it() -> None:
    locks = CustomerLocks()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold(customer_id: str) -> None:
        async with locks.hold(customer_id):
            inside.set()
            await release.wait()

    first = asyncio.create_task(hold("100"))
    await inside.wait()
    waiting = asyncio.create_task(hold("100"))
    cancelled = asyncio.create_task(hold("100"))
    other = asyncio.create_task(hold("200"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(locks) == 2
    cancelled.cancel()  # a waiter that gives up does not keep the lock alive
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await asyncio.gather(first, waiting, other)
    assert len(locks) == 0


@run_async
async def test_a_block_that_raises_releases_its_customer() -> None:
    locks = CustomerLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold("100"):
            raise RuntimeError("boom")
    assert len(locks) == 0
    async with locks.hold("100"):
        assert len(locks) == 1


# --- the in-memory backend ------------------------------------------------------------


@run_async
async def test_the_memory_store_gives_other_tasks_a_turn_at_every_call() -> None:
    store = open_store("memory://turns")
    try:
        assert isinstance(store, MemoryStore)
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        for call in (store.get_meta("x"), store.rows(), store.totals(), store.links()):
            ran.clear()
            task = asyncio.create_task(other())
            await call
            assert ran == ["other"]
            await task
        # Inside a block too: at its start and at the commit.
        async with store.customer("100") as txn:
            task = asyncio.create_task(other())
            ran.clear()
            await txn.commit(CustomerChange(T0, seen=seen(("1", "active"))))
            assert ran == ["other"]
            await task
    finally:
        await store.close()
        memory_backend.forget("memory://turns")


@run_async
async def test_memory_stores_share_a_database_by_url_until_forgotten() -> None:
    a, b, c = (open_store(url) for url in ("memory://one", "memory://one", "memory://two"))
    await a.set_meta({"cursor": "1"})
    assert await b.get_meta("cursor") == "1"
    assert await c.get_meta("cursor") is None
    for store in (a, b, c):
        await store.close()
    with pytest.raises(StoreError, match="memory://one is closed"):
        await a.get_meta("cursor")
    assert await open_store("memory://one").get_meta("cursor") == "1"
    memory_backend.forget("memory://one")
    memory_backend.forget("memory://two")
    assert await open_store("memory://one").get_meta("cursor") is None
    memory_backend.forget("memory://one")


# --- no lost update ---------------------------------------------------------------------

CUSTOMERS = ["100", "200", "300"]

# Per task: which customer each of its increments goes to, and how many times
# it yields between reading the counter and committing it.
schedules = st.lists(
    st.lists(st.tuples(st.sampled_from(CUSTOMERS), st.integers(0, 3)), min_size=1, max_size=6),
    min_size=2,
    max_size=6,
)


async def increment(store: Store, customer_id: str, yields: int) -> int:
    """Read the customer's counter (the cycle of a mark), commit it plus one;
    start again when another store committed in between. The retries made."""
    item = f"{customer_id}-counter"
    retries = 0
    while True:
        try:
            async with store.customer(customer_id) as txn:
                count = txn.known.marks.get((item, "counter"), Mark(Phase.GRANTED, 0)).cycle
                for _ in range(yields):
                    await asyncio.sleep(0)
                await txn.commit(
                    CustomerChange(
                        T0,
                        seen=[SeenItem(item, "vip", "active")],
                        marks={(item, "counter"): Mark(Phase.GRANTED, count + 1)},
                        entries=[entry(item, "counter", customer_id=customer_id, cycle=count + 1)],
                    )
                )
                return retries
        except CustomerChanged:
            retries += 1


async def run_schedules(url: str, backend: str, tasks: list[list[tuple[str, int]]]) -> int:
    """Every task on one of two stores of one database; the retries made."""
    stores = [BACKENDS[backend](url), BACKENDS[backend](url)]

    async def run(n: int, steps: list[tuple[str, int]]) -> int:
        return sum([await increment(stores[n % 2], c, y) for c, y in steps])

    try:
        retries = sum(await asyncio.gather(*(run(n, steps) for n, steps in enumerate(tasks))))
        for customer_id in CUSTOMERS:
            wanted = sum(c == customer_id for steps in tasks for c, _ in steps)
            counter = (await known(stores[0], customer_id)).marks.get(
                (f"{customer_id}-counter", "counter")
            )
            assert (counter.cycle if counter else 0) == wanted, customer_id
            cycles = [r.cycle for r in await stores[0].rows() if r.customer_id == customer_id]
            assert sorted(cycles) == list(range(1, wanted + 1))  # one row per increment
        assert all(len(store._locks) == 0 for store in stores)  # type: ignore[attr-defined]
        return retries
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
def memory_url(tmp_path: Path) -> Iterator[str]:
    url = f"memory://{tmp_path}"
    yield url
    memory_backend.forget(url)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tasks=schedules)
def test_concurrent_read_modify_commits_lose_no_update(
    memory_url: str, tasks: list[list[tuple[str, int]]]
) -> None:
    memory_backend.forget(memory_url)  # each example starts empty
    asyncio.run(run_schedules(memory_url, "memory", tasks))


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_crowd_of_tasks_on_two_stores_loses_no_update(backend: str, tmp_path: Path) -> None:
    url = f"memory://{tmp_path}" if backend == "memory" else str(tmp_path / "state.sqlite3")
    tasks = [[(CUSTOMERS[(n + i) % 3], (n * i) % 4) for i in range(10)] for n in range(12)]
    try:
        retries = asyncio.run(run_schedules(url, backend, tasks))
    finally:
        memory_backend.forget(url)
    assert retries > 0  # the two stores did race; the compare-and-set caught each one
