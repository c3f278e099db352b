"""Live items that reach no server: bought, and nothing is delivered for them.

Two causes, both computed by `find_undelivered` (a pure function of the
settings and the store's `live_items`) and told by every pass, the service,
`perksync status` and /metrics:

- the product's slug is not in `products` (a typo, or a product added to
  the store later), unless written as `products.<slug>: ignore`;
- the product is mapped, but the customer lacks the id that every server it
  goes to needs (`minecraft_uuid` for Minecraft, `steam_id` for Source: an
  offline-mode store, no Steam account linked).

"Live" is what keeps a perk: last seen `active` or `renewed`. `usable` items
are not granted yet by design, `used` and `revoked` ones are over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from adapters import PLATFORMS
from daemon.config import Settings
from daemon.placeholders import printable
from daemon.state import LiveItems, Store, StoreError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

# Customers lacking an id are warned about one per line up to this many per
# check; the rest in one line (an offline-mode store may have thousands).
UNROUTABLE_LOG_LINES = 10


@dataclass(frozen=True, slots=True)
class Unmapped:
    product: str
    items: int
    customers: int


@dataclass(frozen=True, slots=True)
class Unroutable:
    product: str
    label: str | None  # the customer's link (token mode)
    customer_id: str
    name: str | None
    items: int
    missing: tuple[str, ...]  # the ids any of which would route it (customer JSON fields)
    servers: tuple[str, ...]  # where the product goes


@dataclass(frozen=True, slots=True)
class Undelivered:
    unmapped: list[Unmapped] = field(default_factory=list)  # by slug
    unroutable: list[Unroutable] = field(default_factory=list)  # by slug, then label

    @property
    def items(self) -> int:
        return sum(u.items for u in self.unmapped) + sum(u.items for u in self.unroutable)

    def per_product(self) -> tuple[dict[str, int], dict[str, int]]:
        """(unmapped, missing id): live items per product slug."""
        missing: dict[str, int] = {}
        for u in self.unroutable:
            missing[u.product] = missing.get(u.product, 0) + u.items
        return {u.product: u.items for u in self.unmapped}, missing


def id_fields(settings: Settings) -> list[str]:
    """The customer fields the configured servers route by, in server order."""
    return list(dict.fromkeys(_field(settings, name) for name in settings.servers))


def _field(settings: Settings, server: str) -> str:
    return PLATFORMS[settings.servers[server].platform].routing_field


def find_undelivered(settings: Settings, live: Iterable[LiveItems]) -> Undelivered:
    """The live items of the configured links' customers that reach no server.

    A customer linked twice (two labels, one PayNow customer) counts once;
    in token mode only customers of configured links count (store mode:
    every customer), and a customer whose JSON is not stored is left out
    (its ids are unknown).
    """
    labels: set[str | None] = {link.describe(i) for i, link in enumerate(settings.customers)}
    if settings.store_mode:
        labels = {None}
    counted: dict[str, str | None] = {}  # customer id → the label its items were counted under
    unmapped: dict[str, list[int]] = {}  # slug → [items, customers]
    unroutable = []
    for row in live:
        if row.label not in labels or counted.setdefault(row.customer_id, row.label) != row.label:
            continue
        if row.product in settings.ignored_products:
            continue
        if row.product not in settings.products:
            totals = unmapped.setdefault(row.product, [0, 0])
            totals[0] += row.count
            totals[1] += 1
            continue
        servers = settings.routes_for(row.product)
        needed = list(dict.fromkeys(_field(settings, s) for s in servers))
        if row.ids is not None and not row.ids.intersection(needed):
            unroutable.append(
                Unroutable(
                    row.product, row.label, row.customer_id, row.name, row.count,
                    tuple(needed), tuple(servers),
                )
            )  # fmt: skip
    return Undelivered(
        [Unmapped(slug, n, c) for slug, (n, c) in sorted(unmapped.items())],
        sorted(unroutable, key=lambda u: (u.product, u.label or "", u.customer_id)),
    )


def live_items_phrase(count: int) -> str:
    return f"{count} live item{'' if count == 1 else 's'}"


def describe_unmapped(u: Unmapped) -> str:
    slug = printable(u.product)
    customers = f"{u.customers} customer{'' if u.customers == 1 else 's'}"
    return (
        f"product {slug}: {live_items_phrase(u.items)} ({customers}), but the config has "
        f"no products.{slug}: nothing is delivered for them (map it, or set it to ignore "
        f"if that is meant)"
    )


def describe_unroutable(u: Unroutable) -> str:
    who = f"{u.customer_id} ({printable(u.name)})" if u.name else u.customer_id
    reach = "reaches" if u.items == 1 else "reach"
    link = f" [{u.label}]" if u.label else ""
    return (
        f"product {u.product}: {live_items_phrase(u.items)} of customer {who}{link} "
        f"{reach} no server: the customer has no {' or '.join(u.missing)} "
        f"({u.product} goes to {', '.join(u.servers)})"
    )


class UndeliveredWatch:
    """Finds the live items that reach no server, from the store (so that
    answers skipped as unchanged, and a restart, make no difference), warns
    about each product and customer once per run, and counts them in
    telemetry.

    It reads every live item: `check()` once a pass, or per interval with the
    applier's commit count (then it reads only if something was committed,
    or the settings changed, since the last check)."""

    def __init__(self, settings: Settings, store: Store, telemetry: Telemetry) -> None:
        self.store = store
        self.telemetry = telemetry
        self.found = Undelivered()
        self._checked_at_commits: int | None = None
        self._warned: set[tuple[str, str]] = set()  # (slug, customer id or "")
        self.use_settings(settings)

    def use_settings(self, settings: Settings) -> None:
        """A reload: check, and warn, afresh."""
        self.settings = settings
        self._checked_at_commits = None
        self._warned.clear()

    async def check(self, commits: int | None = None) -> Undelivered:
        if commits is not None and commits == self._checked_at_commits:
            return self.found
        try:
            live = await self.store.live_item_counts(id_fields(self.settings))
        except StoreError as exc:
            log.warning("cannot check for items that reach no server: %s", exc)
            self._checked_at_commits = None  # try again at the next check
            return self.found
        self._checked_at_commits = commits
        self.found = find_undelivered(self.settings, live)
        self._warn(self.found)
        self.telemetry.undelivered(*self.found.per_product())
        return self.found

    def _warn(self, found: Undelivered) -> None:
        for unmapped in found.unmapped:
            if (unmapped.product, "") not in self._warned:
                self._warned.add((unmapped.product, ""))
                log.warning("%s", describe_unmapped(unmapped))
        new = [u for u in found.unroutable if (u.product, u.customer_id) not in self._warned]
        for unroutable in new[:UNROUTABLE_LOG_LINES]:
            log.warning("%s", describe_unroutable(unroutable))
        if len(new) > UNROUTABLE_LOG_LINES:
            log.warning(
                "and %d more customers hold live items that reach no server for want of an id "
                "(perksync status lists them)",
                len(new) - UNROUTABLE_LOG_LINES,
            )
        self._warned.update((u.product, u.customer_id) for u in new)
