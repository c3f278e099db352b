"""`make demo`: real `perksync --sync-now` passes against bundled loopback fakes.

Starts a fake PayNow Storefront API with three customers, a fake vanilla
Minecraft server and a fake SRCDS server, writes a config.yaml for them into a
temporary folder, runs the real CLI three times with purchases, an expiry and a
chargeback in between, and prints what each game server received.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.fakes.world import World

PRODUCTS: dict[str, Any] = {
    "vip": {
        "servers": ["survival"],
        "on_active": [
            "lp user {customer.minecraft_uuid} parent add vip",
            "say {customer.minecraft.name} is now a VIP!",
        ],
        "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"],
        "on_revoke": ["lp user {customer.minecraft_uuid} parent remove vip"],
    },
    "warden": {
        "servers": ["jailbreak"],
        "on_active": ['sm_addvip "{customer.steam_id2}" warden'],
        "on_expire": ['sm_removevip "{customer.steam_id2}"'],
        "on_revoke": [
            'sm_removevip "{customer.steam_id2}"',
            'sm_say "{customer.steam.name} lost warden ({item.revoke_reason})"',
        ],
    },
    "crate-key": {"on_active": ["crate give {customer.name} vote 1"]},
}


def show_pass(world: World, title: str, seen: dict[str, int]) -> None:
    print(f"\n=== {title}", flush=True)
    result = world.run_cli("--sync-now")
    for line in result.stderr.splitlines():
        if " delivered " in line or "pass done" in line or "ERROR" in line or "WARNING" in line:
            print("   log:", line.split(" ", 2)[-1])
    print(f"   exit status: {result.returncode}")
    for server in world.rcon:
        new = world.received(server)[seen[server] :]
        seen[server] += len(new)
        print(f"   {server} received {len(new)} command(s)")
        for command in new:
            print(f"      > {command}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="perksync-demo-") as folder:
        path = Path(folder)
        with World(path, {"survival": "minecraft", "jailbreak": "source"}) as world:
            steve_token, _ = world.add_customer(platform="minecraft", name="Steve")
            gordon_token, _ = world.add_customer(platform="steam", name="Gordon")
            alex_token, _ = world.add_customer(platform="both", name="Alex")
            steve_vip = world.add_item(steve_token, "vip")
            gordon_warden = world.add_item(gordon_token, "warden")
            world.add_item(alex_token, "crate-key")
            world.add_item(alex_token, "warden", state="usable")
            config = world.config(PRODUCTS)
            print(f"fake PayNow API: {world.paynow.url}")
            for name, server in world.rcon.items():
                print(f"fake {world.platforms[name]} server {name!r}: 127.0.0.1:{server.port}")
            print(f"config: {config}\n")
            print(config.read_text())
            seen = dict.fromkeys(world.rcon, 0)

            show_pass(world, "pass 1: three customers, first sight", seen)
            show_pass(world, "pass 2: nothing changed, nothing is sent again", seen)
            world.set_state(steve_token, steve_vip, "used")
            world.set_state(gordon_token, gordon_warden, "revoked", "chargeback")
            show_pass(world, "pass 3: Steve's VIP expired, Gordon charged back", seen)
            status = world.run_cli("status")
            print("\n=== perksync status")
            print(status.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
