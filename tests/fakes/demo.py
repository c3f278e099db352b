"""`make demo`: the README's "Selling ranks, kits and keys" shop, run for real in store mode.

Starts a fake PayNow Management API (one store) and a fake vanilla Minecraft
server on loopback, writes a store-mode config.yaml for them with the README
example's `products` into a temporary folder (its secrets as credential
files, as README "Install" sets them up), and runs the real CLI:
`--sync-now` passes with purchases, an expiry and a chargeback in between,
then the service, to which PayNow's webhook brings a purchase at once; then
`perksync status`. It prints what the game server received each time.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.rcon_server import unused_port
from tests.fakes.world import REPO, World

EXAMPLE_HEADING = "## Selling ranks, kits and keys"
SERVER = "survival"
# The log lines worth showing: deliveries, perks kept, cancellations, webhooks, summaries.
SHOWN = re.compile(
    r" delivered | is held there | cancelled |webhook .* for |pass done|WARNING|ERROR"
)


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


def write_config(world: World, products: Mapping[str, Any]) -> dict[str, str]:
    """config.yaml in store mode with webhooks, every secret a credential file
    as the unit hands them over; returns the environment systemd would set."""
    listen = f"127.0.0.1:{unused_port()}"
    # An hour between reads: only the webhook can bring a purchase in at once.
    hourly = {"interval_seconds": 3600, "new_items_seconds": 3600}
    path = world.config(products, extra={"sync": hourly, "http": {"listen": listen}}, webhooks=True)
    credentials = world.folder / "credentials"
    credentials.mkdir()
    secrets = {"paynow_api_key": world.management.api_key}
    secrets["paynow_webhook_secret"] = str(world.webhook_secret)
    secrets[f"rcon_{SERVER}"] = (world.folder / "secrets" / "rcon").read_text()
    for name, value in secrets.items():
        (credentials / f"perksync_{name}").write_text(value + "\n")
    data = yaml.safe_load(path.read_text())
    for key in ("api_key", "webhook_secret"):
        del data["paynow"][f"{key}_env"]
        data["paynow"][f"{key}_file"] = f"${{CREDENTIALS_DIRECTORY}}/perksync_paynow_{key}"
    data["servers"][SERVER]["password_file"] = f"${{CREDENTIALS_DIRECTORY}}/perksync_rcon_{SERVER}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return {"CREDENTIALS_DIRECTORY": str(credentials)}


def print_config(world: World) -> None:
    data = yaml.safe_load((world.folder / "config.yaml").read_text())
    products = data.pop("products")
    print(f"config: {world.folder / 'config.yaml'}\n")
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    print(f"products: {', '.join(products)}  (the README's, as written there)")
    print("(interval_seconds and new_items_seconds are an hour here, so that only the")
    print(" webhook can bring a purchase to the service at once)")


def print_log(lines: list[str]) -> None:
    for line in lines:
        if SHOWN.search(line):
            print("   log:", line.split(" ", 2)[-1])


def print_received(world: World, seen: dict[str, int]) -> None:
    """The commands the game server received since the last call."""
    new = world.received(SERVER)[seen[SERVER] :]
    seen[SERVER] += len(new)
    print(f"   {SERVER} received {len(new)} command(s)")
    for command in new:
        print(f"      > {command}")


def show(
    world: World, title: str, env: Mapping[str, str], seen: dict[str, int], *args: str
) -> None:
    print(f"\n=== {title}", flush=True)
    print(f"   $ perksync {' '.join(args)}")
    result = world.run_cli(*args, env=env)
    for line in result.stdout.splitlines():
        print("   ", line)
    print_log(result.stderr.splitlines())
    print(f"   exit status: {result.returncode}")
    if args[0] != "status":
        print_received(world, seen)


def join(world: World, customer: Mapping[str, Any]) -> None:
    """The customer's player comes online on the game server."""
    players = world.rcon[SERVER].players
    world.sync(players.__setitem__, customer["name"], customer["minecraft_uuid"])


def wait_for(what: str, done: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up waiting for {what}")
        time.sleep(0.05)


def start_service(world: World, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """The service, once it listens and its reads at start (new items, a
    snapshot) are done: its next reads are an hour away."""
    reads = world.sync(world.management.count, "store_items")
    service = world.start_service(env=env)
    wait_for("the service's first reads", lambda: world.sync(
        world.management.count, "store_items") >= reads + 2)  # fmt: skip
    wait_for("the service to listen", lambda: "/paynow/webhook on" in world.service_log())
    return service


def webhook_purchase(world: World, env: Mapping[str, str], seen: dict[str, int]) -> None:
    """The service runs; Dave buys VIP monthly and PayNow's webhook says so."""
    print("\n=== 4. the service with webhooks: Dave (online) buys VIP monthly", flush=True)
    print("   $ perksync    (the service, as systemd runs it)")
    log_start = len(world.service_log())
    listen = yaml.safe_load((world.folder / "config.yaml").read_text())["http"]["listen"]
    service = start_service(world, env)
    try:
        dave = world.store_customer(name="Dave")
        join(world, dave)
        item = world.store_item(dave["id"], "vip-monthly")
        sent = time.monotonic()
        webhook = world.management.send_webhook(
            f"http://{listen}/paynow/webhook", "ON_DELIVERY_ITEM_ADDED", item,
            str(world.webhook_secret),
        )  # fmt: skip
        print(f"   PayNow posts ON_DELIVERY_ITEM_ADDED for item {item}: "
              f"answered {world.call(webhook).status}")  # fmt: skip
        rank = f"lp user {dave['minecraft_uuid']} parent add vip"
        wait_for("Dave's rank", lambda: rank in world.received(SERVER))
        took = time.monotonic() - sent
    finally:
        service.send_signal(signal.SIGTERM)
        status = service.wait(30)
    print_log(world.service_log()[log_start:].splitlines())
    print(f"   the rank reached {SERVER} {took:.1f} s after the webhook; "
          f"SIGTERM: exit status {status}")  # fmt: skip
    print_received(world, seen)


def main() -> int:
    example = readme_example()
    servers = {name: spec["platform"] for name, spec in example["servers"].items()}
    with (
        tempfile.TemporaryDirectory(prefix="perksync-demo-") as folder,
        World(Path(folder), servers, store=True) as world,
    ):
        alice = world.store_customer(name="Alice")
        bob = world.store_customer(name="Bob")
        carol = world.store_customer(name="Carol")
        alice_monthly = world.store_item(alice["id"], "vip-monthly", expirable=True)
        bob_vip = world.store_item(bob["id"], "vip-monthly")
        world.store_item(carol["id"], "starter-kit")
        world.store_item(carol["id"], "vote-key")
        join(world, alice)
        env = write_config(world, example["products"])
        store = world.management
        print(f"fake PayNow Management API: {store.url} (store {store.store_id})")
        print(f"fake minecraft server {SERVER!r}: 127.0.0.1:{world.rcon[SERVER].port}")
        print_config(world)
        seen = {SERVER: 0}

        show(world, "1. a first pass: Alice (online) and Bob hold VIP monthly, Carol (offline) "
             "a kit and a key", env, seen, "--sync-now")  # fmt: skip
        join(world, carol)
        world.store_item(alice["id"], "vip-yearly")
        show(world, "2. Carol comes online; Alice buys VIP yearly (she holds the rank already)",
             env, seen, "--sync-now")  # fmt: skip
        world.sync(world.management.expire, alice_monthly)
        world.sync(world.management.revoke, bob_vip, "chargeback")
        show(world, "3. Alice's VIP monthly expires (the yearly keeps the rank); Bob charges "
             "back", env, seen, "--sync-now")  # fmt: skip
        webhook_purchase(world, env, seen)
        show(world, "5. perksync status", env, seen, "status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
