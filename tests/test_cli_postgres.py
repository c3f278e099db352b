"""The CLI with its state in PostgreSQL, as a subprocess against the loopback
fakes and the test server (an empty schema each: tests/postgres_db.py)."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from daemon.config import load_settings
from daemon.fleet.fingerprint import fingerprint
from daemon.state import describe_postgres_url, open_store
from daemon.state.postgres import PostgresStore
from daemon.state.shared import JOURNAL, HostRecord
from tests.fakes.postgres_login import FakeLoginServer
from tests.fakes.world import RCON_PASSWORD, REPO, World
from tests.postgres_db import empty_schema

PRODUCTS: dict[str, Any] = {
    "vip": {
        "servers": ["survival"],
        "on_active": ["lp user {customer.minecraft_uuid} parent add vip"],
        "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"],
    },
}
DB_PASSWORD = "pg-pw-SECRET"


@pytest.fixture
def url() -> Iterator[str]:
    with empty_schema() as url:
        yield url


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


def run(world: World, *args: str, expect: int) -> str:
    result = world.run_cli(*args)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert RCON_PASSWORD not in output and DB_PASSWORD not in output
    assert result.returncode == expect, output
    return output


def fetch(url: str, sql: str) -> list[tuple[Any, ...]]:
    async def read() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(read())


@contextmanager
def notifications(url: str) -> Iterator[queue.Queue[tuple[str, str]]]:
    """What the hosts of `url`'s schema are notified of (kind, payload), heard
    by a listener of its own in a thread, as another host would hear it."""
    heard: queue.Queue[tuple[str, str]] = queue.Queue()
    ready, done = threading.Event(), threading.Event()

    async def listen() -> None:
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        listening = await store.listen(lambda kind, payload: heard.put((kind, payload)))
        ready.set()
        try:
            await asyncio.to_thread(done.wait)
        finally:
            await listening.close()
            await store.close()

    thread = threading.Thread(target=asyncio.run, args=(listen(),))
    thread.start()
    try:
        assert ready.wait(10), "the listener did not start"
        yield heard
    finally:
        done.set()
        thread.join(10)


def journal(url: str) -> list[tuple[Any, ...]]:
    return fetch(url, "SELECT command, status FROM journal ORDER BY id")


def test_sync_now_and_status_keep_the_state_in_postgresql(world: World, url: str) -> None:
    token, alice = world.add_customer(platform="minecraft", name="alice")
    world.add_item(token, "vip")
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    grant = f"lp user {alice['minecraft_uuid']} parent add vip"

    run(world, "--sync-now", expect=0)
    run(world, "--sync-now", expect=0)
    assert world.received("survival") == [grant]  # once: the second pass knew it was sent
    assert journal(url) == [(grant, "delivered")]
    assert not (world.folder / "state.sqlite3").exists()

    status = run(world, "status", expect=0)
    assert f"state: {describe_postgres_url(url)}\n" in status
    assert "survival: 0 pending, 0 failed, 0 skipped, 1 delivered" in status


def test_a_dry_run_prints_the_commands_and_changes_nothing(world: World, url: str) -> None:
    token, alice = world.add_customer(platform="minecraft", name="alice")
    world.add_item(token, "vip")
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    grant = f"lp user {alice['minecraft_uuid']} parent add vip"

    output = run(world, "--sync-now", "--dry-run", expect=0)
    assert grant in output
    assert world.received("survival") == []
    assert fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()") == []

    run(world, "--sync-now", expect=0)
    assert world.received("survival") == [grant]
    output = run(world, "--sync-now", "--dry-run", expect=0)
    assert grant not in output  # the copy holds what the database holds

    world.add_item(token, "vip")  # a second item: its grant would be sent
    before = fetch(url, "SELECT * FROM journal")
    output = run(world, "--sync-now", "--dry-run", expect=0)
    assert grant in output
    assert fetch(url, "SELECT * FROM journal") == before
    assert world.received("survival") == [grant]


def test_operator_commands_read_and_change_the_postgresql_state(world: World, url: str) -> None:
    token, alice = world.add_customer(platform="minecraft", name="alice")
    world.add_item(token, "vip")
    world.call(world.rcon["survival"].stop())  # the command stays pending
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    grant = f"lp user {alice['minecraft_uuid']} parent add vip"

    run(world, "--sync-now", expect=3)
    shown = world.run_cli("journal", "--json")
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    assert (row["command"], row["status"]) == (grant, "pending")
    run(world, "cancel", str(row["id"]), expect=0)
    assert journal(url) == [(grant, "cancelled")]


def test_sync_now_stops_while_another_host_holds_the_leases(world: World, url: str) -> None:
    world.add_customer(platform="minecraft", name="alice")
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    settings = load_settings(world.folder / "config.yaml", env={})
    host = HostRecord("web-1:4242:ab", "web-1", 4242, None, fingerprint(settings))

    async def beside_a_holder() -> subprocess.CompletedProcess[str]:
        holder = open_store(url)
        assert isinstance(holder, PostgresStore)
        try:
            await holder.join(host, 120)
            tick = await holder.tick(host, ["poll", "server:survival"], 60, 5)
            assert all(lease.held for lease in tick.leases)
            return await asyncio.to_thread(world.run_cli, "--sync-now")
        finally:
            await holder.close()

    result = asyncio.run(beside_a_holder())
    assert result.returncode == 1, result.stderr
    assert (
        f"another perksync (web-1 pid 4242) is polling from the state database "
        f"{describe_postgres_url(url)}"
    ) in result.stderr
    assert world.received("survival") == []


def test_a_host_with_other_settings_does_not_start_while_the_fleet_runs(
    world: World, url: str
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="alice")
    world.add_item(token, "vip")
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    running = HostRecord("web-1:4242:ab", "web-1", 4242, None, "0" * 64)

    async def beside_a_running_host() -> list[subprocess.CompletedProcess[str]]:
        holder = open_store(url)
        assert isinstance(holder, PostgresStore)
        try:
            await holder.join(running, 120)
            await holder.tick(running, ["poll"], 60, 5)
            return [
                await asyncio.to_thread(world.run_cli, *args, timeout=30)
                for args in ((), ("--sync-now",))  # the service, a pass
            ]
        finally:
            await holder.close()

    for result in asyncio.run(beside_a_running_host()):
        assert result.returncode == 2, result.stderr
        assert (
            "the hosts of this database run other settings (fingerprint 000000000000, stored "
            "by web-1 pid 4242 at "
        ) in result.stderr
        assert "servers and products must be the same on every host" in result.stderr
    assert world.received("survival") == []


def test_a_pass_of_one_site_delivers_there_and_leaves_the_other_sites_rows(
    tmp_path: Path, url: str
) -> None:
    with World(tmp_path, {"lobby": "minecraft", "arena": "minecraft"}) as world:
        token, alice = world.add_customer(platform="minecraft", name="alice")
        world.add_item(token, "vip")
        path = world.config(
            {"vip": {"on_active": ["lp user {customer.minecraft_uuid} parent add vip"]}},
            extra={"sync": {"state_db": url, "site": "eu"}},
        )
        data = yaml.safe_load(path.read_text())
        data["servers"]["lobby"]["site"] = "eu"
        data["servers"]["arena"]["site"] = "us"
        path.write_text(yaml.safe_dump(data))
        with notifications(url) as heard:
            output = run(world, "--sync-now", expect=0)  # what is left is not this site's
            # The host delivering to arena is told at once, not at its next heartbeat.
            assert heard.get(timeout=10) == (JOURNAL, "arena")
        grant = f"lp user {alice['minecraft_uuid']} parent add vip"
        assert world.received("lobby") == [grant]
        assert world.received("arena") == []
        assert world.rcon["arena"].connections_accepted == 0
        assert "1 delivered" in output and "0 pending" in output
        assert "1 pending for other sites' hosts (arena: 1)" in output
        assert sorted(fetch(url, "SELECT server, status FROM journal")) == [
            ("arena", "pending"),
            ("lobby", "delivered"),
        ]


def test_status_lists_the_hosts_and_what_each_holds(world: World, url: str) -> None:
    world.config(PRODUCTS, extra={"sync": {"state_db": url}})
    ours = fingerprint(load_settings(world.folder / "config.yaml", env={}))
    web1 = HostRecord("web-1:4242:ab", "web-1", 4242, None, ours)
    web2 = HostRecord("web-2:977:cd", "web-2", 977, None, ours)

    async def hosts_running() -> None:
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        try:
            for host in (web1, web2):
                await store.join(host, 120)
                await store.tick(host, ["poll", "server:survival"], 60, 5)
        finally:
            await store.close()

    asyncio.run(hosts_running())
    output = run(world, "status", expect=0)
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("hosts ("))
    assert header.startswith(
        f"hosts (seen in the last 180s; settings {ours[:12]}, this config.yaml's, stored by "
        "web-1 pid 4242 at "
    )
    web1_line = next(line for line in lines if line.startswith("  web-1 pid 4242: "))
    assert web1_line.startswith("  web-1 pid 4242: polling, delivering to survival; last renewed ")
    assert any(line.startswith("  web-2 pid 977: standing by; last renewed ") for line in lines)


def test_a_password_in_the_state_url_is_a_config_error(world: World) -> None:
    world.config(
        PRODUCTS,
        extra={"sync": {"state_db": f"postgresql://perksync:{DB_PASSWORD}@127.0.0.1/perksync"}},
    )
    output = run(world, "--check-config", expect=2)
    assert output.strip() == (
        "perksync: config error: sync.state_db: the URL holds a password: remove it from the "
        "URL, and give it in sync.state_db_password_env or sync.state_db_password_file"
    )


def test_the_state_password_comes_from_its_file_and_is_never_printed(world: World) -> None:
    server = FakeLoginServer(echo_password=True)
    world.call(server.start())
    try:
        (world.folder / "secrets").mkdir(exist_ok=True)
        (world.folder / "secrets" / "pg").write_text(DB_PASSWORD + "\n")
        world.config(
            PRODUCTS,
            extra={"sync": {"state_db": server.url(), "state_db_password_file": "secrets/pg"}},
        )
        assert "OK" in run(world, "--check-config", expect=0)  # nothing contacted
        assert server.passwords == []
        for command in ("status", "--sync-now"):
            output = run(world, command, expect=1)
            assert (
                f"state store: cannot connect to the state database {server.url()}: "
                'password authentication failed for user "perksync" (password ***)'
            ) in output
    finally:
        world.call(server.stop())
    assert server.passwords == [DB_PASSWORD, DB_PASSWORD]


def test_without_asyncpg_a_postgresql_state_says_what_to_install(
    world: World, tmp_path: Path
) -> None:
    shadow = tmp_path / "no-asyncpg" / "asyncpg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'asyncpg'\")\n")
    world.config(PRODUCTS, extra={"sync": {"state_db": "postgresql://perksync@127.0.0.1/perksync"}})
    result = world.run_cli("--check-config", env={"PYTHONPATH": f"{shadow.parent}:{REPO}"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "perksync: config error: sync.state_db: a postgresql:// state database needs the "
        "asyncpg driver: pip install 'perksync[postgresql]'"
    )


def test_check_config_contacts_no_database_and_leaves_a_busy_address_to_the_service(
    world: World,
) -> None:
    """It cannot tell the running service's listener from another program's
    without the database, so a busy http.listen is for the service's start to
    report (as it does for SQLite when another program holds the address)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        world.config(
            PRODUCTS,
            extra={
                "sync": {"state_db": "postgresql://perksync@127.0.0.1:9/nowhere"},
                "http": {"listen": f"127.0.0.1:{port}"},
            },
        )
        assert "OK" in run(world, "--check-config", expect=0)
