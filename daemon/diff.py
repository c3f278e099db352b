"""The inventory diff: (what we knew, what the API says now) → events.

A pure function, no I/O, so that the rules of when commands run can be tested
exhaustively (see tests/test_diff_properties.py).

What we know is kept per item *and server* as a `Mark`: whether `on_active`
ran there (GRANTED) or the perk was already taken back there (ENDED), the
grant cycle (1 for the first grant; the service's local expiry may add later
ones), and the shared perk it was granted under. Expire and revoke only ever
follow a grant we ran, so an item first seen `used` or `revoked` runs nothing.
How the events of items sharing a perk run is decided afterwards, from the
marks (daemon/perks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from daemon.models import KNOWN_STATES, InventoryItem, parse_timestamp


class Phase(StrEnum):
    GRANTED = "granted"
    ENDED = "ended"
    # on_expire ran locally at expires_at (+ grace) before the API said `used`.
    LAPSED = "lapsed"


class EventKind(StrEnum):
    ACTIVE = "on_active"
    EXPIRE = "on_expire"
    REVOKE = "on_revoke"


@dataclass(frozen=True, slots=True)
class Mark:
    phase: Phase
    cycle: int
    # The shared perk the item was granted under (`products.<slug>.perk` at
    # the time), or None: a config change later does not move a grant.
    perk: str | None = None


class Share(StrEnum):
    """How an event of an item of a shared perk runs (items without a perk: OWN)."""

    OWN = "own"  # all of the event's commands
    # A grant while the customer holds the perk there already, or a take-back
    # while another granted item of the perk remains: only the commands marked
    # `per_item` run; the others are journaled `kept` and not sent.
    JOINED = "joined"
    KEPT = "kept"


MarkKey = tuple[str, str]  # (item id, server name)


@dataclass(frozen=True, slots=True)
class Event:
    item: InventoryItem
    server: str
    kind: EventKind
    cycle: int
    happened_at: datetime
    share: Share = Share.OWN


@dataclass(slots=True)
class DiffResult:
    events: list[Event] = field(default_factory=list)
    # The marks to store after this pass (only the ones that changed).
    marks: dict[MarkKey, Mark] = field(default_factory=dict)
    # Items known from before that the API no longer lists (logged, no revoke).
    disappeared: list[str] = field(default_factory=list)
    # (item id, state) of items in a state this version does not know.
    unknown_states: list[tuple[str, str]] = field(default_factory=list)
    # Ids the API listed more than once in this inventory (logged). Copies that
    # agree on the state count once; copies that disagree make the answer
    # ambiguous for that item, which then runs nothing this pass.
    duplicates: list[str] = field(default_factory=list)
    # Items listed active or renewed whose expiry (plus the grace) had passed
    # before they were ever granted on a server: nothing runs for them there,
    # as if they had been seen `used` (logged).
    expired_unseen: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProductRules:
    """What the config says of products beyond their commands and routes."""

    # Product slug → its shared perk (products without one are left out).
    perks: Mapping[str, str] = field(default_factory=dict)
    # Slugs of one-time products: granted only where they were routed to
    # when first granted, never again (no server added later, no renewal).
    once: frozenset[str] = frozenset()
    # An item whose expiry is this far past is not granted anew.
    grace: timedelta = timedelta(0)


NO_RULES = ProductRules()


GRANTING_STATES = frozenset({"active", "renewed"})
_ENDING = {"used": EventKind.EXPIRE, "revoked": EventKind.REVOKE}


def _happened_at(item: InventoryItem, kind: EventKind) -> datetime:
    stamp = {
        EventKind.ACTIVE: item.active_at,
        EventKind.EXPIRE: item.removed_at or item.expires_at,
        EventKind.REVOKE: item.revoked_at,
    }[kind]
    return parse_timestamp(stamp or item.added_at)


def effective_expiry(item: InventoryItem) -> datetime | None:
    """When the item ends: PayNow's override if set, else its natural expiry."""
    stamp = item.override_expires_at or item.expires_at
    return parse_timestamp(stamp) if stamp else None


def diff_inventory(
    known_marks: Mapping[MarkKey, Mark],
    known_items: Collection[str],
    items: Sequence[InventoryItem],
    route: Callable[[InventoryItem], Sequence[str]],
    now: datetime | None = None,
    *,
    complete: bool = True,
    rules: ProductRules = NO_RULES,
) -> DiffResult:
    """Work out the events of one customer's items.

    `route` gives the servers an item's commands go to *for this customer*
    (platform routing already applied; an empty result: ignored).
    `complete` says that `items` is the whole inventory, every state: only
    then are known items it lacks reported as disappeared. A part (new
    items, a snapshot of live ones) says nothing of the items it lacks.

    Events come ordered by when they happened (then item id), so that a
    revoke never overtakes its grant and one customer's events on one server
    run in the order they happened.

    An item id listed more than once is handled once (first copy) if every
    copy has the same state, and not at all this pass if they disagree; a
    server listed twice for an item counts once. Either would otherwise
    run `on_active` twice, or both `on_expire` and `on_revoke`, in one pass.

    A LAPSED mark (the service ran on_expire locally when expires_at passed)
    is granted again, as a new cycle, only when the API shows the item
    active with an expiry after `now` (a renewal); seen `used` or `revoked`
    it just becomes ENDED: its perk was already taken back once.

    `rules`: a grant records its product's shared perk in its mark (an end
    keeps the mark's); a one-time product is granted only in the pass that
    first grants it anywhere; an item with no grant on a server yet whose
    expiry plus the grace is not after `now` is not granted there (it would
    be taken back at once).
    """
    result = DiffResult()
    states: dict[str, set[str]] = {}
    for item in items:
        states.setdefault(item.id, set()).add(item.state)
    seen: set[str] = set()
    duplicated: set[str] = set()
    granted_before = {item_id for item_id, _ in known_marks}
    expired: dict[str, None] = {}  # item ids, in the order met
    for item in items:
        if item.id in seen:
            duplicated.add(item.id)
            continue
        seen.add(item.id)
        if len(states[item.id]) > 1:
            continue
        if item.state not in KNOWN_STATES:
            result.unknown_states.append((item.id, item.state))
            continue
        once = item.product.slug in rules.once
        for server in dict.fromkeys(route(item)):
            key = (item.id, server)
            mark = known_marks.get(key)
            if item.state in GRANTING_STATES:
                cycle = 0
                if mark is None:
                    if _past(item, now, rules.grace):
                        expired.setdefault(item.id)
                    elif not (once and item.id in granted_before):
                        cycle = 1
                elif mark.phase is Phase.LAPSED and _renewed(item, now) and not once:
                    cycle = mark.cycle + 1
                if cycle:
                    perk = rules.perks.get(item.product.slug)
                    result.marks[key] = Mark(Phase.GRANTED, cycle, perk)
                    happened = _happened_at(item, EventKind.ACTIVE)
                    result.events.append(Event(item, server, EventKind.ACTIVE, cycle, happened))
            elif item.state in _ENDING and mark is not None:
                if mark.phase is Phase.GRANTED:
                    kind = _ENDING[item.state]
                    result.marks[key] = Mark(Phase.ENDED, mark.cycle, mark.perk)
                    result.events.append(
                        Event(item, server, kind, mark.cycle, _happened_at(item, kind))
                    )
                elif mark.phase is Phase.LAPSED:
                    result.marks[key] = Mark(Phase.ENDED, mark.cycle, mark.perk)
    result.expired_unseen = list(expired)
    if complete:
        result.disappeared = sorted(set(known_items) - seen, key=_flake_order)
    result.duplicates = sorted(duplicated, key=_flake_order)
    result.events.sort(key=lambda e: (e.happened_at, _flake_order(e.item.id), e.server))
    return result


def _past(item: InventoryItem, now: datetime | None, grace: timedelta) -> bool:
    """Whether the item's expiry plus `grace` is already not after `now`."""
    expiry = effective_expiry(item)
    return expiry is not None and now is not None and expiry + grace <= now


def _renewed(item: InventoryItem, now: datetime | None) -> bool:
    expiry = effective_expiry(item)
    return expiry is None or now is None or expiry > now


def _flake_order(item_id: str) -> tuple[int, str]:
    return (len(item_id), item_id)
