"""Two sites, two hosts each, one PostgreSQL schema: RCON stays in its site.

Every game server belongs to a site ("eu" or "us"), and so does every host.
Purchases for every server arrive; the host delivering to one site's servers
is killed, and its site's other host takes over. Each RCON fake names the
process behind every connection: only hosts of its own site ever connect.

With network namespaces (root, iproute2), each site's hosts run in a
namespace of their own where only their site's RCON fakes (and PostgreSQL and
PayNow, through forwarders) can be reached, so the network itself, not only
perksync, keeps RCON inside its site.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.world import RCON_PASSWORD
from tests.fleet_rig import Fleet, Life, ServerSpec, netns_unavailable
from tests.postgres_db import empty_schema
from tests.test_service_process import wait_until

# Alone among the timed tests (see tests/conftest.py), so a longer timeout.
pytestmark = [pytest.mark.usefixtures("one_timed_test_at_a_time"), pytest.mark.timeout(400)]

SERVERS = {
    "eu-lobby": ServerSpec("minecraft", "eu"),
    "eu-arena": ServerSpec("source", "eu"),
    "us-lobby": ServerSpec("minecraft", "us"),
    "us-arena": ServerSpec("source", "us"),
}
HOSTS = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "us-2": "us"}
PRODUCTS: dict[str, Any] = {
    "vip": {
        "on_active": ["grant {customer.id} {item.id}"],
        "on_revoke": ["take {customer.id} {item.id} {item.revoke_reason}"],
    }
}


@pytest.fixture(params=["loopback", "netns"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    netns = request.param == "netns"
    if netns and (why := netns_unavailable()) is not None:
        pytest.skip(f"no network namespaces: {why}")
    with empty_schema() as url, Fleet(tmp_path, url, SERVERS, HOSTS, netns=netns) as f:
        f.products = PRODUCTS
        yield f


def buy(fleet: Fleet, customers: list[str], count: int) -> list[str]:
    """`count` purchases; the grant command each calls for on every server."""
    grants = []
    for n in range(count):
        customer = customers[n % len(customers)]
        grants.append(f"grant {customer} {fleet.store_item(customer, 'vip')}")
    return grants


def delivered(fleet: Fleet, commands: list[str]) -> bool:
    return all(set(commands) <= set(fleet.received(server)) for server in SERVERS)


def deliverer(fleet: Fleet, server: str) -> Life:
    """The process that ran the last command on `server`."""
    client = fleet.executed(server)[-1].client
    assert isinstance(client, Life), client
    return client


def test_each_host_connects_only_to_its_own_sites_servers(fleet: Fleet) -> None:
    customers = [fleet.store_customer("both")["id"] for _ in range(3)]
    if fleet.networks:
        check_network_keeps_sites_apart(fleet)
    for name in HOSTS:
        fleet.start(name)
    grants = buy(fleet, customers, 6)
    assert wait_until(lambda: delivered(fleet, grants), timeout=60)

    # The host delivering to each site's lobby dies; its site's other host takes over.
    killed = {site: deliverer(fleet, f"{site}-lobby") for site in ("eu", "us")}
    for life in killed.values():
        fleet.kill(life.host)
    grants += buy(fleet, customers, 6)
    assert wait_until(lambda: delivered(fleet, grants), timeout=60)
    for site, life in killed.items():
        assert deliverer(fleet, f"{site}-lobby").host != life.host
        fleet.start(life.host)
    grants += buy(fleet, customers, 3)
    assert wait_until(lambda: delivered(fleet, grants), timeout=60)
    check_status(fleet)
    statuses = fleet.stop_all()

    for server, spec in SERVERS.items():
        clients = fleet.clients(server)
        assert clients and all(isinstance(c, Life) for c in clients), (server, clients)
        foreign = {c.host for c in clients if isinstance(c, Life)} - own_hosts(spec.site)
        assert not foreign, f"{server} ({spec.site}) was contacted by {foreign}"
        assert sorted(fleet.received(server)) == sorted(grants), server
    for host in fleet.hosts.values():
        log = host.log()
        assert "Traceback" not in log and RCON_PASSWORD not in log
        for server, spec in SERVERS.items():
            if spec.site != host.site:
                assert f"server {server}:" not in log, (host.name, server)
    assert statuses == dict.fromkeys(HOSTS, 0), statuses


def check_status(fleet: Fleet) -> None:
    """`perksync status` lists every running host with its site, and each
    delivers to servers of its own site only."""
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(fleet.hosts["eu-1"].folder / "config.yaml"),
         "status"],
        capture_output=True, text=True, timeout=60, env=fleet.cli_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {
        int(line.split(" pid ")[1].split(",")[0]): line
        for line in result.stdout.splitlines()
        if " pid " in line and ", site " in line
    }
    for host in fleet.hosts.values():
        line = lines[host.life.pid]
        assert f", site {host.site}: " in line, line
        doing = line.split(": ", 1)[1].split(";")[0]
        named = {s for s in SERVERS if re.search(rf"\b{s}\b", doing)}
        assert all(SERVERS[s].site == host.site for s in named), line
    delivering = [line for line in lines.values() if "delivering to" in line]
    assert delivering, result.stdout


def own_hosts(site: str | None) -> set[str]:
    return {name for name, host_site in HOSTS.items() if host_site == site}


def check_network_keeps_sites_apart(fleet: Fleet) -> None:
    """From inside each site's namespace its own RCON fakes answer and the
    other site's cannot be reached at all."""
    for site, network in fleet.networks.items():
        for server, spec in SERVERS.items():
            fake = fleet.rcon[server]
            probe = (
                "import socket; socket.create_connection"
                f"(({fake.host!r}, {fake.port}), timeout=2).close()"
            )
            result = subprocess.run(
                network.command([sys.executable, "-c", probe]),
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if spec.site == site:
                assert result.returncode == 0, (site, server, result.stderr)
            else:
                assert "Network is unreachable" in result.stderr, (site, server, result.stderr)
    for fake in fleet.rcon.values():
        fleet.sync(fake.clients.clear)  # the probes were no hosts
