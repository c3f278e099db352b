"""`perksync resend`: after a map wipe or a move to new hardware, journal
`on_active` again for every item currently granted on one server.

Per customer, inside the customer's block (never racing a poll, in this
process or the service's): the items whose mark on the server is GRANTED
are rendered again from their stored JSON and the customer's, with the
current config, and journaled as new rows (`resend` = one more than the
item's highest there), pending for the service or the next pass to deliver.

- A shared perk (`products.<slug>.perk`) is resent once per customer: its
  *holder*, the oldest granted item of the perk there (smallest PayNow id:
  ids grow with time) whose product is still configured and not `once`,
  gets all its `on_active` commands; the perk's other items only their
  `per_item` ones. A holder that is skipped (below) is not replaced by
  another item: its grant is on its way. With `--product`, a perk is resent
  only where an item of that product holds it (resending every product in
  turn never grants a rank twice).
- Skipped, and said so: an item whose `on_active` there is still pending or
  waiting (the grant is on its way), whose take-back is journaled, whose
  product is `once: true`, left the config, or no longer goes to that
  server.

`plan_resend` decides (a pure function); `resend` reads, commits and reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from daemon.config import Settings
from daemon.diff import Event, EventKind, Mark, Phase, Share
from daemon.models import Customer, InventoryItem
from daemon.operator import UsageProblem, in_block
from daemon.perks import adopt_perks
from daemon.render import journal_entries, router
from daemon.state import (
    UNFINISHED,
    CustomerChange,
    CustomerTxn,
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    Store,
    StoreWriteError,
)

log = logging.getLogger(__name__)

TAKE_BACKS = frozenset({EventKind.EXPIRE.value, EventKind.REVOKE.value})


@dataclass(frozen=True, slots=True)
class Skip:
    item_id: str
    product: str
    why: str


@dataclass(slots=True)
class Plan:
    """One customer's resend: the rows to journal, and what is left out."""

    entries: list[JournalEntry] = field(default_factory=list)
    items: int = 0  # items that got rows
    skipped: list[Skip] = field(default_factory=list)


def flake_order(item_id: str) -> tuple[int, str]:
    """PayNow's ids grow with time: the shorter one is older, then by text."""
    return (len(item_id), item_id)


def next_resend(rows: Sequence[JournalRow], item_id: str, server: str, cycle: int) -> int:
    """One more than the highest resend among the item's rows of that grant."""
    return 1 + max(
        (r.resend for r in rows if (r.item_id, r.server, r.cycle) == (item_id, server, cycle)),
        default=0,
    )


def _why_not(
    settings: Settings,
    server: str,
    item_id: str,
    mark: Mark,
    rows: Sequence[JournalRow],
    product: str,
) -> str | None:
    """Why the item's on_active is not resent (None: it is)."""
    spec = settings.products.get(product)
    if spec is None:
        return "its product is no longer in the config"
    if spec.once:
        return "its product is once: true (never resent)"
    for row in rows:
        if row.item_id != item_id or row.server != server:
            continue
        if row.event == EventKind.ACTIVE.value and row.status in UNFINISHED:
            return f"its on_active there is still {row.status} (row {row.id})"
        if row.event in TAKE_BACKS and row.cycle == mark.cycle:
            return f"its take-back is journaled (row {row.id})"
    return None


def _holders(granted: Sequence[tuple[str, Mark, str]], settings: Settings) -> dict[str, str]:
    """Perk → the item holding it: the oldest granted one (`granted` is oldest
    first) whose product is configured and not once."""
    holders: dict[str, str] = {}
    for item_id, mark, product in granted:
        spec = settings.products.get(product)
        if mark.perk is not None and spec is not None and not spec.once:
            holders.setdefault(mark.perk, item_id)
    return holders


def plan_resend(
    settings: Settings,
    server: str,
    customer: Customer,
    known: KnownCustomer,
    rows: Sequence[JournalRow],
    *,
    product: str | None = None,
    at: datetime,
) -> Plan:
    """What resending the customer's grants on `server` journals (`rows`: the
    journal rows of the customer's items, any order)."""
    # Grants made before their product had a perk hold the perk of now.
    marks = adopt_perks(
        known.marks,
        {item_id: stored.product for item_id, stored in known.items.items()},
        {slug: spec.perk for slug, spec in settings.products.items() if spec.perk},
    )
    granted = sorted(
        (
            (item_id, mark, known.items[item_id].product)
            for (item_id, where), mark in marks.items()
            if where == server and mark.phase is Phase.GRANTED and item_id in known.items
        ),
        key=lambda g: flake_order(g[0]),
    )
    holders = _holders(granted, settings)
    route = router(settings, customer)
    plan = Plan()
    for item_id, mark, slug in granted:
        if product is not None and slug != product:
            continue
        why = _why_not(settings, server, item_id, mark, rows, slug)
        raw = known.items[item_id].raw
        if why is None and raw is None:
            why = "no JSON of it is stored to render from"
        if why is not None:
            plan.skipped.append(Skip(item_id, slug, why))
            continue
        assert raw is not None
        item = InventoryItem.from_api(json.loads(raw))
        if server not in route(item):
            plan.skipped.append(Skip(item_id, slug, f"its product no longer goes to {server}"))
            continue
        holder = item_id if mark.perk is None else holders.get(mark.perk)
        share = Share.OWN if holder == item_id else Share.JOINED
        entries = _render(settings, customer, item, server, mark.cycle, share, at)
        resend = next_resend(rows, item_id, server, mark.cycle)
        plan.entries += [dataclasses.replace(e, resend=resend) for e in entries]
        plan.items += 1 if entries else 0
    return plan


def _render(
    settings: Settings,
    customer: Customer,
    item: InventoryItem,
    server: str,
    cycle: int,
    share: Share,
    at: datetime,
) -> list[JournalEntry]:
    """The item's on_active rows, rendered now: all of them for the perk's
    holder (or an item without a perk), only the `per_item` ones otherwise."""
    event = Event(item, server, EventKind.ACTIVE, cycle, at, share)
    commands = settings.products[item.product.slug].commands(EventKind.ACTIVE.value)
    return [
        e
        for e in journal_entries(settings, customer, [event], at=at)
        if e.status is not JournalStatus.KEPT
        and (share is Share.OWN or commands[e.command_index].per_item)
    ]


# --- reading, committing, reporting ---------------------------------------------------


@dataclass(slots=True)
class ResendReport:
    journaled: int = 0
    items: int = 0
    customers: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # customers whose resend failed


def check_request(settings: Settings, server: str, product: str | None) -> None:
    if server not in settings.servers:
        known = ", ".join(settings.servers) or "none are configured"
        raise UsageProblem(f"resend --server {server}: no such server in the config ({known})")
    if product is not None and product not in settings.products:
        raise UsageProblem(f"resend --product {product}: no such product in the config")


async def resend(
    settings: Settings,
    store: Store,
    server: str,
    *,
    customer_id: str | None = None,
    product: str | None = None,
    dry_run: bool = False,
    now: Callable[[], datetime],
    output: Callable[[str], None] = print,
) -> ResendReport:
    """Resend on `server` (one customer's or every customer's grants)."""
    check_request(settings, server, product)
    customers = sorted({g.customer_id for g in await store.granted(server)})
    if customer_id is not None:
        customers = [c for c in customers if c == customer_id]
    report = ResendReport()
    for customer in customers:

        async def work(txn: CustomerTxn, customer: str = customer) -> Plan:
            return await _resend_one(settings, store, txn, server, product, dry_run, now())

        try:
            plan = await in_block(store, customer, work)
        except StoreWriteError:
            raise
        except Exception as exc:  # one broken customer never stops the others
            log.error("resend: customer %s: %s; nothing journaled for it", customer, exc)
            report.failed.append(customer)
            continue
        _report(report, customer, plan, output, dry_run)
    return report


async def _resend_one(
    settings: Settings,
    store: Store,
    txn: CustomerTxn,
    server: str,
    product: str | None,
    dry_run: bool,
    at: datetime,
) -> Plan:
    known = txn.known
    if known.customer_raw is None:
        raise ValueError("no JSON of the customer is stored to render from")
    customer = Customer.from_api(json.loads(known.customer_raw))
    item_ids = sorted({item_id for item_id, where in known.marks if where == server})
    rows = await store.journal(item_ids=item_ids, limit=None) if item_ids else []
    plan = plan_resend(settings, server, customer, known, rows, product=product, at=at)
    if plan.entries and not dry_run:
        await txn.commit(CustomerChange(at, entries=plan.entries))
    return plan


def _report(
    report: ResendReport, customer: str, plan: Plan, output: Callable[[str], None], dry_run: bool
) -> None:
    for skip in plan.skipped:
        log.info(
            "resend: customer %s item %s (%s) skipped: %s",
            customer, skip.item_id, skip.product, skip.why,
        )  # fmt: skip
    report.skipped += len(plan.skipped)
    if not plan.entries:
        return
    report.customers += 1
    report.items += plan.items
    for entry in plan.entries:
        if entry.status in (JournalStatus.FAILED, JournalStatus.SKIPPED):
            log.warning(
                "resend: customer %s item %s (%s) command #%d %s: %s",
                customer, entry.item_id, entry.product, entry.command_index + 1,
                "refused" if entry.status is JournalStatus.FAILED else "skipped", entry.reason,
            )  # fmt: skip
            continue
        report.journaled += 1
        if dry_run:
            output(f"{entry.server}: {entry.command}")
