"""Service mode (plain `perksync`) as a subprocess, where the process is the point.

SIGTERM finishing the command in flight, kill -9 at random moments, SIGTERM,
SIGINT and SIGHUP during start-up, SIGHUP and the systemd notifications of a
running service, the state lock refusing a second delivering process. What
the service does inside one process is tested in-process (test_service.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.world import RCON_PASSWORD, World
from tests.test_service import FAST, VIP, grant


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
        # SIGHUP: the config is read again, between RELOADING=1 and READY=1.
        proc.send_signal(signal.SIGHUP)
        while "RELOADING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        while "READY=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert "config reloaded" in world.service_log()
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(timeout=10) == 0
    finally:
        sock.close()
