"""Service mode (plain `perksync`) in-process against the loopback fakes.

The service runs as a task of the test's event loop (tests/fakes/in_process.py)
on a `ManualClock`: local expiry, health and the heartbeat follow the clock
the test moves, and polls or sweeps that a test needs now are run now. What
is about the process itself (signals, kill -9, systemd's socket, the state
lock) is in test_service_process.py.

A reload with good and bad configs, a server down then back, the API down
then back, local expiry with the API down and a renewal after it, a new
activation reaching the server within one interval, health and metrics,
unchanged polls, a restart, items that reach no server, the interval summary.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.delivery import BACKOFF_MAX
from daemon.scheduler import AUTH_RETRY, effective_interval
from daemon.service import HEARTBEAT_MAX
from tests.conftest import ManualClock
from tests.fakes.in_process import LocalWorld, in_world, until
from tests.fakes.paynow_api import iso
from tests.fakes.rcon_server import unused_port
from tests.fakes.world import World

VIP: dict[str, Any] = {
    "on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"],
    "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
    "on_revoke": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
}
FAST = {"sync": {"interval_seconds": 1, "expiry_grace_seconds": 0}}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalWorld:
    # Not started by systemd: the service must not notify the test runner's.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    return LocalWorld(tmp_path, {"survival": "minecraft"})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def grant(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent add vip {item}"


def remove(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent remove vip {item}"


async def get(http: aiohttp.ClientSession, port: int, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


@in_world
async def test_new_activation_reaches_the_server_within_one_interval(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    first = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra={"sync": {"interval_seconds": 2}})
    async with world.service(clock):
        await until(lambda: world.received("survival") == [grant(world, token, first)])
        second = world.add_item(token, "vip")
        added = time.monotonic()
        await until(lambda: grant(world, token, second) in world.received("survival"))
        # The scheduler runs on the wall clock: one interval (2 s) plus jitter
        # (0.2 s) plus a little slack for a busy machine.
        assert time.monotonic() - added < 2 + 0.2 + 1.5
        assert world.received("survival") == [
            grant(world, token, first),
            grant(world, token, second),
        ]


@in_world
async def test_a_reload_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, customer = world.add_customer(platform="minecraft", name="hugo")
    vip = world.add_item(token, "vip")
    world.add_item(token, "kit")
    world.config({"vip": VIP}, extra=FAST)
    async with world.service(clock) as running:
        await until(lambda: world.received("survival") == [grant(world, token, vip)])

        kit = {"on_active": ["give {customer.name} diamond 1"]}
        world.config({"vip": VIP, "kit": kit}, extra=FAST)
        running.service.reload()  # what SIGHUP does
        await until(lambda: "give hugo diamond 1" in world.received("survival"))
        assert "config reloaded" in world.service_log()

        broken = {"vip": VIP, "kit": {"on_active": ["give {customer.nmae} diamond 1"]}}
        world.config(broken, extra=FAST)
        running.service.reload()
        assert "config reload rejected" in world.service_log()
        assert (
            "products.kit.on_active[0]: unknown placeholder {customer.nmae}" in world.service_log()
        )
        # Still running on the old config: a new purchase is delivered.
        again = world.add_item(token, "vip")
        await running.poll()
        await until(lambda: grant(world, token, again) in world.received("survival"))
        assert not running.task.done()
        assert world.received("survival").count("give hugo diamond 1") == 1
        assert customer["name"] == "hugo"


def delivery_failures(running: Any) -> float:
    value = running.sample("perksync_delivery_failures_total", {"server": "survival"})
    return value or 0.0


@in_world
async def test_server_down_then_back_gets_its_backlog_once(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    items = [world.add_item(token, "vip") for _ in range(3)]
    world.config({"vip": VIP}, extra=FAST)
    await world.rcon["survival"].go_down()
    async with world.service(clock) as running:
        await until(lambda: "server survival:" in world.service_log())
        # It is tried again after each backoff (on the service's clock) while down.
        await until(lambda: delivery_failures(running) >= 3, meanwhile=lambda: clock.advance(1))
        assert world.received("survival") == []
        await world.rcon["survival"].come_up()
        expected = sorted(grant(world, token, i) for i in items)
        await until(
            lambda: sorted(world.received("survival")) == expected,
            meanwhile=lambda: clock.advance(BACKOFF_MAX),
        )
        # More polls and retries: still exactly once.
        await running.poll()
        await running.poll()
        clock.advance(BACKOFF_MAX)
        await running.drained()
        assert sorted(world.received("survival")) == expected


@in_world
async def test_api_down_then_back(world: LocalWorld, clock: ManualClock) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    world.paynow.fault(None, "status", status=503, times=None)
    async with world.service(clock):
        await until(lambda: world.paynow.count() >= 2)
        assert world.received("survival") == []
        world.paynow.clear_faults()
        await until(lambda: world.received("survival") == [grant(world, token, item)], within=30)


@in_world
async def test_local_expiry_runs_with_the_api_down_and_never_twice(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip", expirable=True)
    soon = clock.now() + timedelta(seconds=3)
    world.paynow.update_item(token, item, expires_at=iso(soon))
    world.config({"vip": VIP}, extra=FAST)
    async with world.service(clock) as running:
        await until(lambda: world.received("survival") == [grant(world, token, item)])
        world.paynow.fault(None, "status", status=503, times=None)
        assert await running.sweep() == 0  # not yet
        clock.advance(3)
        # The service's own sweep (every second) takes it back.
        await until(lambda: remove(world, token, item) in world.received("survival"))
        assert clock.now() >= soon
        assert "expired at" in world.service_log()
        # The API comes back and reports the item used: nothing runs again.
        world.paynow.clear_faults()
        world.set_state(token, item, "used")
        for _ in range(3):
            await running.poll()
            await running.sweep()
        await running.drained()
        assert world.received("survival") == [
            grant(world, token, item),
            remove(world, token, item),
        ]


@in_world
async def test_renewal_after_local_expiry_grants_again_once(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip", expirable=True)
    soon = clock.now() + timedelta(seconds=2)
    world.paynow.update_item(token, item, expires_at=iso(soon))
    world.config({"vip": VIP}, extra=FAST)
    async with world.service(clock) as running:
        await until(lambda: world.received("survival") == [grant(world, token, item)])
        clock.advance(2)
        await running.sweep()  # (else the service's own, within a second)
        await until(lambda: remove(world, token, item) in world.received("survival"))
        later = clock.now() + timedelta(days=30)
        world.paynow.update_item(token, item, expires_at=iso(later))
        expected = [
            grant(world, token, item),
            remove(world, token, item),
            grant(world, token, item),
        ]
        await running.poll()
        await until(lambda: world.received("survival") == expected)
        # More polls and sweeps, days later (still before the new expiry).
        for _ in range(2):
            clock.advance(days=1)
            await running.poll()
            assert await running.sweep() == 0
        await running.drained()
        assert world.received("survival") == expected


@in_world
async def test_rejected_token_is_logged_once(world: LocalWorld, clock: ManualClock) -> None:
    good, _ = world.add_customer(platform="minecraft")
    item = world.add_item(good, "vip")
    bad, _ = world.add_customer(platform="minecraft")
    world.config({"vip": VIP}, extra=FAST)
    world.paynow.remove_customer(bad)

    def rejected() -> list[str]:
        log = world.service_log().splitlines()
        return [line for line in log if "token_file secrets/token1" in line]

    async with world.service(clock) as running:
        await until(lambda: world.received("survival") == [grant(world, good, item)])
        await until(lambda: world.paynow.count(None, bad) == 1)
        for _ in range(3):  # three more polls
            await running.poll()
        assert len(rejected()) == 1, rejected()
        assert world.paynow.count(None, bad) == 1
        # Half an hour later the token is tried again, and not logged again.
        clock.advance(AUTH_RETRY)
        await running.poll(1)
        assert world.paynow.count(None, bad) == 2
        assert len(rejected()) == 1, rejected()


@in_world
async def test_healthz_and_metrics_on_loopback(world: LocalWorld, clock: ManualClock) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    port = unused_port()
    world.config({"vip": VIP}, extra={**FAST, "http": {"listen": f"127.0.0.1:{port}"}})
    async with world.service(clock), aiohttp.ClientSession() as http:
        await until(lambda: len(world.received("survival")) == 1)

        async def delivered_metric() -> bool:
            return (
                'perksync_commands_total{outcome="delivered",server="survival"} 1.0'
                in (await get(http, port, "/metrics"))[1]
            )

        await until(delivered_metric)
        assert await get(http, port, "/healthz") == (200, "ok\n")
        metrics = (await get(http, port, "/metrics"))[1]
        assert "perksync_last_successful_sync_timestamp_seconds{customer=" in metrics
        assert 'perksync_journal_backlog{server="survival"}' in metrics
        assert token not in metrics


@in_world
async def test_health_follows_the_service_clock(world: LocalWorld, clock: ManualClock) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    port = unused_port()
    world.config({"vip": VIP}, extra={**FAST, "http": {"listen": f"127.0.0.1:{port}"}})
    await world.rcon["survival"].go_down()
    async with world.service(clock) as running, aiohttp.ClientSession() as http:
        await until(lambda: delivery_failures(running) >= 1)
        # The heartbeat has seen the backlog (it ticks on the service's clock).
        await until(
            lambda: running.sample("perksync_journal_backlog", {"server": "survival"}) == 1,
            meanwhile=lambda: clock.advance(1),
        )
        # Every poll fails (with an error no retry can help: nothing to wait out).
        world.paynow.fault(None, "status", status=404, times=None)
        await running.poll()
        assert (running.sample("perksync_polls_total", {"outcome": "failed"}) or 0) >= 1
        assert await get(http, port, "/healthz") == (200, "ok\n")  # not for long enough yet
        # Ten minutes later: no successful poll for 5 (the default for a 1 s
        # interval) and a server failing for 10, with its backlog known.
        clock.advance(minutes=10)
        status, reason = await get(http, port, "/healthz")
        assert status == 503, reason
        stale_polls = r"no successful poll for 1\d min: \d+ failed \(last: not_found\)"
        assert re.search(stale_polls, reason), reason
        assert "server survival: 1 pending" in reason
        # Both back: healthy again without waiting.
        world.paynow.clear_faults()
        await world.rcon["survival"].come_up()
        await until(
            lambda: len(world.received("survival")) == 1, meanwhile=lambda: clock.advance(1)
        )
        await running.poll()
        assert await get(http, port, "/healthz") == (200, "ok\n")


@in_world
async def test_unchanged_polls_read_only_the_inventory(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="olga")
    world.add_item(token, "vip")
    kit = {"on_active": ["give {customer.name} diamond 1"]}
    world.config({"vip": VIP, "kit": kit}, extra=FAST)
    async with world.service(clock) as running:
        await until(lambda: len(world.received("survival")) == 1)
        for _ in range(4):  # four more polls, nothing changes
            await running.poll()
        customer_reads = world.paynow.count("customer", token)
        inventory_reads = world.paynow.count("items", token)
        assert inventory_reads >= 4
        assert customer_reads <= 2  # the first poll, perhaps one refresh
        # A change reads the customer again, so commands use its current name.
        world.paynow.update_customer(token, name="olga2")
        world.add_item(token, "kit")
        await running.poll()
        await until(lambda: "give olga2 diamond 1" in world.received("survival"))


@in_world
async def test_a_restarted_service_trusts_the_stored_digest_unless_the_config_changed(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="pia")
    world.add_item(token, "vip")
    kit = {"on_active": ["give {customer.name} diamond 1"]}
    world.add_item(token, "kit")
    world.config({"vip": VIP}, extra=FAST)
    async with world.service(clock) as first:
        await until(lambda: len(world.received("survival")) == 1)
        assert await first.stop() == 0

    # Same config: the first polls after the restart read only the inventory.
    world.paynow.reset_counters()
    async with world.service(clock) as second:
        for _ in range(3):
            await second.poll()
        assert world.paynow.count("items", token) >= 3
        assert world.paynow.count("customer", token) == 0
        assert await second.stop() == 0

    # A product mapped while it was stopped: the same answers now mean a grant.
    world.config({"vip": VIP, "kit": kit}, extra=FAST)
    async with world.service(clock):
        await until(lambda: "give pia diamond 1" in world.received("survival"))
        assert len(world.received("survival")) == 2


def test_interval_stretches_to_what_the_rate_limit_allows() -> None:
    assert effective_interval(60, 10_000, 20) == pytest.approx(550)
    assert effective_interval(60, 1_000, 20) == 60
    assert effective_interval(60, 10_000, 0) == 60  # no limit


@in_world
async def test_too_many_customers_for_the_rate_limit_is_warned_about(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    extra = {"sync": {"interval_seconds": 1}, "paynow": {"requests_per_second": 0.5}}
    world.config({"vip": VIP}, extra=extra)
    async with world.service(clock):
        assert "cannot all be polled every 1s; polling each every 2s" in world.service_log()


def undelivered_gauge(product: str, reason: str, count: int) -> str:
    return f'perksync_undelivered_items{{product="{product}",reason="{reason}"}} {count:.1f}'


@in_world
async def test_items_reaching_no_server_are_warned_once_per_run_and_counted(
    world: LocalWorld, clock: ManualClock
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="rae")
    world.add_item(token, "vip")
    world.add_item(token, "crate")
    offline, _ = world.add_customer(platform="none", name="sol")
    world.add_item(offline, "vip")
    port = unused_port()
    world.config({"vip": VIP}, extra={**FAST, "http": {"listen": f"127.0.0.1:{port}"}})

    def warned(text: str) -> int:
        return sum("WARNING" in line and text in line for line in world.service_log().splitlines())

    def beat() -> None:  # the heartbeat checks at its next tick, once an interval is over
        clock.advance(HEARTBEAT_MAX)

    async with aiohttp.ClientSession() as http:

        async def gauge(product: str, reason: str, count: int) -> bool:
            wanted = undelivered_gauge(product, reason, count)
            return wanted in (await get(http, port, "/metrics"))[1]

        async with world.service(clock) as first:
            await until(lambda: warned("product crate: 1 live item") == 1, meanwhile=beat)
            await until(lambda: warned("product vip: 1 live item of customer") == 1, meanwhile=beat)
            await until(lambda: gauge("crate", "unmapped", 1), meanwhile=beat)
            assert await gauge("vip", "missing_id", 1)
            # More of the same product is counted, not warned again; a new one is warned.
            world.add_item(token, "crate")
            await first.poll()
            await until(lambda: gauge("crate", "unmapped", 2), meanwhile=beat)
            world.add_item(token, "gem")
            await first.poll()
            await until(lambda: warned("product gem:") == 1, meanwhile=beat)
            assert warned("product crate:") == 1 and warned("product vip:") == 1
            assert await first.stop() == 0

        # A restart with the same answers (not diffed again): warned at once, counted.
        async with world.service(clock):
            await until(lambda: warned("product crate: 2 live items") == 1)
            await until(lambda: warned("product gem:") == 2 and warned("product vip:") == 2)
            await until(lambda: gauge("crate", "unmapped", 2))
            assert await gauge("gem", "unmapped", 1)
            assert await gauge("vip", "missing_id", 1)


@in_world
async def test_interval_summary_counts_polls_and_shows_what_is_pending(
    world: LocalWorld, clock: ManualClock
) -> None:
    tokens = [world.add_customer(platform="minecraft")[0] for _ in range(3)]
    for token in tokens:
        world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    await world.rcon["survival"].go_down()
    world.verbose = True  # every summary line, busy or not
    line = re.compile(r"last interval: (\d+) polls \(0 failed\), .*, 3 pending \(survival: 3\)")
    async with world.service(clock) as running:
        await running.poll()
        await until(
            lambda: line.search(world.service_log()) is not None,
            meanwhile=lambda: clock.advance(HEARTBEAT_MAX),
        )
        assert "customers polled" not in world.service_log()
        status = await asyncio.to_thread(world.run_cli, "status")
        assert "survival: 3 pending" in status.stdout
