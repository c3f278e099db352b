"""Polling, local expiry and delivery: the parts shared by `--sync-now` and the service.

- `Engine.poll` reads one customer's whole inventory, diffs it against the
  store (a pure function), renders the commands and commits marks + journal
  rows in one transaction, then wakes the servers concerned. Answers that
  match the digest stored by the last pass that acted on them are not
  decoded, validated or diffed again: only their sync time is recorded.
- `Engine.sweep_expiries` runs `on_expire` for granted items whose
  `expires_at` (+ grace) has passed, from the stored JSON, without the API.
- `ServerWorker` delivers one server's pending journal rows in id order (older
  passes' leftovers first, since ids only grow) over one connection.
- `SyncPass` is one `--sync-now` pass: a bounded pool of pollers beside one
  worker per server, which keeps delivering as pollers add rows until polling
  is over and nothing is left.

A customer whose inventory cannot be read changes nothing in the store. A
server that cannot be reached keeps its rows pending for a later attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from adapters import PLATFORMS
from adapters.base import CommandTooLong, GameServer, RconAuthError, RconError
from daemon.config import CustomerLink, Settings
from daemon.diff import Event, EventKind, Mark, MarkKey, Phase, diff_inventory, effective_expiry
from daemon.models import Customer, InventoryItem, encodable
from daemon.paynow import InventoryPages, PayNowAuthError, PayNowClient, PayNowError
from daemon.placeholders import Refusal, printable, render
from daemon.state import (
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    SeenItem,
    Store,
    StoreError,
    StoreWriteError,
)
from daemon.telemetry import NullTelemetry, Telemetry
from daemon.undelivered import (
    Undelivered,
    describe_unmapped,
    describe_unroutable,
    find_undelivered,
    id_fields,
    live_items_phrase,
)

log = logging.getLogger(__name__)

ServerFactory = Callable[[str], GameServer]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class PassReport:
    """What happened since it was created; `exit_code` follows SPEC §3."""

    polls_ok: int = 0
    polls_failed: int = 0
    customers_failed: dict[str, str] = field(default_factory=dict)  # label → error
    journaled: int = 0
    expired_locally: int = 0
    delivered: Counter[str] = field(default_factory=Counter)  # server → count
    failed: Counter[str] = field(default_factory=Counter)  # server → newly failed rows
    skipped: Counter[str] = field(default_factory=Counter)  # server → null-placeholder skips
    pending_left: dict[str, int] = field(default_factory=dict)  # server → rows still pending
    unreachable: dict[str, str] = field(default_factory=dict)  # server → why it stopped
    undelivered_items: int = 0  # live items that reach no server (warned about; no exit 3)

    @property
    def exit_code(self) -> int:
        undelivered = sum(self.failed.values()) or any(self.pending_left.values())
        return 3 if self.customers_failed or undelivered else 0

    def summary(self, *, service: bool = False) -> str:
        """`pass done: …` after a pass, which polls each linked customer once;
        `last interval: …` in the service, which counts polls (a customer may
        be polled several times in an interval, or not at all)."""
        if service:
            polls = self.polls_ok + self.polls_failed
            parts = [f"{polls} polls ({self.polls_failed} failed)"]
        else:
            failed = len(self.customers_failed)
            parts = [f"{self.polls_ok + failed} customers polled ({failed} failed)"]
        if self.expired_locally:
            parts.append(f"{self.expired_locally} expired locally")
        parts += [
            f"{self.journaled} commands journaled",
            f"{sum(self.delivered.values())} delivered",
            f"{sum(self.failed.values())} failed",
            f"{sum(self.skipped.values())} skipped",
            f"{sum(self.pending_left.values())} pending",
        ]
        pending = ", ".join(f"{s}: {n}" for s, n in sorted(self.pending_left.items()) if n)
        text = ("last interval: " if service else "pass done: ") + ", ".join(parts)
        if pending:
            text += f" ({pending})"
        if self.undelivered_items:
            items = live_items_phrase(self.undelivered_items)
            reach = "reaches" if self.undelivered_items == 1 else "reach"
            # A pass has just warned about each; the service may have done so days ago.
            where = "perksync status lists them" if service else "see the warnings above"
            text += f"; {items} {reach} no server ({where})"
        return text


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


def same_as_stored(known: KnownCustomer, items: Sequence[InventoryItem]) -> bool:
    """Whether the inventory lists exactly the stored items, in their stored state
    and expiry (then a poll has nothing to write but its sync time)."""
    return len(known.states) == len(items) and all(
        known.states.get(item.id) == (item.state, effective_expiry(item)) for item in items
    )


def _stored_name(customer: Customer) -> str | None:
    return None if customer.name is None else encodable(customer.name)


def describe_customer(customer: Customer) -> str:
    # The name comes from the customer: never let it put a line break in a log line.
    return f"{customer.id} ({printable(customer.name)})" if customer.name else customer.id


# A link's customer is read again at least every this many polls (a newly
# linked Minecraft or Steam account changes where its perks go).
CUSTOMER_REFRESH_POLLS = 10

# Part of every answers digest: a version whose diff or stored state differs
# must not trust the digests an older one stored. Bump it when they change.
DIGEST_VERSION = b"perksync answers digest 1"

# Unchanged polls' sync times are written this many at a time (one transaction).
TOUCH_BATCH = 1000

# Customers lacking an id are warned about one per line up to this many per
# check; the rest in one line (an offline-mode store may have thousands).
UNROUTABLE_LOG_LINES = 10


def settings_key(settings: Settings) -> bytes:
    """What of the settings decides a poll's outcome besides the API's answers:
    the products (which servers, which commands) and the servers' platforms."""
    products = {slug: spec.model_dump(mode="json") for slug, spec in settings.products.items()}
    platforms = {name: server.platform for name, server in settings.servers.items()}
    text = json.dumps([products, platforms], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(DIGEST_VERSION + text.encode(), digest_size=32).digest()


def customer_digest(body: bytes) -> bytes:
    """16 bytes: the customer's answer, byte for byte."""
    return hashlib.blake2b(body, digest_size=16).digest()


def answers_digest(key: bytes, customer: bytes, inventory: InventoryPages) -> bytes:
    """The 32 bytes stored per link: the customer's digest, then a digest keyed
    by the settings (`settings_key`) of that and every inventory page.

    The customer's part lets a service poll that reads only the inventory
    check it against the stored answers; the keyed part makes every stored
    digest mismatch once the settings change what the same answers mean.
    """
    digest = hashlib.blake2b(customer, digest_size=16, key=key)
    for body in inventory.bodies:
        digest.update(len(body).to_bytes(8, "big"))
        digest.update(body)
    return customer + digest.digest()


def _is_stored(
    key: bytes, customer: bytes, stored: bytes | None
) -> Callable[[InventoryPages], bool] | None:
    """The `known` test of `PayNowClient.read_inventory` for one poll."""
    if stored is None:
        return None
    return lambda pages: answers_digest(key, customer, pages) == stored


class Engine:
    """Polls customers, expires items locally and journals the commands.

    `settings` may be replaced between polls (a reload); a `ServerWorker` per
    server registers itself to be woken when rows for it are journaled.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        paynow: PayNowClient,
        *,
        telemetry: Telemetry | None = None,
        cache_customers: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.paynow = paynow
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.report = PassReport()
        self.names: dict[str, str] = {}  # customer id → display text for log lines
        self.wakers: dict[str, asyncio.Event] = {}  # server → its worker's wake-up
        self.auth_failures: set[str] = set()  # labels whose token PayNow rejects (logged once)
        # Service mode: most polls read only the inventory, and check it with
        # the stored digest of the customer; this counts down, per link, the
        # polls left before the customer itself is read again.
        self._reads_left: dict[str, int] | None = {} if cache_customers else None
        self._missing_logged: set[str] = set()
        self._key = settings_key(settings)
        self._digests: dict[str, bytes] | None = None  # label → stored; loaded at the first poll
        self._touches: dict[str, datetime] = {}  # unchanged polls' sync times, not yet written
        # Live items that reach no server, as last checked; what was warned about.
        self.undelivered = Undelivered()
        self._live_changed = True  # a pass was stored (or the settings changed) since
        self._warned: set[tuple[str, str]] = set()  # (slug, customer id or "")

    def use_settings(self, settings: Settings) -> None:
        """A reload. If it changed what answers mean, no stored digest matches
        any more, and every link's next poll reads and diffs everything.
        What reaches no server is checked, and warned about, afresh."""
        self.settings = settings
        self._key = settings_key(settings)
        self._live_changed = True
        self._warned.clear()

    def wake(self, server: str) -> None:
        waker = self.wakers.get(server)
        if waker is not None:
            waker.set()

    # --- polling -------------------------------------------------------------

    async def poll(self, index: int, link: CustomerLink) -> bool:
        """Poll one linked customer; False if its inventory could not be read.

        Answers whose digest matches the one stored by the last pass that acted
        on them change nothing, so they are neither validated nor diffed: only
        the sync time is recorded (in batches, see `flush_touches`).
        """
        label = link.describe(index)
        token = link.secret.get_secret_value()
        if self._digests is None:
            self._digests = await self.store.digests()
        stored = self._digests.get(label)
        reads_left = self._reads_left
        paynow = self.paynow
        key = self._key
        try:
            inventory: InventoryPages | None = None
            if reads_left is not None and stored is not None and reads_left.get(label, 1) > 0:
                # The usual service poll: the inventory alone tells whether
                # anything changed; only then is the customer read again.
                inventory = await paynow.read_inventory(token, _is_stored(key, stored[:16], stored))
                if inventory.known_answer:
                    reads_left[label] = reads_left.get(label, CUSTOMER_REFRESH_POLLS) - 1
                    await self._unchanged(label)
                    return True
            customer_body = await paynow.read_customer(token)
            customer_part = customer_digest(customer_body)
            if inventory is None:
                known = _is_stored(key, customer_part, stored)
                inventory = await paynow.read_inventory(token, known)
            digest = answers_digest(key, customer_part, inventory)
            if digest != stored:
                customer = paynow.parse_customer(token, customer_body)
                items = paynow.inventory_items(token, inventory)
        except PayNowError as exc:
            self._poll_failed(label, exc.kind, str(exc))
            if isinstance(exc, PayNowAuthError) and label in self.auth_failures:
                log.debug("customer %s: %s (still)", label, exc)
            else:
                log.error("customer %s: %s; nothing changed for this customer", label, exc)
            if isinstance(exc, PayNowAuthError):
                self.auth_failures.add(label)
            self._touches.pop(label, None)  # the error is the newer news
            await self.store.record_error(label, str(exc), utcnow())
            return False
        self.auth_failures.discard(label)
        if digest == stored:
            await self._unchanged(label)
        else:
            try:
                await self._apply(label, customer, items, digest)
            except StoreWriteError:
                raise  # not this customer's fault: nothing more can be recorded
            except Exception as exc:  # one broken customer never stops the others
                log.exception(
                    "customer %s: unexpected error; nothing changed for this customer", label
                )
                error = f"unexpected error: {exc.__class__.__name__}"
                self._poll_failed(label, "unexpected", error)
                return False
            self._poll_ok(label)
        if reads_left is not None:
            reads_left[label] = CUSTOMER_REFRESH_POLLS
        return True

    async def _unchanged(self, label: str) -> None:
        self._touches[label] = utcnow()
        self._poll_ok(label)
        if len(self._touches) >= TOUCH_BATCH:
            await self.flush_touches()

    async def flush_touches(self) -> None:
        """Write the sync times of unchanged polls. They are only what
        `perksync status` shows, so a crash before this loses no perk, and a
        failure is logged, not raised (but for `StoreWriteError`: the database
        cannot be written at all)."""
        if not self._touches:
            return
        touches, self._touches = self._touches, {}
        try:
            await self.store.touch_unchanged(touches)
        except StoreWriteError:
            raise
        except StoreError as exc:
            log.warning("cannot record the sync time of %d customers: %s", len(touches), exc)

    def _poll_ok(self, label: str) -> None:
        self.report.polls_ok += 1
        self.report.customers_failed.pop(label, None)
        self.telemetry.poll_succeeded(label, time.time())

    def _poll_failed(self, label: str, kind: str, error: str) -> None:
        self.report.polls_failed += 1
        self.report.customers_failed[label] = error
        self.telemetry.poll_failed(label, kind)

    async def _apply(
        self, label: str, customer: Customer, items: list[InventoryItem], digest: bytes
    ) -> None:
        self.names[customer.id] = describe_customer(customer)
        known = await self.store.known(customer.id)
        routes = customer_routes(self.settings, customer)
        now = utcnow()
        result = diff_inventory(known.marks, known.items, items, routes, now)
        for item_id in result.disappeared:
            if item_id not in self._missing_logged:  # once per process, not every poll
                self._missing_logged.add(item_id)
                log.info(
                    "customer %s: item %s is no longer listed (no command runs)", label, item_id
                )
        for item_id, state in result.unknown_states:
            log.warning("customer %s: item %s has unknown state %r; ignored", label, item_id, state)
        for item_id in result.duplicates:
            log.warning("customer %s: item %s is listed more than once", label, item_id)
        self._touches.pop(label, None)  # superseded by what is written now
        self._live_changed = True
        customer_raw = json.dumps(customer.raw, separators=(",", ":"))
        if not result.marks and same_as_stored(known, items):
            # Nothing changed but the answers' bytes (or the settings, or this
            # is the first pass since an upgrade): only the sync time, digest
            # and customer (an account unlinked changes where perks can go).
            await self.store.touch(
                label, customer.id, _stored_name(customer), now, digest, customer_raw
            )
            self._remember(label, digest)
            return
        expiries = {item.id: effective_expiry(item) for item in items}
        entries = journal_entries(self.settings, customer, result.events)
        # The JSON is kept only where local expiry may need to render from it
        # (json.dumps escapes what UTF-8 cannot carry: it is stored as sent).
        seen = [
            SeenItem(
                item.id,
                encodable(item.product.slug),
                encodable(item.state),
                expiries[item.id],
                json.dumps(item.raw, separators=(",", ":")) if expiries[item.id] else None,
            )
            for item in items
        ]
        await self.store.commit_pass(
            label,
            customer.id,
            _stored_name(customer),
            seen,
            result.marks,
            entries,
            now,
            customer_raw,
            digest,
        )
        self._remember(label, digest)
        self._journaled(entries)

    def _remember(self, label: str, digest: bytes) -> None:
        if self._digests is not None:
            self._digests[label] = digest

    def _journaled(self, entries: Sequence[JournalEntry]) -> None:
        for entry in entries:
            who = self.names.get(entry.customer_id, entry.customer_id)
            if entry.status is JournalStatus.PENDING:
                self.report.journaled += 1
                self.wake(entry.server)
                continue
            outcome = "skipped" if entry.status is JournalStatus.SKIPPED else "failed"
            getattr(self.report, outcome)[entry.server] += 1
            self.telemetry.command_finished(entry.server, outcome)
            level = logging.WARNING if outcome == "skipped" else logging.ERROR
            log.log(
                level,
                "%s server=%s customer=%s product=%s event=%s command #%d: %s",
                "skipped" if outcome == "skipped" else "refused",
                entry.server, who, entry.product, entry.event, entry.command_index + 1,
                entry.reason,
            )  # fmt: skip

    # --- live items that reach no server ----------------------------------------

    async def check_undelivered(self, *, only_if_changed: bool = False) -> Undelivered:
        """Find the live items that reach no server, from the store (so that
        answers skipped as unchanged, and a restart, make no difference), log
        each product and customer newly found, and count them in telemetry.

        It reads every live item: call it once a pass, or per interval with
        `only_if_changed` (then it reads only if a poll stored something, or
        the settings changed, since the last check).
        """
        if only_if_changed and not self._live_changed:
            return self.undelivered
        self._live_changed = False
        try:
            live = await self.store.live_items(id_fields(self.settings))
        except StoreError as exc:
            self._live_changed = True
            log.warning("cannot check for items that reach no server: %s", exc)
            return self.undelivered
        self.undelivered = find_undelivered(self.settings, live)
        self._warn_undelivered(self.undelivered)
        self.telemetry.undelivered(*self.undelivered.per_product())
        return self.undelivered

    def _warn_undelivered(self, found: Undelivered) -> None:
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

    # --- local expiry --------------------------------------------------------

    async def sweep_expiries(self) -> int:
        """Run on_expire for granted items whose expiry (+ grace) has passed.

        Works from the stored JSON, so it needs no API; the item's mark becomes
        LAPSED, and a later `used` from the API runs nothing again.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.sync.expiry_grace_seconds)
        due = await self.store.due_expiries(cutoff)
        if not due:
            return 0
        marks: dict[MarkKey, Mark] = {}
        entries: list[JournalEntry] = []
        for expiry in due:
            if self._digests is not None:
                # Its marks change now: the next poll must diff again.
                self._digests.pop(expiry.label, None)
            item = InventoryItem.from_api(json.loads(expiry.item_raw))
            key = (item.id, expiry.server)
            if key in marks:
                continue
            customer = Customer.from_api(json.loads(expiry.customer_raw))
            self.names.setdefault(customer.id, describe_customer(customer))
            marks[key] = Mark(Phase.LAPSED, expiry.cycle)
            event = Event(item, expiry.server, EventKind.EXPIRE, expiry.cycle, expiry.expires_at)
            entries.extend(journal_entries(self.settings, customer, [event]))
            log.info(
                "customer %s: item %s (%s) expired at %s; taking the perk back on %s",
                expiry.label, item.id, item.product.slug,
                expiry.expires_at.isoformat(timespec="seconds"), expiry.server,
            )  # fmt: skip
        await self.store.commit_expiry(marks, entries, now)
        self.report.expired_locally += len(marks)
        self._journaled(entries)
        return len(marks)


class ServerWorker:
    """Delivers one server's pending journal rows, in id order, over one connection."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        server_factory: ServerFactory,
        *,
        dry_run_output: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.server_factory = server_factory
        # In a dry run, commands are printed through this instead of being sent.
        self.dry_run_output = dry_run_output
        self.wake = asyncio.Event()
        engine.wakers[name] = self.wake
        self.server: GameServer | None = None
        self.last_error: str | None = None
        self.auth_refused = False
        self._after_id = 0  # dry run only: rows printed stay pending

    async def deliver_available(self, stopping: asyncio.Event | None = None) -> bool:
        """Deliver every row pending now; False if the server failed (rows stay pending).

        Stops between two commands (never in the middle of one) once `stopping` is set.
        """
        store = self.engine.store
        while True:
            rows = await store.pending(self.name, after_id=self._after_id)
            if not rows:
                self.engine.telemetry.backlog(self.name, 0)
                return True
            for row in rows:
                if stopping is not None and stopping.is_set():
                    return True
                if self.dry_run_output is not None:
                    self._after_id = row.id
                    self.dry_run_output(f"{self.name}: {row.command}")
                    continue
                if not await self._send(row):
                    return False

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.close()

    async def _connect(self) -> GameServer | None:
        server = self.server_factory(self.name)
        try:
            await server.connect()
        except RconError as exc:
            self.auth_refused = isinstance(exc, RconAuthError)
            reason = f"password refused ({exc})" if self.auth_refused else str(exc)
            self._failed(reason)
            await server.close()
            return None
        self.auth_refused = False
        return server

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.error("server %s: %s; its commands stay pending", self.name, reason)
        self.last_error = reason
        self.engine.report.unreachable[self.name] = reason
        self.engine.telemetry.delivery_failed(self.name, reason)

    async def _send(self, row: JournalRow) -> bool:
        """Deliver one row; False when the server is unusable for now."""
        engine = self.engine
        if self.server is None:
            self.server = await self._connect()
            if self.server is None:
                return False
        who = engine.names.get(row.customer_id, row.customer_id)
        await engine.store.mark_attempt(row.id)
        try:
            reply = await self.server.run(row.command)
        except CommandTooLong as exc:
            await engine.store.mark_failed(row.id, str(exc), utcnow())
            engine.report.failed[self.name] += 1
            engine.telemetry.command_finished(self.name, "failed")
            log.error("refused server=%s customer=%s: %s", self.name, who, exc)
            return True
        except RconError as exc:
            # The command may or may not have run; it stays pending and is sent
            # again later (the one in flight when the link broke).
            await self.close()
            self._failed(f"{exc} while sending journal row {row.id}")
            return False
        if self.last_error is not None:
            log.info("server %s: delivering again", self.name)
            self.last_error = None
        await engine.store.mark_delivered(row.id, utcnow())
        engine.report.delivered[self.name] += 1
        engine.report.unreachable.pop(self.name, None)
        engine.telemetry.command_finished(self.name, "delivered")
        log.info(
            "delivered server=%s customer=%s product=%s event=%s: %s",
            self.name, who, row.product, row.event, row.command,
        )  # fmt: skip
        if reply.strip():
            log.debug("server %s replied: %s", self.name, printable(reply.strip(), 500))
        return True


class SyncPass:
    """One `--sync-now` pass over every linked customer and every server."""

    def __init__(
        self,
        engine: Engine,
        server_factory: ServerFactory,
        *,
        dry_run_output: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.workers = [
            ServerWorker(engine, name, server_factory, dry_run_output=dry_run_output)
            for name in engine.settings.servers
        ]
        self._polling_done = asyncio.Event()

    async def run(self) -> PassReport:
        """The pass. A `StoreWriteError` (or any other error) anywhere stops
        every poll and delivery at once and is raised: the one command in
        flight on each server stays pending and may be sent again."""
        try:
            async with asyncio.TaskGroup() as group:
                for worker in self.workers:
                    group.create_task(self._deliver(worker))
                group.create_task(self._poll_everything())
        except BaseExceptionGroup as failures:
            raise _first_failure(failures) from None
        report = self.engine.report
        report.undelivered_items = (await self.engine.check_undelivered()).items
        report.pending_left = await self.engine.store.pending_counts()
        return report

    async def _poll_everything(self) -> None:
        try:
            await self._poll_all(self.engine.settings.customers)
            await self.engine.flush_touches()
            # After the polls, so that a renewal they just saw is not expired.
            await self.engine.sweep_expiries()
        finally:
            self._polling_done.set()
            for worker in self.workers:
                worker.wake.set()

    async def _poll_all(self, links: Sequence[CustomerLink]) -> None:
        queue = iter(enumerate(links))

        async def poller() -> None:
            for index, link in queue:
                await self.engine.poll(index, link)

        size = min(self.engine.settings.sync.concurrency, len(links)) or 1
        async with asyncio.TaskGroup() as pollers:
            for _ in range(size):
                pollers.create_task(poller())

    async def _deliver(self, worker: ServerWorker) -> None:
        """Keep delivering as rows arrive; one connection; stop at the first failure."""
        try:
            while True:
                worker.wake.clear()
                done = self._polling_done.is_set()
                if not await worker.deliver_available() or done:
                    return
                await worker.wake.wait()
        finally:
            await worker.close()


def _first_failure(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report of a task group's: a `StoreWriteError` if there is one
    (the others usually follow from it), else the first."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    return next((e for e in leaves if isinstance(e, StoreWriteError)), leaves[0])


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
