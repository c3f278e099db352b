"""`plan_resend`, the pure decision of `perksync resend`: which items of one
customer get their `on_active` journaled again on a server, with which
commands and which resend number, and which are skipped and why.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from daemon.config import Settings, load_settings
from daemon.diff import Mark, Phase
from daemon.resend import next_resend, plan_resend
from daemon.state import JournalRow, JournalStatus, KnownCustomer, StoredItem
from tests.conftest import MINECRAFT_CUSTOMER, customer, item_data

AT = datetime(2026, 1, 1, tzinfo=UTC)
UUID = MINECRAFT_CUSTOMER["minecraft_uuid"]
NOTCH = customer(MINECRAFT_CUSTOMER)

# Ids as PayNow's grow: the shorter is older, then by text.
OLD, NEW, NEWER = "99", "100", "101"


def vip(slug: str) -> dict[str, Any]:
    return {
        "servers": ["survival"],
        "perk": "vip",
        "on_active": [
            "lp user {customer.minecraft_uuid} parent add vip",
            {"run": "say thanks for {item.product.slug}", "per_item": True},
        ],
    }


PRODUCTS: dict[str, Any] = {
    "vip-monthly": vip("vip-monthly"),
    "vip-yearly": vip("vip-yearly"),
    "kit": {"on_active": ["give {customer.name} diamond 64", "say kit for {customer.name}"]},
    "key": {"once": True, "on_active": ["crate give {customer.name} vote 1"]},
}


def settings(tmp_path: Path, products: dict[str, Any] = PRODUCTS) -> Settings:
    data = {
        "customers": [{"token": "tok"}],
        "servers": {
            "survival": {"platform": "minecraft", "host": "127.0.0.1", "port": 1, "password": "pw"},
            "lobby": {"platform": "minecraft", "host": "127.0.0.1", "port": 2, "password": "pw"},
        },
        "products": products,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_settings(path, env={})


def known(
    *items: tuple[str, str, Mark], server: str = "survival", raw: bool = True
) -> KnownCustomer:
    """(item id, product, its mark on `server`)."""
    return KnownCustomer(
        items={
            item_id: StoredItem(
                product, "active", None, AT, _raw(item_id, product) if raw else None
            )
            for item_id, product, _ in items
        },
        marks={(item_id, server): mark for item_id, _, mark in items},
        customer_raw=json.dumps(MINECRAFT_CUSTOMER),
    )


def _raw(item_id: str, product: str) -> str:
    return json.dumps(item_data(item_id, "active", product))


def granted(perk: str | None = None, cycle: int = 1) -> Mark:
    return Mark(Phase.GRANTED, cycle, perk)


def row(
    item_id: str,
    event: str = "on_active",
    status: JournalStatus = JournalStatus.DELIVERED,
    *,
    row_id: int = 1,
    cycle: int = 1,
    resend: int = 0,
    server: str = "survival",
) -> JournalRow:
    return JournalRow(
        row_id, NOTCH.id, item_id, "kit", server, event, cycle, 0, "x", status, None, 1, AT,
        None, resend=resend,
    )  # fmt: skip


def lines(plan_entries: Any) -> list[tuple[str, str, int]]:
    return [(e.item_id, e.command, e.resend) for e in plan_entries]


def test_a_shared_perk_is_resent_once_by_its_oldest_item(tmp_path: Path) -> None:
    customer_known = known(
        (NEW, "vip-yearly", granted("vip")),
        (OLD, "vip-monthly", granted("vip")),
        (NEWER, "kit", granted()),
    )
    plan = plan_resend(settings(tmp_path), "survival", NOTCH, customer_known, [], at=AT)
    assert lines(plan.entries) == [
        (OLD, f"lp user {UUID} parent add vip", 1),
        (OLD, "say thanks for vip-monthly", 1),
        (NEW, "say thanks for vip-yearly", 1),  # only its per_item command
        (NEWER, "give Notch diamond 64", 1),
        (NEWER, "say kit for Notch", 1),
    ]
    assert plan.items == 3 and plan.skipped == []
    assert {e.event for e in plan.entries} == {"on_active"}
    assert {e.status for e in plan.entries} == {JournalStatus.PENDING}


def test_the_holder_is_the_oldest_item_whose_product_is_still_sold(tmp_path: Path) -> None:
    products = {k: v for k, v in PRODUCTS.items() if k != "vip-monthly"}
    customer_known = known(
        (OLD, "vip-monthly", granted("vip")), (NEW, "vip-yearly", granted("vip"))
    )
    plan = plan_resend(settings(tmp_path, products), "survival", NOTCH, customer_known, [], at=AT)
    assert lines(plan.entries) == [
        (NEW, f"lp user {UUID} parent add vip", 1),
        (NEW, "say thanks for vip-yearly", 1),
    ]
    assert [(s.item_id, s.why) for s in plan.skipped] == [
        (OLD, "its product is no longer in the config")
    ]


def test_a_holder_on_its_way_is_not_replaced_by_another_item(tmp_path: Path) -> None:
    customer_known = known(
        (OLD, "vip-monthly", granted("vip")), (NEW, "vip-yearly", granted("vip"))
    )
    rows = [row(OLD, status=JournalStatus.WAITING, row_id=7)]
    plan = plan_resend(settings(tmp_path), "survival", NOTCH, customer_known, rows, at=AT)
    assert lines(plan.entries) == [(NEW, "say thanks for vip-yearly", 1)]
    assert [(s.item_id, s.why) for s in plan.skipped] == [
        (OLD, "its on_active there is still waiting (row 7)")
    ]


def test_product_filter_resends_a_perk_only_where_that_product_holds_it(tmp_path: Path) -> None:
    customer_known = known(
        (OLD, "vip-monthly", granted("vip")),
        (NEW, "vip-yearly", granted("vip")),
        (NEWER, "kit", granted()),
    )
    config = settings(tmp_path)
    yearly = plan_resend(config, "survival", NOTCH, customer_known, [], product="vip-yearly", at=AT)
    assert lines(yearly.entries) == [(NEW, "say thanks for vip-yearly", 1)]
    monthly = plan_resend(
        config, "survival", NOTCH, customer_known, [], product="vip-monthly", at=AT
    )
    assert [e.item_id for e in monthly.entries] == [OLD, OLD]


def test_skips_once_products_open_grants_take_backs_and_other_routes(tmp_path: Path) -> None:
    products = {**PRODUCTS, "vip-yearly": {**vip("vip-yearly"), "servers": ["lobby"]}}
    customer_known = known(
        ("1", "key", granted()),
        ("2", "kit", granted()),
        ("3", "kit", granted(cycle=2)),
        ("4", "vip-yearly", granted("vip")),
        ("5", "kit", granted(cycle=2)),
    )
    rows = [
        row("2", status=JournalStatus.PENDING, row_id=10),
        row("3", "on_expire", JournalStatus.PENDING, row_id=11, cycle=2),
        row("5", "on_expire", JournalStatus.DELIVERED, row_id=12, cycle=1),  # an older cycle
        row("5", status=JournalStatus.PENDING, row_id=13, server="lobby"),  # another server
    ]
    plan = plan_resend(settings(tmp_path, products), "survival", NOTCH, customer_known, rows, at=AT)
    assert [(s.item_id, s.why) for s in plan.skipped] == [
        ("1", "its product is once: true (never resent)"),
        ("2", "its on_active there is still pending (row 10)"),
        ("3", "its take-back is journaled (row 11)"),
        ("4", "its product no longer goes to survival"),
    ]
    assert {e.item_id for e in plan.entries} == {"5"}


def test_only_granted_marks_on_that_server_count(tmp_path: Path) -> None:
    customer_known = known(
        ("1", "kit", Mark(Phase.ENDED, 1)),
        ("2", "kit", Mark(Phase.LAPSED, 1)),
    )
    other = known(("3", "kit", granted()), server="lobby")
    config = settings(tmp_path)
    assert plan_resend(config, "survival", NOTCH, customer_known, [], at=AT).entries == []
    assert plan_resend(config, "survival", NOTCH, other, [], at=AT).entries == []


def test_an_item_without_stored_json_is_skipped(tmp_path: Path) -> None:
    plan = plan_resend(
        settings(tmp_path), "survival", NOTCH, known(("1", "kit", granted()), raw=False), [], at=AT
    )
    assert plan.entries == []
    assert [s.why for s in plan.skipped] == ["no JSON of it is stored to render from"]


def test_each_resend_numbers_past_the_items_highest_row() -> None:
    rows = [
        row("1", resend=0),
        row("1", resend=2),
        row("1", resend=5, cycle=2),  # another grant of the item
        row("1", resend=7, server="lobby"),
        row("2", resend=9),
    ]
    assert next_resend(rows, "1", "survival", 1) == 3
    assert next_resend(rows, "1", "survival", 2) == 6
    assert next_resend(rows, "3", "survival", 1) == 1


def test_rows_are_rendered_with_the_current_config(tmp_path: Path) -> None:
    products = {**PRODUCTS, "kit": {"on_active": ["give {customer.name} emerald 1"]}}
    plan = plan_resend(
        settings(tmp_path, products), "survival", NOTCH, known(("1", "kit", granted())), [], at=AT
    )
    assert lines(plan.entries) == [("1", "give Notch emerald 1", 1)]
