"""The durable state: what perksync knows and the delivery journal.

Backends implement `Store`; `tests/test_store_contract.py` runs one contract
suite against every backend in `BACKENDS`. SQLite is the embedded default; a
PostgreSQL backend (several hosts sharing the work) is meant to slot in here.

The journal holds one row per (item, server, cycle, event, command index).
Rows are written *before* anything is sent, in the same transaction as the
marks and item states that produced them, so a crash either keeps both or
neither: the next pass then recomputes exactly the same events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from daemon.diff import Mark, MarkKey


class StoreError(Exception):
    """The store cannot be opened or cannot do what was asked.

    Raised by every backend, with a one-line message that names the database
    (never a password). When a write raises it, that write stored nothing.
    """


class StoreWriteError(StoreError):
    """The database cannot be written at all: the disk is full, the file or its
    file system is read-only, the device fails.

    Unlike other store errors (one customer's bad data, a lock held too long)
    it is not about what was being written, so the next write would fail the
    same way. The caller stops at once: a command must never be sent when its
    attempt cannot be recorded first, nor polling go on with nowhere to put
    what it learns.
    """


class JournalStatus(StrEnum):
    PENDING = "pending"  # to be delivered (or in flight)
    DELIVERED = "delivered"  # the server answered
    FAILED = "failed"  # can never succeed (unsafe value, too long); not retried
    SKIPPED = "skipped"  # a placeholder was null: not sent, by design


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A command to journal (not yet stored)."""

    customer_id: str
    item_id: str
    product: str
    server: str
    event: str  # "on_active" | "on_expire" | "on_revoke"
    cycle: int
    command_index: int
    command: str  # rendered; for FAILED/SKIPPED the template
    status: JournalStatus = JournalStatus.PENDING
    reason: str | None = None  # why FAILED or SKIPPED


@dataclass(frozen=True, slots=True)
class JournalRow:
    """A stored journal row. `id` grows with insertion order."""

    id: int
    customer_id: str
    item_id: str
    product: str
    server: str
    event: str
    cycle: int
    command_index: int
    command: str
    status: JournalStatus
    reason: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class SeenItem:
    item_id: str
    product: str
    state: str
    # When the item ends (override_expires_at, else expires_at); for local expiry.
    expires_at: datetime | None = None
    # The item's JSON as the API sent it, to render on_expire without the API.
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class DueExpiry:
    """A granted item whose expiry has passed: on_expire runs without asking the API."""

    label: str
    customer_raw: str
    item_raw: str
    server: str
    cycle: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class KnownCustomer:
    """What the store knows of one customer's items, as the diff needs it."""

    items: frozenset[str]
    marks: Mapping[MarkKey, Mark]
    # Item id → (state, expires_at) as last stored: lets a pass that changed
    # nothing skip rewriting them.
    states: Mapping[str, tuple[str, datetime | None]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LiveItems:
    """How many items of one product a link's customer holds live: last seen
    `active` or `renewed` (the states that keep a perk), not `usable`, `used`
    or `revoked`."""

    label: str
    customer_id: str
    name: str | None
    product: str
    count: int
    # Which of the asked fields the customer's JSON (as last stored) sets to
    # something (not null, not empty); None when no JSON of it is stored.
    ids: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class CustomerStatus:
    label: str  # the config's name for the link, e.g. "token_env PAYNOW_TOKEN_ALICE"
    customer_id: str | None
    name: str | None
    last_synced_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None


@dataclass(frozen=True, slots=True)
class ServerCounts:
    server: str
    pending: int
    failed: int
    skipped: int
    delivered: int


class Store(Protocol):
    """Everything the engine asks of the durable state.

    All times are aware datetimes: given in any zone (a naive one is refused
    with ValueError), returned in UTC. Errors of the database (locked for too
    long, a constraint violated) come as `StoreError`; a write that fails
    because the database cannot be written at all (disk full, read-only, I/O
    error) raises `StoreWriteError`. Every write is durable when its method
    returns.
    """

    async def close(self) -> None: ...

    async def known(self, customer_id: str) -> KnownCustomer:
        """The item ids and marks stored for this customer (empty if new)."""
        ...

    async def commit_pass(
        self,
        label: str,
        customer_id: str,
        customer_name: str | None,
        seen: Sequence[SeenItem],
        marks: Mapping[MarkKey, Mark],
        entries: Sequence[JournalEntry],
        synced_at: datetime,
        customer_raw: str | None = None,
        digest: bytes | None = None,
    ) -> list[int]:
        """Atomically: upsert the customer's link row (clearing its error, and
        replacing its answers' digest, see `digests`), the
        seen items' last state, the changed marks, and insert the journal
        entries (in order). Returns the new journal row ids in order. An entry
        whose (item, server, cycle, event, command_index) already exists (or
        comes twice) is not inserted again (its id is not returned).

        Journal rows are created with `synced_at` as `created_at`, zero
        attempts, and, if FAILED or SKIPPED, already finished at `synced_at`.
        A mark must name an item in `seen` or stored before, and every cycle
        must be >= 1; otherwise (or on any other database error) this raises
        `StoreError` and nothing of the pass is stored."""
        ...

    async def touch(
        self,
        label: str,
        customer_id: str,
        customer_name: str | None,
        synced_at: datetime,
        digest: bytes | None = None,
        customer_raw: str | None = None,
    ) -> None:
        """Record a pass that changed nothing: the link's sync time (clearing its
        error), id, name, answers' digest and, when given, the customer's JSON;
        items, marks and journal stay as they are."""
        ...

    async def digests(self) -> dict[str, bytes]:
        """Link label → the digest stored by its last `commit_pass` or `touch`
        (links without one are left out).

        The digest stands for the API's answers that pass acted on; a poll
        whose answers have the same digest would change nothing, so the engine
        only records its sync time (`touch_unchanged`). `commit_expiry` drops
        the digests of the customers it changes, as their stored marks no
        longer follow from those answers alone."""
        ...

    async def touch_unchanged(self, synced: Mapping[str, datetime]) -> None:
        """Link label → sync time of polls whose answers matched the stored
        digest: one transaction sets each link's sync time and clears its
        error. Labels with no link row are ignored."""
        ...

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        """GRANTED marks of items last seen `active` (not `renewed`: that keeps
        the perk) whose expiry is at or before `cutoff` (now minus the grace),
        with the JSON to render from."""
        ...

    async def commit_expiry(
        self, marks: Mapping[MarkKey, Mark], entries: Sequence[JournalEntry], at: datetime
    ) -> list[int]:
        """Atomically store the marks and journal entries of local expiries
        (same duplicate rule as commit_pass) and drop the digests of the
        customers whose items they name. Returns the new row ids."""
        ...

    async def record_error(self, label: str, error: str, at: datetime) -> None:
        """Remember that polling this link failed (keeps its last sync time;
        a link never synced is listed with no customer id)."""
        ...

    async def pending(self, server: str, after_id: int = 0, limit: int = 500) -> list[JournalRow]:
        """PENDING rows for `server` with id > after_id, in id order."""
        ...

    async def mark_attempt(self, row_id: int) -> None:
        """Count one delivery attempt; called right before the command is sent.

        Like `mark_delivered` and `mark_failed`: a row id that does not exist
        raises `StoreError`; a row that is no longer PENDING is left as it is
        (its first outcome stands)."""
        ...

    async def mark_delivered(self, row_id: int, at: datetime) -> None:
        """PENDING → DELIVERED, finished at `at`."""
        ...

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        """PENDING → FAILED (never retried), with why, finished at `at`."""
        ...

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        """Every journal row (of one server), in id order. For status and tests."""
        ...

    async def customers(self) -> list[CustomerStatus]:
        """Every link ever synced or failed, by label."""
        ...

    async def live_items(self, id_fields: Sequence[str]) -> list[LiveItems]:
        """Per link and product: the stored items of the link's customer last seen
        `active` or `renewed` (of every product, mapped or not), and which of
        `id_fields` (top-level fields of the customer's JSON) the customer has.
        Links without such items are left out; ordered by label, then product.
        It reads every live item: meant for once a pass or an interval."""
        ...

    async def pending_counts(self) -> dict[str, int]:
        """Server → number of PENDING rows (servers with none are left out).
        Cheap however long the journal is: the service asks every few seconds."""
        ...

    async def server_counts(self) -> list[ServerCounts]:
        """Per server that has journal rows: counts by status, by server name."""
        ...


StoreOpener = Callable[[str], "Store"]


def open_store(url: str, *, throwaway: bool = False) -> Store:
    """Open the store named by `url`: a file path (SQLite) or `sqlite:///path`.

    `throwaway`: a scratch copy (a dry run's), whose creation is not news to
    the operator."""
    from daemon.state_sqlite import SqliteStore  # the only backend so far

    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    return SqliteStore(Path(path), throwaway=throwaway)


# Backend name → opener; the contract tests run against each entry.
BACKENDS: dict[str, StoreOpener] = {"sqlite": open_store}
