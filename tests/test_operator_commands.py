"""The operator commands as an operator runs them: `perksync journal`,
`resend`, `adopt`, `cancel` and `retry`, as subprocesses against the
loopback fakes, with `--sync-now` passes between them.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
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


# --- journal ---------------------------------------------------------------------------


def test_journal_lists_rows_newest_first_with_filters_and_json(world: World) -> None:
    shop = Shop(world)
    rows = journal_json(world)
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert set(rows[0]) == {
        "id", "time", "server", "customer", "product", "item", "event", "resend", "status",
        "command", "reply",
    }  # fmt: skip
    take_back = next(r for r in rows if r["event"] == "on_expire")
    assert take_back == {
        "id": take_back["id"],
        "time": take_back["time"],
        "server": "survival",
        "customer": shop.bob["id"],
        "product": "vip-monthly",
        "item": shop.bob_vip,
        "event": "on_expire",
        "resend": False,
        "status": "delivered",
        "command": f"lp user {shop.uuid(shop.bob)} parent remove vip",
        "reply": take_back["reply"],
    }
    assert take_back["time"].endswith("Z") and take_back["time"][:2] == "20"

    jail = journal_json(world, "--server", "jail")
    assert [(r["customer"], r["command"]) for r in jail] == [
        (shop.dave["id"], "give dave diamond 64")
    ]
    bobs = journal_json(world, "--customer", shop.bob["id"])
    assert {r["customer"] for r in bobs} == {shop.bob["id"]} and len(bobs) == 4
    assert journal_json(world, "--status", "pending") == []
    # alice's second VIP item joined the perk: its grant is journaled kept.
    kept = journal_json(world, "--status", "kept")
    assert [(r["customer"], r["event"]) for r in kept] == [(shop.alice["id"], "on_active")]
    finished = journal_json(world, "--status", "delivered", "--status", "kept")
    assert len(finished) == len(rows)

    text = run(world, "journal", "--limit", "2").stdout.splitlines()
    assert len(text) == 2
    newest = rows[0]
    assert text[0].startswith(f"#{newest['id']} 20")
    assert f"server={newest['server']} customer={newest['customer']}" in text[0]
    assert f"event={newest['event']} {newest['status']}: {newest['command']}" in text[0]


def test_journal_before_any_pass_and_bad_arguments(world: World) -> None:
    world.config(PRODUCTS)
    assert "does not exist yet" in run(world, "journal").stdout
    assert run(world, "journal", "--json").stdout.strip() == "[]"
    assert not (world.folder / "state.sqlite3").exists()  # reading creates nothing
    for bad in (["--limit", "-1"], ["--limit", "x"], ["--status", "sent"], ["--bogus"]):
        result = run(world, "journal", *bad, expect=2)
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("perksync: ")


# --- cancel and retry -----------------------------------------------------------------


def test_cancel_a_pending_row_and_leave_others(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft", name="erin")
    world.add_item(token, "kit")
    world.add_item(token, "vip-monthly")
    world.config(PRODUCTS)
    world.call(world.rcon["survival"].go_down())
    sync(world, expect=3)
    pending = journal_json(world, "--status", "pending")
    kit = next(r for r in pending if r["product"] == "kit")

    result = run(world, "cancel", str(kit["id"]))
    assert result.stdout.splitlines() == [
        f"row {kit['id']}: cancelled (was pending): survival on_active of item {kit['item']}: "
        "give erin diamond 64"
    ]
    assert (
        run(world, "cancel", f"#{kit['id']}").stdout.strip()
        == f"row {kit['id']}: already cancelled"
    )

    world.call(world.rcon["survival"].come_up())
    sync(world)
    assert "give erin diamond 64" not in world.received("survival")
    assert len(world.received("survival")) == 2  # the VIP's two commands

    delivered = journal_json(world, "--status", "delivered")[0]
    result = run(world, "cancel", str(delivered["id"]), expect=3)
    assert result.stdout.strip() == (
        f"row {delivered['id']}: left as it is: it is delivered; only pending or waiting rows are"
    )
    result = run(world, "cancel", str(delivered["id"]), "99999", expect=2)
    assert result.stderr.strip() == "perksync: cancel: no journal row 99999"
    assert run(world, "cancel", "abc", expect=2).stderr.startswith("perksync: ")
    assert journal_json(world, "--status", "cancelled") == [{**kit, "status": "cancelled"}]


LONG = "say " + "x" * 1500  # over Minecraft's 1446 bytes: refused, failed


def test_retry_a_failed_row_renders_it_from_the_current_config(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="erin")
    item = world.add_item(token, "kit")
    products = {**PRODUCTS, "kit": {"on_active": ["give {customer.name} diamond 64", LONG]}}
    world.config(products)
    sync(world, expect=3)
    failed = journal_json(world, "--status", "failed")
    assert len(failed) == 1

    # Retried with the same config: refused again, said so, exit 3.
    result = run(world, "retry", str(failed[0]["id"]), expect=3)
    assert "(failed: command is 1504 bytes, over the minecraft limit of 1446)" in result.stdout
    again = journal_json(world, "--status", "failed")[0]
    assert again["resend"] and again["id"] > failed[0]["id"]

    # The older row was journaled again already: retry the newer one.
    result = run(world, "retry", str(failed[0]["id"]), expect=3)
    assert f"it was journaled again as row {again['id']} (failed): retry that one" in result.stdout

    products["kit"]["on_active"][1] = "say thanks {customer.name}"
    world.config(products)
    result = run(world, "retry", str(again["id"]))
    assert result.stdout.startswith(f"row {again['id']}: journaled again as row ")
    assert "(pending): survival: say thanks erin" in result.stdout
    sync(world)
    assert world.received("survival") == ["give erin diamond 64", "say thanks erin"]
    sync(world)
    assert len(world.received("survival")) == 2

    # A grant whose item was taken back since is not retried.
    world.set_state(token, item, "revoked", "chargeback")
    sync(world)
    delivered = journal_json(world, "--status", "delivered", "--customer", customer["id"])
    result = run(world, "retry", str(delivered[-1]["id"]), expect=3)
    assert "it is delivered; only failed or rejected rows are retried" in result.stdout


def reject(world: World, row_id: int, reply: str = "Unknown or incomplete command") -> None:
    """Mark a delivered row rejected, as delivery does when the server's reply
    is an error."""
    with db(world) as conn:
        conn.execute(
            "UPDATE journal SET status = 'rejected', reply = ? WHERE id = ?", (reply, row_id)
        )


def test_retry_rejected_journals_each_rejected_command_once(world: World) -> None:
    shop = Shop(world)
    survival = journal_json(world, "--server", "survival", "--customer", shop.bob["id"])
    kit = next(r for r in survival if r["product"] == "kit")
    jail = journal_json(world, "--server", "jail")[0]
    reject(world, kit["id"])
    reject(world, jail["id"])
    assert (
        journal_json(world, "--status", "rejected")[0]["reply"] == "Unknown or incomplete command"
    )
    before = {name: len(world.received(name)) for name in world.rcon}

    result = run(world, "retry", "--rejected", "--server", "survival")
    assert result.stdout.startswith(f"row {kit['id']}: journaled again as row ")
    assert "(pending): survival: give bob diamond 64" in result.stdout
    sync(world)
    assert world.received("survival")[before["survival"] :] == ["give bob diamond 64"]
    assert len(world.received("jail")) == before["jail"]

    # The rejected row was journaled again: a second --rejected passes it over.
    assert run(world, "retry", "--rejected", "--server", "survival").stdout.strip() == (
        "no rejected rows to retry"
    )
    run(world, "retry", "--rejected")
    sync(world)
    assert world.received("jail")[before["jail"] :] == ["give dave diamond 64"]
    assert run(world, "retry", "--rejected").stdout.strip() == "no rejected rows to retry"
    sync(world)
    assert world.received("survival")[before["survival"] :] == ["give bob diamond 64"]

    for bad in ([], [str(kit["id"]), "--rejected"], ["--server", "survival", str(kit["id"])]):
        assert run(world, "retry", *bad, expect=2).stderr.startswith("perksync: retry")


# --- retention ---------------------------------------------------------------------------


def test_a_pass_prunes_finished_rows_first_and_never_pending_ones(world: World) -> None:
    erin_token, _ = world.add_customer(platform="minecraft", name="erin")
    dave_token, dave = world.add_customer(platform="steam", name="dave")
    world.add_item(erin_token, "kit")
    world.add_item(dave_token, "kit")
    world.config(PRODUCTS, extra={"sync": {"journal_retention_days": 0}})
    world.call(world.rcon["jail"].go_down())
    sync(world, expect=3)  # erin's kit delivered on survival; dave's pending on jail
    assert len(journal_json(world)) == 2

    # Dry runs, status and journal never prune.
    run(world, "--sync-now", "--dry-run")
    run(world, "status")
    assert len(journal_json(world)) == 2

    result = sync(world, expect=3)
    assert "journal: pruned 1 finished rows older than 0 days" in result.stderr
    assert [(r["customer"], r["status"]) for r in journal_json(world)] == [(dave["id"], "pending")]
    world.call(world.rcon["jail"].come_up())
    sync(world)
    assert world.received("jail") == ["give dave diamond 64"]
    assert world.received("survival") == ["give erin diamond 64"]  # pruning repeats nothing


# --- beside a running service --------------------------------------------------------------


FAST = {"sync": {"interval_seconds": 1}}
# The heartbeat (which notices rows another process journaled) every second.
QUICK_HEARTBEAT = {"WATCHDOG_USEC": "2000000"}


@pytest.fixture
def service(world: World) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)
    log = world.service_log()
    assert "Traceback" not in log, log
    assert RCON_PASSWORD not in log


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_operator_commands_work_beside_a_running_service(
    world: World, service: list[subprocess.Popen[str]]
) -> None:
    token, _ = world.add_customer(platform="minecraft", name="erin")
    world.add_item(token, "kit")
    world.config(PRODUCTS, extra=FAST)
    service.append(world.start_service(env=QUICK_HEARTBEAT))
    assert wait_until(lambda: world.received("survival") == ["give erin diamond 64"])

    wipe(world, "survival")
    result = run(world, "resend", "--server", "survival")  # no state lock needed
    assert "journaled 1 commands" in result.stderr
    # The service delivers what another process journaled.
    assert wait_until(lambda: world.received("survival") == ["give erin diamond 64"])
    world.add_item(token, "vip-monthly")
    assert wait_until(lambda: len(world.received("survival")) == 3)
    assert world.received("survival")[0] == "give erin diamond 64"  # the resend, once
    rows = journal_json(world)
    assert [r["resend"] for r in rows if r["product"] == "kit"] == [True, False]
    assert run(world, "cancel", str(rows[0]["id"]), expect=3).stdout.count("left as it is") == 1
    assert service[0].poll() is None


def test_the_service_prunes_finished_rows_and_keeps_pending_ones(
    world: World, service: list[subprocess.Popen[str]]
) -> None:
    erin_token, _ = world.add_customer(platform="minecraft", name="erin")
    dave_token, _ = world.add_customer(platform="steam", name="dave")
    world.add_item(erin_token, "kit")
    world.add_item(dave_token, "kit")
    world.config(PRODUCTS, extra={"sync": {"interval_seconds": 1, "journal_retention_days": 0}})
    world.call(world.rcon["jail"].go_down())
    service.append(world.start_service())
    assert wait_until(lambda: world.received("survival") == ["give erin diamond 64"])
    assert wait_until(lambda: [r["status"] for r in journal_json(world)] == ["pending"])
    assert "journal: pruned 1 finished rows" in world.service_log()
    world.call(world.rcon["jail"].come_up())
    assert wait_until(lambda: world.received("jail") == ["give dave diamond 64"])


def test_one_customer_that_cannot_be_rendered_never_stops_the_others(world: World) -> None:
    erin_token, erin = world.add_customer(platform="minecraft", name="erin")
    finn_token, _ = world.add_customer(platform="minecraft", name="finn")
    erin_kit = world.add_item(erin_token, "kit")
    world.add_item(finn_token, "kit")
    products = {**PRODUCTS, "kit": {"on_active": [LONG]}}
    world.config(products)
    sync(world, expect=3)
    failed = journal_json(world, "--status", "failed")
    with db(world) as conn:  # a hand-edited database: erin's item is no JSON any more
        conn.execute("UPDATE items SET raw = 'not json' WHERE item_id = ?", (erin_kit,))
    products["kit"]["on_active"] = ["give {customer.name} diamond 64"]
    world.config(products)

    result = run(world, "retry", *(str(r["id"]) for r in failed), expect=3)
    assert f"customer {erin['id']} could not be read or changed" in result.stdout
    assert "(pending): survival: give finn diamond 64" in result.stdout
    sync(world)
    assert world.received("survival") == ["give finn diamond 64"]
