"""Rendering events into journal rows: command options (online, delays), the
`kept` rows of shared perks, `per_item` commands, and the product rules the
diff is given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon.config import Settings, load_settings
from daemon.diff import Event, EventKind, Share
from daemon.render import journal_entries, product_rules
from daemon.state import JournalEntry, JournalStatus
from tests.conftest import ITEM_A, MINECRAFT_CUSTOMER, customer, item

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

CONFIG = """
paynow: {api_url: "http://127.0.0.1:9"}
sync: {state_db: state.sqlite3, expiry_grace_seconds: 30}
customers: [{token: tok}]
servers:
  survival: {platform: minecraft, host: 127.0.0.1, port: 1, password: pw}
products:
  vip:
    perk: rank
    on_active:
      - lp user {customer.minecraft_uuid} parent add vip
      - {run: "say welcome {customer.minecraft.name}", online: true, per_item: true}
      - {run: "give {customer.minecraft.name} diamond 1", delay_seconds: 90}
    on_revoke:
      - lp user {customer.minecraft_uuid} parent remove vip
      - {run: "ban {customer.minecraft.name} {item.revoke_reason}", per_item: true}
  keys:
    once: true
    on_active: ["crate give {customer.minecraft.name} 1"]
"""


def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return load_settings(path, env={})


def rows(
    tmp_path: Path, kind: EventKind, share: Share, state: str = "active"
) -> list[JournalEntry]:
    event = Event(item(ITEM_A, state), "survival", kind, 1, AT, share)
    return journal_entries(settings(tmp_path), customer(MINECRAFT_CUSTOMER), [event], at=AT)


def test_command_options_go_on_the_rows_which_start_pending(tmp_path: Path) -> None:
    grant = rows(tmp_path, EventKind.ACTIVE, Share.OWN)
    assert [(r.command_index, r.status, r.online, r.not_before) for r in grant] == [
        (0, JournalStatus.PENDING, False, None),
        (1, JournalStatus.PENDING, True, None),
        (2, JournalStatus.PENDING, False, AT + timedelta(seconds=90)),
    ]
    assert grant[1].command == "say welcome Notch"


def test_a_joining_grant_keeps_all_but_its_per_item_commands(tmp_path: Path) -> None:
    grant = rows(tmp_path, EventKind.ACTIVE, Share.JOINED)
    assert [r.status for r in grant] == [
        JournalStatus.KEPT,
        JournalStatus.PENDING,  # per_item: the welcome of its own item
        JournalStatus.KEPT,
    ]
    assert grant[0].reason == "the shared perk is already held here by another item"
    # Kept rows still say what was not sent.
    assert grant[0].command == "lp user 069a79f4-44e9-4726-a5be-fca90e38aaf5 parent add vip"


def test_a_kept_take_back_sends_only_its_per_item_commands(tmp_path: Path) -> None:
    revoke = rows(tmp_path, EventKind.REVOKE, Share.KEPT, state="revoked")
    assert [(r.status, r.command) for r in revoke] == [
        (
            JournalStatus.KEPT,
            "lp user 069a79f4-44e9-4726-a5be-fca90e38aaf5 parent remove vip",
        ),
        (JournalStatus.PENDING, "ban Notch chargeback"),
    ]
    assert revoke[0].reason == "the shared perk is still held here by another item"
    own = rows(tmp_path, EventKind.REVOKE, Share.OWN, state="revoked")
    assert [r.status for r in own] == [JournalStatus.PENDING] * 2


def test_a_kept_command_is_kept_even_when_it_could_not_be_rendered(tmp_path: Path) -> None:
    event = Event(item(ITEM_A), "survival", EventKind.ACTIVE, 1, AT, Share.JOINED)
    nameless = customer(MINECRAFT_CUSTOMER, minecraft=None)
    grant = journal_entries(settings(tmp_path), nameless, [event], at=AT)
    assert [r.status for r in grant] == [
        JournalStatus.KEPT,
        JournalStatus.SKIPPED,  # per_item, and its placeholder is null
        JournalStatus.KEPT,
    ]


def test_product_rules_name_perks_one_time_products_and_the_grace(tmp_path: Path) -> None:
    rules = product_rules(settings(tmp_path))
    assert dict(rules.perks) == {"vip": "rank"}
    assert rules.once == frozenset({"keys"})
    assert rules.grace == timedelta(seconds=30)
