"""The parts one run of perksync shares, built in one place.

`--sync-now` (daemon/sync_pass.py), the service (daemon/service.py) and
in-process tests all need the same wiring: one `Applier` that sources hand
answers to, whose journaled rows wake the server workers, all counting into
one `PassReport` and naming customers the same way in log lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from daemon.apply import Applier
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import Settings
from daemon.delivery import ServerFactory, ServerRules, ServerWorker, Wakers
from daemon.fleet.leases import ServerLease
from daemon.paynow import ManagementClient, RateLimiter, StorefrontClient
from daemon.report import PassReport
from daemon.sources.store import StoreSource
from daemon.sources.token import TokenSource
from daemon.state import Store
from daemon.telemetry import NullTelemetry, Telemetry
from daemon.undelivered import UndeliveredWatch


@dataclass
class Core:
    settings: Settings
    store: Store
    clock: Clock = SYSTEM_CLOCK
    telemetry: Telemetry = field(default_factory=NullTelemetry)
    report: PassReport = field(default_factory=PassReport)
    names: dict[str, str] = field(default_factory=dict)  # customer id → as logged
    wakers: Wakers = field(default_factory=Wakers)

    def __post_init__(self) -> None:
        self.applier = Applier(
            self.settings, self.store, clock=self.clock, report=self.report,
            telemetry=self.telemetry, wake=self.wakers.ring, names=self.names,
        )  # fmt: skip
        self.undelivered = UndeliveredWatch(self.settings, self.store, self.telemetry)

    def use_settings(self, settings: Settings) -> None:
        """A reload: the parts that hold settings get the new ones."""
        self.settings = settings
        self.applier.settings = settings
        self.undelivered.use_settings(settings)

    def worker(
        self,
        name: str,
        server_factory: ServerFactory,
        *,
        one_pass: bool = False,
        dry_run: bool = False,
        lease: ServerLease | None = None,
    ) -> ServerWorker:
        """The server's worker (`one_pass`, `dry_run`, `lease`: see `ServerWorker`)."""
        return ServerWorker(
            name, self.store, server_factory, rules=ServerRules.of(self.settings.servers[name]),
            wakers=self.wakers, clock=self.clock, report=self.report, telemetry=self.telemetry,
            names=self.names, one_pass=one_pass, dry_run=dry_run, lease=lease,
        )  # fmt: skip

    def storefront(
        self, session: aiohttp.ClientSession, rate_limiter: RateLimiter
    ) -> StorefrontClient:
        """Token mode's PayNow client, of the settings of now."""
        paynow = self.settings.paynow
        return StorefrontClient(
            session,
            paynow.api_url,
            timeout_seconds=paynow.timeout_seconds,
            rate_limiter=rate_limiter,
        )

    def management(
        self, session: aiohttp.ClientSession, rate_limiter: RateLimiter
    ) -> ManagementClient:
        """Store mode's PayNow client, of the settings of now."""
        paynow = self.settings.paynow
        assert paynow.store_id is not None
        return ManagementClient(
            session,
            paynow.api_url,
            paynow.store_id,
            paynow.api_key_secret.get_secret_value(),
            timeout_seconds=paynow.timeout_seconds,
            rate_limiter=rate_limiter,
        )

    def store_source(self, client: ManagementClient) -> StoreSource:
        return StoreSource(
            self.store, client, self.applier, clock=self.clock, report=self.report,
            telemetry=self.telemetry,
        )  # fmt: skip

    def token_source(self, client: StorefrontClient, *, cache_customers: bool) -> TokenSource:
        return TokenSource(
            self.settings, self.store, client, self.applier, clock=self.clock,
            report=self.report, telemetry=self.telemetry, cache_customers=cache_customers,
        )  # fmt: skip
