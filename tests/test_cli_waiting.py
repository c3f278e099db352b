"""What an operator sees of waiting and rejected commands: `perksync
--sync-now`, `--dry-run` and `status` as subprocesses against the loopback
fakes. The online-only and delayed rows are put in the state file as a pass
journals them, for a customer (Notch, 501) the pass does not poll, beside
one it does (alex), so log lines name Notch by id."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.state import CustomerChange, CustomerRecord, JournalEntry
from daemon.state.sqlite import SqliteStore
from tests.fakes.world import RCON_PASSWORD, World

NOTCH = {"id": "501", "name": "Notch", "minecraft_uuid": "069a79f4-44e9-4726-a5be-fca90e38aaf5"}
KIT = {"kit": {"on_active": ["say {customer.name} bought a kit"]}}
LIST = "minecraft:list uuids"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        token, _ = w.add_customer(platform="minecraft", name="alex")
        w.add_item(token, "kit")
        w.config(KIT)
        yield w


def seed(world: World, commands: Sequence[tuple[str, bool, float]]) -> None:
    """Journal (command, online, delay_seconds) rows for Notch on survival."""
    now = datetime.now(UTC)
    entries = [
        JournalEntry(
            customer_id=NOTCH["id"], item_id="901", product="kit", server="survival",
            event="on_active", cycle=1, command_index=index, command=command, online=online,
            not_before=now + timedelta(seconds=delay) if delay else None,
        )
        for index, (command, online, delay) in enumerate(commands)
    ]  # fmt: skip

    async def commit() -> None:
        store = SqliteStore(world.folder / "state.sqlite3")
        try:
            async with store.customer(NOTCH["id"]) as txn:
                record = CustomerRecord(NOTCH["name"], json.dumps(NOTCH))
                await txn.commit(CustomerChange(now, record, entries=entries))
        finally:
            await store.close()

    asyncio.run(commit())


def run(world: World, *args: str, expect: int) -> subprocess.CompletedProcess[str]:
    result = world.run_cli(*args)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output
    assert "Traceback" not in output
    assert RCON_PASSWORD not in output
    return result


def summary(result: subprocess.CompletedProcess[str]) -> str:
    [line] = [line for line in result.stderr.splitlines() if "pass done:" in line]
    return line


def survival_line(world: World) -> str:
    status = run(world, "status", expect=0).stdout
    [line] = [line for line in status.splitlines() if line.startswith("  survival:")]
    return line.strip()


def test_sync_now_sends_what_is_due_and_leaves_online_only_commands_waiting(world: World) -> None:
    seed(world, [("give Notch diamond 64", True, 0), ("say welcome Notch", False, 0)])

    first = run(world, "--sync-now", expect=0)  # waiting alone is not "undelivered"
    assert world.received("survival") == [LIST, "say alex bought a kit"]
    assert summary(first).endswith(
        "1 delivered, 0 failed, 0 skipped, 0 pending, 2 waiting (survival: 2)"
    )
    assert (
        "waiting server=survival customer=501 product=kit event=on_active: give Notch diamond 64 (for the player)"
        in first.stderr
    )
    assert survival_line(world) == (
        "survival: 0 pending, 0 failed, 0 skipped, 1 delivered, 2 waiting (1 for the player, 1 behind them)"
    )

    world.sync(setattr, world.rcon["survival"], "players", {"Notch": NOTCH["minecraft_uuid"]})
    second = run(world, "--sync-now", expect=0)
    assert world.received("survival")[2:] == [LIST, "give Notch diamond 64", "say welcome Notch"]
    assert summary(second).endswith("2 delivered, 0 failed, 0 skipped, 0 pending")
    assert survival_line(world) == "survival: 0 pending, 0 failed, 0 skipped, 3 delivered"

    run(world, "--sync-now", expect=0)
    assert len(world.received("survival")) == 5  # nothing again, not even the list


def test_a_delayed_command_waits_until_its_time_in_status(world: World) -> None:
    seed(world, [("crate give Notch vote 1", False, 3600)])
    run(world, "--sync-now", expect=0)
    line = survival_line(world)
    assert line.startswith(
        "survival: 0 pending, 0 failed, 0 skipped, 1 delivered, 1 waiting (1 until "
    )
    assert line.endswith(" UTC)")
    assert world.received("survival") == ["say alex bought a kit"]


def test_an_error_reply_rejects_the_command_and_the_pass_exits_3(world: World) -> None:
    world.sync(setattr, world.rcon["survival"], "known_commands", frozenset({"say"}))
    seed(world, [("lp usr Notch parent add vip", False, 0), ("say hi Notch", False, 0)])

    first = run(world, "--sync-now", expect=3)
    assert world.received("survival") == [
        "lp usr Notch parent add vip",
        "say hi Notch",  # a rejected command holds nothing back
        "say alex bought a kit",
    ]
    assert (
        "rejected server=survival customer=501 product=kit event=on_active: "
        "lp usr Notch parent add vip; the server answered: Unknown or incomplete command, "
        "see below for errorlp usr Notch parent add vip<--[HERE]"
    ) in first.stderr
    assert summary(first).endswith("2 delivered, 0 failed, 0 skipped, 1 rejected, 0 pending")
    status = run(world, "status", expect=0).stdout
    assert "survival: 0 pending, 0 failed, 0 skipped, 2 delivered, 1 rejected" in status
    assert "perksync journal --status rejected" in status

    run(world, "--sync-now", expect=0)  # not retried; that pass received no error
    assert len(world.received("survival")) == 3


def test_dry_run_prints_commands_that_may_wait_with_a_note(world: World) -> None:
    seed(world, [("give Notch diamond 64", True, 0), ("say welcome Notch", False, 0)])
    result = run(world, "--sync-now", "--dry-run", expect=0)
    # In id order: the rows from before, then this pass's.
    assert result.stdout.splitlines() == [
        "survival: give Notch diamond 64  (online only: waits for the player to be on the server)",
        "survival: say welcome Notch  (after this customer's waiting command above)",
        "survival: say alex bought a kit",
    ]
    assert world.received("survival") == []
    assert world.sync(lambda: world.rcon["survival"].connections_accepted) == 0


def test_dry_run_notes_a_delayed_command(world: World) -> None:
    seed(world, [("crate give Notch vote 1", False, 3600)])
    lines: list[str] = run(world, "--sync-now", "--dry-run", expect=0).stdout.splitlines()
    [delayed] = [line for line in lines if "crate" in line]
    assert delayed.startswith("survival: crate give Notch vote 1  (delayed: waits until ")
    assert delayed.endswith(" UTC)")
