"""Stop and reload requests that arrive while the service is starting.

Until the service's event loop handles SIGTERM, SIGINT and SIGHUP itself,
their default actions would end the process half-way through start-up:
SIGTERM and SIGHUP kill it (systemd records a failure, not a clean stop) and
SIGINT raises KeyboardInterrupt wherever it lands. From the start of service
mode, `hold()` makes them only noted; once the loop's own handlers are in
place the service `take()`s what was noted and honours it: a stop ends it
before anything ran (exit 0), a reload re-reads config.yaml once it runs
(the file may have changed after start-up read it).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from types import FrameType

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Requests:
    stop: signal.Signals | None = None  # the first SIGTERM or SIGINT
    reload: bool = False  # a SIGHUP


_noted = Requests()


def _note(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGHUP:
        _noted.reload = True
    elif _noted.stop is None:
        _noted.stop = signal.Signals(signum)


def hold() -> None:
    """Note SIGTERM, SIGINT and SIGHUP from now on instead of acting on them.

    Python runs signal handlers in the main thread only, so call it there."""
    for signum in HELD:
        signal.signal(signum, _note)


def take() -> Requests:
    """What arrived since `hold()`, forgotten once taken. Call it after the
    event loop's handlers are installed, so that no signal falls in between."""
    global _noted
    taken, _noted = _noted, Requests()
    return taken


__all__ = ["HELD", "Requests", "hold", "take"]
