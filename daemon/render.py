"""Where an item's commands go and what they say: pure functions of the
settings, the customer and the events (no I/O).

- `router(settings, customer)`: item → the servers its commands go to for
  this customer. A product goes to its `servers` (default every server); on
  each only for customers with the id the platform needs (`minecraft_uuid`,
  `steam_id`). In store mode an item marked `skip_commands` goes nowhere, and
  one whose `execute_on_gameserver_id` matches a server's
  `paynow_gameserver_id` goes to that server only.
- `journal_entries(settings, customer, events, at=...)`: every command of
  every event, rendered (or refused, or skipped), in event order, then list
  order. An event that joins or keeps a shared perk journals its commands
  `kept` (not sent) except those marked `per_item`. A command's `online`
  and `delay_seconds` go on its row (not before `at` + the delay); its row
  starts pending, and delivery decides when it may be sent.
- `product_rules(settings)`: the products' shared perks, one-time products
  and the expiry grace, as the diff needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from adapters import PLATFORMS
from adapters.base import GameServer
from daemon.config import Command, Settings
from daemon.diff import Event, ProductRules, Share
from daemon.models import Customer, InventoryItem
from daemon.placeholders import Refusal, render
from daemon.state import JournalEntry, JournalStatus

Router = Callable[[InventoryItem], Sequence[str]]


def eligible_servers(settings: Settings, customer: Customer) -> frozenset[str]:
    """The servers whose platform can act on this customer (it has their id)."""
    raw = customer.raw
    return frozenset(
        name
        for name, server in settings.servers.items()
        if raw.get(PLATFORMS[server.platform].routing_field)
    )


def router(settings: Settings, customer: Customer) -> Router:
    """Item → the servers its commands go to, for this customer."""
    eligible = eligible_servers(settings, customer)
    by_product: dict[str, tuple[str, ...]] = {}
    for slug in settings.products:
        by_product[slug] = tuple(s for s in settings.routes_for(slug) if s in eligible)
    by_gameserver = {
        server.paynow_gameserver_id: name
        for name, server in settings.servers.items()
        if server.paynow_gameserver_id is not None
    }

    def route(item: InventoryItem) -> Sequence[str]:
        servers = by_product.get(item.product.slug, ())
        if not servers:
            return servers
        if item.raw.get("skip_commands") is True:
            return ()
        target = by_gameserver.get(item.execute_on_gameserver_id or "")
        if target is not None:
            return (target,) if target in servers else ()
        return servers

    return route


def product_rules(settings: Settings) -> ProductRules:
    products = settings.products
    return ProductRules(
        perks={slug: p.perk for slug, p in products.items() if p.perk is not None},
        once=frozenset(slug for slug, p in products.items() if p.once),
        grace=timedelta(seconds=settings.sync.expiry_grace_seconds),
    )


# Why a shared perk's command was journaled `kept` rather than sent.
KEPT_REASONS = {
    Share.JOINED: "the shared perk is already held here by another item",
    Share.KEPT: "the shared perk is still held here by another item",
}


def journal_entries(
    settings: Settings, customer: Customer, events: Iterable[Event], *, at: datetime
) -> list[JournalEntry]:
    """Render every command of every event (in event order, then list order);
    `at`: when they are journaled (delays count from then)."""
    entries = []
    for event in events:
        item: InventoryItem = event.item
        if event.server not in settings.servers or item.product.slug not in settings.products:
            continue  # removed from the config since (a reload): nothing to run
        platform = PLATFORMS[settings.servers[event.server].platform]
        commands = settings.products[item.product.slug].commands(event.kind.value)
        for index, command in enumerate(commands):
            status, reason, text = _rendered(command, customer, item, platform)
            if event.share is not Share.OWN and not command.per_item:
                status, reason = JournalStatus.KEPT, KEPT_REASONS[event.share]
            delay = command.delay_seconds
            entries.append(
                JournalEntry(
                    customer_id=customer.id,
                    item_id=item.id,
                    product=item.product.slug,
                    server=event.server,
                    event=event.kind.value,
                    cycle=event.cycle,
                    command_index=index,
                    command=text,
                    status=status,
                    reason=reason,
                    online=command.online,
                    not_before=at + timedelta(seconds=delay) if delay else None,
                )
            )
    return entries


def _rendered(
    command: Command, customer: Customer, item: InventoryItem, platform: type[GameServer]
) -> tuple[JournalStatus, str | None, str]:
    """(status, why, text): the command rendered, or refused (FAILED), or
    skipped for a null placeholder (SKIPPED; the template's text then)."""
    template = command.template
    rendered = render(template, customer, item, forbidden=platform.forbidden_in_values)
    if isinstance(rendered, Refusal):
        status = JournalStatus.SKIPPED if rendered.kind == "null" else JournalStatus.FAILED
        return status, rendered.reason, template.text
    size = len(rendered.encode("utf-8"))
    if size > platform.max_command_bytes:
        reason = (
            f"command is {size} bytes, over the {platform.platform} limit "
            f"of {platform.max_command_bytes}"
        )
        return JournalStatus.FAILED, reason, rendered
    return JournalStatus.PENDING, None, rendered
