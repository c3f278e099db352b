"""sd_notify: datagrams really arrive on path and abstract sockets; WATCHDOG_USEC parsing."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import notify


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    folder = tmp_path
    if len(str(folder)) > 90:  # AF_UNIX paths end at 108 bytes; a long $TMPDIR breaks that
        folder = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    path = folder / "notify.sock"
    sock = _receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    path.unlink()
    if folder != tmp_path:
        folder.rmdir()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def test_ready_status_watchdog_arrive_on_a_path_socket(path_socket: socket.socket) -> None:
    assert notify.ready() is True
    assert received(path_socket) == ["READY=1"]
    assert notify.status("10 customers, 0 pending") is True
    assert received(path_socket) == ["STATUS=10 customers, 0 pending"]
    assert notify.watchdog() is True
    assert received(path_socket) == ["WATCHDOG=1"]
    assert notify.ready("started") is True
    assert received(path_socket) == ["READY=1", "STATUS=started"]
    assert notify.stopping("stopping: finishing 1 command") is True
    assert received(path_socket) == ["STOPPING=1", "STATUS=stopping: finishing 1 command"]
    assert notify.notify("A=1", "B=2") is True
    assert received(path_socket) == ["A=1", "B=2"]


def test_reloading_carries_monotonic_usec(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(path_socket)
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after


def test_a_newline_in_a_status_cannot_forge_another_assignment(
    path_socket: socket.socket,
) -> None:
    assert notify.status("bad\nREADY=1") is True
    assert received(path_socket) == ["STATUS=bad READY=1"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"perksync-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = _receiver(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert received(sock) == ["READY=1"]
        assert notify.watchdog() is True
        assert received(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.status("x") is False
    assert notify.watchdog() is False
    assert notify.stopping() is False
    assert notify.reloading() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify.notify("READY=1") is False


def test_nothing_to_send_is_not_sent(path_socket: socket.socket) -> None:
    assert notify.notify() is False
    path_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        path_socket.recv(100)


@pytest.mark.parametrize("where", ["missing", "not-a-socket", "vsock"])
def test_socket_errors_are_swallowed(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "missing":
        target = str(tmp_path / "nobody-listens.sock")
    elif where == "not-a-socket":
        (tmp_path / "file").write_text("x")
        target = str(tmp_path / "file")
    else:
        target = "vsock:2:1234"
    monkeypatch.setenv("NOTIFY_SOCKET", target)
    assert notify.ready() is False
    assert notify.watchdog() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("60000000", "self", 60.0),
        ("1500000", "self", 1.5),
        ("30000000", "other", None),  # WATCHDOG_PID names another process (e.g. our parent)
        ("30000000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("abc", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert notify.watchdog_interval() == expected
