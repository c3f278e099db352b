"""Service mode (plain `perksync`) as a subprocess against the loopback fakes.

SIGTERM, SIGHUP with good and bad configs, kill -9 at random moments, a server
down then back, the API down then back, local expiry with the API down, a new
activation reaching the server within one interval, systemd notifications.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.paynow_api import iso
from tests.fakes.world import RCON_PASSWORD, World

VIP: dict[str, Any] = {
    "on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"],
    "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
    "on_revoke": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
}
FAST = {"sync": {"interval_seconds": 1, "expiry_grace_seconds": 0}}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


@pytest.fixture
def services(world: World) -> Iterator[list[subprocess.Popen[str]]]:
    """Started services are killed at the end of the test, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = world.service_log()
    assert "Traceback" not in log, log
    assert RCON_PASSWORD not in log
    for token in world.tokens:
        assert token not in log


def start(world: World, services: list[subprocess.Popen[str]], **env: str) -> subprocess.Popen[str]:
    proc = world.start_service(env=env)
    services.append(proc)
    return proc


class NotifySocket:
    """A $NOTIFY_SOCKET as systemd gives one: a test waits for READY=1 on it
    before it signals a service, as systemd does before it counts it started."""

    def __init__(self) -> None:
        # AF_UNIX paths end at 108 bytes: a short folder, whatever $TMPDIR is.
        self.folder = tempfile.mkdtemp(prefix="ps-", dir="/tmp")
        self.path = os.path.join(self.folder, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                lines = self.sock.recv(65536).decode().split("\n")
            except TimeoutError:
                return False
            if "READY=1" in lines:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def token_fifo(world: World) -> Path:
    """Turn the first customer's token file into a FIFO: a service reading its
    config then blocks on it until the test feeds it, at a known point of start-up."""
    fifo = world.folder / "secrets" / "token0"
    fifo.unlink()
    os.mkfifo(fifo)
    return fifo


def open_when_read(fifo: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
    """The write end of `fifo`, once `proc` has opened it for reading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                raise
        time.sleep(0.01)
    raise AssertionError(f"perksync never read {fifo.name} (exit status {proc.poll()})")


def feed(writer: int, text: str) -> None:
    with contextlib.suppress(BrokenPipeError):  # the reader died: the test fails on its status
        os.write(writer, text.encode())
    os.close(writer)


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def grant(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent add vip {item}"


def remove(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent remove vip {item}"


def test_new_activation_reaches_the_server_within_one_interval(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    first = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra={"sync": {"interval_seconds": 2}})
    start(world, services)
    assert wait_until(lambda: world.received("survival") == [grant(world, token, first)])
    second = world.add_item(token, "vip")
    added = time.monotonic()
    assert wait_until(lambda: grant(world, token, second) in world.received("survival"))
    # One interval (2 s) plus jitter (0.2 s) plus a little slack for a busy machine.
    assert time.monotonic() - added < 2 + 0.2 + 1.5
    assert world.received("survival") == [grant(world, token, first), grant(world, token, second)]


def test_sigterm_finishes_the_command_in_flight_and_exits_0(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    items = [world.add_item(token, "vip") for _ in range(6)]
    world.config({"vip": VIP}, extra=FAST)
    world.sync(setattr, world.rcon["survival"], "latency", 0.8)
    proc = start(world, services)
    assert wait_until(lambda: len(world.received("survival")) >= 1)
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - sent_at < 10
    assert "perksync stopped" in world.service_log()
    delivered_before = len(world.received("survival"))
    assert delivered_before < len(items)
    # The rest is delivered by the next run; nothing twice (the stop was clean).
    world.sync(setattr, world.rcon["survival"], "latency", 0.0)
    result = world.run_cli("--sync-now")
    assert result.returncode == 0, result.stderr
    assert sorted(world.received("survival")) == sorted(grant(world, token, i) for i in items)


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, customer = world.add_customer(platform="minecraft", name="hugo")
    vip = world.add_item(token, "vip")
    world.add_item(token, "kit")
    world.config({"vip": VIP}, extra=FAST)
    proc = start(world, services)
    assert wait_until(lambda: world.received("survival") == [grant(world, token, vip)])

    kit = {"on_active": ["give {customer.name} diamond 1"]}
    world.config({"vip": VIP, "kit": kit}, extra=FAST)
    proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "give hugo diamond 1" in world.received("survival"))
    assert "config reloaded" in world.service_log()

    broken = {"vip": VIP, "kit": {"on_active": ["give {customer.nmae} diamond 1"]}}
    world.config(broken, extra=FAST)
    proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reload rejected" in world.service_log())
    assert "products.kit.on_active[0]: unknown placeholder {customer.nmae}" in world.service_log()
    # Still running on the old config: a new purchase is delivered.
    again = world.add_item(token, "vip")
    assert wait_until(lambda: grant(world, token, again) in world.received("survival"))
    assert proc.poll() is None
    assert world.received("survival").count("give hugo diamond 1") == 1
    assert customer["name"] == "hugo"


def test_server_down_then_back_gets_its_backlog_once(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    items = [world.add_item(token, "vip") for _ in range(3)]
    world.config({"vip": VIP}, extra=FAST)
    world.call(world.rcon["survival"].go_down())
    start(world, services)
    assert wait_until(lambda: "server survival:" in world.service_log())
    time.sleep(2)
    world.call(world.rcon["survival"].come_up())
    expected = sorted(grant(world, token, i) for i in items)
    assert wait_until(lambda: sorted(world.received("survival")) == expected, timeout=20)
    time.sleep(2.5)  # more polls and retries: still exactly once
    assert sorted(world.received("survival")) == expected


def test_api_down_then_back(world: World, services: list[subprocess.Popen[str]]) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    world.sync(world.paynow.fault, None, "status", status=503, times=None)
    start(world, services)
    assert wait_until(lambda: world.sync(world.paynow.count) >= 2)
    assert world.received("survival") == []
    world.sync(world.paynow.clear_faults)
    assert wait_until(lambda: world.received("survival") == [grant(world, token, item)], 30)


def expiring_soon(world: World, token: str, item: str, seconds: float) -> datetime:
    """Move a granted item's expiry to `seconds` from now; return once the
    service has stored it. (An item first seen past its expiry is never
    granted, so the expiry is moved after the grant, however slow the start.)"""
    soon = datetime.now(UTC) + timedelta(seconds=seconds)
    world.sync(world.paynow.update_item, token, item, expires_at=iso(soon))

    def stored() -> bool:
        with contextlib.closing(sqlite3.connect(world.folder / "state.sqlite3")) as db:
            row = db.execute("SELECT expires_at FROM items WHERE item_id = ?", (item,)).fetchone()
        return row is not None and datetime.fromisoformat(row[0]) == soon

    assert wait_until(stored)
    return soon


def test_local_expiry_runs_with_the_api_down_and_never_twice(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip", expirable=True)
    world.config({"vip": VIP}, extra=FAST)
    start(world, services)
    assert wait_until(lambda: world.received("survival") == [grant(world, token, item)])
    soon = expiring_soon(world, token, item, 2)
    world.sync(world.paynow.fault, None, "status", status=503, times=None)
    assert wait_until(lambda: remove(world, token, item) in world.received("survival"))
    assert datetime.now(UTC) >= soon
    assert "expired at" in world.service_log()
    # The API comes back and reports the item used: nothing runs again.
    world.sync(world.paynow.clear_faults)
    world.set_state(token, item, "used")
    time.sleep(3)
    assert world.received("survival") == [grant(world, token, item), remove(world, token, item)]


def test_renewal_after_local_expiry_grants_again_once(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip", expirable=True)
    world.config({"vip": VIP}, extra=FAST)
    start(world, services)
    assert wait_until(lambda: world.received("survival") == [grant(world, token, item)])
    expiring_soon(world, token, item, 1)
    assert wait_until(lambda: remove(world, token, item) in world.received("survival"))
    later = datetime.now(UTC) + timedelta(days=30)
    world.sync(world.paynow.update_item, token, item, expires_at=iso(later))
    expected = [grant(world, token, item), remove(world, token, item), grant(world, token, item)]
    assert wait_until(lambda: world.received("survival") == expected)
    time.sleep(2.5)
    assert world.received("survival") == expected


def test_kill_9_at_random_moments_loses_nothing(
    world: World, services: list[subprocess.Popen[str]], notify_socket: NotifySocket
) -> None:
    rng = random.Random(20261125)
    tokens = [world.add_customer(platform="minecraft")[0] for _ in range(4)]
    items = {t: [world.add_item(t, "vip") for _ in range(15)] for t in tokens}
    world.config({"vip": VIP}, extra=FAST)
    world.sync(setattr, world.rcon["survival"], "latency", 0.02)
    kills = 0
    for _ in range(6):
        proc = start(world, services)
        time.sleep(rng.uniform(0.4, 1.6))
        proc.kill()
        proc.wait()
        kills += 1
    proc = start(world, services, NOTIFY_SOCKET=notify_socket.path)
    expected = {grant(world, t, i) for t in tokens for i in items[t]}
    assert wait_until(lambda: set(world.received("survival")) >= expected, timeout=40)
    # Earlier runs may have delivered everything already: the wait above then
    # returns at once, while the interpreter may still be starting.
    assert notify_socket.wait_ready()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    received = world.received("survival")
    assert set(received) == expected  # nothing lost, nothing invented
    assert len(received) - len(expected) <= kills  # at most one repeat per kill
    # Each customer's grants arrived in journal order (item order) despite the kills.
    for token in tokens:
        own = [c for c in dict.fromkeys(received) if c.startswith(grant(world, token, "")[:-1])]
        assert own == [grant(world, token, i) for i in items[token]]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_start_up_exits_0_and_loses_nothing(
    world: World,
    services: list[subprocess.Popen[str]],
    notify_socket: NotifySocket,
    stop: signal.Signals,
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    item = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    fifo = token_fifo(world)
    proc = start(world, services)
    writer = open_when_read(fifo, proc)
    proc.send_signal(stop)  # while it still reads its config
    feed(writer, token)
    assert proc.wait(timeout=30) == 0
    assert f"{stop.name} during start-up: stopped before anything ran" in world.service_log()
    assert world.received("survival") == []
    # The stop lost nothing: the next start delivers the grant, once.
    fifo.unlink()
    world.config({"vip": VIP}, extra=FAST)
    proc = start(world, services, NOTIFY_SOCKET=notify_socket.path)
    assert notify_socket.wait_ready()
    assert wait_until(lambda: world.received("survival") == [grant(world, token, item)])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert world.received("survival") == [grant(world, token, item)]


def test_sighup_during_start_up_reloads_once_running(
    world: World, services: list[subprocess.Popen[str]], notify_socket: NotifySocket
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="ida")
    vip = world.add_item(token, "vip")
    world.add_item(token, "kit")
    kit = {"on_active": ["give {customer.name} diamond 1"]}
    with_kit = world.config({"vip": VIP, "kit": kit}, extra=FAST).read_text()
    world.config({"vip": VIP}, extra=FAST)
    fifo = token_fifo(world)
    proc = start(world, services, NOTIFY_SOCKET=notify_socket.path)
    writer = open_when_read(fifo, proc)
    # config.yaml changes after start-up read it, and the operator reloads.
    (world.folder / "config.yaml").write_text(with_kit)
    proc.send_signal(signal.SIGHUP)
    feed(writer, token)
    assert notify_socket.wait_ready()
    feed(open_when_read(fifo, proc), token)  # the reload reads the config (and the token) again
    expected = {grant(world, token, vip), "give ida diamond 1"}
    assert wait_until(lambda: set(world.received("survival")) == expected)
    assert "SIGHUP during start-up" in world.service_log()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert sorted(world.received("survival")) == sorted(expected)


def test_rejected_token_is_logged_once(world: World, services: list[subprocess.Popen[str]]) -> None:
    good, _ = world.add_customer(platform="minecraft")
    item = world.add_item(good, "vip")
    bad, _ = world.add_customer(platform="minecraft")
    world.config({"vip": VIP}, extra=FAST)
    world.sync(world.paynow.remove_customer, bad)
    start(world, services)
    assert wait_until(lambda: world.received("survival") == [grant(world, good, item)])
    time.sleep(3)  # three more intervals
    rejected = [
        line for line in world.service_log().splitlines() if "token_file secrets/token1" in line
    ]
    assert len(rejected) == 1, rejected
    assert world.sync(world.paynow.count, None, bad) == 1


def test_second_delivering_process_is_refused(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    proc = start(world, services)
    assert wait_until(lambda: len(world.received("survival")) == 1)
    result = world.run_cli("--sync-now")
    assert result.returncode == 1
    db = world.folder / "state.sqlite3"
    assert f"another perksync (pid {proc.pid}) is using the state database {db}" in result.stderr
    # Waiting would never end when the holder is the service: the message says so.
    assert "if it is the service, stop it first with `systemctl stop perksync`" in result.stderr
    assert "Traceback" not in result.stderr
    assert world.run_cli("status").returncode == 0  # reading is fine


def test_systemd_notifications(
    world: World, services: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        proc = start(world, services, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
        messages: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            any("READY=1" in m for m in messages)
            and sum("WATCHDOG=1" in m for m in messages) >= 2
            and any("STATUS=" in m for m in messages)
        ):
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(timeout=10) == 0
    finally:
        sock.close()


def test_healthz_and_metrics_on_loopback(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    import urllib.request

    from tests.fakes.rcon_server import unused_port

    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    port = unused_port()
    world.config({"vip": VIP}, extra={**FAST, "http": {"listen": f"127.0.0.1:{port}"}})
    start(world, services)
    assert wait_until(lambda: len(world.received("survival")) == 1)

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()

    def delivered_metric() -> bool:
        try:
            return (
                'perksync_commands_total{outcome="delivered",server="survival"} 1.0'
                in get("/metrics")[1]
            )
        except OSError:
            return False

    assert wait_until(delivered_metric)
    assert get("/healthz") == (200, "ok\n")
    metrics = get("/metrics")[1]
    assert "perksync_last_successful_sync_timestamp_seconds{customer=" in metrics
    assert 'perksync_journal_backlog{server="survival"}' in metrics
    assert token not in metrics


def test_unchanged_polls_read_only_the_inventory(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="olga")
    world.add_item(token, "vip")
    kit = {"on_active": ["give {customer.name} diamond 1"]}
    world.config({"vip": VIP, "kit": kit}, extra=FAST)
    start(world, services)
    assert wait_until(lambda: len(world.received("survival")) == 1)
    time.sleep(4)  # four more intervals, nothing changes
    customer_reads = world.sync(world.paynow.count, "customer", token)
    inventory_reads = world.sync(world.paynow.count, "items", token)
    assert inventory_reads >= 4
    assert customer_reads <= 2  # the first poll, perhaps one refresh
    # A change reads the customer again, so commands use its current name.
    world.sync(world.paynow.update_customer, token, name="olga2")
    world.add_item(token, "kit")
    assert wait_until(lambda: "give olga2 diamond 1" in world.received("survival"))


def test_a_restarted_service_trusts_the_stored_digest_unless_the_config_changed(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="pia")
    world.add_item(token, "vip")
    kit = {"on_active": ["give {customer.name} diamond 1"]}
    world.add_item(token, "kit")
    world.config({"vip": VIP}, extra=FAST)
    first = start(world, services)
    assert wait_until(lambda: len(world.received("survival")) == 1)
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0

    # Same config: the first polls after the restart read only the inventory.
    world.sync(world.paynow.reset_counters)
    second = start(world, services)
    assert wait_until(lambda: world.sync(world.paynow.count, "items", token) >= 3)
    assert world.sync(world.paynow.count, "customer", token) == 0
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0

    # A product mapped while it was stopped: the same answers now mean a grant.
    world.config({"vip": VIP, "kit": kit}, extra=FAST)
    start(world, services)
    assert wait_until(lambda: "give pia diamond 1" in world.received("survival"))
    assert len(world.received("survival")) == 2


def test_interval_stretches_to_what_the_rate_limit_allows() -> None:
    from daemon.scheduler import effective_interval

    assert effective_interval(60, 10_000, 20) == pytest.approx(550)
    assert effective_interval(60, 1_000, 20) == 60
    assert effective_interval(60, 10_000, 0) == 60  # no limit


def test_too_many_customers_for_the_rate_limit_is_warned_about(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    extra = {"sync": {"interval_seconds": 1}, "paynow": {"requests_per_second": 0.5}}
    world.config({"vip": VIP}, extra=extra)
    start(world, services)
    assert wait_until(
        lambda: "cannot all be polled every 1s; polling each every 2s" in world.service_log()
    )


# The heartbeat (summary lines, the check of what reaches no server) ticks at
# half the watchdog period: every 0.5 s instead of 10 s.
QUICK_TICKS = {"WATCHDOG_USEC": "1000000"}


def metrics_text(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def undelivered_gauge(product: str, reason: str, count: int) -> str:
    return f'perksync_undelivered_items{{product="{product}",reason="{reason}"}} {count:.1f}'


def test_items_reaching_no_server_are_warned_once_per_run_and_counted(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    from tests.fakes.rcon_server import unused_port

    token, _ = world.add_customer(platform="minecraft", name="rae")
    world.add_item(token, "vip")
    world.add_item(token, "crate")
    offline, _ = world.add_customer(platform="none", name="sol")
    world.add_item(offline, "vip")
    port = unused_port()
    world.config({"vip": VIP}, extra={**FAST, "http": {"listen": f"127.0.0.1:{port}"}})

    def warned(text: str) -> int:
        return sum("WARNING" in line and text in line for line in world.service_log().splitlines())

    first = start(world, services, **QUICK_TICKS)
    assert wait_until(lambda: warned("product crate: 1 live item") == 1)
    assert wait_until(lambda: warned("product vip: 1 live item of customer") == 1)
    assert wait_until(lambda: undelivered_gauge("crate", "unmapped", 1) in metrics_text(port))
    assert undelivered_gauge("vip", "missing_id", 1) in metrics_text(port)
    # More of the same product is counted, not warned again; a new one is warned.
    world.add_item(token, "crate")
    assert wait_until(lambda: undelivered_gauge("crate", "unmapped", 2) in metrics_text(port))
    world.add_item(token, "gem")
    assert wait_until(lambda: warned("product gem:") == 1)
    assert warned("product crate:") == 1 and warned("product vip:") == 1
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0

    # A restart with the same answers (not diffed again): warned at once, counted.
    start(world, services, **QUICK_TICKS)
    assert wait_until(lambda: warned("product crate: 2 live items") == 1)
    assert wait_until(lambda: warned("product gem:") == 2 and warned("product vip:") == 2)
    assert wait_until(lambda: undelivered_gauge("crate", "unmapped", 2) in metrics_text(port))
    assert undelivered_gauge("gem", "unmapped", 1) in metrics_text(port)
    assert undelivered_gauge("vip", "missing_id", 1) in metrics_text(port)


def test_interval_summary_counts_polls_and_shows_what_is_pending(
    world: World, services: list[subprocess.Popen[str]]
) -> None:
    import re

    tokens = [world.add_customer(platform="minecraft")[0] for _ in range(3)]
    for token in tokens:
        world.add_item(token, "vip")
    world.config({"vip": VIP}, extra=FAST)
    world.call(world.rcon["survival"].go_down())
    services.append(world.start_service("-v", env=QUICK_TICKS))  # every summary line, busy or not
    line = re.compile(r"last interval: (\d+) polls \(0 failed\), .*, 3 pending \(survival: 3\)")
    assert wait_until(lambda: line.search(world.service_log()) is not None)
    assert "customers polled" not in world.service_log()
    assert "survival: 3 pending" in world.run_cli("status").stdout
