"""The loopback fakes as stand-alone processes, driven over stdin/stdout.

    python -m bench.fakes paynow --customers N --items 5 --workdir DIR
    python -m bench.fakes store --customers N --items M --live L --workdir DIR --secret S
    python -m bench.fakes rcon --password PW

Each prints one line `ready <port>` when it listens, then answers one line per
command read from stdin (see `_paynow_command`, `bench.store_fake` and
`_rcon_command`; `cpu` gives
the fake's own CPU time, so the report can show what the fakes spent during
each measured run). They are
separate processes so that their CPU time never counts against the client
being measured; on a 2-core machine they still compete for the cores, which
the report says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.fake_io import answer_lines, cpu, reply
from bench.store_fake import serve_store
from tests.fakes.paynow_api import FakePayNow
from tests.fakes.rcon_server import FakeRconServer

# The products every generated customer owns one item of (items cycle through
# them). Only some are configured in perksync (see bench.poll.PRODUCTS): the
# others are ignored, as a store's cosmetic items are by a perk daemon.
PRODUCTS = ("vip", "crate-key", "kit", "cosmetic", "tag")
PAGE_LIMIT = 100


# --------------------------------------------------------------------- PayNow


def _cursors(fake: FakePayNow, token: str) -> list[str]:
    """The `after` cursors of an inventory's pages 2.. (what a full read requests)."""
    ids = [item["id"] for item in fake.items(token)]
    return [ids[i - 1] for i in range(PAGE_LIMIT, len(ids) + 1, PAGE_LIMIT)]


def _write_tokens(fake: FakePayNow, tokens: list[str], path: Path) -> None:
    # One line per customer: the token, then the cursors of its later pages.
    path.write_text("".join(" ".join([t, *_cursors(fake, t)]) + "\n" for t in tokens))


def _world(fake: FakePayNow, tokens: list[str]) -> list[dict[str, Any]]:
    world = []
    for token in tokens:
        customer = fake.customer(token)
        world.append(
            {
                "uuid": customer["minecraft_uuid"],
                "name": customer["minecraft"]["name"] if customer["minecraft"] else None,
                "items": [
                    [i["id"], i["product"]["slug"], i["state"], i["revoke_reason"]]
                    for i in fake.items(token)
                ],
            }
        )
    return world


def _mutate(fake: FakePayNow, tokens: list[str], round_: int) -> list[dict[str, Any]]:
    """A tenth of the customers (index % 10 == round % 10) change state.

    Of those, every other one's `vip` item expires (`used`), the rest are
    charged back (`revoked`); items already ended are left alone. Returns the
    changes: the customer, the item, the new state and the revoke reason.
    """
    changes = []
    for index in range(round_ % 10, len(tokens), 10):
        token = tokens[index]
        for item in fake.items(token):
            if item["product"]["slug"] != "vip" or item["state"] not in ("active", "renewed"):
                continue
            if (index // 10) % 2 == 0:
                fake.set_state(token, item["id"], "used")
            else:
                fake.set_state(token, item["id"], "revoked", "chargeback")
            customer = fake.customer(token)
            changes.append(
                {
                    "uuid": customer["minecraft_uuid"],
                    "name": customer["minecraft"]["name"],
                    "item": item["id"],
                    "state": item["state"],
                    "revoke_reason": item["revoke_reason"],
                }
            )
    return changes


def _paynow_command(fake: FakePayNow, tokens: list[str], workdir: Path, words: list[str]) -> str:
    command = words[0]
    if command == "world":  # the whole world, for the expected commands
        (workdir / "world.json").write_text(json.dumps(_world(fake, tokens)))
        return "ok"
    if command == "mutate":  # mutate ROUND
        changes = _mutate(fake, tokens, int(words[1]))
        (workdir / "changes.json").write_text(json.dumps(changes))
        return f"ok {len(changes)}"
    if command == "requests":  # requests served so far, by path
        return json.dumps(dict(fake.requests_by_path))
    if command == "cpu":
        return cpu()
    return f"error unknown command {command!r}"


async def _serve_paynow(args: argparse.Namespace) -> None:
    fake = FakePayNow(keep_log=False)
    tokens = fake.populate(args.customers, args.items, platform="minecraft", products=PRODUCTS)
    workdir = Path(args.workdir)
    _write_tokens(fake, tokens, workdir / "tokens.txt")
    await fake.start("127.0.0.1", 0)
    reply(f"ready {fake.port}")
    try:
        await answer_lines(lambda words: _paynow_command(fake, tokens, workdir, words))
    finally:
        await fake.stop()


# ----------------------------------------------------------------------- RCON


def _rcon_command(server: FakeRconServer, words: list[str], arrived: list[float]) -> str:
    command = words[0]
    if command == "count":
        return str(len(server.commands))
    if command == "cpu":
        return cpu()
    if command == "dump":  # dump PATH: every command so far, as JSON
        Path(words[1]).write_text(json.dumps(server.commands))
        return "ok"
    if command == "dump_timed":  # dump_timed PATH: [[time.time() on arrival, command], ...]
        Path(words[1]).write_text(
            json.dumps([list(x) for x in zip(arrived, server.commands, strict=True)])
        )
        return "ok"
    if command == "clear":
        server.commands.clear()
        server.received.clear()
        arrived.clear()
        return "ok"
    if command == "stats":
        stats = {
            "commands": len(server.commands),
            "connections": server.connections_accepted,
            "violations": server.violations,
        }
        return json.dumps(stats)
    return f"error unknown command {command!r}"


async def _serve_rcon(args: argparse.Namespace) -> None:
    server = FakeRconServer(args.profile, password=args.password)
    # When each command arrived (this machine's wall clock, as the store fake
    # stamps its purchases), in the order of `server.commands`.
    arrived: list[float] = []
    server.on_command = lambda command: arrived.append(time.time())
    await server.start()
    reply(f"ready {server.port}")
    try:
        await answer_lines(lambda words: _rcon_command(server, words, arrived))
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakes")
    sub = parser.add_subparsers(dest="fake", required=True)
    paynow = sub.add_parser("paynow")
    paynow.add_argument("--customers", type=int, required=True)
    paynow.add_argument("--items", type=int, default=5)
    paynow.add_argument("--workdir", required=True)
    store = sub.add_parser("store")
    store.add_argument("--customers", type=int, required=True)
    store.add_argument("--items", type=int, required=True, help="items in all")
    store.add_argument("--live", type=int, required=True, help="of them live (the newest)")
    store.add_argument("--workdir", required=True)
    store.add_argument("--secret", required=True, help="the webhook secret to sign with")
    rcon = sub.add_parser("rcon")
    rcon.add_argument("--profile", choices=["minecraft", "srcds"], default="minecraft")
    rcon.add_argument("--password", required=True)
    args = parser.parse_args(argv)
    serves = {"paynow": _serve_paynow, "store": serve_store, "rcon": _serve_rcon}
    asyncio.run(serves[args.fake](args))


if __name__ == "__main__":
    main()
