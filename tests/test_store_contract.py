"""The contract of `daemon.state.Store`, run against every backend in `BACKENDS`.

The in-memory backend yields to the event loop at every call, so the tests of
customer blocks see the interleavings a networked database allows; two
stores opened on one database stand for two processes (or hosts).

PostgreSQL's tests each get an empty schema of the server tests/postgres_db.py
finds (skipped when none answers). Another backend needs a database to talk
to: give its URL in `PERKSYNC_TEST_<NAME>_URL`; each test must then start
from an empty database. Without it, that backend's tests skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.diff import Mark, Phase
from daemon.state import (
    BACKENDS,
    REPLY_LIMIT,
    CustomerChange,
    CustomerChanged,
    CustomerRecord,
    DueExpiry,
    Fence,
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    LeaseLost,
    LinkStatus,
    LinkSync,
    LiveItem,
    LiveItems,
    SeenItem,
    ServerCounts,
    Store,
    StoredItem,
    StoreError,
    Totals,
)
from daemon.state import memory as memory_backend
from daemon.state.shared import HostRecord, SharedStore
from tests.postgres_db import empty_schema

T = TypeVar("T")

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
LATER = T0 + timedelta(days=3650)

ALICE = CustomerRecord("Alice", '{"id": "100", "name": "Alice"}')
BOB = CustomerRecord("Bob", '{"id": "200", "name": "Bob"}')

Opener = Callable[[], Store]


def run_async(test: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async test function to completion (pytest-asyncio is not used),
    closing the stores its `opener` opened in the same event loop."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        async def run() -> T:
            try:
                return await test(*args, **kwargs)
            finally:
                opener = kwargs.get("opener")
                if isinstance(opener, _Opener):
                    await opener.close_all()

        return asyncio.run(run())

    return wrapper


@contextlib.contextmanager
def _database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of `backend`, for one test."""
    if backend == "sqlite":
        yield str(tmp_path / "state.sqlite3")
    elif backend == "memory":
        yield f"memory://{tmp_path}"
        memory_backend.forget(f"memory://{tmp_path}")
    elif backend == "postgres":
        with empty_schema() as url:
            yield url
    else:
        url = os.environ.get(f"PERKSYNC_TEST_{backend.upper()}_URL")
        if not url:
            pytest.skip(f"set PERKSYNC_TEST_{backend.upper()}_URL to test the {backend} backend")
        yield url


class _Opener:
    """Opens a store on one database each time it is called."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend, self.url = BACKENDS[backend], url
        self.opened: list[Store] = []

    def __call__(self) -> Store:
        store = self.backend(self.url)
        self.opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=sorted(BACKENDS))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on the same database each time it is called; closes them all after."""
    with _database(request.param, tmp_path) as url:
        open_ = _Opener(request.param, url)
        yield open_
        asyncio.run(open_.close_all())


# --- building blocks -------------------------------------------------------------


def seen(*items: tuple[str, str] | tuple[str, str, str]) -> list[SeenItem]:
    """(item id, state) or (item id, state, product); the product defaults to vip."""
    return [SeenItem(i[0], i[2] if len(i) == 3 else "vip", i[1]) for i in items]


def entry(
    item_id: str,
    server: str = "survival",
    event: str = "on_active",
    index: int = 0,
    *,
    customer_id: str = "100",
    cycle: int = 1,
    status: JournalStatus = JournalStatus.PENDING,
    reason: str | None = None,
) -> JournalEntry:
    return JournalEntry(
        customer_id=customer_id,
        item_id=item_id,
        product="vip",
        server=server,
        event=event,
        cycle=cycle,
        command_index=index,
        command=f"{event} {item_id} #{index} on {server}",
        status=status,
        reason=reason,
    )


def granted(*keys: tuple[str, str], cycle: int = 1) -> dict[tuple[str, str], Mark]:
    return {key: Mark(Phase.GRANTED, cycle) for key in keys}


def customer_json(**ids: object) -> str:
    return json.dumps({"id": "x", "name": "X", **ids})


async def commit(store: Store, customer_id: str, change: CustomerChange) -> list[int]:
    """One block that commits `change`."""
    async with store.customer(customer_id) as txn:
        return await txn.commit(change)


async def known(store: Store, customer_id: str) -> KnownCustomer:
    async with store.customer(customer_id) as txn:
        return txn.known


def link(label: str, digest: bytes | None = None) -> LinkSync:
    return LinkSync(label, digest)


async def first_pass(store: Store, *, synced_at: datetime = T0) -> list[int]:
    """Customer 100 ("Alice", link "alice") owns items 1 (active) and 2 (usable); item 1
    goes to two servers with two commands each."""
    return await commit(
        store,
        "100",
        CustomerChange(
            synced_at,
            ALICE,
            seen(("1", "active"), ("2", "usable")),
            granted(("1", "survival"), ("1", "jailbreak")),
            [
                entry("1", "survival", index=0),
                entry("1", "survival", index=1),
                entry("1", "jailbreak", index=0),
                entry("1", "jailbreak", index=1),
            ],
            link("alice"),
        ),
    )


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything observable about the stored customers."""
    return {
        "known 100": await known(store, "100"),
        "known 200": await known(store, "200"),
        "rows": await store.rows(),
        "links": await store.links(),
        "digests": await store.link_digests(),
        "server counts": await store.server_counts(),
        "pending survival": await store.unfinished("survival"),
        "pending jailbreak": await store.unfinished("jailbreak"),
        "due": await store.due_expiries(LATER),
        "baseline": await store.live_baseline(),
        "totals": await store.totals(),
        "live": await store.live_item_counts(["name"]),
    }


def ids(rows: list[JournalRow]) -> list[int]:
    return [row.id for row in rows]


def items_of(customer: KnownCustomer) -> set[str]:
    return set(customer.items)


# --- an empty store ----------------------------------------------------------------


@run_async
async def test_an_empty_store_knows_nothing(opener: Opener) -> None:
    store = opener()
    assert await known(store, "100") == KnownCustomer({}, {}, None, None)
    assert await store.unfinished("survival") == []
    assert await store.rows() == []
    assert await store.rows("survival") == []
    assert await store.links() == []
    assert await store.link_digests() == {}
    assert await store.server_counts() == []
    assert await store.pending_counts() == {}
    assert await store.due_expiries(LATER) == []
    baseline = await store.live_baseline()
    assert (dict(baseline.items), dict(baseline.customers)) == ({}, {})
    assert await store.totals() == Totals(customers=0, live_items=0)
    assert await store.live_item_counts(["steam_id"]) == []
    assert await store.get_meta("cursor") is None


@run_async
async def test_a_row_limit_under_one_is_refused(opener: Opener) -> None:
    store = opener()
    for zero in (
        store.unfinished("survival", limit=0),
        store.prune_journal(LATER, 0),
        store.journal(limit=0),
    ):
        with pytest.raises(ValueError, match="limit must be at least 1, not 0"):
            await zero
    assert await store.journal(limit=None) == []


# --- committing and knowing ------------------------------------------------------------


@run_async
async def test_a_commit_then_known_returns_the_items_marks_and_customer(opener: Opener) -> None:
    store = opener()
    await first_pass(store)

    alice = await known(store, "100")
    assert dict(alice.items) == {
        "1": StoredItem("vip", "active", None, None),
        "2": StoredItem("vip", "usable", None, None),
    }
    assert dict(alice.marks) == {
        ("1", "survival"): Mark(Phase.GRANTED, 1),
        ("1", "jailbreak"): Mark(Phase.GRANTED, 1),
    }
    assert (alice.customer_raw, alice.customer_digest) == (ALICE.raw, None)
    assert await known(store, "200") == KnownCustomer({}, {}, None, None)
    assert await store.links() == [LinkStatus("alice", "100", "Alice", T0, None, None)]


@run_async
async def test_a_later_commit_updates_only_the_marks_it_names(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    # Item 1 is used up: its grant on survival ends; jailbreak's mark is not in the
    # commit (unchanged) and must stay. Item 3 is new, without any mark.
    await commit(
        store,
        "100",
        CustomerChange(
            T1,
            CustomerRecord("Alice B.", '{"id": "100", "name": "Alice B."}'),
            seen(("1", "used"), ("2", "usable"), ("3", "usable")),
            {("1", "survival"): Mark(Phase.ENDED, 1)},
            [entry("1", "survival", "on_expire")],
            link("alice"),
        ),
    )
    alice = await known(store, "100")
    assert items_of(alice) == {"1", "2", "3"}
    assert alice.items["1"].state == "used"
    assert dict(alice.marks) == {
        ("1", "survival"): Mark(Phase.ENDED, 1),
        ("1", "jailbreak"): Mark(Phase.GRANTED, 1),
    }
    assert await store.links() == [LinkStatus("alice", "100", "Alice B.", T1, None, None)]


@run_async
async def test_a_mark_may_name_an_item_stored_by_an_earlier_commit(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    # A commit that lists no items but re-grants item 1 (a later cycle).
    await commit(store, "100", CustomerChange(T1, marks=granted(("1", "survival"), cycle=2)))
    assert (await known(store, "100")).marks[("1", "survival")] == Mark(Phase.GRANTED, 2)


@run_async
async def test_a_mark_may_not_name_an_item_of_another_customer(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    before = await snapshot(store)
    with pytest.raises(StoreError, match=r"item 1 .*customer 200"):
        await commit(
            store, "200", CustomerChange(T1, BOB, seen(("9", "active")), granted(("1", "lobby")))
        )
    assert await snapshot(store) == before


@run_async
async def test_customers_are_kept_apart(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    await commit(
        store,
        "200",
        CustomerChange(
            T1,
            CustomerRecord(None, '{"id": "200"}'),
            seen(("9", "active", "mvp")),
            granted(("9", "survival")),
            [entry("9", customer_id="200")],
            link("bob"),
        ),
    )
    assert items_of(await known(store, "100")) == {"1", "2"}
    bob = await known(store, "200")
    assert dict(bob.items) == {"9": StoredItem("mvp", "active", None, None)}
    assert dict(bob.marks) == {("9", "survival"): Mark(Phase.GRANTED, 1)}
    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", T0, None, None),
        LinkStatus("bob", "200", None, T1, None, None),
    ]


@run_async
async def test_known_tells_each_items_product_state_expiry_read_time_and_json(
    opener: Opener,
) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T1,
            seen=[
                SeenItem("1", "vip", "active", T2, '{"id": "1"}', T0),
                SeenItem("2", "kit", "usable", None, None, T0),
                SeenItem("3", "vip", "renewed", T2, None, None),
            ],
        ),
    )
    assert dict((await known(store, "100")).items) == {
        "1": StoredItem("vip", "active", T2, T0, '{"id": "1"}'),
        "2": StoredItem("kit", "usable", None, T0),
        "3": StoredItem("vip", "renewed", T2, None),
    }
    # Each commit stores the read time it is given: which answer is newer is
    # the caller's decision, made on `known`.
    await commit(
        store, "100", CustomerChange(T2, seen=[SeenItem("1", "vip", "used", None, None, T1)])
    )
    # A commit without the item's JSON keeps the stored JSON.
    assert (await known(store, "100")).items["1"] == StoredItem(
        "vip", "used", None, T1, '{"id": "1"}'
    )


@run_async
async def test_a_commit_replaces_the_customer_row_only_when_given(opener: Opener) -> None:
    store = opener()
    await commit(store, "100", CustomerChange(T0, CustomerRecord("Alice", '{"a": 1}', b"c1")))
    await commit(store, "100", CustomerChange(T1, seen=seen(("1", "active")), link=link("alice")))
    alice = await known(store, "100")
    assert (alice.customer_raw, alice.customer_digest) == ('{"a": 1}', b"c1")
    assert (await store.links())[0].name == "Alice"

    (live,) = await store.live_item_counts(["a"])
    assert live.ids == frozenset({"a"})

    await commit(store, "100", CustomerChange(T2, CustomerRecord(None, '{"a": null}')))
    alice = await known(store, "100")
    assert (alice.customer_raw, alice.customer_digest) == ('{"a": null}', None)
    assert (await store.links())[0].name is None
    assert items_of(alice) == {"1"}
    (live,) = await store.live_item_counts(["a"])
    assert live.ids == frozenset()


# --- the journal ---------------------------------------------------------------------


@run_async
async def test_journal_ids_grow_in_insertion_order(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    assert len(first) == 4
    assert first == sorted(first)
    assert len(set(first)) == 4
    second = await commit(
        store,
        "200",
        CustomerChange(
            T1,
            BOB,
            seen(("9", "active")),
            granted(("9", "survival")),
            [entry("9", "survival", index=1, customer_id="200"), entry("9", customer_id="200")],
        ),
    )
    assert len(second) == 2
    assert min(second) > max(first)
    assert second[0] < second[1]  # entry order, not key order

    rows = await store.rows()
    assert ids(rows) == first + second
    # The rows hold what was journaled.
    assert rows[0] == JournalRow(
        id=first[0],
        customer_id="100",
        item_id="1",
        product="vip",
        server="survival",
        event="on_active",
        cycle=1,
        command_index=0,
        command="on_active 1 #0 on survival",
        status=JournalStatus.PENDING,
        reason=None,
        attempts=0,
        created_at=T0,
        finished_at=None,
    )
    assert [(r.item_id, r.server, r.command_index) for r in rows] == [
        ("1", "survival", 0),
        ("1", "survival", 1),
        ("1", "jailbreak", 0),
        ("1", "jailbreak", 1),
        ("9", "survival", 1),
        ("9", "survival", 0),
    ]
    assert ids(await store.rows("jailbreak")) == first[2:]
    assert ids(await store.rows("survival")) == first[:2] + second


@run_async
async def test_pending_filters_by_server_after_id_and_limit(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    survival = [first[0], first[1]]
    jailbreak = [first[2], first[3]]

    assert ids(await store.unfinished("survival")) == survival
    assert ids(await store.unfinished("jailbreak")) == jailbreak
    assert await store.unfinished("nowhere") == []
    assert ids(await store.unfinished("survival", after_id=survival[0])) == survival[1:]
    assert await store.unfinished("survival", after_id=survival[1]) == []
    assert ids(await store.unfinished("survival", limit=1)) == survival[:1]
    assert ids(await store.unfinished("jailbreak", after_id=0, limit=5)) == jailbreak
    pending = await store.unfinished("survival")
    assert all(r.server == "survival" and r.status is JournalStatus.PENDING for r in pending)


@run_async
async def test_pending_pages_through_a_long_journal_in_id_order(opener: Opener) -> None:
    store = opener()
    all_ids: list[int] = []
    for n in range(12):
        item = str(1000 + n)
        all_ids += await commit(
            store,
            str(n),
            CustomerChange(
                T0,
                seen=seen((item, "active")),
                marks=granted((item, "survival"), (item, "jailbreak")),
                entries=[
                    entry(item, server, index=i, customer_id=str(n))
                    for i in range(50)
                    for server in ("survival", "jailbreak")
                ],
                link=link(f"customer {n}"),
            ),
        )
    expected = [r.id for r in await store.rows("survival")]
    assert len(expected) == 600

    paged: list[int] = []
    after = 0
    while page := await store.unfinished("survival", after_id=after, limit=250):
        assert len(page) <= 250
        paged += ids(page)
        after = page[-1].id
    assert paged == expected
    assert paged == sorted(paged)


@run_async
async def test_recommitting_the_same_change_journals_nothing_new(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    before = await store.rows()

    assert await first_pass(store, synced_at=T1) == []
    after = await store.rows()
    assert after == before  # not re-inserted, and the old rows are untouched
    assert (await store.links())[0].last_synced_at == T1  # the rest of the commit did apply
    assert ids(await store.unfinished("survival")) == first[:2]


@run_async
async def test_only_the_new_entries_of_a_commit_get_ids(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    new = await commit(
        store,
        "100",
        CustomerChange(
            T1,
            seen=seen(("1", "used")),
            marks={("1", "survival"): Mark(Phase.ENDED, 1)},
            entries=[
                entry("1", "survival", index=0),  # already journaled
                entry("1", "survival", "on_expire", 0),  # new
                entry("1", "survival", "on_active", 0, cycle=2),  # a new cycle is new
                entry("1", "survival", "on_expire", 0),  # twice in the same commit
            ],
        ),
    )
    assert len(new) == 2
    rows = await store.rows()
    assert ids(rows) == first + new
    assert [(r.event, r.cycle) for r in rows[-2:]] == [("on_expire", 1), ("on_active", 2)]


@run_async
async def test_attempts_and_outcomes(opener: Opener) -> None:
    store = opener()
    a, b, c, d = await first_pass(store)

    await store.mark_attempt(a)
    await store.mark_attempt(a)
    await store.mark_attempt(b)
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].attempts, rows[b].attempts, rows[c].attempts) == (2, 1, 0)
    assert rows[a].status is JournalStatus.PENDING  # an attempt is not an outcome

    await store.mark_delivered(a, T1)
    await store.mark_failed(c, "command too long", T2)
    rows = {r.id: r for r in await store.rows()}
    assert rows[a].status is JournalStatus.DELIVERED
    assert rows[a].finished_at == T1
    assert rows[a].reason is None
    assert rows[a].attempts == 2
    assert rows[c].status is JournalStatus.FAILED
    assert rows[c].reason == "command too long"
    assert rows[c].finished_at == T2
    assert rows[b].status is JournalStatus.PENDING
    assert rows[b].finished_at is None

    # Delivered and failed rows leave pending().
    assert ids(await store.unfinished("survival")) == [b]
    assert ids(await store.unfinished("jailbreak")) == [d]
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=1, failed=1, skipped=0, delivered=0),
        ServerCounts("survival", pending=1, failed=0, skipped=0, delivered=1),
    ]


@run_async
async def test_attempts_counted_side_by_side_are_all_counted(opener: Opener) -> None:
    store = opener()
    a, *_ = await first_pass(store)
    await asyncio.gather(*(store.mark_attempt(a) for _ in range(5)))
    assert (await store.rows())[0].attempts == 5


@run_async
async def test_a_finished_row_keeps_its_first_outcome(opener: Opener) -> None:
    store = opener()
    a, _, c, _ = await first_pass(store)
    await store.mark_delivered(a, T1)
    await store.mark_failed(c, "unsafe value", T1)

    await store.mark_failed(a, "late", T2)
    await store.mark_delivered(c, T2)
    await store.mark_attempt(a)
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].status, rows[a].finished_at, rows[a].reason, rows[a].attempts) == (
        JournalStatus.DELIVERED,
        T1,
        None,
        0,
    )
    assert (rows[c].status, rows[c].finished_at, rows[c].reason) == (
        JournalStatus.FAILED,
        T1,
        "unsafe value",
    )


@run_async
async def test_an_unknown_row_id_is_an_error(opener: Opener) -> None:
    store = opener()
    ids_ = await first_pass(store)
    missing = max(ids_) + 1000
    with pytest.raises(StoreError):
        await store.mark_attempt(missing)
    with pytest.raises(StoreError):
        await store.mark_delivered(missing, T1)
    with pytest.raises(StoreError):
        await store.mark_failed(missing, "x", T1)
    assert all(r.status is JournalStatus.PENDING for r in await store.rows())


@run_async
async def test_a_waiting_row_stays_unfinished_and_an_attempt_makes_it_pending(
    opener: Opener,
) -> None:
    store = opener()
    a, b, c, _ = await first_pass(store)
    await store.mark_waiting(a, "for the player")
    await store.mark_waiting(b, f"behind row {a}")
    await store.mark_waiting(b, f"behind row {a}")  # again: the same
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].status, rows[a].reason, rows[a].finished_at) == (
        JournalStatus.WAITING,
        "for the player",
        None,
    )
    assert (rows[b].status, rows[b].reason) == (JournalStatus.WAITING, f"behind row {a}")
    # Waiting rows are still delivery's to do, but not pending (no exit 3 for them).
    assert ids(await store.unfinished("survival")) == [a, b]
    assert await store.pending_counts() == {"jailbreak": 2}
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=2, failed=0, skipped=0, delivered=0),
        ServerCounts("survival", pending=0, failed=0, skipped=0, delivered=0, waiting=2),
    ]

    await store.mark_attempt(a)
    row = {r.id: r for r in await store.rows()}[a]
    assert (row.status, row.reason, row.attempts) == (JournalStatus.PENDING, None, 1)
    await store.mark_waiting(a, "for the player")  # the server said the player left
    await store.mark_delivered(b, T1, "ok")  # a waiting row may be delivered as it is
    await store.mark_failed(c, "too long", T1)
    await store.mark_waiting(b, "late")  # a finished row keeps its outcome
    await store.mark_waiting(c, "late")
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].status, rows[a].attempts) == (JournalStatus.WAITING, 1)
    assert (rows[b].status, rows[b].reason, rows[b].reply) == (JournalStatus.DELIVERED, None, "ok")
    assert (rows[c].status, rows[c].reason) == (JournalStatus.FAILED, "too long")


@run_async
async def test_replies_are_kept_cut_to_the_limit(opener: Opener) -> None:
    store = opener()
    a, b, c, d = await first_pass(store)
    long_reply = "é" * REPLY_LIMIT + "and more"
    await store.mark_delivered(a, T1, long_reply)
    await store.mark_delivered(b, T1, "")
    await store.mark_delivered(c, T1)
    await store.mark_waiting(d, "until later")
    await store.mark_delivered(d, T1, "There are 0 of a max of 20 players online: ")
    replies = [r.reply for r in await store.rows()]
    assert replies == ["é" * REPLY_LIMIT, "", None, "There are 0 of a max of 20 players online: "]


@run_async
async def test_a_rejected_row_is_finished_with_its_reply_and_never_unfinished(
    opener: Opener,
) -> None:
    store = opener()
    a, b, c, d = await first_pass(store)
    reply = "Unknown or incomplete command, see below for errorlp usr x<--[HERE]"
    await store.mark_attempt(a)
    await store.mark_rejected(a, reply, "an error reply (Unknown or incomplete command)", T1)
    await store.mark_waiting(c, "for the player")
    await store.mark_rejected(c, "x" * (REPLY_LIMIT + 1), "error", T2)
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].status, rows[a].reply, rows[a].reason, rows[a].finished_at) == (
        JournalStatus.REJECTED,
        reply,
        "an error reply (Unknown or incomplete command)",
        T1,
    )
    assert rows[a].attempts == 1
    assert (rows[c].status, rows[c].reply) == (JournalStatus.REJECTED, "x" * REPLY_LIMIT)
    assert ids(await store.unfinished("survival")) == [b]
    assert ids(await store.unfinished("jailbreak")) == [d]
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=1, failed=0, skipped=0, delivered=0, rejected=1),
        ServerCounts("survival", pending=1, failed=0, skipped=0, delivered=0, rejected=1),
    ]
    # Its first outcome stands.
    await store.mark_delivered(a, T2, "fine")
    await store.mark_attempt(a)
    await store.mark_rejected(b, "no", "error", T2)
    await store.mark_rejected(b, "again", "error", T2)
    rows = {r.id: r for r in await store.rows()}
    assert (rows[a].status, rows[a].reply, rows[a].attempts) == (JournalStatus.REJECTED, reply, 1)
    assert (rows[b].status, rows[b].reply) == (JournalStatus.REJECTED, "no")


@run_async
async def test_marking_an_unknown_row_waiting_or_rejected_is_an_error(opener: Opener) -> None:
    store = opener()
    missing = max(await first_pass(store)) + 1000
    with pytest.raises(StoreError):
        await store.mark_waiting(missing, "for the player")
    with pytest.raises(StoreError):
        await store.mark_rejected(missing, "Unknown command", "error", T1)
    assert all(r.status is JournalStatus.PENDING for r in await store.rows())


@run_async
async def test_failed_and_skipped_entries_are_never_pending(opener: Opener) -> None:
    store = opener()
    new = await commit(
        store,
        "100",
        CustomerChange(
            T0,
            ALICE,
            seen(("1", "active")),
            granted(("1", "survival")),
            [
                entry(
                    "1", index=0, status=JournalStatus.SKIPPED, reason="customer.steam_id is null"
                ),
                entry("1", index=1),
                entry("1", index=2, status=JournalStatus.FAILED, reason="newline in item.note"),
            ],
        ),
    )
    assert len(new) == 3
    assert ids(await store.unfinished("survival")) == [new[1]]
    skipped, pending, failed = await store.rows()
    assert (skipped.status, skipped.reason, skipped.finished_at) == (
        JournalStatus.SKIPPED,
        "customer.steam_id is null",
        T0,
    )
    assert (failed.status, failed.reason, failed.finished_at) == (
        JournalStatus.FAILED,
        "newline in item.note",
        T0,
    )
    assert (pending.status, pending.finished_at) == (JournalStatus.PENDING, None)
    assert await store.server_counts() == [
        ServerCounts("survival", pending=1, failed=1, skipped=1, delivered=0)
    ]


@run_async
async def test_pending_counts_only_count_pending_rows(opener: Opener) -> None:
    store = opener()
    assert await store.pending_counts() == {}
    ids_ = await first_pass(store)
    assert await store.pending_counts() == {"survival": 2, "jailbreak": 2}
    await store.mark_delivered(ids_[0], T1)
    await store.mark_failed(ids_[2], "no", T1)
    await store.mark_delivered(ids_[3], T1)
    assert await store.pending_counts() == {"survival": 1}


# --- links, errors, counts -----------------------------------------------------------


@run_async
async def test_record_link_error_keeps_the_last_sync_and_a_later_commit_clears_it(
    opener: Opener,
) -> None:
    store = opener()
    await first_pass(store)
    await store.record_link_error("alice", "HTTP 503 from PayNow", T1)
    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", T0, "HTTP 503 from PayNow", T1),
    ]
    await store.record_link_error("alice", "timed out", T2)
    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", T0, "timed out", T2),
    ]
    # The items and marks are untouched by an error.
    assert items_of(await known(store, "100")) == {"1", "2"}

    later = T2 + timedelta(minutes=1)
    await first_pass(store, synced_at=later)
    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", later, None, None),
    ]


@run_async
async def test_an_error_on_a_link_never_synced_lists_it_without_customer(opener: Opener) -> None:
    store = opener()
    label = "token_file /etc/perksync/tokens/bob"
    await store.record_link_error(label, "HTTP 401", T0)
    assert await store.links() == [LinkStatus(label, None, None, None, "HTTP 401", T0)]
    await commit(store, "200", CustomerChange(T1, BOB, link=link(label)))
    assert await store.links() == [LinkStatus(label, "200", "Bob", T1, None, None)]


@run_async
async def test_links_and_server_counts(opener: Opener) -> None:
    store = opener()
    await commit(
        store,
        "300",
        CustomerChange(
            T0,
            CustomerRecord("Zed", '{"id": "300"}'),
            seen(("7", "active")),
            granted(("7", "lobby")),
            [entry("7", "lobby", customer_id="300")],
            link("zed"),
        ),
    )
    a, b, c, d = await first_pass(store, synced_at=T1)
    await store.record_link_error("carol", "HTTP 403", T2)
    await commit(
        store,
        "200",
        CustomerChange(
            T2,
            BOB,
            seen(("9", "active")),
            granted(("9", "jailbreak")),
            [
                entry(
                    "9", "jailbreak", customer_id="200", status=JournalStatus.SKIPPED, reason="-"
                ),
                entry("9", "jailbreak", index=1, customer_id="200"),
            ],
            link("bob"),
        ),
    )
    await store.mark_delivered(a, T2)
    await store.mark_delivered(b, T2)
    await store.mark_failed(c, "too long", T2)

    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", T1, None, None),
        LinkStatus("bob", "200", "Bob", T2, None, None),
        LinkStatus("carol", None, None, None, "HTTP 403", T2),
        LinkStatus("zed", "300", "Zed", T0, None, None),
    ]
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=2, failed=1, skipped=1, delivered=0),
        ServerCounts("lobby", pending=1, failed=0, skipped=0, delivered=0),
        ServerCounts("survival", pending=0, failed=0, skipped=0, delivered=2),
    ]
    assert ids(await store.unfinished("jailbreak")) == [d, (await store.rows())[-1].id]


@run_async
async def test_a_commit_of_only_a_link_records_the_sync_and_nothing_else(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    await store.record_link_error("alice", "HTTP 503", T1)
    before = await snapshot(store)
    await commit(store, "100", CustomerChange(T2, link=link("alice", b"d")))
    assert await store.links() == [LinkStatus("alice", "100", "Alice", T2, None, None)]
    assert await store.link_digests() == {"alice": b"d"}
    after = await snapshot(store)
    for key in ("links", "digests"):
        del before[key], after[key]
    assert after == before


@run_async
async def test_link_digests_follow_the_commits_of_their_customer(opener: Opener) -> None:
    store = opener()
    await commit(
        store, "100", CustomerChange(T0, ALICE, seen(("1", "active")), link=link("alice", b"a1"))
    )
    await commit(store, "200", CustomerChange(T0, BOB, link=link("bob", b"b1")))
    await store.record_link_error("carol", "HTTP 503", T0)  # no commit: no digest
    assert await store.link_digests() == {"alice": b"a1", "bob": b"b1"}
    # A second link of the same customer: each link keeps its own.
    await commit(store, "100", CustomerChange(T1, link=link("alice-2", b"a2")))
    assert await store.link_digests() == {"alice": b"a1", "alice-2": b"a2", "bob": b"b1"}
    # A commit through a link stores that link's digest, even none.
    await commit(store, "100", CustomerChange(T1, link=link("alice")))
    assert await store.link_digests() == {"alice-2": b"a2", "bob": b"b1"}
    # Errors and unchanged polls leave digests alone.
    await store.record_link_error("alice-2", "HTTP 503", T1)
    await store.record_unchanged({"bob": T2})
    assert await store.link_digests() == {"alice-2": b"a2", "bob": b"b1"}
    # A commit without a link (the expiry sweep, a store-mode read) drops the
    # digests of every link of its customer, and only of its customer.
    await commit(store, "100", CustomerChange(T2, marks=granted(("1", "survival"))))
    assert await store.link_digests() == {"bob": b"b1"}
    assert await opener().link_digests() == {"bob": b"b1"}


@run_async
async def test_record_unchanged_sets_the_sync_time_and_clears_the_error_only(
    opener: Opener,
) -> None:
    store = opener()
    await first_pass(store)
    await commit(store, "200", CustomerChange(T0, BOB, link=link("bob", b"b1")))
    await store.record_link_error("alice", "HTTP 503", T1)
    before = await snapshot(store)
    await store.record_unchanged({"alice": T2, "bob": T1, "nobody": T2})
    assert await store.links() == [
        LinkStatus("alice", "100", "Alice", T2, None, None),
        LinkStatus("bob", "200", "Bob", T1, None, None),
    ]  # "nobody" has no link row: ignored, not created
    after = await snapshot(store)
    del before["links"], after["links"]
    assert after == before
    assert await store.link_digests() == {"bob": b"b1"}
    await store.record_unchanged({})


# --- times -------------------------------------------------------------------------


@run_async
async def test_times_come_back_as_utc(opener: Opener) -> None:
    store = opener()
    berlin = timezone(timedelta(hours=2))
    (row_id,) = await commit(
        store,
        "100",
        CustomerChange(
            T0.astimezone(berlin),
            CustomerRecord(None, "{}"),
            [SeenItem("1", "vip", "active", T1.astimezone(berlin), "{}", T0.astimezone(berlin))],
            granted(("1", "s")),
            [entry("1", "s")],
            link("alice"),
        ),
    )
    await store.mark_delivered(row_id, T1.astimezone(berlin))
    await store.record_link_error("bob", "x", T2.astimezone(berlin))
    (row,) = await store.rows()
    alice, bob = await store.links()
    item = (await known(store, "100")).items["1"]
    (due,) = await store.due_expiries(T2.astimezone(berlin))
    (live,) = (await store.live_baseline()).items.values()
    for value, expected in [
        (row.created_at, T0),
        (row.finished_at, T1),
        (alice.last_synced_at, T0),
        (bob.last_error_at, T2),
        (item.expires_at, T1),
        (item.read_at, T0),
        (due.expires_at, T1),
        (live.expires_at, T1),
    ]:
        assert value == expected
        assert value is not None and value.utcoffset() == timedelta(0)


@run_async
async def test_naive_times_are_refused(opener: Opener) -> None:
    store = opener()
    naive = datetime(2024, 5, 1, 12, 0)
    for change in [
        CustomerChange(naive, ALICE, seen(("1", "active")), link=link("alice")),
        CustomerChange(T0, ALICE, [SeenItem("1", "vip", "active", naive)]),
        CustomerChange(T0, ALICE, [SeenItem("1", "vip", "active", T1, None, naive)]),
    ]:
        with pytest.raises(ValueError):
            await commit(store, "100", change)
    with pytest.raises(ValueError):
        await store.record_link_error("alice", "x", naive)
    with pytest.raises(ValueError):
        await store.record_unchanged({"alice": naive})
    with pytest.raises(ValueError):
        await store.due_expiries(naive)
    with pytest.raises(ValueError):
        await store.remember_webhook("evt", naive, T0)
    with pytest.raises(ValueError):
        await store.remember_webhook("evt", T0, naive)
    assert await store.links() == []
    assert await store.totals() == Totals(customers=0, live_items=0)
    assert await known(store, "100") == await known(opener(), "nobody")
    assert await store.remember_webhook("evt", T0, T0)  # not remembered by the refused call


# --- atomicity -------------------------------------------------------------------------


def _bad_changes() -> list[tuple[str, dict[str, Any]]]:
    """Commits that break the contract midway: after the customer, the link and
    the items were written, a mark or a journal entry cannot be stored."""
    ok_items = seen(("5", "active"), ("6", "active"))
    return [
        (
            "a mark for an item neither seen nor stored",
            {"seen": ok_items, "marks": granted(("5", "survival"), ("nope", "survival"))},
        ),
        (
            "a mark with cycle 0",
            {"seen": ok_items, "marks": granted(("5", "survival"), cycle=0)},
        ),
        (
            "a mark with an unknown phase",
            {"seen": ok_items, "marks": {("5", "survival"): Mark("bogus", 1)}},  # type: ignore[arg-type]
        ),
        (
            "an entry with an unknown status",
            {
                "seen": ok_items,
                "marks": granted(("5", "survival")),
                "entries": [entry("5"), entry("5", index=1, status="bogus")],  # type: ignore[arg-type]
            },
        ),
        (
            "an entry with cycle 0",
            {
                "seen": ok_items,
                "marks": granted(("5", "survival")),
                "entries": [entry("5"), entry("6", cycle=0)],
            },
        ),
    ]


@pytest.mark.parametrize(
    "bad", [b for _, b in _bad_changes()], ids=[name for name, _ in _bad_changes()]
)
@run_async
async def test_a_commit_that_fails_midway_leaves_nothing_behind(
    opener: Opener, bad: dict[str, Any]
) -> None:
    store = opener()
    await first_pass(store)
    await commit(store, "100", CustomerChange(T0, link=link("alice", b"a1")))
    await store.record_link_error("alice", "HTTP 500", T1)
    before = await snapshot(store)

    for customer, label in (("100", "alice"), ("200", "bob")):  # an existing customer, a new one
        with pytest.raises(StoreError):
            await commit(
                store,
                customer,
                CustomerChange(
                    T2,
                    CustomerRecord("Changed", '{"changed": true}', b"x"),
                    bad["seen"],
                    bad["marks"],
                    bad.get("entries", []),
                    link(label, b"new"),
                ),
            )
        assert await snapshot(store) == before

    # And the store is not left inside a transaction, nor the customer held:
    # the next commit works.
    new = await commit(
        store,
        "200",
        CustomerChange(
            T2, BOB, seen(("5", "active")), granted(("5", "survival")), [entry("5")], link("bob")
        ),
    )
    assert len(new) == 1
    assert items_of(await known(store, "200")) == {"5"}


@run_async
async def test_an_exception_inside_a_block_stores_nothing_and_frees_the_customer(
    opener: Opener,
) -> None:
    store = opener()
    await first_pass(store)
    before = await snapshot(store)
    with pytest.raises(RuntimeError, match="decided badly"):
        async with store.customer("100") as txn:
            assert items_of(txn.known) == {"1", "2"}
            raise RuntimeError("decided badly")
    assert await snapshot(store) == before
    await commit(store, "100", CustomerChange(T1, seen=seen(("3", "active"))))
    assert items_of(await known(store, "100")) == {"1", "2", "3"}


@run_async
async def test_a_block_commits_at_most_once(opener: Opener) -> None:
    store = opener()
    async with store.customer("100") as txn:
        await txn.commit(CustomerChange(T0, seen=seen(("1", "active"))))
        with pytest.raises(StoreError, match="second commit"):
            await txn.commit(CustomerChange(T1, seen=seen(("2", "active"))))
    with pytest.raises(StoreError, match="after its block ended"):
        await txn.commit(CustomerChange(T1, seen=seen(("3", "active"))))
    assert items_of(await known(store, "100")) == {"1"}

    # A failed commit counts too: the block is left, and a new one decides again.
    async with store.customer("100") as txn:
        with pytest.raises(StoreError):
            await txn.commit(CustomerChange(T1, marks=granted(("nope", "s"))))
        with pytest.raises(StoreError, match="second commit"):
            await txn.commit(CustomerChange(T1, seen=seen(("2", "active"))))
    assert items_of(await known(store, "100")) == {"1"}


# --- one customer at a time -----------------------------------------------------------


@run_async
async def test_blocks_for_one_customer_never_interleave(opener: Opener) -> None:
    store = opener()
    order: list[str] = []
    first_inside = asyncio.Event()

    async def first() -> None:
        async with store.customer("100") as txn:
            order.append("first in")
            first_inside.set()
            for _ in range(50):  # every chance for the second block to cut in
                await asyncio.sleep(0)
            await txn.commit(CustomerChange(T0, seen=seen(("1", "active"))))
            order.append("first committed")

    async def second() -> set[str]:
        await first_inside.wait()
        async with store.customer("100") as txn:
            order.append("second in")
            read = items_of(txn.known)
            await txn.commit(CustomerChange(T1, seen=seen(("2", "active"))))
        return read

    _, read_by_second = await asyncio.gather(first(), second())
    assert order == ["first in", "first committed", "second in"]
    assert read_by_second == {"1"}  # the second block decided on the first one's commit
    assert items_of(await known(store, "100")) == {"1", "2"}


@run_async
async def test_blocks_for_different_customers_run_side_by_side(opener: Opener) -> None:
    store = opener()
    inside = {"100": asyncio.Event(), "200": asyncio.Event()}

    async def block(customer_id: str, other: str) -> list[int]:
        async with store.customer(customer_id) as txn:
            inside[customer_id].set()
            await inside[other].wait()  # both blocks are open at once
            return await txn.commit(
                CustomerChange(
                    T0, seen=seen((f"{customer_id}-1", "active")),
                    entries=[entry(f"{customer_id}-1", customer_id=customer_id)],
                )
            )  # fmt: skip

    tasks = [asyncio.create_task(block("100", "200")), asyncio.create_task(block("200", "100"))]
    entered = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in inside.values())))
    # A networked backend takes real time to read `known`: the bound only ends
    # the wait of a broken backend, whose two blocks would wait for each other.
    await asyncio.wait([entered], timeout=30)
    both_inside = entered.done()
    if not both_inside:
        entered.cancel()
        for task in tasks:
            task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert both_inside, "a block for one customer kept another customer's block out"
    assert [len(r) for r in results if isinstance(r, list)] == [1, 1]


@run_async
async def test_a_commit_on_a_stale_read_raises_customer_changed_and_stores_nothing(
    opener: Opener,
) -> None:
    here, there = opener(), opener()  # two processes on one database
    await first_pass(here)
    await commit(here, "100", CustomerChange(T0, link=link("alice", b"a1")))
    async with here.customer("100") as stale:
        async with there.customer("100") as fresh:
            await fresh.commit(
                CustomerChange(
                    T1,
                    seen=seen(("1", "used")),
                    marks={("1", "survival"): Mark(Phase.ENDED, 1)},
                    entries=[entry("1", event="on_expire")],
                )
            )
        before = await snapshot(there)
        with pytest.raises(CustomerChanged, match="customer 100"):
            await stale.commit(
                CustomerChange(
                    T2,
                    CustomerRecord("Stale", '{"stale": true}', b"s"),
                    seen(("1", "active"), ("3", "active")),
                    granted(("1", "survival"), ("3", "survival"), cycle=2),
                    [entry("1", cycle=2), entry("3")],
                    link("alice", b"stale"),
                )
            )
    assert await snapshot(here) == before
    assert await snapshot(there) == before
    # A new block reads the other's commit, and may commit on it.
    async with here.customer("100") as txn:
        assert txn.known.marks[("1", "survival")] == Mark(Phase.ENDED, 1)
        assert len(await txn.commit(CustomerChange(T2, entries=[entry("1", cycle=2)]))) == 1


@run_async
async def test_two_first_commits_for_a_new_customer_let_one_through(opener: Opener) -> None:
    here, there = opener(), opener()
    async with here.customer("300") as late:
        async with there.customer("300") as early:
            assert early.known == late.known == KnownCustomer({}, {}, None, None)
            await early.commit(
                CustomerChange(
                    T0, CustomerRecord("Carol", "{}"), seen(("8", "active")),
                    granted(("8", "survival")), [entry("8", customer_id="300")], link("carol"),
                )
            )  # fmt: skip
        before = await snapshot(here)
        with pytest.raises(CustomerChanged):
            await late.commit(
                CustomerChange(
                    T1, CustomerRecord("Late", "{}"), seen(("9", "active")),
                    granted(("9", "survival")), [entry("9", customer_id="300")], link("late"),
                )
            )  # fmt: skip
    assert await snapshot(here) == before
    assert items_of(await known(here, "300")) == {"8"}
    assert [r.item_id for r in await here.rows()] == ["8"]
    assert [s.label for s in await here.links()] == ["carol"]


@run_async
async def test_an_item_seen_under_another_customer_moves_with_a_warning(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    store = opener()
    other = opener()
    await first_pass(store)
    await commit(store, "100", CustomerChange(T0, link=link("alice", b"a1")))
    async with other.customer("100") as alices:  # open while the item moves away
        with caplog.at_level(logging.WARNING, logger="daemon.state"):
            await commit(store, "200", CustomerChange(T1, BOB, seen(("1", "active"))))
        with pytest.raises(CustomerChanged):
            await alices.commit(CustomerChange(T2, marks=granted(("1", "lobby"))))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.endswith(": item 1 moves from customer 100 to customer 200")
    assert items_of(await known(store, "100")) == {"2"}
    bob = await known(store, "200")
    assert items_of(bob) == {"1"}
    assert set(bob.marks) == {("1", "survival"), ("1", "jailbreak")}  # its marks go with it
    assert await store.link_digests() == {}  # alice's answers no longer stand


# --- durability and sharing ---------------------------------------------------------


@run_async
async def test_data_survives_close_and_reopen(opener: Opener) -> None:
    store = opener()
    a, b, c, _ = await first_pass(store)
    await store.mark_attempt(a)
    await store.mark_delivered(a, T1)
    await store.mark_failed(b, "unsafe", T1)
    await store.record_link_error("bob", "HTTP 401", T2)
    await store.set_meta({"cursor": "42"})
    await store.remember_webhook("evt-1", T0, T0)
    before = await snapshot(store)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.rows()

    again = opener()
    assert await snapshot(again) == before
    assert await again.get_meta("cursor") == "42"
    assert not await again.remember_webhook("evt-1", T1, T0)
    # And it goes on from there: ids keep growing.
    (new,) = await commit(
        again, "100", CustomerChange(T2, entries=[entry("1", "survival", "on_expire")])
    )
    assert new > max(a, b, c)


@run_async
async def test_two_stores_on_the_same_database(opener: Opener) -> None:
    writer = opener()
    reader = opener()  # e.g. `perksync status` while the service runs
    assert await reader.links() == []

    first = await first_pass(writer)
    assert ids(await reader.rows()) == first
    assert items_of(await known(reader, "100")) == {"1", "2"}

    # Either may write; each sees the other's writes, and ids stay unique.
    await reader.record_link_error("bob", "HTTP 401", T1)
    carol = CustomerChange(
        T1,
        CustomerRecord("Carol", "{}"),
        seen(("8", "active")),
        granted(("8", "survival")),
        [entry("8", customer_id="300")],
        link("carol"),
    )
    mine = await commit(reader, "300", carol)
    await writer.mark_delivered(first[0], T2)
    assert [c.label for c in await writer.links()] == ["alice", "bob", "carol"]
    assert ids(await writer.unfinished("survival")) == [first[1], *mine]
    assert ids(await reader.unfinished("survival")) == [first[1], *mine]
    assert ids(await writer.rows()) == first + mine
    # The same commit through the other store is still a duplicate.
    assert await commit(writer, "300", carol) == []


# --- local expiry ------------------------------------------------------------------


def expiring(item_id: str, state: str, expires_at: datetime | None) -> SeenItem:
    return SeenItem(item_id, "vip", state, expires_at, f'{{"id": "{item_id}"}}')


@run_async
async def test_due_expiries_are_granted_active_items_past_the_cutoff(opener: Opener) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T0,
            CustomerRecord("Alice", '{"id": "100"}'),
            [
                expiring("1", "active", T1),  # due
                expiring("2", "active", T2),  # not yet
                expiring("3", "renewed", T0),  # renewed keeps the perk
                expiring("4", "active", T0),  # never granted
                expiring("5", "active", None),  # never expires
                SeenItem("6", "vip", "active", T0, None),  # no JSON to render from
                expiring("7", "active", T0),  # ended already
            ],
            {
                **granted(("1", "survival"), ("1", "jailbreak"), ("2", "survival")),
                **granted(("3", "survival"), ("5", "survival"), ("6", "survival")),
                ("7", "survival"): Mark(Phase.LAPSED, 1),
            },
            link=link("alice"),
        ),
    )
    assert await store.due_expiries(T1) == [
        DueExpiry("100", "1", "jailbreak", 1, T1, '{"id": "100"}', '{"id": "1"}'),
        DueExpiry("100", "1", "survival", 1, T1, '{"id": "100"}', '{"id": "1"}'),
    ]
    assert await store.due_expiries(T0) == []
    assert [(d.item_id, d.server) for d in await store.due_expiries(T2)] == [
        ("1", "jailbreak"),
        ("1", "survival"),
        ("2", "survival"),
    ]


@run_async
async def test_due_expiries_render_from_the_customers_json_as_last_stored(opener: Opener) -> None:
    store = opener()
    # No JSON of the customer (a commit without its row): nothing to render from.
    await commit(
        store,
        "100",
        CustomerChange(T0, seen=[expiring("1", "active", T0)], marks=granted(("1", "survival"))),
    )
    await commit(store, "200", CustomerChange(T0, CustomerRecord("Bob", '{"v": 1}'),
                                              [expiring("2", "active", T1)], granted(("2", "s"))))  # fmt: skip
    assert [(d.customer_id, d.customer_raw) for d in await store.due_expiries(T2)] == [
        ("200", '{"v": 1}')
    ]
    await commit(store, "100", CustomerChange(T1, CustomerRecord("Alice", '{"v": 2}')))
    await commit(store, "200", CustomerChange(T1, CustomerRecord("Bob", '{"v": 3}')))
    assert [(d.customer_id, d.customer_raw) for d in await store.due_expiries(T2)] == [
        ("100", '{"v": 2}'),
        ("200", '{"v": 3}'),
    ]


@run_async
async def test_an_expiry_commit_lapses_the_marks_and_journals_the_commands(opener: Opener) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T0, ALICE, [expiring("1", "active", T0)], granted(("1", "survival")), [entry("1")],
            link("alice", b"a1"),
        ),
    )  # fmt: skip
    lapse = CustomerChange(
        T1,
        marks={("1", "survival"): Mark(Phase.LAPSED, 1)},
        entries=[entry("1", event="on_expire")],
    )
    assert len(await commit(store, "100", lapse)) == 1
    assert dict((await known(store, "100")).marks) == {("1", "survival"): Mark(Phase.LAPSED, 1)}
    assert [r.event for r in await store.unfinished("survival")] == ["on_active", "on_expire"]
    assert await store.due_expiries(T2) == []
    assert await store.link_digests() == {}
    # Committing the same expiry again journals nothing new.
    assert await commit(store, "100", lapse) == []


# --- shared perks, unsent grants and cancelling ---------------------------------------


@run_async
async def test_marks_keep_their_perk(opener: Opener) -> None:
    store = opener()
    await commit(store, "100", CustomerChange(T0, ALICE, seen(("1", "active"), ("2", "active")),
                                              {("1", "survival"): Mark(Phase.GRANTED, 1, "rank"),
                                               ("2", "survival"): Mark(Phase.GRANTED, 1)}))  # fmt: skip
    assert dict((await known(store, "100")).marks) == {
        ("1", "survival"): Mark(Phase.GRANTED, 1, "rank"),
        ("2", "survival"): Mark(Phase.GRANTED, 1),
    }
    # An upsert writes the perk it is given, as the other fields.
    ended = {("1", "survival"): Mark(Phase.ENDED, 1, "rank"), ("2", "survival"): Mark(
        Phase.LAPSED, 1, "flight")}  # fmt: skip
    await commit(store, "100", CustomerChange(T1, marks=ended))
    assert dict((await known(store, "100")).marks) == ended


def waiting(item_id: str, index: int = 0, **kw: Any) -> JournalEntry:
    return entry(item_id, index=index, status=JournalStatus.WAITING, **kw)


@run_async
async def test_known_tells_which_grants_have_rows_still_pending_or_waiting(
    opener: Opener,
) -> None:
    store = opener()
    assert (await known(store, "100")).open_grants == frozenset()
    ids_ = await first_pass(store)  # item 1: two on_active rows on each server
    await commit(store, "100", CustomerChange(
        T1, seen=seen(("3", "active"), ("4", "active")),
        entries=[waiting("3"), entry("4", event="on_expire")]))  # fmt: skip
    await commit(store, "200", CustomerChange(T1, BOB, seen(("9", "active")),
                                              entries=[entry("9", customer_id="200")]))  # fmt: skip
    assert (await known(store, "100")).open_grants == frozenset(
        {("1", "survival"), ("1", "jailbreak"), ("3", "survival")}
    )
    # A grant whose rows are all finished is no longer open; one left keeps it open.
    for row_id in ids_[:3]:
        await store.mark_attempt(row_id)
        await store.mark_delivered(row_id, T1)
    assert (await known(store, "100")).open_grants == frozenset(
        {("1", "jailbreak"), ("3", "survival")}
    )


@run_async
async def test_cancelled_grants_end_only_their_on_active_rows_that_wait(opener: Opener) -> None:
    store = opener()
    await commit(store, "100", CustomerChange(T0, ALICE, seen(("1", "active"))))
    online = dataclasses.replace(entry("1", index=1), online=True)
    delayed = dataclasses.replace(entry("1", index=2), not_before=T2)
    sent = dataclasses.replace(entry("1", index=3), online=True)
    rows_before = [entry("1", index=0), online, delayed, sent, waiting("1", 4),
                   entry("1", event="on_expire"), waiting("1", 5, cycle=2),
                   dataclasses.replace(entry("1", "lobby"), online=True)]  # fmt: skip
    ids_ = await commit(store, "100", CustomerChange(T0, entries=rows_before))
    await store.mark_attempt(ids_[3])
    await store.mark_delivered(ids_[3], T1)
    await commit(store, "200", CustomerChange(T0, BOB, seen(("1b", "active")),
                                              entries=[waiting("1b", customer_id="200")]))  # fmt: skip
    own = [entry("1", event="on_revoke"), dataclasses.replace(entry("1", index=9), online=True)]
    grants = [("1", "survival"), ("1", "nowhere")]
    new_ids = await commit(store, "100", CustomerChange(T2, entries=own, cancel_grants=grants))
    assert len(new_ids) == 2
    rows = {(r.item_id, r.server, r.event, r.cycle, r.command_index): r for r in await store.rows()}
    cancelled = {key for key, r in rows.items() if r.status is JournalStatus.CANCELLED}
    # Item 1's on_active rows on survival that wait, whatever their cycle: waiting
    # ones, and pending ones that are online-only or delayed.
    assert cancelled == {
        ("1", "survival", "on_active", 1, 1),
        ("1", "survival", "on_active", 1, 2),
        ("1", "survival", "on_active", 1, 4),
        ("1", "survival", "on_active", 2, 5),
    }
    assert all(rows[key].finished_at == T2 for key in cancelled)
    # Not a plain pending grant (sent before the take-back), a delivered row,
    # other events, servers or customers, nor the change's own new rows.
    assert rows[("1", "survival", "on_active", 1, 3)].status is JournalStatus.DELIVERED
    for key in [
        ("1", "survival", "on_active", 1, 0),
        ("1", "survival", "on_expire", 1, 0),
        ("1", "lobby", "on_active", 1, 0),
        ("1", "survival", "on_active", 1, 9),
    ]:
        assert rows[key].status is JournalStatus.PENDING, key
    assert rows[("1b", "survival", "on_active", 1, 0)].status is JournalStatus.WAITING
    assert (await known(store, "100")).open_grants == frozenset({("1", "survival"), ("1", "lobby")})


@run_async
async def test_cancelled_rows_end_only_this_customers_unfinished_ones(opener: Opener) -> None:
    store = opener()
    ids_ = await first_pass(store)
    await store.mark_attempt(ids_[0])
    await store.mark_delivered(ids_[0], T0)
    (waits,) = await commit(store, "100", CustomerChange(T0, entries=[waiting("1", 7)]))
    (bobs,) = await commit(store, "200", CustomerChange(T0, BOB, seen(("9", "active")),
                                                        entries=[entry("9", customer_id="200")]))  # fmt: skip
    before = {r.id: r for r in await store.rows()}
    change = CustomerChange(T2, cancel_rows=[ids_[0], ids_[1], waits, bobs, 999])
    await commit(store, "100", change)
    after = {r.id: r for r in await store.rows()}
    changed = {i for i in after if after[i] != before[i]}
    assert changed == {ids_[1], waits}
    assert {(after[i].status, after[i].finished_at) for i in changed} == {
        (JournalStatus.CANCELLED, T2)
    }
    # Cancelled rows hold nothing back: they are no longer unfinished.
    assert ids(await store.unfinished("survival")) == [bobs]


@run_async
async def test_an_attempt_tells_whether_the_row_may_still_be_sent(opener: Opener) -> None:
    """A delivery worker reads rows, then records each attempt right before it
    sends: a row cancelled in between must not go out."""
    store = opener()
    ids_ = await first_pass(store)
    (waits,) = await commit(store, "100", CustomerChange(T0, entries=[waiting("1", 7)]))
    assert await store.mark_attempt(ids_[0]) is True  # pending: send it
    assert await store.mark_attempt(waits) is True  # waiting until now: send it
    await commit(store, "100", CustomerChange(T1, cancel_rows=[ids_[1]]))
    assert await store.mark_attempt(ids_[1]) is False  # cancelled meanwhile: do not
    await store.mark_delivered(ids_[0], T1)
    assert await store.mark_attempt(ids_[0]) is False  # its first outcome stands
    with pytest.raises(StoreError):
        await store.mark_attempt(999_999)


# --- store mode --------------------------------------------------------------------------


@run_async
async def test_live_baseline_holds_the_live_items_and_the_customer_digests(
    opener: Opener,
) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T0,
            CustomerRecord("Alice", "{}", b"a"),
            [
                SeenItem("1", "vip", "active", T1),
                SeenItem("2", "vip", "usable"),
                SeenItem("3", "kit", "renewed"),
                SeenItem("4", "vip", "used", T0),
            ],
        ),
    )
    await commit(store, "200", CustomerChange(T0, BOB, seen(("9", "active"), ("10", "revoked"))))
    await commit(store, "300", CustomerChange(T0, CustomerRecord("Carol", "{}", b"c")))
    baseline = await store.live_baseline()
    assert dict(baseline.items) == {
        "1": LiveItem("100", "active", T1),
        "3": LiveItem("100", "renewed", None),
        "9": LiveItem("200", "active", None),
    }
    assert dict(baseline.customers) == {"100": b"a", "300": b"c"}
    # A later state counts.
    await commit(store, "100", CustomerChange(T1, seen=seen(("1", "used"), ("2", "active"))))
    assert set((await store.live_baseline()).items) == {"2", "3", "9"}


@run_async
async def test_totals_count_customers_and_live_items(opener: Opener) -> None:
    store = opener()
    await first_pass(store)  # item 1 active, 2 usable
    await commit(store, "200", CustomerChange(T0, BOB, seen(("9", "renewed"), ("10", "used"))))
    await commit(store, "300", CustomerChange(T0, link=link("carol")))  # no items
    await store.record_link_error("dave", "HTTP 401", T0)  # no customer
    assert await store.totals() == Totals(customers=3, live_items=2)


@run_async
async def test_meta_values_are_set_together_and_kept(opener: Opener) -> None:
    store = opener()
    assert await store.get_meta("new_items_cursor") is None
    await store.set_meta({"new_items_cursor": "9001", "last_snapshot_at": T0.isoformat()})
    await store.set_meta({"new_items_cursor": "9002"})
    await store.set_meta({})
    assert await store.get_meta("new_items_cursor") == "9002"
    assert await store.get_meta("last_snapshot_at") == T0.isoformat()
    assert await opener().get_meta("new_items_cursor") == "9002"


@run_async
async def test_remember_webhook_tells_a_replay_and_forgets_old_ids(opener: Opener) -> None:
    store, other = opener(), opener()
    window = timedelta(minutes=10)
    assert await store.remember_webhook("evt-1", T0, T0 - window)
    assert not await store.remember_webhook("evt-1", T1, T1 - window)  # PayNow retried
    assert not await other.remember_webhook("evt-1", T1, T1 - window)  # another process
    assert await other.remember_webhook("evt-2", T1, T1 - window)
    # Ids received before forget_before are forgotten; at it, kept.
    assert await store.remember_webhook("evt-3", T2, T1)
    assert not await store.remember_webhook("evt-2", T2, T1)
    assert await store.remember_webhook("evt-1", T2, T1)  # forgotten: new again
    assert not await store.remember_webhook("evt-1", T2, T1)


@run_async
async def test_live_item_counts_per_link_and_product(opener: Opener) -> None:
    store = opener()
    assert await store.live_item_counts(["minecraft_uuid"]) == []

    async def commit_linked(label: str, customer_id: str, name: str | None, raw: str | None,
                            *items: tuple[str, str] | tuple[str, str, str]) -> None:  # fmt: skip
        record = None if raw is None else CustomerRecord(name, raw)
        await commit(store, customer_id, CustomerChange(T0, record, seen(*items), link=link(label)))

    await commit_linked(
        "bob", "200", "Bob", customer_json(minecraft_uuid="u-200", steam_id=None),
        ("1", "active"), ("2", "renewed"), ("3", "used"), ("4", "revoked"),
        ("5", "usable"), ("6", "active", "crate"), ("7", "active", "crate"),
    )  # fmt: skip
    await commit_linked(
        "alice", "100", "Alice", customer_json(minecraft_uuid="", steam_id="7656"),
        ("8", "active", "kit"),
    )  # fmt: skip
    # No live item: left out. No customer JSON stored, or not JSON: ids unknown.
    await commit_linked("carol", "300", "Carol", "{}", ("9", "used"))
    await commit_linked("dave", "400", None, None, ("10", "active"))
    await commit_linked("fay", "600", None, "{not json", ("11", "active"))
    await store.record_link_error("erin", "HTTP 401", T0)  # never synced

    fields = ["minecraft_uuid", "steam_id", "xbox_xuid"]
    assert await store.live_item_counts(fields) == [
        LiveItems("alice", "100", "Alice", "kit", 1, frozenset({"steam_id"})),
        LiveItems("bob", "200", "Bob", "crate", 2, frozenset({"minecraft_uuid"})),
        LiveItems("bob", "200", "Bob", "vip", 2, frozenset({"minecraft_uuid"})),
        LiveItems("dave", "400", None, "vip", 1, None),
        LiveItems("fay", "600", None, "vip", 1, None),
    ]
    # An item's later state counts; two links of one customer each list its items.
    await commit(store, "200", CustomerChange(T1, seen=seen(("1", "used")), link=link("bob")))
    await commit(store, "200", CustomerChange(T1, link=link("bob-again")))
    assert [(r.label, r.product, r.count) for r in await store.live_item_counts([])] == [
        ("alice", "kit", 1),
        ("bob", "crate", 2),
        ("bob", "vip", 1),
        ("bob-again", "crate", 2),
        ("bob-again", "vip", 1),
        ("dave", "vip", 1),
        ("fay", "vip", 1),
    ]


@run_async
async def test_live_item_counts_of_customers_without_a_link(opener: Opener) -> None:
    store = opener()  # store mode: no links at all
    await commit(store, "700", CustomerChange(T0, CustomerRecord("Gus", customer_json(steam_id="7")),
                                              seen(("1", "active"), ("2", "active", "kit"))))  # fmt: skip
    await commit(store, "500", CustomerChange(T0, CustomerRecord(None, customer_json()),
                                              seen(("3", "renewed"))))  # fmt: skip
    await commit(store, "100", CustomerChange(T0, ALICE, seen(("4", "active")), link=link("alice")))
    assert await store.live_item_counts(["steam_id"]) == [
        LiveItems("alice", "100", "Alice", "vip", 1, frozenset()),
        LiveItems(None, "500", None, "vip", 1, frozenset()),
        LiveItems(None, "700", "Gus", "kit", 1, frozenset({"steam_id"})),
        LiveItems(None, "700", "Gus", "vip", 1, frozenset({"steam_id"})),
    ]


# --- fenced attempts (several hosts on one database) -------------------------------


def _host(name: str) -> HostRecord:
    return HostRecord(f"{name}:1:00", name, 1, None, "settings")


@run_async
async def test_a_fenced_attempt_counts_only_while_its_lease_holds(opener: Opener) -> None:
    """A backend with leases counts an attempt under a fence only while the
    fence's holder has the lease with that token for longer than its margin;
    one without leases (a single host) refuses any fence. Either way a refused
    attempt counts nothing, and the row stays sendable by its rightful host."""
    store = opener()
    row, other = (await first_pass(store))[:2]
    if not isinstance(store, SharedStore):
        fence = Fence("server:survival", "web-1:1:00", 1, 5)
        with pytest.raises(StoreError, match="holds no leases"):
            await store.mark_attempt(row, fence)
        assert (await store.rows())[0].attempts == 0
        assert await store.mark_attempt(row) is True
        return
    web1, web2 = _host("web-1"), _host("web-2")
    await store.join(web1, 60)
    await store.join(web2, 60)
    (mine,) = (await store.tick(web1, ["server:survival"], 60, 5)).leases
    assert mine.token is not None
    fence = Fence("server:survival", web1.host_id, mine.token, 5)
    assert await store.mark_attempt(row, fence) is True
    with pytest.raises(LeaseLost):  # the lease would run out before the command ends
        await store.mark_attempt(row, dataclasses.replace(fence, margin_seconds=120))
    with pytest.raises(LeaseLost):  # not web-2's
        await store.mark_attempt(row, dataclasses.replace(fence, holder=web2.host_id))
    # web-1's lease runs out (a lease of no time); web-2 takes it over.
    await store.tick(web1, ["server:survival"], 0, 5)
    (taken,) = (await store.tick(web2, ["server:survival"], 60, 5)).leases
    assert taken.token == mine.token + 1 and taken.was_holder == web1.host_id
    with pytest.raises(LeaseLost):  # web-1's token is stale
        await store.mark_attempt(other, fence)
    assert await store.mark_attempt(
        other, dataclasses.replace(fence, holder=web2.host_id, token=taken.token)
    )
    attempts = {r.id: r.attempts for r in await store.rows()}
    assert (attempts[row], attempts[other]) == (1, 1)
    # Released (a graceful stop): its holder's fence no longer holds either.
    assert await store.release(web2) == ["server:survival"]
    with pytest.raises(LeaseLost):
        await store.mark_attempt(
            other, dataclasses.replace(fence, holder=web2.host_id, token=taken.token)
        )
    with pytest.raises(StoreError):
        await store.mark_attempt(999_999, fence)
