"""Service mode: plain `perksync`, the systemd unit's ExecStart.

- Every linked customer is a job of an APScheduler `AsyncIOScheduler`, polled
  every `sync.interval_seconds`; first runs are spread evenly over one
  interval and every run gets a little jitter, so 10,000 customers never fire
  at once. At most `sync.concurrency` polls run at a time, never two of the
  same customer, and a poll that is due while the previous one still runs is
  skipped, not stacked.
- One delivery worker per server delivers pending journal rows as soon as
  they are journaled; while a server is down or refuses the password it
  backs off exponentially (capped), then gets its whole backlog at once.
- Local expiry runs every few seconds, without the API.
- SIGTERM/SIGINT: stop polling, let each server finish the command in
  flight, exit 0. SIGHUP: reload config.yaml; a bad one is rejected with a
  log line and the old one stays. Either one received during start-up
  (daemon/startup_signals.py) is honoured once the loop handles signals.
- The state database cannot be written (disk full, read-only): stop the same
  way and raise the `StoreWriteError`, so that the process exits non-zero and
  systemd restarts it; retrying inside would only fail every poll and every
  command again, out of the operator's sight.
- systemd: READY/STATUS/WATCHDOG/RELOADING/STOPPING via $NOTIFY_SOCKET, and
  optional /healthz and /metrics on `http.listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from adapters.base import GameServer
from daemon import __version__, notify, startup_signals
from daemon.config import ConfigError, CustomerLink, Settings, load_settings
from daemon.engine import Engine, PassReport, ServerWorker, make_server_factory
from daemon.http_api import start_http, stop_http
from daemon.metrics import PrometheusTelemetry
from daemon.paynow import PayNowClient, RateLimiter, make_session
from daemon.state import Store, StoreWriteError

log = logging.getLogger(__name__)

STOP_TIMEOUT = 8.0  # seconds to let commands in flight finish on SIGTERM
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # server down: 1 s, 2 s, 4 s … 60 s
AUTH_BACKOFF_FIRST, AUTH_BACKOFF_MAX = 30.0, 600.0  # wrong password: SRCDS bans retry storms
IDLE_CLOSE = 30.0  # close an idle RCON connection after this many seconds
AUTH_RETRY = 1800.0  # a token PayNow rejected (401/403) is tried again this rarely
EXPIRY_SWEEP_MAX = 15.0  # seconds between local-expiry sweeps (at most)


class Service:
    def __init__(self, config_path: Path, settings: Settings, store: Store) -> None:
        self.config_path = config_path
        self.settings = settings
        self.store = store
        self.stopping = asyncio.Event()
        self.telemetry = PrometheusTelemetry(
            interval_seconds=settings.sync.interval_seconds,
            customers=_labels(settings),
            servers=settings.servers,
        )
        self.rate_limiter = RateLimiter(settings.paynow.requests_per_second)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.workers: dict[str, ServerWorker] = {}
        self.worker_tasks: dict[str, asyncio.Task[None]] = {}
        self.polling: set[str] = set()  # labels being polled right now
        self.job_labels: dict[str, str] = {}  # scheduler job id → link label
        self.poll_tasks: set[asyncio.Task[Any]] = set()
        self.auth_rejected: dict[str, float] = {}  # label → monotonic time of the 401/403
        self.semaphore = asyncio.Semaphore(settings.sync.concurrency)
        self.engine: Engine | None = None
        self.session: Any = None
        self.store_failure: StoreWriteError | None = None  # the first; ends the service

    # --- life cycle ------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        early = startup_signals.take()
        if early.stop is not None:
            log.info("%s during start-up: stopped before anything ran", early.stop.name)
            return 0
        self.session = make_session()
        http_runner = None
        try:
            # First, so that an address in use stops the start before any poll.
            if self.settings.http.listen:
                http_runner = await start_http(self.settings.http.listen, self.telemetry)
            self.engine = Engine(
                self.settings,
                self.store,
                self._paynow(),
                telemetry=self.telemetry,
                cache_customers=True,
            )
            for name in self.settings.servers:
                self._start_worker(name)
            self._schedule_customers()
            self.scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)
            sweep_every = max(1.0, min(EXPIRY_SWEEP_MAX, self.settings.sync.interval_seconds / 4))
            self.scheduler.add_job(
                self._sweep, IntervalTrigger(seconds=sweep_every), id="expiry-sweep",
                max_instances=1, coalesce=True, next_run_time=datetime.now(UTC),
            )  # fmt: skip
            self.scheduler.start()
            log.info(
                "perksync %s started: %d customers every %gs, %d servers",
                __version__, len(self.settings.customers),
                self.settings.sync.interval_seconds, len(self.settings.servers),
            )  # fmt: skip
            notify.ready()
            if early.reload:
                log.info("SIGHUP during start-up: reloading config.yaml now")
                self.reload()
            heartbeat = asyncio.create_task(self._heartbeat())
            await self.stopping.wait()
            heartbeat.cancel()
            await self._shutdown()
        finally:
            if http_runner is not None:
                await stop_http(http_runner)
            await self.session.close()
        if self.store_failure is not None:
            raise self.store_failure
        log.info("perksync stopped")
        return 0

    def _store_failed(self, exc: StoreWriteError) -> None:
        """Nothing more can be recorded: stop polling and delivering (see run)."""
        if self.store_failure is None:
            self.store_failure = exc
            self.stopping.set()

    async def _shutdown(self) -> None:
        notify.stopping()
        log.info("stopping: finishing the commands in flight")
        self.scheduler.pause()
        # Let polls already handed to the executor start: they see `stopping`
        # and return. Cancelled before starting, APScheduler would log each
        # with a traceback.
        await asyncio.sleep(0)
        for task in list(self.poll_tasks):
            task.cancel()  # a poll commits atomically: cancelling it stores nothing
        for worker in self.workers.values():
            worker.wake.set()
        tasks = list(self.worker_tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self.poll_tasks, return_exceptions=True)
        self.scheduler.shutdown(wait=False)
        if self.engine is not None:
            await self._guarded(self.engine.flush_touches())
        for worker in self.workers.values():
            await worker.close()

    def _paynow(self) -> PayNowClient:
        return PayNowClient(
            self.session,
            self.settings.paynow.api_url,
            timeout_seconds=self.settings.paynow.timeout_seconds,
            rate_limiter=self.rate_limiter,
        )

    # --- polling ---------------------------------------------------------------

    def _schedule_customers(self) -> None:
        links = self.settings.customers
        rate = self.settings.paynow.requests_per_second
        interval = effective_interval(self.settings.sync.interval_seconds, len(links), rate)
        if interval > self.settings.sync.interval_seconds:
            log.warning(
                "%d customers at paynow.requests_per_second %g cannot all be polled every "
                "%gs; polling each every %.0fs instead (raise the rate limit if PayNow allows)",
                len(links), rate, self.settings.sync.interval_seconds, interval,
            )  # fmt: skip
        now = datetime.now(UTC)
        jitter = min(interval * 0.1, 5.0)
        self.job_labels.clear()
        for index, link in enumerate(links):
            self.job_labels[f"poll:{index}"] = link.describe(index)
            # Spread the first runs evenly over one interval.
            first = now + timedelta(seconds=interval * index / max(1, len(links)))
            self.scheduler.add_job(
                self._poll_job,
                IntervalTrigger(seconds=interval, start_date=first, jitter=jitter),
                args=(index, link),
                id=f"poll:{index}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(interval)),
                next_run_time=first,
            )

    async def _poll_job(self, index: int, link: CustomerLink) -> None:
        assert self.engine is not None
        label = link.describe(index)
        if label in self.polling or self.stopping.is_set():
            self.telemetry.poll_skipped(label)
            return
        rejected_at = self.auth_rejected.get(label)
        if rejected_at is not None and time.monotonic() - rejected_at < AUTH_RETRY:
            return
        self.polling.add(label)
        task = asyncio.current_task()
        if task is not None:
            self.poll_tasks.add(task)
        try:
            async with self.semaphore:
                ok = await self.engine.poll(index, link)
            if ok:
                self.auth_rejected.pop(label, None)
            elif label in self.engine.auth_failures:
                self.auth_rejected[label] = time.monotonic()
        except asyncio.CancelledError:
            return  # stopping: a poll commits atomically, so nothing half-done remains
        except StoreWriteError as exc:
            self._store_failed(exc)
        finally:
            self.polling.discard(label)
            if task is not None:
                self.poll_tasks.discard(task)

    def _skipped(self, event: JobExecutionEvent) -> None:
        label = self.job_labels.get(str(event.job_id))
        if label is not None:
            self.telemetry.poll_skipped(label)

    async def _sweep(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.sweep_expiries()
        except StoreWriteError as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("local expiry sweep failed; will try again")

    async def _guarded(self, write: Awaitable[None]) -> None:
        """Await a store write; a `StoreWriteError` ends the service (see run)."""
        try:
            await write
        except StoreWriteError as exc:
            self._store_failed(exc)

    # --- delivery --------------------------------------------------------------

    def _start_worker(self, name: str) -> None:
        assert self.engine is not None
        worker = ServerWorker(self.engine, name, self._make_server)
        self.workers[name] = worker
        self.worker_tasks[name] = asyncio.create_task(self._deliver(worker))

    def _make_server(self, name: str) -> GameServer:
        # Built from the settings of the moment: a reload may have changed them.
        return make_server_factory(self.settings)(name)

    async def _deliver(self, worker: ServerWorker) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            worker.wake.clear()
            try:
                ok = await worker.deliver_available(self.stopping)
            except StoreWriteError as exc:
                self._store_failed(exc)  # the row stays pending: nothing more is sent
                return
            except Exception:
                log.exception("server %s: unexpected delivery error", worker.name)
                ok = False
            if self.stopping.is_set():
                return
            if ok:
                backoff = 0.0
                if not await _wait_any(worker.wake, self.stopping, within=IDLE_CLOSE):
                    await worker.close()  # idle: let the server forget us
                    await _wait_any(worker.wake, self.stopping)
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
            await _wait_any(self.stopping, within=delay)

    # --- reload, status ---------------------------------------------------------

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
        assert self.engine is not None
        old = self.settings
        if new.state_db_path != old.state_db_path:
            log.warning("sync.state_db changed: restart perksync to use the new file")
        if new.http.listen != old.http.listen:
            log.warning("http.listen changed: restart perksync to apply it")
        self.settings = new
        self.engine.use_settings(new)
        self.rate_limiter = RateLimiter(new.paynow.requests_per_second)
        self.engine.paynow = self._paynow()
        self.semaphore = asyncio.Semaphore(new.sync.concurrency)
        self.telemetry.configure(
            customers=_labels(new), servers=new.servers, interval_seconds=new.sync.interval_seconds
        )
        for job in self.scheduler.get_jobs():
            if job.id.startswith("poll:"):
                job.remove()
        self._schedule_customers()
        for name in list(self.workers):
            worker = self.workers[name]
            if name not in new.servers:
                self.worker_tasks.pop(name).cancel()
                del self.workers[name]
                self.engine.wakers.pop(name, None)
                asyncio.get_running_loop().create_task(worker.close())
            elif new.servers[name] != old.servers[name]:
                # Reconnect with the new address/password at the next command.
                asyncio.get_running_loop().create_task(worker.close())
                worker.wake.set()
        for name in new.servers:
            if name not in self.workers:
                self._start_worker(name)
        log.info(
            "config reloaded: %d customers, %d servers, %d products",
            len(new.customers), len(new.servers), len(new.products),
        )  # fmt: skip
        notify.ready()

    async def _heartbeat(self) -> None:
        """Watchdog pings, STATUS, and per interval a check of the live items
        that reach no server (also at start) and a summary line."""
        watchdog = notify.watchdog_interval()
        tick = min(watchdog / 2, 10.0) if watchdog else 10.0
        next_summary = time.monotonic() + self.settings.sync.interval_seconds
        pending: dict[str, int] = {}
        check = True
        while True:
            notify.watchdog()
            try:
                pending = await self.store.pending_counts()
                for server in self.settings.servers:
                    self.telemetry.backlog(server, pending.get(server, 0))
            except Exception:
                log.exception("cannot read the journal backlog")
            notify.status(self.telemetry.summary())
            if self.engine is not None:
                await self._guarded(self.engine.flush_touches())
                summary_due = time.monotonic() >= next_summary
                if check or summary_due:
                    check = False
                    try:
                        await self.engine.check_undelivered(only_if_changed=True)
                    except Exception:
                        log.exception("cannot check for items that reach no server")
                if summary_due:
                    self._log_summary(self.engine, pending)
                    next_summary = time.monotonic() + self.settings.sync.interval_seconds
            await asyncio.sleep(tick)

    @staticmethod
    def _log_summary(engine: Engine, pending: dict[str, int]) -> None:
        """The `last interval:` line: what happened since the last one, and what
        is pending and reaches no server now."""
        report, engine.report = engine.report, PassReport()
        report.pending_left = pending
        report.undelivered_items = engine.undelivered.items
        busy = report.polls_failed or report.journaled or sum(report.delivered.values())
        level = logging.INFO if busy or report.unreachable else logging.DEBUG
        log.log(level, "%s", report.summary(service=True))


def effective_interval(interval: float, customers: int, requests_per_second: float) -> float:
    """The poll period the rate limit allows: a steady poll is one request, and one
    in ten also reads the customer. Scheduling faster would only make polls queue
    behind the limiter and the scheduler skip them by the thousand."""
    if requests_per_second <= 0:
        return interval
    return max(interval, customers * 1.1 / requests_per_second)


def _labels(settings: Settings) -> list[str]:
    return [link.describe(i) for i, link in enumerate(settings.customers)]


async def _wait_any(*events: asyncio.Event, within: float | None = None) -> bool:
    """Wait until one of the events is set; False on timeout."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for waiter in waiters:
            waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)
