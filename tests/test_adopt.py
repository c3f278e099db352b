"""`perksync adopt`: taking over a live store without giving anything again.

Token mode as an operator runs it (CLI subprocesses against the loopback
fakes); store mode in-process against the Management API fake, with real
passes after it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.adopt import adopt
from daemon.clock import SYSTEM_CLOCK
from daemon.config import load_settings
from daemon.state import open_store
from daemon.sync_pass import run_pass
from tests.fakes.paynow_store import FakeStore
from tests.fakes.rcon_server import FakeRconServer
from tests.fakes.world import World
from tests.test_operator_commands import PRODUCTS, journal_json, run, sync


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft", "jail": "source"}) as w:
        yield w


def test_adopt_records_live_items_and_a_pass_sends_only_what_changes(world: World) -> None:
    alice_token, alice = world.add_customer(platform="minecraft", name="alice")
    bob_token, bob = world.add_customer(platform="both", name="bob")
    monthly = world.add_item(alice_token, "vip-monthly")
    key = world.add_item(alice_token, "key")
    bob_kit = world.add_item(bob_token, "kit")  # on survival and jail
    world.add_item(bob_token, "kit", state="used")  # ended: nothing to record
    bob_later = world.add_item(bob_token, "kit", state="usable")  # not live yet
    world.config(PRODUCTS)

    dry = run(world, "adopt", "--dry-run")
    assert sorted(dry.stdout.splitlines()) == sorted(
        [
            f"would record: customer {alice['id']} (alice): item {monthly} (vip-monthly) "
            "granted on survival",
            f"would record: customer {alice['id']} (alice): item {key} (key) granted on survival",
            f"would record: customer {bob['id']} (bob): item {bob_kit} (kit) "
            "granted on survival, jail",
        ]
    )
    assert "dry run: adopt would record 3 live items of 2 customers" in dry.stderr
    assert not (world.folder / "state.sqlite3").exists()  # a dry run creates nothing

    result = run(world, "adopt")
    assert result.stdout == dry.stdout.replace("would record: ", "recorded: ")
    assert "adopt: recorded 3 live items of 2 customers as granted (4 item and server pairs)" in (
        result.stderr
    )
    assert journal_json(world) == []
    assert world.received("survival") == world.received("jail") == []

    # A pass sends nothing for what was adopted, and grants what is new.
    sync(world)
    assert world.received("survival") == world.received("jail") == []
    world.set_state(bob_token, bob_later, "active")
    new = world.add_item(alice_token, "kit")
    sync(world)
    assert sorted(world.received("survival")) == ["give alice diamond 64", "give bob diamond 64"]
    assert world.received("jail") == ["give bob diamond 64"]
    assert {r["item"] for r in journal_json(world)} == {bob_later, new}

    # An adopted item's take-back runs as for any item perksync granted.
    world.set_state(alice_token, monthly, "revoked", "chargeback")
    sync(world)
    assert world.received("survival")[-1] == f"lp user {alice['minecraft_uuid']} parent remove vip"

    # Adopting again records nothing more.
    assert run(world, "adopt").stdout == ""


STORE_PRODUCTS: dict[str, Any] = {
    "vip": {"on_active": ["lp user {customer.minecraft_uuid} parent add vip"],
            "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"]},
    "kit": {"on_active": ["give {customer.name} diamond 64"]},
}  # fmt: skip


def store_settings(tmp_path: Path, fake: FakeStore, rcon: FakeRconServer) -> Any:
    data = {
        "paynow": {"api_url": fake.url, "store_id": fake.store_id, "api_key": fake.api_key},
        "sync": {"state_db": "state.sqlite3"},
        "servers": {
            "survival": {
                "platform": "minecraft",
                "host": "127.0.0.1",
                "port": rcon.port,
                "password": "secret",
            },
        },
        "products": STORE_PRODUCTS,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(path, env={})


def test_store_mode_adopts_a_complete_snapshot(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeStore() as fake, FakeRconServer("minecraft", password="secret") as rcon:
            alice = fake.add_customer("minecraft", name="alice")
            bob = fake.add_customer("minecraft", name="bob")
            vip = fake.add_item(alice["id"], product="vip")
            fake.add_item(bob["id"], product="kit")
            later = fake.add_item(bob["id"], product="kit", state="usable")
            settings = store_settings(tmp_path, fake, rcon)
            store = open_store(str(settings.state_db_path))
            lines: list[str] = []
            adopted, failed = await adopt(settings, store, clock=SYSTEM_CLOCK, output=lines.append)
            assert (adopted.items, adopted.customers, failed) == (2, 2, 0)
            assert await store.journal() == []
            async with store.customer(alice["id"]) as txn:
                assert txn.known.items[vip["id"]].raw is not None
                assert json.loads(txn.known.customer_raw or "{}")["id"] == alice["id"]

            report = await run_pass(settings, store)
            assert (rcon.commands, report.journaled) == ([], 0)
            fake.activate(later["id"])
            fake.add_item(alice["id"], product="kit")
            await run_pass(settings, store)
            assert sorted(rcon.commands) == ["give alice diamond 64", "give bob diamond 64"]
            fake.expire(vip["id"])
            await run_pass(settings, store)
            assert rcon.commands[-1] == f"lp user {alice['minecraft_uuid']} parent remove vip"
            await store.close()

    asyncio.run(scenario())


def test_an_item_live_but_past_its_expiry_is_not_adopted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeStore() as fake, FakeRconServer("minecraft", password="secret") as rcon:
            bob = fake.add_customer("minecraft", name="bob")
            past = datetime.now(UTC) - timedelta(days=3)
            lapsed = fake.add_item(bob["id"], product="vip", expires_at=past)
            soon = fake.add_item(bob["id"], product="vip", expires_at=past + timedelta(days=5))
            settings = store_settings(tmp_path, fake, rcon)
            store = open_store(str(settings.state_db_path))
            lines: list[str] = []
            await adopt(settings, store, clock=SYSTEM_CLOCK, output=lines.append)
            assert lines == [
                f"customer {bob['id']} (bob): item {soon['id']} (vip) granted on survival"
            ]
            async with store.customer(bob["id"]) as txn:
                assert set(txn.known.marks) == {(soon["id"], "survival")}
                assert lapsed["id"] not in txn.known.items
            await store.close()

    asyncio.run(scenario())


def test_store_mode_adopt_from_the_command_line(tmp_path: Path) -> None:
    with World(tmp_path, {"survival": "minecraft"}, store=True) as world:
        alice = world.store_customer("minecraft", name="alice")
        vip = world.store_item(alice["id"], "vip")
        world.store_item(alice["id"], "kit", state="usable")
        world.config(STORE_PRODUCTS)
        result = run(world, "adopt")
        assert result.stdout.splitlines() == [
            f"recorded: customer {alice['id']} (alice): item {vip} (vip) granted on survival"
        ]
        sync(world)
        assert world.received("survival") == []
        world.store_item(alice["id"], "kit")
        sync(world)
        assert world.received("survival") == ["give alice diamond 64"]
