"""The Store contract's operator reads and retention, run against every backend:
`journal()` (filters, newest first), `granted()` (what a resend starts from),
`prune_journal()`, an operator's `cancel_rows`, and what `known` gives a
resend to render from (the items' JSON, the marks' perk).

Same fixture as tests/test_store_contract.py: one suite, every backend.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from daemon.diff import Mark, Phase
from daemon.state import (
    CustomerChange,
    GrantedItem,
    JournalEntry,
    JournalStatus,
    SeenItem,
    Store,
)
from tests.test_store_contract import (
    ALICE,
    BOB,
    T0,
    T1,
    T2,
    Opener,
    commit,
    entry,
    first_pass,
    granted,
    ids,
    known,
    opener,
    run_async,
    seen,
)

__all__ = ["opener"]  # the fixture, imported so that pytest finds it here


def waiting(item_id: str, index: int = 0, *, customer_id: str = "100") -> JournalEntry:
    return dataclasses.replace(
        entry(item_id, index=index, customer_id=customer_id),
        status=JournalStatus.WAITING,
        reason="for the player",
    )


async def two_customers(store: Store) -> tuple[list[int], list[int]]:
    """Alice (100): item 1 on survival and jailbreak (first_pass). Bob (200): item 9
    on survival, one command pending and one waiting."""
    alice = await first_pass(store)
    bob = await commit(
        store,
        "200",
        CustomerChange(
            T1,
            BOB,
            seen(("9", "active")),
            granted(("9", "survival")),
            [entry("9", customer_id="200"), waiting("9", 1, customer_id="200")],
        ),
    )
    return alice, bob


# --- journal() -----------------------------------------------------------------------


@run_async
async def test_journal_is_newest_first_and_filters_by_every_field_given(opener: Opener) -> None:
    store = opener()
    (a, b, c, d), (e, f) = await two_customers(store)
    await store.mark_delivered(a, T1)

    assert ids(await store.journal()) == [f, e, d, c, b, a]
    assert ids(await store.journal(limit=2)) == [f, e]
    assert ids(await store.journal(limit=None)) == [f, e, d, c, b, a]
    assert ids(await store.journal(server="jailbreak")) == [d, c]
    assert ids(await store.journal(customer_id="200")) == [f, e]
    assert ids(await store.journal(statuses=[JournalStatus.DELIVERED])) == [a]
    assert ids(await store.journal(statuses=[JournalStatus.WAITING, JournalStatus.DELIVERED])) == [
        f,
        a,
    ]
    assert ids(await store.journal(row_ids=[a, e, 10_000])) == [e, a]
    assert ids(await store.journal(item_ids=["9"])) == [f, e]
    assert ids(await store.journal(server="survival", customer_id="100", limit=1)) == [b]
    assert await store.journal(server="survival", customer_id="200", row_ids=[a]) == []


@run_async
async def test_journal_rows_carry_every_column(opener: Opener) -> None:
    store = opener()
    _, (e, f) = await two_customers(store)
    await store.mark_attempt(e)
    await store.mark_delivered(e, T2)
    still, delivered = await store.journal(row_ids=[e, f])
    assert (delivered.customer_id, delivered.item_id, delivered.server) == ("200", "9", "survival")
    assert (delivered.status, delivered.attempts, delivered.finished_at) == (
        JournalStatus.DELIVERED,
        1,
        T2,
    )
    assert (still.status, still.reason, still.created_at) == (
        JournalStatus.WAITING,
        "for the player",
        T1,
    )


# --- granted() -----------------------------------------------------------------------


@run_async
async def test_granted_lists_the_items_granted_on_one_server_oldest_first(opener: Opener) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T0,
            ALICE,
            seen(("1000", "active"), ("999", "active"), ("1001", "used"), ("1002", "active")),
            {
                ("1000", "survival"): Mark(Phase.GRANTED, 2, "vip"),
                ("999", "survival"): Mark(Phase.GRANTED, 1, "vip"),
                ("1001", "survival"): Mark(Phase.ENDED, 1, "vip"),
                ("1002", "survival"): Mark(Phase.LAPSED, 1),
                ("1002", "jailbreak"): Mark(Phase.GRANTED, 1),
            },
        ),
    )
    await commit(
        store,
        "200",
        CustomerChange(T0, BOB, seen(("5", "active", "key")), granted(("5", "survival"))),
    )
    assert await store.granted("survival") == [
        GrantedItem("100", "999", "vip", "survival", 1, "vip", False),
        GrantedItem("100", "1000", "vip", "survival", 2, "vip", False),
        GrantedItem("200", "5", "key", "survival", 1, None, False),
    ]
    assert await store.granted("jailbreak") == [
        GrantedItem("100", "1002", "vip", "jailbreak", 1, None, False)
    ]
    assert await store.granted("lobby") == []


@run_async
async def test_granted_tells_whether_the_on_active_there_is_still_unfinished(
    opener: Opener,
) -> None:
    store = opener()
    (a, b, c, d), (e, _) = await two_customers(store)
    # Alice's item 1: both survival rows delivered; on jailbreak one row left.
    for row in (a, b, c):
        await store.mark_delivered(row, T1)
    # Bob's item 9: one row delivered, one still waiting.
    await store.mark_delivered(e, T1)
    assert [(g.item_id, g.open_grant) for g in await store.granted("survival")] == [
        ("1", False),
        ("9", True),
    ]
    assert [(g.item_id, g.open_grant) for g in await store.granted("jailbreak")] == [("1", True)]
    await store.mark_delivered(d, T2)
    assert [(g.item_id, g.open_grant) for g in await store.granted("jailbreak")] == [("1", False)]


@run_async
async def test_granted_ignores_unfinished_take_backs(opener: Opener) -> None:
    store = opener()
    (a, b, c, d), _ = await two_customers(store)
    for row in (a, b, c, d):
        await store.mark_delivered(row, T1)
    # A take-back row pending for an item granted again later (a new cycle).
    await commit(
        store,
        "100",
        CustomerChange(
            T2, marks=granted(("1", "survival"), cycle=2), entries=[entry("1", event="on_expire")]
        ),
    )
    assert [(g.item_id, g.cycle, g.open_grant) for g in await store.granted("survival")] == [
        ("1", 2, False),
        ("9", 1, True),
    ]


# --- known gives a resend what to render from --------------------------------------------


@run_async
async def test_known_carries_the_items_json_and_the_marks_perk(opener: Opener) -> None:
    store = opener()
    await commit(
        store,
        "100",
        CustomerChange(
            T0,
            ALICE,
            [SeenItem("1", "vip-monthly", "active", raw='{"id": "1"}')],
            {("1", "survival"): Mark(Phase.GRANTED, 1, "vip")},
        ),
    )
    # A later commit without the JSON keeps it.
    await commit(store, "100", CustomerChange(T1, seen=[SeenItem("1", "vip-monthly", "renewed")]))
    customer = await known(store, "100")
    assert customer.items["1"].raw == '{"id": "1"}'
    assert customer.marks[("1", "survival")] == Mark(Phase.GRANTED, 1, "vip")
    assert customer.customer_raw == ALICE.raw


# --- an operator's cancel ---------------------------------------------------------------


@run_async
async def test_cancel_rows_cancels_only_this_customers_unfinished_rows(opener: Opener) -> None:
    store = opener()
    (a, b, c, d), (e, f) = await two_customers(store)
    await store.mark_delivered(a, T1)

    new = await commit(store, "100", CustomerChange(T2, cancel_rows=[a, b, e, 10_000]))
    assert new == []
    rows = {r.id: r for r in await store.journal(limit=None)}
    assert (rows[a].status, rows[a].finished_at) == (JournalStatus.DELIVERED, T1)
    assert (rows[b].status, rows[b].finished_at) == (JournalStatus.CANCELLED, T2)
    assert rows[e].status is JournalStatus.PENDING  # Bob's: not this block's customer
    assert [rows[x].status for x in (c, d)] == [JournalStatus.PENDING] * 2

    await commit(store, "200", CustomerChange(T2, cancel_rows=[f]))
    assert (await store.journal(row_ids=[f]))[0].status is JournalStatus.CANCELLED
    assert ids(await store.unfinished("survival")) == [e]
    # A cancelled row keeps its outcome.
    await store.mark_delivered(b, T2)
    assert (await store.journal(row_ids=[b]))[0].status is JournalStatus.CANCELLED


# --- retention -----------------------------------------------------------------------------


@run_async
async def test_prune_removes_the_oldest_finished_rows_a_batch_at_a_time(opener: Opener) -> None:
    store = opener()
    (a, b, c, d), (e, f) = await two_customers(store)
    await store.mark_delivered(c, T0 + timedelta(seconds=3))
    await store.mark_delivered(a, T0 + timedelta(seconds=1))
    await store.mark_failed(b, "unsafe", T0 + timedelta(seconds=2))
    await commit(store, "200", CustomerChange(T0 + timedelta(seconds=4), cancel_rows=[e]))
    cutoff = T0 + timedelta(seconds=10)

    assert await store.prune_journal(cutoff, 2) == 2
    assert ids(await store.journal()) == [f, e, d, c]  # a and b went first: finished first
    assert await store.prune_journal(cutoff, 2) == 2
    assert ids(await store.journal()) == [f, d]  # cancelled rows go too
    # Pending and waiting rows never go, however old.
    assert await store.prune_journal(T0 + timedelta(days=10_000), 100) == 0
    assert ids(await store.journal()) == [f, d]


@run_async
async def test_prune_keeps_rows_finished_at_or_after_the_cutoff(opener: Opener) -> None:
    store = opener()
    (a, b, *_), _ = await two_customers(store)
    await store.mark_delivered(a, T1)
    await store.mark_delivered(b, T2)
    assert await store.prune_journal(T1, 10) == 0
    assert await store.prune_journal(T2, 10) == 1
    assert b in ids(await store.journal()) and a not in ids(await store.journal())
    # Skipped and failed rows are finished when journaled.
    await commit(
        store,
        "100",
        CustomerChange(T0, entries=[entry("1", index=5, status=JournalStatus.SKIPPED)]),
    )
    assert await store.prune_journal(T1, 10) == 1


@run_async
async def test_a_pruned_row_is_gone_from_every_read(opener: Opener) -> None:
    store = opener()
    (a, b, c, d), _ = await two_customers(store)
    await store.mark_delivered(a, T1)
    assert await store.prune_journal(T2, 10) == 1
    assert ids(await store.rows()) == [b, c, d, *ids(await store.rows())[3:]]
    assert a not in ids(await store.rows("survival"))
    assert sum(c.delivered for c in await store.server_counts()) == 0
    # The marks are untouched: pruning decides nothing.
    assert (await known(store, "100")).marks[("1", "survival")].phase is Phase.GRANTED
