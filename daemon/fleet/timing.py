"""How long a lease lasts and how often its holder renews it.

A lease is the right to poll PayNow, or to deliver to one server; its holder
renews it every `renew_seconds`, and another host takes it once it ran out.
So a host that dies is replaced after at most `lease_seconds` plus one
renewal tick of the next host, which stays within one `sync.interval_seconds`.
A host sends a command only while its lease outlives the server's RCON
timeout (so a host cut off from the database stops sending before another
host may start): the lease must exceed that timeout by two renewal ticks, or
sending would stall between renewals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# A lease lasts this share of the interval (when that is under the cap): a
# dead holder is replaced within 7/12 of an interval, with room to spare for a
# busy machine.
LEASE_SHARE: Final = 0.5
LEASE_CAP: Final = 30.0  # seconds: a lease needs no more (long intervals take over sooner)
RENEW_MAX: Final = 5.0  # seconds between two renewals, at most


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    lease_seconds: float  # how long a renewal keeps a lease
    renew_seconds: float  # how often the holder renews (and others try to take it)

    @classmethod
    def of(cls, interval_seconds: float, rcon_timeout: float) -> LeaseTiming:
        """For a host whose longest server timeout is `rcon_timeout`: taken
        over within 7/12 of `interval_seconds` (lease plus one tick)."""
        lease = min(LEASE_SHARE * interval_seconds, max(LEASE_CAP, 3 * rcon_timeout))
        return cls(lease, min(lease / 6, RENEW_MAX))

    def sends(self, rcon_timeout: float) -> bool:
        """Whether a holder can send with this timeout between two renewals."""
        return self.lease_seconds - 2 * self.renew_seconds > rcon_timeout

    @staticmethod
    def shortest_interval(rcon_timeout: float) -> float:
        """Intervals longer than this let a holder send with `rcon_timeout`: two
        renewals take a third of the lease, which is half the interval."""
        return 3 * rcon_timeout
