"""What an operator sees when a game server's answer does not confirm a command:
`perksync --sync-now` as a subprocess against the loopback fakes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fakes.world import RCON_PASSWORD, World

PRODUCTS = {
    "warden": {"servers": ["jail"], "on_active": ['sm_addvip "{customer.steam_id2}" warden']},
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"jail": "source"}) as w:
        yield w


def sync(world: World, expect: int) -> str:
    result = world.run_cli("--sync-now")
    output = result.stdout + result.stderr
    assert result.returncode == expect, output
    assert "Traceback" not in output
    assert RCON_PASSWORD not in output
    return result.stderr


def status(world: World) -> str:
    result: subprocess.CompletedProcess[str] = world.run_cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def server_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "server jail:" in line]


def test_marker_only_reply_leaves_the_command_pending_until_the_server_answers(
    world: World,
) -> None:
    token, _ = world.add_customer(platform="steam", name="bob")
    world.add_item(token, "warden")
    world.config(PRODUCTS)
    jail = world.rcon["jail"]
    world.sync(jail.arm, "marker_only_reply")

    stderr = sync(world, expect=3)
    [line] = server_lines(stderr)
    assert "answered the end-of-reply marker without answering the command" in line
    assert "(the command was sent and may or may not have run)" in line
    assert "its commands stay pending" in line
    assert "jail: 1 pending" in status(world)
    assert world.received("jail") == []

    sync(world, expect=0)  # the server answers again: delivered now, once
    assert len(world.received("jail")) == 1
    assert world.received("jail")[0].startswith('sm_addvip "STEAM_0:')
    sync(world, expect=0)
    assert len(world.received("jail")) == 1
    assert "jail: 0 pending" in status(world)


def test_server_pointed_at_an_http_port_says_so_and_sends_nothing(world: World) -> None:
    token, _ = world.add_customer(platform="steam", name="bob")
    world.add_item(token, "warden")
    path = world.config(PRODUCTS)
    config = yaml.safe_load(path.read_text())
    # The PayNow fake is an HTTP server: a plausible wrong port.
    http_port = world.paynow.port
    config["servers"]["jail"]["port"] = http_port
    path.write_text(yaml.safe_dump(config))

    stderr = sync(world, expect=3)
    [line] = server_lines(stderr)
    assert f'127.0.0.1:{http_port}: invalid packet size 1347703880 (bytes "HTTP"' in line
    assert "is this an RCON port? (no command was sent)" in line
    assert "jail: 1 pending" in status(world)

    world.config(PRODUCTS)  # the right port again
    sync(world, expect=0)
    assert len(world.received("jail")) == 1
