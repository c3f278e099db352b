"""Several hosts on one PostgreSQL schema, in-process: `Service`s of the same
config on one event loop, each its own host (its own store, clock and host
name), against the loopback fakes (tests/fakes/in_process.py).

The lease ticks sleep on each service's `ManualClock`: a test moves a host's
clock to make it tick. What only separate processes show (kill -9, leases
running out on their own, hosts in network namespaces) is in the subprocess
tests of several hosts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from daemon.config import load_settings
from daemon.fleet.host import Fleet
from daemon.http_api import bound_addresses
from daemon.service import Service
from daemon.sources.store import CURSOR, LAST_SNAPSHOT
from daemon.state import Fence, JournalStatus, open_store
from daemon.state.postgres import PostgresStore
from tests.conftest import ManualClock
from tests.fakes.in_process import LocalWorld, RunningService, in_world, until
from tests.fakes.paynow_store import FakeStore
from tests.fakes.rcon_server import FakeRconServer, unused_port
from tests.fakes.world import World
from tests.postgres_db import empty_schema
from tests.store_rig import SURVIVAL, run_async, write_store_config
from tests.store_rig import VIP as STORE_VIP

pytestmark = pytest.mark.timeout(120)

VIP: dict[str, Any] = {"on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"]}
SHARED = {"interval_seconds": 10}  # leases of 7.5 s, renewed every 1.25 s


@pytest.fixture
def url() -> Iterator[str]:
    with empty_schema() as url:
        yield url


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalWorld:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    return LocalWorld(tmp_path, {"survival": "minecraft"})


def grant(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent add vip {item}"


def fleet_of(running: RunningService) -> Fleet:
    return fleet_of_service(running.service)


def fleet_of_service(service: Service) -> Fleet:
    assert service.fleet is not None, "not a host of several: the state is not PostgreSQL"
    return service.fleet


def tick(clock: ManualClock, running: RunningService) -> None:
    """Move a host's clock to its next lease tick."""
    clock.advance(fleet_of(running).timing.renew_seconds)


def delivers(service: Service, *servers: str) -> bool:
    """The service delivers to these servers (none given: to no server)."""
    return set(service.workers) == set(servers)


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def customer_with_vip(world: LocalWorld, url: str) -> tuple[str, str]:
    """A customer holding one vip item; config.yaml on the shared state. Its
    token, and the item's id."""
    token, _ = world.add_customer(platform="minecraft")
    first = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra={"sync": {"state_db": url, **SHARED}})
    return token, first


@in_world
async def test_another_host_takes_over_polling_and_delivery_when_one_stops(
    world: LocalWorld, url: str
) -> None:
    token, first = customer_with_vip(world, url)
    one_clock, two_clock = ManualClock(), ManualClock()
    async with world.service(one_clock, hostname="web-1") as one:
        await until(lambda: one.service.polling and delivers(one.service, "survival"))
        await until(lambda: world.received("survival") == [grant(world, token, first)])
        async with world.service(two_clock, hostname="web-2") as two:
            await until(lambda: "standing by: polling held by web-1 pid" in world.service_log())
            assert "standing by: delivering to survival held by web-1" in world.service_log()
            assert not two.service.polling and delivers(two.service)

            assert await one.stop() == 0
            assert "released the leases: polling, delivering to survival" in world.service_log()
            tick(two_clock, two)
            await until(lambda: two.service.polling and delivers(two.service, "survival"))
            log = world.service_log()
            assert "took over polling (held by web-1 pid " in log
            assert "took over delivering to survival (held by web-1 pid " in log
            assert ", it stopped)" in log

            second = world.add_item(token, "vip")
            await two.poll()
            await until(lambda: grant(world, token, second) in world.received("survival"))
            assert world.received("survival") == [
                grant(world, token, first),
                grant(world, token, second),
            ]


@in_world
async def test_a_host_whose_lease_ran_out_or_moved_on_sends_nothing(
    world: LocalWorld, url: str
) -> None:
    token, first = customer_with_vip(world, url)
    clock = ManualClock()
    async with world.service(clock, hostname="web-1") as one:
        await until(lambda: world.received("survival") == [grant(world, token, first)])

        async def pending_untried(item: str) -> bool:
            rows = [r for r in await one.store.rows() if r.item_id == item]
            return [(r.status, r.attempts) for r in rows] == [(JournalStatus.PENDING, 0)]

        # As the database has it, the lease runs out now (the host was cut off
        # from it long enough): the fence refuses the attempt.
        await execute(url, "UPDATE leases SET expires_at = now() WHERE name = 'server:survival'")
        second = world.add_item(token, "vip")
        await one.poll()
        await until(lambda: "journal row" in world.service_log() and delivers(one.service))
        assert "the lease server:survival is no longer this host's" in world.service_log()
        assert await pending_untried(second)
        assert world.received("survival") == [grant(world, token, first)]
        # Still nobody else's: the next tick renews it, and the row goes out once.
        tick(clock, one)
        await until(lambda: grant(world, token, second) in world.received("survival"))

        # Another host took the lease over (its token moved on): nothing is sent.
        await execute(
            url,
            "UPDATE leases SET holder = 'web-9:9:00', token = token + 1, "
            "expires_at = now() + interval '1 hour' WHERE name = 'server:survival'",
        )
        third = world.add_item(token, "vip")
        await one.poll()
        await until(lambda: delivers(one.service))  # to no server
        assert await pending_untried(third)
        tick(clock, one)
        await until(lambda: "standing by: delivering to survival held by" in world.service_log())
        assert (delivers(one.service) and one.service.polling) or not delivers(one.service)
        assert world.received("survival") == [
            grant(world, token, first),
            grant(world, token, second),
        ]


@in_world
async def test_an_attempt_answered_after_the_lease_ran_out_is_not_sent(
    world: LocalWorld, url: str
) -> None:
    """The database counted the attempt, but its answer came late (a network
    gone silent and back): the lease no longer outlives the command, and
    another host may be sending. Nothing is sent; the row goes out once the
    lease is renewed, once."""
    token, first = customer_with_vip(world, url)
    clock = ManualClock()
    async with world.service(clock, hostname="web-1") as one:
        await until(lambda: world.received("survival") == [grant(world, token, first)])
        store = one.store
        counted = store.mark_attempt
        lease = fleet_of(one).timing.lease_seconds

        async def answered_late(row_id: int, fence: Fence | None = None) -> bool:
            answer = await counted(row_id, fence)
            clock.advance(lease)  # the answer arrives as the lease runs out here
            return answer

        store.mark_attempt = answered_late  # type: ignore[method-assign]
        second = world.add_item(token, "vip")
        await one.poll()
        await until(lambda: "the lease was not renewed in time" in world.service_log())
        # (Each renewal may try again, and meet the same late answer.)
        [row] = [r for r in await store.rows() if r.item_id == second]
        assert row.status is JournalStatus.PENDING and row.attempts >= 1
        assert world.received("survival") == [grant(world, token, first)]

        store.mark_attempt = counted  # type: ignore[method-assign]

        def tick_until_delivering() -> None:
            if not delivers(one.service, "survival"):
                tick(clock, one)

        await until(
            lambda: grant(world, token, second) in world.received("survival"),
            meanwhile=tick_until_delivering,
        )
        assert world.received("survival") == [
            grant(world, token, first),
            grant(world, token, second),
        ]


def site_configs(world: LocalWorld, url: str) -> dict[str, Path]:
    """A config per site (eu: lobby, us: arena), the same but for `sync.site`
    and the passwords: each host has only its own site's RCON password (the
    other's is wrong), so a connection across sites would be refused."""
    world.rcon["arena"].password = "arena-pw-SECRET"
    secrets = world.folder / "secrets"
    base = yaml.safe_load(
        world.config({"vip": VIP}, extra={"sync": {"state_db": url, **SHARED}}).read_text()
    )
    (secrets / "arena").write_text("arena-pw-SECRET")
    (secrets / "wrong").write_text("not-the-password")
    base["servers"]["lobby"]["site"] = "eu"
    base["servers"]["arena"]["site"] = "us"
    paths = {}
    for site, mine, other in (("eu", "lobby", "arena"), ("us", "arena", "lobby")):
        data = yaml.safe_load(yaml.safe_dump(base))
        data["sync"]["site"] = site
        data["servers"][other]["password_file"] = "secrets/wrong"
        data["servers"][mine]["password_file"] = (
            "secrets/rcon" if mine == "lobby" else "secrets/arena"
        )
        paths[site] = world.folder / f"{site}.yaml"
        paths[site].write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


@pytest.fixture
def two_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalWorld:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    return LocalWorld(tmp_path, {"lobby": "minecraft", "arena": "minecraft"})


@in_world
async def test_each_site_delivers_only_to_its_own_servers(two_sites: LocalWorld, url: str) -> None:
    world = two_sites
    token, _ = world.add_customer(platform="minecraft")
    configs = site_configs(world, url)
    async with (
        world.service(ManualClock(), config=configs["eu"], hostname="web-eu") as eu,
        world.service(ManualClock(), config=configs["us"], hostname="web-us") as us,
    ):
        await until(lambda: delivers(eu.service, "lobby") and delivers(us.service, "arena"))
        poller, other = (eu, us) if eu.service.polling else (us, eu)
        assert poller.service.polling and not other.service.polling
        item = world.add_item(token, "vip")
        await poller.poll()
        # Journaled by the poller; the other site's host is woken by a notification.
        for server in ("lobby", "arena"):
            await until(lambda s=server: world.received(s) == [grant(world, token, item)])
        store = eu.store
        assert isinstance(store, PostgresStore)
        holds = {h.hostname: list(h.holds) for h in await store.hosts(60)}
        assert sorted(holds["web-eu"] + holds["web-us"]) == ["poll", "server:arena", "server:lobby"]
        assert "server:lobby" in holds["web-eu"] and "server:arena" in holds["web-us"]
    assert "password refused" not in world.service_log()
    for server in world.rcon.values():  # every connection authenticated at once
        assert server.auth_attempts == server.connections_accepted


@in_world
async def test_a_host_whose_settings_the_fleet_replaced_stops_with_exit_2(
    world: LocalWorld, url: str, tmp_path: Path
) -> None:
    world.config({"vip": VIP}, extra={"sync": {"state_db": url, **SHARED}})
    clock = ManualClock()
    async with world.service(clock, hostname="web-1") as one:
        await until(lambda: one.service.polling)
        # Meanwhile the fleet's settings were replaced (every other host was
        # gone for two intervals when a host with new ones started).
        await execute(
            url,
            "UPDATE meta SET value = 'f00d' || repeat('0', 60) WHERE key = 'fleet.fingerprint'",
        )
        tick(clock, one)
        assert await asyncio.wait_for(asyncio.shield(one.task), 15) == 2
    log = world.service_log()
    assert "stopped polling and delivering: the fleet's settings were replaced by web-1 pid" in log
    assert "this host's config.yaml differs" in log


SECRET = "whsec-fleet-SECRET"


def store_mode_config(
    folder: Path, fake: FakeStore, rcon: FakeRconServer, url: str, name: str
) -> Path:
    """Store mode with webhooks on a port of its own; reads only at start."""
    (folder / "api-key").write_text(fake.api_key)
    (folder / "webhook-secret").write_text(SECRET)
    servers = {"survival": {**SURVIVAL, "port": rcon.port, "timeout_seconds": 2}}
    written = write_store_config(
        folder, fake, {"vip": STORE_VIP}, servers=servers,
        extra={
            "paynow": {"api_key_env": None, "api_key_file": "api-key",
                       "webhook_secret_file": "webhook-secret"},
            "sync": {"state_db": url, "interval_seconds": 3600, "new_items_seconds": 3600},
            "http": {"listen": f"127.0.0.1:{unused_port()}"},
        },
    )  # fmt: skip
    return written.rename(folder / f"{name}.yaml")


@run_async
async def test_a_webhook_any_host_accepts_is_acted_on_by_the_polling_host(
    tmp_path: Path, url: str
) -> None:
    fake, rcon = FakeStore(), FakeRconServer("minecraft", password=SURVIVAL["password"])
    await fake.start()
    await rcon.start()
    running: list[tuple[Service, asyncio.Task[int]]] = []
    try:
        for name in ("web-1", "web-2"):
            path = store_mode_config(tmp_path, fake, rcon, url, name)
            settings = load_settings(path, env={})
            service = Service(path, settings, open_store(url), handle_signals=False,
                              clock=ManualClock(), hostname=name)  # fmt: skip
            running.append((service, asyncio.create_task(service.run())))
            # Its first tick: it holds leases, or knows who does.
            fleet = fleet_of_service(service)
            await until(lambda f=fleet: bool(f.held or f.seen_holders))
        (poller, _), (other, _) = running
        assert poller.polling and not other.polling
        await until(lambda: _first_reads_done(poller))
        steve = fake.add_customer(name="Steve")["id"]
        bought = fake.add_item(steve)["id"]
        assert other.http is not None
        host, port = bound_addresses(other.http)[0]
        result = await fake.send_webhook(
            f"http://{host}:{port}/paynow/webhook", "ON_DELIVERY_ITEM_ADDED", bought, SECRET
        )
        assert result.status == 200
        uuid = fake.customer(steve)["minecraft_uuid"]
        await until(lambda: rcon.commands == [f"lp user {uuid} parent add vip {bought}"])
        assert fake.count("customer_items", steve) == 1  # looked up once, by the poller
        assert poller.fleet is not None and await poller.fleet.store.take_hints() == []
    finally:
        for service, task in running:
            service.stop()
            assert await asyncio.wait_for(task, 15) == 0
            await service.store.close()
        await rcon.stop()
        await fake.stop()


async def _first_reads_done(service: Service) -> bool:
    return (
        await service.store.get_meta(CURSOR) is not None
        and await service.store.get_meta(LAST_SNAPSHOT) is not None
    )


@in_world
async def test_a_reload_may_not_change_what_the_hosts_share(world: LocalWorld, url: str) -> None:
    customer_with_vip(world, url)
    async with world.service(ManualClock(), hostname="web-1") as one:
        await until(lambda: one.service.polling)
        kit = {"on_active": ["give {customer.name} diamond 1"]}
        world.config({"vip": VIP, "kit": kit}, extra={"sync": {"state_db": url, **SHARED}})
        one.service.reload()
        assert "config reload rejected, keeping the running config: servers, products" in (
            world.service_log()
        )
        assert "kit" not in one.service.settings.products
        # What hosts may have each their own (here the PayNow timeout) reloads.
        world.config(
            {"vip": VIP},
            extra={"sync": {"state_db": url, **SHARED}, "paynow": {"timeout_seconds": 3}},
        )
        one.service.reload()
        assert "config reloaded" in world.service_log()
        assert one.service.settings.paynow.timeout_seconds == 3
