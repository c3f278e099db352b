"""Example tests of shared perks: which events of items sharing a perk run
whole, join, or are kept, and which unsent grants a take-back cancels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from daemon.diff import Event, EventKind, Mark, MarkKey, Phase, Share
from daemon.perks import adopt_perks, share_events
from tests.conftest import ITEM_A, ITEM_B, ITEM_C, item

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def event(item_id: str, kind: EventKind, minute: int, server: str = "survival") -> Event:
    return Event(item(item_id), server, kind, 1, T0 + timedelta(minutes=minute))


def mark(phase: Phase, perk: str | None = "rank") -> Mark:
    return Mark(phase, 1, perk)


def after(events: list[Event], perk: str | None = "rank") -> dict[MarkKey, Mark]:
    """The mark each event leads to."""
    return {
        (e.item.id, e.server): mark(
            Phase.GRANTED if e.kind is EventKind.ACTIVE else Phase.ENDED, perk
        )
        for e in events
    }


def shares(events: list[Event], known: dict[MarkKey, Mark] | None = None) -> list[Share]:
    return [e.share for e in share_events(known or {}, events, after(events)).events]


def test_the_first_grant_runs_whole_and_a_second_item_joins() -> None:
    events = [event(ITEM_A, EventKind.ACTIVE, 0), event(ITEM_B, EventKind.ACTIVE, 1)]
    assert shares(events) == [Share.OWN, Share.JOINED]
    # A grant while a stored mark holds the perk joins it too.
    held = {(ITEM_A, "survival"): mark(Phase.GRANTED)}
    assert shares([event(ITEM_B, EventKind.ACTIVE, 1)], held) == [Share.JOINED]


def test_an_end_is_kept_while_another_item_holds_the_perk_and_the_last_runs_whole() -> None:
    held = {(ITEM_A, "survival"): mark(Phase.GRANTED), (ITEM_B, "survival"): mark(Phase.GRANTED)}
    events = [event(ITEM_A, EventKind.EXPIRE, 0), event(ITEM_B, EventKind.REVOKE, 1)]
    assert shares(events, held) == [Share.KEPT, Share.OWN]


def test_events_are_walked_in_the_order_given() -> None:
    held = {(ITEM_A, "survival"): mark(Phase.GRANTED)}
    # The old item ends before the new one starts: the perk goes, then comes back.
    events = [event(ITEM_A, EventKind.EXPIRE, 0), event(ITEM_B, EventKind.ACTIVE, 1)]
    assert shares(events, held) == [Share.OWN, Share.OWN]
    # The new one starts first: it joins, and the old one's end is kept.
    events = [event(ITEM_B, EventKind.ACTIVE, 0), event(ITEM_A, EventKind.EXPIRE, 1)]
    assert shares(events, held) == [Share.JOINED, Share.KEPT]


def test_perks_are_per_server_and_per_name() -> None:
    held = {(ITEM_A, "survival"): mark(Phase.GRANTED)}
    on_creative = [event(ITEM_B, EventKind.ACTIVE, 0, server="creative")]
    assert shares(on_creative, held) == [Share.OWN]
    other = [event(ITEM_B, EventKind.ACTIVE, 0)]
    result = share_events(held, other, after(other, perk="flight"))
    assert [e.share for e in result.events] == [Share.OWN]


def test_items_without_a_perk_and_ended_or_lapsed_marks_hold_nothing() -> None:
    known = {
        (ITEM_A, "survival"): mark(Phase.GRANTED, perk=None),
        (ITEM_B, "survival"): mark(Phase.LAPSED),
        (ITEM_C, "survival"): mark(Phase.ENDED),
    }
    assert shares([event("9", EventKind.ACTIVE, 0)], known) == [Share.OWN]
    no_perk = [event(ITEM_A, EventKind.EXPIRE, 0), event("9", EventKind.ACTIVE, 1)]
    result = share_events(known, no_perk, after(no_perk, perk=None))
    assert [e.share for e in result.events] == [Share.OWN, Share.OWN]


def test_the_last_take_back_cancels_the_perks_unsent_grants_there() -> None:
    known = {
        (ITEM_A, "survival"): mark(Phase.GRANTED),
        (ITEM_B, "survival"): mark(Phase.GRANTED),
        (ITEM_B, "creative"): mark(Phase.GRANTED),
        (ITEM_C, "survival"): mark(Phase.GRANTED, perk="flight"),
    }
    open_grants = frozenset(known)
    first = [event(ITEM_A, EventKind.EXPIRE, 0)]
    # Kept: nothing is cancelled (the item's grant may be what B holds the perk through).
    assert share_events(known, first, after(first), open_grants).cancel_grants == []
    both = [*first, event(ITEM_B, EventKind.REVOKE, 1)]
    result = share_events(known, both, after(both), open_grants)
    # The perk ends on survival: its unsent grants there, not creative's, not flight's.
    assert result.cancel_grants == [(ITEM_A, "survival"), (ITEM_B, "survival")]


def test_an_item_without_a_perk_cancels_only_its_own_unsent_grant() -> None:
    known = {(ITEM_A, "survival"): mark(Phase.GRANTED, None)}
    events = [event(ITEM_A, EventKind.REVOKE, 0)]
    result = share_events(known, events, after(events, None), {(ITEM_A, "survival")})
    assert result.cancel_grants == [(ITEM_A, "survival")]
    assert share_events(known, events, after(events, None)).cancel_grants == []


def test_marks_made_before_their_product_had_a_perk_adopt_the_perk_of_now() -> None:
    marks = {
        (ITEM_A, "survival"): Mark(Phase.GRANTED, 1),
        (ITEM_B, "survival"): Mark(Phase.GRANTED, 1, "old"),
        (ITEM_C, "survival"): Mark(Phase.GRANTED, 1),
    }
    products = {ITEM_A: "vip", ITEM_B: "vip", ITEM_C: "kit"}
    assert adopt_perks(marks, products, {"vip": "rank"}) == {
        (ITEM_A, "survival"): Mark(Phase.GRANTED, 1, "rank"),
        (ITEM_B, "survival"): Mark(Phase.GRANTED, 1, "old"),  # never moved
        (ITEM_C, "survival"): Mark(Phase.GRANTED, 1),
    }
