"""Service mode: plain `perksync`, the systemd unit's ExecStart.

It wires the parts together and runs them until stopped:
- the sources, made to read by the jobs of `daemon/scheduler.py` (token
  mode: every linked customer each interval), handing answers to one
  `Applier`;
- one delivery worker per server (`daemon.delivery.deliver_forever`), woken
  as rows are journaled;
- the local expiry sweep every few seconds, without the API;
- journal retention (daemon/retention.py) at start and once per interval;
- the optional HTTP listener (`/healthz`, `/metrics`) and systemd notify
  (READY/STATUS/WATCHDOG/RELOADING/STOPPING), a summary line per interval.

`stop()` (SIGTERM/SIGINT) stops reading, lets each server finish the
command in flight, and `run()` returns 0. `reload()` (SIGHUP) loads
config.yaml again; a bad one is rejected with a log line and the old one
stays. Either signal received during start-up (daemon/startup_signals.py)
is honoured once the loop handles signals.

A state database that cannot be written (disk full, read-only) stops the
service the same way, and `run()` raises the `StoreWriteError`, so that the
process exits non-zero and systemd restarts it; retrying inside would only
fail every poll and every command again, out of the operator's sight.

On a PostgreSQL state it is one host of several (daemon/fleet/host.py):
leases say whether it polls (the sources' jobs, the expiry sweep, journal
retention, webhook hints) and to which servers it delivers, and they turn
those roles on and off as they come and go. With SQLite it holds every role
from start to stop (the state file's lock makes it the only one). A host
whose settings the fleet no longer runs stops, and `run()` returns 2.

Tests run it in-process: `handle_signals=False` leaves the process's
signals alone, `clock` sets the time decisions are made at (local
expiry, health) and paces the heartbeat, the lease ticks and a failing
server's retries, and `hostname` names the host (as a host of several);
APScheduler's jobs still fire on the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from datetime import UTC
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from adapters.base import GameServer
from daemon import __version__, notify, startup_signals
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import ConfigError, Settings, load_settings
from daemon.delivery import ServerRules, ServerWorker, deliver_forever, make_server_factory
from daemon.expiry import sweep_expiries
from daemon.fleet.fingerprint import fingerprint
from daemon.fleet.host import Fleet, lease_timing
from daemon.fleet.leases import ServerLease
from daemon.http_api import start_http, stop_http
from daemon.metrics import PrometheusTelemetry
from daemon.paynow import RateLimiter, make_session
from daemon.retention import prune_journal
from daemon.scheduler import LinkPolls, StoreReads, wall_now
from daemon.sources.store import StoreSource
from daemon.sources.token import TokenSource
from daemon.sources.webhooks import WebhookReceiver
from daemon.state import LeaseLost, Store, StoreError, StoreWriteError
from daemon.state.shared import SharedStore
from daemon.wiring import Core

log = logging.getLogger(__name__)

STOP_TIMEOUT = 8.0  # seconds to let commands in flight finish on SIGTERM
EXPIRY_SWEEP_MAX = 15.0  # seconds between local-expiry sweeps (at most)
HEARTBEAT_MAX = 10.0  # seconds between heartbeats (watchdog, STATUS, batched writes)
SWEEP_JOB, RETENTION_JOB = "expiry-sweep", "journal-retention"


class Service:
    def __init__(
        self,
        config_path: Path,
        settings: Settings,
        store: Store,
        *,
        handle_signals: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        hostname: str | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.store = store
        self.handle_signals = handle_signals
        self.clock = clock
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()  # set once READY=1 was sent
        self.telemetry = PrometheusTelemetry(
            interval_seconds=settings.sync.interval_seconds,
            customers=_labels(settings),
            servers=settings.servers,
            store_mode=settings.store_mode,
            clock=lambda: clock.now().timestamp(),
        )
        self.core = Core(settings, store, clock, self.telemetry)
        self.report = self.core.report
        self.rate_limiter = RateLimiter(settings.paynow.requests_per_second)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.workers: dict[str, ServerWorker] = {}
        self.worker_tasks: dict[str, asyncio.Task[None]] = {}
        self.worker_stops: dict[str, asyncio.Event] = {}
        self.polling = False  # this host reads PayNow, sweeps expiries, prunes the journal
        # Several hosts on one PostgreSQL database: the leases that give the roles.
        self.fleet = self._fleet(hostname) if settings.state_db_postgres else None
        self.fleet_task: asyncio.Task[None] | None = None
        self.exit_status = 0
        self.source: TokenSource | None = None  # token mode
        self.polls: LinkPolls | None = None
        self.store_source: StoreSource | None = None  # store mode
        self.store_reads: StoreReads | None = None
        self.look_ups: asyncio.Task[None] | None = None
        self.session: Any = None
        self.http: web.AppRunner | None = None  # the http.listen listener, once started
        self.webhooks: WebhookReceiver | None = None  # on that listener (store mode)
        self.store_failure: StoreWriteError | None = None  # the first; ends the service
        self._closing: set[asyncio.Task[None]] = set()  # connections closing after a reload

    def _fleet(self, hostname: str | None) -> Fleet:
        """This host of several on the PostgreSQL state (joined at `run`)."""
        fleet = Fleet(self.settings, cast(SharedStore, self.store), self, self.clock, hostname)
        self.core.wakers.elsewhere = fleet.wakeups.journaled
        self.telemetry.polls_here(False)  # until the poll lease says so
        return fleet

    def stop(self) -> None:
        """What SIGTERM does: stop reading, finish the commands in flight, return."""
        self.stopping.set()

    # --- life cycle ------------------------------------------------------------

    async def run(self) -> int:
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            early = startup_signals.take()
            if early.stop is not None:
                log.info("%s during start-up: stopped before anything ran", early.stop.name)
                return 0
            reload_now = early.reload
        else:
            reload_now = False
        self.session = make_session()
        try:
            self._make_sources()
            # First, so that an address in use stops the start before any poll.
            if self.settings.http.listen:
                self.webhooks = self._webhooks()
                self.http = await start_http(
                    self.settings.http.listen, self.telemetry, self.webhooks
                )
            await self._take_roles()
            self.scheduler.start()
            log.info("perksync %s started: %s", __version__, _what_runs(self.settings))
            notify.ready()
            self.ready.set()
            if reload_now:
                log.info("SIGHUP during start-up: reloading config.yaml now")
                self.reload()
            heartbeat = asyncio.create_task(self._heartbeat())
            await self.stopping.wait()
            heartbeat.cancel()
            await self._shutdown()
        finally:
            if self.http is not None:
                await stop_http(self.http)
                self.http = None
            await self.session.close()
        if self.store_failure is not None:
            raise self.store_failure
        log.info("perksync stopped")
        return self.exit_status

    def _make_sources(self) -> None:
        """The mode's source and the jobs that make it read (not started yet)."""
        common: dict[str, Any] = {"stopping": self.stopping, "store_failed": self._store_failed}
        if self.settings.store_mode:
            management = self.core.management(self.session, self.rate_limiter)
            self.store_source = self.core.store_source(management)
            self.store_reads = StoreReads(self.scheduler, self.store_source, **common)
        else:
            storefront = self.core.storefront(self.session, self.rate_limiter)
            self.source = self.core.token_source(storefront, cache_customers=True)
            self.polls = LinkPolls(
                self.scheduler, self.source, clock=self.clock, telemetry=self.telemetry, **common
            )

    def _webhooks(self) -> WebhookReceiver | None:
        secret = self.settings.paynow.webhook_secret_value
        if secret is None or self.store_reads is None:
            return None
        return WebhookReceiver(
            secret.get_secret_value().encode(), self.store, self._webhook_hint, clock=self.clock
        )

    async def _webhook_hint(self, customer_id: str | None, event_id: str) -> None:
        """A webhook's hint: for this host's reads, or (several hosts) recorded
        for the polling host, whichever it is."""
        if self.fleet is None:
            self.hint(customer_id)
            return
        try:
            await self.fleet.store.add_hint(customer_id, event_id)
        except StoreError as exc:
            log.warning(
                "webhook %s: cannot record its hint for the polling host (%s); the next "
                "snapshot reads its items", event_id, exc,
            )  # fmt: skip
            return
        if self.polling:
            self.fleet.wakeups.take_hints()

    async def _take_roles(self) -> None:
        """One host: every role, now. Several: join the fleet; its leases give them."""
        if self.fleet is None:
            self.start_polling()
            for name in self.settings.servers:
                self.start_delivering(name, None)
            return
        await self.fleet.join()
        self.fleet_task = asyncio.create_task(self.fleet.run(self.stopping, self._refused))
        self.fleet_task.add_done_callback(self._fleet_ended)

    def _fleet_ended(self, task: asyncio.Task[None]) -> None:
        """The lease loop ends only when stopping; if it failed, nothing renews the
        leases any more: stop (exit 1, so that systemd starts the host again)."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the leases are no longer renewed (%r); stopping", task.exception())
        self.exit_status = self.exit_status or 1
        self.stopping.set()

    def _refused(self, why: str) -> None:
        log.error("stopped polling and delivering: %s", why)
        self.exit_status = 2
        self.stopping.set()

    # --- the roles (daemon/fleet/host.py: Roles) ----------------------------------

    def start_polling(self) -> None:
        self.polling = True
        self.telemetry.polls_here(True)
        if self.polls is not None:
            self.polls.schedule(self.settings)
        if self.store_reads is not None:
            self.store_reads.schedule(self.settings)
            self.look_ups = asyncio.create_task(self.store_reads.look_ups())
        sweep_every = max(1.0, min(EXPIRY_SWEEP_MAX, self.settings.sync.interval_seconds / 4))
        self.scheduler.add_job(
            self._sweep, IntervalTrigger(seconds=sweep_every), id=SWEEP_JOB,
            max_instances=1, coalesce=True, next_run_time=wall_now(), replace_existing=True,
        )  # fmt: skip
        self.scheduler.add_job(
            self._prune, IntervalTrigger(seconds=self.settings.sync.interval_seconds),
            id=RETENTION_JOB, max_instances=1, coalesce=True, next_run_time=wall_now(),
            replace_existing=True,
        )  # fmt: skip

    async def stop_polling(self) -> None:
        """Another host polls now: no more reads, sweeps or pruning here."""
        self.polling = False
        self.telemetry.polls_here(False)
        for reads in (self.polls, self.store_reads):
            if reads is not None:
                reads.unschedule()
        for job_id in (SWEEP_JOB, RETENTION_JOB):
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.remove_job(job_id)
        if self.look_ups is not None:
            self.look_ups.cancel()
            self.look_ups = None
        reads = self.polls or self.store_reads
        if reads is not None:
            await reads.cancel_running()

    def start_delivering(self, server: str, lease: ServerLease | None) -> None:
        self._start_worker(server, lease)

    async def stop_delivering(self, server: str) -> None:
        """Let the command in flight end, then stop the server's worker."""
        worker, task = self.workers.pop(server, None), self.worker_tasks.pop(server, None)
        stop = self.worker_stops.pop(server, None)
        self.core.wakers.drop(server)
        if stop is not None and worker is not None:
            stop.set()
            worker.wake.set()
        if task is not None:
            _, late = await asyncio.wait([task], timeout=STOP_TIMEOUT)
            for still in late:
                still.cancel()
        if worker is not None:
            await worker.close()

    def hint(self, customer_id: str | None) -> None:
        if self.store_reads is not None and self.polling:
            self.store_reads.hint(customer_id)

    def wake(self, server: str) -> None:
        if server in self.workers:
            self.core.wakers.ring(server)

    def _store_failed(self, exc: StoreWriteError) -> None:
        """Nothing more can be recorded: stop polling and delivering (see run)."""
        if self.store_failure is None:
            self.store_failure = exc
            self.stopping.set()

    async def _shutdown(self) -> None:
        notify.stopping()
        log.info("stopping: finishing the commands in flight")
        if self.fleet_task is not None:  # no role taken from here on
            await asyncio.gather(self.fleet_task, return_exceptions=True)
        self.scheduler.pause()
        # Let polls already handed to the executor start: they see `stopping`
        # and return. Cancelled before starting, APScheduler would log each
        # with a traceback.
        await asyncio.sleep(0)
        if self.look_ups is not None:
            self.look_ups.cancel()
        reads = self.polls or self.store_reads
        if reads is not None:
            reads_stopped = asyncio.create_task(reads.cancel_running())
        for name, worker in self.workers.items():
            self.worker_stops[name].set()
            worker.wake.set()
        tasks = list(self.worker_tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if reads is not None:
            await reads_stopped
        self.scheduler.shutdown(wait=False)
        if self.source is not None:
            await self._guarded(self.source.flush_unchanged())
        for worker in self.workers.values():
            await worker.close()
        if self.fleet is not None:
            await self.fleet.leave()

    async def _sweep(self) -> None:
        try:
            await sweep_expiries(self.core.applier)
        except asyncio.CancelledError:
            return  # stopping, or another host polls now: each customer commits atomically
        except StoreWriteError as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("local expiry sweep failed; will try again")

    async def _prune(self) -> None:
        try:
            retention = self.settings.sync.journal_retention_days
            await prune_journal(self.store, retention, self.clock.now())
        except asyncio.CancelledError:
            return  # stopping, or another host polls now: each batch is one transaction
        except StoreWriteError as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("journal retention failed; will try again")

    async def _guarded(self, write: Awaitable[None]) -> None:
        """Await a store write; a `StoreWriteError` ends the service (see run)."""
        try:
            await write
        except StoreWriteError as exc:
            self._store_failed(exc)

    # --- delivery --------------------------------------------------------------

    def _start_worker(self, name: str, lease: ServerLease | None = None) -> None:
        worker = self.core.worker(name, self._make_server, lease=lease)
        stop = asyncio.Event()
        self.workers[name] = worker
        self.worker_stops[name] = stop
        self.worker_tasks[name] = asyncio.create_task(self._deliver(worker, stop))

    async def _deliver(self, worker: ServerWorker, stop: asyncio.Event) -> None:
        try:
            await self._guarded(deliver_forever(worker, stop))
        except LeaseLost as exc:
            log.warning("%s; standing by", exc)
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name], self.worker_tasks[worker.name]
                del self.worker_stops[worker.name]
                self.core.wakers.drop(worker.name)
            if self.fleet is not None:
                self.fleet.lost(worker.name)
            await worker.close()

    def _make_server(self, name: str) -> GameServer:
        # Built from the settings of the moment: a reload may have changed them.
        return make_server_factory(self.settings)(name)

    # --- reload, heartbeat -------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: load config.yaml again; keep the old one if the new one is bad."""
        notify.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("config reload rejected, keeping the running config: %s", line)
            notify.ready()
            return
        old = self.settings
        refused = _refused_reload(old, new, several_hosts=self.fleet is not None)
        if refused is not None:
            log.error("config reload rejected, keeping the running config: %s", refused)
            notify.ready()
            return
        if (new.state_db_url, new.state_db_password) != (old.state_db_url, old.state_db_password):
            log.warning("sync.state_db or its password changed: restart perksync to use them")
        if new.http.listen != old.http.listen:
            log.warning("http.listen changed: restart perksync to apply it")
        self._reload_webhook_secret(new)
        self.settings = new
        self.core.use_settings(new)
        self.rate_limiter = RateLimiter(new.paynow.requests_per_second)
        self.telemetry.configure(
            customers=_labels(new), servers=new.servers, interval_seconds=new.sync.interval_seconds
        )
        if self.source is not None and self.polls is not None:
            self.source.use_settings(new)
            self.source.client = self.core.storefront(self.session, self.rate_limiter)
            if self.polling:
                self.polls.schedule(new)
        if self.store_source is not None and self.store_reads is not None:
            self.store_source.client = self.core.management(self.session, self.rate_limiter)
            if self.polling:
                self.store_reads.schedule(new)
        self._reload_workers(old, new)
        linked = "store mode" if new.store_mode else f"{len(new.customers)} customers"
        log.info(
            "config reloaded: %s, %d servers, %d products",
            linked, len(new.servers), len(new.products),
        )  # fmt: skip
        notify.ready()

    def _reload_webhook_secret(self, new: Settings) -> None:
        """A new secret (PayNow's was rotated) counts at once; turning webhooks
        on or off needs the listener made again."""
        secret = new.paynow.webhook_secret_value
        if self.webhooks is not None and secret is not None:
            self.webhooks.secret = secret.get_secret_value().encode()
        elif (self.webhooks is None) != (secret is None or not new.store_mode):
            log.warning("paynow.webhook_secret added or removed: restart perksync to apply it")

    def _reload_workers(self, old: Settings, new: Settings) -> None:
        """Servers changed, added or removed (only changed with several hosts:
        their leases decide, and the servers are the same on every host)."""
        for name in list(self.workers):
            worker = self.workers[name]
            if name not in new.servers:
                self.worker_tasks.pop(name).cancel()
                del self.workers[name], self.worker_stops[name]
                self.core.wakers.drop(name)
                self._close_later(worker)
            elif new.servers[name] != old.servers[name]:
                # Reconnect with the new address/password at the next command.
                worker.use_rules(ServerRules.of(new.servers[name]))
                self._close_later(worker)
                worker.wake.set()
        for name in new.servers:
            if name not in self.workers and self.fleet is None:
                self._start_worker(name)

    def _close_later(self, worker: ServerWorker) -> None:
        task = asyncio.get_running_loop().create_task(worker.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _heartbeat(self) -> None:
        """Watchdog pings, STATUS, batched sync times, and per interval a check
        of the live items that reach no server (also at start) and a summary
        line."""
        watchdog = notify.watchdog_interval()
        tick = min(watchdog / 2, HEARTBEAT_MAX) if watchdog else HEARTBEAT_MAX
        next_summary = self.clock.monotonic() + self.settings.sync.interval_seconds
        pending: dict[str, int] = {}
        check = True
        while True:
            notify.watchdog()
            try:
                pending = await self.store.pending_counts()
                for server in self.settings.servers:
                    self.telemetry.backlog(server, pending.get(server, 0))
                    if pending.get(server) and server in self.workers:
                        # Rows another process journaled (`perksync resend`,
                        # `retry`) wake no worker of ours: this one does.
                        self.core.wakers.ring(server)
            except Exception:
                log.exception("cannot read the journal backlog")
            notify.status(self.telemetry.summary())
            if self.source is not None:
                await self._guarded(self.source.flush_unchanged())
            summary_due = self.clock.monotonic() >= next_summary
            if check or summary_due:
                check = False
                try:
                    await self.core.undelivered.check(self.core.applier.commits)
                except Exception:
                    log.exception("cannot check for items that reach no server")
            if summary_due:
                self._log_summary(pending)
                next_summary = self.clock.monotonic() + self.settings.sync.interval_seconds
            await self.clock.sleep(tick)

    def _log_summary(self, pending: dict[str, int]) -> None:
        """The `last interval:` line: what happened since the last one, and what
        is pending and reaches no server now."""
        report = self.report.take()
        report.pending_left = pending
        report.undelivered_items = self.core.undelivered.found.items
        busy = report.polls_failed or report.journaled or sum(report.delivered.values())
        level = logging.INFO if busy or report.unreachable else logging.DEBUG
        log.log(level, "%s", report.summary(service=True, store_mode=self.settings.store_mode))


def _refused_reload(old: Settings, new: Settings, *, several_hosts: bool) -> str | None:
    """Why a reload from `old` to `new` needs a restart instead, or None. A host
    of several cannot change what the hosts share, its site, nor how long its
    leases last."""
    if new.store_mode != old.store_mode:
        return (
            "paynow.api_key switches between token mode and store mode; restart perksync to switch"
        )
    if several_hosts and (
        old.sync.site != new.sync.site
        or fingerprint(old) != fingerprint(new)
        or lease_timing(old) != lease_timing(new)
    ):
        return (
            "servers, products, sync.site or the leases' length (sync.interval_seconds, the "
            "servers' timeout_seconds) changed; servers and products are the same on every "
            "host of the state database: stop every host, then start them with the new "
            "config.yaml (the others: restart this host)"
        )
    return None


def _what_runs(settings: Settings) -> str:
    servers = f"{len(settings.servers)} servers"
    every = settings.sync.interval_seconds
    if settings.store_mode:
        webhooks = ", webhooks" if settings.paynow.webhook_secret_value is not None else ""
        return (
            f"store mode: store {settings.paynow.store_id}, new items every "
            f"{settings.sync.new_items_seconds:g}s, snapshot every {every:g}s{webhooks}, {servers}"
        )
    return f"{len(settings.customers)} customers every {every:g}s, {servers}"


def _labels(settings: Settings) -> list[str]:
    return [link.describe(i) for i, link in enumerate(settings.customers)]
