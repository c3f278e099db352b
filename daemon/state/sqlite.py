"""The SQLite backend of the store (the embedded default).

One file, opened in WAL mode with `synchronous=NORMAL`: a committed
transaction survives the process being killed (kill -9, OOM, a crash) because
it is in the write-ahead log before the call returns; a power loss or an OS
crash can lose the last few transactions (never corrupt the file). Every write
method is one transaction, committed before it returns.

Several processes may open the same file at once (`perksync status` beside
the running service; two writers only queue behind each other): readers never
block, a writer waits up to `busy_timeout` seconds for another writer, then
fails with `StoreError`. The calls are synchronous inside the async methods
(a pass of a few items takes well under a millisecond of CPU), so a
transaction never spans an `await`; one `SqliteStore` belongs to one event
loop.

A customer block (`SqliteStore.customer`) holds an asyncio lock of that
customer for this object, and reads the customer's `version` with `known`.
Its commit is one `BEGIN IMMEDIATE` transaction whose first statement is the
compare-and-set on that version; another process that committed for the
customer in between has moved it, and the commit raises `CustomerChanged`
before writing anything else.

A new file is built whole under a temporary name in the same folder and
linked into place, so the path never holds a half-made database: a file found
there empty was emptied (a restore gone wrong, a full disk, a careless `>`),
and is refused rather than taken for a new database, which would send every
perk already delivered again. The file is created 0600 (SQLite gives its
`-wal` and `-shm` files the same mode): it holds customers' names and ids.

A write that fails because the file cannot be written at all (disk full,
read-only, I/O error) raises `StoreWriteError`, naming the file and the
error, so that the caller stops instead of failing customer after customer.

Schema changes are numbered migrations (`MIGRATIONS`, registered with
`@migration`), tracked in `PRAGMA user_version` and applied one per
transaction on open. A file whose version is newer than this code knows is
refused, so an older perksync never writes to a database it does not
understand. They live here rather than in .sql files so that they ship inside
the package and can transform data in Python when a step needs it.

Times are stored as ISO 8601 UTC text with microseconds
(`2024-05-01T12:00:00.000000+00:00`): fixed width, so they sort, and readable
with the `sqlite3` shell.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from daemon.diff import Mark, MarkKey, Phase
from daemon.state import (
    REPLY_LIMIT,
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
    SeenItem,
    ServerCounts,
    StoredItem,
    StoreError,
    StoreWriteError,
    Totals,
    refuse_fence,
)
from daemon.state.blocks import Block, CustomerLocks
from daemon.state.migrations import Migration, registrar
from daemon.state.values import check_limit

log = logging.getLogger(__name__)

# `PRAGMA application_id` of a perksync state database ("PRKS").
APPLICATION_ID: Final = 0x50524B53
DEFAULT_BUSY_TIMEOUT: Final = 5.0  # seconds

# Primary result codes meaning the file cannot be written at all, whatever is
# written: the next write would fail the same way.
_CANNOT_WRITE: Final = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)

Upgrade = Callable[[sqlite3.Connection], None]  # inside the step's transaction; must not commit

# The numbered upgrade steps, in order (see daemon/state/migrations.py).
MIGRATIONS: list[Migration[Upgrade]] = []
migration = registrar(MIGRATIONS)


def latest_version() -> int:
    """The schema version this code creates and understands."""
    return len(MIGRATIONS)


def _run(conn: sqlite3.Connection, statements: Sequence[str]) -> None:
    # Not executescript(): it commits, and a step must stay one transaction.
    for statement in statements:
        conn.execute(statement)


@migration("links, items, marks and the delivery journal")
def _v1(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            f"PRAGMA application_id = {APPLICATION_ID}",
            # One row per linked customer, by the config's label for the link.
            # customer_id is NULL while the link has never been read.
            """CREATE TABLE links (
                label          TEXT PRIMARY KEY,
                customer_id    TEXT,
                name           TEXT,
                last_synced_at TEXT,
                last_error     TEXT,
                last_error_at  TEXT
            ) STRICT, WITHOUT ROWID""",
            # Every inventory item seen, with the state it was last seen in.
            """CREATE TABLE items (
                item_id       TEXT PRIMARY KEY,
                customer_id   TEXT NOT NULL,
                product       TEXT NOT NULL,
                state         TEXT NOT NULL,
                first_seen_at TEXT NOT NULL,
                last_seen_at  TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX items_customer ON items (customer_id)",
            # What ran for an item on a server (see daemon.diff.Mark).
            """CREATE TABLE marks (
                item_id TEXT NOT NULL REFERENCES items (item_id),
                server  TEXT NOT NULL,
                phase   TEXT NOT NULL CHECK (phase IN ('granted', 'ended')),
                cycle   INTEGER NOT NULL CHECK (cycle >= 1),
                PRIMARY KEY (item_id, server)
            ) STRICT, WITHOUT ROWID""",
            # The delivery journal: one row per command, written before it is sent.
            # AUTOINCREMENT: ids are never reused, so they order the rows for good.
            """CREATE TABLE journal (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                customer_id   TEXT NOT NULL,
                item_id       TEXT NOT NULL,
                product       TEXT NOT NULL,
                server        TEXT NOT NULL,
                event         TEXT NOT NULL,
                cycle         INTEGER NOT NULL CHECK (cycle >= 1),
                command_index INTEGER NOT NULL CHECK (command_index >= 0),
                command       TEXT NOT NULL,
                status        TEXT NOT NULL
                              CHECK (status IN ('pending', 'delivered', 'failed', 'skipped')),
                reason        TEXT,
                attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                created_at    TEXT NOT NULL,
                finished_at   TEXT,
                UNIQUE (item_id, server, cycle, event, command_index)
            ) STRICT""",
            # (server, status, id): an index ends with the rowid, so this one gives
            # pending() a server's pending rows in id order from any after_id,
            # however long the journal grows, and server_counts() a covering scan.
            "CREATE INDEX journal_server_status ON journal (server, status)",
        ],
    )


@migration("local expiry: item expiry and JSON, customer JSON, the 'lapsed' phase")
def _v2(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            "ALTER TABLE items ADD COLUMN expires_at TEXT",
            "ALTER TABLE items ADD COLUMN raw TEXT",
            "ALTER TABLE links ADD COLUMN customer_raw TEXT",
            "CREATE INDEX items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL",
            # SQLite cannot change a CHECK constraint in place: rebuild marks.
            """CREATE TABLE marks_v2 (
                item_id TEXT NOT NULL REFERENCES items (item_id),
                server  TEXT NOT NULL,
                phase   TEXT NOT NULL CHECK (phase IN ('granted', 'ended', 'lapsed')),
                cycle   INTEGER NOT NULL CHECK (cycle >= 1),
                PRIMARY KEY (item_id, server)
            ) STRICT, WITHOUT ROWID""",
            "INSERT INTO marks_v2 SELECT item_id, server, phase, cycle FROM marks",
            "DROP TABLE marks",
            "ALTER TABLE marks_v2 RENAME TO marks",
        ],
    )


@migration("answers digests; the expiry index holds only active items")
def _v3(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            "ALTER TABLE links ADD COLUMN digest BLOB",
            # The sweep asks every few seconds for active items past their
            # expiry: without `used`/`revoked` ones (which pile up over the
            # years, all in the past) that stays a short range scan.
            "DROP INDEX items_expiry",
            "CREATE INDEX items_expiry ON items (expires_at)"
            " WHERE expires_at IS NOT NULL AND state = 'active'",
            "CREATE INDEX links_customer ON links (customer_id)",
        ],
    )


@migration("an index of the live items, for the report of items that reach no server")
def _v4(conn: sqlite3.Connection) -> None:
    # Used and revoked items pile up over the years; this keeps live_items()
    # reading only the live ones.
    conn.execute(
        "CREATE INDEX items_live ON items (customer_id, product)"
        " WHERE state IN ('active', 'renewed')"
    )


@migration("customers of their own, when each item was read, named values, webhook event ids")
def _v5(conn: sqlite3.Connection) -> None:
    now = _ts(datetime.now(UTC))
    _run(
        conn,
        [
            # One row per customer ever stored, whatever linked it (a token, the
            # store's API key). `version` grows with every commit for the
            # customer: the compare-and-set that keeps two processes from
            # committing on the same stale read.
            """CREATE TABLE customers (
                customer_id TEXT PRIMARY KEY,
                name        TEXT,
                raw         TEXT,
                digest      BLOB,
                version     INTEGER NOT NULL CHECK (version >= 1),
                updated_at  TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            "ALTER TABLE items ADD COLUMN read_at TEXT",
            """CREATE TABLE meta (
                key   TEXT PRIMARY KEY,
                value TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            """CREATE TABLE webhook_events (
                event_id    TEXT PRIMARY KEY,
                received_at TEXT NOT NULL
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX webhook_events_received ON webhook_events (received_at)",
        ],
    )
    conn.execute(_CUSTOMERS_FROM_LINKS, (now,))
    conn.execute(_CUSTOMERS_FROM_ITEMS, (now,))
    # The customer's JSON and name now live in customers only.
    _run(conn, ["ALTER TABLE links DROP COLUMN customer_raw", "ALTER TABLE links DROP COLUMN name"])


# Per customer, the JSON and name of its link that has JSON and synced last.
_CUSTOMERS_FROM_LINKS = """
INSERT INTO customers (customer_id, name, raw, version, updated_at)
SELECT customer_id, name, customer_raw, 1, coalesce(last_synced_at, ?1) FROM (
    SELECT customer_id, name, customer_raw, last_synced_at, row_number() OVER (
        PARTITION BY customer_id ORDER BY customer_raw IS NULL, last_synced_at DESC
    ) AS n
    FROM links WHERE customer_id IS NOT NULL
) WHERE n = 1
"""

# Customers with items but no link (none are expected): a row without JSON.
_CUSTOMERS_FROM_ITEMS = """
INSERT INTO customers (customer_id, version, updated_at)
SELECT DISTINCT customer_id, 1, ?1 FROM items WHERE true
ON CONFLICT (customer_id) DO NOTHING
"""


@migration("shared perks on marks; waiting, rejected, kept and cancelled rows, replies, resends")
def _v6(conn: sqlite3.Connection) -> None:
    _run(
        conn,
        [
            "ALTER TABLE marks ADD COLUMN perk TEXT",
            # SQLite cannot change a CHECK or UNIQUE constraint in place: rebuild
            # the journal, keeping its ids and its AUTOINCREMENT sequence.
            """CREATE TABLE journal_v6 (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                customer_id   TEXT NOT NULL,
                item_id       TEXT NOT NULL,
                product       TEXT NOT NULL,
                server        TEXT NOT NULL,
                event         TEXT NOT NULL,
                cycle         INTEGER NOT NULL CHECK (cycle >= 1),
                command_index INTEGER NOT NULL CHECK (command_index >= 0),
                resend        INTEGER NOT NULL DEFAULT 0 CHECK (resend >= 0),
                command       TEXT NOT NULL,
                status        TEXT NOT NULL CHECK (status IN (
                                  'pending', 'waiting', 'delivered', 'failed', 'skipped',
                                  'rejected', 'kept', 'cancelled')),
                reason        TEXT,
                online        INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
                not_before    TEXT,
                reply         TEXT,
                attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                created_at    TEXT NOT NULL,
                finished_at   TEXT,
                UNIQUE (item_id, server, cycle, event, command_index, resend)
            ) STRICT""",
            """INSERT INTO journal_v6 (id, customer_id, item_id, product, server, event, cycle,
                                       command_index, command, status, reason, attempts,
                                       created_at, finished_at)
               SELECT id, customer_id, item_id, product, server, event, cycle, command_index,
                      command, status, reason, attempts, created_at, finished_at
               FROM journal""",
            """INSERT INTO sqlite_sequence (name, seq)
               SELECT 'journal_v6', seq FROM sqlite_sequence WHERE name = 'journal'
               AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'journal_v6')""",
            """UPDATE sqlite_sequence
               SET seq = max(seq, (SELECT seq FROM sqlite_sequence WHERE name = 'journal'))
               WHERE name = 'journal_v6'""",
            "DROP TABLE journal",
            "ALTER TABLE journal_v6 RENAME TO journal",
            "CREATE INDEX journal_server_status ON journal (server, status)",
            # Each server's unfinished rows in id order (delivery), and each
            # customer's (its open grants): short however long the journal grows.
            "CREATE INDEX journal_unfinished ON journal (server)"
            " WHERE status IN ('pending', 'waiting')",
            "CREATE INDEX journal_open ON journal (customer_id)"
            " WHERE status IN ('pending', 'waiting')",
            # Retention: finished rows by when they finished.
            "CREATE INDEX journal_finished ON journal (finished_at) WHERE finished_at IS NOT NULL",
        ],
    )


# --- times -------------------------------------------------------------------


# Cached both ways: the items of one answer share its read time and often an
# expiry, and a pass converts tens of thousands of them.
@functools.lru_cache(maxsize=4096)
def _ts(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs aware times")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=4096)
def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _dt_or_none(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


# --- statements (module constants, so sqlite3's statement cache reuses them) ---

# The customer's row with its items and their marks, in one statement (one
# snapshot: a commit by another process lands wholly before or after it).
# Every customer with items has a row (commits and the migration make it).
_KNOWN = """
SELECT c.version, c.raw, c.digest,
       i.item_id, i.product, i.state, i.expires_at, i.read_at, i.raw,
       m.server, m.phase, m.cycle, m.perk
FROM customers AS c
LEFT JOIN items AS i ON i.customer_id = c.customer_id
LEFT JOIN marks AS m ON m.item_id = i.item_id
WHERE c.customer_id = ?
"""

# The customer's (item, server) with an on_active row still pending or
# waiting, through the index of unfinished rows per customer. Read after
# `_KNOWN`: a commit in between moved the version, and the block's commit
# then fails its compare-and-set; rows finished in between are left as they
# are by a cancel.
_OPEN_GRANTS = """
SELECT DISTINCT item_id, server FROM journal INDEXED BY journal_open
WHERE customer_id = ? AND status IN ('pending', 'waiting') AND event = 'on_active'
"""

# A take-back cancels its item's grants that wait (a plain pending one is
# sent first); an operator cancels rows.
_CANCEL_GRANT = """
UPDATE journal SET status = 'cancelled', finished_at = ?
WHERE customer_id = ? AND item_id = ? AND server = ? AND event = 'on_active'
  AND (status = 'waiting'
       OR (status = 'pending' AND (online = 1 OR not_before IS NOT NULL)))
"""

_CANCEL_ROW = """
UPDATE journal SET status = 'cancelled', finished_at = ?
WHERE id = ? AND customer_id = ? AND status IN ('pending', 'waiting')
"""

# The compare-and-set that opens every commit: each changes one row or none.
# A new customer (version 0 when read): insert at version 1, unless another
# process inserted it first.
_INSERT_CUSTOMER = """
INSERT INTO customers (customer_id, name, raw, digest, version, updated_at)
VALUES (?, ?, ?, ?, 1, ?)
ON CONFLICT (customer_id) DO NOTHING
"""

_BUMP_CUSTOMER = """
UPDATE customers SET version = version + 1, updated_at = ?
WHERE customer_id = ? AND version = ?
"""

_REPLACE_CUSTOMER = """
UPDATE customers SET version = version + 1, updated_at = ?, name = ?, raw = ?, digest = ?
WHERE customer_id = ? AND version = ?
"""

# Items of a commit that another customer holds (json_each: any number of ids
# in one parameter).
_ITEMS_OF_OTHERS = """
SELECT item_id, customer_id FROM items
WHERE item_id IN (SELECT value FROM json_each(?)) AND customer_id != ?
"""

# The customer an item is taken from has changed too.
_BUMP_VERSION = "UPDATE customers SET version = version + 1 WHERE customer_id = ?"

_UPSERT_ITEM = """
INSERT INTO items (item_id, customer_id, product, state, first_seen_at, last_seen_at,
                   expires_at, raw, read_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8)
ON CONFLICT (item_id) DO UPDATE SET
    customer_id = excluded.customer_id,
    product = excluded.product,
    state = excluded.state,
    last_seen_at = excluded.last_seen_at,
    expires_at = excluded.expires_at,
    raw = coalesce(excluded.raw, items.raw),
    read_at = excluded.read_at
"""

_UPSERT_LINK = """
INSERT INTO links (label, customer_id, last_synced_at, last_error, last_error_at, digest)
VALUES (?, ?, ?, NULL, NULL, ?)
ON CONFLICT (label) DO UPDATE SET
    customer_id = excluded.customer_id,
    last_synced_at = excluded.last_synced_at,
    digest = excluded.digest,
    last_error = NULL,
    last_error_at = NULL
"""

# A commit without a link sync: the customer's marks no longer follow from
# the answers its links' digests stand for.
_FORGET_DIGESTS = """
UPDATE links SET digest = NULL WHERE customer_id = ? AND digest IS NOT NULL
"""

_LINK_ERROR = """
INSERT INTO links (label, last_error, last_error_at) VALUES (?, ?, ?)
ON CONFLICT (label) DO UPDATE SET
    last_error = excluded.last_error,
    last_error_at = excluded.last_error_at
"""

_RECORD_UNCHANGED = """
UPDATE links SET last_synced_at = ?, last_error = NULL, last_error_at = NULL WHERE label = ?
"""

_LINKS = """
SELECT l.label, l.customer_id, c.name, l.last_synced_at, l.last_error, l.last_error_at
FROM links AS l LEFT JOIN customers AS c ON c.customer_id = l.customer_id
ORDER BY l.label
"""

# CROSS JOIN fixes the join order (SQLite never reorders it): the few items
# due, through items_expiry, then their marks and customers. Left to itself
# the planner may scan every customer and its items on each sweep.
_DUE_EXPIRIES = """
SELECT i.customer_id, i.item_id, m.server, m.cycle, i.expires_at, c.raw, i.raw
FROM items AS i
CROSS JOIN marks AS m ON m.item_id = i.item_id AND m.phase = 'granted'
CROSS JOIN customers AS c ON c.customer_id = i.customer_id
WHERE i.expires_at IS NOT NULL AND i.expires_at <= ?
  AND i.state = 'active'  -- a `renewed` item keeps its perk
  AND i.raw IS NOT NULL AND c.raw IS NOT NULL
ORDER BY i.expires_at, i.item_id, m.server
"""

_UPSERT_MARK = """
INSERT INTO marks (item_id, server, phase, cycle, perk) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (item_id, server) DO UPDATE SET
    phase = excluded.phase, cycle = excluded.cycle, perk = excluded.perk
"""

# ON CONFLICT on the unique key only (not INSERT OR IGNORE, which would also
# silently drop a row that breaks a CHECK constraint).
_INSERT_ENTRY = """
INSERT INTO journal (customer_id, item_id, product, server, event, cycle, command_index,
                     command, status, reason, attempts, created_at, finished_at,
                     online, not_before, resend)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)
ON CONFLICT (item_id, server, cycle, event, command_index, resend) DO NOTHING
"""

# Live items are read through items_live: used and revoked items, which pile
# up over the years, are not even in it.
_LIVE_ITEMS = """
SELECT item_id, customer_id, state, expires_at FROM items INDEXED BY items_live
WHERE state IN ('active', 'renewed')
"""

_CUSTOMER_DIGESTS = "SELECT customer_id, digest FROM customers WHERE digest IS NOT NULL"

_TOTALS = """
SELECT (SELECT count(*) FROM customers),
       (SELECT count(*) FROM items INDEXED BY items_live WHERE state IN ('active', 'renewed'))
"""

# Two scans (joined in Python), each cheaper than their join in SQL: the live
# items through items_live, in its order, and the customers.
_LIVE_PRODUCTS = """
SELECT customer_id, product, count(*) FROM items INDEXED BY items_live
WHERE state IN ('active', 'renewed')
GROUP BY customer_id, product
"""

_LINKED = "SELECT customer_id, label FROM links WHERE customer_id IS NOT NULL"


def _customers_with_ids_sql(count: int) -> str:
    # One column per asked field: set unless missing, JSON null, "" or false/0
    # (as a Python truth test of the value would judge it). A customer JSON
    # that is missing or not JSON (a hand-edited file) leaves its ids unknown.
    field = ", coalesce(json_extract(raw, ?), '') NOT IN ('', 0)"
    return (
        f"SELECT customer_id, name, valid{field * count} FROM ("
        " SELECT customer_id, name, json_valid(raw) AS valid,"
        "  CASE WHEN json_valid(raw) THEN raw ELSE '{}' END AS raw"
        " FROM customers"
        ")"
    )


_SET_META = """
INSERT INTO meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""

_FORGET_WEBHOOKS = "DELETE FROM webhook_events WHERE received_at < ?"

_REMEMBER_WEBHOOK = """
INSERT INTO webhook_events (event_id, received_at) VALUES (?, ?)
ON CONFLICT (event_id) DO NOTHING
"""

_ROW_COLUMNS = """id, customer_id, item_id, product, server, event, cycle, command_index,
    command, status, reason, attempts, created_at, finished_at, online, not_before, reply,
    resend"""

# A row's first outcome stands: only pending and waiting rows change. An
# attempt makes a waiting row pending again (its reason no longer holds).
_MARK_ATTEMPT = """
UPDATE journal SET attempts = attempts + 1, status = 'pending', reason = NULL
WHERE id = ? AND status IN ('pending', 'waiting')
"""

_MARK_WAITING = """
UPDATE journal SET status = 'waiting', reason = ?
WHERE id = ? AND status IN ('pending', 'waiting')
"""

_MARK_DELIVERED = """
UPDATE journal SET status = 'delivered', finished_at = ?, reply = ?, reason = NULL
WHERE id = ? AND status IN ('pending', 'waiting')
"""

_MARK_REJECTED = """
UPDATE journal SET status = 'rejected', reply = ?, reason = ?, finished_at = ?
WHERE id = ? AND status IN ('pending', 'waiting')
"""

_MARK_FAILED = """
UPDATE journal SET status = 'failed', reason = ?, finished_at = ?
WHERE id = ? AND status IN ('pending', 'waiting')
"""

# Items granted on a server, oldest item first (PayNow's ids grow), and
# whether an on_active row of theirs there is still unfinished (among the
# customer's few unfinished rows, through journal_open).
_GRANTED = """
SELECT i.customer_id, m.item_id, i.product, m.server, m.cycle, m.perk,
       EXISTS (SELECT 1 FROM journal AS j INDEXED BY journal_open
               WHERE j.customer_id = i.customer_id AND j.status IN ('pending', 'waiting')
                 AND j.item_id = m.item_id AND j.server = m.server AND j.event = 'on_active')
FROM marks AS m JOIN items AS i ON i.item_id = m.item_id
WHERE m.server = ? AND m.phase = 'granted'
ORDER BY i.customer_id, length(m.item_id), m.item_id
"""

# Retention: the oldest finished rows first, through journal_finished, a
# batch at a time (one short transaction each).
_PRUNE = """
DELETE FROM journal WHERE id IN (
    SELECT id FROM journal INDEXED BY journal_finished
    WHERE finished_at IS NOT NULL AND finished_at < ?
      AND status NOT IN ('pending', 'waiting')
    ORDER BY finished_at, id LIMIT ?
)
"""

_UNFINISHED = f"""
SELECT {_ROW_COLUMNS} FROM journal INDEXED BY journal_unfinished
WHERE server = ? AND status IN ('pending', 'waiting') AND id > ?
ORDER BY id LIMIT ?
"""


def empty_file_problem(path: Path) -> str:
    return (
        f"the state database {path} is an empty file: refusing to take it for a new "
        "one, which would send every perk already delivered again; restore it from "
        "a backup, or delete it to start afresh"
    )


def running_user() -> str:
    """The name of the user this process runs as (its effective uid)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _sync_folder(folder: Path) -> None:
    """Make a new name in `folder` durable (best effort: not every file system can)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _why_unwritable(path: Path) -> str:
    """What the operating system says about writing `path`, when it can tell."""
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return ""
    if fs.f_flag & os.ST_RDONLY:
        return f"; its file system ({path.parent}) is mounted read-only"
    if fs.f_bavail == 0:
        return f"; no space left on its file system ({path.parent})"
    for file in (path, path.parent):
        if not os.access(file, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            return f"; {file} is not writable by user {running_user()}"
    return ""


def _cut(reply: str | None) -> str | None:
    return None if reply is None else reply[:REPLY_LIMIT]


def _journal_row(r: Sequence[Any]) -> JournalRow:
    return JournalRow(
        id=r[0],
        customer_id=r[1],
        item_id=r[2],
        product=r[3],
        server=r[4],
        event=r[5],
        cycle=r[6],
        command_index=r[7],
        command=r[8],
        status=JournalStatus(r[9]),
        reason=r[10],
        attempts=r[11],
        created_at=_dt(r[12]),
        finished_at=_dt_or_none(r[13]),
        online=bool(r[14]),
        not_before=_dt_or_none(r[15]),
        reply=r[16],
        resend=r[17],
    )


class SqliteStore:
    """`daemon.state.Store` on one SQLite file; opened (and migrated) by the constructor.

    The file is created if missing; its folder must exist. Raises `StoreError`
    when the file cannot be created or opened, is empty, is not a perksync
    database, is newer than this code, or cannot be upgraded. `throwaway`: a
    scratch copy, whose creation is logged at debug level only.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        throwaway: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise StoreError(
                f"cannot open the state database {self.path}: "
                f"its folder {self.path.parent} does not exist"
            )
        created = self._create_if_missing()
        try:
            # mode=rw: never let SQLite create the file (see _create_if_missing).
            conn = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=rw",
                uri=True,
                timeout=busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the state database {self.path}: {e}") from e
        try:
            self._prepare(conn, busy_timeout)
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open the state database {self.path}: {e}") from e
            raise
        self._conn: sqlite3.Connection | None = conn
        self._locks = CustomerLocks()
        if created:
            log.log(
                logging.DEBUG if throwaway else logging.INFO,
                "created state database %s (schema version %d)",
                self.path,
                latest_version(),
            )

    # --- opening ---------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection, busy_timeout: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout * 1000))}")
        # One snapshot: another process may be creating the schema right now.
        app_id, version, objects = conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id),"
            " (SELECT user_version FROM pragma_user_version),"
            " (SELECT count(*) FROM sqlite_schema)"
        ).fetchone()
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and (version or objects)):
            raise StoreError(f"{self.path} is an SQLite database, but not perksync's state")
        self._refuse_newer(version)
        mode = self._wal(conn, busy_timeout)
        if mode != "wal":
            raise StoreError(
                f"cannot use WAL journal mode on the state database {self.path} "
                f"(got {mode!r}); is it on a network file system?"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        if version < latest_version():
            self._migrate(conn)

    def _create_if_missing(self) -> bool:
        """Create the file with the latest schema unless it exists; True if this call did.

        Built under a temporary name and hard-linked into place (which fails
        if the path exists), so another process opening the same new path at
        the same moment never sees it empty: it sees no file, or a whole one.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot open the state database {self.path}: {e.strerror}") from e
        else:
            if size == 0:
                raise StoreError(empty_file_problem(self.path))
            return False
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.new-", dir=self.path.parent)
        except OSError as e:
            raise StoreError(self._cannot_create(e)) from e
        os.close(fd)
        try:
            self._build(Path(temp))
            try:
                os.link(temp, self.path)
            except FileExistsError:
                return False  # another process created it first: use theirs
            except OSError as e:
                raise StoreError(self._cannot_create(e)) from e
            _sync_folder(self.path.parent)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)

    def _cannot_create(self, error: OSError) -> str:
        return (
            f"cannot create the state database {self.path}: {error.strerror} "
            f"(folder {self.path.parent}, user {running_user()})"
        )

    def _build(self, temp: Path) -> None:
        """The latest schema in the (empty) file `temp`."""
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            self._migrate(conn, announce=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot create the state database {self.path}: {e}") from e
        finally:
            conn.close()

    @staticmethod
    def _wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
        """Switch to WAL (persistent, so usually already done); the journal mode."""
        deadline = time.monotonic() + busy_timeout
        delay = 0.001
        while True:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal":
                return mode
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as e:
                # Changing the mode while another process opens the same new file
                # fails with SQLITE_BUSY at once: SQLite's busy handler does not
                # wait here, so we do.
                if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _refuse_newer(self, version: int) -> None:
        if version > latest_version():
            raise StoreError(
                f"the state database {self.path} has schema version {version}, but this "
                f"perksync only knows versions up to {latest_version()}: refusing to open it "
                f"(run a newer perksync, or restore a backup)"
            )

    def _migrate(self, conn: sqlite3.Connection, *, announce: bool = True) -> None:
        """Apply the missing steps; `announce`: log each (an upgrade of a file in
        use, as opposed to the making of a new one)."""
        steps = list(MIGRATIONS)
        while True:
            # Another process may be migrating the same file: take the write lock,
            # then look at the version again.
            conn.execute("BEGIN IMMEDIATE")
            step: Migration[Upgrade] | None = None
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._refuse_newer(version)
                if version >= len(steps):
                    conn.execute("COMMIT")
                    return
                step = steps[version]
                step.upgrade(conn)
                conn.execute(f"PRAGMA user_version = {step.version}")
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error) and step is not None:
                    raise StoreError(
                        f"cannot upgrade the state database {self.path} to schema version "
                        f"{step.version} ({step.description}): {e}"
                    ) from e
                raise
            log.log(
                logging.INFO if announce else logging.DEBUG,
                "state database %s: upgraded to schema version %d (%s)",
                self.path,
                step.version,
                step.description,
            )

    # --- plumbing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        if self._conn is None:
            raise StoreError(f"the state database {self.path} is closed")
        try:
            yield self._conn
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", None)  # None: not from SQLite itself
            if write and code is not None and code & 0xFF in _CANNOT_WRITE:
                raise StoreWriteError(
                    f"cannot write the state database {self.path}: "
                    f"{e} ({e.sqlite_errorname}){_why_unwritable(self.path)}"
                ) from e
            raise StoreError(f"state database {self.path}: cannot {doing}: {e}") from e

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the write lock from the start."""
        with self._errors(doing, write=True) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _finish(self, row_id: int, sql: str, params: tuple[Any, ...], doing: str) -> bool:
        """Run a row's change of status; whether it changed (it was unfinished)."""
        with self._errors(doing, write=True) as conn:
            if conn.execute(sql, params).rowcount:
                return True
            if not conn.execute("SELECT 1 FROM journal WHERE id = ?", (row_id,)).fetchone():
                raise StoreError(f"state database {self.path}: no journal row {row_id}")
            return False

    # --- the Store protocol -------------------------------------------------------

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str) -> AsyncIterator[CustomerTxn]:
        async with self._locks.hold(customer_id):
            known, version = self._read_known(customer_id)
            block = Block(customer_id, known, version, f"state database {self.path}", self._commit)
            try:
                yield block
            finally:
                block.end()

    def _read_known(self, customer_id: str) -> tuple[KnownCustomer, int]:
        """What the store knows of the customer, and its version (0: no row yet)."""
        version, raw, digest = 0, None, None
        items: dict[str, StoredItem] = {}
        marks: dict[MarkKey, Mark] = {}
        with self._errors(f"read customer {customer_id}") as conn:
            for row in conn.execute(_KNOWN, (customer_id,)):
                version, raw, digest, item_id, product, state, expires_at, read_at = row[:8]
                item_raw, server, phase, cycle, perk = row[8:]
                if item_id is not None and item_id not in items:
                    items[item_id] = StoredItem(
                        product, state, _dt_or_none(expires_at), _dt_or_none(read_at), item_raw
                    )
                if server is not None:
                    marks[(item_id, server)] = Mark(Phase(phase), cycle, perk)
            open_grants = frozenset(
                (item_id, server) for item_id, server in conn.execute(_OPEN_GRANTS, (customer_id,))
            )
        return KnownCustomer(items, marks, raw, digest, open_grants), version

    async def _commit(self, block: Block, change: CustomerChange) -> list[int]:
        # No await inside: the transaction runs whole within one call.
        customer_id = block.customer_id
        block.check_marks(change)
        at = _ts(change.at)
        item_rows = [
            (
                s.item_id,
                customer_id,
                s.product,
                s.state,
                at,
                None if s.expires_at is None else _ts(s.expires_at),
                s.raw,
                None if s.read_at is None else _ts(s.read_at),
            )
            for s in change.seen
        ]
        with self._transaction(f"store customer {customer_id}") as conn:
            if not self._compare_and_set(conn, block, change, at):
                raise block.changed()
            moved = self._take_items(conn, block, change.seen)
            if item_rows:
                conn.executemany(_UPSERT_ITEM, item_rows)
            if change.link is None:
                conn.execute(_FORGET_DIGESTS, (customer_id,))
            else:
                conn.execute(_UPSERT_LINK, (change.link.label, customer_id, at, change.link.digest))
            # Before the entries: a change's own new rows are never cancelled by it.
            self._cancel(conn, customer_id, change, at)
            new_ids = self._journal(conn, change.marks, change.entries, at)
        for item_id, owner in moved:
            log.warning(
                "state database %s: item %s moves from customer %s to customer %s",
                self.path,
                item_id,
                owner,
                customer_id,
            )
        return new_ids

    @staticmethod
    def _compare_and_set(
        conn: sqlite3.Connection, block: Block, change: CustomerChange, at: str
    ) -> bool:
        """Move the customer's version on from the one read with `known` (and
        store its row when given); False if another process moved it first."""
        record = change.customer
        if block.version == 0:
            params: tuple[Any, ...] = (block.customer_id, None, None, None, at)
            if record is not None:
                params = (block.customer_id, record.name, record.raw, record.digest, at)
            return conn.execute(_INSERT_CUSTOMER, params).rowcount == 1
        if record is None:
            params = (at, block.customer_id, block.version)
            return conn.execute(_BUMP_CUSTOMER, params).rowcount == 1
        params = (at, record.name, record.raw, record.digest, block.customer_id, block.version)
        return conn.execute(_REPLACE_CUSTOMER, params).rowcount == 1

    @staticmethod
    def _take_items(
        conn: sqlite3.Connection, block: Block, seen: Sequence[SeenItem]
    ) -> list[tuple[str, str]]:
        """Items of the commit stored under another customer move to this one
        (the caller warns); the customers they leave have changed too. The
        (item, customer left) pairs."""
        new = [s.item_id for s in seen if s.item_id not in block.known.items]
        if not new:
            return []
        moved = conn.execute(_ITEMS_OF_OTHERS, (json.dumps(new), block.customer_id)).fetchall()
        for owner in sorted({owner for _, owner in moved}):
            conn.execute(_BUMP_VERSION, (owner,))
            conn.execute(_FORGET_DIGESTS, (owner,))
        return [(item_id, owner) for item_id, owner in moved]

    @staticmethod
    def _cancel(
        conn: sqlite3.Connection, customer_id: str, change: CustomerChange, at: str
    ) -> None:
        if change.cancel_grants:
            conn.executemany(
                _CANCEL_GRANT,
                [(at, customer_id, item_id, server) for item_id, server in change.cancel_grants],
            )
        if change.cancel_rows:
            conn.executemany(_CANCEL_ROW, [(at, row, customer_id) for row in change.cancel_rows])

    @staticmethod
    def _journal(
        conn: sqlite3.Connection,
        marks: Mapping[MarkKey, Mark],
        entries: Sequence[JournalEntry],
        at: str,
    ) -> list[int]:
        """Store marks and journal entries inside the caller's transaction."""
        mark_rows = [
            (item_id, server, str(mark.phase), mark.cycle, mark.perk)
            for (item_id, server), mark in marks.items()
        ]
        entry_rows = [
            (
                e.customer_id,
                e.item_id,
                e.product,
                e.server,
                str(e.event),
                e.cycle,
                e.command_index,
                e.command,
                str(e.status),
                e.reason,
                at,
                None if e.status in UNFINISHED else at,
                int(e.online),
                None if e.not_before is None else _ts(e.not_before),
                e.resend,
            )
            for e in entries
        ]
        if mark_rows:
            conn.executemany(_UPSERT_MARK, mark_rows)
        if not entry_rows:
            return []
        # We hold the write lock and ids only grow: the rows above the
        # current maximum are exactly the ones this statement inserts.
        last = conn.execute("SELECT coalesce(max(id), 0) FROM journal").fetchone()[0]
        conn.executemany(_INSERT_ENTRY, entry_rows)
        return [
            r[0] for r in conn.execute("SELECT id FROM journal WHERE id > ? ORDER BY id", (last,))
        ]

    # --- token mode: the configured links ---------------------------------------

    async def link_digests(self) -> dict[str, bytes]:
        with self._errors("read the links' digests") as conn:
            return dict(
                conn.execute("SELECT label, digest FROM links WHERE digest IS NOT NULL").fetchall()
            )

    async def record_unchanged(self, synced: Mapping[str, datetime]) -> None:
        if not synced:
            return
        rows = [(_ts(at), label) for label, at in synced.items()]
        with self._transaction(f"record the sync of {len(rows)} unchanged links") as conn:
            conn.executemany(_RECORD_UNCHANGED, rows)

    async def record_link_error(self, label: str, error: str, at: datetime) -> None:
        with self._errors(f"record the error of {label}", write=True) as conn:
            conn.execute(_LINK_ERROR, (label, error, _ts(at)))

    async def links(self) -> list[LinkStatus]:
        with self._errors("read the links") as conn:
            return [
                LinkStatus(
                    label=label,
                    customer_id=customer_id,
                    name=name,
                    last_synced_at=_dt_or_none(synced),
                    last_error=error,
                    last_error_at=_dt_or_none(error_at),
                )
                for label, customer_id, name, synced, error, error_at in conn.execute(_LINKS)
            ]

    # --- local expiry -----------------------------------------------------------

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        with self._errors("read the items due to expire") as conn:
            return [
                DueExpiry(customer_id, item_id, server, cycle, _dt(expires_at), c_raw, i_raw)
                for customer_id, item_id, server, cycle, expires_at, c_raw, i_raw in conn.execute(
                    _DUE_EXPIRIES, (_ts(cutoff),)
                )
            ]

    # --- store mode ---------------------------------------------------------------

    async def live_baseline(self) -> LiveBaseline:
        with self._errors("read the live items") as conn:
            items = {
                item_id: LiveItem(customer_id, state, _dt_or_none(expires_at))
                for item_id, customer_id, state, expires_at in conn.execute(_LIVE_ITEMS)
            }
            customers = dict(conn.execute(_CUSTOMER_DIGESTS).fetchall())
        return LiveBaseline(items, customers)

    async def get_meta(self, key: str) -> str | None:
        with self._errors(f"read the value {key}") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, values: Mapping[str, str]) -> None:
        if not values:
            return
        with self._transaction(f"store the values {', '.join(values)}") as conn:
            conn.executemany(_SET_META, values.items())

    async def remember_webhook(self, event_id: str, at: datetime, forget_before: datetime) -> bool:
        params = (event_id, _ts(at))
        before = _ts(forget_before)
        with self._transaction(f"remember webhook event {event_id}") as conn:
            conn.execute(_FORGET_WEBHOOKS, (before,))
            remembered: bool = conn.execute(_REMEMBER_WEBHOOK, params).rowcount == 1
        return remembered

    # --- delivery -------------------------------------------------------------------

    async def unfinished(
        self, server: str, after_id: int = 0, limit: int = 500
    ) -> list[JournalRow]:
        check_limit(limit)
        with self._errors(f"read the pending commands of {server}") as conn:
            return [_journal_row(r) for r in conn.execute(_UNFINISHED, (server, after_id, limit))]

    async def mark_attempt(self, row_id: int, fence: Fence | None = None) -> bool:
        refuse_fence(fence, f"the state file {self.path}")
        doing = f"count an attempt of journal row {row_id}"
        return self._finish(row_id, _MARK_ATTEMPT, (row_id,), doing)

    async def mark_waiting(self, row_id: int, reason: str) -> None:
        self._finish(row_id, _MARK_WAITING, (reason, row_id), f"mark journal row {row_id} waiting")

    async def mark_delivered(self, row_id: int, at: datetime, reply: str | None = None) -> None:
        params = (_ts(at), _cut(reply), row_id)
        self._finish(row_id, _MARK_DELIVERED, params, f"mark journal row {row_id} delivered")

    async def mark_rejected(self, row_id: int, reply: str, reason: str, at: datetime) -> None:
        params = (_cut(reply), reason, _ts(at), row_id)
        self._finish(row_id, _MARK_REJECTED, params, f"mark journal row {row_id} rejected")

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        params = (reason, _ts(at), row_id)
        self._finish(row_id, _MARK_FAILED, params, f"mark journal row {row_id} failed")

    async def prune_journal(self, finished_before: datetime, limit: int) -> int:
        check_limit(limit)
        params = (_ts(finished_before), limit)
        with self._transaction("prune the journal") as conn:
            pruned: int = conn.execute(_PRUNE, params).rowcount
        return pruned

    # --- reading, for status and reports ------------------------------------------------

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
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("server", server), ("customer_id", customer_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        for column, values in (
            ("status", [str(s) for s in statuses]),
            ("id", list(row_ids)),
            ("item_id", list(item_ids)),
        ):
            if values:
                where.append(f"{column} IN (SELECT value FROM json_each(?))")
                params.append(json.dumps(values))
        sql = f"SELECT {_ROW_COLUMNS} FROM journal"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._errors("read the journal") as conn:
            return [_journal_row(r) for r in conn.execute(sql, params)]

    async def granted(self, server: str) -> list[GrantedItem]:
        with self._errors(f"read the items granted on {server}") as conn:
            return [
                GrantedItem(customer_id, item_id, product, server_, cycle, perk, bool(open_))
                for customer_id, item_id, product, server_, cycle, perk, open_ in conn.execute(
                    _GRANTED, (server,)
                )
            ]

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        with self._errors("read the journal") as conn:
            if server is None:
                cursor = conn.execute(f"SELECT {_ROW_COLUMNS} FROM journal ORDER BY id")
            else:
                cursor = conn.execute(
                    f"SELECT {_ROW_COLUMNS} FROM journal WHERE server = ? ORDER BY id", (server,)
                )
            return [_journal_row(r) for r in cursor]

    async def live_item_counts(self, id_fields: Sequence[str]) -> list[LiveItems]:
        fields = list(dict.fromkeys(id_fields))
        paths = [f'$."{name}"' for name in fields]
        products: dict[str, list[tuple[str, int]]] = {}
        labels: dict[str, list[str | None]] = {}
        with self._errors("read the live items") as conn:
            for customer_id, product, count in conn.execute(_LIVE_PRODUCTS):
                products.setdefault(customer_id, []).append((product, count))
            for customer_id, label in conn.execute(_LINKED):
                labels.setdefault(customer_id, []).append(label)
            customers = conn.execute(_customers_with_ids_sql(len(paths)), paths).fetchall()
        live = []
        for customer_id, name, valid, *flags in customers:
            held = products.get(customer_id)
            if not held:
                continue
            ids = frozenset(f for f, has in zip(fields, flags, strict=True) if has)
            for label in labels.get(customer_id) or [None]:
                live += [
                    LiveItems(label, customer_id, name, product, n, ids if valid else None)
                    for product, n in held
                ]
        live.sort(key=lambda r: (r.label is None, r.label or "", r.customer_id, r.product))
        return live

    async def totals(self) -> Totals:
        with self._errors("count the customers and live items") as conn:
            customers, live = conn.execute(_TOTALS).fetchone()
        return Totals(customers=customers, live_items=live)

    async def pending_counts(self) -> dict[str, int]:
        with self._errors("count the pending commands") as conn:
            return dict(
                conn.execute(
                    "SELECT server, count(*) FROM journal WHERE status = 'pending' GROUP BY server"
                ).fetchall()
            )

    async def server_counts(self) -> list[ServerCounts]:
        counts: dict[str, dict[str, int]] = {}
        with self._errors("count the journal") as conn:
            for server, status, n in conn.execute(
                "SELECT server, status, count(*) FROM journal GROUP BY server, status"
            ):
                counts.setdefault(server, {})[status] = n
        return [
            ServerCounts.tally(server, by_status) for server, by_status in sorted(counts.items())
        ]
