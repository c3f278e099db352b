"""Several `perksync` service processes ("hosts") on one PostgreSQL schema,
against the loopback fakes: the Management fake (store mode, webhooks) and
one RCON fake per game server, on a background event loop (`World`).

Each host has a folder of its own (config.yaml, secrets, service.log, which
restarts append to). The fakes name the process behind every connection
(`Life`: which host, which of its starts) by looking the peer's socket up in
/proc while the connection is open, so a test can say which host sent which
command and which host read PayNow. `LeaseWatch` samples the fleet's lease
table so a test can say who held what when a host was killed.

With `netns=True` every site's hosts run in a network namespace of their own
(`SiteNetwork`): a veth pair to the root namespace and no default route, the
site's RCON fakes on the root end's address, PostgreSQL and PayNow behind
forwarders listening on the namespace's own 127.0.0.1 at their usual ports
(so every host's config names them alike). A host there can reach nothing
else: RCON to another site's servers fails with "network unreachable".
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml

from tests.fakes.rcon_server import Executed, unused_port
from tests.fakes.world import API_KEY_ENV, RCON_PASSWORD, WEBHOOK_SECRET_ENV, World

INTERVAL = 4.0  # sync.interval_seconds: a dead holder's leases go within one
RCON_TIMEOUT = 1.0  # servers.*.timeout_seconds: inside the lease (interval / 2)


class ServerSpec(NamedTuple):
    platform: str  # "minecraft" or "source"
    site: str | None = None


class Life(NamedTuple):
    """One start of one host: the process behind a connection."""

    host: str
    number: int  # 1 for the first start, 2 after the first restart, ...
    pid: int


class Kill(NamedTuple):
    life: Life
    wall: float  # time.time() just before SIGKILL (the database's clock is the same)
    mono: float  # time.monotonic() just before SIGKILL (the fakes' clock)


@dataclass
class Host:
    name: str
    site: str | None
    folder: Path
    lives: list[Life] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    listen_port: int | None = None
    db_link: Forwarder | None = None  # its own way to PostgreSQL, if any

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def life(self) -> Life:
        return self.lives[-1]

    def log(self) -> str:
        path = self.folder / "service.log"
        return path.read_text() if path.exists() else ""


# --- who is behind a socket ---------------------------------------------------------


def _address(field_hex: str) -> tuple[str, int]:
    """An IPv4 "0100007F:1F90" of /proc/net/tcp as ("127.0.0.1", 8080)."""
    ip_hex, port_hex = field_hex.split(":")
    ip = str(ipaddress.IPv4Address(bytes.fromhex(ip_hex)[::-1]))
    return ip, int(port_hex, 16)


def _socket_inode(pid: int, local: tuple[str, int], remote_port: int) -> int | None:
    """The inode of the TCP socket in `pid`'s network namespace from `local`
    to a peer on `remote_port` (None: there is none)."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return None
    for line in table.splitlines()[1:]:
        fields = line.split()
        if _address(fields[1]) == local and _address(fields[2])[1] == remote_port:
            return int(fields[9])
    return None


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of every socket process `pid` has open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _holds_socket(pid: int, inode: int) -> bool:
    return inode in _socket_inodes(pid)


def tcp_ends(pid: int) -> set[tuple[str, int]]:
    """The local addresses of every TCP connection process `pid` has open."""
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return set()
    own = _socket_inodes(pid)
    return {
        _address(fields[1])
        for fields in (line.split() for line in table.splitlines()[1:])
        if int(fields[9]) in own
    }


def socket_owner(lives: Sequence[Life], peer: Any, server_port: int) -> Life | None:
    """Which of `lives` holds the client end (`peer`) of a connection to
    `server_port` (asked while the connection is open)."""
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    local = (str(peer[0]), int(peer[1]))
    for life in reversed(lives):
        inode = _socket_inode(life.pid, local, server_port)
        if inode is not None and _holds_socket(life.pid, inode):
            return life
    return None


# --- network namespaces -------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = subprocess.run(
        ["unshare", "-n", "true"], capture_output=True, text=True, check=False, timeout=10
    )
    if probe.returncode != 0:
        return f"unshare -n fails here: {probe.stderr.strip() or probe.returncode}"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


_NETNS_LOCK = Path("/tmp/perksync-test-netns.lock")


class SiteNetwork:
    """A network namespace joined to the root one by a veth pair on a /30 of
    10.213.0.0/16 (`outer`: the root end's address, `inner`: the namespace's).
    No default route: from inside, only `outer` is reachable."""

    def __init__(self, tag: str) -> None:
        self.name = f"perksync-{tag}"
        self.outer_if, self.inner_if = f"ps{tag}o", f"ps{tag}i"
        self.outer = self.inner = ""

    def create(self) -> None:
        # Tests on other workers make namespaces too: choose a free /30 under a lock.
        with _NETNS_LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = subprocess.run(
                ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
            ).stdout
            block = next(
                b
                for b in ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=30)
                if f" {b.network_address + 1}/" not in used
            )
            self.outer, self.inner = str(block.network_address + 1), str(block.network_address + 2)
            _ip("netns", "add", self.name)
            _ip("link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if)
            _ip("link", "set", self.inner_if, "netns", self.name)
            _ip("addr", "add", f"{self.outer}/30", "dev", self.outer_if)
            _ip("link", "set", self.outer_if, "up")
        for args in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{self.inner}/30", "dev", self.inner_if),
            ("link", "set", self.inner_if, "up"),
        ):
            _ip("netns", "exec", self.name, "ip", *args)

    def remove(self) -> None:
        # Deleting the namespace deletes its veth end, and with it the pair.
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", self.name)
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.outer_if)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


class Forwarder:
    """A TCP forwarder on the fakes' loop: a listening socket → `target`, both
    ways. `flowing` cleared: what arrives is held, connections stay open (a
    network that went silent); set again, it flows on."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.flowing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        self.flowing.set()
        self._server = await asyncio.start_server(self._serve, sock=sock)
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(_pipe(src, dst, self.flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    try:
        while data := await src.read(65536):
            await flowing.wait()
            dst.write(data)
            await dst.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        dst.close()


def _listening(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def listening_in(namespace: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` of network namespace `namespace`
    (made on a thread that joins the namespace; the socket stays in it)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            finally:
                os.close(fd)
            made.append(_listening(("127.0.0.1", port)))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


_CLONE_NEWNET = 0x40000000


class ReadyWatch:
    """A $NOTIFY_SOCKET for every host, as systemd's: which processes said
    READY=1 (their pid from the datagram's credentials, as systemd reads it)."""

    def __init__(self) -> None:
        # AF_UNIX paths end at 108 bytes: a short folder, whatever $TMPDIR is.
        self.folder = tempfile.mkdtemp(prefix="ps-", dir="/tmp")
        self.path = os.path.join(self.folder, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.ready: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        credentials = struct.Struct("3i")  # struct ucred: pid, uid, gid
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = credentials.unpack(value[: credentials.size])[0]
                    if "READY=1" in data.decode(errors="replace").split("\n"):
                        self.ready.add(pid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the fleet ----------------------------------------------------------------------


class Fleet(World):
    """The fakes, the hosts and what they did. Use as a context manager."""

    def __init__(
        self,
        folder: Path,
        db_url: str,
        servers: Mapping[str, ServerSpec],
        hosts: Mapping[str, str | None],
        *,
        netns: bool = False,
        webhooks: bool = False,
        db_links: bool = False,
    ) -> None:
        """`db_links`: each host reaches PostgreSQL through a forwarder of its
        own (`Host.db_link`), so a test can cut one host off the database."""
        super().__init__(folder, {n: s.platform for n, s in servers.items()}, store=True)
        self.db_url = db_url
        self.specs = dict(servers)
        self.hosts = {
            name: Host(name, site, folder / "hosts" / name) for name, site in hosts.items()
        }
        self.kills: list[Kill] = []
        self.products: dict[str, Any] = {}
        self.sync_extra: dict[str, Any] = {}
        if webhooks:
            self.webhook_secret = "whsec-" + secrets.token_urlsafe(24)
            for host in self.hosts.values():
                host.listen_port = unused_port()
        tag = secrets.token_hex(3)
        sites = sorted({s for s in hosts.values() if s is not None}) if netns else []
        self.networks = {site: SiteNetwork(f"{tag}{i}") for i, site in enumerate(sites)}
        self.forwarders: list[Forwarder] = []
        self.db_links = db_links
        self._db: asyncpg.Connection | None = None
        self.notify = ReadyWatch()
        self._owners_lock = threading.Lock()
        # The connections of killed processes, by their local address.
        self.graveyard: dict[tuple[str, int], Life] = {}

    # --- set-up and tear-down

    def __enter__(self) -> Fleet:
        try:
            for network in self.networks.values():
                network.create()
            for name, server in self.rcon.items():
                site = self.specs[name].site
                if site in self.networks:
                    server.host = self.networks[site].outer
                server.identify = self._identifier(server)
            super().__enter__()
            self.management.identify = self._identifier(self.management)
            # Inside a namespace PostgreSQL and PayNow are where they are outside
            # (127.0.0.1, same ports): every host's config names them alike.
            db = urlsplit(self.db_url)
            for host in self.hosts.values() if self.db_links else ():
                host.db_link = Forwarder((db.hostname or "127.0.0.1", db.port or 5432))
                self.call(host.db_link.start(_listening(("127.0.0.1", 0))))
                self.forwarders.append(host.db_link)
            for network in self.networks.values():
                for port, target in (
                    (db.port or 5432, (db.hostname or "127.0.0.1", db.port or 5432)),
                    (self.management.port, ("127.0.0.1", self.management.port)),
                ):
                    forwarder = Forwarder(target)
                    self.call(forwarder.start(listening_in(network.name, port)))
                    self.forwarders.append(forwarder)
            self._db = self.call(asyncpg.connect(self.db_url))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for host in self.hosts.values():
                if host.running:
                    assert host.proc is not None
                    host.proc.kill()
                    host.proc.wait()
            if self._db is not None:
                self.call(self._db.close())
            for forwarder in self.forwarders:
                self.call(forwarder.stop())
            if self.loop.is_running():
                super().__exit__()
        finally:
            self.notify.close()
            for network in self.networks.values():
                network.remove()

    def _identifier(self, fake: Any) -> Callable[[Any], object]:
        def identify(peer: Any) -> object:
            owner = socket_owner(self.lives(), peer, fake.port)
            if owner is None and isinstance(peer, tuple):
                with self._owners_lock:
                    owner = self.graveyard.get((str(peer[0]), int(peer[1])))
            return owner or peer

        return identify

    def lives(self) -> list[Life]:
        with self._owners_lock:
            return [life for host in self.hosts.values() for life in host.lives]

    # --- configs and processes

    def host_config(self, host: Host) -> Path:
        db_url, api_url = self.db_url, self.management.url
        if host.db_link is not None:
            parts = urlsplit(db_url)
            user = parts.netloc.rpartition("@")[0]
            at = f"{user}@" if user else ""
            db_url = urlunsplit(parts._replace(netloc=f"{at}127.0.0.1:{host.db_link.port}"))
        paynow_section: dict[str, Any] = {
            "api_url": api_url, "timeout_seconds": 2,
            "store_id": self.management.store_id, "api_key_env": API_KEY_ENV,
        }  # fmt: skip
        sync: dict[str, Any] = {
            "state_db": db_url, "interval_seconds": INTERVAL, "new_items_seconds": 1,
            "expiry_grace_seconds": 0, **self.sync_extra,
        }  # fmt: skip
        if host.site is not None:
            sync["site"] = host.site
        data: dict[str, Any] = {"paynow": paynow_section, "sync": sync}
        if host.listen_port is not None:
            paynow_section["webhook_secret_env"] = WEBHOOK_SECRET_ENV
            data["http"] = {"listen": f"127.0.0.1:{host.listen_port}"}
        data["servers"] = {name: self._server_entry(name) for name in self.rcon}
        data["products"] = self.products
        host.folder.mkdir(parents=True, exist_ok=True)
        (host.folder / "secrets").mkdir(exist_ok=True)
        (host.folder / "secrets" / "rcon").write_text(RCON_PASSWORD)
        path = host.folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _server_entry(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "platform": self.specs[name].platform, "host": self.rcon[name].host,
            "port": self.rcon[name].port, "password_file": "secrets/rcon",
            "timeout_seconds": RCON_TIMEOUT,
        }  # fmt: skip
        if self.specs[name].site is not None:
            entry["site"] = self.specs[name].site
        return entry

    def start(self, name: str) -> Host:
        """Start host `name` (its config written anew)."""
        host = self.hosts[name]
        config = self.host_config(host)
        argv = [sys.executable, "-m", "daemon", "--config", str(config)]
        network = self.networks.get(host.site or "")
        if network is not None:
            argv = network.command(argv)  # ip netns exec replaces itself: same pid
        with (host.folder / "service.log").open("a") as log:
            host.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                env=self.cli_env({"NOTIFY_SOCKET": self.notify.path}), cwd=host.folder,
            )  # fmt: skip
        with self._owners_lock:
            host.lives.append(Life(name, len(host.lives) + 1, host.proc.pid))
        return host

    def kill(self, name: str) -> Kill:
        """kill -9 host `name`, and wait for it.

        SIGSTOP first: the process is dead to the world from there on, but its
        sockets are still open, so the fakes can still name it as the sender
        of what it wrote just before (they may read it only after the kill)."""
        host = self.hosts[name]
        assert host.proc is not None
        kill = Kill(host.life, time.time(), time.monotonic())
        host.proc.send_signal(signal.SIGSTOP)
        with self._owners_lock:
            for end in tcp_ends(host.life.pid):
                self.graveyard[end] = host.life
        host.proc.send_signal(signal.SIGKILL)
        host.proc.wait()
        self.kills.append(kill)
        return kill

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every running host once it said READY=1 (as systemd does
        before it counts a service started); their exit statuses."""
        running = [h for h in self.hosts.values() if h.running]
        ready = {host.life.pid for host in running}
        if not _wait(lambda: ready <= self.notify.ready, timeout):
            raise AssertionError(f"never ready: {sorted(ready - self.notify.ready)}")
        for host in running:
            assert host.proc is not None
            host.proc.send_signal(signal.SIGTERM)
        statuses: dict[str, int | None] = {}
        for host in running:
            assert host.proc is not None
            try:
                statuses[host.name] = host.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                statuses[host.name] = None
        return statuses

    def logs(self) -> str:
        return "".join(host.log() for host in self.hosts.values())

    # --- what happened

    def executed(self, server: str) -> list[Executed]:
        return self.sync(lambda: list(self.rcon[server].command_log))

    def clients(self, server: str) -> list[object]:
        return self.sync(lambda: list(self.rcon[server].clients))

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        assert self._db is not None
        db = self._db
        return self.call(db.fetch(sql, *args))

    def journal(self) -> list[asyncpg.Record]:
        return self.fetch(
            "SELECT id, customer_id, item_id, server, event, command, status, created_at"
            " FROM journal ORDER BY id"
        )


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- leases as the database shows them ---------------------------------------------


class Holding(NamedTuple):
    holder: str
    pid: int | None  # the holder's process id, as its row in `hosts` says
    token: int
    taken_at: datetime
    seen: float  # time.time() when first seen so


class LeaseWatch:
    """Samples the fleet's `leases` table on a thread of its own (every
    `period` seconds): each lease's holders in order, with when each took it."""

    def __init__(self, fleet: Fleet, period: float = 0.1) -> None:
        self.fleet, self.period = fleet, period
        self.history: dict[str, list[Holding]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LeaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(asyncpg.UndefinedTableError):
                self.sample()

    def sample(self) -> None:
        rows = self.fleet.fetch(
            "SELECT l.name, l.holder, h.pid, l.token, l.taken_at"
            " FROM leases l LEFT JOIN hosts h ON h.host_id = l.holder"
        )
        now = time.time()
        for name, holder, pid, token, taken_at in rows:
            seen = self.history.setdefault(name, [])
            if not seen or seen[-1].token != token:
                seen.append(Holding(holder, pid, token, taken_at, now))

    def holder_at(self, lease: str, wall: float) -> Holding | None:
        before = [h for h in self.history.get(lease, []) if h.taken_at.timestamp() <= wall]
        return before[-1] if before else None

    def next_holder(self, lease: str, after: Holding) -> Holding | None:
        later = [h for h in self.history.get(lease, []) if h.token > after.token]
        return later[0] if later else None
