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
import logging
import os
import pwd
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from daemon.diff import Mark, MarkKey, Phase
from daemon.state import (
    CustomerStatus,
    DueExpiry,
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    LiveItems,
    SeenItem,
    ServerCounts,
    StoreError,
    StoreWriteError,
)

log = logging.getLogger(__name__)

# `PRAGMA application_id` of a perksync state database ("PRKS").
APPLICATION_ID: Final = 0x50524B53
DEFAULT_BUSY_TIMEOUT: Final = 5.0  # seconds

# Primary result codes meaning the file cannot be written at all, whatever is
# written: the next write would fail the same way.
_CANNOT_WRITE: Final = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)

Upgrade = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int  # the schema version after this step
    description: str
    upgrade: Upgrade  # runs inside the step's transaction; must not commit


# The numbered upgrade steps, in order: MIGRATIONS[n - 1] takes version n - 1 to n.
# Never edit or reorder a released step; append a new one.
MIGRATIONS: list[Migration] = []


def migration(description: str) -> Callable[[Upgrade], Upgrade]:
    """Register the decorated function as the next numbered upgrade step."""

    def register(upgrade: Upgrade) -> Upgrade:
        MIGRATIONS.append(Migration(len(MIGRATIONS) + 1, description, upgrade))
        return upgrade

    return register


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


# --- times -------------------------------------------------------------------


def _ts(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs aware times")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _dt_or_none(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


# --- statements (module constants, so sqlite3's statement cache reuses them) ---

_UPSERT_LINK = """
INSERT INTO links (label, customer_id, name, last_synced_at, last_error, last_error_at,
                   customer_raw, digest)
VALUES (?, ?, ?, ?, NULL, NULL, ?, ?)
ON CONFLICT (label) DO UPDATE SET
    customer_id = excluded.customer_id,
    name = excluded.name,
    last_synced_at = excluded.last_synced_at,
    customer_raw = coalesce(excluded.customer_raw, links.customer_raw),
    digest = excluded.digest,
    last_error = NULL,
    last_error_at = NULL
"""

_LINK_ERROR = """
INSERT INTO links (label, last_error, last_error_at) VALUES (?, ?, ?)
ON CONFLICT (label) DO UPDATE SET
    last_error = excluded.last_error,
    last_error_at = excluded.last_error_at
"""

_UPSERT_ITEM = """
INSERT INTO items (item_id, customer_id, product, state, first_seen_at, last_seen_at,
                   expires_at, raw)
VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)
ON CONFLICT (item_id) DO UPDATE SET
    customer_id = excluded.customer_id,
    product = excluded.product,
    state = excluded.state,
    last_seen_at = excluded.last_seen_at,
    expires_at = excluded.expires_at,
    raw = coalesce(excluded.raw, items.raw)
"""

# CROSS JOIN fixes the join order (SQLite never reorders it): the few items
# due, through items_expiry, then their marks and links. Left to itself the
# planner may scan every link and its items on each sweep.
_DUE_EXPIRIES = """
SELECT l.label, l.customer_raw, i.raw, m.server, m.cycle, i.expires_at
FROM items AS i
CROSS JOIN marks AS m ON m.item_id = i.item_id AND m.phase = 'granted'
CROSS JOIN links AS l ON l.customer_id = i.customer_id
WHERE i.expires_at IS NOT NULL AND i.expires_at <= ?
  AND i.state = 'active'  -- a `renewed` item keeps its perk (SPEC §7)
  AND i.raw IS NOT NULL AND l.customer_raw IS NOT NULL
ORDER BY i.expires_at, i.item_id, m.server
"""

_UPSERT_MARK = """
INSERT INTO marks (item_id, server, phase, cycle) VALUES (?, ?, ?, ?)
ON CONFLICT (item_id, server) DO UPDATE SET phase = excluded.phase, cycle = excluded.cycle
"""

# ON CONFLICT on the unique key only (not INSERT OR IGNORE, which would also
# silently drop a row that breaks a CHECK constraint).
_INSERT_ENTRY = """
INSERT INTO journal (customer_id, item_id, product, server, event, cycle, command_index,
                     command, status, reason, attempts, created_at, finished_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)
ON CONFLICT (item_id, server, cycle, event, command_index) DO NOTHING
"""

_KNOWN = """
SELECT i.item_id, i.state, i.expires_at, m.server, m.phase, m.cycle
FROM items AS i LEFT JOIN marks AS m ON m.item_id = i.item_id
WHERE i.customer_id = ?
"""

_TOUCH_LINK = """
INSERT INTO links (label, customer_id, name, last_synced_at, last_error, last_error_at, digest,
                   customer_raw)
VALUES (?, ?, ?, ?, NULL, NULL, ?, ?)
ON CONFLICT (label) DO UPDATE SET
    customer_id = excluded.customer_id,
    name = excluded.name,
    last_synced_at = excluded.last_synced_at,
    digest = excluded.digest,
    customer_raw = coalesce(excluded.customer_raw, links.customer_raw),
    last_error = NULL,
    last_error_at = NULL
"""

_TOUCH_UNCHANGED = """
UPDATE links SET last_synced_at = ?, last_error = NULL, last_error_at = NULL WHERE label = ?
"""

_FORGET_DIGEST = """
UPDATE links SET digest = NULL
WHERE customer_id = (SELECT customer_id FROM items WHERE item_id = ?) AND digest IS NOT NULL
"""

# Two scans (joined in Python), each cheaper than their join in SQL: the live
# items through items_live, in its order, and the links.
_LIVE_PRODUCTS = """
SELECT customer_id, product, count(*) FROM items INDEXED BY items_live
WHERE state IN ('active', 'renewed')
GROUP BY customer_id, product
"""


def _links_with_ids_sql(count: int) -> str:
    # One column per asked field: set unless missing, JSON null, "" or false/0
    # (as a Python truth test of the value would judge it). A customer JSON
    # that is missing or not JSON (a hand-edited file) leaves its ids unknown.
    field = ", coalesce(json_extract(customer_raw, ?), '') NOT IN ('', 0)"
    return (
        f"SELECT label, customer_id, name, valid{field * count} FROM ("
        " SELECT label, customer_id, name, json_valid(customer_raw) AS valid,"
        "  CASE WHEN json_valid(customer_raw) THEN customer_raw ELSE '{}' END AS customer_raw"
        " FROM links WHERE customer_id IS NOT NULL"
        ") ORDER BY label"
    )


_ROW_COLUMNS = """id, customer_id, item_id, product, server, event, cycle, command_index,
    command, status, reason, attempts, created_at, finished_at"""

_PENDING = f"""
SELECT {_ROW_COLUMNS} FROM journal
WHERE server = ? AND status = 'pending' AND id > ?
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
            step: Migration | None = None
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

    def _finish(self, row_id: int, sql: str, params: tuple[Any, ...], doing: str) -> None:
        with self._errors(doing, write=True) as conn:
            if (
                conn.execute(sql, params).rowcount == 0
                and not conn.execute("SELECT 1 FROM journal WHERE id = ?", (row_id,)).fetchone()
            ):
                raise StoreError(f"state database {self.path}: no journal row {row_id}")

    # --- the Store protocol -------------------------------------------------------

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def known(self, customer_id: str) -> KnownCustomer:
        states: dict[str, tuple[str, datetime | None]] = {}
        marks: dict[MarkKey, Mark] = {}
        with self._errors(f"read customer {customer_id}") as conn:
            for item_id, state, expires_at, server, phase, cycle in conn.execute(
                _KNOWN, (customer_id,)
            ):
                if item_id not in states:
                    states[item_id] = (state, _dt_or_none(expires_at))
                if server is not None:
                    marks[(item_id, server)] = Mark(Phase(phase), cycle)
        return KnownCustomer(items=frozenset(states), marks=marks, states=states)

    async def touch(
        self,
        label: str,
        customer_id: str,
        customer_name: str | None,
        synced_at: datetime,
        digest: bytes | None = None,
        customer_raw: str | None = None,
    ) -> None:
        with self._errors(
            f"record the pass of {label} (customer {customer_id})", write=True
        ) as conn:
            conn.execute(
                _TOUCH_LINK,
                (label, customer_id, customer_name, _ts(synced_at), digest, customer_raw),
            )

    async def digests(self) -> dict[str, bytes]:
        with self._errors("read the links' digests") as conn:
            return dict(
                conn.execute("SELECT label, digest FROM links WHERE digest IS NOT NULL").fetchall()
            )

    async def touch_unchanged(self, synced: Mapping[str, datetime]) -> None:
        if not synced:
            return
        rows = [(_ts(at), label) for label, at in synced.items()]
        with self._transaction(f"record the sync of {len(rows)} unchanged customers") as conn:
            conn.executemany(_TOUCH_UNCHANGED, rows)

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
        at = _ts(synced_at)
        item_rows = [
            (
                s.item_id,
                customer_id,
                s.product,
                s.state,
                at,
                None if s.expires_at is None else _ts(s.expires_at),
                s.raw,
            )
            for s in seen
        ]
        with self._transaction(f"store the pass of {label} (customer {customer_id})") as conn:
            conn.execute(
                _UPSERT_LINK, (label, customer_id, customer_name, at, customer_raw, digest)
            )
            if item_rows:
                conn.executemany(_UPSERT_ITEM, item_rows)
            return self._journal(conn, marks, entries, at)

    async def due_expiries(self, cutoff: datetime) -> list[DueExpiry]:
        with self._errors("read the items due to expire") as conn:
            return [
                DueExpiry(label, customer_raw, item_raw, server, cycle, _dt(expires_at))
                for label, customer_raw, item_raw, server, cycle, expires_at in conn.execute(
                    _DUE_EXPIRIES, (_ts(cutoff),)
                )
            ]

    async def commit_expiry(
        self, marks: Mapping[MarkKey, Mark], entries: Sequence[JournalEntry], at: datetime
    ) -> list[int]:
        with self._transaction("store local expiries") as conn:
            conn.executemany(_FORGET_DIGEST, [(i,) for i in dict.fromkeys(i for i, _ in marks)])
            return self._journal(conn, marks, entries, _ts(at))

    @staticmethod
    def _journal(
        conn: sqlite3.Connection,
        marks: Mapping[MarkKey, Mark],
        entries: Sequence[JournalEntry],
        at: str,
    ) -> list[int]:
        """Store marks and journal entries inside the caller's transaction."""
        mark_rows = [
            (item_id, server, str(mark.phase), mark.cycle)
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
                None if e.status == JournalStatus.PENDING else at,
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

    async def record_error(self, label: str, error: str, at: datetime) -> None:
        with self._errors(f"record the error of {label}", write=True) as conn:
            conn.execute(_LINK_ERROR, (label, error, _ts(at)))

    async def pending(self, server: str, after_id: int = 0, limit: int = 500) -> list[JournalRow]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        with self._errors(f"read the pending commands of {server}") as conn:
            return [_journal_row(r) for r in conn.execute(_PENDING, (server, after_id, limit))]

    async def mark_attempt(self, row_id: int) -> None:
        self._finish(
            row_id,
            "UPDATE journal SET attempts = attempts + 1 WHERE id = ? AND status = 'pending'",
            (row_id,),
            f"count an attempt of journal row {row_id}",
        )

    async def mark_delivered(self, row_id: int, at: datetime) -> None:
        self._finish(
            row_id,
            "UPDATE journal SET status = 'delivered', finished_at = ? "
            "WHERE id = ? AND status = 'pending'",
            (_ts(at), row_id),
            f"mark journal row {row_id} delivered",
        )

    async def mark_failed(self, row_id: int, reason: str, at: datetime) -> None:
        self._finish(
            row_id,
            "UPDATE journal SET status = 'failed', reason = ?, finished_at = ? "
            "WHERE id = ? AND status = 'pending'",
            (reason, _ts(at), row_id),
            f"mark journal row {row_id} failed",
        )

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        with self._errors("read the journal") as conn:
            if server is None:
                cursor = conn.execute(f"SELECT {_ROW_COLUMNS} FROM journal ORDER BY id")
            else:
                cursor = conn.execute(
                    f"SELECT {_ROW_COLUMNS} FROM journal WHERE server = ? ORDER BY id", (server,)
                )
            return [_journal_row(r) for r in cursor]

    async def customers(self) -> list[CustomerStatus]:
        with self._errors("read the links") as conn:
            return [
                CustomerStatus(
                    label=label,
                    customer_id=customer_id,
                    name=name,
                    last_synced_at=_dt_or_none(synced),
                    last_error=error,
                    last_error_at=_dt_or_none(error_at),
                )
                for label, customer_id, name, synced, error, error_at in conn.execute(
                    "SELECT label, customer_id, name, last_synced_at, last_error, last_error_at "
                    "FROM links ORDER BY label"
                )
            ]

    async def live_items(self, id_fields: Sequence[str]) -> list[LiveItems]:
        fields = list(dict.fromkeys(id_fields))
        paths = [f'$."{name}"' for name in fields]
        products: dict[str, list[tuple[str, int]]] = {}
        with self._errors("read the live items") as conn:
            for customer_id, product, count in conn.execute(_LIVE_PRODUCTS):
                products.setdefault(customer_id, []).append((product, count))
            links = conn.execute(_links_with_ids_sql(len(paths)), paths).fetchall()
        live = []
        for label, customer_id, name, valid, *flags in links:
            held = products.get(customer_id)
            if not held:
                continue
            ids = frozenset(f for f, has in zip(fields, flags, strict=True) if has)
            for product, count in sorted(held):
                live.append(
                    LiveItems(label, customer_id, name, product, count, ids if valid else None)
                )
        return live

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
            ServerCounts(
                server=server,
                pending=by_status.get(JournalStatus.PENDING, 0),
                failed=by_status.get(JournalStatus.FAILED, 0),
                skipped=by_status.get(JournalStatus.SKIPPED, 0),
                delivered=by_status.get(JournalStatus.DELIVERED, 0),
            )
            for server, by_status in sorted(counts.items())
        ]
