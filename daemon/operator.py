"""What the operator commands (`journal`, `resend`, `adopt`, `cancel`,
`retry`) share.

They run beside a running service without the state lock (the lock keeps a
second *delivering* process out; these deliver nothing). Each change goes
through the customer's block, so it never interleaves with a poll of the
same customer in this process, and a commit on a read that the service
changed meanwhile raises `CustomerChanged` and is decided again. SQLite
makes a write wait up to its busy timeout (5 s) for the service's short
transactions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

from daemon.config import Settings
from daemon.state import CustomerChanged, CustomerTxn, Store, StoreError, open_store
from daemon.state.sqlite import empty_file_problem

log = logging.getLogger(__name__)

T = TypeVar("T")

# A block whose commit met another process's change is decided again this often.
CHANGED_RETRIES: Final = 5


class UsageProblem(Exception):
    """The command line names something that is not there (a server, a
    product, a journal row): one line, exit status 2, nothing changed."""


def open_existing(settings: Settings) -> Store | None:
    """The state store, or None if no pass has created it yet (a read-only
    command does not create it)."""
    path = settings.state_db_path
    return open_store(str(path)) if path.exists() else None


async def in_block(
    store: Store, customer_id: str, work: Callable[[CustomerTxn], Awaitable[T]]
) -> T:
    """`work` inside the customer's block, again from a fresh read when
    another process committed for the customer meanwhile."""
    for attempt in range(1, CHANGED_RETRIES + 1):
        try:
            async with store.customer(customer_id) as txn:
                return await work(txn)
        except CustomerChanged:
            if attempt == CHANGED_RETRIES:
                raise
            log.debug("customer %s changed meanwhile; deciding again", customer_id)
    raise AssertionError("unreachable")


def scratch_copy(db_path: Path, folder: str) -> str:
    """A throw-away copy of the state for a dry run (the real file is only read)."""
    scratch = os.path.join(folder, "dry-run.sqlite3")
    if db_path.exists():
        if db_path.stat().st_size == 0:
            raise StoreError(empty_file_problem(db_path))
        source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        target = sqlite3.connect(scratch)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
    return scratch
