"""What hosts sharing one database keep there, beside the `Store` contract.

Only the PostgreSQL backend implements `SharedStore`: with SQLite or the
memory store there is one host, which holds everything (its lock is the
state file, or the process).

- **Hosts**: one row per perksync process (`host_id` is unique per process
  life), renewed at every lease tick; what `perksync status` lists.
- **Leases**: `poll` (reading PayNow, the expiry sweep, journal retention)
  and `server:<name>` (delivering to that server). Every time is the
  database's clock, never a host's. A lease is taken when it is free or ran
  out, and renewed by its holder; its `token` grows at every change of
  holder (a fencing token: see `daemon.state.Fence`).
- **The fleet's settings**: the fingerprint of the settings every host must
  share (daemon/fleet/fingerprint.py), who stored it and when.
- **Webhook hints**: a webhook any host accepted, for the polling host to act
  on; taken by one host only (row locks, `SKIP LOCKED`).
- **Wake-ups**: notifications between hosts (new journal rows for a server,
  a new hint); a lost one only delays (each side also looks on a timer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol, runtime_checkable

POLL_LEASE: Final = "poll"
SERVER_LEASE: Final = "server:"  # + the server's name

# Notification kinds (`SharedStore.notify`, `SharedStore.listen`).
HINTS: Final = "hints"  # payload: empty
JOURNAL: Final = "journal"  # payload: the server's name


def server_lease(server: str) -> str:
    return f"{SERVER_LEASE}{server}"


@dataclass(frozen=True, slots=True)
class HostRecord:
    host_id: str  # f"{hostname}:{pid}:{random hex}"
    hostname: str
    pid: int
    site: str | None
    fingerprint: str

    def describe(self) -> str:
        return f"{self.hostname} pid {self.pid}"


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """The fingerprint stored in the database, and who stored it when."""

    fingerprint: str
    stored_by: str  # "web-1 pid 4242"
    stored_at: datetime


@dataclass(frozen=True, slots=True)
class LiveHost:
    hostname: str
    pid: int
    renewed_at: datetime

    def describe(self) -> str:
        return f"{self.hostname} pid {self.pid}"


@dataclass(frozen=True, slots=True)
class FleetClaim:
    """What a host starting on the database found (`SharedStore.join`)."""

    stored: FleetSettings | None  # the fleet's settings before (None: none yet)
    # A host that renewed lately while the stored settings differ from ours:
    # this host must not run (and was not registered).
    refused_by: LiveHost | None = None

    @property
    def replaced(self) -> bool:
        """Ours replaced other stored settings."""
        return self.refused_by is None and self.stored is not None


@dataclass(frozen=True, slots=True)
class LeaseState:
    """One lease as a tick left it."""

    name: str
    token: int | None  # ours when held by us after the tick; None: not ours
    expires_at: datetime | None  # when ours runs out (the database's clock)
    # Who held it before the tick (None: nobody ever did), until when, and
    # that holder's host (None: it left no record) and whether it stopped.
    was_holder: str | None = None
    was_until: datetime | None = None
    was_host: str | None = None  # "web-2 pid 4242"
    was_stopped: bool = False

    @property
    def held(self) -> bool:
        return self.token is not None


@dataclass(frozen=True, slots=True)
class Tick:
    """One renewal: every wanted lease, and the fleet's fingerprint now."""

    leases: Sequence[LeaseState]
    fingerprint: str | None  # stored in the database; differs from ours: stop
    now: datetime  # the database's clock


@dataclass(frozen=True, slots=True)
class HostStatus:
    """A host as `perksync status` shows it."""

    hostname: str
    pid: int
    site: str | None
    started_at: datetime
    renewed_at: datetime
    stopped_at: datetime | None
    holds: Sequence[str]  # the names of the leases it holds now, sorted
    fingerprint: str


class Listening(Protocol):
    """A connection that receives notifications (see `SharedStore.listen`)."""

    @property
    def alive(self) -> bool: ...

    async def close(self) -> None: ...


@runtime_checkable
class SharedStore(Protocol):
    """The hosts' side of a shared database (see the module docstring)."""

    async def join(self, host: HostRecord, quiet_seconds: float) -> FleetClaim:
        """Register `host` unless the stored fingerprint differs from its own
        and a host (other than a stopped one) renewed within `quiet_seconds`;
        then (when it differs or none is stored) store the host's fingerprint.
        One transaction, one at a time across hosts."""
        ...

    async def tick(
        self, host: HostRecord, wanted: Sequence[str], lease_seconds: float, within: float
    ) -> Tick:
        """One statement: renew the host's record, and take or renew every
        wanted lease for `lease_seconds` from now (one free or run out is
        taken, with a new token; one held by the host keeps its token). No
        lease is taken or renewed while the stored fingerprint differs from
        the host's. `within`: seconds before the statement is given up
        (`StoreError`)."""
        ...

    async def release(self, host: HostRecord, names: Sequence[str] | None = None) -> list[str]:
        """Let leases of the host run out now (`None`: all, and the host is
        recorded as stopped); the names released."""
        ...

    async def fleet_settings(self) -> FleetSettings | None: ...

    async def hosts(self, seen_within_seconds: float) -> list[HostStatus]:
        """Every host renewed within `seen_within_seconds`, by hostname and pid."""
        ...

    async def add_hint(self, customer_id: str | None, event_id: str) -> None:
        """Record a webhook's hint (None: read new items) and notify `HINTS`."""
        ...

    async def take_hints(self, limit: int = 100) -> list[str | None]:
        """Take (and delete) up to `limit` hints, oldest first; rows another
        host is taking are skipped, never taken twice."""
        ...

    async def notify(self, kind: str, payload: str) -> None: ...

    async def listen(self, on_notice: Callable[[str, str], None]) -> Listening:
        """A connection of its own calling `on_notice(kind, payload)` for
        every notification of this database (and schema)."""
        ...
