"""Start-up problems of the machine, as an operator meets them.

A state folder that is missing, not a folder or not writable, state files
another user owns, an emptied state database, an `http.listen` address in
use: each is one line naming the key and the path or address, exit status 2
(the systemd unit does not restart on it), and nothing is contacted.
`--check-config` finds the same problems.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.rcon_server import unused_port
from tests.fakes.world import REPO, World

VIP = {"on_active": ["lp user {customer.minecraft_uuid} parent add vip"]}
MODES = {"sync": ("--sync-now",), "service": (), "check": ("--check-config",)}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


def configure(world: World, state_db: Path, listen: str | None = None) -> str:
    """One customer with one active item; returns the command it grants."""
    token, customer = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    extra: dict[str, Any] = {"sync": {"state_db": str(state_db)}}
    if listen is not None:
        extra["http"] = {"listen": listen}
    world.config({"vip": VIP}, extra=extra)
    return f"lp user {customer['minecraft_uuid']} parent add vip"


def nothing_contacted(world: World) -> bool:
    return (
        world.sync(world.paynow.count) == 0
        and world.sync(lambda: world.rcon["survival"].connections_accepted) == 0
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a start refused with exit status 2."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


# --- the state folder ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_state_folder(world: World, mode: str) -> None:
    folder = world.folder / "var-lib-perksync"
    configure(world, folder / "state.sqlite3")
    line = refused(world.run_cli(*MODES[mode]))
    assert line == (
        f"perksync: sync.state_db: the folder {folder} does not exist; create it for the user "
        f"perksync runs as, e.g. install -d -m 0700 -o {runner_name([])} {folder}"
    )
    assert not folder.exists()  # not made behind the operator's back
    assert nothing_contacted(world)


@pytest.mark.parametrize("mode", MODES)
def test_a_file_in_place_of_the_state_folder(world: World, mode: str) -> None:
    (world.folder / "state").write_text("")
    configure(world, world.folder / "state" / "state.sqlite3")
    line = refused(world.run_cli(*MODES[mode]))
    assert line == f"perksync: sync.state_db: {world.folder / 'state'} is not a folder"
    assert nothing_contacted(world)


@pytest.mark.parametrize("mode", MODES)
def test_a_lock_file_that_cannot_be_written(world: World, mode: str) -> None:
    # A folder where the lock file belongs: not even root can open it for writing.
    (world.folder / "state.sqlite3.lock").mkdir()
    configure(world, world.folder / "state.sqlite3")
    line = refused(world.run_cli(*MODES[mode]))
    assert line == f"perksync: sync.state_db: {world.folder / 'state.sqlite3.lock'} is not a file"
    assert nothing_contacted(world)


@pytest.mark.parametrize("mode", MODES)
def test_an_emptied_state_database_is_refused(world: World, mode: str) -> None:
    db = world.folder / "state.sqlite3"
    grant = configure(world, db)
    assert world.run_cli("--sync-now").returncode == 0
    assert world.received("survival") == [grant]
    db.write_bytes(b"")  # emptied: the perk above must not be granted again
    contacts = world.sync(world.paynow.count)
    line = refused(world.run_cli(*MODES[mode]))
    assert line == (
        f"perksync: sync.state_db: the state database {db} is an empty file: refusing to "
        "take it for a new one, which would send every perk already delivered again; "
        "restore it from a backup, or delete it to start afresh"
    )
    assert db.read_bytes() == b""
    assert world.sync(world.paynow.count) == contacts
    assert world.received("survival") == [grant]


# --- permissions: run as a user the folder's modes really bind ----------------------


@pytest.fixture
def shared_world() -> Iterator[World]:
    """A world in a folder other users can read (pytest's own are private)."""
    folder = Path(tempfile.mkdtemp(prefix="perksync-setup-"))
    folder.chmod(0o755)
    try:
        with World(folder, {"survival": "minecraft"}) as w:
            yield w
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def unprivileged() -> list[str]:
    """A command prefix that runs perksync as a user file modes bind: nothing
    (this user), or setpriv to user nobody when the tests run as root."""
    if os.geteuid() != 0:
        return []
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root, and there is no user nobody to run perksync as")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and setpriv (util-linux) is not installed")
    prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import daemon.cli"],
        env={"PYTHONPATH": str(REPO)},
        cwd="/",
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("running as root, and user nobody cannot run this checkout")
    return prefix


def run_as(world: World, prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *world.cli_command(*args)],
        env=world.cli_env(),
        cwd=world.folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def runner_name(prefix: list[str]) -> str:
    return "nobody" if prefix else pwd.getpwuid(os.geteuid()).pw_name


@pytest.mark.parametrize("mode", MODES)
def test_a_state_folder_the_user_cannot_write(
    shared_world: World, unprivileged: list[str], mode: str
) -> None:
    folder = shared_world.folder / "state"
    folder.mkdir(mode=0o755)
    if not unprivileged:
        folder.chmod(0o555)
    configure(shared_world, folder / "state.sqlite3")
    try:
        line = refused(run_as(shared_world, unprivileged, *MODES[mode]))
    finally:
        folder.chmod(0o755)
    assert line.startswith(
        f"perksync: sync.state_db: the folder {folder} is not writable by user "
        f"{runner_name(unprivileged)} (owner "
    )
    assert list(folder.iterdir()) == []
    assert nothing_contacted(shared_world)


@pytest.mark.parametrize("mode", MODES)
def test_state_files_left_by_another_user(
    shared_world: World, unprivileged: list[str], mode: str
) -> None:
    """The usual trap: `sudo perksync --sync-now` once, then the service's own user."""
    folder = shared_world.folder / "state"
    folder.mkdir()
    folder.chmod(0o777)  # writable by the runner: only the files are in the way
    db, lock = folder / "state.sqlite3", folder / "state.sqlite3.lock"
    configure(shared_world, db)
    assert shared_world.run_cli("--sync-now").returncode == 0  # made by this user, 0600
    if not unprivileged:
        db.chmod(0o400)
        lock.chmod(0o400)
    contacts = shared_world.sync(shared_world.paynow.count)
    result = run_as(shared_world, unprivileged, *MODES[mode])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    user = runner_name(unprivileged)
    lines = result.stderr.strip().splitlines()
    assert [line.split(" (owner ")[0] for line in lines] == [
        f"perksync: sync.state_db: {db} is not writable by user {user}",
        f"perksync: sync.state_db: {lock} is not writable by user {user}",
    ]
    assert all(line.endswith(f"chown -R {user} {folder}") for line in lines)
    assert shared_world.sync(shared_world.paynow.count) == contacts


# --- http.listen -------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_a_listen_address_in_use_stops_the_service_before_any_poll(
    world: World, busy_port: int
) -> None:
    configure(world, world.folder / "state.sqlite3", listen=f"127.0.0.1:{busy_port}")
    assert world.run_cli("--sync-now").returncode == 0  # --sync-now does not listen
    contacts = world.sync(world.paynow.count)
    for mode in ("service", "check"):
        line = refused(world.run_cli(*MODES[mode]))
        assert line == (
            f"perksync: http.listen 127.0.0.1:{busy_port}: cannot listen there: address "
            "already in use; something else listens there: stop it, or choose another port"
        )
    assert world.sync(world.paynow.count) == contacts  # the service polled nobody


def test_check_config_accepts_the_address_the_running_service_listens_on(
    world: World,
) -> None:
    port = unused_port()
    configure(world, world.folder / "state.sqlite3", listen=f"127.0.0.1:{port}")
    service = world.start_service()
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while not healthy():
            assert time.monotonic() < deadline and service.poll() is None, world.service_log()
            time.sleep(0.05)
        result = world.run_cli("--check-config")
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=15) == 0
    assert "Traceback" not in world.service_log()
