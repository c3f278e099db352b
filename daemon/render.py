"""Where an item's commands go and what they say: pure functions of the
settings, the customer and the events (no I/O).

- `router(settings, customer)`: item → the servers its commands go to for
  this customer. A product goes to its `servers` (default every server); on
  each only for customers with the id the platform needs (`minecraft_uuid`,
  `steam_id`). In store mode an item marked `skip_commands` goes nowhere, and
  one whose `execute_on_gameserver_id` matches a server's
  `paynow_gameserver_id` goes to that server only.
- `journal_entries(settings, customer, events)`: every command of every
  event, rendered (or refused, or skipped), in event order, then list order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from adapters import PLATFORMS
from daemon.config import Settings
from daemon.diff import Event
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


def journal_entries(
    settings: Settings, customer: Customer, events: Iterable[Event]
) -> list[JournalEntry]:
    """Render every command of every event (in event order, then list order)."""
    entries = []
    for event in events:
        item: InventoryItem = event.item
        if event.server not in settings.servers or item.product.slug not in settings.products:
            continue  # removed from the config since (a reload): nothing to run
        platform = PLATFORMS[settings.servers[event.server].platform]
        templates = settings.products[item.product.slug].templates(event.kind.value)
        for index, template in enumerate(templates):
            status, reason = JournalStatus.PENDING, None
            rendered = render(template, customer, item, forbidden=platform.forbidden_in_values)
            if isinstance(rendered, Refusal):
                status = JournalStatus.SKIPPED if rendered.kind == "null" else JournalStatus.FAILED
                reason, command = rendered.reason, template.text
            else:
                command = rendered
                size = len(command.encode("utf-8"))
                if size > platform.max_command_bytes:
                    status = JournalStatus.FAILED
                    reason = (
                        f"command is {size} bytes, over the {platform.platform} limit "
                        f"of {platform.max_command_bytes}"
                    )
            entries.append(
                JournalEntry(
                    customer_id=customer.id,
                    item_id=item.id,
                    product=item.product.slug,
                    server=event.server,
                    event=event.kind.value,
                    cycle=event.cycle,
                    command_index=index,
                    command=command,
                    status=status,
                    reason=reason,
                )
            )
    return entries
