"""The loopback world on the test's own event loop, and the service run in it.

`LocalWorld` is `World` (tests/fakes/world.py) with the fakes on the running
loop instead of a thread of their own: its content methods are plain calls
and `await` stands in for `world.call`. `world.service(clock)` runs
`daemon.service.Service` as a task of that loop, without signal handlers,
on the state database config.yaml names, and keeps its log lines as the
process would have written them (`world.service_log()`).

Tests wait for what they expect with `until(...)` (a condition, checked
again and again until it holds; the timeout only ends a failing test), and
make the service act now instead of at its next scheduled time:
`running.poll()` runs the token polls' jobs, `running.sweep()` the local
expiry sweep, and `clock.advance(...)` wakes the heartbeat and the servers'
retry backoff, which sleep on the service's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from daemon import log_format
from daemon.clock import Clock
from daemon.config import load_settings
from daemon.expiry import sweep_expiries
from daemon.scheduler import POLL_JOB, LinkPolls
from daemon.service import Service
from daemon.state import Store, open_store
from tests.fakes.world import RCON_PASSWORD, World

T = TypeVar("T")

WAIT = 15.0  # seconds before `until` gives up: a bound on failing, never a proof


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    within: float = WAIT,
    *,
    meanwhile: Callable[[], object] | None = None,
) -> None:
    """Return once `check()` holds; fail the test if it never does.

    `meanwhile` runs before each look (e.g. moving a `ManualClock` on, for
    what the service does on its clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if meanwhile is not None:
            meanwhile()
            await asyncio.sleep(0)
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"never came true: {_source(check)}")
        await asyncio.sleep(0.01)


def _source(check: Callable[..., object]) -> str:
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return repr(check)


class RunningService:
    """A `Service` running as a task; what tests do to it and read of it."""

    def __init__(self, service: Service, task: asyncio.Task[int]) -> None:
        self.service = service
        self.task = task

    @property
    def store(self) -> Store:
        return self.service.store

    async def stop(self) -> int:
        """What SIGTERM does; `run()`'s return value."""
        self.service.stop()
        return await asyncio.wait_for(asyncio.shield(self.task), WAIT)

    async def poll(self, *indexes: int) -> None:
        """Run the poll jobs of the links at `indexes` (all without) now, one
        after the other, each through the scheduler's job as when it fires."""
        polls = self.service.polls
        assert polls is not None, "no token-mode polls in this service"
        jobs = [job for job in polls.scheduler.get_jobs() if job.id.startswith(POLL_JOB)]
        for job in sorted(jobs, key=lambda job: int(job.id.removeprefix(POLL_JOB))):
            if indexes and job.args[0] not in indexes:
                continue
            # A run of its own under way would make this one a skipped one.
            await until(_not_polling(polls, polls.job_labels[job.id]))
            await job.func(*job.args)

    async def sweep(self) -> int:
        """The local expiry sweep, now; how many (item, server) it expired."""
        return await sweep_expiries(self.service.core.applier)

    async def drained(self) -> None:
        """Wait until no journal row is pending."""
        await until(self._nothing_pending)

    async def _nothing_pending(self) -> bool:
        return not await self.store.pending_counts()

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A metric's value as /metrics would show it."""
        registry = self.service.telemetry.registry
        value = registry.get_sample_value(name, dict(labels or {}))
        return None if value is None else float(value)


def _not_polling(polls: LinkPolls, label: str) -> Callable[[], bool]:
    return lambda: label not in polls.polling


class LocalWorld(World):
    """`World` on the test's event loop; see the module docstring."""

    def __init__(self, folder: Path, servers: Mapping[str, str]) -> None:
        super().__init__(folder, servers)
        self.loop.close()  # the fakes run on the test's loop, not a thread's
        self._log = io.StringIO()
        self._handler = logging.StreamHandler(self._log)
        self._handler.setFormatter(log_format.formatter())
        self.verbose = False  # `perksync -v`: debug lines too

    async def __aenter__(self) -> LocalWorld:
        await self.paynow.start()
        for server in self.rcon.values():
            await server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.rcon.values():
            await server.stop()
        await self.paynow.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        coro.close()
        raise TypeError("LocalWorld runs on the test's loop: await the coroutine instead")

    def sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def service_log(self) -> str:
        return self._log.getvalue()

    @contextlib.asynccontextmanager
    async def service(
        self,
        clock: Clock,
        *,
        store_url: str | None = None,
        config: Path | None = None,
        hostname: str | None = None,
    ) -> AsyncIterator[RunningService]:
        """The service of config.yaml (or `config`), started (READY sent) on
        `clock`; stopped at the end if the test did not stop it. `hostname`:
        as a host of several on one database names itself."""
        path = config or self.folder / "config.yaml"
        settings = load_settings(path, env={})
        store = open_store(store_url or settings.state_db_url)
        service = Service(
            path, settings, store, handle_signals=False, clock=clock, hostname=hostname
        )
        running = RunningService(service, asyncio.create_task(service.run()))
        try:
            with self._logging():
                ready = asyncio.create_task(service.ready.wait())
                await asyncio.wait([ready, running.task], return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if running.task.done():
                    running.task.result()  # raises what stopped it
                    raise AssertionError("the service stopped before it was ready")
                yield running
                if not running.task.done():
                    assert await running.stop() == 0
        finally:
            if not running.task.done():
                service.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(running.task, WAIT)
            await store.close()

    @contextlib.contextmanager
    def _logging(self) -> Any:
        """Log as `perksync` (cli.setup_logging) does, into `service_log()`."""
        root = logging.getLogger()
        quiet = {"aiohttp": logging.WARNING, "apscheduler": logging.ERROR}
        saved = {name: logging.getLogger(name).level for name in quiet}
        saved_root = root.level
        self._handler.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        root.addHandler(self._handler)
        root.setLevel(logging.DEBUG)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        try:
            yield
        finally:
            root.removeHandler(self._handler)
            root.setLevel(saved_root)
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)

    def assert_log_clean(self) -> None:
        """No traceback and no secret in what the service logged."""
        log = self.service_log()
        assert "Traceback" not in log, log
        assert RCON_PASSWORD not in log
        for token in self.tokens:
            assert token not in log


def in_world(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a loop of its own, with its `LocalWorld` fixture's
    fakes started first and stopped after; the log is checked at the end."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        world = next(v for v in kwargs.values() if isinstance(v, LocalWorld))

        async def run() -> None:
            async with world:
                await test(*args, **kwargs)
            world.assert_log_clean()

        asyncio.run(run())

    return wrapper
