"""Several hosts: the site keys' rules, the lease timing a shared state needs,
and the settings fingerprint every host of one database must share (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import ConfigError, Settings, load_settings
from daemon.fleet.fingerprint import fingerprint, short
from daemon.fleet.timing import LeaseTiming

GRANT = "lp user {customer.minecraft_uuid} parent add vip"
PG = "postgresql://perksync@db.example:5432/perksync"


def config(
    *,
    sites: dict[str, str | None] | None = None,
    site: str | None = None,
    state_db: str = PG,
    interval: float = 60,
    timeout: float = 5,
    products: dict[str, Any] | None = None,
    hosts: dict[str, str] | None = None,
    password: str = "rcon-SECRET",
) -> str:
    """A config.yaml with servers lobby (eu) and arena (us) unless `sites` says."""
    sites = {"lobby": "eu", "arena": "us"} if sites is None else sites
    servers: dict[str, Any] = {}
    for port, (name, server_site) in enumerate(sites.items(), start=25575):
        servers[name] = {
            "platform": "minecraft", "host": (hosts or {}).get(name, "10.0.0.1"),
            "port": port, "password": password, "timeout_seconds": timeout,
        }  # fmt: skip
        if server_site is not None:
            servers[name]["site"] = server_site
    sync: dict[str, Any] = {"state_db": state_db, "interval_seconds": interval}
    if site is not None:
        sync["site"] = site
    data = {
        "paynow": {"api_url": "http://127.0.0.1:9"},
        "sync": sync,
        "customers": [{"token": "tok-SECRET"}],
        "servers": servers,
        "products": {"vip": {"on_active": [GRANT]}} if products is None else products,
    }
    return yaml.safe_dump(data, sort_keys=False)


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_settings(path, env={})


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).splitlines()


def test_a_host_of_a_site_delivers_to_that_sites_servers_only(tmp_path: Path) -> None:
    settings = load(tmp_path, config(site="eu"))
    assert settings.sync.site == "eu"
    assert settings.servers["arena"].site == "us"
    assert settings.own_servers == ["lobby"]


def test_a_host_reads_only_its_own_sites_rcon_passwords(tmp_path: Path) -> None:
    data = yaml.safe_load(config(site="eu"))
    for name in ("lobby", "arena"):
        del data["servers"][name]["password"]
        data["servers"][name]["password_file"] = f"rcon-{name}"
    (tmp_path / "rcon-lobby").write_text("lobby-SECRET\n")
    settings = load(tmp_path, yaml.safe_dump(data))  # rcon-arena is at the other site only
    assert settings.servers["lobby"].secret.get_secret_value() == "lobby-SECRET"
    data["sync"]["site"] = "us"
    assert errors(tmp_path, yaml.safe_dump(data)) == [
        f"servers.arena.password_file: cannot read {tmp_path.resolve()}/rcon-arena: "
        "No such file or directory"
    ]


def test_without_sites_every_host_delivers_to_every_server(tmp_path: Path) -> None:
    settings = load(tmp_path, config(sites={"lobby": None, "arena": None}))
    assert settings.own_servers == ["lobby", "arena"]


def test_once_a_server_has_a_site_every_server_and_the_host_need_one(tmp_path: Path) -> None:
    assert errors(tmp_path, config(sites={"lobby": "eu", "arena": None})) == [
        "servers.arena.site: not set, but other servers have sites (eu): give every server "
        "a site, or none",
        "sync.site: not set, but the servers have sites: name this host's (eu)",
    ]


def test_the_hosts_site_must_be_one_a_server_has(tmp_path: Path) -> None:
    assert errors(tmp_path, config(site="asia")) == [
        "sync.site: no server has site 'asia' (eu, us)"
    ]
    assert errors(tmp_path, config(sites={"lobby": None, "arena": None}, site="eu")) == [
        "sync.site: no server has a site: set servers.<name>.site, or remove sync.site"
    ]


def test_sites_need_a_postgresql_state(tmp_path: Path) -> None:
    assert errors(tmp_path, config(site="eu", state_db="state.sqlite3")) == [
        "sync.site: sites are for several hosts sharing a postgresql:// sync.state_db; with "
        "SQLite there is one host"
    ]


def test_a_site_name_is_a_plain_name(tmp_path: Path) -> None:
    (line,) = errors(tmp_path, config(site="eu west"))
    assert line.startswith("sync.site: String should match pattern")


def test_a_shared_state_needs_leases_that_outlive_the_rcon_timeout(tmp_path: Path) -> None:
    assert errors(tmp_path, config(site="eu", interval=15, timeout=5)) == [
        "sync.interval_seconds: 15 is too short for servers.lobby.timeout_seconds 5 on a "
        "postgresql:// state: hosts take over within one interval, so a lease lasts 7.5s, and "
        "a host sends only while its lease outlives the RCON timeout; make "
        "sync.interval_seconds more than 15, or the timeout shorter"
    ]
    assert load(tmp_path, config(site="eu", interval=16, timeout=5)).sync.interval_seconds == 16
    # One host on SQLite holds no lease: any interval does.
    sqlite = config(sites={"lobby": None, "arena": None}, state_db="s.db", interval=1, timeout=5)
    assert load(tmp_path, sqlite).sync.interval_seconds == 1


@pytest.mark.parametrize("interval", [3, 4, 10, 41, 60, 300, 3600, 86_400])
@pytest.mark.parametrize("timeout", [0.5, 1, 5, 20, 60])
def test_leases_are_taken_over_within_one_interval(interval: float, timeout: float) -> None:
    timing = LeaseTiming.of(interval, timeout)
    # A dead holder's lease runs out, and the next tick of another host takes it.
    assert timing.lease_seconds + timing.renew_seconds <= interval
    assert timing.renew_seconds <= 5
    # More than three times the timeout is always enough to send between renewals.
    if interval > 3 * timeout:
        assert timing.sends(timeout)


def test_the_fingerprint_follows_servers_sites_addresses_and_products(tmp_path: Path) -> None:
    base = fingerprint(load(tmp_path, config(site="eu")))
    assert len(base) == 64 and short(base) == base[:12]
    same = [
        config(site="us"),  # the host's own site is not the fleet's settings
        config(site="eu", password="another-SECRET"),  # never a secret
        config(site="eu", interval=30, timeout=2),
    ]
    for text in same:
        assert fingerprint(load(tmp_path, text)) == base
    other = [
        config(site="eu", sites={"lobby": "eu", "arena": "eu"}),
        config(site="eu", hosts={"arena": "10.0.0.2"}),
        config(site="eu", products={"vip": {"on_active": [GRANT + " x"]}}),
        config(site="eu", products={"vip": "ignore"}),
        config(sites={"lobby": "eu", "arena2": "us"}, site="eu"),
    ]
    prints = {fingerprint(load(tmp_path, text)) for text in other}
    assert len(prints) == len(other) and base not in prints
