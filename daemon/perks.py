"""Shared perks: how the events of items that share one grant run.

Items of every product with the same `perk` share one grant per customer
and server, as a rank does. Walking one customer's events in the order they
happened, with the set of items holding each perk on each server:

- a grant while another item holds the perk there *joins* it: only its
  `per_item` commands run, the others are journaled `kept` and not sent;
- an end while another item still holds it is *kept* the same way; the end
  of the last holder runs whole, and cancels the perk's `on_active` rows
  there that wait (online-only or delayed ones not sent yet: a grant that
  never went out need not go out before its take-back). Any end of an item
  without a perk cancels its own.

An end that is kept cancels nothing: the ending item's own unsent grant may
be the very one the remaining items hold the perk through.

Which perk an item holds comes from its mark (the perk at grant time), so a
config change never moves a grant already made; only marks made before
their product had a perk (or before perksync knew perks) take the perk
their product has now (`adopt_perks`). Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from daemon.diff import Event, EventKind, Mark, MarkKey, Phase, Share


@dataclass(slots=True)
class Shared:
    events: list[Event] = field(default_factory=list)  # same order, each with its share
    # (item, server) whose waiting on_active rows the commit cancels.
    cancel_grants: list[MarkKey] = field(default_factory=list)


def adopt_perks(
    marks: Mapping[MarkKey, Mark], product_of: Mapping[str, str], perks: Mapping[str, str]
) -> dict[MarkKey, Mark]:
    """The marks, those without a perk given their product's perk of now
    (`product_of`: item id → product slug; `perks`: slug → perk)."""
    adopted = dict(marks)
    for key, mark in marks.items():
        if mark.perk is None:
            perk = perks.get(product_of.get(key[0], ""))
            if perk is not None:
                adopted[key] = dataclasses.replace(mark, perk=perk)
    return adopted


def share_events(
    known: Mapping[MarkKey, Mark],
    events: Sequence[Event],
    marks: Mapping[MarkKey, Mark],
    open_grants: Collection[MarkKey] = frozenset(),
) -> Shared:
    """Each event with its share, and the grants the ends cancel.

    `known`: the marks before these events; `events`: in the order they
    happened; `marks`: the mark each event leads to (it names the perk);
    `open_grants`: (item, server) whose on_active rows are still pending or
    waiting."""
    holders: dict[tuple[str, str], set[str]] = {}  # (server, perk) → item ids
    for (item_id, server), mark in known.items():
        if mark.phase is Phase.GRANTED and mark.perk is not None:
            holders.setdefault((server, mark.perk), set()).add(item_id)
    shared = Shared()
    cancel: dict[MarkKey, None] = {}
    for event in events:
        key = (event.item.id, event.server)
        perk = marks[key].perk
        starts = event.kind is EventKind.ACTIVE
        if perk is None:
            shared.events.append(event)
            if not starts and key in open_grants:
                cancel[key] = None
            continue
        held = holders.setdefault((event.server, perk), set())
        if starts:
            share = Share.JOINED if held else Share.OWN
            held.add(event.item.id)
        else:
            held.discard(event.item.id)
            share = Share.KEPT if held else Share.OWN
            if not held:
                cancel.update(dict.fromkeys(_grants_of(perk, event.server, open_grants, known)))
        shared.events.append(dataclasses.replace(event, share=share))
    shared.cancel_grants = sorted(cancel)
    return shared


def _grants_of(
    perk: str, server: str, open_grants: Collection[MarkKey], known: Mapping[MarkKey, Mark]
) -> list[MarkKey]:
    """The open grants on `server` of items marked with `perk`."""
    return [
        key
        for key in open_grants
        if key[1] == server and (mark := known.get(key)) is not None and mark.perk == perk
    ]
