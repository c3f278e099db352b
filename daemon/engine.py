"""One sync pass: poll every linked customer, journal the events, deliver.

The pass runs two kinds of tasks side by side:
- a bounded pool of pollers: for each customer, read the whole inventory,
  diff it against the store (a pure function), render the commands and commit
  marks + journal rows in one transaction;
- one delivery worker per server: it opens one connection, delivers that
  server's pending journal rows in id order (older passes' leftovers come
  first, since ids only grow), and keeps going as pollers add rows, until
  polling is over and nothing is left.

A customer whose inventory cannot be read changes nothing in the store. A
server that cannot be reached keeps its rows pending for a later pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from adapters import PLATFORMS
from adapters.base import (
    CommandTooLong,
    GameServer,
    RconAuthError,
    RconConnectError,
    RconError,
)
from daemon.config import CustomerLink, Settings
from daemon.diff import Event, diff_inventory
from daemon.models import Customer, InventoryItem
from daemon.paynow import PayNowClient, PayNowError
from daemon.placeholders import Refusal, printable, render
from daemon.state import JournalEntry, JournalRow, JournalStatus, SeenItem, Store

log = logging.getLogger(__name__)

ServerFactory = Callable[[str], GameServer]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class PassReport:
    """What one pass did; `exit_code` follows SPEC §3."""

    customers_ok: int = 0
    customers_failed: dict[str, str] = field(default_factory=dict)  # label → error
    journaled: int = 0
    delivered: Counter[str] = field(default_factory=Counter)  # server → count
    failed: Counter[str] = field(default_factory=Counter)  # server → newly failed rows
    skipped: Counter[str] = field(default_factory=Counter)  # server → null-placeholder skips
    pending_left: dict[str, int] = field(default_factory=dict)  # server → rows still pending
    unreachable: dict[str, str] = field(default_factory=dict)  # server → why it stopped

    @property
    def exit_code(self) -> int:
        problems = (
            self.customers_failed or sum(self.failed.values()) or any(self.pending_left.values())
        )
        return 3 if problems else 0

    def summary(self) -> str:
        total_customers = self.customers_ok + len(self.customers_failed)
        parts = [
            f"{total_customers} customers polled ({len(self.customers_failed)} failed)",
            f"{self.journaled} commands journaled",
            f"{sum(self.delivered.values())} delivered",
            f"{sum(self.failed.values())} failed",
            f"{sum(self.skipped.values())} skipped",
            f"{sum(self.pending_left.values())} pending",
        ]
        pending = ", ".join(f"{s}: {n}" for s, n in sorted(self.pending_left.items()) if n)
        text = "pass done: " + ", ".join(parts)
        return f"{text} ({pending})" if pending else text


def customer_routes(settings: Settings, customer: Customer) -> dict[str, list[str]]:
    """Product slug → the servers its commands go to for this customer (SPEC §6)."""
    raw = customer.raw
    eligible = {
        name
        for name, server in settings.servers.items()
        if raw.get(PLATFORMS[server.platform].routing_field)
    }
    routes = {}
    for slug in settings.products:
        servers = [s for s in settings.routes_for(slug) if s in eligible]
        if servers:
            routes[slug] = servers
    return routes


def journal_entries(
    settings: Settings, customer: Customer, events: Iterable[Event]
) -> list[JournalEntry]:
    """Render every command of every event (in event order, then list order)."""
    entries = []
    for event in events:
        item: InventoryItem = event.item
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


def _describe_customer(customer: Customer) -> str:
    # The name comes from the customer: never let it put a line break in a log line.
    return f"{customer.id} ({printable(customer.name)})" if customer.name else customer.id


class SyncPass:
    """One pass over every linked customer and every server."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        paynow: PayNowClient,
        server_factory: ServerFactory,
        *,
        dry_run_output: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.paynow = paynow
        self.server_factory = server_factory
        # In a dry run, commands are printed through this instead of being sent.
        self.dry_run_output = dry_run_output
        self.report = PassReport()
        self._wake = {name: asyncio.Event() for name in settings.servers}
        self._polling_done = asyncio.Event()
        self._names: dict[str, str] = {}  # customer id → display text for log lines

    async def run(self) -> PassReport:
        workers = [
            asyncio.create_task(self._deliver(name), name=f"deliver-{name}")
            for name in self.settings.servers
        ]
        try:
            await self._poll_all(self.settings.customers)
        finally:
            self._polling_done.set()
            for wake in self._wake.values():
                wake.set()
            await asyncio.gather(*workers)
        for counts in await self.store.server_counts():
            if counts.pending:
                self.report.pending_left[counts.server] = counts.pending
        return self.report

    # --- polling -------------------------------------------------------------

    async def _poll_all(self, links: Sequence[CustomerLink]) -> None:
        queue = iter(enumerate(links))

        async def poller() -> None:
            for index, link in queue:
                await self._poll_one(index, link)

        size = min(self.settings.sync.concurrency, len(links)) or 1
        await asyncio.gather(*(poller() for _ in range(size)))

    async def _poll_one(self, index: int, link: CustomerLink) -> None:
        label = link.describe(index)
        token = link.secret.get_secret_value()
        try:
            customer = await self.paynow.fetch_customer(token)
            items = await self.paynow.fetch_inventory(token)
        except PayNowError as exc:
            log.error("customer %s: %s; nothing changed for this customer", label, exc)
            self.report.customers_failed[label] = str(exc)
            await self.store.record_error(label, str(exc), utcnow())
            return
        try:
            await self._apply(label, customer, items)
        except Exception as exc:  # one broken customer never stops the others
            log.exception("customer %s: unexpected error; nothing changed for this customer", label)
            self.report.customers_failed[label] = f"unexpected error: {exc.__class__.__name__}"
            return
        self.report.customers_ok += 1

    async def _apply(self, label: str, customer: Customer, items: list[InventoryItem]) -> None:
        self._names[customer.id] = _describe_customer(customer)
        known = await self.store.known(customer.id)
        result = diff_inventory(
            known.marks, known.items, items, customer_routes(self.settings, customer)
        )
        for item_id in result.disappeared:
            log.info("customer %s: item %s is no longer listed (no command runs)", label, item_id)
        for item_id, state in result.unknown_states:
            log.warning("customer %s: item %s has unknown state %r; ignored", label, item_id, state)
        entries = journal_entries(self.settings, customer, result.events)
        seen = [SeenItem(item.id, item.product.slug, item.state) for item in items]
        await self.store.commit_pass(
            label, customer.id, customer.name, seen, result.marks, entries, utcnow()
        )
        for entry in entries:
            if entry.status is JournalStatus.PENDING:
                self.report.journaled += 1
                self._wake[entry.server].set()
            elif entry.status is JournalStatus.SKIPPED:
                self.report.skipped[entry.server] += 1
                log.warning(
                    "skipped server=%s customer=%s product=%s event=%s command #%d: %s",
                    entry.server, self._names[customer.id], entry.product, entry.event,
                    entry.command_index + 1, entry.reason,
                )  # fmt: skip
            else:
                self.report.failed[entry.server] += 1
                log.error(
                    "refused server=%s customer=%s product=%s event=%s command #%d: %s",
                    entry.server, self._names[customer.id], entry.product, entry.event,
                    entry.command_index + 1, entry.reason,
                )  # fmt: skip

    # --- delivery ------------------------------------------------------------

    async def _deliver(self, name: str) -> None:
        """Deliver `name`'s pending rows in id order over one connection."""
        wake = self._wake[name]
        server: GameServer | None = None
        after_id = 0
        try:
            while True:
                wake.clear()
                rows = await self.store.pending(name, after_id=after_id)
                if not rows:
                    if self._polling_done.is_set():
                        return
                    await wake.wait()
                    continue
                for row in rows:
                    after_id = row.id
                    if self.dry_run_output is not None:
                        self.dry_run_output(f"{name}: {row.command}")
                        continue
                    if server is None:
                        server = await self._connect(name)
                        if server is None:
                            return
                    if not await self._send(name, server, row):
                        return
        finally:
            if server is not None:
                await server.close()

    async def _connect(self, name: str) -> GameServer | None:
        server = self.server_factory(name)
        try:
            await server.connect()
        except RconAuthError as exc:
            self._unreachable(name, f"password refused ({exc})")
        except (RconConnectError, RconError) as exc:
            self._unreachable(name, str(exc))
        else:
            return server
        await server.close()
        return None

    def _unreachable(self, name: str, reason: str) -> None:
        self.report.unreachable[name] = reason
        log.error("server %s: %s; its commands stay pending for a later pass", name, reason)

    async def _send(self, name: str, server: GameServer, row: JournalRow) -> bool:
        """Deliver one row; False when the server is unusable for the rest of the pass."""
        who = self._names.get(row.customer_id, row.customer_id)
        await self.store.mark_attempt(row.id)
        try:
            reply = await server.run(row.command)
        except CommandTooLong as exc:
            await self.store.mark_failed(row.id, str(exc), utcnow())
            self.report.failed[name] += 1
            log.error("refused server=%s customer=%s: %s", name, who, exc)
            return True
        except RconError as exc:
            # The command may or may not have run; it stays pending and is sent
            # again next pass (the one in flight when the link broke).
            self._unreachable(name, f"{exc} while sending command #{row.id}")
            return False
        await self.store.mark_delivered(row.id, utcnow())
        self.report.delivered[name] += 1
        log.info(
            "delivered server=%s customer=%s product=%s event=%s: %s",
            name, who, row.product, row.event, row.command,
        )  # fmt: skip
        if reply.strip():
            log.debug("server %s replied: %s", name, reply.strip()[:500])
        return True


def make_server_factory(settings: Settings) -> ServerFactory:
    def factory(name: str) -> GameServer:
        spec = settings.servers[name]
        cls = PLATFORMS[spec.platform]
        return cls(
            name,
            spec.host,
            spec.port,
            spec.secret.get_secret_value(),
            timeout=spec.timeout_seconds,
        )

    return factory


def pending_by_server(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{server}: {n}" for server, n in sorted(counts.items()))
