"""`perksync --sync-now`: one pass, then exit.

It starts by pruning the journal's old finished rows (daemon/retention.py).
The pass reads PayNow once (token mode: every linked customer, a bounded
pool of them at a time; store mode: one new-items read, one snapshot and
the look-ups it calls for), applies due local expiries after the reads (so
that a renewal they just saw is not expired), and beside that one worker per
server keeps delivering as rows are journaled, until reading is over and
nothing deliverable is left. It never waits for a player or a delay: each
server's player list is read at most once, and what cannot be sent yet stays
waiting for a later pass or the service.

A `StoreWriteError` (or any other error) anywhere stops every read and
delivery at once and is raised: the one command in flight on each server
stays pending and may be sent again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from daemon.apply import Applier
from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import CustomerLink, Settings
from daemon.delivery import ServerWorker, make_server_factory
from daemon.expiry import sweep_expiries
from daemon.fleet.leases import ServerLease
from daemon.paynow import RateLimiter, make_session
from daemon.report import PassReport
from daemon.retention import prune_journal
from daemon.sources.token import TokenSource
from daemon.state import Store, StoreWriteError
from daemon.wiring import Core


async def poll_links(source: TokenSource, links: Sequence[CustomerLink], concurrency: int) -> None:
    """Poll every link once, `concurrency` at a time; then write the sync times."""
    queue = iter(enumerate(links))

    async def poller() -> None:
        for index, link in queue:
            await source.poll(index, link)

    async with asyncio.TaskGroup() as pollers:
        for _ in range(min(concurrency, len(links)) or 1):
            pollers.create_task(poller())
    await source.flush_unchanged()


class SyncPass:
    """Reads once, expires what is due, delivers until nothing is left."""

    def __init__(
        self,
        applier: Applier,
        read: Callable[[], Awaitable[None]],
        workers: Sequence[ServerWorker],
    ) -> None:
        self.applier = applier
        self.read = read
        self.workers = list(workers)
        self._reading_done = asyncio.Event()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for worker in self.workers:
                    group.create_task(self._deliver(worker))
                group.create_task(self._read_and_expire())
        except BaseExceptionGroup as failures:
            raise _first_failure(failures) from None

    async def _read_and_expire(self) -> None:
        try:
            await self.read()
            await sweep_expiries(self.applier)
        finally:
            self._reading_done.set()
            for worker in self.workers:
                worker.wake.set()

    async def _deliver(self, worker: ServerWorker) -> None:
        """Keep delivering as rows arrive; one connection; stop at the first failure."""
        try:
            while True:
                worker.wake.clear()
                done = self._reading_done.is_set()
                if not await worker.deliver_available() or done:
                    return
                await worker.wake.wait()
        finally:
            await worker.close()


def _first_failure(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report of a task group's: a `StoreWriteError` if there is one
    (the others usually follow from it), else the first."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    return next((e for e in leaves if isinstance(e, StoreWriteError)), leaves[0])


async def run_pass(
    settings: Settings,
    store: Store,
    *,
    dry_run_output: Callable[[str], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    leases: Mapping[str, ServerLease] | None = None,
) -> PassReport:
    """One `--sync-now` pass with everything it needs wired up; its report
    (which exits 3 when a read was incomplete, as any failed customer does).

    `dry_run_output`: print each command there instead of sending it (the
    store is then a throw-away copy). `leases` (several hosts): the servers
    the pass delivers to, each fenced by its lease; the other servers' rows
    are left to their hosts (and not counted as left pending)."""
    core = Core(settings, store, clock)
    if dry_run_output is None:  # a dry run changes nothing, old rows included
        await prune_journal(store, settings.sync.journal_retention_days, clock.now())
    factory = make_server_factory(settings, dry_run_output=dry_run_output)
    dry_run = dry_run_output is not None
    servers = list(settings.servers) if leases is None else list(leases)
    workers = [
        core.worker(
            name, factory, one_pass=True, dry_run=dry_run,
            lease=None if leases is None else leases[name],
        )
        for name in servers
    ]  # fmt: skip
    async with make_session() as session:
        limiter = RateLimiter(settings.paynow.requests_per_second)
        if settings.store_mode:
            store_source = core.store_source(core.management(session, limiter))

            async def read() -> None:
                # A new-items read, then one complete snapshot and its look-ups.
                await store_source.read_new_items()
                await store_source.snapshot()

        else:
            token_source = core.token_source(
                core.storefront(session, limiter), cache_customers=False
            )

            async def read() -> None:
                await poll_links(token_source, settings.customers, settings.sync.concurrency)

        await SyncPass(core.applier, read, workers).run()
    core.report.undelivered_items = (await core.undelivered.check()).items
    pending = await store.pending_counts()
    core.report.pending_left = {s: n for s, n in pending.items() if s in servers}
    core.report.left_to_others = {s: n for s, n in pending.items() if s not in servers}
    counts = await store.server_counts()
    core.report.waiting_left = {c.server: c.waiting for c in counts if c.server in servers}
    return core.report
