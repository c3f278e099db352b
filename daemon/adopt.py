"""`perksync adopt`: take over a live store from another delivery system
(PayNow's own plugin, Tebex) without giving every customer their perks again.

It reads PayNow as a pass would (token mode: every linked customer's
inventory; store mode: one complete snapshot of the live items) and records
every item live now (`active` or `renewed`, its expiry not already past) as
granted on every server it routes to: the same marks a pass would store,
shared perks included, with no journal row. Nothing is sent. From then on
passes and the service act on changes only: an adopted item's expiry or
revoke takes the perk back, a new purchase is granted.

Only (item, server) pairs without a mark are recorded, and only items the
store never held are stored: what perksync already knows (granted, taken
back, stored in another state) is left for the next pass to decide. A
customer is stored with its JSON (local expiry and resend render from it);
its link's sync time and answers digest are not, so the first pass reads
and diffs everything once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from daemon.apply import Applier, customer_record, describe_customer, seen_item
from daemon.clock import Clock
from daemon.config import Settings
from daemon.diff import Mark, MarkKey, Phase, diff_inventory, effective_expiry
from daemon.models import InventoryItem
from daemon.operator import in_block
from daemon.paynow import RateLimiter, make_session
from daemon.placeholders import printable
from daemon.render import router
from daemon.sources import Answer
from daemon.state import CustomerChange, CustomerTxn, LinkSync, Store
from daemon.sync_pass import poll_links
from daemon.wiring import Core

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Adopted:
    """What adopt recorded (or, in a dry run, would record)."""

    items: int = 0
    marks: int = 0
    customers: int = 0
    lines: list[str] = field(default_factory=list)


class Adopter(Applier):
    """An `Applier` that records live items as granted and journals nothing."""

    def __init__(self, core: Core, output: Callable[[str], None]) -> None:
        super().__init__(
            core.settings, core.store, clock=core.clock, report=core.report,
            telemetry=core.telemetry, wake=core.wakers.ring, names=core.names,
        )  # fmt: skip
        self.output = output
        self.adopted = Adopted()

    async def apply(self, answer: Answer, *, label: str, link: LinkSync | None = None) -> None:
        customer = answer.customer
        self.names[customer.id] = describe_customer(customer)

        async def work(txn: CustomerTxn) -> dict[MarkKey, Mark]:
            return await self._adopt(txn, answer)

        marks = await in_block(self.store, customer.id, work)
        self.commits += 1
        if marks:
            self._tell(self.names[customer.id], answer.items, marks)

    async def _adopt(self, txn: CustomerTxn, answer: Answer) -> dict[MarkKey, Mark]:
        known = txn.known
        now = self.clock.now()
        expired_before = now - timedelta(seconds=self.settings.sync.expiry_grace_seconds)
        live = [i for i in answer.items if not _expired(i, expired_before)]
        route = router(self.settings, answer.customer)
        result = diff_inventory(known.marks, known.items.keys(), live, route, now, complete=False)
        marks = {
            key: mark
            for key, mark in result.marks.items()
            if key not in known.marks and mark.phase is Phase.GRANTED
        }
        if not marks:
            return {}
        adopted = {item_id for item_id, _ in marks}
        seen = [
            seen_item(item, answer.read_at)
            for item in live
            if item.id in adopted and item.id not in known.items
        ]
        record = customer_record(answer.customer)
        customer = None if record.digest == known.customer_digest else record
        await txn.commit(CustomerChange(now, customer, seen, marks))
        return marks

    def _tell(self, who: str, items: Sequence[InventoryItem], marks: dict[MarkKey, Mark]) -> None:
        servers: dict[str, list[str]] = {}
        for item_id, server in marks:
            servers.setdefault(item_id, []).append(server)
        products = {i.id: i.product.slug for i in items}
        for item_id, where in servers.items():
            product = printable(products.get(item_id, "?"))
            self.output(f"customer {who}: item {item_id} ({product}) granted on {', '.join(where)}")
        self.adopted.customers += 1
        self.adopted.items += len(servers)
        self.adopted.marks += len(marks)


def _expired(item: InventoryItem, before: datetime) -> bool:
    """Live by its state, but its expiry (and grace) already past: PayNow has
    not caught up; such an item is treated as ended, as a first sight would."""
    expiry = effective_expiry(item)
    return expiry is not None and expiry <= before


async def adopt(
    settings: Settings, store: Store, *, clock: Clock, output: Callable[[str], None]
) -> tuple[Adopted, int]:
    """Read PayNow once and record what is live; (what was recorded, how many
    customers or reads failed)."""
    core = Core(settings, store, clock)
    core.applier = adopter = Adopter(core, output)
    async with make_session() as session:
        limiter = RateLimiter(settings.paynow.requests_per_second)
        if settings.store_mode:
            await core.store_source(core.management(session, limiter)).snapshot()
        else:
            source = core.token_source(core.storefront(session, limiter), cache_customers=False)
            await poll_links(source, settings.customers, settings.sync.concurrency)
    return adopter.adopted, len(core.report.customers_failed)
