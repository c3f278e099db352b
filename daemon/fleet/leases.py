"""A lease as this host holds it; what one renewal tick changed, and how the
log says it (pure).

`read_tick` compares the leases held before a tick with what the tick
returned: leases gained (taken, or taken again after this host lost them),
kept (renewed with the same token), lost (not renewed, or the token moved
on: another host took them), and, for leases other hosts hold, who holds
them now (logged once per change of holder).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from daemon.clock import Clock
from daemon.state import Fence
from daemon.state.shared import POLL_LEASE, SERVER_LEASE, LeaseState


def role(name: str) -> str:
    """How a lease is named in log lines: "polling", "delivering to lobby"."""
    if name == POLL_LEASE:
        return "polling"
    return f"delivering to {name.removeprefix(SERVER_LEASE)}"


def lease_noun(name: str) -> str:
    """ "the poll lease", "the lease of server lobby"."""
    if name == POLL_LEASE:
        return "the poll lease"
    return f"the lease of server {name.removeprefix(SERVER_LEASE)}"


def roles(names: list[str]) -> str:
    """What a host holding `names` does: "polling, delivering to arena, lobby"."""
    servers = sorted(n.removeprefix(SERVER_LEASE) for n in names if n.startswith(SERVER_LEASE))
    parts = ["polling"] if POLL_LEASE in names else []
    if servers:
        parts.append(f"delivering to {', '.join(servers)}")
    return ", ".join(parts)


def _clock(moment: datetime | None) -> str:
    return "?" if moment is None else f"{moment.astimezone(UTC):%H:%M:%S}"


@dataclass(frozen=True, slots=True)
class TickOutcome:
    gained: list[LeaseState] = field(default_factory=list)
    kept: list[LeaseState] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    # Leases another host holds whose holder changed since the last tick.
    held_elsewhere: list[LeaseState] = field(default_factory=list)


def read_tick(
    held: Mapping[str, int], seen_holders: Mapping[str, str | None], leases: list[LeaseState]
) -> TickOutcome:
    """`held`: lease name → token this host held before the tick;
    `seen_holders`: who held each other lease at the last tick."""
    outcome = TickOutcome()
    for lease in leases:
        before = held.get(lease.name)
        if lease.held and before == lease.token:
            outcome.kept.append(lease)
        elif lease.held:
            if before is not None:
                outcome.lost.append(lease.name)  # someone held it in between
            outcome.gained.append(lease)
        else:
            if before is not None:
                outcome.lost.append(lease.name)
            if seen_holders.get(lease.name, "") != lease.was_holder:
                outcome.held_elsewhere.append(lease)
    return outcome


def gained_line(lease: LeaseState, host_id: str) -> str:
    """`took over polling (held by web-2 pid 4242 until 14:03:07, its lease ran
    out)`, `now delivering to lobby (the lease was free)`."""
    what = role(lease.name)
    if lease.was_holder is None or lease.was_holder == host_id:
        return f"now {what} (the lease was {'free' if lease.was_holder is None else 'ours'})"
    who = lease.was_host or "a host that left no record"
    why = "it stopped" if lease.was_stopped else "its lease ran out"
    return f"took over {what} (held by {who} until {_clock(lease.was_until)}, {why})"


def elsewhere_line(lease: LeaseState) -> str:
    """`standing by: polling held by web-1 pid 999`."""
    who = lease.was_host or "a host that left no record"
    return f"standing by: {role(lease.name)} held by {who} until {_clock(lease.was_until)}"


@dataclass(slots=True)
class ServerLease:
    """A server lease as this host holds it: checked before every command sent."""

    fence: Fence
    valid_until: float  # monotonic: when the renewal was sent, plus the lease's length
    clock: Clock

    def may_send(self) -> bool:
        """The lease outlives the command's time (its fence's margin)."""
        return self.valid_until - self.clock.monotonic() > self.fence.margin_seconds
