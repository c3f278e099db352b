"""Three hosts on one PostgreSQL schema, kill -9 at random moments.

Three `perksync` service processes share one state (store mode, webhooks to
any of them) while purchases, chargebacks and expiries arrive, and a loop
kills a random host with SIGKILL at least 30 times, restarting it each time.
Then, for every game server: every command that should run did (nothing
lost), a command ran twice only if it was the last one the killed process
sent there (the one in flight), a take-back never came before its grant and
each customer's commands came in journal order; and whenever the polling host
or a server's delivering host died, another host held that lease within one
interval.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.rcon_server import Executed
from tests.fakes.world import RCON_PASSWORD
from tests.fleet_rig import (
    INTERVAL,
    RCON_TIMEOUT,
    Fleet,
    Holding,
    Kill,
    LeaseWatch,
    Life,
    ServerSpec,
)
from tests.postgres_db import empty_schema
from tests.test_service_process import wait_until

# Alone among the timed tests (see tests/conftest.py), so a longer timeout.
pytestmark = [pytest.mark.usefixtures("one_timed_test_at_a_time"), pytest.mark.timeout(400)]

KILLS = 30
HOSTS = tuple(os.environ.get("FLEET_HOSTS", "abc"))
SERVERS = {
    "lobby": ServerSpec("minecraft"),
    "survival": ServerSpec("minecraft"),
    "arena": ServerSpec("source"),
}
PRODUCTS: dict[str, Any] = {
    "vip": {
        "on_active": ["grant {customer.id} {item.id}"],
        "on_expire": ["take {customer.id} {item.id} expired"],
        "on_revoke": ["take {customer.id} {item.id} {item.revoke_reason}"],
    },
    "kit": {"servers": ["survival"], "on_active": ["kit {customer.id} {item.id}"]},
}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with (
        empty_schema() as url,
        Fleet(tmp_path, url, SERVERS, dict.fromkeys(HOSTS), webhooks=True) as f,
    ):
        f.products = PRODUCTS
        for server in f.rcon.values():
            f.sync(
                setattr, server, "latency", 0.02
            )  # commands take time: kills catch some in flight
        yield f


@dataclass
class Shop:
    """Purchases, chargebacks and expiries on the Management fake, on a thread
    of its own, and the commands they call for."""

    fleet: Fleet
    rng: random.Random
    customers: list[str] = field(default_factory=list)
    owner: dict[str, str] = field(default_factory=dict)  # item → customer
    product: dict[str, str] = field(default_factory=dict)  # item → product
    ended: dict[str, str] = field(default_factory=dict)  # item → "expired" / "chargeback"
    webhooks: Counter[int] = field(default_factory=Counter)  # HTTP status → how many
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.15, 0.45)):
            roll = self.rng.random()
            if roll < 0.45:
                self.buy("vip")
            elif roll < 0.55:
                self.buy("vip", expires_in=self.rng.uniform(8, 14))
            elif roll < 0.70:
                self.buy("kit")
            elif roll < 0.88:
                self.end("chargeback")
            else:
                self.end("expired")

    def buy(self, product: str, expires_in: float | None = None) -> None:
        customer = self.rng.choice(self.customers)
        extra: dict[str, Any] = {}
        if expires_in is not None:
            extra["expires_at"] = datetime.now(UTC) + timedelta(seconds=expires_in)
        item = self.fleet.store_item(customer, product, **extra)
        self.owner[item], self.product[item] = customer, product
        if expires_in is not None:
            self.ended[item] = "expired"  # the local sweep takes it back
        if self.rng.random() < 0.3:
            self.webhook("ON_DELIVERY_ITEM_ADDED", item)

    def end(self, how: str) -> None:
        """Charge back, or expire at PayNow, a vip item granted everywhere."""
        candidates = [
            i for i, p in self.owner.items() if self.product[i] == "vip" and i not in self.ended
        ]
        granted = [i for i in candidates if self.granted_everywhere(i)]
        if not granted:
            return
        item = self.rng.choice(granted)
        store = self.fleet.management
        if how == "chargeback":
            self.fleet.sync(store.revoke, item, "chargeback")
            event = "ON_DELIVERY_ITEM_REVOKED"
        else:
            self.fleet.sync(store.expire, item)
            event = "ON_DELIVERY_ITEM_EXPIRED"
        self.ended[item] = how
        if self.rng.random() < 0.6:
            self.webhook(event, item)

    def granted_everywhere(self, item: str) -> bool:
        grant = f"grant {self.owner[item]} {item}"
        return all(grant in self.fleet.received(s) for s in SERVERS)

    def webhook(self, event: str, item: str) -> None:
        """To a random host: whichever receives it records it for the poller."""
        host = self.fleet.hosts[self.rng.choice(HOSTS)]
        url = f"http://127.0.0.1:{host.listen_port}/paynow/webhook"
        secret = self.fleet.webhook_secret
        assert secret is not None
        store = self.fleet.management
        try:
            result = self.fleet.call(store.send_webhook(url, event, item, secret), timeout=10)
        except (aiohttp.ClientError, TimeoutError):
            self.webhooks[0] += 1  # that host is down or starting: the poll finds the item
            return
        self.webhooks[result.status] += 1

    def expected(self, server: str) -> list[tuple[str, str | None]]:
        """(grant, take-back or None) per item routed to `server`."""
        out: list[tuple[str, str | None]] = []
        for item, customer in self.owner.items():
            product = self.product[item]
            if product == "kit":
                if server == "survival":
                    out.append((f"kit {customer} {item}", None))
                continue
            how = self.ended.get(item)
            out.append((f"grant {customer} {item}", how and f"take {customer} {item} {how}"))
        return out


def delivered_all(fleet: Fleet, shop: Shop) -> bool:
    for server in SERVERS:
        got = set(fleet.received(server))
        for grant, take in shop.expected(server):
            if grant not in got or (take is not None and take not in got):
                return False
    return True


def kill_loop(fleet: Fleet, rng: random.Random) -> None:
    """kill -9 a random host at a random moment, KILLS times, restarting it."""
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.3, 2.2))  # a random moment, not a condition
        victim = rng.choice(HOSTS)
        fleet.kill(victim)
        fleet.start(victim)


def test_three_hosts_killed_30_times_lose_nothing_and_repeat_only_in_flight(
    fleet: Fleet,
) -> None:
    rng = random.Random(20261201)
    shop = Shop(fleet, rng=random.Random(rng.random()))
    shop.customers = [fleet.store_customer("both")["id"] for _ in range(6)]
    for name in HOSTS:
        fleet.start(name)
    assert wait_until(lambda: bool(fleet.sync(fleet.management.requests)), timeout=30)
    shopping = threading.Thread(target=shop.run, daemon=True)
    with LeaseWatch(fleet) as leases:
        shopping.start()
        try:
            kill_loop(fleet, rng)
        finally:
            shop.stop.set()
            shopping.join(30)
        # Local expiries are due up to 14 s after the last purchase.
        assert wait_until(lambda: delivered_all(fleet, shop), timeout=45), missing(fleet, shop)
        statuses = fleet.stop_all()
    logs = fleet.logs()
    assert "Traceback" not in logs
    assert RCON_PASSWORD not in logs and fleet.management.api_key not in logs
    assert statuses == dict.fromkeys(HOSTS, 0), statuses
    assert len(fleet.kills) >= KILLS
    check_nothing_lost_or_invented(fleet, shop)
    check_repeats_only_in_flight(fleet, leases)
    check_order(fleet, shop)
    check_one_poller_at_a_time(fleet)
    check_takeover(fleet, leases)
    check_delivery_resumes(fleet, leases)
    # The run exercised what it claims to.
    assert sum(1 for i in shop.ended if shop.ended[i] == "chargeback") >= 5
    assert sum(1 for i in shop.ended if shop.ended[i] == "expired") >= 5
    assert shop.webhooks[200] >= 5, shop.webhooks


def missing(fleet: Fleet, shop: Shop) -> str:
    lines = []
    for server in SERVERS:
        got = set(fleet.received(server))
        for grant, take in shop.expected(server):
            for command in (grant, take):
                if command is not None and command not in got:
                    lines.append(f"{server}: {command}")
    return "never delivered:\n" + "\n".join(lines[:20])


def check_nothing_lost_or_invented(fleet: Fleet, shop: Shop) -> None:
    for server in SERVERS:
        expected = {c for pair in shop.expected(server) for c in pair if c is not None}
        assert set(fleet.received(server)) == expected, server
    unfinished = [r for r in fleet.journal() if r["status"] not in ("delivered", "cancelled")]
    assert not unfinished, unfinished[:5]


def check_repeats_only_in_flight(fleet: Fleet, leases: LeaseWatch) -> None:
    """A command ran again only if its earlier run was the last command a
    killed process ran on that server (the one in flight); at most one repeat
    per kill of the process delivering to that server."""
    killed = {kill.life for kill in fleet.kills}
    for server in SERVERS:
        log = fleet.executed(server)
        assert all(isinstance(run.client, Life) for run in log), "a command from nowhere"
        last_by: dict[object, Executed] = {}
        for run in log:
            last_by[run.client] = run
        runs: dict[str, list[Executed]] = {}
        for run in log:
            runs.setdefault(run.command, []).append(run)
        repeats = 0
        for command, each in runs.items():
            for earlier in each[:-1]:
                assert earlier.client in killed, (server, command, earlier.client)
                assert last_by[earlier.client] is earlier, (server, command, "not in flight")
                repeats += 1
        delivering = [k for k in fleet.kills if held_by(leases, f"server:{server}", k)]
        assert repeats <= len(delivering), (server, repeats, delivering)


def check_order(fleet: Fleet, shop: Shop) -> None:
    """Grant before take-back; each customer's commands on a server in journal order."""
    journal = fleet.journal()
    for server in SERVERS:
        received = list(dict.fromkeys(fleet.received(server)))  # first runs, in order
        position = {command: n for n, command in enumerate(received)}
        for grant, take in shop.expected(server):
            if take is not None:
                assert position[grant] < position[take], (server, grant, take)
        for customer in shop.customers:
            rows = [
                r["command"]
                for r in journal
                if r["server"] == server
                and r["customer_id"] == customer
                and r["status"] == "delivered"
            ]
            ran = [c for c in received if c in set(rows)]
            assert ran == list(dict.fromkeys(rows)), (server, customer)


def held_by(leases: LeaseWatch, lease: str, kill: Kill) -> Holding | None:
    """The killed process's holding of `lease` when it died (None: not its)."""
    held = leases.holder_at(lease, kill.wall)
    return held if held is not None and held.pid == kill.life.pid else None


def check_takeover(fleet: Fleet, leases: LeaseWatch) -> None:
    """Each lease the killed process held had another holder within one
    interval, and that host logged that it took it over, from whom."""
    delays: dict[str, list[float]] = {"poll": [], "server": []}
    lives = {life.pid: life for life in fleet.lives()}
    for kill in fleet.kills:
        for lease in leases.history:
            held = held_by(leases, lease, kill)
            if held is None:
                continue
            after = leases.next_holder(lease, held)
            assert after is not None and after.pid is not None, (lease, kill)
            delay = after.taken_at.timestamp() - kill.wall
            assert delay <= INTERVAL, (lease, kill, delay)
            delays["poll" if lease == "poll" else "server"].append(delay)
            role = "polling" if lease == "poll" else f"delivering to {lease.split(':', 1)[1]}"
            line = f"took over {role} (held by {socket.gethostname()} pid {kill.life.pid} until"
            assert line in fleet.hosts[lives[after.pid].host].log(), line
    # The kills did hit the poller, and servers' delivering hosts, many times.
    assert len(delays["poll"]) >= 5 and len(delays["server"]) >= 10, delays


def check_one_poller_at_a_time(fleet: Fleet) -> None:
    """Only one process reads PayNow at a time: the reads pass from one
    process to another only after the first was killed."""
    reads = fleet.sync(fleet.management.requests)
    nowhere = [r for r in reads if not isinstance(r.client, Life)]
    assert not nowhere, [
        (r.client, r.time, min((abs(k.mono - r.time), k) for k in fleet.kills)) for r in nowhere
    ]
    killed_at: dict[object, float] = {kill.life: kill.mono for kill in fleet.kills}
    for before, after in itertools.pairwise(reads):
        if after.client != before.client:
            assert killed_at.get(before.client, after.time) < after.time, (before, after)


def check_delivery_resumes(fleet: Fleet, leases: LeaseWatch) -> None:
    """When the process delivering to a server died, the commands journaled
    for that server meanwhile ran within one interval of the kill (or of
    their journaling, if later), plus one RCON timeout: the new holder's first
    send (connect, log in, command) is bounded by that, not by the lease."""
    created = {r["command"]: r["created_at"].timestamp() for r in reversed(fleet.journal())}
    measured = 0
    for server in SERVERS:
        runs = fleet.executed(server)
        first_run = {run.command: run for run in reversed(runs)}
        kills = [k for k in fleet.kills if held_by(leases, f"server:{server}", k)]
        for kill, following in itertools.zip_longest(kills, kills[1:]):
            to_mono = kill.wall - kill.mono  # the journal's times are wall-clock
            after = [r for r in first_run.values() if r.at > kill.mono and r.client != kill.life]
            if not after:
                continue
            resumed = min(r.at for r in after)
            if following is not None and following.mono < resumed:
                continue  # the next holder died too before it sent anything
            waited = [created[r.command] - to_mono for r in after if r.at >= resumed]
            since = max(kill.mono, min(waited))
            assert resumed - since <= INTERVAL + RCON_TIMEOUT, (server, kill, resumed - since)
            measured += 1
    assert measured >= 5, measured
