"""One delivering perksync per state database.

Two processes delivering from the same journal (the service, and a
`--sync-now` from cron or by hand) could both send the same pending row. The
first one to start holds an exclusive `flock` on `<state_db>.lock` for its
whole life; the other stops at once with a clear error. The kernel releases
the lock when the holder dies, even by kill -9. `status` and `--dry-run` only
read, and need no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockedError(Exception):
    """Another perksync process is using the same state database."""


@contextlib.contextmanager
def state_lock(db_path: Path) -> Iterator[None]:
    lock_path = db_path.with_name(db_path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        # The folder is missing: let the store report that, with its own message.
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            # The service never finishes by itself: say how to stop it, and what reads alongside.
            raise LockedError(
                f"another perksync (pid {holder}) is using the state database {db_path}; "
                "if it is the service, stop it first with `systemctl stop perksync` "
                "(`perksync status` works while it runs); if it is a --sync-now, "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
