"""Wake-ups between hosts: LISTEN/NOTIFY, with timers as the backstop.

- New journal rows for a server delivered by another host: the host that
  journaled them notifies `JOURNAL` with the server's name; the delivering
  host wakes that server's worker (its heartbeat also wakes any server with
  pending rows every few seconds, so a lost notification only delays).
- Webhook hints: any host records them and notifies `HINTS`; the polling
  host takes them at once, and at every lease tick in any case.

The listening connection is made again at the next tick when it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from daemon.clock import Clock
from daemon.delivery import wait_any
from daemon.state import StoreError
from daemon.state.shared import HINTS, JOURNAL, Listening, SharedStore

if TYPE_CHECKING:
    from daemon.fleet.host import Roles

log = logging.getLogger("daemon.fleet")


class Wakeups:
    def __init__(
        self, store: SharedStore, roles: Roles, clock: Clock, polling: Callable[[], bool]
    ) -> None:
        self.store = store
        self.roles = roles
        self.clock = clock
        self.polling = polling
        self.listening: Listening | None = None
        self.hints_due = asyncio.Event()
        self._taking: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._told = False  # that listening failed (said once until it works again)

    async def start(self, within: float) -> None:
        await self._listen(within)

    async def _listen(self, within: float) -> None:
        """Listen, unless a connection listens already; given up after
        `within` seconds (the lease ticks must not wait for it)."""
        if self.listening is not None and self.listening.alive:
            return
        self.listening = None
        try:
            self.listening = await asyncio.wait_for(self.store.listen(self._notice), within)
        except (StoreError, TimeoutError) as exc:
            if not self._told:
                why = str(exc) or "no answer"
                log.warning("cannot listen for the other hosts (%s): looking on a timer", why)
            self._told = True
            return
        self._told = False

    def _notice(self, kind: str, payload: str) -> None:
        if kind == JOURNAL:
            self.roles.wake(payload)
        elif kind == HINTS and self.polling():
            self.take_hints()

    def take_hints(self) -> None:
        """Take the recorded hints now (one taking at a time; again if asked meanwhile)."""
        self.hints_due.set()
        if self._taking is None or self._taking.done():
            self._taking = asyncio.create_task(self._take())

    async def _take(self) -> None:
        while self.hints_due.is_set() and self.polling():
            self.hints_due.clear()
            try:
                hints = await self.store.take_hints()
            except StoreError as exc:
                log.warning("cannot take the webhook hints (%s): next tick", exc)
                return
            for customer_id in hints:
                self.roles.hint(customer_id)
            if len(hints) == 100:
                self.hints_due.set()

    def journaled(self, server: str) -> None:
        """Rows were journaled for a server this host does not deliver to."""
        task = asyncio.create_task(self._notify(JOURNAL, server))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _notify(self, kind: str, payload: str) -> None:
        try:
            await self.store.notify(kind, payload)
        except StoreError as exc:  # the other host's timer finds the rows
            log.debug("cannot notify %s %s: %s", kind, payload, exc)

    async def between_ticks(self, stopping: asyncio.Event, seconds: float) -> None:
        """Wait for the next tick; meanwhile (and as a backstop) take hints and
        listen again if the connection broke."""
        await self._listen(seconds)
        if self.polling():
            self.take_hints()
        await wait_any(stopping, within=seconds, clock=self.clock)

    async def stop(self) -> None:
        for task in [self._taking, *self._sending]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.listening is not None:
            await self.listening.close()
            self.listening = None
