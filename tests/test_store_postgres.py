"""What the PostgreSQL backend adds to the Store contract (which
tests/test_store_contract.py runs on it): migrations, several hosts on one
database, the dry run's copy, passwords, and how errors
are told.

Each test gets an empty schema of the test server (tests/postgres_db.py); two
stores opened on one URL have a pool of connections each, as two hosts do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from daemon.state import (
    CustomerChange,
    CustomerChanged,
    CustomerRecord,
    JournalEntry,
    SeenItem,
    StoreError,
    StoreWriteError,
    open_store,
)
from daemon.state import postgres as backend
from daemon.state.postgres import PostgresStore
from tests.fakes.postgres_login import FakeLoginServer
from tests.postgres_db import empty_schema, with_settings
from tests.test_store_contract import ALICE, T0, T1, T2, commit, first_pass, known, snapshot

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def url() -> Iterator[str]:
    with empty_schema() as url:
        yield url


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def store_of(url: str, **kwargs: Any) -> PostgresStore:
    store = open_store(url, **kwargs)
    assert isinstance(store, PostgresStore)
    return store


async def fetch(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def versions(url: str) -> list[int]:
    return [
        r["version"] for r in await fetch(url, "SELECT version FROM perksync_schema ORDER BY 1")
    ]


# --- migrations -----------------------------------------------------------------------


def test_a_new_database_gets_every_step_once(url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        store = store_of(url)
        with caplog.at_level(logging.INFO, logger="daemon.state"):
            assert (await store.totals()).customers == 0
        await store.close()
        assert await versions(url) == list(range(1, backend.latest_version() + 1))
        assert caplog.messages == [
            f"state database {store.name}: created (schema version {backend.latest_version()})"
        ]
        # Opening again changes nothing, and says nothing.
        caplog.clear()
        again = store_of(url)
        with caplog.at_level(logging.INFO, logger="daemon.state"):
            await again.totals()
        await again.close()
        assert caplog.messages == []

    run(test)


def test_hosts_that_start_together_migrate_once(url: str) -> None:
    async def test() -> None:
        stores = [store_of(url) for _ in range(6)]
        try:
            totals = await asyncio.gather(*(store.totals() for store in stores))
        finally:
            for store in stores:
                await store.close()
        assert [t.customers for t in totals] == [0] * 6
        assert await versions(url) == list(range(1, backend.latest_version() + 1))

    run(test)


def test_a_newer_schema_is_refused(url: str) -> None:
    async def test() -> None:
        store = store_of(url)
        await store.totals()
        await store.close()
        newer = backend.latest_version() + 1
        await fetch(
            url, "INSERT INTO perksync_schema (version, description) VALUES ($1, 'x')", newer
        )
        later = store_of(url)
        with pytest.raises(StoreError) as info:
            await later.totals()
        await later.close()
        assert str(info.value) == (
            f"the state database {later.name} has schema version {newer}, but this perksync "
            f"only knows versions up to {backend.latest_version()}: refusing to use it "
            "(run a newer perksync, or restore a backup)"
        )

    run(test)


async def _add_note(conn: Any) -> None:
    await conn.execute("ALTER TABLE meta ADD COLUMN note text")


async def _half_done(conn: Any) -> None:
    await conn.execute("CREATE TABLE half (x integer)")
    await conn.execute("ALTER TABLE nowhere ADD COLUMN y integer")


def test_an_older_schema_is_upgraded_step_by_step(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        old = store_of(url)
        await old.totals()
        await old.close()
        step = backend.Migration(backend.latest_version() + 1, "a note on values", _add_note)
        monkeypatch.setattr(backend, "MIGRATIONS", [*backend.MIGRATIONS, step])
        new = store_of(url)
        with caplog.at_level(logging.INFO, logger="daemon.state"):
            await new.set_meta({"k": "v"})
        await new.close()
        assert await versions(url) == list(range(1, step.version + 1))
        assert await fetch(url, "SELECT key, value, note FROM meta") == [("k", "v", None)]

    run(test)
    assert caplog.messages[-1].endswith(
        f": upgraded to schema version {backend.latest_version()} (a note on values)"
    )


def test_a_failing_step_leaves_the_schema_as_it_was(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def test() -> None:
        old = store_of(url)
        await old.totals()
        await old.close()
        before = await versions(url)
        step = backend.Migration(len(before) + 1, "a broken step", _half_done)
        monkeypatch.setattr(backend, "MIGRATIONS", [*backend.MIGRATIONS, step])
        new = store_of(url)
        with pytest.raises(
            StoreError, match=rf"to schema version {step.version} \(a broken step\)"
        ):
            await new.totals()
        await new.close()
        assert await versions(url) == before
        assert await fetch(url, "SELECT to_regclass('half') IS NULL AS gone") == [(True,)]

    run(test)


# --- several hosts on one database ----------------------------------------------------


def test_two_hosts_incrementing_the_same_customers_lose_no_update(url: str) -> None:
    """Each block reads a counter (the customer's JSON), then commits it plus one
    with a journal row for the new value: a lost update would store a count
    below the number of commits, or journal one value twice (dropped as a
    duplicate: fewer rows than commits)."""
    customers = [str(100 + n) for n in range(4)]
    rounds = 15

    async def increment(store: PostgresStore, customer_id: str) -> int:
        retries = 0
        while True:
            try:
                async with store.customer(customer_id) as txn:
                    raw = txn.known.customer_raw
                    n = 0 if raw is None else json.loads(raw)["n"]
                    await asyncio.sleep(0)  # let the other host's blocks in between
                    await txn.commit(
                        CustomerChange(
                            T0,
                            CustomerRecord(None, json.dumps({"n": n + 1})),
                            [SeenItem(f"i{customer_id}", "vip", "active")],
                            entries=[counted(customer_id, n + 1)],
                        )
                    )
                    return retries
            except CustomerChanged:
                retries += 1

    async def host(store: PostgresStore) -> int:
        work = [increment(store, c) for c in customers for _ in range(rounds)]
        return sum(await asyncio.gather(*work))

    async def test() -> None:
        here, there = store_of(url), store_of(url)
        try:
            retries = sum(await asyncio.gather(host(here), host(there)))
            for customer_id in customers:
                raw = (await known(here, customer_id)).customer_raw
                assert raw is not None and json.loads(raw)["n"] == 2 * rounds
            rows = await here.rows()
        finally:
            await here.close()
            await there.close()
        assert len(rows) == 2 * rounds * len(customers)
        assert retries > 0  # the two hosts did race: some blocks had to read again

    run(test)


def counted(customer_id: str, n: int) -> JournalEntry:
    return JournalEntry(
        customer_id, f"i{customer_id}", "vip", "survival", "on_active", n, 0, f"n={n}"
    )


def test_a_commit_racing_an_insert_of_the_same_item_stores_nothing(url: str) -> None:
    """Another host's commit is inserting item 9 for customer 200 when this one
    stores it for customer 100: this one cannot know it takes the item away,
    so it raises CustomerChanged; read again, it moves the item as usual."""

    async def test() -> None:
        store = store_of(url)
        await commit(store, "200", CustomerChange(T0, CustomerRecord("Bob", "{}")))
        other = await asyncpg.connect(url)
        try:
            insert = other.transaction()
            await insert.start()
            await other.execute(
                "INSERT INTO items (item_id, customer_id, product, state, first_seen_at,"
                " last_seen_at) VALUES ('9', '200', 'vip', 'active', now(), now())"
            )
            racing = asyncio.create_task(
                commit(store, "100", CustomerChange(T1, ALICE, [SeenItem("9", "vip", "active")]))
            )
            # Until the commit waits for the insert (the server's state: no event to await).
            while not await other.fetchval(  # noqa: ASYNC110
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
                other.get_server_pid(),
            ):
                await asyncio.sleep(0.01)
            await insert.commit()
            with pytest.raises(CustomerChanged):
                await racing
        finally:
            await other.close()
        assert set((await known(store, "200")).items) == {"9"}
        assert (await known(store, "100")).items == {}
        await commit(store, "100", CustomerChange(T2, ALICE, [SeenItem("9", "vip", "active")]))
        assert set((await known(store, "100")).items) == {"9"}
        await store.close()

    run(test)


def test_a_throwaway_store_works_on_a_copy_and_changes_nothing(url: str) -> None:
    async def test() -> None:
        real = store_of(url)
        a, b, _, _ = await first_pass(real)
        await real.mark_delivered(a, T1)
        await real.set_meta({"cursor": "7"})
        before = await snapshot(real)

        copy = store_of(url, throwaway=True)
        assert await snapshot(copy) == before
        await copy.mark_delivered(b, T2)
        await copy.set_meta({"cursor": "8"})
        (new,) = await commit(
            copy,
            "200",
            CustomerChange(
                T2, ALICE, [SeenItem("9", "vip", "active")], entries=[counted("200", 1)]
            ),
        )
        assert new > max(r.id for r in before["rows"])  # ids go on from the database's
        assert await copy.get_meta("cursor") == "8"
        assert await snapshot(real) == before
        assert await real.get_meta("cursor") == "7"
        await copy.close()

        again = store_of(url, throwaway=True)  # a new copy: the last one is gone
        assert await snapshot(again) == before
        await again.close()
        await real.close()

    run(test)


def test_a_throwaway_store_of_an_empty_database_creates_nothing_there(url: str) -> None:
    async def test() -> None:
        copy = store_of(url, throwaway=True)
        await first_pass(copy)
        assert len(await copy.rows()) == 4
        await copy.close()
        assert await fetch(
            url, "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ) == [(0,)]

    run(test)


# --- errors and passwords ----------------------------------------------------------------


def test_a_database_that_refuses_writes_raises_store_write_error(url: str) -> None:
    async def test() -> None:
        store = store_of(url)
        a, *_ = await first_pass(store)
        await store.close()
        read_only = store_of(with_settings(url, default_transaction_read_only="on"))
        assert len(await read_only.rows()) == 4  # reading still works
        with pytest.raises(
            StoreWriteError, match=r"^cannot write the state database postgresql://"
        ):
            await read_only.mark_attempt(a)
        with pytest.raises(StoreWriteError):
            await commit(read_only, "100", CustomerChange(T1, ALICE))
        await read_only.close()

    run(test)


def test_an_unreachable_server_is_one_line_naming_it() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nobody listens there once it is closed

    async def test() -> None:
        store = open_store(f"postgresql://perksync@127.0.0.1:{port}/perksync", password="pw-SECRET")
        with pytest.raises(StoreError) as info:
            await store.totals()
        await store.close()
        message = str(info.value)
        assert message.startswith(
            f"cannot connect to the state database postgresql://perksync@127.0.0.1:{port}/perksync: "
        )
        assert "\n" not in message and "pw-SECRET" not in message

    run(test)


@pytest.mark.parametrize("echo", [False, True], ids=["refused", "refused-echoing-the-password"])
def test_the_password_goes_to_the_server_and_into_no_message(echo: bool) -> None:
    async def test() -> None:
        server = FakeLoginServer(echo_password=echo)
        await server.start()
        store = open_store(server.url(), password="pw-SECRET")
        try:
            with pytest.raises(StoreError) as info:
                await store.totals()
        finally:
            await store.close()
            await server.stop()
        assert server.passwords[:1] == ["pw-SECRET"]
        assert str(info.value).startswith(f"cannot connect to the state database {server.url()}: ")
        assert 'password authentication failed for user "perksync"' in str(info.value)
        assert "pw-SECRET" not in str(info.value)

    run(test)


@pytest.mark.parametrize(
    "bad",
    [
        "postgresql://perksync:pw-SECRET@127.0.0.1/perksync",
        "postgres://perksync:@127.0.0.1/perksync",
        "postgresql://perksync@127.0.0.1/perksync?password=pw-SECRET",
        "postgresql://perksync@127.0.0.1/perksync?sslmode=require&sslpassword=pw-SECRET",
    ],
)
def test_a_url_with_a_password_is_refused_without_repeating_it(bad: str) -> None:
    with pytest.raises(StoreError) as info:
        open_store(bad)
    assert str(info.value) == (
        "state database: the URL holds a password: remove it from the URL, and give it in "
        "sync.state_db_password_env or sync.state_db_password_file"
    )


def test_without_asyncpg_a_postgresql_url_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if not installed
    with pytest.raises(
        StoreError, match=r"needs the asyncpg driver: pip install 'perksync\[postgresql\]'$"
    ):
        open_store("postgresql://perksync@127.0.0.1/perksync")


def test_a_nul_in_free_text_is_kept_as_an_escape(url: str) -> None:
    async def test() -> None:
        store = store_of(url)
        (row,) = await commit(
            store,
            "100",
            CustomerChange(T0, CustomerRecord("Al\x00ice", "{}"), [SeenItem("1", "vip", "active")],
                           entries=[counted("100", 1)], link=None),
        )  # fmt: skip
        await store.mark_delivered(row, T1, "ok\x00")
        await store.record_link_error("alice", "bad\x00reply", T1)
        (journal_row,) = await store.rows()
        (link,) = await store.links()
        assert journal_row.reply == "ok\\u0000"
        assert link.last_error == "bad\\u0000reply"
        names = await fetch(url, "SELECT name FROM customers")
        assert names == [("Al\\u0000ice",)]
        await store.close()

    run(test)
