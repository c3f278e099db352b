"""The service as one host of several on a PostgreSQL database.

`Fleet.join` registers the host, or refuses to run when the stored settings
fingerprint differs from this host's while another host is alive (then
`FleetRefused`: exit 2). `Fleet.run` then renews the host's leases every
`renew_seconds` and turns the roles they stand for on and off (`Roles`: the
service): the poll lease makes this host read PayNow, sweep expiries, prune
the journal and act on webhook hints; a server lease (only for servers of the
host's site) makes it deliver to that server. A lease not renewed (the
database did not answer, another host holds it now) stops its role at once.
A host that finds the fleet's settings replaced stops, logs why, and the
service exits 2. `Fleet.leave` (a graceful stop, after the workers finished)
lets the host's leases run out at once, so that another host takes them at
its next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from daemon.clock import Clock
from daemon.config import Settings
from daemon.fleet.fingerprint import fingerprint, short
from daemon.fleet.leases import (
    ServerLease,
    elsewhere_line,
    gained_line,
    lease_noun,
    read_tick,
    role,
    roles,
)
from daemon.fleet.timing import LeaseTiming
from daemon.fleet.wakeups import Wakeups
from daemon.state import Fence, StoreError
from daemon.state.shared import (
    POLL_LEASE,
    SERVER_LEASE,
    HostRecord,
    SharedStore,
    Tick,
    server_lease,
)

log = logging.getLogger("daemon.fleet")

QUIET_INTERVALS = 2  # no host renewed for this many intervals: the settings may change


class FleetRefused(Exception):
    """This host must not poll or deliver: its settings differ from the
    fleet's. The message is one line saying why and what to do."""


class Roles(Protocol):
    """What the leases turn on and off (the service)."""

    def start_polling(self) -> None: ...

    async def stop_polling(self) -> None: ...

    def start_delivering(self, server: str, lease: ServerLease) -> None: ...

    async def stop_delivering(self, server: str) -> None: ...

    def hint(self, customer_id: str | None) -> None:
        """A webhook's hint taken from the database (this host polls)."""
        ...

    def wake(self, server: str) -> None:
        """Another host journaled rows for `server`."""
        ...


def host_record(settings: Settings, hostname: str | None = None) -> HostRecord:
    hostname = hostname or socket.gethostname()
    pid = os.getpid()
    host_id = f"{hostname}:{pid}:{secrets.token_hex(4)}"
    return HostRecord(host_id, hostname, pid, settings.sync.site, fingerprint(settings))


def lease_timing(settings: Settings) -> LeaseTiming:
    timeouts = [s.timeout_seconds for s in settings.servers.values()] or [0.0]
    return LeaseTiming.of(settings.sync.interval_seconds, max(timeouts))


async def join(store: SharedStore, host: HostRecord, settings: Settings) -> None:
    """Register the host; `FleetRefused` when the fleet runs other settings."""
    quiet = QUIET_INTERVALS * settings.sync.interval_seconds
    claim = await store.join(host, quiet)
    stored = claim.stored
    if claim.refused_by is not None and stored is not None:
        live = claim.refused_by
        raise FleetRefused(
            f"the hosts of this database run other settings (fingerprint "
            f"{short(stored.fingerprint)}, stored by {stored.stored_by} at "
            f"{stored.stored_at:%Y-%m-%d %H:%M:%S} UTC; {live.describe()} renewed its leases "
            f"at {live.renewed_at:%H:%M:%S}) than this host's config.yaml "
            f"({short(host.fingerprint)}): servers and products must be the same on every "
            "host; to change them, stop every host, then start them with the new config.yaml"
        )
    if claim.replaced and stored is not None:
        log.warning(
            "the fleet's settings changed: fingerprint %s (stored by %s) replaced by this "
            "host's %s; hosts still running the old settings stop",
            short(stored.fingerprint), stored.stored_by, short(host.fingerprint),
        )  # fmt: skip


@dataclass
class Fleet:
    settings: Settings
    store: SharedStore
    roles: Roles
    clock: Clock
    hostname: str | None = None  # as the host is named (default: the machine's)
    host: HostRecord = field(init=False)
    timing: LeaseTiming = field(init=False)
    refused: str | None = None  # why the fleet's settings stopped this host
    held: dict[str, int] = field(default_factory=dict)  # lease name → token
    seen_holders: dict[str, str | None] = field(default_factory=dict)
    server_leases: dict[str, ServerLease] = field(default_factory=dict)  # by server
    wakeups: Wakeups = field(init=False)
    _renew_failed: bool = False

    def __post_init__(self) -> None:
        self.host = host_record(self.settings, self.hostname)
        self.timing = lease_timing(self.settings)
        self.wakeups = Wakeups(self.store, self.roles, self.clock, self.polling)

    def polling(self) -> bool:
        return POLL_LEASE in self.held

    @property
    def wanted(self) -> list[str]:
        return [POLL_LEASE, *(server_lease(name) for name in self.settings.own_servers)]

    async def join(self) -> None:
        await join(self.store, self.host, self.settings)
        log.info(
            "host %s (site %s) joined the state database's hosts: settings %s, "
            "leases of %gs renewed every %gs",
            self.host.describe(), self.host.site or "none", short(self.host.fingerprint),
            self.timing.lease_seconds, self.timing.renew_seconds,
        )  # fmt: skip

    async def run(self, stopping: asyncio.Event, refuse: Callable[[str], None]) -> None:
        """Renew the leases until `stopping`; `refuse(why)` when the fleet's
        settings were replaced (the service then stops, exit 2)."""
        await self.wakeups.start(self.timing.renew_seconds)
        try:
            while not stopping.is_set():
                why = await self.renew()
                if why is not None:
                    self.refused = why
                    refuse(why)
                    return
                await self.wakeups.between_ticks(stopping, self.timing.renew_seconds)
        finally:
            await self.wakeups.stop()

    async def renew(self) -> str | None:
        """One tick; why this host must stop (None: go on)."""
        sent = self.clock.monotonic()
        try:
            tick = await self.store.tick(
                self.host, self.wanted, self.timing.lease_seconds, self.timing.renew_seconds
            )
        except Exception as exc:  # whatever it is, the leases are not renewed
            await self._renew_failed_now(str(exc) or type(exc).__name__)
            return None
        if self._renew_failed:
            log.info("the state database answers again: renewing the leases")
            self._renew_failed = False
        if tick.fingerprint != self.host.fingerprint:
            await self.stop_roles()
            return await self._replaced_settings()
        await self._apply(tick, sent)
        return None

    async def _renew_failed_now(self, why: str) -> None:
        if not self._renew_failed:
            held = roles(list(self.held)) or "nothing"
            log.error(
                "cannot renew the leases: %s; stopped %s until the state database answers",
                why, held,
            )  # fmt: skip
        self._renew_failed = True
        await self.stop_roles()

    async def _replaced_settings(self) -> str:
        stored = await self.store.fleet_settings()
        by = "another host"
        if stored is not None:
            by = f"{stored.stored_by} at {stored.stored_at:%Y-%m-%d %H:%M:%S} UTC"
        return (
            f"the fleet's settings were replaced by {by}: this host's config.yaml differs "
            f"({short(self.host.fingerprint)}); update it and restart perksync"
        )

    async def _apply(self, tick: Tick, sent: float) -> None:
        outcome = read_tick(self.held, self.seen_holders, list(tick.leases))
        for name in outcome.lost:
            log.warning(
                "lost %s: another host holds it now; stopped %s", lease_noun(name), role(name)
            )
            await self._stop(name)
        for lease in outcome.kept:
            self._renewed(lease.name, sent)
        for lease in outcome.held_elsewhere:
            self.seen_holders[lease.name] = lease.was_holder
            if lease.was_holder is not None:
                log.info("%s", elsewhere_line(lease))
        for lease in outcome.gained:
            assert lease.token is not None
            self.held[lease.name] = lease.token
            self.seen_holders.pop(lease.name, None)
            log.info("%s", gained_line(lease, self.host.host_id))
            self._start(lease.name, lease.token, sent)

    def _start(self, name: str, token: int, sent: float) -> None:
        if name == POLL_LEASE:
            self.roles.start_polling()
            return
        server = name.removeprefix(SERVER_LEASE)
        margin = self.settings.servers[server].timeout_seconds + self.timing.renew_seconds
        fence = Fence(name, self.host.host_id, token, margin)
        lease = ServerLease(fence, sent + self.timing.lease_seconds, self.clock)
        self.server_leases[server] = lease
        self.roles.start_delivering(server, lease)

    def _renewed(self, name: str, sent: float) -> None:
        lease = self.server_leases.get(name.removeprefix(SERVER_LEASE))
        if lease is not None and name != POLL_LEASE:
            lease.valid_until = sent + self.timing.lease_seconds

    async def _stop(self, name: str) -> None:
        self.held.pop(name, None)
        if name == POLL_LEASE:
            await self.roles.stop_polling()
            return
        server = name.removeprefix(SERVER_LEASE)
        self.server_leases.pop(server, None)
        await self.roles.stop_delivering(server)

    async def stop_roles(self) -> None:
        """Every role at once (each server's command in flight ends in parallel)."""
        await asyncio.gather(*(self._stop(name) for name in sorted(self.held)))

    def lost(self, server: str) -> None:
        """The server's worker stopped: its fence no longer held. The next tick
        decides whether this host delivers there again."""
        self.held.pop(server_lease(server), None)
        self.server_leases.pop(server, None)

    async def leave(self) -> None:
        """A graceful stop, the roles already stopped: the leases run out now."""
        self.held.clear()
        with contextlib.suppress(StoreError, OSError):
            released = await self.store.release(self.host)
            if released:
                log.info("released the leases: %s", roles(released))
