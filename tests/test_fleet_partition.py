"""A host cut off from the database stops sending before another takes over.

Two hosts on one PostgreSQL schema, each reaching it through a forwarder of
its own. The host holding every lease is cut off (its forwarder holds
everything, its connections stay open: a network gone silent) while
purchases keep arriving. It must stop reading PayNow and sending RCON
within its lease, before the other host starts; the other host delivers
everything; once the network is back, nothing is lost and at most the
command in flight on each server ran twice.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.fleet.timing import LeaseTiming
from tests.fakes.rcon_server import Executed
from tests.fakes.world import RCON_PASSWORD
from tests.fleet_rig import INTERVAL, RCON_TIMEOUT, Fleet, Life, ServerSpec
from tests.postgres_db import empty_schema
from tests.test_service_process import wait_until

# Alone among the timed tests (see tests/conftest.py), so a longer timeout.
pytestmark = [pytest.mark.usefixtures("one_timed_test_at_a_time"), pytest.mark.timeout(400)]

SERVERS = {"lobby": ServerSpec("minecraft"), "survival": ServerSpec("minecraft")}
PRODUCTS: dict[str, Any] = {"vip": {"on_active": ["grant {customer.id} {item.id}"]}}
LEASE = LeaseTiming.of(INTERVAL, RCON_TIMEOUT).lease_seconds


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    hosts = {"a": None, "b": None}
    with empty_schema() as url, Fleet(tmp_path, url, SERVERS, hosts, db_links=True) as f:
        f.products = PRODUCTS
        for server in f.rcon.values():
            f.sync(setattr, server, "latency", 0.05)
        yield f


def holds_everything(fleet: Fleet, life: Life) -> bool:
    with contextlib.suppress(asyncpg.UndefinedTableError):  # not yet made
        rows = fleet.fetch("SELECT l.name FROM leases l JOIN hosts h ON h.host_id = l.holder"
                           " WHERE h.pid = $1 AND l.expires_at > now()", life.pid)  # fmt: skip
        return {r["name"] for r in rows} == {"poll", *(f"server:{s}" for s in SERVERS)}
    return False


def runs_by(fleet: Fleet, server: str, life: Life) -> list[Executed]:
    return [run for run in fleet.executed(server) if run.client == life]


def test_a_host_cut_off_from_the_database_stops_before_another_starts(fleet: Fleet) -> None:
    customers = [fleet.store_customer("minecraft")["id"] for _ in range(4)]
    grants: list[str] = []
    stop = threading.Event()

    def shop() -> None:
        n = 0
        while not stop.wait(0.15):
            customer = customers[n % len(customers)]
            grants.append(f"grant {customer} {fleet.store_item(customer, 'vip')}")
            n += 1

    a = fleet.start("a").life
    assert wait_until(lambda: holds_everything(fleet, a), timeout=30)
    b = fleet.start("b").life
    shopping = threading.Thread(target=shop, daemon=True)
    shopping.start()
    try:
        assert wait_until(lambda: all(len(runs_by(fleet, s, a)) >= 5 for s in SERVERS), 30)
        link = fleet.hosts["a"].db_link
        assert link is not None
        fleet.sync(link.flowing.clear)
        cut = time.monotonic()
        assert wait_until(lambda: all(len(runs_by(fleet, s, b)) >= 5 for s in SERVERS), 30)
        reads = fleet.sync(fleet.management.requests)
        fleet.sync(link.flowing.set)
    finally:
        stop.set()
        shopping.join(10)
    assert wait_until(lambda: all(set(grants) <= set(fleet.received(s)) for s in SERVERS), 30)
    statuses = fleet.stop_all()

    for server in SERVERS:
        last_of_a = runs_by(fleet, server, a)[-1]
        first_of_b = runs_by(fleet, server, b)[0]
        assert last_of_a.at <= cut + LEASE, (server, last_of_a.at - cut)
        assert last_of_a.at < first_of_b.at, server  # never two senders at once
        runs = fleet.executed(server)
        assert sorted({run.command for run in runs}) == sorted(grants), server
        repeated = [run for run in runs if [r.command for r in runs].count(run.command) > 1]
        assert len(repeated) <= 2, repeated  # the command in flight, twice at most
        assert all(run.command == last_of_a.command for run in repeated), repeated
    a_reads = [r for r in reads if r.client == a and r.time > cut + LEASE]
    assert not a_reads, f"host a read PayNow {a_reads[0].time - cut:.1f}s after it was cut off"
    log = fleet.hosts["a"].log()
    assert "cannot renew the leases" in log
    assert "Traceback" not in fleet.logs() and RCON_PASSWORD not in fleet.logs()
    assert statuses == {"a": 0, "b": 0}, statuses
