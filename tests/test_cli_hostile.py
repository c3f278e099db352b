"""End to end: odd or hostile PayNow answers and bad environment overrides, as
an operator sees them from the `perksync` CLI (a subprocess against the
loopback fakes). A broken answer fails its own customer, never the pass."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.world import World
from tests.test_cli_e2e import run, sync

GRANT = "lp user {customer.minecraft_uuid} parent add vip"
PRODUCTS: dict[str, Any] = {"vip": {"on_active": [GRANT]}}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


@pytest.mark.parametrize("path", ["customer", "items"])
def test_deeply_nested_answer_fails_that_customer_alone(world: World, path: str) -> None:
    """100,000 levels of JSON used to raise RecursionError out of the pass:
    exit 1, and the customers queued behind it were never polled."""
    customers = [world.add_customer(platform="minecraft", name=n) for n in ("amy", "bo", "cy")]
    for token, _ in customers:
        world.add_item(token, "vip")
    deep = "[" * 100_000 + "]" * 100_000
    world.sync(world.paynow.fault, customers[1][0], "body", body=deep, path=path, times=None)
    world.config(PRODUCTS, extra={"sync": {"concurrency": 1}})  # one after the other

    result = sync(world, expect=3)
    assert world.received("survival") == [
        f"lp user {customers[0][1]['minecraft_uuid']} parent add vip",
        f"lp user {customers[2][1]['minecraft_uuid']} parent add vip",
    ]
    (error,) = [line for line in result.stderr.splitlines() if "levels deep" in line]
    assert "customer token_file secrets/token1: PayNow " in error
    assert "JSON nested more than 32 levels deep" in error
    assert "3 customers polled (1 failed)" in result.stderr
    status = run(world, "status").stdout
    assert "token_file secrets/token1: never synced" not in status
    assert "nested more than 32 levels deep" in status


def test_lone_surrogate_in_a_name_refuses_only_the_command_using_it(world: World) -> None:
    """A name the API sends as "\\ud800Eve" cannot be UTF-8: it used to make
    SQLite raise on every pass, so none of that customer's grants ever ran."""
    eve_token, eve = world.add_customer(platform="minecraft", name="\ud800Eve")
    world.add_item(eve_token, "vip")
    zed_token, zed = world.add_customer(platform="minecraft", name="zed")
    world.add_item(zed_token, "vip")
    world.config({"vip": {"on_active": [GRANT, "say welcome {customer.name}"]}})

    result = sync(world, expect=3)  # a command failed in this pass
    assert world.received("survival") == [
        f"lp user {eve['minecraft_uuid']} parent add vip",
        f"lp user {zed['minecraft_uuid']} parent add vip",
        "say welcome zed",
    ]
    assert "customer.name contains a lone surrogate (U+D800) at offset 0" in result.stderr
    assert f"{eve['id']} (\\ud800Eve)" in result.stderr  # escaped in log lines
    status = run(world, "status").stdout
    assert f"customer {eve['id']} (\\ud800Eve), last synced" in status
    assert "survival: 0 pending, 1 failed, 0 skipped, 3 delivered" in status

    with sqlite3.connect(world.folder / "state.sqlite3") as db:
        name, raw = db.execute(
            "SELECT name, raw FROM customers WHERE customer_id = ?", (eve["id"],)
        ).fetchone()
        failed = db.execute("SELECT command, reason FROM journal WHERE status = 'failed'")
        assert failed.fetchall() == [
            (
                "say welcome {customer.name}",
                "customer.name contains a lone surrogate (U+D800) at offset 0",
            )
        ]
    assert name == "\\ud800Eve"  # as the JSON wrote it
    assert json.loads(raw)["name"] == "\ud800Eve"  # the JSON kept exactly as sent

    sync(world)  # nothing new, nothing again, and no error
    assert len(world.received("survival")) == 3


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("PERKSYNC_SYNC__INTERVAL_SECONDS", "soon", "Input should be a valid number"),
        ("PERKSYNC_SYNC__INTERVAL_SECONDS", "", "is empty"),
        ("PERKSYNC_PAYNOW", "https://api.paynow.gg", "only single keys"),
        ("PERKSYNC_CUSTOMERS", "[{bad json", "only single keys"),
    ],
)
def test_bad_environment_override_is_one_line_naming_the_variable(
    world: World, variable: str, value: str, words: str
) -> None:
    world.config(PRODUCTS)
    result = world.run_cli("--sync-now", env={variable: value})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"perksync: config error: {variable}: ")
    assert words in line
    assert world.sync(world.paynow.count) == 0
