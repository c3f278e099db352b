"""sd_notify(3) without libsystemd: tell systemd we are ready, alive, reloading, stopping.

Every function sends one datagram to `$NOTIFY_SOCKET` (a path, or an abstract
socket written `@name`) and returns True when it was sent; without
`$NOTIFY_SOCKET` (not started by systemd with Type=notify) it does nothing and
returns False. Socket errors are logged at debug level and never raised: a
notification is never worth crashing the service for.

`watchdog_interval()` reads `$WATCHDOG_USEC` (set by WatchdogSec=); ping with
`watchdog()` at about half of it.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("perksync.notify")

# A send blocks at most this long (systemd stuck): better drop a ping than freeze the loop.
SEND_TIMEOUT_SECONDS = 1.0


def _address() -> str | bytes | None:
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # Linux abstract namespace
    if raw.startswith("/"):
        return raw
    # e.g. "vsock:2:1234" (systemd ≥ 253 inside VMs): not supported here.
    log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying", raw)
    return None


def _clean(line: str) -> str:
    # One assignment per line: a newline in a STATUS text must not forge another one.
    return "".join(ch if ch.isprintable() else " " for ch in line)


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=…") as one notification."""
    address = _address()
    if address is None or not lines:
        return False
    payload = "\n".join(_clean(line) for line in lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Start-up is complete (Type=notify: systemd considers the unit started now)."""
    lines = ["READY=1"]
    if status_text is not None:
        lines.append(f"STATUS={status_text}")
    return notify(*lines)


def status(text: str) -> bool:
    """The one-line status `systemctl status` shows."""
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    """Still alive (WatchdogSec=)."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """Shutdown has begun."""
    lines = ["STOPPING=1"]
    if status_text is not None:
        lines.append(f"STATUS={status_text}")
    return notify(*lines)


def reloading(status_text: str | None = None) -> bool:
    """A configuration reload has begun; send `ready()` when it is done.

    MONOTONIC_USEC makes this valid for Type=notify-reload (systemd ≥ 253) too.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
    if status_text is not None:
        lines.append(f"STATUS={status_text}")
    return notify(*lines)


def watchdog_interval() -> float | None:
    """Seconds of WatchdogSec= for this process, or None when no watchdog is set
    (unset, malformed, zero, or `$WATCHDOG_PID` naming another process)."""
    raw = os.environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and _int(pid) != os.getpid():
        log.debug("WATCHDOG_PID %r is not this process; no watchdog", pid)
        return None
    usec = _int(raw)
    if usec is None or usec <= 0:
        log.debug("WATCHDOG_USEC %r is not a positive integer; no watchdog", raw)
        return None
    return usec / 1_000_000


def _int(text: str) -> int | None:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text)


__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]
