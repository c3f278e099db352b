"""The operator commands as an operator runs them: `perksync journal`,
`resend`, `adopt`, `cancel` and `retry`, as subprocesses against the
loopback fakes, with `--sync-now` passes between them.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.world import RCON_PASSWORD, World

UUID = "{customer.minecraft_uuid}"
NAME = "{customer.minecraft.name}"

PRODUCTS: dict[str, Any] = {
    "vip-monthly": {
        "servers": ["survival"],
        "perk": "vip",
        "on_active": [
            f"lp user {UUID} parent add vip",
            {"run": f"say thanks {NAME} for {{item.product.slug}}", "per_item": True},
        ],
        "on_expire": [f"lp user {UUID} parent remove vip"],
        "on_revoke": [f"lp user {UUID} parent remove vip"],
    },
    "vip-yearly": {
        "servers": ["survival"],
        "perk": "vip",
        "on_active": [
            f"lp user {UUID} parent add vip",
            {"run": f"say thanks {NAME} for {{item.product.slug}}", "per_item": True},
        ],
        "on_expire": [f"lp user {UUID} parent remove vip"],
        "on_revoke": [f"lp user {UUID} parent remove vip"],
    },
    "kit": {"on_active": ["give {customer.name} diamond 64"]},
    "key": {"once": True, "on_active": ["crate give {customer.name} vote 1"]},
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft", "jail": "source"}) as w:
        yield w


def run(world: World, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = world.run_cli(*args)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert RCON_PASSWORD not in output
    if expect is not None:
        assert result.returncode == expect, output
    return result


def sync(world: World, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return run(world, "--sync-now", expect=expect)


def wipe(world: World, server: str) -> None:
    """A map wipe: the server forgets everything it was told."""
    world.sync(lambda: world.rcon[server].commands.clear())


def db(world: World) -> sqlite3.Connection:
    return sqlite3.connect(world.folder / "state.sqlite3")


def share_perk(world: World, perk: str, *item_ids: str) -> None:
    """Mark the items as granted under a shared perk, as the perk decisions
    store it (whichever item's grant ran the perk's commands)."""
    with db(world) as conn:
        conn.executemany(
            "UPDATE marks SET perk = ? WHERE item_id = ?", [(perk, i) for i in item_ids]
        )


def journal_json(world: World, *args: str) -> list[dict[str, Any]]:
    rows = json.loads(run(world, "journal", "--json", "--limit", "0", *args).stdout)
    assert isinstance(rows, list)
    return rows


class Shop:
    """Four customers after two passes: what is granted on survival now.

    - alice: vip-monthly and vip-yearly (one shared perk `vip`), a key (once);
    - bob: a kit, and a vip-monthly that expired (taken back);
    - carol: a kit charged back (revoked);
    - dave (Steam only): a kit, granted on jail alone.
    """

    def __init__(self, world: World) -> None:
        self.alice_token, self.alice = world.add_customer(platform="minecraft", name="alice")
        self.bob_token, self.bob = world.add_customer(platform="minecraft", name="bob")
        self.carol_token, self.carol = world.add_customer(platform="minecraft", name="carol")
        self.dave_token, self.dave = world.add_customer(platform="steam", name="dave")
        self.monthly = world.add_item(self.alice_token, "vip-monthly")
        self.yearly = world.add_item(self.alice_token, "vip-yearly")
        world.add_item(self.alice_token, "key")
        world.add_item(self.bob_token, "kit")
        self.bob_vip = world.add_item(self.bob_token, "vip-monthly")
        self.carol_kit = world.add_item(self.carol_token, "kit")
        world.add_item(self.dave_token, "kit")
        world.config(PRODUCTS)
        sync(world)
        world.set_state(self.bob_token, self.bob_vip, "used")
        world.set_state(self.carol_token, self.carol_kit, "revoked", "chargeback")
        sync(world)
        share_perk(world, "vip", self.monthly, self.yearly, self.bob_vip)

    def uuid(self, customer: dict[str, Any]) -> str:
        return str(customer["minecraft_uuid"])


# What a resend on survival must give each current holder, once.
def alice_grants(shop: Shop) -> list[str]:
    return [
        f"lp user {shop.uuid(shop.alice)} parent add vip",  # the perk, once (monthly holds it)
        "say thanks alice for vip-monthly",
        "say thanks alice for vip-yearly",  # the yearly item's own per_item command
    ]


BOB_GRANTS = ["give bob diamond 64"]


# --- resend --------------------------------------------------------------------------


def test_resend_after_a_wipe_delivers_exactly_the_current_holders_grants_once(
    world: World,
) -> None:
    shop = Shop(world)
    jail_before = world.received("jail")
    wipe(world, "survival")

    result = run(world, "resend", "--server", "survival")
    assert "resend: journaled 4 commands for 3 items of 2 customers on survival" in result.stderr
    assert "its product is once: true" in result.stderr  # alice's key, said so
    assert world.received("survival") == []  # resend only journals

    sync(world)
    assert sorted(world.received("survival")) == sorted(alice_grants(shop) + BOB_GRANTS)
    assert world.received("jail") == jail_before
    sync(world)
    assert len(world.received("survival")) == 4  # never twice

    resent = [r for r in journal_json(world, "--server", "survival") if r["resend"]]
    assert len(resent) == 4
    assert {r["status"] for r in resent} == {"delivered"}
    assert {r["event"] for r in resent} == {"on_active"}

    # A second wipe: resend again, each as its own new rows.
    wipe(world, "survival")
    run(world, "resend", "--server", "survival")
    sync(world)
    assert sorted(world.received("survival")) == sorted(alice_grants(shop) + BOB_GRANTS)
    assert len([r for r in journal_json(world) if r["resend"]]) == 8


def test_resend_dry_run_prints_the_commands_and_changes_nothing(world: World) -> None:
    shop = Shop(world)
    rows_before = journal_json(world)
    result = run(world, "resend", "--server", "survival", "--dry-run")
    assert sorted(result.stdout.splitlines()) == sorted(
        f"survival: {c}" for c in alice_grants(shop) + BOB_GRANTS
    )
    assert "dry run: resend would journal 4 commands" in result.stderr
    assert journal_json(world) == rows_before
    # `perksync --dry-run resend ...` is the same.
    again = run(world, "--dry-run", "resend", "--server", "survival")
    assert sorted(again.stdout.splitlines()) == sorted(result.stdout.splitlines())
    assert journal_json(world) == rows_before


def test_resend_for_one_customer_or_one_product(world: World) -> None:
    shop = Shop(world)
    only_bob = run(
        world, "resend", "--server", "survival", "--customer", shop.bob["id"], "--dry-run"
    )
    assert only_bob.stdout.splitlines() == [f"survival: {c}" for c in BOB_GRANTS]

    # A shared perk is resent only where an item of that product holds it:
    # the yearly item gets its own per_item command, not the rank again.
    yearly = run(world, "resend", "--server", "survival", "--product", "vip-yearly", "--dry-run")
    assert yearly.stdout.splitlines() == ["survival: say thanks alice for vip-yearly"]
    monthly = run(world, "resend", "--server", "survival", "--product", "vip-monthly")
    assert "journaled 2 commands for 1 items of 1 customers" in monthly.stderr
    wipe(world, "survival")
    sync(world)
    assert world.received("survival") == alice_grants(shop)[:2]


def test_resend_skips_a_grant_still_pending_and_it_is_delivered_once(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft", name="erin")
    world.add_item(token, "kit")
    world.config(PRODUCTS)
    world.call(world.rcon["survival"].go_down())
    sync(world, expect=3)  # survival down: the kit stays pending there

    result = run(world, "resend", "--server", "survival")
    assert "its on_active there is still pending" in result.stderr
    assert "journaled 0 commands" in result.stderr

    world.call(world.rcon["survival"].come_up())
    sync(world)
    assert world.received("survival") == ["give erin diamond 64"]
    assert [r["resend"] for r in journal_json(world, "--server", "survival")] == [False]


def test_resend_refuses_an_unknown_server_or_product(world: World) -> None:
    Shop(world)
    result = run(world, "resend", "--server", "lobby", expect=2)
    assert result.stderr.strip().splitlines() == [
        "perksync: resend --server lobby: no such server in the config (survival, jail)"
    ]
    result = run(world, "resend", "--server", "survival", "--product", "vipp", expect=2)
    assert "resend --product vipp: no such product in the config" in result.stderr
    assert run(world, "resend", expect=2).stderr.startswith("perksync: ")  # --server is required
