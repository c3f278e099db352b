"""Delivery: the journal's pending rows to the game servers.

One `ServerWorker` per server delivers that server's pending rows in id
order (older leftovers first, since ids only grow) over one connection, one
command in flight. A row is marked attempted before its command is sent and
delivered after the server answered, so a crash repeats at most the command
in flight. A server that cannot be reached keeps its rows pending.

Which `GameServer` a worker talks to comes from a server factory: the real
platform class (`adapters.PLATFORMS`), or `DryRunServer`, which prints each
command instead of sending it (`--sync-now --dry-run`, on a throw-away copy
of the state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import ClassVar

from adapters import PLATFORMS
from adapters.base import CommandTooLong, GameServer, RconAuthError, RconError
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import Settings
from daemon.placeholders import printable
from daemon.report import PassReport
from daemon.state import JournalRow, Store, StoreWriteError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

ServerFactory = Callable[[str], GameServer]


class DryRunServer:
    """A `GameServer` that prints `server: command` lines and sends nothing."""

    platform: ClassVar[str] = "dry-run"
    routing_field: ClassVar[str] = ""
    max_command_bytes: ClassVar[int] = 1 << 20
    forbidden_in_values: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, output: Callable[[str], None]) -> None:
        self.name = name
        self._output = output

    async def connect(self) -> None:
        pass

    async def run(self, command: str) -> str:
        self._output(f"{self.name}: {command}")
        return ""

    async def close(self) -> None:
        pass


def make_server_factory(
    settings: Settings, *, dry_run_output: Callable[[str], None] | None = None
) -> ServerFactory:
    """Name → a new `GameServer` for that server of `settings`: the platform's
    class, or a `DryRunServer` printing through `dry_run_output`."""

    def factory(name: str) -> GameServer:
        if dry_run_output is not None:
            return DryRunServer(name, dry_run_output)
        spec = settings.servers[name]
        return PLATFORMS[spec.platform](
            name, spec.host, spec.port, spec.secret.get_secret_value(), timeout=spec.timeout_seconds
        )

    return factory


class Wakers:
    """One wake-up per server: journaling pending rows rings its bell."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, server: str) -> asyncio.Event:
        return self._events.setdefault(server, asyncio.Event())

    def ring(self, server: str) -> None:
        event = self._events.get(server)
        if event is not None:
            event.set()

    def drop(self, server: str) -> None:
        self._events.pop(server, None)


class ServerWorker:
    """Delivers one server's pending journal rows, in id order, over one connection."""

    def __init__(
        self,
        name: str,
        store: Store,
        server_factory: ServerFactory,
        *,
        wakers: Wakers,
        clock: Clock,
        report: PassReport,
        telemetry: Telemetry,
        names: dict[str, str],
    ) -> None:
        self.name = name
        self.store = store
        self.server_factory = server_factory
        self.wake = wakers.event(name)
        self.clock = clock
        self.report = report
        self.telemetry = telemetry
        self.names = names  # customer id → how log lines name it
        self.server: GameServer | None = None
        self.last_error: str | None = None
        self.auth_refused = False

    async def deliver_available(self, stopping: asyncio.Event | None = None) -> bool:
        """Deliver every row pending now; False if the server failed (rows stay pending).

        Stops between two commands (never in the middle of one) once `stopping` is set.
        """
        while True:
            rows = await self.store.pending(self.name)
            if not rows:
                self.telemetry.backlog(self.name, 0)
                return True
            for row in rows:
                if stopping is not None and stopping.is_set():
                    return True
                if not await self._send(row):
                    return False

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.close()

    async def _connect(self) -> GameServer | None:
        server = self.server_factory(self.name)
        try:
            await server.connect()
        except RconError as exc:
            self.auth_refused = isinstance(exc, RconAuthError)
            reason = f"password refused ({exc})" if self.auth_refused else str(exc)
            self._failed(reason)
            await server.close()
            return None
        self.auth_refused = False
        return server

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.error("server %s: %s; its commands stay pending", self.name, reason)
        self.last_error = reason
        self.report.unreachable[self.name] = reason
        self.telemetry.delivery_failed(self.name, reason)

    async def _send(self, row: JournalRow) -> bool:
        """Deliver one row; False when the server is unusable for now."""
        if self.server is None:
            self.server = await self._connect()
            if self.server is None:
                return False
        who = self.names.get(row.customer_id, row.customer_id)
        await self.store.mark_attempt(row.id)
        try:
            reply = await self.server.run(row.command)
        except CommandTooLong as exc:
            await self.store.mark_failed(row.id, str(exc), self.clock.now())
            self.report.failed[self.name] += 1
            self.telemetry.command_finished(self.name, "failed")
            log.error("refused server=%s customer=%s: %s", self.name, who, exc)
            return True
        except RconError as exc:
            # The command may or may not have run; it stays pending and is sent
            # again later (the one in flight when the link broke).
            await self.close()
            self._failed(f"{exc} while sending journal row {row.id}")
            return False
        if self.last_error is not None:
            log.info("server %s: delivering again", self.name)
            self.last_error = None
        await self.store.mark_delivered(row.id, self.clock.now())
        self.report.delivered[self.name] += 1
        self.report.unreachable.pop(self.name, None)
        self.telemetry.command_finished(self.name, "delivered")
        log.info(
            "delivered server=%s customer=%s product=%s event=%s: %s",
            self.name, who, row.product, row.event, row.command,
        )  # fmt: skip
        if reply.strip():
            log.debug("server %s replied: %s", self.name, printable(reply.strip(), 500))
        return True


# The service's retry pacing of a server that failed.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # server down: 1 s, 2 s, 4 s … 60 s
AUTH_BACKOFF_FIRST, AUTH_BACKOFF_MAX = 30.0, 600.0  # wrong password: SRCDS bans retry storms
IDLE_CLOSE = 30.0  # close an idle RCON connection after this many seconds


async def deliver_forever(worker: ServerWorker, stopping: asyncio.Event) -> None:
    """The service's delivery to one server until `stopping`: every pending row
    as soon as it is journaled; after a failure, again after a capped
    exponential backoff (longer when the password was refused); the
    connection closed after `IDLE_CLOSE` seconds without work.

    A `StoreWriteError` is raised: a row whose attempt cannot be recorded is
    never sent, and nothing more can be."""
    backoff = 0.0
    while not stopping.is_set():
        worker.wake.clear()
        try:
            ok = await worker.deliver_available(stopping)
        except StoreWriteError:
            raise
        except Exception:
            log.exception("server %s: unexpected delivery error", worker.name)
            ok = False
        if stopping.is_set():
            return
        if ok:
            backoff = 0.0
            if not await wait_any(worker.wake, stopping, within=IDLE_CLOSE, clock=worker.clock):
                await worker.close()  # idle: let the server forget us
                await wait_any(worker.wake, stopping)
            continue
        first, cap = (
            (AUTH_BACKOFF_FIRST, AUTH_BACKOFF_MAX)
            if worker.auth_refused
            else (BACKOFF_FIRST, BACKOFF_MAX)
        )
        backoff = min(cap, max(first, backoff * 2))
        # Jitter so that several perksyncs do not knock in step.
        delay = backoff * random.uniform(0.8, 1.0)
        log.debug("server %s: next attempt in %.1fs", worker.name, delay)
        await wait_any(stopping, within=delay, clock=worker.clock)


async def wait_any(
    *events: asyncio.Event, within: float | None = None, clock: Clock = SYSTEM_CLOCK
) -> bool:
    """Wait until one of the events is set; False when `within` seconds of
    `clock` passed first."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    timers = [] if within is None else [asyncio.create_task(clock.sleep(within))]
    try:
        done, _ = await asyncio.wait([*waiters, *timers], return_when=asyncio.FIRST_COMPLETED)
        return any(waiter in done for waiter in waiters)
    finally:
        for task in (*waiters, *timers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, *timers, return_exceptions=True)
