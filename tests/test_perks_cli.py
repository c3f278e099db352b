"""Shared perks as an operator runs them: `perksync --sync-now` as a subprocess
against the loopback fakes, killed with SIGKILL between two items' events."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.world import RCON_PASSWORD, World

RANK: dict[str, Any] = {
    "perk": "rank",
    "on_active": [
        "lp user {customer.minecraft_uuid} parent add vip",
        {"run": "say welcome {item.id}", "per_item": True},
    ],
    "on_revoke": [
        "lp user {customer.minecraft_uuid} parent remove vip",
        {"run": "say bye {item.id}", "per_item": True},
    ],
}
ITEMS = 12  # of each product


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


def sync(world: World, expect: int = 0) -> str:
    result = world.run_cli("--sync-now")
    output = result.stdout + result.stderr
    assert result.returncode == expect, output
    assert "Traceback" not in output and RCON_PASSWORD not in output
    return result.stderr


def killed_mid_delivery(world: World, after: int) -> int:
    """Start a pass on a slow server; SIGKILL it once `after` more commands
    arrived. How many had arrived when it died."""
    world.sync(setattr, world.rcon["survival"], "latency", 0.03)
    start = len(world.received("survival"))
    proc = subprocess.Popen(
        world.cli_command("--sync-now"),
        cwd=world.folder,
        env=world.cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while len(world.received("survival")) < start + after and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    world.sync(setattr, world.rcon["survival"], "latency", 0.0)
    return len(world.received("survival"))


def test_kill_9_between_two_items_events_loses_nothing_and_repeats_at_most_one(
    world: World,
) -> None:
    token, customer = world.add_customer(platform="minecraft", name="kim")
    items = [world.add_item(token, slug) for slug in ["vip_month", "vip_year"] * ITEMS]
    world.config({"vip_month": RANK, "vip_year": RANK})
    add = f"lp user {customer['minecraft_uuid']} parent add vip"
    remove = f"lp user {customer['minecraft_uuid']} parent remove vip"

    # The rank once, then a welcome per item; killed between two items' commands.
    got = killed_mid_delivery(world, after=5)
    assert 5 <= got < 1 + 2 * ITEMS
    sync(world)
    expected = [add] + [f"say welcome {i}" for i in items]
    received = world.received("survival")
    assert set(received) == set(expected)  # nothing lost
    assert len(received) - len(expected) <= 1  # at most the one in flight again
    assert Counter(received)[add] == 1 or received[:2] == [add, add]

    # Every item revoked: a bye per item, the rank taken back once, after the
    # last item's end; killed midway again.
    for item_id in items:
        world.set_state(token, item_id, "revoked", "refund")
    before = len(received)
    got = killed_mid_delivery(world, after=5)
    assert before + 5 <= got < before + 1 + 2 * ITEMS
    stderr = sync(world)
    after = world.received("survival")[before:]
    assert set(after) == {remove} | {f"say bye {i}" for i in items}
    assert len(after) - (1 + 2 * ITEMS) <= 1
    assert after[-2:] == [remove, f"say bye {items[-1]}"] and Counter(after)[remove] == 1
    # Nothing more on another pass; the stored grants say the rank is gone.
    sync(world)
    assert len(world.received("survival")) == before + len(after)
    assert "pass done:" in stderr


def test_a_kept_take_back_is_logged_and_sends_nothing(world: World) -> None:
    token, customer = world.add_customer(platform="minecraft", name="kay")
    month = world.add_item(token, "vip_month")
    world.add_item(token, "vip_year")
    world.config({"vip_month": RANK, "vip_year": RANK})
    sync(world)
    world.set_state(token, month, "revoked", "refund")
    stderr = sync(world)
    assert world.received("survival")[-1] == f"say bye {month}"
    assert (
        Counter(world.received("survival"))[
            f"lp user {customer['minecraft_uuid']} parent remove vip"
        ]
        == 0
    )
    [line] = [line for line in stderr.splitlines() if "on_revoke kept" in line]
    assert f"item {month} (vip_month) on_revoke kept on survival: perk rank" in line
