"""The durable state: what perksync knows and the delivery journal.

Backends implement `Store`; `tests/test_store_contract.py` runs one contract
suite against every backend in `BACKENDS`: SQLite (`daemon/state/sqlite.py`,
the embedded default), PostgreSQL (`daemon/state/postgres.py`: one database
that several hosts share) and an in-memory one that yields to the event loop
at every call (`daemon/state/memory.py`: fast engine tests, and it finds
ordering bugs that a backend which never awaits would hide).

The journal holds one row per (item, server, cycle, event, command index).
Rows are written *before* anything is sent, in the same transaction as the
marks and item states that produced them, so a crash either keeps both or
neither: the next pass then recomputes exactly the same events.

**One customer at a time.** Everything that changes a customer's items,
marks or journal rows (a poll, a store-mode read, a webhook's look-up, the
expiry sweep, an operator command) happens inside one
`async with store.customer(customer_id) as txn:` block: read `txn.known`,
decide, `await txn.commit(change)`. Blocks for the same customer never
interleave: within one `Store` object the second waits for the first to
end; across objects (another process, another host on a shared database) a
commit made on `known` that another object's commit has since changed
raises `CustomerChanged` and stores nothing, and the caller reads again.
Blocks for different customers run side by side.

**Several hosts** on one PostgreSQL database share out polling and delivery
by leases (daemon/state/shared.py); a delivery attempt is then recorded only
under its server's lease (`Fence`, `Store.mark_attempt`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import parse_qs, parse_qsl, urlsplit

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


class CustomerChanged(StoreError):
    """Another `Store` object (another process or host) committed for this
    customer after this block read `known` (or, rarely, another customer's
    commit took one of its items): nothing of this commit was stored. Leave
    the block, open a new one, decide again from the new `known`."""


class LeaseLost(StoreError):
    """`mark_attempt` with a `Fence`: the lease is no longer held by that
    holder with that token, or runs out too soon. Nothing was counted, and the
    command must not be sent: another host may deliver to the server now."""


@dataclass(frozen=True, slots=True)
class Fence:
    """What makes an attempt count only while its host may deliver: the lease
    `lease` held by `holder` with `token` (the fencing token of that holding),
    running out more than `margin_seconds` after the attempt is recorded (the
    time the command may take). Several hosts on one database use it; a
    backend with one host (SQLite, memory) takes none."""

    lease: str
    holder: str
    token: int
    margin_seconds: float


def refuse_fence(fence: Fence | None, database: str) -> None:
    """What a backend with one host does with a fence: refuse it (`StoreError`)."""
    if fence is not None:
        raise StoreError(
            f"{database} is used by one host and holds no leases: "
            f"an attempt fenced by {fence.lease} cannot be counted"
        )


class JournalStatus(StrEnum):
    PENDING = "pending"  # to be delivered (or in flight)
    # Not sendable yet: an online-only command whose player is away, a delayed
    # one before its time, or a row behind such a one (same customer and
    # server); `reason` says which.
    WAITING = "waiting"
    DELIVERED = "delivered"  # the server answered
    FAILED = "failed"  # can never succeed (unsafe value, too long); not retried
    SKIPPED = "skipped"  # a placeholder was null: not sent, by design
    # The server answered with an error reply (an unknown command, ...): not retried.
    REJECTED = "rejected"
    # A shared perk's command not sent because another item holds the perk.
    KEPT = "kept"
    CANCELLED = "cancelled"  # by the item's take-back, or by an operator


UNFINISHED: Final = frozenset({JournalStatus.PENDING, JournalStatus.WAITING})
# Kept at most this many characters of a server's reply.
REPLY_LIMIT: Final = 1000


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
    reason: str | None = None  # why FAILED, SKIPPED or KEPT
    online: bool = False  # sent only while the customer's player is online there
    not_before: datetime | None = None  # not sent before then (delay_seconds)
    # 0 for the event's own rows; n for the n-th time they were journaled
    # again (`perksync resend`, `perksync retry`): never mistaken for the original.
    resend: int = 0


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
    online: bool = False
    not_before: datetime | None = None
    reply: str | None = None  # the server's answer (first REPLY_LIMIT characters)
    resend: int = 0


@dataclass(frozen=True, slots=True)
class SeenItem:
    """An item as an answer showed it, to store."""

    item_id: str
    product: str
    state: str
    # When the item ends (override_expires_at, else expires_at); for local expiry.
    expires_at: datetime | None = None
    # The item's JSON as the API sent it, to render on_expire without the API.
    raw: str | None = None
    # When the read that showed it started: an answer read earlier never
    # overwrites what a later one stored (see `StoredItem.read_at`).
    read_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredItem:
    """An item as the store knows it."""

    product: str
    state: str
    expires_at: datetime | None
    # When the read behind `state` started (None: stored before this was kept).
    read_at: datetime | None
    # The item's JSON as last stored (to render a resend or a retry from).
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class KnownCustomer:
    """What the store knows of one customer, as a decision needs it."""

    items: Mapping[str, StoredItem] = field(default_factory=dict)
    marks: Mapping[MarkKey, Mark] = field(default_factory=dict)
    # The customer's JSON as last stored (None: never stored), and the digest
    # given with it (store mode compares a snapshot's embedded customer by it).
    customer_raw: str | None = None
    customer_digest: bytes | None = None
    # (item, server) that have an on_active row still pending or waiting.
    open_grants: frozenset[MarkKey] = frozenset()


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    """The customer's own row: what logs, status and local expiry need."""

    name: str | None  # as shown (lone surrogates escaped: see models.encodable)
    raw: str  # the customer's JSON as the API sent it
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class LinkSync:
    """Token mode: the link (by its config label) whose poll this commit records."""

    label: str
    digest: bytes | None  # the answers digest (see daemon/sources/token.py)


@dataclass(frozen=True, slots=True)
class CustomerChange:
    """Everything one block commits, in one transaction."""

    at: datetime  # created_at of its journal rows; the sync time of `link`
    customer: CustomerRecord | None = None  # None: keep the stored row
    seen: Sequence[SeenItem] = ()
    marks: Mapping[MarkKey, Mark] = field(default_factory=dict)
    entries: Sequence[JournalEntry] = ()
    link: LinkSync | None = None
    # (item, server) whose take-back this change journals: their on_active
    # rows that wait become CANCELLED (they hold nothing back). Rows that wait:
    # WAITING ones, and PENDING ones that are online-only or delayed. A plain
    # PENDING grant (its server was down) is sent before the take-back.
    cancel_grants: Sequence[MarkKey] = ()
    # Rows an operator cancels (pending or waiting ones; others stay as they are).
    cancel_rows: Sequence[int] = ()


class CustomerTxn(Protocol):
    """The inside of a `Store.customer` block."""

    @property
    def known(self) -> KnownCustomer:
        """The customer as stored when the block began."""
        ...

    async def commit(self, change: CustomerChange) -> list[int]:
        """Atomically store `change`; return the new journal row ids in order.

        - `customer`: upsert the customer's row. `seen`: upsert each item's
          product, state, expiry, `read_at` and (when given) JSON; an item is
          never moved from one customer to another silently: it is stored
          under this block's customer, with a warning, and the customer it
          leaves has changed (its open blocks get `CustomerChanged`).
        - `marks`: upsert; a mark must name an item of this customer (in
          `seen` or in `known`), and every cycle must be >= 1.
        - `entries`: inserted in order; one whose (item, server, cycle,
          event, command_index, resend) exists already (or comes twice) is
          not inserted again and its id is not returned. Rows are created with
          `at` as `created_at`, zero attempts and, if FAILED or SKIPPED,
          already finished at `at`.
        - `cancel_grants` (the on_active rows of those (item, server) that
          wait, see `CustomerChange`), `cancel_rows` (those PENDING or
          WAITING rows): rows of this customer become CANCELLED, finished at
          `at` (others are left as they are), before `entries` are inserted:
          a change never cancels its own new rows.
        - `link`: upsert the link row (customer id, sync time `at`, error
          cleared, answers digest). A commit without `link` drops the
          answers digests of every link of this customer (its marks no
          longer follow from those answers alone).

        At most one commit per block: a second call (even after a failed
        first one) or a call after the block ended raises `StoreError`.
        Raises `CustomerChanged` (see the module docstring), `StoreError` on
        a broken rule or database error, `StoreWriteError` when the database
        cannot be written; in every case nothing of `change` is stored."""
        ...


@dataclass(frozen=True, slots=True)
class DueExpiry:
    """A granted item whose expiry has passed: on_expire runs without asking the API.
    The sweep checks it again inside the customer's block before acting."""

    customer_id: str
    item_id: str
    server: str
    cycle: int
    expires_at: datetime
    customer_raw: str
    item_raw: str


@dataclass(frozen=True, slots=True)
class GrantedItem:
    customer_id: str
    item_id: str
    product: str
    server: str
    cycle: int
    perk: str | None
    open_grant: bool  # its on_active there is still pending or waiting


@dataclass(frozen=True, slots=True)
class LiveItem:
    """An item the store holds live (last stored `active` or `renewed`)."""

    customer_id: str
    state: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class LiveBaseline:
    """What a store-mode snapshot is compared with."""

    items: Mapping[str, LiveItem]  # item id → the live item
    customers: Mapping[str, bytes]  # customer id → stored customer digest (when given)


@dataclass(frozen=True, slots=True)
class LiveItems:
    """How many items of one product a link's customer holds live: last seen
    `active` or `renewed` (the states that keep a perk), not `usable`, `used`
    or `revoked`."""

    label: str | None  # a link of the customer (token mode); None in store mode
    customer_id: str
    name: str | None
    product: str
    count: int
    # Which of the asked fields the customer's JSON (as last stored) sets to
    # something (not null, not empty); None when no JSON of it is stored.
    ids: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class LinkStatus:
    label: str  # the config's name for the link, e.g. "token_env PAYNOW_TOKEN_ALICE"
    customer_id: str | None
    name: str | None
    last_synced_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None


@dataclass(frozen=True, slots=True)
class Totals:
    customers: int  # customers ever stored
    live_items: int  # items held live (active or renewed)


@dataclass(frozen=True, slots=True)
class ServerCounts:
    server: str
    pending: int
    failed: int
    skipped: int
    delivered: int
    waiting: int = 0
    rejected: int = 0
    kept: int = 0
    cancelled: int = 0

    @classmethod
    def tally(cls, server: str, by_status: Mapping[str, int]) -> ServerCounts:
        """From a count per journal status (statuses without rows left out)."""
        return cls(
            server=server,
            pending=by_status.get(JournalStatus.PENDING, 0),
            failed=by_status.get(JournalStatus.FAILED, 0),
            skipped=by_status.get(JournalStatus.SKIPPED, 0),
            delivered=by_status.get(JournalStatus.DELIVERED, 0),
            waiting=by_status.get(JournalStatus.WAITING, 0),
            rejected=by_status.get(JournalStatus.REJECTED, 0),
            kept=by_status.get(JournalStatus.KEPT, 0),
            cancelled=by_status.get(JournalStatus.CANCELLED, 0),
        )


class Store(Protocol):
    """Everything perksync asks of the durable state.

    All times are aware datetimes: given in any zone (a naive one is refused
    with ValueError), returned in UTC. Errors of the database (locked for too
    long, a constraint violated) come as `StoreError`; a write that fails
    because the database cannot be written at all (disk full, read-only, I/O
    error) raises `StoreWriteError`. Every write is durable when its method
    returns.
    """

    async def close(self) -> None: ...

    # --- one customer at a time (see the module docstring) ---------------------

    def customer(self, customer_id: str) -> AbstractAsyncContextManager[CustomerTxn]:
        """The block inside which the customer is read and changed."""
        ...

    # --- token mode: the configured links ----------------------------------------

    async def link_digests(self) -> dict[str, bytes]:
        """Link label → the answers digest its last commit stored (links without
        one are left out). A poll whose answers have the same digest would
        change nothing, so only its sync time is recorded (`record_unchanged`)."""
        ...

    async def record_unchanged(self, synced: Mapping[str, datetime]) -> None:
        """Link label → sync time of polls whose answers matched the stored
        digest: one transaction sets each link's sync time and clears its
        error. Labels with no link row are ignored."""
        ...

    async def record_link_error(self, label: str, error: str, at: datetime) -> None:
        """Remember that polling this link failed (keeps its last sync time;
        a link never synced is listed with no customer id)."""
        ...

    async def links(self) -> list[LinkStatus]:
        """Every link ever synced or failed, by label."""
        ...

    # --- local expiry ------------------------------------------------------------

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        """GRANTED marks of items last seen `active` (not `renewed`: that keeps
        the perk) whose expiry is at or before `cutoff` (now minus the grace),
        with the JSON to render from, ordered by expiry, item and server."""
        ...

    # --- store mode ----------------------------------------------------------------

    async def live_baseline(self) -> LiveBaseline:
        """Every live item and every stored customer digest: a snapshot's
        items and embedded customers that match it changed nothing."""
        ...

    async def get_meta(self, key: str) -> str | None:
        """A small named value (the new-items cursor, when the last snapshot,
        new-items read and webhook happened); None if never set."""
        ...

    async def set_meta(self, values: Mapping[str, str]) -> None:
        """Set named values, in one transaction."""
        ...

    async def remember_webhook(self, event_id: str, at: datetime, forget_before: datetime) -> bool:
        """Record a webhook's event id; False if it was recorded before (a
        replay). Ids recorded before `forget_before` are forgotten."""
        ...

    # --- delivery --------------------------------------------------------------------

    async def unfinished(
        self, server: str, after_id: int = 0, limit: int = 500
    ) -> list[JournalRow]:
        """PENDING and WAITING rows for `server` with id > after_id, in id order."""
        ...

    async def mark_attempt(self, row_id: int, fence: Fence | None = None) -> bool:
        """Count one delivery attempt; called right before the command is sent.
        The row becomes PENDING if it was WAITING. True if the row was PENDING
        or WAITING; False if it is finished (cancelled since it was read, by an
        operator or a take-back): then its command must not be sent.

        `fence` (several hosts on one database): in the same statement, the
        lease must be held as the fence says and run out more than its margin
        from now, or nothing is counted and `LeaseLost` is raised. The answer
        may reach the caller late (a network held it up): before sending, the
        caller checks again that the lease, as it knows it, still outlives the
        command. A backend without leases (one host) refuses any fence with
        `StoreError`.

        Like every `mark_*`: a row id that does not exist raises `StoreError`;
        a row that is no longer PENDING or WAITING is left as it is (its first
        outcome stands)."""
        ...

    async def mark_waiting(self, row_id: int, reason: str) -> None:
        """PENDING or WAITING → WAITING, with why (for the player, until a time,
        behind another row). Not finished."""
        ...

    async def mark_delivered(self, row_id: int, at: datetime, reply: str | None = None) -> None:
        """→ DELIVERED, finished at `at`, with the server's reply (cut to
        `REPLY_LIMIT` characters)."""
        ...

    async def mark_rejected(self, row_id: int, reply: str, reason: str, at: datetime) -> None:
        """→ REJECTED (never retried): the server's reply said it failed."""
        ...

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        """→ FAILED (never retried), with why, finished at `at`."""
        ...

    async def prune_journal(self, finished_before: datetime, limit: int) -> int:
        """Delete up to `limit` finished rows (delivered, skipped, kept, failed,
        rejected, cancelled) finished before `finished_before`, oldest first;
        how many went. PENDING and WAITING rows never go. One short
        transaction: call it again while it returns `limit`."""
        ...

    # --- reading, for status and reports ---------------------------------------------

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        """Every journal row (of one server), in id order. For status and tests."""
        ...

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
        """Journal rows matching every filter given, newest first, at most
        `limit` (None: all). For `perksync journal`, `cancel`, `retry` and
        `resend` (`item_ids`: the rows of those items, read through the
        journal's unique key, cheap however long the journal is)."""
        ...

    async def granted(self, server: str) -> list[GrantedItem]:
        """Every item GRANTED on `server` (phase granted), with its customer,
        product, cycle, perk and whether its on_active there is still pending
        or waiting: what `perksync resend` starts from. Ordered by customer,
        then by item id as PayNow's ids grow (shorter first, then by text):
        oldest item first."""
        ...

    async def live_item_counts(self, id_fields: Sequence[str]) -> list[LiveItems]:
        """Per customer, link and product: the stored items of the customer
        last seen `active` or `renewed` (of every product, mapped or not), and
        which of `id_fields` (top-level fields of the customer's JSON) the
        customer has. A customer with several links has a row per link; one
        with none (store mode) a row with `label` None. Customers without such
        items are left out; ordered by label (None last), customer, product.
        It reads every live item: meant for once a pass or an interval."""
        ...

    async def totals(self) -> Totals:
        """How many customers and live items are stored."""
        ...

    async def pending_counts(self) -> dict[str, int]:
        """Server → number of PENDING rows (servers with none are left out).
        Cheap however long the journal is: the service asks every few seconds."""
        ...

    async def server_counts(self) -> list[ServerCounts]:
        """Per server that has journal rows: counts by status, by server name."""
        ...


StoreOpener = Callable[[str], "Store"]

POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")
# Query parameters of a libpq URL that carry a secret.
_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword"})


def is_postgres_url(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def postgres_url_problem(url: str) -> str | None:
    """Why `url` cannot name a PostgreSQL state database, or None. Never
    repeats a password the URL holds."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        return "not a valid URL (postgresql://USER@HOST:PORT/DATABASE)"
    query = {key.lower() for key in parse_qs(parts.query, keep_blank_values=True)}
    if parts.password is not None or query & _SECRET_PARAMETERS:
        return (
            "the URL holds a password: remove it from the URL, and give it in "
            "sync.state_db_password_env or sync.state_db_password_file"
        )
    return None


def describe_postgres_url(url: str) -> str:
    """The URL as messages name the database: user, host, port, database and
    schema (`search_path`) only."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    schemas = [v for k, v in parse_qsl(parts.query) if k.lower() == "search_path"]
    where = f"?search_path={schemas[0]}" if schemas else ""
    return f"{parts.scheme}://{netloc}{parts.path}{where}"


def postgres_driver_missing() -> str | None:
    """What to install for a PostgreSQL state database, when its driver is missing."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return (
            "a postgresql:// state database needs the asyncpg driver: "
            "pip install 'perksync[postgresql]'"
        )
    return None


def open_store(url: str, *, throwaway: bool = False, password: str | None = None) -> Store:
    """Open the store named by `url`: a file path (SQLite), `sqlite:///path`,
    a `postgresql://` URL (its password given apart, never in the URL), or
    `memory://name` (in this process only, for tests: see daemon/state/memory.py).

    `throwaway`: a scratch copy (a dry run's), whose creation is not news to
    the operator; for PostgreSQL, a copy that only this store sees."""
    if url.startswith("memory://"):
        from daemon.state.memory import MemoryStore

        return MemoryStore(url)
    if is_postgres_url(url):
        missing = postgres_driver_missing()
        if missing is not None:
            raise StoreError(missing)
        from daemon.state.postgres import PostgresStore

        return PostgresStore(url, password=password, throwaway=throwaway)
    from daemon.state.sqlite import SqliteStore

    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    return SqliteStore(Path(path), throwaway=throwaway)


# Backend name → opener of its URLs; the contract tests run against each entry.
BACKENDS: dict[str, StoreOpener] = {
    "memory": open_store,
    "postgres": open_store,
    "sqlite": open_store,
}
