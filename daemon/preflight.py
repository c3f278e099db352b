"""What can be checked of the machine before anything is contacted.

perksync needs its state folder (`sync.state_db`'s, for an SQLite file) to
exist and to be writable by the user it runs as: the database, its `-wal` and
`-shm` files and the lock file live there. A PostgreSQL state database is not
contacted here: its first use says what is wrong with it. The service also
needs its `http.listen` address.
`--check-config` runs all of these checks, `--sync-now` and the service the
state ones before they start (the service's real bind comes before its first
poll, and fails with the same line): each problem is one line naming the key, the
path or address, and what to do, instead of a traceback at the first write.

Nothing here changes anything: permissions are asked with access(2), the
address is tried with a bind that is closed at once, and whether the running
perksync holds the address is told by its state lock (see `lock_holder`).
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from pathlib import Path

from daemon.config import Settings
from daemon.http_api import listen_error, parse_listen
from daemon.state.lock import lock_holder, lock_path_of
from daemon.state.sqlite import empty_file_problem, running_user


def setup_problems(settings: Settings, *, listen: bool) -> list[str]:
    """Every problem of the state folder (and with `listen`, of `http.listen`)."""
    sqlite = not settings.state_db_postgres
    problems = state_problems(settings.state_db_path) if sqlite else []
    if listen and settings.http.listen:
        problem = listen_problem(settings.http.listen, settings.state_db_path if sqlite else None)
        if problem is not None:
            problems.append(problem)
    return problems


def state_problems(db_path: Path) -> list[str]:
    """Why perksync could not create or write its state at `db_path`, one line each."""
    folder = db_path.parent
    user = running_user()
    if not folder.exists():
        return [
            f"sync.state_db: the folder {folder} does not exist; create it for the user "
            f"perksync runs as, e.g. install -d -m 0700 -o {user} {folder}"
        ]
    if not folder.is_dir():
        return [f"sync.state_db: {folder} is not a folder"]
    problems = []
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return [f"sync.state_db: the folder {folder} is on a file system mounted read-only"]
    if not _allowed(folder, os.W_OK | os.X_OK):
        problems.append(
            f"sync.state_db: the folder {folder} is not writable by user {user} "
            f"({_owner(folder)}); perksync keeps its database and lock file there"
        )
    for path in _state_files(db_path):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"sync.state_db: cannot look at {path}: {exc.strerror}")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"sync.state_db: {path} is not a file")
        elif not _allowed(path, os.R_OK | os.W_OK):
            problems.append(
                f"sync.state_db: {path} is not writable by user {user} ({_owner(path)}); "
                f"if perksync once ran as another user, give its files back: "
                f"chown -R {user} {folder}"
            )
        elif path == db_path and info.st_size == 0:
            problems.append(f"sync.state_db: {empty_file_problem(path)}")
    return problems


def listen_problem(listen: str, db_path: Path | None) -> str | None:
    """Why the service could not listen on `listen`; None when it could (the
    address is free, or held by the perksync that is using `db_path` now).
    `db_path` None (a PostgreSQL state): whether the perksync running here holds
    a busy address cannot be told without contacting the database, so a busy
    one is left to the service's own bind to report."""
    host, port = parse_listen(listen)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return str(listen_error(listen, exc))
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As asyncio's server does: no wait for old connections, no dual stack.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and (
                    db_path is None or lock_holder(db_path) is not None
                ):
                    continue  # the running perksync's own listener, or maybe so
                return str(listen_error(listen, exc))
    return None


def _state_files(db_path: Path) -> list[Path]:
    return [
        db_path,
        db_path.with_name(db_path.name + "-wal"),
        db_path.with_name(db_path.name + "-shm"),
        lock_path_of(db_path),
    ]


def _allowed(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _owner(path: Path) -> str:
    info = path.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = f"uid {info.st_uid}"
    return f"owner {owner}, mode {stat.S_IMODE(info.st_mode):04o}"
