"""The PostgreSQL backend of the store: one database shared by every perksync
process that names it, on one host or several.

Selected by a `postgresql://` (or `postgres://`) URL in `sync.state_db`. The
URL never holds the password: it comes apart (`sync.state_db_password_env` or
`_file`) and is never part of a message. The URL's query may carry server
settings, e.g. `?search_path=perksync` for a schema of perksync's own.

Calls go through a pool of connections. Every write is one transaction,
committed (durable, with the server's default `synchronous_commit`) before
the method returns, and most are one statement: one round trip.

A customer block (`PostgresStore.customer`) holds an asyncio lock of that
customer for this object and reads `known` with the customer's `version` in
one statement (one snapshot); nothing is held in the database while the
block decides. Its commit is one statement whose first step is the
compare-and-set: an upsert of the customer's row that changes it only at the
version read. That takes the row's lock until the commit ends, so commits for
one customer from any process or host queue on it, and the later one finds
the version moved and stores nothing (`CustomerChanged`): every other step of
the statement runs only when the compare-and-set went through. An item of
the commit that another customer holds is locked and moves here, and that
customer's version moves on. A commit that cannot know what it would take
from another one running at the same moment stores nothing and raises
`CustomerChanged` too: the same new item being inserted by another
customer's commit, or a deadlock of two commits that take each other's
items. The caller reads again, and then sees the other's result.

Journal ids come from an identity column: they grow with insertion, and one
customer's rows are committed in id order (its commits queue on its row).
Rows of different customers committed at the same moment by different
connections may become visible out of id order.

Schema changes are numbered migrations (`MIGRATIONS`, registered with
`@migration`), recorded in the table `perksync_schema`; each step is one
transaction, taken under an advisory lock of the schema, so hosts that start
together upgrade it once. A database whose version is newer than this code
knows is refused. Times are `timestamptz`. PostgreSQL's text cannot hold a
NUL character (SQLite's can): in free text (names, reasons, replies, errors)
it is stored as the escape `\\u0000`.

A throw-away store (a dry run's) works on a copy: one connection of its own,
whose session copies the tables into temporary ones in one snapshot and then
only reads or writes those (its transactions are read-only for every other
table). Nothing in the database changes, a running service is not held up,
and the server drops the copy when the connection ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

from daemon.diff import Mark, MarkKey, Phase
from daemon.state import (
    CustomerChange,
    CustomerTxn,
    DueExpiry,
    Fence,
    GrantedItem,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    LeaseLost,
    LinkStatus,
    LiveBaseline,
    LiveItem,
    LiveItems,
    ServerCounts,
    StoredItem,
    StoreError,
    StoreWriteError,
    Totals,
    describe_postgres_url,
    postgres_url_problem,
)
from daemon.state import postgres_shared as shared_sql
from daemon.state.blocks import Block, CustomerLocks
from daemon.state.migrations import Migration, registrar
from daemon.state.shared import (
    HINTS,
    JOURNAL,
    FleetClaim,
    FleetSettings,
    HostRecord,
    HostStatus,
    Listening,
    Tick,
)
from daemon.state.values import check_limit, cut_reply, ids_set, utc, utc_or_none

log = logging.getLogger(__name__)

# The first key of perksync's advisory locks ("PRKS"); the second is a hash of
# the schema and the lock's purpose, so that schemas of one database (a test
# per schema, a deployment per schema) never wait for each other.
LOCK_CLASS: Final = 0x50524B53
CONNECT_TIMEOUT: Final = 10.0  # seconds to open a connection
COMMAND_TIMEOUT: Final = 60.0  # seconds a statement may take before it is cancelled
LOCK_TIMEOUT: Final = "10s"  # a row lock held longer than this by another commit: StoreError
DEFAULT_POOL_SIZE: Final = 10

# SQLSTATEs meaning the database cannot be written at all, whatever is written:
# disk full, a read-only server (a standby, default_transaction_read_only),
# an I/O error, no right to write.
_CANNOT_WRITE: Final = frozenset({"53100", "25006", "58030", "42501"})
# A commit that lost to another one running at the same moment.
_LOST_RACE: Final = frozenset({"40001", "40P01"})
_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

Upgrade = Callable[[Any], Awaitable[None]]

# The numbered upgrade steps, in order (see daemon/state/migrations.py).
MIGRATIONS: list[Migration[Upgrade]] = []
migration = registrar(MIGRATIONS)


def latest_version() -> int:
    """The schema version this code creates and understands."""
    return len(MIGRATIONS)


async def _run(conn: Any, statements: Sequence[str]) -> None:
    for statement in statements:
        await conn.execute(statement)


# COLLATE "C" on the text keys: they sort by code point, as SQLite and Python
# do, whatever the database's locale.
@migration("customers, items, marks, links, the delivery journal, named values, webhook ids")
async def _v1(conn: Any) -> None:
    await _run(
        conn,
        [
            # One row per customer ever stored. `version` grows with every
            # commit for the customer: the compare-and-set of customer blocks.
            """CREATE TABLE customers (
                customer_id text COLLATE "C" PRIMARY KEY,
                name        text,
                raw         text,
                digest      bytea,
                version     bigint NOT NULL CHECK (version >= 1),
                updated_at  timestamptz NOT NULL
            )""",
            # Token mode: one row per configured link, by its label; customer_id
            # is NULL while the link has never been read.
            """CREATE TABLE links (
                label          text COLLATE "C" PRIMARY KEY,
                customer_id    text COLLATE "C",
                last_synced_at timestamptz,
                last_error     text,
                last_error_at  timestamptz,
                digest         bytea
            )""",
            "CREATE INDEX links_customer ON links (customer_id)",
            # Every inventory item seen, with the state it was last seen in.
            """CREATE TABLE items (
                item_id       text COLLATE "C" PRIMARY KEY,
                customer_id   text COLLATE "C" NOT NULL,
                product       text COLLATE "C" NOT NULL,
                state         text NOT NULL,
                first_seen_at timestamptz NOT NULL,
                last_seen_at  timestamptz NOT NULL,
                expires_at    timestamptz,
                raw           text,
                read_at       timestamptz
            )""",
            "CREATE INDEX items_customer ON items (customer_id)",
            # The sweep's few active items past their expiry, and the live items
            # (used and revoked ones pile up over the years and are in neither).
            "CREATE INDEX items_expiry ON items (expires_at)"
            " WHERE expires_at IS NOT NULL AND state = 'active'",
            "CREATE INDEX items_live ON items (customer_id, product)"
            " WHERE state IN ('active', 'renewed')",
            # What ran for an item on a server (see daemon.diff.Mark). Deferrable:
            # a dry run copies the tables in any order, checked at its commit.
            """CREATE TABLE marks (
                item_id text COLLATE "C" NOT NULL
                        REFERENCES items (item_id) DEFERRABLE INITIALLY IMMEDIATE,
                server  text COLLATE "C" NOT NULL,
                phase   text NOT NULL CHECK (phase IN ('granted', 'ended', 'lapsed')),
                cycle   integer NOT NULL CHECK (cycle >= 1),
                perk    text,
                PRIMARY KEY (item_id, server)
            )""",
            # The delivery journal: one row per command, written before it is sent.
            """CREATE TABLE journal (
                id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                customer_id   text COLLATE "C" NOT NULL,
                item_id       text COLLATE "C" NOT NULL,
                product       text COLLATE "C" NOT NULL,
                server        text COLLATE "C" NOT NULL,
                event         text NOT NULL,
                cycle         integer NOT NULL CHECK (cycle >= 1),
                command_index integer NOT NULL CHECK (command_index >= 0),
                resend        integer NOT NULL DEFAULT 0 CHECK (resend >= 0),
                command       text NOT NULL,
                status        text NOT NULL CHECK (status IN (
                                  'pending', 'waiting', 'delivered', 'failed', 'skipped',
                                  'rejected', 'kept', 'cancelled')),
                reason        text,
                online        boolean NOT NULL DEFAULT false,
                not_before    timestamptz,
                reply         text,
                attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                created_at    timestamptz NOT NULL,
                finished_at   timestamptz,
                UNIQUE (item_id, server, cycle, event, command_index, resend)
            )""",
            # Each server's unfinished rows in id order (delivery), each
            # customer's (its open grants), the counts per server and status,
            # finished rows by when they finished (retention).
            "CREATE INDEX journal_unfinished ON journal (server, id)"
            " WHERE status IN ('pending', 'waiting')",
            "CREATE INDEX journal_open ON journal (customer_id)"
            " WHERE status IN ('pending', 'waiting')",
            "CREATE INDEX journal_server_status ON journal (server, status)",
            "CREATE INDEX journal_finished ON journal (finished_at, id)"
            " WHERE finished_at IS NOT NULL",
            """CREATE TABLE meta (
                key   text COLLATE "C" PRIMARY KEY,
                value text NOT NULL
            )""",
            """CREATE TABLE webhook_events (
                event_id    text COLLATE "C" PRIMARY KEY,
                received_at timestamptz NOT NULL
            )""",
            "CREATE INDEX webhook_events_received ON webhook_events (received_at)",
        ],
    )


@migration("several hosts: hosts, leases, webhook hints")
async def _v2(conn: Any) -> None:
    await _run(conn, shared_sql.TABLES)


# --- values in and out -----------------------------------------------------------


def _text(value: str | None) -> str | None:
    """Free text as PostgreSQL can hold it (no NUL character)."""
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\\u0000")


def _ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _journal_row(r: Any) -> JournalRow:
    """A journal row from a record of `_ROW_COLUMNS` (named as JournalRow's fields)."""
    fields = dict(r.items())
    fields["status"] = JournalStatus(fields["status"])
    return JournalRow(**fields)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as `width` column lists (the arrays a statement unnests)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


# --- statements ----------------------------------------------------------------------

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS perksync_schema (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""

_LOCK_KEY = "hashtext(coalesce(current_schema(), '') || ' ' || $2::text)"
_FLEET_LOCK_KEY = _LOCK_KEY.replace("$2::text", "'fleet'")

# The customer's row, items with their marks, and open grants, in one
# statement (one snapshot: another host's commit lands wholly before or after
# it). Each item's marks are read through the marks' key, whatever the
# planner thinks of a join (on a young database it scans every mark).
_KNOWN = """
SELECT c.version, c.raw, c.digest,
       ARRAY(SELECT ROW(i.item_id, i.product, i.state, i.expires_at, i.read_at, i.raw,
                        ARRAY(SELECT ROW(m.server, m.phase, m.cycle, m.perk)
                              FROM marks AS m WHERE m.item_id = i.item_id))
             FROM items AS i WHERE i.customer_id = $1) AS items,
       ARRAY(SELECT DISTINCT ROW(j.item_id, j.server) FROM journal AS j
             WHERE j.customer_id = $1 AND j.status IN ('pending', 'waiting')
               AND j.event = 'on_active') AS open_grants
FROM (VALUES (1)) AS one LEFT JOIN customers AS c ON c.customer_id = $1
"""

# A customer block's commit, whole, in one statement. `cas` comes first (every
# other step waits for it through `EXISTS (SELECT FROM cas)`) and stores
# nothing unless the customer's row is still at the version `known` was read
# at ($2; 0: no row). Parameters: $1 customer, $3 the change's time, $4-$7 the
# customer's row (when $4), $8-$13 the items, $14-$15 the link, $16-$20 the
# marks, $21-$33 the journal entries, $34-$36 the rows to cancel.
_COMMIT = """
WITH cas AS (
    INSERT INTO customers AS c (customer_id, name, raw, digest, version, updated_at)
    VALUES ($1, $5, $6, $7, 1, $3)
    ON CONFLICT (customer_id) DO UPDATE SET
        version = c.version + 1,
        updated_at = excluded.updated_at,
        name = CASE WHEN $4::boolean THEN excluded.name ELSE c.name END,
        raw = CASE WHEN $4::boolean THEN excluded.raw ELSE c.raw END,
        digest = CASE WHEN $4::boolean THEN excluded.digest ELSE c.digest END
    WHERE c.version = $2::bigint
    RETURNING 1
), seen AS (
    SELECT * FROM unnest($8::text[], $9::text[], $10::text[], $11::timestamptz[],
                         $12::text[], $13::timestamptz[])
        AS s (item_id, product, state, expires_at, raw, read_at)
    WHERE EXISTS (SELECT FROM cas)
), others AS (
    -- Items of the commit that another customer holds, locked (as they are now).
    SELECT i.item_id, i.customer_id FROM items AS i
    WHERE i.item_id IN (SELECT item_id FROM seen) AND i.customer_id <> $1
    FOR UPDATE
), left_by AS (
    -- The customers they leave have changed.
    UPDATE customers SET version = version + 1
    WHERE customer_id IN (SELECT customer_id FROM others)
), updated AS (
    UPDATE items AS i SET
        customer_id = $1, product = s.product, state = s.state, last_seen_at = $3,
        expires_at = s.expires_at, raw = coalesce(s.raw, i.raw), read_at = s.read_at
    FROM seen AS s
    WHERE i.item_id = s.item_id
      AND (SELECT count(*) FROM others) >= 0  -- `others` locks its rows before this
), inserted AS (
    -- An item another commit inserts meanwhile breaks the key: the commit fails.
    INSERT INTO items (item_id, customer_id, product, state, first_seen_at, last_seen_at,
                       expires_at, raw, read_at)
    SELECT s.item_id, $1, s.product, s.state, $3, $3, s.expires_at, s.raw, s.read_at
    FROM seen AS s WHERE NOT EXISTS (SELECT FROM items AS i WHERE i.item_id = s.item_id)
), forgotten AS (
    -- Answers digests no longer stand: those of the customers left, and without
    -- a link sync this customer's own.
    UPDATE links SET digest = NULL
    WHERE customer_id = ANY (ARRAY(SELECT customer_id FROM others)
                             || CASE WHEN $14::text IS NULL THEN ARRAY[$1::text] END)
      AND digest IS NOT NULL AND label IS DISTINCT FROM $14::text AND EXISTS (SELECT FROM cas)
), synced AS (
    INSERT INTO links (label, customer_id, last_synced_at, digest)
    SELECT $14::text, $1, $3, $15::bytea WHERE $14::text IS NOT NULL AND EXISTS (SELECT FROM cas)
    ON CONFLICT (label) DO UPDATE SET
        customer_id = excluded.customer_id,
        last_synced_at = excluded.last_synced_at,
        digest = excluded.digest,
        last_error = NULL,
        last_error_at = NULL
), marked AS (
    INSERT INTO marks AS m (item_id, server, phase, cycle, perk)
    SELECT * FROM unnest($16::text[], $17::text[], $18::text[], $19::integer[], $20::text[])
    WHERE EXISTS (SELECT FROM cas)
    ON CONFLICT (item_id, server) DO UPDATE SET
        phase = excluded.phase, cycle = excluded.cycle, perk = excluded.perk
), cancelled AS (
    -- Rows there before this commit only: its own new rows are never cancelled by it.
    UPDATE journal SET status = 'cancelled', finished_at = $3
    WHERE customer_id = $1 AND status IN ('pending', 'waiting') AND EXISTS (SELECT FROM cas)
      AND (id = ANY($36::bigint[])
           OR (event = 'on_active'
               AND (item_id, server) IN (SELECT * FROM unnest($34::text[], $35::text[]))
               -- only grants that wait: a plain pending one is sent before its take-back
               AND (status = 'waiting' OR online OR not_before IS NOT NULL)))
), journaled AS (
    INSERT INTO journal (customer_id, item_id, product, server, event, cycle, command_index,
                         command, status, reason, created_at, finished_at, online,
                         not_before, resend)
    SELECT e.customer_id, e.item_id, e.product, e.server, e.event, e.cycle, e.command_index,
           e.command, e.status, e.reason, $3,
           CASE WHEN e.status IN ('pending', 'waiting') THEN NULL ELSE $3 END,
           e.online, e.not_before, e.resend
    FROM unnest($21::text[], $22::text[], $23::text[], $24::text[], $25::text[],
                $26::integer[], $27::integer[], $28::text[], $29::text[], $30::text[],
                $31::boolean[], $32::timestamptz[], $33::integer[]) WITH ORDINALITY
        AS e (customer_id, item_id, product, server, event, cycle, command_index, command,
              status, reason, online, not_before, resend, n)
    WHERE EXISTS (SELECT FROM cas)
    ORDER BY e.n  -- ids in the entries' order
    ON CONFLICT (item_id, server, cycle, event, command_index, resend) DO NOTHING
    RETURNING id
)
SELECT EXISTS (SELECT FROM cas) AS stored,
       ARRAY(SELECT id FROM journaled ORDER BY id) AS ids,
       ARRAY(SELECT ROW(item_id, customer_id) FROM others ORDER BY item_id) AS moved
"""

_LINK_ERROR = """
INSERT INTO links (label, last_error, last_error_at) VALUES ($1, $2, $3)
ON CONFLICT (label) DO UPDATE SET
    last_error = excluded.last_error,
    last_error_at = excluded.last_error_at
"""

_RECORD_UNCHANGED = """
UPDATE links AS l SET last_synced_at = u.at, last_error = NULL, last_error_at = NULL
FROM unnest($1::text[], $2::timestamptz[]) AS u (label, at)
WHERE l.label = u.label
"""

_LINKS = """
SELECT l.label, l.customer_id, c.name, l.last_synced_at, l.last_error, l.last_error_at
FROM links AS l LEFT JOIN customers AS c ON c.customer_id = l.customer_id
ORDER BY l.label
"""

_DUE_EXPIRIES = """
SELECT i.customer_id, i.item_id, m.server, m.cycle, i.expires_at, c.raw AS customer_raw,
       i.raw AS item_raw
FROM items AS i
JOIN marks AS m ON m.item_id = i.item_id AND m.phase = 'granted'
JOIN customers AS c ON c.customer_id = i.customer_id
WHERE i.expires_at IS NOT NULL AND i.expires_at <= $1
  AND i.state = 'active'  -- a `renewed` item keeps its perk
  AND i.raw IS NOT NULL AND c.raw IS NOT NULL
ORDER BY i.expires_at, i.item_id, m.server
"""

_LIVE_ITEMS = """
SELECT item_id, customer_id, state, expires_at FROM items
WHERE state IN ('active', 'renewed')
"""

# Per customer and product, its live items, with the customer's row (once per
# product: parsed once per customer) and its links.
_LIVE_PRODUCTS = """
SELECT l.customer_id, l.product, l.n, c.name, c.raw,
       ARRAY(SELECT label FROM links AS k WHERE k.customer_id = l.customer_id) AS labels
FROM (SELECT customer_id, product, count(*) AS n FROM items
      WHERE state IN ('active', 'renewed') GROUP BY customer_id, product) AS l
JOIN customers AS c ON c.customer_id = l.customer_id
"""

_TOTALS = """
SELECT (SELECT count(*) FROM customers) AS customers,
       (SELECT count(*) FROM items WHERE state IN ('active', 'renewed')) AS live
"""

_SET_META = """
INSERT INTO meta (key, value) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""

_ROW_COLUMNS = """id, customer_id, item_id, product, server, event, cycle, command_index,
    command, status, reason, attempts, created_at, finished_at, online, not_before, reply,
    resend"""

_UNFINISHED = f"""
SELECT {_ROW_COLUMNS} FROM journal
WHERE server = $1 AND status IN ('pending', 'waiting') AND id > $2
ORDER BY id LIMIT $3
"""


def _mark(assignments: str) -> str:
    """A journal row's change of status: only while it is pending or waiting (its
    first outcome stands); tells whether the row exists."""
    return f"""
WITH changed AS (
    UPDATE journal SET {assignments}
    WHERE id = $1 AND status IN ('pending', 'waiting') RETURNING 1
)
SELECT EXISTS (SELECT FROM changed),
       EXISTS (SELECT FROM changed) OR EXISTS (SELECT FROM journal WHERE id = $1)
"""


# An attempt makes a waiting row pending again (its reason no longer holds).
_MARK_ATTEMPT = _mark("attempts = attempts + 1, status = 'pending', reason = NULL")
_MARK_WAITING = _mark("status = 'waiting', reason = $2")
_MARK_DELIVERED = _mark("status = 'delivered', finished_at = $2, reply = $3, reason = NULL")
_MARK_REJECTED = _mark("status = 'rejected', reply = $2, reason = $3, finished_at = $4")
_MARK_FAILED = _mark("status = 'failed', reason = $2, finished_at = $3")

_PRUNE = """
WITH gone AS (
    DELETE FROM journal WHERE id IN (
        SELECT id FROM journal
        WHERE finished_at IS NOT NULL AND finished_at < $1
          AND status NOT IN ('pending', 'waiting')
        ORDER BY finished_at, id LIMIT $2
    ) RETURNING 1
)
SELECT count(*) FROM gone
"""

_GRANTED = """
SELECT i.customer_id, m.item_id, i.product, m.server, m.cycle, m.perk,
       EXISTS (SELECT FROM journal AS j
               WHERE j.customer_id = i.customer_id AND j.status IN ('pending', 'waiting')
                 AND j.item_id = m.item_id AND j.server = m.server
                 AND j.event = 'on_active') AS open_grant
FROM marks AS m JOIN items AS i ON i.item_id = m.item_id
WHERE m.server = $1 AND m.phase = 'granted'
ORDER BY i.customer_id, length(m.item_id), m.item_id
"""

# The session's temporary tables, with their columns (quoted, in order).
_TEMP_TABLES = """
SELECT c.relname, string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
WHERE c.relnamespace = pg_my_temp_schema() AND c.relkind = 'r'
  AND a.attnum > 0 AND NOT a.attisdropped
GROUP BY c.relname
"""


class PostgresStore:
    """`daemon.state.Store` on a PostgreSQL database.

    Opening is lazy: the first call connects (and migrates), and raises
    `StoreError` when the server cannot be reached, refuses the login, or
    holds a schema newer than this code. `password` never comes in the URL.
    `throwaway`: work on a copy of the database (see the module docstring).
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        throwaway: bool = False,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        problem = postgres_url_problem(url)
        if problem is not None:
            raise StoreError(f"state database: {problem}")
        self.url = url
        self.name = describe_postgres_url(url)
        self._password = password or None
        self._throwaway = throwaway
        self._pool_size = pool_size
        self._pool: Any = None
        self._copy: Any = None  # the throw-away store's one connection
        self._copy_turn = asyncio.Lock()
        self._opening = asyncio.Lock()
        self._closed = False
        self._locks = CustomerLocks()

    # --- opening -----------------------------------------------------------------

    def _connect_args(self) -> dict[str, Any]:
        return {
            "dsn": self.url,
            "password": self._password,
            "timeout": CONNECT_TIMEOUT,
            "command_timeout": COMMAND_TIMEOUT,
            "server_settings": {
                "application_name": f"perksync {socket.gethostname()} pid {os.getpid()}"[:63],
                "lock_timeout": LOCK_TIMEOUT,
                # Plan each statement for its values and the tables as they are
                # now: a prepared statement's generic plan, made once while the
                # tables were small, would scan them whole as they grow.
                "plan_cache_mode": "force_custom_plan",
            },
        }

    async def _connect(self) -> Any:
        try:
            return await asyncpg.connect(**self._connect_args())
        except _DRIVER_ERRORS as e:
            message = f"cannot connect to the state database {self.name}: {e}"
            raise StoreError(self._scrub(message)) from None

    async def _ready(self) -> None:
        if self._closed:
            raise StoreError(f"the state database {self.name} is closed")
        if self._pool is not None or self._copy is not None:
            return
        async with self._opening:
            if self._pool is not None or self._copy is not None:
                return
            if self._throwaway:
                self._copy = await self._open_copy()
                return
            try:
                pool = await asyncpg.create_pool(
                    **self._connect_args(), min_size=1, max_size=self._pool_size
                )
            except _DRIVER_ERRORS as e:
                message = f"cannot connect to the state database {self.name}: {e}"
                raise StoreError(self._scrub(message)) from None
            try:
                async with pool.acquire() as conn:
                    await self._migrate(conn)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool

    async def _migrate(self, conn: Any, *, announce: bool = True) -> None:
        """Apply the missing steps, one transaction each, under the schema's
        migration lock; `announce`: log at info level."""
        level = logging.INFO if announce else logging.DEBUG
        try:
            version = await self._version(conn)
            if version == latest_version():
                return
            created = version == 0
            applied = 0
            while True:
                async with conn.transaction():
                    await conn.execute(
                        f"SELECT pg_advisory_xact_lock($1, {_LOCK_KEY})", LOCK_CLASS, "migrate"
                    )
                    await conn.execute(_SCHEMA_TABLE)
                    version = await self._version(conn)
                    if version >= latest_version():
                        break
                    step = MIGRATIONS[version]
                    await self._upgrade(conn, step)
                applied += 1
                if not created:
                    log.log(
                        level,
                        "state database %s: upgraded to schema version %d (%s)",
                        self.name,
                        step.version,
                        step.description,
                    )
        except _DRIVER_ERRORS as e:
            message = f"cannot open the state database {self.name}: {e}"
            raise StoreError(self._scrub(message)) from None
        if created and applied:
            log.log(level, "state database %s: created (schema version %d)", self.name, version)

    async def _upgrade(self, conn: Any, step: Migration[Upgrade]) -> None:
        try:
            await step.upgrade(conn)
            await conn.execute(
                "INSERT INTO perksync_schema (version, description) VALUES ($1, $2)",
                step.version,
                step.description,
            )
        except asyncpg.PostgresError as e:
            raise StoreError(
                f"cannot upgrade the state database {self.name} to schema version "
                f"{step.version} ({step.description}): {e}"
            ) from None

    async def _version(self, conn: Any, schema: str | None = None) -> int:
        """The schema version of the database (0: no perksync tables), refused
        if newer than this code knows. `schema`: of that schema, not the path's."""
        table = "perksync_schema" if schema is None else f"{_ident(schema)}.perksync_schema"
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return 0
        version: int = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        if version > latest_version():
            raise StoreError(
                f"the state database {self.name} has schema version {version}, but this "
                f"perksync only knows versions up to {latest_version()}: refusing to use it "
                f"(run a newer perksync, or restore a backup)"
            )
        return version

    async def _open_copy(self) -> Any:
        """The throw-away store's connection: the database's tables copied into
        temporary ones (at this code's schema version), the rest read-only."""
        conn = await self._connect()
        try:
            await self._copy_tables(conn)
            await self._migrate(conn, announce=False)
            await conn.execute("SET default_transaction_read_only = on")
        except _DRIVER_ERRORS as e:
            conn.terminate()
            message = f"cannot copy the state database {self.name}: {e}"
            raise StoreError(self._scrub(message)) from None
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _copy_tables(self, conn: Any) -> None:
        schema = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            raise StoreError(f"state database {self.name}: no schema on its search_path exists")
        # From here on, unqualified names are the session's temporary tables only.
        await conn.execute("SET search_path = pg_temp")
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("SET CONSTRAINTS ALL DEFERRED")
            version = await self._version(conn, schema)
            await conn.execute(_SCHEMA_TABLE)
            for step in MIGRATIONS[:version]:
                await step.upgrade(conn)
            for table, columns in await conn.fetch(_TEMP_TABLES) if version else []:
                await conn.execute(
                    f"INSERT INTO pg_temp.{_ident(table)} ({columns}) OVERRIDING SYSTEM VALUE"
                    f" SELECT {columns} FROM {_ident(schema)}.{_ident(table)}"
                )
            for table, column in await conn.fetch(
                "SELECT c.relname, a.attname FROM pg_attribute AS a"
                " JOIN pg_class AS c ON c.oid = a.attrelid"
                " WHERE c.relnamespace = pg_my_temp_schema() AND a.attidentity <> ''"
            ):
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence($1, $2),"
                    f" coalesce(max({_ident(column)}), 0) + 1, false)"
                    f" FROM pg_temp.{_ident(table)}",
                    f"pg_temp.{_ident(table)}",
                    column,
                )

    # --- plumbing ---------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """`text` without the password (a driver's message should never hold it)."""
        return text.replace(self._password, "***") if self._password else text

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        await self._ready()
        if self._pool is not None:
            async with self._pool.acquire() as conn:
                yield conn
        else:
            async with self._copy_turn:
                yield self._copy

    @contextlib.asynccontextmanager
    async def _using(
        self, doing: str, *, write: bool = False, block: Block | None = None
    ) -> AsyncIterator[Any]:
        """A connection; the driver's errors as `StoreError` (`StoreWriteError`
        when nothing can be written; `CustomerChanged` when `block`'s commit
        lost to another one)."""
        try:
            async with self._connection() as conn:
                yield conn
        except _DRIVER_ERRORS as e:
            raise self._error(e, doing, write, block) from None

    def _error(self, e: BaseException, doing: str, write: bool, block: Block | None) -> StoreError:
        state = getattr(e, "sqlstate", None)
        if block is not None and (
            state in _LOST_RACE
            or (state == "23505" and getattr(e, "constraint_name", None) == "items_pkey")
        ):
            return block.changed()
        if write and state in _CANNOT_WRITE:
            return StoreWriteError(
                self._scrub(f"cannot write the state database {self.name}: {e} ({state})")
            )
        reason = str(e) or type(e).__name__
        return StoreError(self._scrub(f"state database {self.name}: cannot {doing}: {reason}"))

    async def _finish(self, row_id: int, sql: str, params: Sequence[Any], doing: str) -> bool:
        """Run a row's change of status; whether it changed (it was unfinished)."""
        async with self._using(doing, write=True) as conn:
            changed, exists = await conn.fetchrow(sql, row_id, *params)
        if not exists:
            raise StoreError(f"state database {self.name}: no journal row {row_id}")
        return bool(changed)

    # --- the Store protocol ------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        copy, self._copy = self._copy, None
        if pool is not None:
            await pool.close()
        if copy is not None:
            await copy.close()

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str) -> AsyncIterator[CustomerTxn]:
        async with self._locks.hold(customer_id):
            known, version = await self._read_known(customer_id)
            block = Block(customer_id, known, version, f"state database {self.name}", self._commit)
            try:
                yield block
            finally:
                block.end()

    async def _read_known(self, customer_id: str) -> tuple[KnownCustomer, int]:
        """What the store knows of the customer, and its version (0: no row yet)."""
        async with self._using(f"read customer {customer_id}") as conn:
            row = await conn.fetchrow(_KNOWN, customer_id)
        items: dict[str, StoredItem] = {}
        marks: dict[MarkKey, Mark] = {}
        for item_id, product, state, expires_at, read_at, raw, item_marks in row["items"]:
            items[item_id] = StoredItem(product, state, expires_at, read_at, raw)
            for server, phase, cycle, perk in item_marks:
                marks[(item_id, server)] = Mark(Phase(phase), cycle, perk)
        open_grants = frozenset((item_id, server) for item_id, server in row["open_grants"])
        known = KnownCustomer(items, marks, row["raw"], row["digest"], open_grants)
        return known, row["version"] or 0

    async def _commit(self, block: Block, change: CustomerChange) -> list[int]:
        block.check_marks(change)
        customer_id = block.customer_id
        params = _commit_params(customer_id, block.version, change)
        doing = f"store customer {customer_id}"
        async with self._using(doing, write=True, block=block) as conn:
            result = await conn.fetchrow(_COMMIT, *params)
        if not result["stored"]:
            raise block.changed()
        for item_id, owner in result["moved"]:
            log.warning(
                "state database %s: item %s moves from customer %s to customer %s",
                self.name,
                item_id,
                owner,
                customer_id,
            )
        return list(result["ids"])

    # --- several hosts (daemon/state/shared.py) -------------------------------------

    async def join(self, host: HostRecord, quiet_seconds: float) -> FleetClaim:
        lock = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {_FLEET_LOCK_KEY})"
        async with self._using("register this host", write=True) as conn:
            return await shared_sql.join(conn, host, quiet_seconds, lock)

    async def tick(
        self, host: HostRecord, wanted: Sequence[str], lease_seconds: float, within: float
    ) -> Tick:
        async with self._using("renew the leases", write=True) as conn:
            return await shared_sql.tick(conn, host, wanted, lease_seconds, within)

    async def release(self, host: HostRecord, names: Sequence[str] | None = None) -> list[str]:
        async with self._using("release the leases", write=True) as conn:
            return await shared_sql.release(conn, host, names)

    async def fleet_settings(self) -> FleetSettings | None:
        async with self._using("read the fleet's settings") as conn:
            return await shared_sql.fleet_settings(conn)

    async def hosts(self, seen_within_seconds: float) -> list[HostStatus]:
        async with self._using("read the hosts") as conn:
            return await shared_sql.hosts(conn, seen_within_seconds)

    async def add_hint(self, customer_id: str | None, event_id: str) -> None:
        async with self._using(f"record the hint of webhook {event_id}", write=True) as conn:
            await shared_sql.add_hint(conn, HINTS, customer_id, event_id)

    async def take_hints(self, limit: int = 100) -> list[str | None]:
        async with self._using("take the webhook hints", write=True) as conn:
            return await shared_sql.take_hints(conn, limit)

    async def notify(self, kind: str, payload: str) -> None:
        async with self._using(f"notify {kind}") as conn:
            await conn.execute(shared_sql.NOTIFY, kind, payload)

    async def listen(self, on_notice: Callable[[str, str], None]) -> Listening:
        conn = await self._connect()
        try:
            for kind in (HINTS, JOURNAL):
                channel = await conn.fetchval(shared_sql.CHANNEL, kind)
                await conn.add_listener(channel, _notice_to(kind, on_notice))
        except _DRIVER_ERRORS as e:
            conn.terminate()
            raise self._error(e, "listen for the other hosts", False, None) from None
        return _Listener(conn)

    # --- token mode: the configured links ---------------------------------------------

    async def link_digests(self) -> dict[str, bytes]:
        async with self._using("read the links' digests") as conn:
            rows = await conn.fetch("SELECT label, digest FROM links WHERE digest IS NOT NULL")
        return {label: digest for label, digest in rows}

    async def record_unchanged(self, synced: Mapping[str, datetime]) -> None:
        if not synced:
            return
        labels, times = list(synced), [utc(at) for at in synced.values()]
        async with self._using(
            f"record the sync of {len(labels)} unchanged links", write=True
        ) as c:
            await c.execute(_RECORD_UNCHANGED, labels, times)

    async def record_link_error(self, label: str, error: str, at: datetime) -> None:
        when = utc(at)
        async with self._using(f"record the error of {label}", write=True) as conn:
            await conn.execute(_LINK_ERROR, label, _text(error), when)

    async def links(self) -> list[LinkStatus]:
        async with self._using("read the links") as conn:
            rows = await conn.fetch(_LINKS)
        return [LinkStatus(*row) for row in rows]

    # --- local expiry ----------------------------------------------------------------

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        until = utc(cutoff)
        async with self._using("read the items due to expire") as conn:
            rows = await conn.fetch(_DUE_EXPIRIES, until)
        return [DueExpiry(*row) for row in rows]

    # --- store mode ----------------------------------------------------------------------

    async def live_baseline(self) -> LiveBaseline:
        async with self._using("read the live items") as conn:
            items = await conn.fetch(_LIVE_ITEMS)
            digests = await conn.fetch(
                "SELECT customer_id, digest FROM customers WHERE digest IS NOT NULL"
            )
        return LiveBaseline(
            {
                item_id: LiveItem(customer, state, expires)
                for item_id, customer, state, expires in items
            },
            {customer_id: digest for customer_id, digest in digests},
        )

    async def get_meta(self, key: str) -> str | None:
        async with self._using(f"read the value {key}") as conn:
            value: str | None = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
        return value

    async def set_meta(self, values: Mapping[str, str]) -> None:
        if not values:
            return
        async with self._using(f"store the values {', '.join(values)}", write=True) as conn:
            await conn.execute(_SET_META, list(values), list(values.values()))

    async def remember_webhook(self, event_id: str, at: datetime, forget_before: datetime) -> bool:
        when, before = utc(at), utc(forget_before)
        async with (
            self._using(f"remember webhook event {event_id}", write=True) as conn,
            conn.transaction(),
        ):
            await conn.execute("DELETE FROM webhook_events WHERE received_at < $1", before)
            remembered = await conn.fetchval(
                "INSERT INTO webhook_events (event_id, received_at) VALUES ($1, $2)"
                " ON CONFLICT (event_id) DO NOTHING RETURNING true",
                event_id,
                when,
            )
        return bool(remembered)

    # --- delivery ---------------------------------------------------------------------------

    async def unfinished(
        self, server: str, after_id: int = 0, limit: int = 500
    ) -> list[JournalRow]:
        check_limit(limit)
        async with self._using(f"read the pending commands of {server}") as conn:
            rows = await conn.fetch(_UNFINISHED, server, after_id, limit)
        return [_journal_row(r) for r in rows]

    async def mark_attempt(self, row_id: int, fence: Fence | None = None) -> bool:
        doing = f"count an attempt of journal row {row_id}"
        if fence is None:
            return await self._finish(row_id, _MARK_ATTEMPT, (), doing)
        params = (fence.lease, fence.holder, fence.token, fence.margin_seconds)
        async with self._using(doing, write=True) as conn:
            changed, exists, fenced = await conn.fetchrow(
                shared_sql.MARK_ATTEMPT_FENCED, row_id, *params
            )
        if not exists:
            raise StoreError(f"state database {self.name}: no journal row {row_id}")
        if not fenced:
            raise LeaseLost(
                f"state database {self.name}: the lease {fence.lease} is no longer this "
                f"host's (token {fence.token}) for {fence.margin_seconds:g}s more: "
                f"journal row {row_id} not sent"
            )
        return bool(changed)

    async def mark_waiting(self, row_id: int, reason: str) -> None:
        params = (_text(reason),)
        await self._finish(row_id, _MARK_WAITING, params, f"mark journal row {row_id} waiting")

    async def mark_delivered(self, row_id: int, at: datetime, reply: str | None = None) -> None:
        params = (utc(at), _text(cut_reply(reply)))
        await self._finish(row_id, _MARK_DELIVERED, params, f"mark journal row {row_id} delivered")

    async def mark_rejected(self, row_id: int, reply: str, reason: str, at: datetime) -> None:
        params = (_text(cut_reply(reply)), _text(reason), utc(at))
        await self._finish(row_id, _MARK_REJECTED, params, f"mark journal row {row_id} rejected")

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        params = (_text(reason), utc(at))
        await self._finish(row_id, _MARK_FAILED, params, f"mark journal row {row_id} failed")

    async def prune_journal(self, finished_before: datetime, limit: int) -> int:
        check_limit(limit)
        before = utc(finished_before)
        async with self._using("prune the journal", write=True) as conn:
            pruned: int = await conn.fetchval(_PRUNE, before, limit)
        return pruned

    # --- reading, for status and reports -----------------------------------------------------

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        async with self._using("read the journal") as conn:
            if server is None:
                rows = await conn.fetch(f"SELECT {_ROW_COLUMNS} FROM journal ORDER BY id")
            else:
                rows = await conn.fetch(
                    f"SELECT {_ROW_COLUMNS} FROM journal WHERE server = $1 ORDER BY id", server
                )
        return [_journal_row(r) for r in rows]

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
        filters: list[tuple[str, Any]] = [
            ("server = ${}", server),
            ("customer_id = ${}", customer_id),
            ("status = ANY(${}::text[])", [str(s) for s in statuses] or None),
            ("id = ANY(${}::bigint[])", list(row_ids) or None),
            ("item_id = ANY(${}::text[])", list(item_ids) or None),
        ]
        for condition, value in filters:
            if value is not None:
                params.append(value)
                where.append(condition.format(len(params)))
        sql = f"SELECT {_ROW_COLUMNS} FROM journal"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            params.append(limit)
            sql += f" LIMIT ${len(params)}"
        async with self._using("read the journal") as conn:
            rows = await conn.fetch(sql, *params)
        return [_journal_row(r) for r in rows]

    async def granted(self, server: str) -> list[GrantedItem]:
        async with self._using(f"read the items granted on {server}") as conn:
            rows = await conn.fetch(_GRANTED, server)
        return [GrantedItem(*row) for row in rows]

    async def live_item_counts(self, id_fields: Sequence[str]) -> list[LiveItems]:
        fields = list(dict.fromkeys(id_fields))
        async with self._using("read the live items") as conn:
            rows = await conn.fetch(_LIVE_PRODUCTS)
        ids: dict[str, frozenset[str] | None] = {}
        live = []
        for customer_id, product, count, name, raw, labels in rows:
            if customer_id not in ids:
                ids[customer_id] = ids_set(raw, fields)
            live += [
                LiveItems(label, customer_id, name, product, count, ids[customer_id])
                for label in labels or [None]
            ]
        live.sort(key=lambda r: (r.label is None, r.label or "", r.customer_id, r.product))
        return live

    async def totals(self) -> Totals:
        async with self._using("count the customers and live items") as conn:
            row = await conn.fetchrow(_TOTALS)
        return Totals(customers=row["customers"], live_items=row["live"])

    async def pending_counts(self) -> dict[str, int]:
        async with self._using("count the pending commands") as conn:
            rows = await conn.fetch(
                "SELECT server, count(*) FROM journal WHERE status = 'pending' GROUP BY server"
            )
        return {server: n for server, n in rows}

    async def server_counts(self) -> list[ServerCounts]:
        counts: dict[str, dict[str, int]] = {}
        async with self._using("count the journal") as conn:
            rows = await conn.fetch(
                "SELECT server, status, count(*) FROM journal GROUP BY server, status"
            )
        for server, status, n in rows:
            counts.setdefault(server, {})[status] = n
        return [
            ServerCounts.tally(server, by_status) for server, by_status in sorted(counts.items())
        ]


def _notice_to(kind: str, on_notice: Callable[[str, str], None]) -> Callable[..., None]:
    def received(connection: Any, pid: int, channel: str, payload: str) -> None:
        on_notice(kind, payload)

    return received


class _Listener:
    """The connection of `PostgresStore.listen`."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def close(self) -> None:
        with contextlib.suppress(*_DRIVER_ERRORS):
            await self._conn.close(timeout=2)


def _commit_params(customer_id: str, version: int, change: CustomerChange) -> list[Any]:
    """The parameters of `_COMMIT` for one block's change (ValueError on a naive time)."""
    at = utc(change.at)
    record = change.customer
    # One row per item (the last one given wins, as a row-by-row upsert would).
    seen = {s.item_id: s for s in change.seen}
    items = [
        (s.item_id, s.product, s.state, utc_or_none(s.expires_at), s.raw, utc_or_none(s.read_at))
        for s in seen.values()
    ]
    marks = [
        (item_id, server, str(mark.phase), mark.cycle, mark.perk)
        for (item_id, server), mark in change.marks.items()
    ]
    entries = [
        (
            e.customer_id, e.item_id, e.product, e.server, str(e.event), e.cycle,
            e.command_index, e.command, str(e.status), _text(e.reason), e.online,
            utc_or_none(e.not_before), e.resend,
        )
        for e in change.entries
    ]  # fmt: skip
    grants = [(item_id, server) for item_id, server in change.cancel_grants]
    link = change.link
    return [
        customer_id,
        version,
        at,
        record is not None,
        None if record is None else _text(record.name),
        None if record is None else record.raw,
        None if record is None else record.digest,
        *_columns(items, 6),
        None if link is None else link.label,
        None if link is None else link.digest,
        *_columns(marks, 5),
        *_columns(entries, 13),
        *_columns(grants, 2),
        list(change.cancel_rows),
    ]
