"""Store mode as an operator runs it: `perksync --sync-now`, `--dry-run`,
`--check-config` and `status` as subprocesses against the loopback
Management fake and an RCON fake."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.world import RCON_PASSWORD, World

VIP: dict[str, Any] = {
    "on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"],
    "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip {item.id} expired"],
    "on_revoke": [
        "lp user {customer.minecraft_uuid} parent remove vip {item.id} {item.revoke_reason}"
    ],
}
PRODUCTS = {"vip": VIP}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}, store=True) as w:
        yield w


def run(world: World, *args: str, expect: int) -> subprocess.CompletedProcess[str]:
    result = world.run_cli(*args)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output
    assert "Traceback" not in output
    assert world.management.api_key not in output
    assert RCON_PASSWORD not in output
    return result


def uuid(world: World, customer_id: str) -> str:
    return str(world.management.customer(customer_id)["minecraft_uuid"])


def grant(world: World, customer_id: str, item_id: str) -> str:
    return f"lp user {uuid(world, customer_id)} parent add vip {item_id}"


def ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def test_sync_now_grants_the_live_items_without_paging_through_history(world: World) -> None:
    steve = world.store_customer(name="Steve")["id"]
    old_items = {
        state: world.store_item(steve, state=state, added_at=ago(40 - n))
        for n, state in enumerate(["used", "revoked", "active", "used"])
    }
    world.config(PRODUCTS)

    run(world, "--sync-now", expect=0)
    assert world.received("survival") == [grant(world, steve, old_items["active"])]
    queries = [r.query for r in world.management.requests()]
    assert queries[0] == {"limit": "1", "asc": "false"}
    assert all(q.get("activeOnly") == "true" for q in queries[1:]), queries


def test_sync_now_delivers_a_purchase_an_expiry_and_a_chargeback_exactly_once(
    world: World,
) -> None:
    steve = world.store_customer(name="Steve")["id"]
    world.config(PRODUCTS)
    run(world, "--sync-now", expect=0)
    assert world.received("survival") == []

    bought = world.store_item(steve, expirable=True)
    charged = world.store_item(steve)
    run(world, "--sync-now", expect=0)
    run(world, "--sync-now", expect=0)
    assert world.received("survival") == [grant(world, steve, bought), grant(world, steve, charged)]

    world.sync(world.management.expire, bought)
    world.sync(world.management.revoke, charged, "chargeback")
    run(world, "--sync-now", expect=0)
    run(world, "--sync-now", expect=0)
    who = uuid(world, steve)
    assert world.received("survival")[2:] == [
        f"lp user {who} parent remove vip {bought} expired",
        f"lp user {who} parent remove vip {charged} chargeback",
    ]


def test_a_failed_read_exits_3_and_changes_nothing(world: World) -> None:
    steve = world.store_customer(name="Steve")["id"]
    world.store_item(steve, added_at=ago(3))
    world.config(PRODUCTS)
    world.sync(world.management.fault, "status", path="store_items", status=401, times=None)

    result = run(world, "--sync-now", expect=3)
    assert "new items failed" in result.stderr
    assert "snapshot failed" in result.stderr
    assert "pass done: 2 store reads (2 failed)" in result.stderr
    assert world.received("survival") == []
    status = run(world, "status", expect=0).stdout
    assert "last snapshot: never" in status
    assert "last new-items read: never" in status


def test_dry_run_prints_the_commands_and_changes_nothing(world: World) -> None:
    steve = world.store_customer(name="Steve")["id"]
    vip = world.store_item(steve, added_at=ago(3))
    world.config(PRODUCTS)

    result = run(world, "--sync-now", "--dry-run", expect=0)
    assert result.stdout.splitlines() == [f"survival: {grant(world, steve, vip)}"]
    assert world.received("survival") == []
    assert not (world.folder / "state.sqlite3").exists()

    run(world, "--sync-now", expect=0)
    assert world.received("survival") == [grant(world, steve, vip)]
    assert run(world, "--sync-now", "--dry-run", expect=0).stdout == ""


def test_check_config_says_store_mode(world: World) -> None:
    world.config(PRODUCTS)
    out = run(world, "--check-config", expect=0).stdout
    assert f"store mode (store {world.management.store_id})" in out
    assert world.management.count() == 0  # nothing was contacted


def test_status_summarises_the_store(world: World) -> None:
    steve = world.store_customer(name="Steve")["id"]
    alex = world.store_customer(name="Alex")["id"]
    for customer in (steve, alex):
        world.store_item(customer, added_at=ago(3))
    gone = world.store_item(alex, added_at=ago(2))
    world.config(PRODUCTS)
    before = run(world, "status", expect=0).stdout
    assert "does not exist yet" in before
    assert f"store {world.management.store_id} (store mode)" in before

    run(world, "--sync-now", expect=0)
    world.sync(world.management.conceal, gone)  # listed nowhere any more
    run(world, "--sync-now", expect=0)
    out = run(world, "status", expect=0).stdout
    assert "customers seen: 2, live items: 3" in out
    assert "last snapshot: never" not in out
    assert "last new-items read: never" not in out
    assert "last webhook: never (webhooks off)" in out
    assert f"PayNow no longer lists (they stay granted): 1: {gone}" in out
    assert "survival: 0 pending, 0 failed, 0 skipped, 3 delivered" in out
    assert "customers (" not in out  # no list of every customer


@pytest.mark.parametrize("first", ["token", "store"])
def test_switching_modes_on_one_database_grants_nothing_twice(world: World, first: str) -> None:
    steve = world.store_customer(name="Steve")["id"]
    kept = world.store_item(steve, added_at=ago(3))
    ended = world.store_item(steve, added_at=ago(2))
    world.link_by_token(steve)
    world.config(PRODUCTS, mode=first)
    run(world, "--sync-now", expect=0)
    assert sorted(world.received("survival")) == sorted(
        [grant(world, steve, kept), grant(world, steve, ended)]
    )

    second = "store" if first == "token" else "token"
    world.sync(world.management.revoke, ended, "refund")
    bought = world.store_item(steve)
    world.tokens.clear()
    world.link_by_token(steve)  # the Storefront's view of the same items, now
    world.config(PRODUCTS, mode=second)
    run(world, "--sync-now", expect=0)
    run(world, "--sync-now", expect=0)
    assert world.received("survival")[2:] == [
        f"lp user {uuid(world, steve)} parent remove vip {ended} refund",
        grant(world, steve, bought),
    ]
