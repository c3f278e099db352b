"""Apply: the one writer of a customer's items, marks and journal rows.

Every source (token polls, store-mode reads, webhook look-ups) hands its
`Answer`s here, and the local expiry sweep its due items. Each is handled
inside one `Store.customer` block, so that a poll, a look-up and the sweep
never interleave for one customer (see daemon/state/__init__.py); inside it
the decisions are pure functions (`daemon.diff`, `daemon.render`), and the
block ends with one commit of items, marks and journal rows together. Then
the servers concerned are woken to deliver.

Items sharing a perk are decided together (daemon/perks.py): from the
customer's stored marks, the events of the answer or the sweep in the order
they happened; which commands are kept, and which unsent grants a take-back
cancels, go into the same commit.

An answer read before the one the store last applied for an item never
changes that item: answers may arrive in another order than they were read
(a snapshot and a webhook's look-up of the same customer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from daemon.clock import Clock
from daemon.config import Settings
from daemon.diff import (
    Event,
    EventKind,
    Mark,
    MarkKey,
    Phase,
    Share,
    diff_inventory,
    effective_expiry,
)
from daemon.models import Customer, InventoryItem, encodable
from daemon.perks import Shared, adopt_perks, share_events
from daemon.placeholders import printable
from daemon.render import journal_entries, product_rules, router
from daemon.report import PassReport
from daemon.sources import Answer
from daemon.state import (
    CustomerChange,
    CustomerChanged,
    CustomerRecord,
    CustomerTxn,
    DueExpiry,
    JournalEntry,
    JournalStatus,
    KnownCustomer,
    LinkSync,
    SeenItem,
    Store,
    StoredItem,
)
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

# A commit refused because another process or host changed the customer
# meanwhile is decided again from what the store then holds, this often.
CHANGED_RETRIES = 5


def describe_customer(customer: Customer) -> str:
    # The name comes from the customer: never let it put a line break in a log line.
    return f"{customer.id} ({printable(customer.name)})" if customer.name else customer.id


def customer_record(customer: Customer) -> CustomerRecord:
    """The customer's row: its name as shown, its JSON as sent (json.dumps
    escapes what UTF-8 cannot carry), and a digest of that JSON."""
    raw = json.dumps(customer.raw, separators=(",", ":"))
    name = None if customer.name is None else encodable(customer.name)
    return CustomerRecord(name, raw, customer_fingerprint(raw))


def customer_fingerprint(raw_json: str) -> bytes:
    """16 bytes standing for the customer's JSON (store mode compares the
    customer embedded in each snapshot item with it)."""
    return hashlib.blake2b(raw_json.encode(), digest_size=16).digest()


def same_as_stored(
    known: Mapping[str, StoredItem], items: Sequence[InventoryItem], *, complete: bool
) -> bool:
    """Whether the items are exactly the stored ones, in their stored state and
    expiry (then an answer has nothing to write but what it says of the
    customer and the link)."""
    if complete and len(known) != len(items):
        return False
    for item in items:
        stored = known.get(item.id)
        if stored is None or (stored.state, stored.expires_at) != (
            item.state,
            effective_expiry(item),
        ):
            return False
    return True


def _read_later(stored: StoredItem | None, read_at: datetime) -> bool:
    """Whether the store holds the item from a read that started after `read_at`."""
    return stored is not None and stored.read_at is not None and stored.read_at > read_at


class Applier:
    """Turns answers and due expiries into stored marks and journal rows.

    `settings` may be replaced between calls (a reload). `wake(server)` is
    called for each server that got pending rows. `on_unlinked_commit` (token
    mode) hears of every commit for a customer that was not a link's poll:
    its links' answers digests no longer stand for what is stored.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Clock,
        report: PassReport,
        telemetry: Telemetry,
        wake: Callable[[str], None],
        names: dict[str, str],
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.report = report
        self.telemetry = telemetry
        self.wake = wake
        self.names = names  # customer id → how log lines name it
        # Commits that stored items, marks or a customer so far: what reaches no
        # server is checked again only after one.
        self.commits = 0
        self.on_unlinked_commit: Callable[[str], None] | None = None
        self._missing_logged: set[str] = set()
        self._expired_logged: set[str] = set()

    # --- answers ----------------------------------------------------------------

    async def apply(self, answer: Answer, *, label: str, link: LinkSync | None = None) -> None:
        """Store what `answer` says of its customer and journal what it makes run.

        `label` names the customer in log lines (a link's label in token
        mode); `link` is the token-mode link whose poll this is."""
        customer = answer.customer
        self.names[customer.id] = describe_customer(customer)
        for attempt in range(1, CHANGED_RETRIES + 1):
            try:
                async with self.store.customer(customer.id) as txn:
                    change = await self._apply(txn, answer, label, link)
                break
            except CustomerChanged:
                if attempt == CHANGED_RETRIES:
                    raise
                log.debug("customer %s changed elsewhere meanwhile; deciding again", label)
        self._committed(customer.id, change)

    async def _apply(
        self, txn: CustomerTxn, answer: Answer, label: str, link: LinkSync | None
    ) -> CustomerChange | None:
        """Decide and commit; the change committed (None: nothing was)."""
        known = txn.known
        stale = {i.id for i in answer.items if _read_later(known.items.get(i.id), answer.read_at)}
        items = [i for i in answer.items if i.id not in stale]
        now = self.clock.now()
        route = router(self.settings, answer.customer)
        rules = product_rules(self.settings)
        marks = _held_marks(known, rules.perks)
        result = diff_inventory(
            marks,
            known.items.keys() - stale,
            items,
            route,
            now,
            complete=answer.complete,
            rules=rules,
        )
        self._log_oddities(label, result.disappeared, result.unknown_states, result.duplicates)
        self._log_expired_unseen(label, items, result.expired_unseen)
        record = customer_record(answer.customer)
        customer = None if record.digest == known.customer_digest else record
        if not result.marks and same_as_stored(known.items, items, complete=answer.complete):
            # Nothing changed but the answers' bytes (or the settings, or this
            # is the first pass since an upgrade): only the customer and link.
            if customer is None and link is None:
                return None
            unchanged = CustomerChange(now, customer, link=link)
            await txn.commit(unchanged)
            return unchanged
        shared = share_events(marks, result.events, result.marks, known.open_grants)
        self._log_shares(label, shared, result.marks)
        entries = journal_entries(self.settings, answer.customer, shared.events, at=now)
        seen = [seen_item(item, answer.read_at) for item in items]
        change = CustomerChange(
            now, customer, seen, result.marks, entries, link, cancel_grants=shared.cancel_grants
        )
        await txn.commit(change)
        return change

    def _log_oddities(
        self,
        label: str,
        disappeared: Sequence[str],
        unknown_states: Sequence[tuple[str, str]],
        duplicates: Sequence[str],
    ) -> None:
        for item_id in disappeared:
            if item_id not in self._missing_logged:  # once per process, not every poll
                self._missing_logged.add(item_id)
                log.info(
                    "customer %s: item %s is no longer listed (no command runs)", label, item_id
                )
        for item_id, state in unknown_states:
            log.warning("customer %s: item %s has unknown state %r; ignored", label, item_id, state)
        for item_id in duplicates:
            log.warning("customer %s: item %s is listed more than once", label, item_id)

    def _log_expired_unseen(
        self, label: str, items: Sequence[InventoryItem], expired: Sequence[str]
    ) -> None:
        by_id = {item.id: item for item in items}
        for item_id in expired:
            if item_id in self._expired_logged:  # once per process, not every poll
                continue
            self._expired_logged.add(item_id)
            item = by_id[item_id]
            expiry = effective_expiry(item)
            log.info(
                "customer %s: item %s (%s) is listed %s but expired at %s: it is not "
                "granted (nothing runs for it)",
                label, item_id, printable(item.product.slug), item.state,
                expiry.isoformat(timespec="seconds") if expiry else "?",
            )  # fmt: skip

    def _log_shares(self, label: str, shared: Shared, marks: Mapping[MarkKey, Mark]) -> None:
        """One line per event a shared perk keeps, and per grant a take-back cancels."""
        for event in shared.events:
            if event.share is Share.OWN:
                continue
            perk = marks[(event.item.id, event.server)].perk
            what = "granted" if event.share is Share.JOINED else f"{event.kind.value} kept"
            log.info(
                "customer %s: item %s (%s) %s on %s: perk %s is held there by another item "
                "(only per_item commands are sent)",
                label, event.item.id, printable(event.item.product.slug), what, event.server,
                perk,
            )  # fmt: skip
        for item_id, server in shared.cancel_grants:
            log.info(
                "customer %s: item %s: its online-only or delayed on_active commands on %s "
                "not sent yet are cancelled (taken back before they were due)",
                label, item_id, server,
            )  # fmt: skip

    # --- local expiry -------------------------------------------------------------

    async def expire(self, due: Sequence[DueExpiry]) -> int:
        """Run on_expire for due items of ONE customer; how many took effect.

        Each is checked again inside the customer's block: a poll that saw a
        renewal (or the end) since the sweep read them wins."""
        if not due:
            return 0
        customer_id = due[0].customer_id
        for attempt in range(1, CHANGED_RETRIES + 1):
            try:
                async with self.store.customer(customer_id) as txn:
                    change = await self._expire(txn, due)
                break
            except CustomerChanged:
                if attempt == CHANGED_RETRIES:
                    raise
        if change is None:
            return 0
        self.report.expired_locally += len(change.marks)
        self._committed(customer_id, change)
        return len(change.marks)

    async def _expire(self, txn: CustomerTxn, due: Sequence[DueExpiry]) -> CustomerChange | None:
        """Decide and commit; the change committed (None: none was due any more)."""
        known = txn.known
        customer = Customer.from_api(json.loads(due[0].customer_raw))
        self.names.setdefault(customer.id, describe_customer(customer))
        known_marks = _held_marks(known, product_rules(self.settings).perks)
        marks: dict[MarkKey, Mark] = {}
        events: list[Event] = []
        for expiry in due:
            key = (expiry.item_id, expiry.server)
            mark = known_marks.get(key)
            if key in marks or mark is None or not _still_due(known, expiry):
                continue
            item = InventoryItem.from_api(json.loads(expiry.item_raw))
            marks[key] = Mark(Phase.LAPSED, expiry.cycle, mark.perk)
            events.append(
                Event(item, expiry.server, EventKind.EXPIRE, expiry.cycle, expiry.expires_at)
            )
            log.info(
                "customer %s: item %s (%s) expired at %s; taking the perk back on %s",
                self.names[customer.id], item.id, item.product.slug,
                expiry.expires_at.isoformat(timespec="seconds"), expiry.server,
            )  # fmt: skip
        if not marks:
            return None
        now = self.clock.now()
        shared = share_events(known_marks, events, marks, known.open_grants)
        self._log_shares(self.names[customer.id], shared, marks)
        entries = journal_entries(self.settings, customer, shared.events, at=now)
        change = CustomerChange(
            now, marks=marks, entries=entries, cancel_grants=shared.cancel_grants
        )
        await txn.commit(change)
        return change

    # --- after a commit -------------------------------------------------------------

    def _committed(self, customer_id: str, change: CustomerChange | None) -> None:
        if change is None:
            return  # nothing was stored: nothing to tell anyone
        if change.customer is not None or change.seen or change.marks:
            # What reaches no server may have changed (a sync time alone does not).
            self.commits += 1
        if change.link is None and self.on_unlinked_commit is not None:
            self.on_unlinked_commit(customer_id)
        self.journaled(change.entries)

    def journaled(self, entries: Sequence[JournalEntry]) -> None:
        """Count and log newly journaled rows; wake the servers with pending ones."""
        for entry in entries:
            who = self.names.get(entry.customer_id, entry.customer_id)
            if entry.status is JournalStatus.PENDING:
                self.report.journaled += 1
                self.wake(entry.server)
                continue
            if entry.status is JournalStatus.KEPT:
                continue  # logged once per event by _log_shares
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


def _held_marks(known: KnownCustomer, perks: Mapping[str, str]) -> dict[MarkKey, Mark]:
    """The stored marks, those made before their product had a perk given its
    perk of now (`perks`: product slug → perk)."""
    products = {item_id: stored.product for item_id, stored in known.items.items()}
    return adopt_perks(known.marks, products, perks)


def _still_due(known: KnownCustomer, expiry: DueExpiry) -> bool:
    """Whether the store still holds the item active, granted in that cycle,
    with that expiry (a renewal or an end seen since changes one of them)."""
    stored = known.items.get(expiry.item_id)
    return (
        stored is not None
        and stored.state == "active"
        and stored.expires_at == expiry.expires_at
        and (mark := known.marks.get((expiry.item_id, expiry.server))) is not None
        and (mark.phase, mark.cycle) == (Phase.GRANTED, expiry.cycle)
    )


def seen_item(item: InventoryItem, read_at: datetime) -> SeenItem:
    """The item to store, with its JSON (local expiry, resend and retry render
    from it; json.dumps escapes what UTF-8 cannot carry)."""
    return SeenItem(
        item.id,
        encodable(item.product.slug),
        encodable(item.state),
        effective_expiry(item),
        json.dumps(item.raw, separators=(",", ":")),
        read_at,
    )
