"""What every backend's customer blocks share: the in-process lock per
customer, and the rule of one commit per block.

The lock makes blocks for one customer wait for each other inside one
`Store` object; the backend's compare-and-set on the customer's version does
the same across objects. A lock exists only while a block holds or awaits
it, so a store that meets millions of customers over the years keeps none
of them in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from daemon.state import CustomerChange, CustomerChanged, KnownCustomer, StoreError


@dataclass(slots=True)
class _Held:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # the block holding the lock and those waiting for it


class CustomerLocks:
    """One asyncio lock per customer id, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        """How many customers have a block open or waiting."""
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, customer_id: str) -> AsyncIterator[None]:
        held = self._held.get(customer_id)
        if held is None:
            held = self._held[customer_id] = _Held()
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            # Also when cancelled while waiting: the count must not keep the lock.
            held.users -= 1
            if held.users == 0:
                del self._held[customer_id]


# A backend's commit of one block: the block (what it read) and its change.
Commit = Callable[["Block", CustomerChange], Awaitable[list[int]]]


class Block:
    """`daemon.state.CustomerTxn` for every backend: what was read, whether the
    block may still commit, and the backend's `store` that does the commit.

    `version` is the customer's version when `known` was read (0: no row), the
    value the commit's compare-and-set expects."""

    def __init__(
        self, customer_id: str, known: KnownCustomer, version: int, where: str, store: Commit
    ) -> None:
        self.customer_id = customer_id
        self._known = known
        self.version = version
        self._where = where  # names the database in errors
        self._store = store
        self._state = "open"  # "open" → "committing" (a commit was called) → "ended"

    @property
    def known(self) -> KnownCustomer:
        return self._known

    async def commit(self, change: CustomerChange) -> list[int]:
        self._claim_commit()
        return await self._store(self, change)

    def _claim_commit(self) -> None:
        """Refuses a second commit, and one after the block ended. Set before
        anything else so that two commits started side by side inside the
        block cannot both go through."""
        if self._state == "ended":
            raise StoreError(
                f"{self._where}: commit for customer {self.customer_id} after its block ended"
            )
        if self._state == "committing":
            raise StoreError(
                f"{self._where}: a second commit in one block for customer {self.customer_id}"
            )
        self._state = "committing"

    def check_marks(self, change: CustomerChange) -> None:
        """Marks may only name this customer's items: seen now, or known."""
        seen = {s.item_id for s in change.seen}
        for item_id, server in change.marks:
            if item_id not in seen and item_id not in self._known.items:
                raise StoreError(
                    f"{self._where}: a mark for item {item_id} on {server}, which is not "
                    f"an item of customer {self.customer_id}"
                )

    def end(self) -> None:
        self._state = "ended"

    def changed(self) -> CustomerChanged:
        return CustomerChanged(
            f"{self._where}: customer {self.customer_id} changed since this block read it; "
            "nothing stored"
        )
