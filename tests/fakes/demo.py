"""`make demo`: the README's "Selling ranks, kits and keys" example, run for real.

Starts a fake PayNow Storefront API and a fake vanilla Minecraft server,
writes a config.yaml with the README example's `products` for them into a
temporary folder, and runs the real CLI: passes with purchases, an expiry
and a chargeback in between, then a map wipe, `perksync resend` and
`perksync journal`; it prints what the game server received each time.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.world import REPO, World

EXAMPLE_HEADING = "## Selling ranks, kits and keys"


def readme_example(readme: Path = REPO / "README.md") -> dict[str, Any]:
    """The first YAML block of the README's example section, parsed."""
    text = readme.read_text(encoding="utf-8")
    section = text[text.index(EXAMPLE_HEADING) :]
    block = re.search(r"^```yaml\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    if block is None:
        raise ValueError(f"no YAML block under {EXAMPLE_HEADING!r} in {readme}")
    example = yaml.safe_load(block.group(1))
    assert isinstance(example, dict)
    return example


def show(world: World, title: str, seen: dict[str, int], *args: str) -> None:
    print(f"\n=== {title}", flush=True)
    result = world.run_cli(*args)
    for line in result.stdout.splitlines():
        print("   ", line)
    for line in result.stderr.splitlines():
        if " delivered " in line or "done" in line or "resend" in line or "ERROR" in line:
            print("   log:", line.split(" ", 2)[-1])
    print(f"   exit status: {result.returncode}")
    for server in world.rcon:
        new = world.received(server)[seen[server] :]
        seen[server] += len(new)
        print(f"   {server} received {len(new)} command(s)")
        for command in new:
            print(f"      > {command}")


def main() -> int:
    example = readme_example()
    servers = {name: spec["platform"] for name, spec in example["servers"].items()}
    with (
        tempfile.TemporaryDirectory(prefix="perksync-demo-") as folder,
        World(Path(folder), servers) as world,
    ):
        alice_token, _ = world.add_customer(platform="minecraft", name="Alice")
        bob_token, _ = world.add_customer(platform="minecraft", name="Bob")
        carol_token, _ = world.add_customer(platform="minecraft", name="Carol")
        alice_monthly = world.add_item(alice_token, "vip-monthly")
        bob_vip = world.add_item(bob_token, "vip-monthly")
        world.add_item(carol_token, "starter-kit")
        world.add_item(carol_token, "vote-key")
        config = world.config(example["products"])
        print(f"fake PayNow API: {world.paynow.url}")
        for name, server in world.rcon.items():
            print(f"fake {world.platforms[name]} server {name!r}: 127.0.0.1:{server.port}")
        print(f"config: {config}\n")
        print(config.read_text())
        seen = dict.fromkeys(world.rcon, 0)

        show(world, "pass 1: Alice and Bob buy VIP monthly, Carol a kit and a key", seen,
             "--sync-now")  # fmt: skip
        world.add_item(alice_token, "vip-yearly")
        show(world, "pass 2: Alice also buys VIP yearly (she holds the rank already)", seen,
             "--sync-now")  # fmt: skip
        world.set_state(alice_token, alice_monthly, "used")
        world.set_state(bob_token, bob_vip, "revoked", "chargeback")
        show(world, "pass 3: Alice's monthly expires (the yearly keeps the rank); Bob charges "
             "back", seen, "--sync-now")  # fmt: skip
        for server in world.rcon.values():
            world.sync(server.commands.clear)
        seen = dict.fromkeys(world.rcon, 0)
        show(world, "a map wipe: perksync resend --dry-run (nothing changes)", seen,
             "resend", "--server", "survival", "--dry-run")  # fmt: skip
        show(world, "perksync resend (it only journals)", seen, "resend", "--server", "survival")
        show(world, "pass 4: the resend is delivered", seen, "--sync-now")
        show(world, "perksync journal --limit 12", seen, "journal", "--limit", "12")
        show(world, "perksync status", seen, "status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
