"""The service's clockwork: APScheduler jobs that make the sources read.

Store mode (`StoreReads`): a new-items read every `sync.new_items_seconds`,
a snapshot every `sync.interval_seconds` (both also at start), and the
look-ups webhooks ask for.

Token mode (`LinkPolls`): every linked customer is a job, polled every
`sync.interval_seconds`; first runs are spread evenly over one interval and
every run gets up to 10 % (at most 5 s) of jitter, so 10,000 customers never
fire at once. At most `sync.concurrency` polls run at a time, never two of
the same customer; a poll that comes due while the previous one still runs
is skipped (and counted), not stacked. When the rate limit cannot serve
every customer each interval, the interval is stretched to what it allows.

APScheduler fires jobs by the wall clock, so their start times are set on
it (`wall_now`), whatever clock the service's decisions read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from daemon.clock import Clock
from daemon.config import CustomerLink, Settings
from daemon.sources.store import StoreSource
from daemon.sources.token import TokenSource
from daemon.state import StoreWriteError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

AUTH_RETRY = 1800.0  # a token PayNow rejected (401/403) is tried again this rarely
POLL_JOB = "poll:"  # prefix of the token polls' job ids


def wall_now() -> datetime:
    """The time APScheduler fires jobs by."""
    return datetime.now(UTC)


def effective_interval(interval: float, customers: int, requests_per_second: float) -> float:
    """The poll period the rate limit allows: a steady poll is one request, and one
    in ten also reads the customer. Scheduling faster would only make polls queue
    behind the limiter and the scheduler skip them by the thousand."""
    if requests_per_second <= 0:
        return interval
    return max(interval, customers * 1.1 / requests_per_second)


class LinkPolls:
    """Token mode's jobs: one per linked customer."""

    def __init__(
        self,
        scheduler: AsyncIOScheduler,
        source: TokenSource,
        *,
        clock: Clock,
        telemetry: Telemetry,
        stopping: asyncio.Event,
        store_failed: Callable[[StoreWriteError], None],
    ) -> None:
        self.scheduler = scheduler
        self.source = source
        self.clock = clock
        self.telemetry = telemetry
        self.stopping = stopping
        self.store_failed = store_failed
        self.polling: set[str] = set()  # labels being polled right now
        self.tasks: set[asyncio.Task[Any]] = set()  # the polls running now
        self.job_labels: dict[str, str] = {}  # scheduler job id → link label
        self.auth_rejected: dict[str, float] = {}  # label → monotonic time of the 401/403
        self.semaphore = asyncio.Semaphore(1)
        scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)

    def schedule(self, settings: Settings) -> None:
        """(Re)schedule every link of `settings` (at start and after a reload)."""
        self.unschedule()
        self.semaphore = asyncio.Semaphore(settings.sync.concurrency)
        links = settings.customers
        rate = settings.paynow.requests_per_second
        interval = effective_interval(settings.sync.interval_seconds, len(links), rate)
        if interval > settings.sync.interval_seconds:
            log.warning(
                "%d customers at paynow.requests_per_second %g cannot all be polled every "
                "%gs; polling each every %.0fs instead (raise the rate limit if PayNow allows)",
                len(links), rate, settings.sync.interval_seconds, interval,
            )  # fmt: skip
        now = wall_now()
        jitter = min(interval * 0.1, 5.0)
        self.job_labels.clear()
        for index, link in enumerate(links):
            job_id = f"{POLL_JOB}{index}"
            self.job_labels[job_id] = link.describe(index)
            # Spread the first runs evenly over one interval.
            first = now + timedelta(seconds=interval * index / max(1, len(links)))
            self.scheduler.add_job(
                self._poll_job,
                IntervalTrigger(seconds=interval, start_date=first, jitter=jitter),
                args=(index, link),
                id=job_id,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(interval)),
                next_run_time=first,
            )

    def unschedule(self) -> None:
        """No more polls (those under way go on: see `cancel_running`)."""
        for job in self.scheduler.get_jobs():
            if job.id.startswith(POLL_JOB):
                job.remove()

    async def _poll_job(self, index: int, link: CustomerLink) -> None:
        label = link.describe(index)
        if label in self.polling or self.stopping.is_set():
            self.telemetry.poll_skipped(label)
            return
        rejected_at = self.auth_rejected.get(label)
        if rejected_at is not None and self.clock.monotonic() - rejected_at < AUTH_RETRY:
            return
        self.polling.add(label)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            async with self.semaphore:
                ok = await self.source.poll(index, link)
            if ok:
                self.auth_rejected.pop(label, None)
            elif label in self.source.auth_failures:
                self.auth_rejected[label] = self.clock.monotonic()
        except asyncio.CancelledError:
            return  # stopping: a poll commits atomically, so nothing half-done remains
        except StoreWriteError as exc:
            self.store_failed(exc)
        finally:
            self.polling.discard(label)
            if task is not None:
                self.tasks.discard(task)

    def _skipped(self, event: JobExecutionEvent) -> None:
        label = self.job_labels.get(str(event.job_id))
        if label is not None:
            self.telemetry.poll_skipped(label)

    async def cancel_running(self) -> None:
        """Stopping: cancel the polls under way (each commits atomically, so
        a cancelled one stores nothing) and wait for them to end."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


NEW_ITEMS_JOB = "store:new-items"
SNAPSHOT_JOB = "store:snapshot"
LOOK_UPS_AT_ONCE = 4  # webhook look-ups running at the same time


class StoreReads:
    """Store mode's jobs: new items every `sync.new_items_seconds`, a snapshot
    every `sync.interval_seconds`, and look-ups as webhooks ask for them (a
    customer asked for again while its look-up waits is looked up once)."""

    def __init__(
        self,
        scheduler: AsyncIOScheduler,
        source: StoreSource,
        *,
        stopping: asyncio.Event,
        store_failed: Callable[[StoreWriteError], None],
    ) -> None:
        self.scheduler = scheduler
        self.source = source
        self.stopping = stopping
        self.store_failed = store_failed
        self._queued: dict[str, None] = {}  # customers to look up, in order asked
        self._reading: set[Callable[..., Awaitable[bool]]] = set()  # reads under way
        self._again: set[Callable[..., Awaitable[bool]]] = set()  # to run again once done
        self._queue_changed = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()

    def schedule(self, settings: Settings) -> None:
        now = wall_now()
        for job_id, every, read in (
            (NEW_ITEMS_JOB, settings.sync.new_items_seconds, self.source.read_new_items),
            (SNAPSHOT_JOB, settings.sync.interval_seconds, self.source.snapshot),
        ):
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.remove_job(job_id)
            # A run late by more than the grace would be dropped, not run late
            # (APScheduler's default grace is one second: a busy loop misses reads).
            self.scheduler.add_job(
                self._run, IntervalTrigger(seconds=every), args=(read,), id=job_id,
                max_instances=1, coalesce=True, next_run_time=now,
                misfire_grace_time=max(1, int(every)),
            )  # fmt: skip

    def unschedule(self) -> None:
        """No more reads (those under way go on: see `cancel_running`); the
        look-ups asked for are forgotten."""
        for job_id in (NEW_ITEMS_JOB, SNAPSHOT_JOB):
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.remove_job(job_id)
        self._queued.clear()

    def hint(self, customer_id: str | None) -> None:
        """A webhook said where to look: one customer, or (None) new items and
        a snapshot now (a read already under way runs again once it ends: it
        may have started before what the webhook tells of)."""
        if customer_id is None:
            now = wall_now()
            for job_id in (NEW_ITEMS_JOB, SNAPSHOT_JOB):
                job = self.scheduler.get_job(job_id)
                if job is None:
                    continue
                read = job.args[0]
                if read in self._reading:
                    self._again.add(read)
                else:
                    job.modify(next_run_time=now)
            return
        self._queued[customer_id] = None
        self._queue_changed.set()

    async def look_ups(self) -> None:
        """Run the asked-for look-ups, a few at a time, until cancelled."""
        slots = asyncio.Semaphore(LOOK_UPS_AT_ONCE)
        while True:
            await self._queue_changed.wait()
            self._queue_changed.clear()
            while self._queued:
                customer_id = next(iter(self._queued))
                del self._queued[customer_id]
                await slots.acquire()
                task = asyncio.create_task(self._run(self._look_up, customer_id))
                task.add_done_callback(lambda _: slots.release())

    async def _look_up(self, customer_id: str) -> bool:
        return await self.source.look_up(customer_id, why="a webhook") is not None

    async def _run(self, read: Callable[..., Awaitable[bool]], *args: Any) -> None:
        if self.stopping.is_set():
            return
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        self._reading.add(read)
        try:
            while True:
                self._again.discard(read)
                await read(*args)
                if read not in self._again or self.stopping.is_set():
                    break
        except asyncio.CancelledError:
            return  # stopping: each customer commits atomically
        except StoreWriteError as exc:
            self.store_failed(exc)
        except Exception:
            log.exception("store mode: unexpected error in a read; will try again")
        finally:
            self._reading.discard(read)
            if task is not None:
                self.tasks.discard(task)

    async def cancel_running(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
