"""Live items that reach no server: the pure computation, and the watch's check
against a real SQLite store and the PayNow fake (answers skipped as unchanged,
a restart, a reload)."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings, load_settings
from daemon.paynow import StorefrontClient, make_session
from daemon.sources import Answer
from daemon.state import CustomerChange, CustomerRecord, LinkSync, LiveItems, SeenItem
from daemon.state.sqlite import SqliteStore
from daemon.undelivered import (
    Unmapped,
    Unroutable,
    describe_unmapped,
    describe_unroutable,
    find_undelivered,
    id_fields,
)
from daemon.wiring import Core
from tests.conftest import customer, item
from tests.fakes.paynow_api import FakePayNow

CONFIG = """
paynow:
  api_url: {url}
sync:
  state_db: state.sqlite3
customers:
{customers}
servers:
  survival: {{platform: minecraft, host: 127.0.0.1, port: 1, password: pw}}
  jail: {{platform: source, host: 127.0.0.1, port: 2, password: pw}}
products:
  vip:
    servers: [survival]
    on_active: ["lp user {{customer.minecraft_uuid}} parent add vip"]
  kit:
    on_active: ["give {{customer.name}} diamond 1"]
{more}
"""


def settings_for(
    tmp_path: Path,
    more: str = "",
    url: str = "http://127.0.0.1:9",
    tokens: Sequence[str] = ("tok-a", "tok-b"),
    labels: Sequence[str] = ("alice", "bob"),
) -> Settings:
    path = tmp_path / "config.yaml"
    customers = "".join(
        f"  - {{token: {token}, label: {label}}}\n"
        for token, label in zip(tokens, labels, strict=True)
    )
    text = CONFIG.format(url=url, customers=customers, more=textwrap.indent(more, "  "))
    path.write_text(text)
    return load_settings(path, env={})


NOW = datetime(2026, 1, 1, tzinfo=UTC)
MC = frozenset({"minecraft_uuid"})
STEAM = frozenset({"steam_id"})


def live(
    label: str, product: str, count: int = 1, ids: frozenset[str] | None = MC, **kw: Any
) -> LiveItems:
    customer = kw.get("customer", {"alice": "100", "bob": "200"}.get(label, "900"))
    return LiveItems(label, customer, kw.get("name"), product, count, ids)


def test_the_servers_route_by_their_platforms_id(tmp_path: Path) -> None:
    assert id_fields(settings_for(tmp_path)) == ["minecraft_uuid", "steam_id"]


def test_unmapped_products_are_counted_per_slug_unless_ignored(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "crate: ignore\n")
    found = find_undelivered(
        settings,
        [
            live("alice", "gem", 2),
            live("alice", "vip", 3),
            live("alice", "crate", 5),  # ignored
            live("bob", "gem", 1, ids=None),  # ids unknown: still unmapped
            live("bob", "aaa", 1),
        ],
    )
    assert found.unmapped == [Unmapped("aaa", 1, 1), Unmapped("gem", 3, 2)]
    assert found.unroutable == []
    assert found.items == 4
    assert found.per_product() == ({"aaa": 1, "gem": 3}, {})


def test_mapped_items_of_customers_lacking_every_needed_id_reach_no_server(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    found = find_undelivered(
        settings,
        [
            live("alice", "vip", 2, ids=STEAM, name="Al"),  # vip: survival only
            live("alice", "kit", 1, ids=STEAM),  # kit: every server; jail takes it
            live("bob", "kit", 4, ids=frozenset()),  # neither id
            live("bob", "vip", 1, ids=None),  # not known: not judged
        ],
    )
    assert found.unmapped == []
    assert found.unroutable == [
        Unroutable(
            "kit", "bob", "200", None, 4, ("minecraft_uuid", "steam_id"), ("survival", "jail")
        ),
        Unroutable("vip", "alice", "100", "Al", 2, ("minecraft_uuid",), ("survival",)),
    ]
    assert found.per_product() == ({}, {"kit": 4, "vip": 2})
    assert describe_unroutable(found.unroutable[0]) == (
        "product kit: 4 live items of customer 200 [bob] reach no server: the customer "
        "has no minecraft_uuid or steam_id (kit goes to survival, jail)"
    )
    assert describe_unroutable(found.unroutable[1]).startswith(
        "product vip: 2 live items of customer 100 (Al) [alice] reach no server"
    )


def test_links_not_configured_are_left_out_and_a_customer_linked_twice_counts_once(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    found = find_undelivered(
        settings,
        [
            live("alice", "gem", 2, customer="100"),
            live("bob", "gem", 2, customer="100"),  # the same customer again
            live("carol", "gem", 7, customer="300"),  # removed from the config
        ],
    )
    assert found.unmapped == [Unmapped("gem", 2, 1)]


def test_a_hostile_slug_stays_on_one_line() -> None:
    line = describe_unmapped(Unmapped("vip\nop mallory", 1, 1))
    assert "\n" not in line and "vip\\u000aop mallory" in line
    assert line.startswith("product vip\\u000aop mallory: 1 live item (1 customer), but the")


# --- the watch's check, on a real store ---------------------------------------------


class CountingStore(SqliteStore):
    live_reads = 0

    async def live_item_counts(self, id_fields: Sequence[str]) -> list[LiveItems]:
        self.live_reads += 1
        return await super().live_item_counts(id_fields)


def test_the_check_sees_unchanged_answers_and_restarts_and_reads_only_after_a_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.undelivered")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    async def main() -> None:
        async with FakePayNow() as fake, make_session() as session:
            tokens = [FakePayNow.new_token(), FakePayNow.new_token()]
            fake.add_customer(tokens[0], platform="minecraft", name="alice")
            fake.add_item(tokens[0], product="gem")
            fake.add_customer(tokens[1], platform="steam", name="bob")
            fake.add_item(tokens[1], product="vip")
            settings = settings_for(tmp_path, url=fake.url, tokens=tokens)
            store = CountingStore(tmp_path / "state.sqlite3")

            def started() -> tuple[Core, Any]:
                client = StorefrontClient(session, fake.url, requests_per_second=0)
                core = Core(settings, store)
                return core, core.token_source(client, cache_customers=True)

            first, source = started()
            for index, link in enumerate(settings.customers):
                assert await source.poll(index, link)
            found = await first.undelivered.check(first.applier.commits)
            assert [u.product for u in found.unmapped] == ["gem"]
            assert [(u.product, u.label) for u in found.unroutable] == [("vip", "bob")]
            assert len(warnings()) == 2 and store.live_reads == 1

            # Polls with the same answers store nothing: no need to read again.
            for index, link in enumerate(settings.customers):
                assert await source.poll(index, link)
            assert await first.undelivered.check(first.applier.commits) == found
            assert store.live_reads == 1
            # A change is read, and warned only where it is new.
            fake.add_item(tokens[0], product="gem")
            assert await source.poll(0, settings.customers[0])
            again = await first.undelivered.check(first.applier.commits)
            assert [u.items for u in again.unmapped] == [2]
            assert store.live_reads == 2 and len(warnings()) == 2
            # A reload checks and warns afresh.
            first.use_settings(settings)
            await first.undelivered.check(first.applier.commits)
            assert len(warnings()) == 4

            # A restart: the stored digests stand in for the answers, the check does not care.
            caplog.clear()
            second, _ = started()
            assert await second.undelivered.check(second.applier.commits) == again
            assert len(warnings()) == 2
            await store.close()

    asyncio.run(main())


def test_many_customers_lacking_an_id_are_warned_in_a_few_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = [f"c{i:02}" for i in range(13)]
    settings = settings_for(tmp_path, tokens=[f"t{i}" for i in range(13)], labels=labels)
    caplog.set_level(logging.WARNING, logger="daemon.undelivered")

    async def main() -> None:
        store = SqliteStore(tmp_path / "state.sqlite3")
        for i, label in enumerate(labels):
            customer_id = str(1000 + i)
            raw = json.dumps({"id": customer_id, "minecraft_uuid": None})
            async with store.customer(customer_id) as txn:
                await txn.commit(
                    CustomerChange(
                        NOW,
                        CustomerRecord(None, raw),
                        [SeenItem(f"{i}", "vip", "active")],
                        link=LinkSync(label, None),
                    )
                )
        core = Core(settings, store)
        found = await core.undelivered.check()
        assert len(found.unroutable) == 13
        await core.undelivered.check()  # nothing new: nothing logged
        await store.close()

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11
    assert all(line.startswith("product vip: 1 live item of customer 10") for line in lines[:10])
    assert lines[10] == (
        "and 3 more customers hold live items that reach no server for want of an id "
        "(perksync status lists them)"
    )


def test_an_answer_that_changes_nothing_does_not_count_as_a_commit(tmp_path: Path) -> None:
    """Store mode reads the newest item again at every new-items read: re-applying
    it stores nothing, so what reaches no server is not read again for it."""
    settings = settings_for(tmp_path, tokens=["t0"], labels=["alice"])

    async def main() -> None:
        store = CountingStore(tmp_path / "state.sqlite3")
        core = Core(settings, store)

        async def apply(*items: Any, **changes: Any) -> None:
            answer = Answer(customer(**changes), list(items), complete=False, read_at=NOW)
            await core.applier.apply(answer, label="alice")

        await apply(item("1", slug="gem"))
        await core.undelivered.check(core.applier.commits)
        assert store.live_reads == 1
        for _ in range(3):
            await apply(item("1", slug="gem"))
            await core.undelivered.check(core.applier.commits)
        assert store.live_reads == 1
        # A new item, or the customer's own record changing, is read again.
        await apply(item("1", slug="gem"), item("2", slug="gem"))
        await core.undelivered.check(core.applier.commits)
        assert store.live_reads == 2
        await apply(item("1", slug="gem"), item("2", slug="gem"), name="renamed")
        await core.undelivered.check(core.applier.commits)
        assert store.live_reads == 3
        await store.close()

    asyncio.run(main())
