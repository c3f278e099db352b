"""An in-memory backend that yields to the event loop at every call.

For tests: the engine runs in-process and fast against it, and because every
call (and, inside a customer block, the reading of `known` and the start of
the commit) gives the other tasks a turn, the interleavings a networked
database allows happen here too, where SQLite, which never awaits, would
hide them.

Stores opened with the same URL (`memory://name`) share one database, each
with its own customer locks: two of them behave as two processes on one
SQLite file, so the compare-and-set between them is tested as it runs in
production. A commit checks everything before it changes anything, so a
failed one stores nothing. Nothing is durable: a database lasts as long as
the process, or until `forget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from daemon.diff import Mark, Phase
from daemon.state import (
    UNFINISHED,
    CustomerChange,
    CustomerTxn,
    DueExpiry,
    Fence,
    GrantedItem,
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    LinkStatus,
    LiveBaseline,
    LiveItem,
    LiveItems,
    ServerCounts,
    StoredItem,
    StoreError,
    Totals,
    refuse_fence,
)
from daemon.state.blocks import Block, CustomerLocks
from daemon.state.values import check_limit, cut_reply, ids_set, utc, utc_or_none

log = logging.getLogger(__name__)

LIVE_STATES = ("active", "renewed")  # the states that keep a perk
_PHASES = frozenset(Phase)
_STATUSES = frozenset(JournalStatus)


@dataclass(slots=True)
class _Customer:
    name: str | None
    raw: str | None
    digest: bytes | None
    version: int


@dataclass(frozen=True, slots=True)
class _Item:
    customer_id: str
    product: str
    state: str
    expires_at: datetime | None
    raw: str | None
    read_at: datetime | None


@dataclass(slots=True)
class _Link:
    customer_id: str | None = None
    last_synced_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    digest: bytes | None = None


JournalKey = tuple[str, str, int, str, int, int]  # item, server, cycle, event, index, resend


@dataclass(slots=True)
class _Database:
    customers: dict[str, _Customer] = field(default_factory=dict)
    items: dict[str, _Item] = field(default_factory=dict)
    items_of: dict[str, set[str]] = field(default_factory=dict)  # customer id → item ids
    marks: dict[str, dict[str, Mark]] = field(default_factory=dict)  # item id → server → mark
    journal: dict[int, JournalRow] = field(default_factory=dict)  # in id order
    journal_keys: set[JournalKey] = field(default_factory=set)
    last_id: int = 0
    links: dict[str, _Link] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    webhooks: dict[str, datetime] = field(default_factory=dict)

    def known(self, customer_id: str) -> tuple[KnownCustomer, int]:
        items = {i: self.items[i] for i in self.items_of.get(customer_id, ())}
        marks = {
            (item_id, server): mark
            for item_id in items
            for server, mark in self.marks.get(item_id, {}).items()
        }
        stored = {
            i: StoredItem(item.product, item.state, item.expires_at, item.read_at, item.raw)
            for i, item in items.items()
        }
        open_grants = frozenset(
            (row.item_id, row.server)
            for row in self.journal.values()
            if row.customer_id == customer_id
            and row.event == "on_active"
            and row.status in UNFINISHED
        )
        customer = self.customers.get(customer_id)
        if customer is None:
            return KnownCustomer(stored, marks, open_grants=open_grants), 0
        known = KnownCustomer(stored, marks, customer.raw, customer.digest, open_grants)
        return known, customer.version

    def cancel(self, customer_id: str, change: CustomerChange, at: datetime) -> None:
        """The change's cancelled grants (their on_active rows that wait) and
        rows (PENDING or WAITING ones) of this customer become CANCELLED,
        finished at `at`."""
        grants, rows = set(change.cancel_grants), set(change.cancel_rows)
        for row in self.journal.values():
            if row.customer_id != customer_id or row.status not in UNFINISHED:
                continue
            waits = row.status is JournalStatus.WAITING or row.online or row.not_before
            grant = row.event == "on_active" and (row.item_id, row.server) in grants
            if (grant and waits) or row.id in rows:
                self.journal[row.id] = dataclasses.replace(
                    row, status=JournalStatus.CANCELLED, finished_at=at
                )

    def put_item(self, item_id: str, item: _Item) -> None:
        old = self.items.get(item_id)
        if old is not None and old.customer_id != item.customer_id:
            self.items_of[old.customer_id].discard(item_id)
        self.items[item_id] = item
        self.items_of.setdefault(item.customer_id, set()).add(item_id)

    def forget_digests(self, customer_id: str) -> None:
        for link in self.links.values():
            if link.customer_id == customer_id:
                link.digest = None


# URL → database: every store opened with one URL shares it.
_DATABASES: dict[str, _Database] = {}


def forget(url: str) -> None:
    """Drop the database of `url` (stores still open on it keep their copy)."""
    _DATABASES.pop(url, None)


class MemoryStore:
    """`daemon.state.Store` in this process's memory; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = _DATABASES.setdefault(url, _Database())
        self._locks = CustomerLocks()
        self._closed = False

    async def _turn(self) -> _Database:
        """Give the other tasks a turn, as a call over the network would."""
        await asyncio.sleep(0)
        if self._closed:
            raise StoreError(f"the memory store {self.url} is closed")
        return self._db

    async def close(self) -> None:
        self._closed = True

    # --- one customer at a time ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str) -> AsyncIterator[CustomerTxn]:
        await self._turn()
        async with self._locks.hold(customer_id):
            known, version = (await self._turn()).known(customer_id)
            block = Block(customer_id, known, version, f"memory store {self.url}", self._commit)
            try:
                await asyncio.sleep(0)
                yield block
            finally:
                block.end()

    async def _commit(self, block: Block, change: CustomerChange) -> list[int]:
        db = await self._turn()
        block.check_marks(change)
        customer_id = block.customer_id
        at = utc(change.at)
        items = {
            s.item_id: _Item(
                customer_id, s.product, s.state, utc_or_none(s.expires_at), s.raw,
                utc_or_none(s.read_at),
            )
            for s in change.seen
        }  # fmt: skip
        _check(change)
        stored = db.customers.get(customer_id)
        if (0 if stored is None else stored.version) != block.version:
            raise block.changed()
        # Nothing below fails: the commit is all or nothing.
        self._store_customer(db, block, change)
        for item_id, item in items.items():
            old = db.items.get(item_id)
            if old is not None and old.customer_id != customer_id:
                self._take_item(db, item_id, old.customer_id, customer_id)
            db.put_item(item_id, _keep_raw(item, old) if item.raw is None and old else item)
        if change.link is None:
            db.forget_digests(customer_id)
        else:
            link = db.links.setdefault(change.link.label, _Link())
            link.customer_id, link.last_synced_at, link.digest = customer_id, at, change.link.digest
            link.last_error = link.last_error_at = None
        for (item_id, server), mark in change.marks.items():
            db.marks.setdefault(item_id, {})[server] = Mark(
                Phase(mark.phase), mark.cycle, mark.perk
            )
        # Before the entries: a change's own new rows are never cancelled by it.
        db.cancel(customer_id, change, at)
        return _journal(db, change.entries, at)

    @staticmethod
    def _store_customer(db: _Database, block: Block, change: CustomerChange) -> None:
        record = change.customer
        stored = db.customers.get(block.customer_id)
        if stored is None:
            stored = db.customers[block.customer_id] = _Customer(None, None, None, 0)
        stored.version += 1
        if record is not None:
            stored.name, stored.raw, stored.digest = record.name, record.raw, record.digest

    def _take_item(self, db: _Database, item_id: str, owner: str, customer_id: str) -> None:
        log.warning(
            "memory store %s: item %s moves from customer %s to customer %s",
            self.url,
            item_id,
            owner,
            customer_id,
        )
        db.customers[owner].version += 1
        db.forget_digests(owner)

    # --- token mode: the configured links -------------------------------------------

    async def link_digests(self) -> dict[str, bytes]:
        db = await self._turn()
        return {label: link.digest for label, link in db.links.items() if link.digest is not None}

    async def record_unchanged(self, synced: Mapping[str, datetime]) -> None:
        times = {label: utc(at) for label, at in synced.items()}
        db = await self._turn()
        for label, at in times.items():
            link = db.links.get(label)
            if link is not None:
                link.last_synced_at = at
                link.last_error = link.last_error_at = None

    async def record_link_error(self, label: str, error: str, at: datetime) -> None:
        when = utc(at)
        db = await self._turn()
        link = db.links.setdefault(label, _Link())
        link.last_error, link.last_error_at = error, when

    async def links(self) -> list[LinkStatus]:
        db = await self._turn()
        statuses = []
        for label, link in sorted(db.links.items()):
            customer = None if link.customer_id is None else db.customers.get(link.customer_id)
            statuses.append(
                LinkStatus(
                    label,
                    link.customer_id,
                    None if customer is None else customer.name,
                    link.last_synced_at,
                    link.last_error,
                    link.last_error_at,
                )
            )
        return statuses

    # --- local expiry ---------------------------------------------------------------

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        until = utc(cutoff)
        db = await self._turn()
        due = []
        for item_id, item in db.items.items():
            customer = db.customers.get(item.customer_id)
            if (
                item.state != "active"  # a `renewed` item keeps its perk
                or item.expires_at is None
                or item.expires_at > until
                or item.raw is None
                or customer is None
                or customer.raw is None
            ):
                continue
            due += [
                DueExpiry(
                    item.customer_id, item_id, server, mark.cycle, item.expires_at,
                    customer.raw, item.raw,
                )
                for server, mark in db.marks.get(item_id, {}).items()
                if mark.phase == Phase.GRANTED
            ]  # fmt: skip
        return sorted(due, key=lambda d: (d.expires_at, d.item_id, d.server))

    # --- store mode -------------------------------------------------------------------

    async def live_baseline(self) -> LiveBaseline:
        db = await self._turn()
        items = {
            item_id: LiveItem(item.customer_id, item.state, item.expires_at)
            for item_id, item in db.items.items()
            if item.state in LIVE_STATES
        }
        digests = {c: row.digest for c, row in db.customers.items() if row.digest is not None}
        return LiveBaseline(items, digests)

    async def get_meta(self, key: str) -> str | None:
        return (await self._turn()).meta.get(key)

    async def set_meta(self, values: Mapping[str, str]) -> None:
        (await self._turn()).meta.update(values)

    async def remember_webhook(self, event_id: str, at: datetime, forget_before: datetime) -> bool:
        when, before = utc(at), utc(forget_before)
        db = await self._turn()
        for old in [e for e, received in db.webhooks.items() if received < before]:
            del db.webhooks[old]
        if event_id in db.webhooks:
            return False
        db.webhooks[event_id] = when
        return True

    # --- delivery -----------------------------------------------------------------------

    async def unfinished(
        self, server: str, after_id: int = 0, limit: int = 500
    ) -> list[JournalRow]:
        check_limit(limit)
        db = await self._turn()
        rows = []
        for row in db.journal.values():
            if row.id > after_id and row.server == server and row.status in UNFINISHED:
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows

    async def _finish(self, row_id: int, update: Callable[[JournalRow], JournalRow]) -> bool:
        db = await self._turn()
        row = db.journal.get(row_id)
        if row is None:
            raise StoreError(f"memory store {self.url}: no journal row {row_id}")
        if row.status not in UNFINISHED:  # its first outcome stands
            return False
        db.journal[row_id] = update(row)
        return True

    async def mark_attempt(self, row_id: int, fence: Fence | None = None) -> bool:
        refuse_fence(fence, f"the memory store {self.url}")
        return await self._finish(
            row_id,
            lambda row: dataclasses.replace(
                row, attempts=row.attempts + 1, status=JournalStatus.PENDING, reason=None
            ),
        )

    async def mark_waiting(self, row_id: int, reason: str) -> None:
        await self._finish(
            row_id,
            lambda row: dataclasses.replace(row, status=JournalStatus.WAITING, reason=reason),
        )

    async def mark_delivered(self, row_id: int, at: datetime, reply: str | None = None) -> None:
        when, kept = utc(at), cut_reply(reply)
        await self._finish(
            row_id,
            lambda row: dataclasses.replace(
                row, status=JournalStatus.DELIVERED, finished_at=when, reply=kept, reason=None
            ),
        )

    async def mark_rejected(self, row_id: int, reply: str, reason: str, at: datetime) -> None:
        when, kept = utc(at), cut_reply(reply)
        await self._finish(
            row_id,
            lambda row: dataclasses.replace(
                row, status=JournalStatus.REJECTED, reply=kept, reason=reason, finished_at=when
            ),
        )

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        when = utc(at)
        await self._finish(
            row_id,
            lambda row: dataclasses.replace(
                row, status=JournalStatus.FAILED, reason=reason, finished_at=when
            ),
        )

    async def prune_journal(self, finished_before: datetime, limit: int) -> int:
        check_limit(limit)
        before = utc(finished_before)
        db = await self._turn()
        old = sorted(
            (row.finished_at, row.id)
            for row in db.journal.values()
            if row.finished_at is not None
            and row.finished_at < before
            and row.status not in UNFINISHED
        )[:limit]
        for _, row_id in old:
            row = db.journal.pop(row_id)
            db.journal_keys.discard(_key(row))
        return len(old)

    # --- reading, for status and reports -----------------------------------------------

    async def journal(
        self,
        *,
        server: str | None = None,
        customer_id: str | None = None,
        statuses: Sequence[JournalStatus] = (),
        row_ids: Sequence[int] = (),
        item_ids: Sequence[str] = (),
        limit: int | None = 100,
    ) -> list[JournalRow]:
        check_limit(limit)
        wanted_statuses, wanted_ids, wanted_items = set(statuses), set(row_ids), set(item_ids)
        db = await self._turn()
        rows = []
        for row in reversed(db.journal.values()):
            if (
                (server is None or row.server == server)
                and (customer_id is None or row.customer_id == customer_id)
                and (not wanted_statuses or row.status in wanted_statuses)
                and (not wanted_ids or row.id in wanted_ids)
                and (not wanted_items or row.item_id in wanted_items)
            ):
                rows.append(row)
                if len(rows) == limit:
                    break
        return rows

    async def granted(self, server: str) -> list[GrantedItem]:
        db = await self._turn()
        open_grants = {
            (row.item_id, row.server)
            for row in db.journal.values()
            if row.status in UNFINISHED and row.event == "on_active"
        }
        found = [
            GrantedItem(
                item.customer_id, item_id, item.product, server, mark.cycle, mark.perk,
                (item_id, server) in open_grants,
            )
            for item_id, item in db.items.items()
            if (mark := db.marks.get(item_id, {}).get(server)) is not None
            and mark.phase == Phase.GRANTED
        ]  # fmt: skip
        return sorted(found, key=lambda g: (g.customer_id, len(g.item_id), g.item_id))

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        db = await self._turn()
        return [r for r in db.journal.values() if server is None or r.server == server]

    async def live_item_counts(self, id_fields: Sequence[str]) -> list[LiveItems]:
        fields = list(dict.fromkeys(id_fields))
        db = await self._turn()
        counts: dict[tuple[str, str], int] = {}
        for item in db.items.values():
            if item.state in LIVE_STATES:
                key = (item.customer_id, item.product)
                counts[key] = counts.get(key, 0) + 1
        labels: dict[str, list[str | None]] = {}
        for label, link in db.links.items():
            if link.customer_id is not None:
                labels.setdefault(link.customer_id, []).append(label)
        live = []
        for (customer_id, product), count in counts.items():
            customer = db.customers.get(customer_id)
            if customer is None:
                continue
            ids = ids_set(customer.raw, fields)
            live += [
                LiveItems(label, customer_id, customer.name, product, count, ids)
                for label in labels.get(customer_id) or [None]
            ]
        live.sort(key=lambda r: (r.label is None, r.label or "", r.customer_id, r.product))
        return live

    async def totals(self) -> Totals:
        db = await self._turn()
        live = sum(1 for item in db.items.values() if item.state in LIVE_STATES)
        return Totals(customers=len(db.customers), live_items=live)

    async def pending_counts(self) -> dict[str, int]:
        db = await self._turn()
        counts: dict[str, int] = {}
        for row in db.journal.values():
            if row.status == JournalStatus.PENDING:
                counts[row.server] = counts.get(row.server, 0) + 1
        return counts

    async def server_counts(self) -> list[ServerCounts]:
        db = await self._turn()
        counts: dict[str, dict[str, int]] = {}
        for row in db.journal.values():
            by_status = counts.setdefault(row.server, {})
            by_status[row.status] = by_status.get(row.status, 0) + 1
        return [
            ServerCounts.tally(server, by_status) for server, by_status in sorted(counts.items())
        ]


def _keep_raw(item: _Item, old: _Item) -> _Item:
    """A commit without the item's JSON keeps the stored one."""
    return _Item(item.customer_id, item.product, item.state, item.expires_at, old.raw, item.read_at)


def _check(change: CustomerChange) -> None:
    """The rules SQLite's constraints enforce, checked before anything changes."""
    for (item_id, server), mark in change.marks.items():
        if mark.phase not in _PHASES or mark.cycle < 1:
            raise StoreError(f"a mark for item {item_id} on {server}: {mark} is not a mark")
    for e in change.entries:
        if e.status not in _STATUSES or e.cycle < 1 or e.command_index < 0:
            raise StoreError(
                f"a journal entry for item {e.item_id} on {e.server}: status {e.status!r}, "
                f"cycle {e.cycle}, command index {e.command_index}"
            )


def _key(row: JournalRow) -> JournalKey:
    return (row.item_id, row.server, row.cycle, row.event, row.command_index, row.resend)


def _journal(db: _Database, entries: Sequence[JournalEntry], at: datetime) -> list[int]:
    new = []
    for e in entries:
        key = (e.item_id, e.server, e.cycle, str(e.event), e.command_index, e.resend)
        if key in db.journal_keys:
            continue
        db.journal_keys.add(key)
        db.last_id += 1
        db.journal[db.last_id] = JournalRow(
            id=db.last_id,
            customer_id=e.customer_id,
            item_id=e.item_id,
            product=e.product,
            server=e.server,
            event=str(e.event),
            cycle=e.cycle,
            command_index=e.command_index,
            command=e.command,
            status=JournalStatus(e.status),
            reason=e.reason,
            attempts=0,
            created_at=at,
            finished_at=None if e.status in UNFINISHED else at,
            online=e.online,
            not_before=utc_or_none(e.not_before),
            resend=e.resend,
        )
        new.append(db.last_id)
    return new
