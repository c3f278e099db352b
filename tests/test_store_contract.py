"""The contract of `daemon.state.Store`, run against every backend in `BACKENDS`.

A backend other than SQLite needs a database to talk to: give its URL in
`PERKSYNC_TEST_<NAME>_URL` (e.g. PERKSYNC_TEST_POSTGRES_URL); each test must
then start from an empty database. Without it, that backend's tests skip.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.diff import Mark, Phase
from daemon.state import (
    BACKENDS,
    CustomerStatus,
    JournalEntry,
    JournalRow,
    JournalStatus,
    LiveItems,
    SeenItem,
    ServerCounts,
    Store,
    StoreError,
)

T = TypeVar("T")

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)

Opener = Callable[[], Store]


def run_async(test: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async test function to completion (pytest-asyncio is not used)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(test(*args, **kwargs))

    return wrapper


def _url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return str(tmp_path / "state.sqlite3")
    url = os.environ.get(f"PERKSYNC_TEST_{backend.upper()}_URL")
    if not url:
        pytest.skip(f"set PERKSYNC_TEST_{backend.upper()}_URL to test the {backend} backend")
    return url


@pytest.fixture(params=sorted(BACKENDS))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on the same database each time it is called; closes them all after."""
    url = _url(request.param, tmp_path)
    backend = BACKENDS[request.param]
    opened: list[Store] = []

    def open_() -> Store:
        store = backend(url)
        opened.append(store)
        return store

    yield open_

    async def close_all() -> None:
        for store in opened:
            await store.close()

    asyncio.run(close_all())


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


async def first_pass(store: Store, *, synced_at: datetime = T0) -> list[int]:
    """Customer 100 ("alice") owns items 1 (active) and 2 (usable); item 1 goes to two
    servers with two commands each."""
    return await store.commit_pass(
        "alice",
        "100",
        "Alice",
        seen(("1", "active"), ("2", "usable")),
        granted(("1", "survival"), ("1", "jailbreak")),
        [
            entry("1", "survival", index=0),
            entry("1", "survival", index=1),
            entry("1", "jailbreak", index=0),
            entry("1", "jailbreak", index=1),
        ],
        synced_at,
    )


async def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything observable about customers 100 and 200."""
    return (
        await store.known("100"),
        await store.known("200"),
        await store.rows(),
        await store.customers(),
        await store.server_counts(),
        await store.pending("survival"),
        await store.pending("jailbreak"),
    )


def ids(rows: list[JournalRow]) -> list[int]:
    return [row.id for row in rows]


# --- an empty store ----------------------------------------------------------------


@run_async
async def test_an_empty_store_knows_nothing(opener: Opener) -> None:
    store = opener()
    known = await store.known("100")
    assert known.items == frozenset()
    assert dict(known.marks) == {}
    assert await store.pending("survival") == []
    assert await store.rows() == []
    assert await store.rows("survival") == []
    assert await store.customers() == []
    assert await store.server_counts() == []


# --- commit_pass and known ------------------------------------------------------------


@run_async
async def test_commit_pass_then_known_returns_the_items_and_marks(opener: Opener) -> None:
    store = opener()
    await first_pass(store)

    known = await store.known("100")
    assert known.items == frozenset({"1", "2"})
    assert dict(known.marks) == {
        ("1", "survival"): Mark(Phase.GRANTED, 1),
        ("1", "jailbreak"): Mark(Phase.GRANTED, 1),
    }
    other = await store.known("200")
    assert other.items == frozenset()
    assert dict(other.marks) == {}
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T0, None, None),
    ]


@run_async
async def test_a_later_pass_updates_only_the_marks_it_names(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    # Item 1 is used up: its grant on survival ends; jailbreak's mark is not in the
    # pass (unchanged) and must stay. Item 3 is new, without any mark.
    await store.commit_pass(
        "alice",
        "100",
        "Alice B.",
        seen(("1", "used"), ("2", "usable"), ("3", "usable")),
        {("1", "survival"): Mark(Phase.ENDED, 1)},
        [entry("1", "survival", "on_expire")],
        T1,
    )
    known = await store.known("100")
    assert known.items == frozenset({"1", "2", "3"})
    assert dict(known.marks) == {
        ("1", "survival"): Mark(Phase.ENDED, 1),
        ("1", "jailbreak"): Mark(Phase.GRANTED, 1),
    }
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice B.", T1, None, None),
    ]


@run_async
async def test_a_mark_may_name_an_item_stored_by_an_earlier_pass(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    # A pass that lists no items but re-grants item 1 (a later cycle).
    await store.commit_pass(
        "alice", "100", "Alice", [], granted(("1", "survival"), cycle=2), [], T1
    )
    assert (await store.known("100")).marks[("1", "survival")] == Mark(Phase.GRANTED, 2)


@run_async
async def test_customers_are_kept_apart(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    await store.commit_pass(
        "bob",
        "200",
        None,
        seen(("9", "active", "mvp")),
        granted(("9", "survival")),
        [entry("9", customer_id="200")],
        T1,
    )
    assert (await store.known("100")).items == frozenset({"1", "2"})
    bob = await store.known("200")
    assert bob.items == frozenset({"9"})
    assert dict(bob.marks) == {("9", "survival"): Mark(Phase.GRANTED, 1)}
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T0, None, None),
        CustomerStatus("bob", "200", None, T1, None, None),
    ]


# --- the journal ---------------------------------------------------------------------


@run_async
async def test_journal_ids_grow_in_insertion_order(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    assert len(first) == 4
    assert first == sorted(first)
    assert len(set(first)) == 4
    second = await store.commit_pass(
        "bob",
        "200",
        "Bob",
        seen(("9", "active")),
        granted(("9", "survival")),
        [entry("9", "survival", index=1, customer_id="200"), entry("9", customer_id="200")],
        T1,
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

    assert ids(await store.pending("survival")) == survival
    assert ids(await store.pending("jailbreak")) == jailbreak
    assert await store.pending("nowhere") == []
    assert ids(await store.pending("survival", after_id=survival[0])) == survival[1:]
    assert await store.pending("survival", after_id=survival[1]) == []
    assert ids(await store.pending("survival", limit=1)) == survival[:1]
    assert ids(await store.pending("jailbreak", after_id=0, limit=5)) == jailbreak
    pending = await store.pending("survival")
    assert all(r.server == "survival" and r.status is JournalStatus.PENDING for r in pending)


@run_async
async def test_pending_pages_through_a_long_journal_in_id_order(opener: Opener) -> None:
    store = opener()
    all_ids: list[int] = []
    for n in range(12):
        item = str(1000 + n)
        all_ids += await store.commit_pass(
            f"customer {n}",
            str(n),
            None,
            seen((item, "active")),
            granted((item, "survival"), (item, "jailbreak")),
            [
                entry(item, server, index=i, customer_id=str(n))
                for i in range(50)
                for server in ("survival", "jailbreak")
            ],
            T0,
        )
    expected = [r.id for r in await store.rows("survival")]
    assert len(expected) == 600

    paged: list[int] = []
    after = 0
    while page := await store.pending("survival", after_id=after, limit=250):
        assert len(page) <= 250
        paged += ids(page)
        after = page[-1].id
    assert paged == expected
    assert paged == sorted(paged)


@run_async
async def test_recommitting_the_same_pass_journals_nothing_new(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    before = await store.rows()

    assert await first_pass(store, synced_at=T1) == []
    after = await store.rows()
    assert after == before  # not re-inserted, and the old rows are untouched
    assert (await store.customers())[0].last_synced_at == T1  # the rest of the pass did apply
    assert ids(await store.pending("survival")) == first[:2]


@run_async
async def test_only_the_new_entries_of_a_pass_get_ids(opener: Opener) -> None:
    store = opener()
    first = await first_pass(store)
    new = await store.commit_pass(
        "alice",
        "100",
        "Alice",
        seen(("1", "used")),
        {("1", "survival"): Mark(Phase.ENDED, 1)},
        [
            entry("1", "survival", index=0),  # already journaled
            entry("1", "survival", "on_expire", 0),  # new
            entry("1", "survival", "on_active", 0, cycle=2),  # a new cycle is new
            entry("1", "survival", "on_expire", 0),  # twice in the same pass
        ],
        T1,
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
    assert ids(await store.pending("survival")) == [b]
    assert ids(await store.pending("jailbreak")) == [d]
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=1, failed=1, skipped=0, delivered=0),
        ServerCounts("survival", pending=1, failed=0, skipped=0, delivered=1),
    ]


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
async def test_failed_and_skipped_entries_are_never_pending(opener: Opener) -> None:
    store = opener()
    new = await store.commit_pass(
        "alice",
        "100",
        "Alice",
        seen(("1", "active")),
        granted(("1", "survival")),
        [
            entry("1", index=0, status=JournalStatus.SKIPPED, reason="customer.steam_id is null"),
            entry("1", index=1),
            entry("1", index=2, status=JournalStatus.FAILED, reason="newline in item.note"),
        ],
        T0,
    )
    assert len(new) == 3
    assert ids(await store.pending("survival")) == [new[1]]
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


# --- links, errors, counts -----------------------------------------------------------


@run_async
async def test_record_error_keeps_the_last_sync_and_a_later_pass_clears_it(
    opener: Opener,
) -> None:
    store = opener()
    await first_pass(store)
    await store.record_error("alice", "HTTP 503 from PayNow", T1)
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T0, "HTTP 503 from PayNow", T1),
    ]
    await store.record_error("alice", "timed out", T2)
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T0, "timed out", T2),
    ]
    # The items and marks are untouched by an error.
    assert (await store.known("100")).items == frozenset({"1", "2"})

    later = T2 + timedelta(minutes=1)
    await first_pass(store, synced_at=later)
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", later, None, None),
    ]


@run_async
async def test_an_error_on_a_link_never_synced_lists_it_without_customer(opener: Opener) -> None:
    store = opener()
    await store.record_error("token_file /etc/perksync/tokens/bob", "HTTP 401", T0)
    assert await store.customers() == [
        CustomerStatus("token_file /etc/perksync/tokens/bob", None, None, None, "HTTP 401", T0),
    ]
    await store.commit_pass("token_file /etc/perksync/tokens/bob", "200", "Bob", [], {}, [], T1)
    assert await store.customers() == [
        CustomerStatus("token_file /etc/perksync/tokens/bob", "200", "Bob", T1, None, None),
    ]


@run_async
async def test_customers_and_server_counts(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "zed",
        "300",
        "Zed",
        seen(("7", "active")),
        granted(("7", "lobby")),
        [entry("7", "lobby", customer_id="300")],
        T0,
    )
    a, b, c, d = await first_pass(store, synced_at=T1)
    await store.record_error("carol", "HTTP 403", T2)
    await store.commit_pass(
        "bob",
        "200",
        "Bob",
        seen(("9", "active")),
        granted(("9", "jailbreak")),
        [
            entry("9", "jailbreak", customer_id="200", status=JournalStatus.SKIPPED, reason="-"),
            entry("9", "jailbreak", index=1, customer_id="200"),
        ],
        T2,
    )
    await store.mark_delivered(a, T2)
    await store.mark_delivered(b, T2)
    await store.mark_failed(c, "too long", T2)

    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T1, None, None),
        CustomerStatus("bob", "200", "Bob", T2, None, None),
        CustomerStatus("carol", None, None, None, "HTTP 403", T2),
        CustomerStatus("zed", "300", "Zed", T0, None, None),
    ]
    assert await store.server_counts() == [
        ServerCounts("jailbreak", pending=2, failed=1, skipped=1, delivered=0),
        ServerCounts("lobby", pending=1, failed=0, skipped=0, delivered=0),
        ServerCounts("survival", pending=0, failed=0, skipped=0, delivered=2),
    ]
    assert ids(await store.pending("jailbreak")) == [d, (await store.rows())[-1].id]


@run_async
async def test_times_come_back_as_utc(opener: Opener) -> None:
    store = opener()
    berlin = timezone(timedelta(hours=2))
    at = T0.astimezone(berlin)
    (row_id,) = await store.commit_pass(
        "alice", "100", None, seen(("1", "active")), granted(("1", "s")), [entry("1", "s")], at
    )
    await store.mark_delivered(row_id, T1.astimezone(berlin))
    await store.record_error("bob", "x", T2.astimezone(berlin))
    (row,) = await store.rows()
    alice, bob = await store.customers()
    for value, expected in [
        (row.created_at, T0),
        (row.finished_at, T1),
        (alice.last_synced_at, T0),
        (bob.last_error_at, T2),
    ]:
        assert value == expected
        assert value is not None and value.utcoffset() == timedelta(0)


@run_async
async def test_naive_times_are_refused(opener: Opener) -> None:
    store = opener()
    naive = datetime(2024, 5, 1, 12, 0)
    with pytest.raises(ValueError):
        await store.commit_pass("alice", "100", None, seen(("1", "active")), {}, [], naive)
    with pytest.raises(ValueError):
        await store.record_error("alice", "x", naive)
    assert await store.customers() == []
    assert await store.known("100") == await opener().known("nobody")


# --- atomicity -------------------------------------------------------------------------


def _bad_passes() -> list[tuple[str, dict[str, Any]]]:
    """Passes that break the contract midway: after the link and the items were
    written, a mark or a journal entry cannot be stored."""
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
    "bad", [b for _, b in _bad_passes()], ids=[name for name, _ in _bad_passes()]
)
@run_async
async def test_a_pass_that_fails_midway_leaves_nothing_behind(
    opener: Opener, bad: dict[str, Any]
) -> None:
    store = opener()
    await first_pass(store)
    await store.record_error("alice", "HTTP 500", T1)
    before = await snapshot(store)

    for customer in ("100", "200"):  # an existing customer, and a new one
        with pytest.raises(StoreError):
            await store.commit_pass(
                "alice" if customer == "100" else "bob",
                customer,
                "Changed",
                bad["seen"],
                bad["marks"],
                bad.get("entries", []),
                T2,
            )
        assert await snapshot(store) == before

    # And the store is not left inside a transaction: the next pass works.
    new = await store.commit_pass(
        "bob", "200", "Bob", seen(("5", "active")), granted(("5", "survival")), [entry("5")], T2
    )
    assert len(new) == 1
    assert (await store.known("200")).items == frozenset({"5"})


# --- durability and sharing ---------------------------------------------------------


@run_async
async def test_data_survives_close_and_reopen(opener: Opener) -> None:
    store = opener()
    a, b, c, _ = await first_pass(store)
    await store.mark_attempt(a)
    await store.mark_delivered(a, T1)
    await store.mark_failed(b, "unsafe", T1)
    await store.record_error("bob", "HTTP 401", T2)
    before = await snapshot(store)
    await store.close()

    again = opener()
    assert await snapshot(again) == before
    # And it goes on from there: ids keep growing.
    (new,) = await again.commit_pass(
        "alice", "100", "Alice", [], {}, [entry("1", "survival", "on_expire")], T2
    )
    assert new > max(a, b, c)


@run_async
async def test_two_stores_on_the_same_database(opener: Opener) -> None:
    writer = opener()
    reader = opener()  # e.g. `perksync status` while the service runs
    assert await reader.customers() == []

    first = await first_pass(writer)
    assert ids(await reader.rows()) == first
    assert (await reader.known("100")).items == frozenset({"1", "2"})

    # Either may write; each sees the other's writes, and ids stay unique.
    await reader.record_error("bob", "HTTP 401", T1)
    mine = await reader.commit_pass(
        "carol",
        "300",
        None,
        seen(("8", "active")),
        granted(("8", "survival")),
        [entry("8", customer_id="300")],
        T1,
    )
    await writer.mark_delivered(first[0], T2)
    assert [c.label for c in await writer.customers()] == ["alice", "bob", "carol"]
    assert ids(await writer.pending("survival")) == [first[1], *mine]
    assert ids(await reader.pending("survival")) == [first[1], *mine]
    assert ids(await writer.rows()) == first + mine
    # The same pass committed through the other store is still a duplicate.
    assert (
        await reader.commit_pass(
            "carol", "300", None, seen(("8", "active")), {}, [entry("8", customer_id="300")], T2
        )
        == []
    )


# --- local expiry ------------------------------------------------------------------


def expiring(item_id: str, state: str, expires_at: datetime | None) -> SeenItem:
    return SeenItem(item_id, "vip", state, expires_at, f'{{"id": "{item_id}"}}')


@run_async
async def test_due_expiries_are_granted_active_items_past_the_cutoff(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "alice",
        "100",
        "Alice",
        [
            expiring("1", "active", T1),  # due
            expiring("2", "active", T2),  # not yet
            expiring("3", "renewed", T0),  # renewed keeps the perk
            expiring("4", "active", T0),  # never granted
            expiring("5", "active", None),  # never expires
            SeenItem("6", "vip", "active", T0, None),  # no JSON to render from
        ],
        {
            **granted(("1", "survival"), ("1", "jailbreak"), ("2", "survival")),
            **granted(("3", "survival"), ("5", "survival"), ("6", "survival")),
        },
        [],
        T0,
        '{"id": "100"}',
    )
    due = await store.due_expiries(T1)
    assert [(d.item_raw, d.server, d.cycle) for d in due] == [
        ('{"id": "1"}', "jailbreak", 1),
        ('{"id": "1"}', "survival", 1),
    ]
    assert {(d.label, d.customer_raw, d.expires_at) for d in due} == {
        ("alice", '{"id": "100"}', T1)
    }
    assert await store.due_expiries(T0) == []


@run_async
async def test_commit_expiry_lapses_the_marks_and_journals_the_commands(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "alice", "100", "Alice", [expiring("1", "active", T0)],
        granted(("1", "survival")), [entry("1")], T0, '{"id": "100"}',
    )  # fmt: skip
    new = await store.commit_expiry(
        {("1", "survival"): Mark(Phase.LAPSED, 1)}, [entry("1", event="on_expire")], T1
    )
    assert len(new) == 1
    assert (await store.known("100")).marks == {("1", "survival"): Mark(Phase.LAPSED, 1)}
    assert [r.event for r in await store.pending("survival")] == ["on_active", "on_expire"]
    assert await store.due_expiries(T2) == []
    # Committing the same expiry again journals nothing new.
    again = await store.commit_expiry(
        {("1", "survival"): Mark(Phase.LAPSED, 1)}, [entry("1", event="on_expire")], T2
    )
    assert again == []


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


@run_async
async def test_known_tells_each_items_state_and_expiry(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "alice", "100", "Alice", [expiring("1", "active", T1), *seen(("2", "usable"))],
        {}, [], T0,
    )  # fmt: skip
    assert (await store.known("100")).states == {"1": ("active", T1), "2": ("usable", None)}


@run_async
async def test_touch_records_the_sync_and_nothing_else(opener: Opener) -> None:
    store = opener()
    await first_pass(store)
    await store.record_error("alice", "HTTP 503", T1)
    before = await snapshot(store)
    await store.touch("alice", "100", "Alice B.", T2)
    (link,) = await store.customers()
    assert link == CustomerStatus("alice", "100", "Alice B.", T2, None, None)
    after = await snapshot(store)
    assert after[:3] == before[:3] and after[4:] == before[4:]  # all but the links


# --- answers digests -------------------------------------------------------------------


@run_async
async def test_digests_are_kept_per_link_and_replaced_by_each_pass(opener: Opener) -> None:
    store = opener()
    assert await store.digests() == {}
    await store.commit_pass("alice", "100", "Alice", seen(("1", "active")), {}, [], T0,
                            digest=b"a1")  # fmt: skip
    await store.touch("bob", "200", "Bob", T0, b"b1")
    await store.record_error("carol", "HTTP 503", T0)  # no pass: no digest
    assert await store.digests() == {"alice": b"a1", "bob": b"b1"}
    await store.touch("alice", "100", "Alice", T1, b"a2")
    await store.commit_pass("bob", "200", "Bob", seen(("2", "active")), {}, [], T1)
    # A pass that stores no digest drops the old one: it no longer stands for the state.
    assert await store.digests() == {"alice": b"a2"}
    reopened = opener()
    assert await reopened.digests() == {"alice": b"a2"}


@run_async
async def test_touch_unchanged_sets_the_sync_time_and_clears_the_error_only(
    opener: Opener,
) -> None:
    store = opener()
    await first_pass(store)
    await store.touch("bob", "200", "Bob", T0, b"b1")
    await store.record_error("alice", "HTTP 503", T1)
    before = await snapshot(store)
    await store.touch_unchanged({"alice": T2, "bob": T1, "nobody": T2})
    assert await store.customers() == [
        CustomerStatus("alice", "100", "Alice", T2, None, None),
        CustomerStatus("bob", "200", "Bob", T1, None, None),
    ]  # "nobody" has no link row: ignored, not created
    after = await snapshot(store)
    assert after[:3] == before[:3] and after[4:] == before[4:]
    assert await store.digests() == {"bob": b"b1"}
    await store.touch_unchanged({})


@run_async
async def test_commit_expiry_drops_the_digest_of_the_customers_it_changes(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "alice", "100", "Alice", [expiring("1", "active", T0)],
        granted(("1", "survival")), [], T0, '{"id": "100"}', b"a1",
    )  # fmt: skip
    await store.commit_pass(
        "bob", "200", "Bob", [expiring("2", "active", T2)],
        granted(("2", "survival")), [], T0, '{"id": "200"}', b"b1",
    )  # fmt: skip
    await store.commit_expiry({("1", "survival"): Mark(Phase.LAPSED, 1)}, [], T1)
    assert await store.digests() == {"bob": b"b1"}


# --- live items ---------------------------------------------------------------------------


def customer_json(**ids: object) -> str:
    import json

    return json.dumps({"id": "x", "name": "X", **ids})


@run_async
async def test_live_items_count_active_and_renewed_items_per_link_and_product(
    opener: Opener,
) -> None:
    store = opener()
    assert await store.live_items(["minecraft_uuid"]) == []
    await store.commit_pass(
        "bob", "200", "Bob",
        seen(("1", "active"), ("2", "renewed"), ("3", "used"), ("4", "revoked"),
             ("5", "usable"), ("6", "active", "crate"), ("7", "active", "crate")),
        {}, [], T0, customer_json(minecraft_uuid="u-200", steam_id=None),
    )  # fmt: skip
    await store.commit_pass(
        "alice", "100", "Alice", seen(("8", "active", "kit")), {}, [], T0,
        customer_json(minecraft_uuid="", steam_id="7656"),
    )  # fmt: skip
    # No live item: left out. No customer JSON stored: ids unknown.
    await store.commit_pass("carol", "300", "Carol", seen(("9", "used")), {}, [], T0, "{}")
    await store.commit_pass("dave", "400", None, seen(("10", "active")), {}, [], T0)
    await store.commit_pass("fay", "600", None, seen(("11", "active")), {}, [], T0, "{not json")
    await store.record_error("erin", "HTTP 401", T0)  # never synced

    fields = ["minecraft_uuid", "steam_id", "xbox_xuid"]
    assert await store.live_items(fields) == [
        LiveItems("alice", "100", "Alice", "kit", 1, frozenset({"steam_id"})),
        LiveItems("bob", "200", "Bob", "crate", 2, frozenset({"minecraft_uuid"})),
        LiveItems("bob", "200", "Bob", "vip", 2, frozenset({"minecraft_uuid"})),
        LiveItems("dave", "400", None, "vip", 1, None),
        LiveItems("fay", "600", None, "vip", 1, None),
    ]
    # An item's later state counts; two links of one customer each list its items.
    await store.commit_pass("bob", "200", "Bob", seen(("1", "used")), {}, [], T1)
    await store.touch("bob-again", "200", "Bob", T1)
    assert [(r.label, r.product, r.count) for r in await store.live_items([])] == [
        ("alice", "kit", 1),
        ("bob", "crate", 2),
        ("bob", "vip", 1),
        ("bob-again", "crate", 2),
        ("bob-again", "vip", 1),
        ("dave", "vip", 1),
        ("fay", "vip", 1),
    ]


@run_async
async def test_touch_replaces_the_customer_json_only_when_given(opener: Opener) -> None:
    store = opener()
    await store.commit_pass(
        "bob", "200", "Bob", seen(("1", "active")), {}, [], T0, customer_json(minecraft_uuid="u")
    )
    await store.touch("bob", "200", "Bob", T1, b"d1")
    (row,) = await store.live_items(["minecraft_uuid"])
    assert row.ids == frozenset({"minecraft_uuid"})
    await store.touch("bob", "200", "Bob", T2, b"d2", customer_json(minecraft_uuid=None))
    (row,) = await store.live_items(["minecraft_uuid"])
    assert row.ids == frozenset()
