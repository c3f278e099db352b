"""Delivery: the journal's unfinished rows to the game servers.

One `ServerWorker` per server goes through that server's pending and waiting
rows in id order (older leftovers first, since ids only grow) over one
connection, one command in flight. A row is marked attempted before its
command is sent and finished after the server answered, so a crash repeats
at most the command in flight. A server that cannot be reached keeps its
rows as they are.

A row that cannot be sent yet is marked waiting, with why: an online-only
command while the customer's player is not on the server (judged from the
server's player list, read at most every `presence_seconds` and only while
such a command waits; once in a `--sync-now` pass), a delayed one before its
time, and behind either every later row of the same customer on that server.
Other customers' rows go on. The server's reply is kept with the row: an
error reply rejects the command (never retried; it holds nothing back), and
one saying the player is not there sends an online-only command back to
waiting (see daemon/replies.py, daemon/presence.py).

Which `GameServer` a worker talks to comes from a server factory: the real
platform class (`adapters.PLATFORMS`), or `DryRunServer`, which prints each
command instead of sending it (`--sync-now --dry-run`, on a throw-away copy
of the state), noting those a real pass may hold back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from adapters import PLATFORMS
from adapters.base import CommandTooLong, GameServer, RconAuthError, RconError
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import ServerSettings, Settings
from daemon.fleet.leases import ServerLease
from daemon.placeholders import printable
from daemon.presence import PlayerList, customer_key, player_list
from daemon.replies import ReplyRules, Verdict
from daemon.report import PassReport
from daemon.state import Fence, JournalRow, JournalStatus, LeaseLost, Store, StoreWriteError
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
        self.show(command)
        return ""

    def show(self, command: str, note: str | None = None) -> None:
        """`server: command`, and why a real pass might hold it back."""
        self._output(f"{self.name}: {command}" + (f"  ({note})" if note else ""))

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
    """One wake-up per server: journaling pending rows rings its bell. A
    server without a worker here (another host delivers to it) rings
    `elsewhere`, when set."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.elsewhere: Callable[[str], None] | None = None

    def event(self, server: str) -> asyncio.Event:
        return self._events.setdefault(server, asyncio.Event())

    def ring(self, server: str) -> None:
        event = self._events.get(server)
        if event is not None:
            event.set()
        elif self.elsewhere is not None:
            self.elsewhere(server)

    def drop(self, server: str) -> None:
        self._events.pop(server, None)


# Why a row waits, as its `reason` says (and `perksync status` counts).
WAIT_FOR_PLAYER = "for the player"
WAIT_UNTIL = "until "
WAIT_BEHIND = "behind row "


def waiting_kind(reason: str | None) -> str:
    """ "player", "time" or "behind": what a waiting row's reason says it waits for."""
    if reason is not None and reason.startswith(WAIT_UNTIL):
        return "time"
    if reason is not None and reason.startswith(WAIT_BEHIND):
        return "behind"
    return "player"


def until(moment: datetime) -> str:
    return f"{WAIT_UNTIL}{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True, slots=True)
class ServerRules:
    """What delivery to one server needs of its settings."""

    platform: str
    replies: ReplyRules
    players: PlayerList
    presence_seconds: float

    @classmethod
    def of(cls, server: ServerSettings) -> ServerRules:
        return cls(
            server.platform,
            ReplyRules.of(server.platform, server.error_replies, server.offline_replies),
            player_list(server.platform, server.players_command, server.players_pattern),
            server.presence_seconds,
        )


@dataclass(frozen=True, slots=True)
class Presence:
    """The player list as last read."""

    ids: frozenset[str] | None  # the keys of the players online; None: unreadable
    read_at: float  # monotonic
    problem: str | None = None  # why it could not be read


class _Unusable(Exception):
    """The server cannot be used for now (already logged and counted)."""


@dataclass(slots=True)
class _Scan:
    """What one round through a server's rows learns as it goes."""

    held: dict[str, int] = field(default_factory=dict)  # customer → the row it waits at
    keys: dict[str, str | None] = field(default_factory=dict)  # customer → player key
    wake_at: float | None = None  # monotonic: when a waiting row may be due
    for_player: bool = False  # a row waits for its player

    def due_at(self, moment: float) -> None:
        self.wake_at = moment if self.wake_at is None else min(self.wake_at, moment)


class ServerWorker:
    """Delivers one server's pending and waiting journal rows, in id order, over
    one connection.

    `one_pass` (`--sync-now`): the player list is read at most once, and
    nothing is waited for. `dry_run`: the server is a `DryRunServer`; every
    row is printed, those a real pass may hold back with a note. `lease`
    (several hosts on one database): nothing is sent unless the server's
    lease outlives the command's time, and every attempt is fenced by it;
    `LeaseLost` is raised when it does not (the worker must stop)."""

    def __init__(
        self,
        name: str,
        store: Store,
        server_factory: ServerFactory,
        *,
        rules: ServerRules,
        wakers: Wakers,
        clock: Clock,
        report: PassReport,
        telemetry: Telemetry,
        names: dict[str, str],
        one_pass: bool = False,
        dry_run: bool = False,
        lease: ServerLease | None = None,
    ) -> None:
        self.name = name
        self.lease = lease
        self.store = store
        self.server_factory = server_factory
        self.rules = rules
        self.wake = wakers.event(name)
        self.clock = clock
        self.report = report
        self.telemetry = telemetry
        self.names = names  # customer id → how log lines name it
        self.one_pass = one_pass or dry_run
        self.dry_run = dry_run
        self.server: GameServer | None = None
        self.last_error: str | None = None
        self.auth_refused = False
        self.presence: Presence | None = None
        self.wake_at: float | None = None  # monotonic: when waiting rows may be due
        self._told: str | None = None  # the player-list problem last logged

    def use_rules(self, rules: ServerRules) -> None:
        """A reload changed the server's settings: read its player list afresh."""
        self.rules = rules
        self.presence = None

    def seconds_to_wait(self) -> float | None:
        """Until a waiting row may be due (None: no row waits for a time or a player)."""
        if self.wake_at is None:
            return None
        return max(0.0, self.wake_at - self.clock.monotonic())

    async def deliver_available(self, stopping: asyncio.Event | None = None) -> bool:
        """One round through the server's unfinished rows, in id order: send
        what is due, mark the rest waiting. False if the server failed (rows
        stay as they are). Rows journaled meanwhile are part of the round.

        Stops between two commands (never in the middle of one) once `stopping` is set.
        """
        scan, after = _Scan(), 0
        while rows := await self.store.unfinished(self.name, after_id=after):
            for row in rows:
                if stopping is not None and stopping.is_set():
                    return True
                if not await self._handle(row, scan):
                    return False
            after = rows[-1].id
        if scan.for_player and self.presence is not None and not self.one_pass:
            scan.due_at(self.presence.read_at + self.rules.presence_seconds)
        self.wake_at = scan.wake_at
        self.telemetry.backlog(self.name, 0)
        return True

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.close()

    # --- one row ---------------------------------------------------------------

    async def _handle(self, row: JournalRow, scan: _Scan) -> bool:
        """Send the row, or mark it waiting; False when the server is unusable for now."""
        if self.dry_run:
            return await self._print(row, scan)
        held = scan.held.get(row.customer_id)
        if held is not None:
            await self._wait(row, f"{WAIT_BEHIND}{held}", head=False)
            return True
        try:
            why = await self._why_wait(row, scan)
        except _Unusable:
            return False
        if why is not None:
            scan.held[row.customer_id] = row.id
            await self._wait(row, why, head=True)
            return True
        return await self._send(row, scan)

    async def _why_wait(self, row: JournalRow, scan: _Scan) -> str | None:
        """Why the row cannot be sent now, or None. May read the player list
        (`_Unusable`: the server cannot be reached for it)."""
        now = self.clock.now()
        if row.not_before is not None and now < row.not_before:
            scan.due_at(self.clock.monotonic() + (row.not_before - now).total_seconds())
            return until(row.not_before)
        if not row.online:
            return None
        key = await self._player_key(row.customer_id, scan)
        if key is None:  # no list can show them (a poll that brings the id wakes us)
            field_name = PLATFORMS[self.rules.platform].routing_field
            return f"{WAIT_FOR_PLAYER} (the customer has no {field_name})"
        presence = await self._players()
        if presence.ids is not None and key in presence.ids:
            return None
        scan.for_player = True
        if presence.ids is None:
            return f"{WAIT_FOR_PLAYER} (the player list cannot be read)"
        return WAIT_FOR_PLAYER

    async def _wait(self, row: JournalRow, reason: str, *, head: bool) -> None:
        if row.status is JournalStatus.WAITING and row.reason == reason:
            return
        await self.store.mark_waiting(row.id, reason)
        log.log(
            logging.INFO if head else logging.DEBUG,
            "waiting server=%s customer=%s product=%s event=%s: %s (%s)",
            self.name, self._who(row), row.product, row.event, row.command, reason,
        )  # fmt: skip

    def _who(self, row: JournalRow) -> str:
        return self.names.get(row.customer_id, row.customer_id)

    # --- the player list -------------------------------------------------------------

    async def _player_key(self, customer_id: str, scan: _Scan) -> str | None:
        """The customer's id on this platform, from its JSON as stored."""
        if customer_id not in scan.keys:
            async with self.store.customer(customer_id) as txn:
                raw = txn.known.customer_raw
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = None
            found = customer_key(self.rules.platform, data) if isinstance(data, dict) else None
            scan.keys[customer_id] = found
        return scan.keys[customer_id]

    async def _players(self) -> Presence:
        """The player list: read again at most every `presence_seconds` (once
        in one pass). `_Unusable` if the server cannot be reached."""
        now = self.clock.monotonic()
        known = self.presence
        fresh = known is not None and now - known.read_at < self.rules.presence_seconds
        if known is not None and (fresh or self.one_pass):
            return known
        server = await self._connected()
        if server is None:
            raise _Unusable
        command = self.rules.players.command
        self._fence()
        try:
            reply = await server.run(command)
        except CommandTooLong as exc:
            self.presence = Presence(None, now, f"`{command}` cannot be sent: {exc}")
        except RconError as exc:
            await self._broke(f"{exc} while reading the player list")
            raise _Unusable from exc
        else:
            self.presence = self._read_players(command, reply, now)
            self._server_answered()
        self._tell_problem(self.presence.problem)
        return self.presence

    def _read_players(self, command: str, reply: str, now: float) -> Presence:
        ids = self.rules.players.ids(reply)
        if ids is not None:
            return Presence(ids, now)
        shown = printable(reply.strip(), 120) or "an empty reply"
        return Presence(None, now, f"the reply to `{command}` is not a player list: {shown}")

    def _tell_problem(self, problem: str | None) -> None:
        if problem is not None and problem != self._told:
            log.warning(
                "server %s: %s; its online-only commands wait until it can be read "
                "(servers.%s.players_command and players_pattern set how)",
                self.name, problem, self.name,
            )  # fmt: skip
        self._told = problem

    # --- sending -----------------------------------------------------------------------

    async def _connected(self) -> GameServer | None:
        if self.server is None:
            self.server = await self._connect()
        return self.server

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

    async def _broke(self, reason: str) -> None:
        """The connection broke: drop it; the rows stay as they are."""
        await self.close()
        self._failed(reason)

    def _server_answered(self) -> None:
        if self.last_error is not None:
            log.info("server %s: delivering again", self.name)
            self.last_error = None
        self.report.unreachable.pop(self.name, None)

    async def _send(self, row: JournalRow, scan: _Scan) -> bool:
        """Deliver one row; False when the server is unusable for now."""
        server = await self._connected()
        if server is None:
            return False
        if not await self.store.mark_attempt(row.id, self._fence()):
            # Finished since this round read it (an operator's cancel, a
            # take-back cancelling a waiting grant): it must not be sent.
            log.info(
                "server %s: journal row %d was finished meanwhile; not sent", self.name, row.id
            )
            return True
        # The database's answer may have come late (a network that went silent
        # and came back): the lease must still outlive the command, or another
        # host may be sending already. The attempt counted, nothing was sent.
        self._fence()
        try:
            reply = await server.run(row.command)
        except CommandTooLong as exc:
            await self.store.mark_failed(row.id, str(exc), self.clock.now())
            self.report.failed[self.name] += 1
            self.telemetry.command_finished(self.name, "failed")
            log.error("refused server=%s customer=%s: %s", self.name, self._who(row), exc)
            return True
        except RconError as exc:
            # The command may or may not have run; it stays pending and is sent
            # again later (the one in flight when the link broke).
            await self._broke(f"{exc} while sending journal row {row.id}")
            return False
        self._server_answered()
        await self._answered(row, reply, scan)
        return True

    def _fence(self) -> Fence | None:
        """The fence of the next command; `LeaseLost` when the lease, as this
        host knows it, runs out before the command could end."""
        if self.lease is None:
            return None
        if not self.lease.may_send():
            raise LeaseLost(
                f"server {self.name}: the lease was not renewed in time "
                f"(it must outlive the next command by {self.lease.fence.margin_seconds:g}s)"
            )
        return self.lease.fence

    async def _answered(self, row: JournalRow, reply: str, scan: _Scan) -> None:
        """What the server's reply makes of the row."""
        judgement = self.rules.replies.judge(reply, online=row.online)
        shown = printable(reply.strip(), 300)
        if judgement.verdict is Verdict.OFFLINE:
            await self.store.mark_waiting(row.id, WAIT_FOR_PLAYER)
            scan.held[row.customer_id] = row.id
            scan.for_player = True
            self._forget_player(scan.keys.get(row.customer_id))
            log.info(
                "server %s: the player of customer %s is not there (%s); row %d waits again",
                self.name, self._who(row), shown, row.id,
            )  # fmt: skip
        elif judgement.verdict is Verdict.REJECTED:
            reason = f"the server's reply is an error (it matches {judgement.pattern!r})"
            await self.store.mark_rejected(row.id, reply, reason, self.clock.now())
            self._counted(row, "rejected", self.report.rejected, f"; the server answered: {shown}")
        else:
            await self.store.mark_delivered(row.id, self.clock.now(), reply)
            self._counted(row, "delivered", self.report.delivered)
            if shown:
                log.debug("server %s replied: %s", self.name, shown)

    def _counted(
        self, row: JournalRow, outcome: str, counter: Counter[str], more: str = ""
    ) -> None:
        """Count and log a row the server answered."""
        counter[self.name] += 1
        self.telemetry.command_finished(self.name, outcome)
        log.log(
            logging.INFO if outcome == "delivered" else logging.WARNING,
            "%s server=%s customer=%s product=%s event=%s: %s%s",
            outcome, self.name, self._who(row), row.product, row.event, row.command, more,
        )  # fmt: skip

    def _forget_player(self, key: str | None) -> None:
        """The server said the player is not there, whatever the list said."""
        known = self.presence
        if key is not None and known is not None and known.ids is not None:
            self.presence = Presence(known.ids - {key}, known.read_at, known.problem)

    # --- a dry run --------------------------------------------------------------------

    async def _print(self, row: JournalRow, scan: _Scan) -> bool:
        """Print the row as a pass would send it, noting what could hold it back
        (a dry run has no player list, and waits for nothing)."""
        server = await self._connected()
        if not isinstance(server, DryRunServer):
            return False
        note = None
        if row.customer_id in scan.held:
            note = "after this customer's waiting command above"
        elif row.not_before is not None and self.clock.now() < row.not_before:
            note = f"delayed: waits {until(row.not_before)}"
        elif row.online:
            note = "online only: waits for the player to be on the server"
        if note is not None:
            scan.held[row.customer_id] = row.id
        server.show(row.command, note)
        await self.store.mark_delivered(row.id, self.clock.now())
        self.report.delivered[self.name] += 1
        return True


# The service's retry pacing of a server that failed.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # server down: 1 s, 2 s, 4 s … 60 s
AUTH_BACKOFF_FIRST, AUTH_BACKOFF_MAX = 30.0, 600.0  # wrong password: SRCDS bans retry storms
IDLE_CLOSE = 30.0  # close an idle RCON connection after this many seconds


async def deliver_forever(worker: ServerWorker, stopping: asyncio.Event) -> None:
    """The service's delivery to one server until `stopping`: every pending row
    as soon as it is journaled, a waiting one when its time comes or its
    player may be online; after a failure, again after a capped exponential
    backoff (longer when the password was refused); the connection closed
    after `IDLE_CLOSE` seconds without work.

    A `StoreWriteError` is raised: a row whose attempt cannot be recorded is
    never sent, and nothing more can be. So is `LeaseLost`: another host may
    deliver to the server now."""
    backoff = 0.0
    while not stopping.is_set():
        worker.wake.clear()
        try:
            ok = await worker.deliver_available(stopping)
        except (StoreWriteError, LeaseLost):
            raise
        except Exception:
            log.exception("server %s: unexpected delivery error", worker.name)
            ok = False
        if stopping.is_set():
            return
        if ok:
            backoff = 0.0
            await _rest(worker, stopping)
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


async def _rest(worker: ServerWorker, stopping: asyncio.Event) -> None:
    """Until rows are journaled, a waiting row may be due, or `stopping`;
    the connection is closed after `IDLE_CLOSE` seconds of that."""
    clock = worker.clock
    due = worker.seconds_to_wait()
    if due is not None and due <= IDLE_CLOSE:
        await wait_any(worker.wake, stopping, within=due, clock=clock)
        return
    if await wait_any(worker.wake, stopping, within=IDLE_CLOSE, clock=clock):
        return
    await worker.close()  # idle: let the server forget us
    rest = None if due is None else due - IDLE_CLOSE
    await wait_any(worker.wake, stopping, within=rest, clock=clock)


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
