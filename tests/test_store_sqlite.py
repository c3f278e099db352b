"""What only the SQLite backend promises: its file, its migrations, its crash safety.

The behaviour every backend shares is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import daemon.state.sqlite as state_sqlite
from daemon.diff import Mark, Phase
from daemon.state import (
    CustomerChange,
    CustomerRecord,
    JournalEntry,
    KnownCustomer,
    LinkSync,
    SeenItem,
    StoreError,
    open_store,
)
from daemon.state.sqlite import Migration, SqliteStore, latest_version
from tests.test_store_contract import (
    BOB,
    T0,
    T1,
    commit,
    entry,
    granted,
    known,
    run_async,
    seen,
)

REPO = Path(__file__).resolve().parent.parent


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def pragma(path: Path, name: str) -> object:
    conn = raw(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    conn = raw(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    finally:
        conn.close()


def close(store: SqliteStore) -> None:
    asyncio.run(store.close())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


# --- opening ----------------------------------------------------------------------


def test_open_store_accepts_a_path_or_an_sqlite_url(tmp_path: Path) -> None:
    for url, file in [
        (str(tmp_path / "a.sqlite3"), tmp_path / "a.sqlite3"),
        (f"sqlite://{tmp_path}/b.sqlite3", tmp_path / "b.sqlite3"),
    ]:
        store = open_store(url)
        assert isinstance(store, SqliteStore)
        assert store.path == file
        assert file.exists()
        asyncio.run(store.close())


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "state.sqlite3"
    with pytest.raises(StoreError) as caught:
        SqliteStore(path)
    message = str(caught.value)
    assert str(path) in message
    assert "does not exist" in message
    assert "\n" not in message
    assert not path.parent.exists()  # not created behind the operator's back


def test_a_file_that_is_not_a_database_is_a_clear_error(db: Path) -> None:
    db.write_text("paynow:\n  api_url: https://api.paynow.gg\n")
    with pytest.raises(StoreError, match=str(db)):
        SqliteStore(db)
    assert db.read_text().startswith("paynow:")


def test_another_programs_database_is_refused(db: Path) -> None:
    conn = raw(db)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(StoreError, match="not perksync's state"):
        SqliteStore(db)
    assert tables(db) == {"users"}


def test_wal_and_the_connection_settings(db: Path) -> None:
    store = SqliteStore(db, busy_timeout=2.5)
    try:
        assert pragma(db, "journal_mode") == "wal"  # persistent: seen by any connection
        conn = store._conn
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    finally:
        close(store)


def test_a_closed_store_says_so(db: Path) -> None:
    store = SqliteStore(db)
    close(store)
    close(store)  # closing twice is fine
    with pytest.raises(StoreError, match="closed"):
        asyncio.run(known(store, "100"))


def test_an_emptied_database_is_refused_not_taken_for_a_new_one(db: Path) -> None:
    store = SqliteStore(db)
    asyncio.run(store.record_link_error("alice", "x", T0))
    close(store)
    db.write_bytes(b"")  # emptied: a restore gone wrong, a full disk, a careless `>`
    with pytest.raises(StoreError) as caught:
        SqliteStore(db)
    message = str(caught.value)
    assert f"the state database {db} is an empty file" in message
    assert "\n" not in message
    assert db.read_bytes() == b""  # left as found, for the operator to restore
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]


def test_a_new_file_and_its_companions_are_readable_by_the_owner_only(db: Path) -> None:
    old_umask = os.umask(0o022)  # a hand run's usual umask: 0644 files
    try:
        store = SqliteStore(db)
        asyncio.run(store.record_link_error("alice", "x", T0))  # makes the -wal and -shm
        modes = {
            p.name: p.stat().st_mode & 0o777
            for p in db.parent.iterdir()
            if p.name.startswith(db.name)
        }
        close(store)
    finally:
        os.umask(old_umask)
    assert modes == {db.name: 0o600, f"{db.name}-wal": 0o600, f"{db.name}-shm": 0o600}


def test_a_new_file_is_announced_once_and_an_upgrade_step_by_step(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=state_sqlite.__name__):
        close(SqliteStore(db))
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == [f"created state database {db} (schema version {latest_version()})"]
    caplog.clear()

    with caplog.at_level(logging.DEBUG, logger=state_sqlite.__name__):
        close(SqliteStore(db))  # already there: nothing to say
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]

    new = _add_step(monkeypatch, lambda conn: None)
    with caplog.at_level(logging.DEBUG, logger=state_sqlite.__name__):
        close(SqliteStore(db))
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == [f"state database {db}: upgraded to schema version {new} (a test step)"]


def test_a_throwaway_copy_is_created_without_a_word(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=state_sqlite.__name__):
        asyncio.run(open_store(str(db), throwaway=True).close())
    assert db.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


# --- migrations --------------------------------------------------------------------


def test_a_fresh_file_gets_the_latest_schema(db: Path) -> None:
    assert not db.exists()
    close(SqliteStore(db))
    assert latest_version() == len(state_sqlite.MIGRATIONS) >= 1
    assert [m.version for m in state_sqlite.MIGRATIONS] == list(range(1, latest_version() + 1))
    assert pragma(db, "user_version") == latest_version()
    assert pragma(db, "application_id") == state_sqlite.APPLICATION_ID
    assert {"links", "items", "marks", "journal", "customers", "meta", "webhook_events"} <= tables(
        db
    )


def _add_step(monkeypatch: pytest.MonkeyPatch, upgrade: state_sqlite.Upgrade) -> int:
    steps = [*state_sqlite.MIGRATIONS]
    steps.append(Migration(len(steps) + 1, "a test step", upgrade))
    monkeypatch.setattr(state_sqlite, "MIGRATIONS", steps)
    return len(steps)


def test_migrations_run_once_and_only_the_missing_ones(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database at the current version, with data in it.
    store = SqliteStore(db)
    asyncio.run(store.record_link_error("alice", "HTTP 500", T0))
    close(store)
    current = latest_version()

    runs: list[int] = []

    def step(conn: sqlite3.Connection) -> None:
        runs.append(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute("CREATE TABLE extra (x TEXT NOT NULL)")
        conn.execute("INSERT INTO extra (x) SELECT label FROM links")

    new = _add_step(monkeypatch, step)
    for _ in range(3):
        close(SqliteStore(db))
    assert runs == [current]  # only the new step, once, from the version before it
    assert pragma(db, "user_version") == new
    conn = raw(db)
    assert conn.execute("SELECT x FROM extra").fetchall() == [("alice",)]
    conn.close()
    store = SqliteStore(db)
    assert [c.label for c in asyncio.run(store.links())] == ["alice"]
    close(store)


def test_a_failing_migration_step_changes_nothing(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    close(SqliteStore(db))
    current = latest_version()

    def step(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE extra (x TEXT)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    _add_step(monkeypatch, step)
    with pytest.raises(StoreError, match=rf"schema version {current + 1} \(a test step\)"):
        SqliteStore(db)
    assert pragma(db, "user_version") == current
    assert "extra" not in tables(db)


def test_a_database_newer_than_the_code_is_refused(db: Path) -> None:
    store = SqliteStore(db)
    asyncio.run(store.record_link_error("alice", "x", T0))
    close(store)
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    conn.close()
    before = db.read_bytes()

    with pytest.raises(StoreError) as caught:
        SqliteStore(db)
    message = str(caught.value)
    assert str(db) in message
    assert f"schema version {latest_version() + 1}" in message
    assert f"up to {latest_version()}" in message
    assert "\n" not in message
    assert db.read_bytes() == before


_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from daemon.state.sqlite import SqliteStore
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
SqliteStore(Path(sys.argv[1]))
"""


def test_processes_opening_a_fresh_file_at_once_all_succeed(db: Path) -> None:
    # Both the switch to WAL and the first migration race here.
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, str(db), str(start)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    assert pragma(db, "user_version") == latest_version()
    assert not list(db.parent.glob(f".{db.name}.new-*"))  # no temporary file left behind


# --- locking ------------------------------------------------------------------------


def test_a_writer_waits_for_another_writer(db: Path) -> None:
    store = SqliteStore(db)
    other = raw(db)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO links (label) VALUES ('other')")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    try:
        # Blocks until the other writer commits, then goes through.
        asyncio.run(store.record_link_error("alice", "x", T0))
        assert [c.label for c in asyncio.run(store.links())] == ["alice", "other"]
    finally:
        close(store)
        other.close()


def test_a_writer_locked_out_too_long_fails_cleanly_and_readers_still_read(db: Path) -> None:
    store = SqliteStore(db, busy_timeout=0.2)
    asyncio.run(store.record_link_error("alice", "x", T0))
    other = raw(db)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            asyncio.run(commit(store, "200", CustomerChange(T1, BOB, seen(("9", "active")))))
        # WAL: reading goes on while another process writes.
        assert [c.label for c in asyncio.run(store.links())] == ["alice"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The failed commit left no transaction open behind it, nor the customer held.
    asyncio.run(commit(store, "200", CustomerChange(T1, BOB, seen(("9", "active")))))
    assert set(asyncio.run(known(store, "200")).items) == {"9"}
    close(store)


def test_unfinished_rows_are_read_through_their_own_index(db: Path) -> None:
    close(SqliteStore(db))
    conn = raw(db)
    plan = " ".join(
        str(r[3])
        for r in conn.execute("EXPLAIN QUERY PLAN " + state_sqlite._UNFINISHED, ("s", 0, 10))
    )
    conn.close()
    assert "journal_unfinished" in plan
    assert "SCAN" not in plan
    assert "TEMP B-TREE" not in plan  # no sort: the index gives id order


def test_the_expiry_sweep_reads_through_the_active_items_expiry_index(db: Path) -> None:
    close(SqliteStore(db))
    conn = raw(db)
    plan = " ".join(
        str(r[3])
        for r in conn.execute(
            "EXPLAIN QUERY PLAN " + state_sqlite._DUE_EXPIRIES, ("2024-01-01T00:00:00",)
        )
    )
    conn.close()
    assert "USING INDEX items_expiry" in plan  # used/revoked items are not even in it
    assert "SEARCH c USING PRIMARY KEY (customer_id=?)" in plan
    assert "SCAN" not in plan


def _plan(db: Path, sql: str) -> str:
    conn = raw(db)
    try:
        return " | ".join(
            str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, ("x",) * sql.count("?"))
        )
    finally:
        conn.close()


def test_a_customer_is_read_through_its_key_and_its_items_index(db: Path) -> None:
    close(SqliteStore(db))
    assert _plan(db, state_sqlite._KNOWN) == (
        "SEARCH c USING PRIMARY KEY (customer_id=?)"
        " | SEARCH i USING INDEX items_customer (customer_id=?) LEFT-JOIN"
        " | SEARCH m USING PRIMARY KEY (item_id=?) LEFT-JOIN"
    )
    # A commit drops the digests of the customer's links through links_customer.
    assert "USING INDEX links_customer" in _plan(db, state_sqlite._FORGET_DIGESTS)
    assert "SCAN" not in _plan(db, state_sqlite._ITEMS_OF_OTHERS).replace("SCAN json_each", "")


def test_the_live_items_are_read_through_the_live_items_index(db: Path) -> None:
    close(SqliteStore(db))
    for sql in (state_sqlite._LIVE_ITEMS, state_sqlite._LIVE_PRODUCTS):
        assert _plan(db, sql) == "SCAN items USING INDEX items_live"
    assert "SCAN items USING INDEX items_live" in _plan(db, state_sqlite._TOTALS)
    assert _plan(db, state_sqlite._FORGET_WEBHOOKS) == (
        "SEARCH webhook_events USING COVERING INDEX webhook_events_received (received_at<?)"
    )


# Opens the store, then lowers the file size limit (RLIMIT_FSIZE, binding root
# too) below any database page: the kernel refuses the writes as a full disk would.
_FULL_DISK = """
import asyncio, resource, sys
from datetime import UTC, datetime
from pathlib import Path
from daemon.state import CustomerChange, LinkSync, StoreWriteError
from daemon.state.sqlite import SqliteStore

async def commit(store):
    async with store.customer("200") as txn:
        await txn.commit(CustomerChange(datetime.now(UTC), link=LinkSync("bob", None)))

async def main():
    store = SqliteStore(Path(sys.argv[1]))
    await store.record_link_error("alice", "x", datetime.now(UTC))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    now = datetime.now(UTC)
    writes = {
        "commit": commit(store),
        "record_link_error": store.record_link_error("bob", "y", now),
        "record_unchanged": store.record_unchanged({"alice": now}),
        "set_meta": store.set_meta({"cursor": "1"}),
        "remember_webhook": store.remember_webhook("evt", now, now),
    }
    for name, write in writes.items():
        try:
            await write
        except StoreWriteError as exc:
            print(name, exc)
    print("read", [c.label for c in await store.links()])
    await store.close()

asyncio.run(main())
"""


def test_writes_to_a_full_disk_raise_store_write_error_and_reads_go_on(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines] == [
        "commit",
        "record_link_error",
        "record_unchanged",
        "set_meta",
        "remember_webhook",
        "read",
    ]
    for line in lines[:-1]:
        assert f" cannot write the state database {db}: " in line
    assert lines[-1] == "read ['alice']"  # nothing of the failed writes was stored


# --- crashes --------------------------------------------------------------------------

# Commits pass A, then starts pass B (large enough that SQLite spills pages of the
# open transaction into the WAL) and dies right before B's COMMIT: by os._exit, or
# by the parent's kill -9 while it waits.
_CRASH_WRITER = """
import asyncio, os, sys, time
from datetime import UTC, datetime
from pathlib import Path
from daemon.diff import Mark, Phase
from daemon.state import CustomerChange, CustomerRecord, JournalEntry, LinkSync, SeenItem
from daemon.state.sqlite import SqliteStore

path, how = Path(sys.argv[1]), sys.argv[2]
store = SqliteStore(path)
real = store._conn
real.execute("PRAGMA cache_size = 50")

class DieBeforeCommit:
    def __getattr__(self, name):
        return getattr(real, name)

    def execute(self, sql, *args):
        if sql == "COMMIT":
            if how == "exit":
                os._exit(1)
            print("in transaction", flush=True)
            time.sleep(600)
        return real.execute(sql, *args)

    def executemany(self, sql, rows):
        return real.executemany(sql, rows)

def entries(customer, items):
    return [
        JournalEntry(customer, i, "vip", "survival", "on_active", 1, 0, f"grant {i}")
        for i in items
    ]

async def commit(label, customer, items):
    async with store.customer(customer) as txn:
        await txn.commit(CustomerChange(
            datetime.now(UTC), CustomerRecord(label, "{}"),
            [SeenItem(i, "vip", "active") for i in items],
            {(i, "survival"): Mark(Phase.GRANTED, 1) for i in items}, entries(customer, items),
            LinkSync(label, None),
        ))

async def main():
    await commit("alice", "100", ["1", "2"])
    print("A committed", flush=True)
    store._conn = DieBeforeCommit()
    await commit("bob", "200", [str(10**6 + n) for n in range(20000)])
    print("B committed?!", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_crash_inside_a_pass_leaves_the_previous_state(db: Path, how: str) -> None:
    log = db.with_name("writer.log")
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_WRITER, str(db), how],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "A committed\n", log.read_text()
        if how == "kill":
            assert proc.stdout.readline() == "in transaction\n", log.read_text()
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == (1 if how == "exit" else -signal.SIGKILL), log.read_text()
    # The dead transaction had spilled pages into the log; recovery must drop them.
    assert db.with_name(db.name + "-wal").stat().st_size > 100_000
    asyncio.run(_after_the_crash(db))


async def _after_the_crash(db: Path) -> None:
    store = SqliteStore(db)
    try:
        assert store._conn is not None
        assert store._conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert store._conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # Pass A is all there, pass B not at all.
        assert [c.label for c in await store.links()] == ["alice"]
        assert set((await known(store, "100")).items) == {"1", "2"}
        assert await known(store, "200") == KnownCustomer({}, {}, None, None)
        assert (await store.totals()).customers == 1
        rows = await store.rows()
        assert [(r.customer_id, r.item_id) for r in rows] == [("100", "1"), ("100", "2")]
        # The write lock died with the process: writing goes on.
        (new,) = await commit(
            store,
            "200",
            CustomerChange(
                T1, BOB, seen(("7", "active")), granted(("7", "survival")),
                [entry("7", customer_id="200")], LinkSync("bob", None),
            ),
        )  # fmt: skip
        assert new > rows[-1].id
    finally:
        await store.close()


# Each process commits its own customers and the same shared ones; for each
# shared customer it also reads a counter (the cycle of a mark) and commits it
# plus one, retrying when the other process committed in between.
_WRITER = """
import asyncio, sys, time
from datetime import UTC, datetime
from pathlib import Path
from daemon.diff import Mark, Phase
from daemon.state import CustomerChange, CustomerChanged, JournalEntry, LinkSync, SeenItem
from daemon.state.sqlite import SqliteStore

path, me, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
store = SqliteStore(path, busy_timeout=30)

async def one(customer):
    items = [f"{customer}-{n}" for n in range(3)]
    while True:
        try:
            async with store.customer(customer) as txn:
                counter = txn.known.marks.get((items[0], "counter"), Mark(Phase.GRANTED, 0))
                time.sleep(0.002)  # widens the window for the other process to commit first
                await txn.commit(CustomerChange(
                    datetime.now(UTC), None, [SeenItem(i, "vip", "active") for i in items],
                    {**{(i, "survival"): Mark(Phase.GRANTED, 1) for i in items},
                     (items[0], "counter"): Mark(Phase.GRANTED, counter.cycle + 1)},
                    [JournalEntry(customer, i, "vip", "survival", "on_active", 1, 0, "x")
                     for i in items],
                    LinkSync(f"label {customer}", None),
                ))
                return
        except CustomerChanged:
            continue

async def main():
    time.sleep(max(0.0, start - time.time()))
    for n in range(150):
        await one(f"{me}{n}")
        await one(f"shared{n}")  # both processes commit these
    await store.close()

asyncio.run(main())
"""


def test_two_writer_processes_lose_and_duplicate_nothing(db: Path) -> None:
    close(SqliteStore(db))
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), name, str(start)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p", "q")
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors

    conn = raw(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("SELECT count(*) FROM links").fetchone()[0] == 450
    assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 450
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1350
    assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 1350
    # Every read-modify-commit counted: 1 for a process's own customers, 2 for shared ones.
    counters = dict(
        conn.execute(
            "SELECT i.customer_id, m.cycle FROM marks AS m JOIN items AS i USING (item_id)"
            " WHERE m.server = 'counter'"
        ).fetchall()
    )
    conn.close()
    assert len(counters) == 450
    assert {c: n for c, n in counters.items() if n != (2 if c.startswith("shared") else 1)} == {}


# --- size ------------------------------------------------------------------------------


PASSES = 2_000  # 10,000 take 3-8 s here; the benchmarks measure the full size


@run_async
async def test_many_commits_of_five_items(db: Path) -> None:
    store = SqliteStore(db)
    try:
        all_ids: list[int] = []
        for c in range(PASSES):
            customer = str(10**17 + c)
            items = [f"{customer}{i}" for i in range(5)]
            all_ids += await commit(
                store,
                customer,
                CustomerChange(
                    T0,
                    CustomerRecord(None, "{}"),
                    [SeenItem(i, "vip", "active") for i in items],
                    {(i, "survival"): Mark(Phase.GRANTED, 1) for i in items},
                    [
                        JournalEntry(
                            customer, i, "vip", "survival", "on_active", 1, 0, f"grant {i}"
                        )
                        for i in items
                    ],
                    LinkSync(f"label {c}", None),
                ),
            )
        assert len(all_ids) == 5 * PASSES
        assert all_ids == sorted(set(all_ids))
        last = str(10**17 + PASSES - 1)
        stored = await known(store, last)
        assert set(stored.items) == {f"{last}{i}" for i in range(5)}
        assert len(stored.marks) == 5
        assert len(await store.links()) == PASSES
        page = await store.unfinished("survival", after_id=all_ids[-3])
        assert [r.id for r in page] == all_ids[-2:]
        assert len(store._locks) == 0  # no lock kept per customer met
    finally:
        await store.close()


def test_migration_2_keeps_the_marks_of_a_version_1_database(tmp_path: Path) -> None:
    """A file written by schema version 1 is upgraded in place, marks intact."""
    import sqlite3

    from daemon.state.sqlite import MIGRATIONS, SqliteStore

    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    MIGRATIONS[0].upgrade(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO items VALUES ('1', '100', 'vip', 'active', '2024-01-01', '2024-01-01')"
    )
    conn.execute("INSERT INTO marks VALUES ('1', 'survival', 'granted', 1)")
    conn.execute("COMMIT")
    conn.close()

    store = SqliteStore(path)
    try:
        customer = asyncio.run(known(store, "100"))
    finally:
        asyncio.run(store.close())
    assert customer.marks == {("1", "survival"): Mark(Phase.GRANTED, 1)}
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 2
    # The rebuilt table accepts the new phase.
    check.execute("UPDATE marks SET phase = 'lapsed'")
    check.commit()
    check.close()


def test_migration_3_adds_digests_to_a_version_2_database(tmp_path: Path) -> None:
    """Links of a version 2 file keep everything and start with no digest, so
    the first pass after the upgrade diffs every customer."""
    import sqlite3

    from daemon.state.sqlite import MIGRATIONS, SqliteStore

    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    MIGRATIONS[0].upgrade(conn)
    MIGRATIONS[1].upgrade(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO links (label, customer_id, name, last_synced_at) "
        "VALUES ('alice', '100', 'Alice', '2024-01-01T00:00:00.000000+00:00')"
    )
    conn.execute("COMMIT")
    conn.close()

    store = SqliteStore(path)
    try:
        assert asyncio.run(store.link_digests()) == {}
        (link,) = asyncio.run(store.links())
        assert (link.label, link.customer_id, link.name) == ("alice", "100", "Alice")
        assert link.last_synced_at is not None
        asyncio.run(commit(store, "100", CustomerChange(T1, link=LinkSync("alice", b"d"))))
        assert asyncio.run(store.link_digests()) == {"alice": b"d"}
    finally:
        asyncio.run(store.close())
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 3
    check.close()


def _database_at(path: Path, version: int) -> sqlite3.Connection:
    """A file as schema `version` made it, inside an open transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for step in state_sqlite.MIGRATIONS[:version]:
        step.upgrade(conn)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def _columns(path: Path, table: str) -> list[str]:
    conn = raw(path)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


@run_async
async def test_migration_5_moves_the_customers_json_from_the_links_to_customers(
    tmp_path: Path,
) -> None:
    """Each customer gets a row of its own with the JSON and name of its link
    that has JSON and synced last; the links keep label, customer, sync,
    error and digest; what was granted stays granted."""
    path = tmp_path / "v4.sqlite3"
    conn = _database_at(path, 4)
    t = [f"2024-01-0{day}T00:00:00.000000+00:00" for day in range(1, 6)]
    conn.executemany(
        "INSERT INTO links (label, customer_id, name, last_synced_at, last_error, last_error_at,"
        " customer_raw, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("alice", "100", "Alice", t[2], "HTTP 503", t[3], '{"id": "100", "v": 2}', b"a"),
            ("alice-old", "100", "Old Alice", t[0], None, None, '{"id": "100", "v": 1}', None),
            ("alice-new", "100", "A.", t[4], None, None, None, b"n"),  # synced last, no JSON
            ("bob", "200", "Bob", t[1], None, None, None, None),
            ("carol", None, None, None, "HTTP 401", t[0], None, None),  # never synced
        ],
    )
    conn.executemany(
        "INSERT INTO items (item_id, customer_id, product, state, first_seen_at, last_seen_at,"
        " expires_at, raw) VALUES (?, ?, 'vip', 'active', ?, ?, ?, ?)",
        [("1", "100", t[0], t[0], t[1], '{"id": "1"}'), ("9", "900", t[0], t[0], None, None)],
    )
    conn.execute("INSERT INTO marks VALUES ('1', 'survival', 'granted', 1)")
    conn.execute("COMMIT")
    conn.close()

    store = SqliteStore(path)
    try:
        alice = await known(store, "100")
        assert (alice.customer_raw, alice.customer_digest) == ('{"id": "100", "v": 2}', None)
        assert alice.items["1"].read_at is None  # read before read times were kept
        assert alice.marks == {("1", "survival"): Mark(Phase.GRANTED, 1)}
        assert (await known(store, "200")).customer_raw is None
        assert set((await known(store, "900")).items) == {"9"}  # an item with no link
        assert [(s.label, s.customer_id, s.name, s.last_error) for s in await store.links()] == [
            ("alice", "100", "Alice", "HTTP 503"),
            ("alice-new", "100", "Alice", None),
            ("alice-old", "100", "Alice", None),
            ("bob", "200", "Bob", None),
            ("carol", None, None, "HTTP 401"),
        ]
        assert await store.link_digests() == {"alice": b"a", "alice-new": b"n"}
        (due,) = await store.due_expiries(T0)
        assert (due.item_id, due.customer_raw) == ("1", '{"id": "100", "v": 2}')
        assert (await store.totals()).customers == 3
        # The migrated rows take part in the compare-and-set like any other.
        await commit(store, "100", CustomerChange(T1, seen=seen(("2", "active"))))
        assert set((await known(store, "100")).items) == {"1", "2"}
    finally:
        await store.close()
    assert pragma(path, "user_version") == latest_version()
    assert _columns(path, "links") == [
        "label", "customer_id", "last_synced_at", "last_error", "last_error_at", "digest",
    ]  # fmt: skip
    assert "read_at" in _columns(path, "items")
    assert {"customers", "meta", "webhook_events"} <= tables(path)
