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

import contextlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Iterator
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


def open_state(settings: Settings, *, throwaway: bool = False) -> Store:
    """The configured state store: SQLite's file or PostgreSQL's database."""
    url = settings.state_db_url
    return open_store(url, throwaway=throwaway, password=settings.state_db_password)


def open_existing(settings: Settings) -> Store | None:
    """The state store, or None if no pass has created its SQLite file yet (a
    read-only command does not create it; a PostgreSQL database is there)."""
    if settings.state_db_postgres or settings.state_db_path.exists():
        return open_state(settings)
    return None


@contextlib.contextmanager
def state_copy(settings: Settings) -> Iterator[Store]:
    """A throw-away copy of the state for a dry run, to close before leaving:
    SQLite's file copied into a temporary folder; PostgreSQL's tables copied
    into temporary ones of the copy's own connection."""
    if settings.state_db_postgres:
        yield open_state(settings, throwaway=True)
        return
    with tempfile.TemporaryDirectory(prefix="perksync-dry-run-") as folder:
        yield open_store(scratch_copy(settings.state_db_path, folder), throwaway=True)


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
