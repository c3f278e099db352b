"""One delivering perksync per SQLite state database (on PostgreSQL, leases in
the database say which host delivers where: daemon/fleet/).

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


class LockFileError(Exception):
    """The lock file cannot be opened for writing (not writable, not a file)."""


@contextlib.contextmanager
def state_lock(db_path: Path) -> Iterator[None]:
    lock_path = lock_path_of(db_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        # The folder is missing: let the store report that, with its own message.
        yield
        return
    except OSError as exc:
        raise LockFileError(f"sync.state_db: cannot open {lock_path}: {exc.strerror}") from exc
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


def lock_path_of(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


def lock_holder(db_path: Path) -> str | None:
    """The pid (as written in the lock file, or "?") of the perksync holding the
    state lock now, or None when nobody holds it. Takes nothing: the probe is a
    shared lock, released at once, and a missing lock file is not created."""
    try:
        fd = os.open(lock_path_of(db_path), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
