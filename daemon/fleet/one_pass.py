"""The leases of a `--sync-now` pass on a PostgreSQL state.

The pass is a host for as long as it runs: it joins the fleet (refused, exit
2, when the fleet runs other settings), takes the poll lease and the leases
of its site's servers, or stops at once (`LockedError`, exit 1) naming the
live host that holds one, as SQLite's lock file does. It renews them while
it runs and releases them at its end. Every attempt is fenced by its
server's lease: a pass that lost one stops sending there (`LeaseLost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from daemon.clock import Clock
from daemon.config import Settings
from daemon.fleet.host import host_record, join, lease_timing
from daemon.fleet.leases import ServerLease, role
from daemon.fleet.timing import LeaseTiming
from daemon.state import Fence, StoreError
from daemon.state.lock import LockedError
from daemon.state.shared import JOURNAL, POLL_LEASE, HostRecord, SharedStore, Tick, server_lease

log = logging.getLogger("daemon.fleet")


@contextlib.asynccontextmanager
async def pass_leases(
    settings: Settings, store: SharedStore, clock: Clock, database: str
) -> AsyncIterator[dict[str, ServerLease]]:
    """The leases of the pass's servers (by server), held until the block ends."""
    host = host_record(settings)
    timing = lease_timing(settings)
    await join(store, host, settings)
    try:
        wanted = [POLL_LEASE, *(server_lease(name) for name in settings.own_servers)]
        sent = clock.monotonic()
        tick = await store.tick(host, wanted, timing.lease_seconds, timing.renew_seconds)
        _check_all_held(tick, database)
        leases = {
            name: ServerLease(
                Fence(server_lease(name), host.host_id, _token(tick, server_lease(name)),
                      settings.servers[name].timeout_seconds + timing.renew_seconds),
                sent + timing.lease_seconds, clock,
            )
            for name in settings.own_servers
        }  # fmt: skip
        renewing = asyncio.create_task(_renew(store, host, wanted, timing, leases, clock))
        try:
            yield leases
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
    finally:
        with contextlib.suppress(StoreError, OSError):
            await store.release(host)


async def wake_other_hosts(store: SharedStore, servers: Iterable[str]) -> None:
    """Tell the hosts delivering to `servers` that the pass left rows for them,
    so that they send at once (without it, their heartbeat finds the rows
    within seconds)."""
    for server in servers:
        try:
            await store.notify(JOURNAL, server)
        except (StoreError, OSError) as exc:
            log.debug("cannot notify the host delivering to %s: %s", server, exc)


def _token(tick: Tick, name: str) -> int:
    token = next(lease.token for lease in tick.leases if lease.name == name)
    assert token is not None
    return token


def _check_all_held(tick: Tick, database: str) -> None:
    for lease in tick.leases:
        if not lease.held:
            who = lease.was_host or "another host"
            until = "" if lease.was_until is None else f" until {lease.was_until:%H:%M:%S} UTC"
            raise LockedError(
                f"another perksync ({who}) is {role(lease.name)} from the state database "
                f"{database} (its lease lasts{until}); if it is the service, it does what a "
                "pass would (`perksync status` shows the hosts); if it is a --sync-now, "
                "wait for it to finish"
            )


async def _renew(
    store: SharedStore,
    host: HostRecord,
    wanted: list[str],
    timing: LeaseTiming,
    leases: dict[str, ServerLease],
    clock: Clock,
) -> None:
    """Keep the leases while the pass runs; one not renewed stops its sends
    (the worker's fence), so a failure here needs nothing more."""
    while True:
        await clock.sleep(timing.renew_seconds)
        sent = clock.monotonic()
        try:
            tick = await store.tick(host, wanted, timing.lease_seconds, timing.renew_seconds)
        except (StoreError, OSError) as exc:
            log.warning("cannot renew the pass's leases: %s", exc)
            continue
        for lease in tick.leases:
            server = next((s for s, held in leases.items() if held.fence.lease == lease.name), None)
            if server is not None and lease.token == leases[server].fence.token:
                leases[server].valid_until = sent + timing.lease_seconds
