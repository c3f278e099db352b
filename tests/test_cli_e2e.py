"""End to end: the `perksync` CLI as a subprocess against the loopback fakes.

Several passes with state changes between them; each test checks exactly
which commands every server received: the command line, routing, when
commands run and what must never happen.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.state.sqlite import latest_version
from tests.fakes.world import RCON_PASSWORD, REPO, World

PRODUCTS: dict[str, Any] = {
    "vip": {
        "servers": ["survival"],
        "on_active": ["lp user {customer.minecraft_uuid} parent add vip"],
        "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"],
        "on_revoke": [
            "lp user {customer.minecraft_uuid} parent remove vip",
            "say {customer.minecraft.name} lost vip: {item.revoke_reason}",
        ],
    },
    "warden": {
        "servers": ["jail"],
        "on_active": ['sm_addvip "{customer.steam_id2}" warden'],
        "on_expire": ['sm_removevip "{customer.steam_id2}"'],
        "on_revoke": ['sm_removevip "{customer.steam_id2}"'],
    },
    # No `servers`: every server, each only for customers with its platform's id.
    "kit": {"on_active": ["give {customer.name} diamond 1"]},
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
    for token in world.tokens:
        assert token not in output
    if expect is not None:
        assert result.returncode == expect, output
    return result


def sync(world: World, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return run(world, "--sync-now", expect=expect)


def steam2(steam_id: str) -> str:
    account = int(steam_id) - 76561197960265728
    return f"STEAM_0:{account & 1}:{account >> 1}"


def test_passes_grant_expire_and_revoke_exactly_once(world: World) -> None:
    alice_token, alice = world.add_customer(platform="minecraft", name="alice")
    bob_token, bob = world.add_customer(platform="steam", name="bob")
    vip = world.add_item(alice_token, "vip")
    vip2 = world.add_item(alice_token, "vip", state="usable")
    warden = world.add_item(bob_token, "warden")
    world.add_item(bob_token, "kit")
    world.add_item(alice_token, "unlisted-product")
    world.config(PRODUCTS)

    result = sync(world)
    mc, src = alice["minecraft_uuid"], steam2(bob["steam_id"])
    assert world.received("survival") == [f"lp user {mc} parent add vip"]
    assert sorted(world.received("jail")) == sorted(
        [f'sm_addvip "{src}" warden', "give bob diamond 1"]
    )
    assert "delivered server=survival" in result.stderr
    assert "pass done:" in result.stderr

    # Nothing changed: nothing is sent again.
    sync(world)
    assert len(world.received("survival")) == 1
    assert len(world.received("jail")) == 2

    world.set_state(alice_token, vip, "used")
    world.set_state(alice_token, vip2, "active")
    world.set_state(bob_token, warden, "revoked", "chargeback")
    sync(world)
    assert (
        world.received("survival")[1:]
        == [
            f"lp user {mc} parent add vip",  # vip2 activated before vip was used
            f"lp user {mc} parent remove vip",
        ]
        or world.received("survival")[1:]
        == [
            f"lp user {mc} parent remove vip",
            f"lp user {mc} parent add vip",
        ]
    )
    assert world.received("jail")[2:] == [f'sm_removevip "{src}"']

    world.set_state(alice_token, vip2, "revoked", "refund")
    sync(world)
    sync(world)
    assert world.received("survival")[3:] == [
        f"lp user {mc} parent remove vip",
        "say alice lost vip: refund",
    ]
    assert len(world.received("jail")) == 3


def test_first_sight_rules_and_renewed(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="carol")
    world.add_item(token, "vip", state="used")
    world.add_item(token, "vip", state="revoked")
    usable = world.add_item(token, "vip", state="usable")
    world.add_item(token, "vip", state="renewed")
    renewing = world.add_item(token, "vip", state="active")
    world.config(PRODUCTS)
    sync(world)
    uuid = customer["minecraft_uuid"]
    # Only the renewed and the active item are granted.
    assert world.received("survival") == [f"lp user {uuid} parent add vip"] * 2
    world.set_state(token, renewing, "renewed")
    world.set_state(token, usable, "active")
    sync(world)
    # renewed keeps the perk (nothing runs); the usable item is now granted.
    assert world.received("survival") == [f"lp user {uuid} parent add vip"] * 3


def test_server_down_keeps_commands_pending_and_others_unaffected(world: World) -> None:
    alice_token, alice = world.add_customer(platform="both", name="alice")
    vip = world.add_item(alice_token, "vip")
    world.add_item(alice_token, "warden")
    world.config(PRODUCTS)
    world.call(world.rcon["survival"].go_down())

    result = sync(world, expect=3)
    assert "server survival:" in result.stderr
    # The other server got its commands in the same pass.
    src = steam2(alice["steam_id"])
    assert world.received("jail") == [f'sm_addvip "{src}" warden']
    status = run(world, "status")
    assert "survival: 1 pending" in status.stdout

    # While it is still down, the item is revoked: the revoke queues behind the grant.
    world.set_state(alice_token, vip, "revoked", "admin")
    sync(world, expect=3)
    world.call(world.rcon["survival"].come_up())
    sync(world)
    uuid = alice["minecraft_uuid"]
    assert world.received("survival") == [
        f"lp user {uuid} parent add vip",
        f"lp user {uuid} parent remove vip",
        "say alice lost vip: admin",
    ]
    sync(world)
    assert len(world.received("survival")) == 3
    assert "survival: 0 pending" in run(world, "status").stdout


def test_broken_api_page_changes_nothing_until_it_is_whole(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="dave")
    items = [world.add_item(token, "vip") for _ in range(150)]  # two pages of 100
    other_token, other = world.add_customer(platform="minecraft", name="erin")
    world.add_item(other_token, "vip")
    world.config(PRODUCTS)
    sync(world)
    assert len(world.received("survival")) == 151

    for item in items[:120]:
        world.set_state(token, item, "used")
    world.add_item(other_token, "vip")
    world.sync(world.paynow.fault, token, "truncated", path="items", page=2, times=None)
    result = sync(world, expect=3)
    assert "dave" in result.stderr or "token_file" in result.stderr
    # No expiry was run for the broken customer; the healthy one was served.
    assert len(world.received("survival")) == 152
    assert world.received("survival")[-1] == f"lp user {other['minecraft_uuid']} parent add vip"

    world.sync(world.paynow.clear_faults)
    sync(world)
    removes = [c for c in world.received("survival") if c.endswith("remove vip")]
    assert removes == [f"lp user {customer['minecraft_uuid']} parent remove vip"] * 120


def test_rejected_token_fails_that_customer_only(world: World) -> None:
    good_token, good = world.add_customer(platform="minecraft", name="fay")
    world.add_item(good_token, "vip")
    bad_token, _ = world.add_customer(platform="minecraft", name="gus")
    world.add_item(bad_token, "vip")
    world.config(PRODUCTS)
    world.sync(world.paynow.remove_customer, bad_token)  # PayNow now answers 401
    result = sync(world, expect=3)
    assert world.received("survival") == [f"lp user {good['minecraft_uuid']} parent add vip"]
    assert "token_file secrets/token1" in result.stderr
    assert "1 failed" in result.stderr


def test_wrong_rcon_password_one_attempt_then_pending(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    world.config(PRODUCTS)
    world.sync(setattr, world.rcon["survival"], "password", "another-password")
    result = sync(world, expect=3)
    assert "password refused" in result.stderr
    assert world.sync(lambda: world.rcon["survival"].auth_attempts) == 1
    assert world.received("survival") == []
    world.sync(setattr, world.rcon["survival"], "password", RCON_PASSWORD)
    sync(world)
    assert len(world.received("survival")) == 1


def test_dry_run_prints_and_changes_nothing(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="hal")
    world.add_item(token, "vip")
    world.config(PRODUCTS)
    db = world.folder / "state.sqlite3"

    result = run(world, "--sync-now", "--dry-run")
    uuid = customer["minecraft_uuid"]
    assert result.stdout.splitlines() == [f"survival: lp user {uuid} parent add vip"]
    assert world.received("survival") == []
    assert world.sync(lambda: world.rcon["survival"].connections_accepted) == 0
    assert not db.exists()

    sync(world)
    assert len(world.received("survival")) == 1
    world.add_item(token, "vip")
    result = run(world, "--sync-now", "--dry-run")
    assert result.stdout.splitlines() == [f"survival: lp user {uuid} parent add vip"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 1
    assert len(world.received("survival")) == 1


def test_a_new_state_database_is_one_line_and_private(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    world.config(PRODUCTS)
    db = world.folder / "state.sqlite3"

    result = run(world, "--sync-now", "--dry-run")  # its scratch copy is not news
    assert "schema version" not in result.stderr
    assert "created" not in result.stderr

    result = run(world, "--sync-now")
    announced = [line for line in result.stderr.splitlines() if "schema version" in line]
    assert len(announced) == 1, result.stderr
    assert " INFO " in announced[0]
    assert announced[0].endswith(f"created state database {db} (schema version {latest_version()})")
    modes = {p.name: p.stat().st_mode & 0o777 for p in world.folder.glob("state.sqlite3*")}
    assert modes == {"state.sqlite3": 0o600, "state.sqlite3.lock": 0o600}

    result = run(world, "--sync-now")
    assert "schema version" not in result.stderr


def test_dry_run_shows_commands_pending_from_before(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="ida")
    world.add_item(token, "vip")
    world.config(PRODUCTS)
    world.call(world.rcon["survival"].go_down())
    sync(world, expect=3)
    result = run(world, "--sync-now", "--dry-run")
    assert f"survival: lp user {customer['minecraft_uuid']} parent add vip" in result.stdout


def test_hostile_names_are_never_sent(world: World) -> None:
    token, customer = world.add_customer(platform="both", name="x\nop mallory")
    world.add_item(token, "vip")
    world.add_item(token, "kit")
    semi_token, _semi = world.add_customer(platform="steam", name="bob; rcon_password x")
    world.add_item(semi_token, "kit")
    world.config(PRODUCTS)
    result = sync(world, expect=3)
    # The uuid-based grant went through; the name-based commands were refused.
    assert world.received("survival") == [f"lp user {customer['minecraft_uuid']} parent add vip"]
    assert world.received("jail") == []
    assert "newline" in result.stderr
    assert "x\nop mallory" not in result.stderr
    assert "x\\u000aop mallory" in result.stderr  # shown escaped, on one line
    status = run(world, "status")
    assert "survival: 0 pending, 1 failed" in status.stdout
    assert "jail: 0 pending, 2 failed" in status.stdout
    # Failed commands are not retried.
    sync(world)
    assert len(world.received("survival")) == 1


def test_semicolon_is_fine_on_minecraft(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft", name='a;b"c')
    world.add_item(token, "kit")
    world.config(PRODUCTS)
    sync(world)
    assert world.received("survival") == ['give a;b"c diamond 1']


def test_null_placeholder_skips_that_command_only(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="jay")
    world.add_item(token, "vip")
    products = {
        "vip": {
            "on_active": [
                "say {customer.steam.name} joined",  # steam is null for this customer
                "lp user {customer.minecraft_uuid} parent add vip",
            ]
        }
    }
    world.config(products, servers=["survival"])
    result = sync(world)
    assert world.received("survival") == [f"lp user {customer['minecraft_uuid']} parent add vip"]
    assert "skipped" in result.stderr and "customer.steam.name" in result.stderr
    assert "None" not in "".join(world.received("survival"))


def test_new_server_gets_active_items_on_next_pass(world: World) -> None:
    token, _customer = world.add_customer(platform="both", name="kim")
    world.add_item(token, "kit")
    world.config(PRODUCTS, servers=["survival"])
    products = {k: v for k, v in PRODUCTS.items() if k == "kit"}
    world.config(products, servers=["survival"])
    sync(world)
    assert world.received("survival") == ["give kim diamond 1"]
    world.config(products)  # jail joins
    sync(world)
    assert world.received("jail") == ["give kim diamond 1"]
    assert world.received("survival") == ["give kim diamond 1"]


def _links(world: World) -> dict[str, tuple[str | None, str | None, bytes | None]]:
    """label → (last sync, last error, digest), read from the state file directly."""
    with sqlite3.connect(world.folder / "state.sqlite3") as conn:
        rows = conn.execute("SELECT label, last_synced_at, last_error, digest FROM links")
        return {label: (synced, error, digest) for label, synced, error, digest in rows}


def test_unchanged_answers_only_record_the_sync(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="una")
    vip = world.add_item(token, "vip")
    world.add_item(token, "kit")
    world.config({"vip": PRODUCTS["vip"]})
    sync(world)
    assert world.received("survival") == [f"lp user {customer['minecraft_uuid']} parent add vip"]
    ((label, (synced, error, digest)),) = _links(world).items()
    assert digest is not None and error is None

    # A failed poll, then the same answers again: nothing runs, the error is
    # cleared and the sync time moves on (written in a batch at the end).
    world.sync(world.paynow.fault, token, "status", status=400)
    sync(world, expect=3)
    assert _links(world)[label][1] is not None
    sync(world)
    later, error, same = _links(world)[label]
    assert error is None and same == digest and later is not None and synced is not None
    assert later > synced
    assert len(world.received("survival")) == 1

    # Settings that change what the same answers mean are never skipped:
    # a product mapped since is granted although PayNow says the same.
    world.config({"vip": PRODUCTS["vip"], "kit": PRODUCTS["kit"]})
    sync(world)
    assert world.received("survival")[1:] == ["give una diamond 1"]
    assert _links(world)[label][2] not in (None, digest)

    # And any change at PayNow is diffed as ever.
    world.set_state(token, vip, "used")
    sync(world)
    assert world.received("survival")[2:] == [
        f"lp user {customer['minecraft_uuid']} parent remove vip"
    ]


def test_long_fragmented_replies(world: World) -> None:
    token, _ = world.add_customer(platform="both", name="lee")
    world.add_item(token, "kit")
    for server in world.rcon.values():
        world.sync(setattr, server, "reply", lambda command: "é" * 15000)
    world.config({"kit": PRODUCTS["kit"]})
    sync(world)
    assert world.received("survival") == ["give lee diamond 1"]
    assert world.received("jail") == ["give lee diamond 1"]


def test_check_config_and_bad_config_contact_nothing(world: World) -> None:
    world.add_customer(platform="minecraft")
    world.config(PRODUCTS)
    result = run(world, "--check-config")
    assert "OK" in result.stdout
    products = {"vip": {"on_active": ["lp user {customer.minecraft_uid} parent add vip"]}}
    world.config(products)
    result = run(world, "--sync-now", expect=2)
    assert result.stderr.strip().splitlines() == [
        "perksync: config error: products.vip.on_active[0]: unknown placeholder "
        "{customer.minecraft_uid} (did you mean {customer.minecraft_uuid}?)"
    ]
    assert world.sync(world.paynow.count) == 0
    assert world.sync(lambda: world.rcon["survival"].connections_accepted) == 0
    assert not (world.folder / "state.sqlite3").exists()


def test_usage_errors_exit_2(world: World) -> None:
    world.config(PRODUCTS)
    assert run(world, "--dry-run", expect=2).stderr.startswith("perksync: ")
    assert run(world, "--bogus", expect=2).stderr.startswith("perksync: ")


def test_status_lists_customers(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="mo")
    world.add_item(token, "vip")
    world.config(PRODUCTS)
    assert "never synced" in run(world, "status").stdout
    sync(world)
    out = run(world, "status").stdout
    assert f"customer {customer['id']} (mo), last synced 20" in out
    assert "survival: 0 pending, 0 failed, 0 skipped, 1 delivered" in out


def test_kill_9_mid_delivery_repeats_at_most_the_one_in_flight(world: World) -> None:
    token, _customer = world.add_customer(platform="minecraft", name="ned")
    for _ in range(40):
        world.add_item(token, "vip")
    world.config(
        {"vip": {"on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"]}}
    )
    world.sync(setattr, world.rcon["survival"], "latency", 0.03)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            "--config",
            str(world.folder / "config.yaml"),
            "--sync-now",
        ],
        cwd=world.folder,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while len(world.received("survival")) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got_before = len(world.received("survival"))
    assert 10 <= got_before < 40
    world.sync(setattr, world.rcon["survival"], "latency", 0.0)
    sync(world)
    received = world.received("survival")
    assert len(set(received)) == 40  # nothing lost
    assert len(received) - 40 <= 1  # at most the one in flight repeated


def warnings_about(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WARNING" in line and text in line]


def test_unmapped_product_is_warned_listed_and_can_be_ignored(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft", name="nia")
    other_token, _ = world.add_customer(platform="minecraft", name="oto")
    for _ in range(2):
        world.add_item(token, "vip")
    world.add_item(other_token, "vip", state="renewed")
    world.add_item(other_token, "vip", state="used")  # over: not counted
    world.add_item(other_token, "vip", state="usable")  # not granted yet: not counted
    world.add_item(token, "kit")
    products = {"vip-rank": PRODUCTS["vip"], "kit": PRODUCTS["kit"]}
    world.config(products)

    for args in (("--sync-now", "--dry-run"), ("--sync-now",), ("--sync-now",)):
        # The second real pass gets the same answers (not diffed again): the
        # warning stands all the same, and the exit status is unchanged.
        result = run(world, *args)
        (line,) = warnings_about(result.stderr, "product vip:")
        assert "3 live items (2 customers), but the config has no products.vip" in line
        assert "3 live items reach no server" in result.stderr
    assert world.received("survival") == ["give nia diamond 1"]
    status = run(world, "status").stdout
    assert "live items that reach no server: 3" in status
    assert "product vip: 3 live items (2 customers)" in status

    world.config({**products, "vip": "ignore"})
    result = sync(world)
    assert "no server" not in result.stderr
    assert "live items that reach no server: none" in run(world, "status").stdout


def test_ignore_is_the_only_word_a_product_may_be(world: World) -> None:
    world.config({"vip": "ignored"})
    result = run(world, "--check-config", expect=2)
    assert result.stderr.startswith("perksync: config error: products.vip: 'ignored' is not a")


def test_items_of_customers_without_the_needed_id_are_warned_and_listed(world: World) -> None:
    # An offline-mode store: no minecraft_uuid; and a customer without Steam.
    offline_token, offline = world.add_customer(platform="none", name="pat")
    world.add_item(offline_token, "vip")
    world.add_item(offline_token, "kit")
    mc_token, mc = world.add_customer(platform="minecraft", name="quin")
    world.add_item(mc_token, "warden")
    world.add_item(mc_token, "warden")
    world.add_item(mc_token, "kit")  # reaches survival: fine
    world.config(PRODUCTS)

    result = sync(world)
    assert world.received("survival") == ["give quin diamond 1"]
    assert world.received("jail") == []
    (vip,) = warnings_about(result.stderr, "product vip:")
    assert f"1 live item of customer {offline['id']} (pat)" in vip
    assert "reaches no server: the customer has no minecraft_uuid" in vip
    (kit,) = warnings_about(result.stderr, "product kit:")
    assert "no minecraft_uuid or steam_id" in kit and offline["id"] in kit
    (warden,) = warnings_about(result.stderr, "product warden:")
    assert f"2 live items of customer {mc['id']} (quin)" in warden
    assert "has no steam_id (warden goes to jail)" in warden
    assert "4 live items reach no server" in result.stderr

    status = run(world, "status").stdout
    assert "live items that reach no server: 4" in status
    assert f"product warden: 2 live items of customer {mc['id']} (quin)" in status
    # Unchanged answers: still warned, still listed.
    assert len(warnings_about(sync(world).stderr, "no server")) == 3

    # The customer links a Steam account: the perks go out, the warning ends.
    world.sync(world.paynow.update_customer, mc_token, steam_id="76561197960287930")
    result = sync(world)
    assert sorted(world.received("jail")) == sorted(
        ['sm_addvip "STEAM_0:0:11101" warden'] * 2 + ["give quin diamond 1"]
    )
    assert not warnings_about(result.stderr, "product warden:")
