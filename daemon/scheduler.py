"""The service's clockwork: APScheduler jobs that make the sources read.

Token mode (`LinkPolls`): every linked customer is a job, polled every
`sync.interval_seconds`; first runs are spread evenly over one interval and
every run gets up to 10 % (at most 5 s) of jitter, so 10,000 customers never
fire at once. At most `sync.concurrency` polls run at a time, never two of
the same customer; a poll that comes due while the previous one still runs
is skipped (and counted), not stacked. When the rate limit cannot serve
every customer each interval, the interval is stretched to what it allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from daemon.clock import Clock
from daemon.config import CustomerLink, Settings
from daemon.sources.token import TokenSource
from daemon.state import StoreWriteError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

AUTH_RETRY = 1800.0  # a token PayNow rejected (401/403) is tried again this rarely
POLL_JOB = "poll:"  # prefix of the token polls' job ids


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
        for job in self.scheduler.get_jobs():
            if job.id.startswith(POLL_JOB):
                job.remove()
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
        now = self.clock.now()
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
