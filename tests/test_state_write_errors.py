"""A state database that cannot be written (disk full, read-only, I/O error).

perksync stops at the first failed write with one line naming the database
and the error, and sends nothing it could not record first: a command is
sent only after its attempt is stored, so with the disk gone nothing goes
out; a command whose delivery cannot be recorded stays pending and is the
one sent again later.

The failure is made real, for root too, with the file size limit
(RLIMIT_FSIZE): the kernel then refuses every write past that size, and
SQLite fails exactly as on a full disk. The limit is set by a launcher before
perksync starts, or on the running process with prlimit(2). The test keeps a
connection of its own open so that the database's -wal and -shm files already
exist: perksync then opens the file, reads and polls, and only its writes fail.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.world import RCON_PASSWORD, World

pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit(2)")

VIP = {"on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"]}
LIMIT = 1024  # bytes: the lock file's pid fits, no database page does

# Sets the file size limit, then runs perksync in its place.
LAUNCH = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


def grant(world: World, token: str, item: str) -> str:
    uuid = world.paynow.customer(token)["minecraft_uuid"]
    return f"lp user {uuid} parent add vip {item}"


def the_error_line(output: str, db: Path) -> str:
    """The one ERROR line of a run stopped by the database; no traceback."""
    assert "Traceback" not in output, output
    assert RCON_PASSWORD not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert f"cannot write the state database {db}: " in errors[0]
    assert errors[0].endswith("stopped: nothing more is polled or sent until it can be written")
    return errors[0]


def sync_on_a_full_disk(world: World) -> subprocess.CompletedProcess[str]:
    """`perksync --sync-now` under the file size limit."""
    # A connection of the test's own keeps the -wal and -shm files in place.
    holder = sqlite3.connect(world.folder / "state.sqlite3")
    try:
        holder.execute("SELECT count(*) FROM journal").fetchone()
        return subprocess.run(
            [sys.executable, "-c", LAUNCH, str(LIMIT), *world.cli_command("--sync-now")[1:]],
            env=world.cli_env(),
            cwd=world.folder,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        holder.close()


def delivered(db: Path) -> int:
    """Journal rows recorded as delivered (read by a connection of the test's own)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(
            conn.execute("SELECT count(*) FROM journal WHERE status = 'delivered'").fetchone()[0]
        )


def start(world: World, *args: str) -> subprocess.Popen[str]:
    """perksync ARGS, its output kept in pipes (a log file would be cut off by the limit)."""
    return subprocess.Popen(
        world.cli_command(*args),
        env=world.cli_env(),
        cwd=world.folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sync_now_stops_at_the_first_write_and_sends_nothing(world: World) -> None:
    db = world.folder / "state.sqlite3"
    tokens = [world.add_customer(platform="minecraft")[0] for _ in range(3)]
    first = world.add_item(tokens[0], "vip")
    world.config({"vip": VIP}, extra={"sync": {"concurrency": 1}})
    assert world.run_cli("--sync-now").returncode == 0
    assert world.received("survival") == [grant(world, tokens[0], first)]
    new = {token: world.add_item(token, "vip") for token in tokens}
    polled_before = {t: world.sync(world.paynow.count, None, t) for t in tokens}

    result = sync_on_a_full_disk(world)
    assert result.returncode == 1, result.stderr
    the_error_line(result.stderr, db)
    assert world.received("survival") == [grant(world, tokens[0], first)]
    # One customer at a time: the first one's commit failed, the others were never polled.
    polled = [t for t in tokens if world.sync(world.paynow.count, None, t) > polled_before[t]]
    assert polled == tokens[:1]

    # The disk is back: everything goes out, once.
    assert world.run_cli("--sync-now").returncode == 0
    received = world.received("survival")
    assert sorted(received) == sorted(
        [grant(world, tokens[0], first)] + [grant(world, t, i) for t, i in new.items()]
    )


def test_pending_commands_are_not_sent_when_their_attempt_cannot_be_recorded(
    world: World,
) -> None:
    db = world.folder / "state.sqlite3"
    token, _ = world.add_customer(platform="minecraft")
    items = [world.add_item(token, "vip") for _ in range(2)]
    world.config({"vip": VIP})
    world.call(world.rcon["survival"].go_down())
    assert world.run_cli("--sync-now").returncode == 3  # journaled, pending
    world.call(world.rcon["survival"].come_up())

    result = sync_on_a_full_disk(world)
    assert result.returncode == 1, result.stderr
    the_error_line(result.stderr, db)
    assert world.received("survival") == []

    assert world.run_cli("--sync-now").returncode == 0
    assert world.received("survival") == [grant(world, token, i) for i in items]


def on_first_command(world: World, action: Callable[[], None]) -> None:
    """Run `action` when the game server receives its first command, before it answers."""
    server = world.rcon["survival"]

    def hook(command: str) -> None:
        server.on_command = None
        action()

    world.sync(setattr, server, "on_command", hook)


def disk_full(pid: int) -> Callable[[], None]:
    """What fills the disk under the running process `pid`."""

    def fill() -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))

    return fill


def test_a_delivery_that_cannot_be_recorded_stops_and_is_the_one_sent_again(
    world: World,
) -> None:
    db = world.folder / "state.sqlite3"
    token, _ = world.add_customer(platform="minecraft")
    items = [world.add_item(token, "vip") for _ in range(3)]
    world.config({"vip": VIP})
    proc = start(world, "--sync-now")
    # The server runs the first command; before it answers, the disk fills up.
    on_first_command(world, disk_full(proc.pid))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    the_error_line(stderr, db)
    commands = [grant(world, token, i) for i in items]
    assert world.received("survival") == commands[:1]

    assert world.run_cli("--sync-now").returncode == 0
    # The one in flight when the disk failed is sent again; the others once.
    assert world.received("survival") == [commands[0], *commands]


def test_the_service_stops_with_one_line_and_resumes_after_a_restart(world: World) -> None:
    db = world.folder / "state.sqlite3"
    token, _ = world.add_customer(platform="minecraft")
    first = world.add_item(token, "vip")
    world.config({"vip": VIP}, extra={"sync": {"interval_seconds": 1}})
    proc = start(world)
    try:
        deadline = time.monotonic() + 30
        while delivered(db) < 1:  # recorded, not only received: no delivery in flight
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        disk_full(proc.pid)()
        second = world.add_item(token, "vip")
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr  # systemd restarts it (Restart=on-failure)
    the_error_line(stderr, db)
    assert world.received("survival") == [grant(world, token, first)]

    restarted = world.start_service()
    try:
        deadline = time.monotonic() + 30
        while len(world.received("survival")) < 2:
            assert time.monotonic() < deadline and restarted.poll() is None, world.service_log()
            time.sleep(0.05)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=15) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
            restarted.wait()
    assert world.received("survival") == [grant(world, token, first), grant(world, token, second)]
    assert "Traceback" not in world.service_log()
