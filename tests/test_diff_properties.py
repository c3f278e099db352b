"""Property-based tests of `diff_inventory` (the rules of when commands run).

Random sequences of inventory snapshots (items changing state, vanishing and
coming back, listed twice) and random routing changes are folded through the
diff exactly as the engine does: the marks of each result are stored on top of
the known ones, and `known_items` is every item id seen so far. Then the
history of events must obey the rules of when commands run; shared perks
are folded through their share decision the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.diff import (
    GRANTING_STATES,
    Event,
    EventKind,
    Mark,
    MarkKey,
    Phase,
    ProductRules,
    Share,
    diff_inventory,
)
from daemon.models import KNOWN_STATES, InventoryItem
from daemon.perks import share_events
from tests.conftest import by_product, item

# A few items; each always belongs to the same product.
ITEM_PRODUCTS = {"101": "vip", "102": "vip", "103": "kit", "1000": "kit"}
PRODUCTS = ("vip", "kit", "other")
SERVERS = ("survival", "creative", "lobby")
STATES = ("usable", "active", "renewed", "used", "revoked", "suspended")
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _stamp(minutes: int | None) -> str | None:
    if minutes is None:
        return None
    return (EPOCH + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


@cache
def make_item(item_id: str, state: str, active: int | None, ended: int | None) -> InventoryItem:
    return item(
        item_id,
        state,
        ITEM_PRODUCTS[item_id],
        quantity_index=0,
        added_at=_stamp(0),
        active_at=_stamp(active),
        expires_at=None,
        removed_at=_stamp(ended) if state == "used" else None,
        revoked_at=_stamp(ended) if state == "revoked" else None,
        revoke_reason="refund" if state == "revoked" else None,
    )


# One listing of an item: (id, state, active_at minutes, ended_at minutes).
entries = st.tuples(
    st.sampled_from(sorted(ITEM_PRODUCTS)),
    st.sampled_from(STATES),
    st.none() | st.integers(0, 100),
    st.none() | st.integers(0, 100),
)
# A snapshot lists some of the items (others vanish), occasionally one twice.
snapshots = st.lists(entries, max_size=6)
# Routes: some products, each to a list of servers (possibly with repeats).
routes_st = st.dictionaries(
    st.sampled_from(PRODUCTS), st.lists(st.sampled_from(SERVERS), max_size=4), max_size=3
)
passes = st.lists(st.tuples(snapshots, routes_st), min_size=1, max_size=8)


@dataclass
class History:
    granted: Counter[MarkKey]
    ended: dict[MarkKey, EventKind]


def consistent_states(snapshot: list[tuple[str, str, int | None, int | None]]) -> dict[str, str]:
    """Item id → state, for items listed in one state only (duplicates that agree count)."""
    states: dict[str, set[str]] = {}
    for item_id, state, _, _ in snapshot:
        states.setdefault(item_id, set()).add(state)
    return {item_id: next(iter(s)) for item_id, s in states.items() if len(s) == 1}


@SETTINGS
@given(passes)
def test_folding_snapshots_obeys_the_event_rules(
    run: list[tuple[list[tuple[str, str, int | None, int | None]], dict[str, list[str]]]],
) -> None:
    marks: dict[MarkKey, Mark] = {}
    known_items: set[str] = set()
    history = History(Counter(), {})

    for snapshot, routes in run:
        items = [make_item(*entry) for entry in snapshot]
        result = diff_inventory(marks, frozenset(known_items), items, by_product(routes))

        listed = {entry[0] for entry in snapshot}
        clean = consistent_states(snapshot)

        # Bookkeeping outputs.
        assert set(result.disappeared) == known_items - listed
        assert len(result.disappeared) == len(set(result.disappeared))
        assert {i for i, _ in result.unknown_states} == {
            i for i, s in clean.items() if s not in KNOWN_STATES
        }
        # Events come ordered by when they happened.
        stamps = [e.happened_at for e in result.events]
        assert stamps == sorted(stamps)
        # At most one event per (item, server) in a pass.
        keys = [(e.item.id, e.server) for e in result.events]
        assert len(keys) == len(set(keys))
        # Every changed mark belongs to an event of this pass, and vice versa.
        assert set(result.marks) == set(keys)

        for event in result.events:
            key = (event.item.id, event.server)
            # Only routed servers, only for items listed in one clear state.
            assert event.server in routes.get(event.item.product.slug, [])
            assert event.item.id in clean
            state = clean[event.item.id]
            if event.kind is EventKind.ACTIVE:
                assert state in GRANTING_STATES
                # on_active at most once per (item, server), ever.
                assert history.granted[key] == 0, key
                history.granted[key] += 1
                assert result.marks[key] == Mark(Phase.GRANTED, 1)
            else:
                expected = EventKind.EXPIRE if state == "used" else EventKind.REVOKE
                assert state in ("used", "revoked")
                assert event.kind is expected
                # An end only after a grant in an earlier pass, and only one end.
                assert history.granted[key] == 1, key
                assert key not in history.ended, (key, history.ended[key])
                history.ended[key] = event.kind
                assert result.marks[key].phase is Phase.ENDED
                assert event.cycle == marks[key].cycle

        # Fold the result in, exactly as the engine does.
        marks.update(result.marks)
        known_items |= listed

        # The stored marks say what happened, nothing more.
        for key, mark in marks.items():
            assert history.granted[key] == 1
            assert mark.phase is (Phase.ENDED if key in history.ended else Phase.GRANTED)
        assert set(marks) == set(history.granted)

        # Liveness: what is active and routed now has been granted there; what
        # ended after a grant has had its end event.
        for item_id, state in clean.items():
            for server in routes.get(ITEM_PRODUCTS[item_id], []):
                key = (item_id, server)
                if state in GRANTING_STATES:
                    assert history.granted[key] == 1, key
                if state in ("used", "revoked") and history.granted[key]:
                    assert key in history.ended, key


@settings(SETTINGS, max_examples=150)
@given(passes)
def test_the_diff_is_deterministic_and_order_independent(
    run: list[tuple[list[tuple[str, str, int | None, int | None]], dict[str, list[str]]]],
) -> None:
    """The same inventory listed in another order gives the same events and marks."""
    marks: dict[MarkKey, Mark] = {}
    known: set[str] = set()
    for snapshot, routes in run:
        items = [make_item(*entry) for entry in snapshot]
        forward = diff_inventory(marks, known, items, by_product(routes))
        backward = diff_inventory(marks, known, items[::-1], by_product(routes))
        # Items listed twice in conflicting states are skipped, so the order of
        # the copies does not matter; agreeing copies differ only in timestamps.
        clean = consistent_states(snapshot)
        unique = all(Counter(e[0] for e in snapshot)[i] == 1 for i in clean)
        if unique:
            assert [(e.item.id, e.server, e.kind, e.happened_at) for e in forward.events] == [
                (e.item.id, e.server, e.kind, e.happened_at) for e in backward.events
            ]
        assert forward.marks == backward.marks
        assert forward.disappeared == backward.disappeared
        marks.update(forward.marks)
        known |= {entry[0] for entry in snapshot}


@SETTINGS
@given(
    st.lists(st.sampled_from(sorted(KNOWN_STATES | {"suspended"})), min_size=1, max_size=10),
    st.lists(st.sampled_from(SERVERS), min_size=1, max_size=3, unique=True),
)
def test_one_item_through_any_state_sequence(states: list[str], servers: list[str]) -> None:
    """A single item on fixed servers: the events form a prefix of grant, then one end."""
    marks: dict[MarkKey, Mark] = {}
    per_server: dict[str, list[EventKind]] = {s: [] for s in servers}
    for index, state in enumerate(states):
        result = diff_inventory(
            marks,
            {"101"} if index else set(),
            [make_item("101", state, 5, 9)],
            by_product({"vip": servers}),
        )
        for event in result.events:
            per_server[event.server].append(event.kind)
        marks.update(result.marks)

    first_grant = next((i for i, s in enumerate(states) if s in GRANTING_STATES), None)
    for server, kinds in per_server.items():
        if first_grant is None:
            assert kinds == [], server
            continue
        assert kinds[0] is EventKind.ACTIVE
        ending = [s for s in states[first_grant:] if s in ("used", "revoked")]
        if ending:
            end = EventKind.EXPIRE if ending[0] == "used" else EventKind.REVOKE
            assert kinds == [EventKind.ACTIVE, end], server
        else:
            assert kinds == [EventKind.ACTIVE], server


# --- with local expiry --------------------------------------------------------------

# A step is either a poll (an item's state and expiry in minutes) or a sweep of the
# local expiry at some time (minutes).
poll_steps = st.tuples(
    st.just("poll"),
    st.sampled_from(("usable", "active", "renewed", "used", "revoked")),
    st.none() | st.integers(0, 100),
    st.integers(0, 100),
)
sweep_steps = st.tuples(st.just("sweep"), st.just(""), st.none(), st.integers(0, 100))
lifetimes = st.lists(st.one_of(poll_steps, sweep_steps), min_size=1, max_size=12)


@cache
def expiring_item(state: str, expires: int | None) -> InventoryItem:
    base = make_item("101", state, 1, 2)
    data = dict(base.raw, expires_at=_stamp(expires))
    return InventoryItem.from_api(data)


@SETTINGS
@given(lifetimes)
def test_local_expiry_and_polls_alternate_grant_and_end(
    steps: list[tuple[str, str, int | None, int]],
) -> None:
    """Whatever mix of polls and local-expiry sweeps (as the engine runs them): per
    item and server the commands alternate grant, end, grant, end…, each cycle has
    at most one grant and one end, and a renewal grants again only after a lapse."""
    key = ("101", "survival")
    marks: dict[MarkKey, Mark] = {}
    history: list[tuple[str, int]] = []  # (kind, cycle)
    state, expires = "usable", None
    for action, new_state, new_expiry, minute in steps:
        now = EPOCH + timedelta(minutes=minute)
        if action == "poll":
            state, expires = new_state, new_expiry
            result = diff_inventory(
                marks,
                {"101"},
                [expiring_item(state, expires)],
                by_product({"vip": ["survival"]}),
                now,
            )
            history += [(e.kind.value, e.cycle) for e in result.events]
            marks.update(result.marks)
        else:
            # The sweep: a granted item last seen active whose expiry has passed.
            mark = marks.get(key)
            due = expires is not None and EPOCH + timedelta(minutes=expires) <= now
            if mark is not None and mark.phase is Phase.GRANTED and state == "active" and due:
                history.append(("on_expire", mark.cycle))
                marks[key] = Mark(Phase.LAPSED, mark.cycle)
    kinds = [kind for kind, _ in history]
    assert kinds[::2] == ["on_active"] * len(kinds[::2])
    assert all(kind in ("on_expire", "on_revoke") for kind in kinds[1::2])
    cycles = [cycle for _, cycle in history]
    assert cycles == [i // 2 + 1 for i in range(len(history))]


# --- shared perks -------------------------------------------------------------------

# Items of four products: two share the perk "rank", one has a perk of its own,
# one has none.
PERK_ITEMS = {"201": "vip_month", "202": "vip_year", "203": "vip_month", "204": "fly", "205": "kit"}
PERKS = {"vip_month": "rank", "vip_year": "rank", "fly": "flight"}
PERK_SERVERS = ("survival", "creative")


@cache
def perk_item(item_id: str, state: str, expires: int | None, active: int) -> InventoryItem:
    base = make_item("101", state, active, active + 1)
    data = dict(base.raw, id=item_id, expires_at=_stamp(expires))
    data["product"] = dict(data["product"], slug=PERK_ITEMS[item_id])
    return InventoryItem.from_api(data)


perk_polls = st.tuples(
    st.just("poll"),
    st.lists(
        st.tuples(
            st.sampled_from(sorted(PERK_ITEMS)),
            st.sampled_from(("usable", "active", "renewed", "used", "revoked")),
            st.none() | st.integers(0, 200),
            st.integers(0, 100),
        ),
        max_size=5,
    ),
    st.booleans(),  # complete: the whole inventory, or a part (store mode)
    st.dictionaries(
        st.sampled_from(sorted(set(PERK_ITEMS.values()))),
        st.lists(st.sampled_from(PERK_SERVERS), max_size=2),
    ),
)
perk_sweeps = st.tuples(st.just("sweep"), st.just([]), st.just(True), st.just({}))
perk_runs = st.lists(
    st.tuples(st.one_of(perk_polls, perk_sweeps), st.integers(0, 20)), min_size=1, max_size=10
)


@dataclass
class PerkWorld:
    """What the engine stores (marks, last state and expiry of each item) and
    what the servers were sent, per (server, perk): "grant" / "take"."""

    marks: dict[MarkKey, Mark]
    items: dict[str, tuple[str, int | None]]
    sent: dict[tuple[str, str], list[str]]

    def fold(self, events: list[Any], marks: dict[MarkKey, Mark]) -> None:
        shared = share_events(self.marks, events, marks)
        for event in shared.events:
            key = (event.item.id, event.server)
            perk = marks[key].perk
            if perk is None:
                assert event.share is Share.OWN
                continue
            holders = self.holders(event.server, perk) - {event.item.id}
            sent = self.sent.setdefault((event.server, perk), [])
            starts = event.kind is EventKind.ACTIVE
            if event.share is Share.OWN:
                # The perk is granted when nobody holds it, taken back when the last ends.
                assert not holders, (event, holders)
                sent.append("grant" if starts else "take")
            else:
                assert holders, event
                assert event.share is (Share.JOINED if starts else Share.KEPT)
            self.marks[key] = marks[key]

    def holders(self, server: str, perk: str) -> set[str]:
        return {
            item_id
            for (item_id, s), mark in self.marks.items()
            if s == server and mark.perk == perk and mark.phase is Phase.GRANTED
        }


@SETTINGS
@given(perk_runs)
def test_shared_perks_are_granted_once_and_taken_back_when_the_last_item_ends(
    run: list[tuple[tuple[str, Any, bool, dict[str, list[str]]], int]],
) -> None:
    """Polls (whole or partial) and local-expiry sweeps in any mix: per customer,
    server and perk, the commands sent alternate grant, take-back, grant…, and
    the perk is held exactly while some item of it is granted there."""
    world = PerkWorld({}, {}, {})
    rules = ProductRules(perks=PERKS)
    minute = 0
    for (action, snapshot, complete, routes), step in run:
        minute += step
        now = EPOCH + timedelta(minutes=minute)
        if action == "poll":
            items = [perk_item(*entry) for entry in snapshot]
            result = diff_inventory(world.marks, set(world.items), items, by_product(routes),
                                    now, complete=complete, rules=rules)  # fmt: skip
            world.fold(result.events, result.marks)
            clean = consistent_states([(e[0], e[1], None, None) for e in snapshot])
            expiries = {e[0]: e[2] for e in snapshot}
            world.items.update({i: (state, expiries[i]) for i, state in clean.items()})
        else:
            events, lapsed = [], {}
            for (item_id, server), mark in sorted(world.marks.items()):
                state, expires = world.items[item_id]
                due = expires is not None and EPOCH + timedelta(minutes=expires) <= now
                if mark.phase is Phase.GRANTED and state == "active" and due:
                    item = perk_item(item_id, state, expires, 0)
                    events.append(Event(item, server, EventKind.EXPIRE, mark.cycle, now))
                    lapsed[(item_id, server)] = Mark(Phase.LAPSED, mark.cycle, mark.perk)
            world.fold(events, lapsed)
        for (server, perk), sent in world.sent.items():
            assert sent == ["grant", "take"] * (len(sent) // 2) + ["grant"] * (len(sent) % 2)
            held = bool(sent) and sent[-1] == "grant"
            assert held == bool(world.holders(server, perk)), (server, perk, sent)
    # A mark's perk is its product's: nothing moved it.
    for (item_id, _), mark in world.marks.items():
        assert mark.perk == PERKS.get(PERK_ITEMS[item_id])
