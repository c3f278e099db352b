"""The store-mode fake as a process of its own: `python -m bench.fakes store ...`.

A `FakeStore` (PayNow's Management API, `tests/fakes/paynow_store.py`)
filled with `--customers` customers and `--items` items, the newest `--live`
of them live, each customer's n-th item of the product `ROUNDS[n]` (so a
10,000-customer store with 50,000 items, 20,000 live, has one live `vip` and
one live `crate-key` per customer, and ended `kit`, `vip` and `tag` items).
It writes `store.json` into `--workdir` (the store id, the API key, the live
items perksync is configured for), prints `ready <port>`, then answers one
line per command on stdin:

- `events PURCHASES REVOKES SECONDS SEED [WEBHOOK_URL]`: starts, in the
  background, that many purchases (a new `vip` or `crate-key` item of a
  random customer) and chargebacks (a live `vip` item revoked) at random
  moments over SECONDS; with a URL, each is followed by PayNow's webhook
  (`ON_DELIVERY_ITEM_ADDED` / `_REVOKED`), signed with `--secret`. Each is
  stamped with `time.time()` at the moment the item changed, the clock the
  RCON fake stamps arrivals with. Answers `ok` at once.
- `progress`: `<done> <planned>` of the last `events`.
- `dump_events PATH`: every event so far, as JSON.
- `dump_requests PATH`: every request served: `[time.time(), kind,
  activeOnly, has a cursor, status, customer id]`.
- `cpu`, `quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.fake_io import answer_lines, cpu, reply
from tests.fakes.paynow_store import FakeStore

ROUNDS = ("kit", "vip", "tag", "vip", "crate-key")  # a customer's n-th item's product
CONFIGURED = ("vip", "crate-key")  # the products perksync has commands for (bench.store)
EVENT_TYPES = {"purchase": "ON_DELIVERY_ITEM_ADDED", "revoke": "ON_DELIVERY_ITEM_REVOKED"}


@dataclass
class _Store:
    fake: FakeStore
    customers: list[str]
    secret: str
    revocable: list[str]  # live vip items not revoked yet
    events: list[dict[str, Any]] = field(default_factory=list)
    planned: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)


def populate(fake: FakeStore, customers: int, items: int, live: int) -> list[str]:
    """The store's customers and items (see the module docstring); the customer ids."""
    ids = [fake.add_customer("minecraft")["id"] for _ in range(customers)]
    # Bought over the last 29 days, as a store's items are: ids encode their
    # moment, and a new-items read re-reads what was added shortly before the
    # newest (bought within the same few milliseconds, all would be re-read).
    start, step = datetime.now(UTC) - timedelta(days=30), timedelta(days=29) / max(1, items)
    for n in range(items):
        fake.add_item(
            ids[n % customers],
            product=ROUNDS[(n // customers) % len(ROUNDS)],
            state="active" if n >= items - live else "used",
            added_at=start + n * step,
        )
    return ids


def _who(fake: FakeStore, item: dict[str, Any]) -> dict[str, Any]:
    customer = fake.customer(item["customer_id"])
    return {
        "item": item["id"],
        "product": item["product"]["slug"],
        "customer": customer["id"],
        "uuid": customer["minecraft_uuid"],
        "name": customer["minecraft"]["name"],
    }


def live_configured(fake: FakeStore) -> list[dict[str, Any]]:
    """The live items of the products perksync is configured for."""
    return [
        _who(fake, item)
        for item in fake.items()
        if item["state"] in ("active", "renewed") and item["product"]["slug"] in CONFIGURED
    ]


def _plan(
    purchases: int, revokes: int, seconds: float, rng: random.Random
) -> list[tuple[float, str]]:
    kinds = ["purchase"] * purchases + ["revoke"] * revokes
    return sorted((rng.uniform(0, seconds), kind) for kind in kinds)


async def _webhook(store: _Store, url: str, kind: str, event: dict[str, Any]) -> None:
    result = await store.fake.send_webhook(url, EVENT_TYPES[kind], event["item"], store.secret)
    event["webhook_status"] = result.status


def _happen(store: _Store, kind: str, number: int, rng: random.Random) -> dict[str, Any]:
    """One purchase or chargeback, now; what happened."""
    fake = store.fake
    if kind == "purchase":
        product = CONFIGURED[number % len(CONFIGURED)]
        item = fake.add_item(rng.choice(store.customers), product=product)
    else:
        item_id = store.revocable.pop(rng.randrange(len(store.revocable)))
        item = fake.revoke(item_id, "chargeback")
    return {"kind": kind, **_who(fake, item), "at": time.time()}


async def _run_events(
    store: _Store, plan: list[tuple[float, str]], rng: random.Random, url: str | None
) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for number, (offset, kind) in enumerate(plan):
        await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
        event = _happen(store, kind, number, rng)
        store.events.append(event)
        if url is not None:
            _spawn(store, _webhook(store, url, kind, event))


def _spawn(store: _Store, coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    store.tasks.add(task)
    task.add_done_callback(store.tasks.discard)


def _dump_requests(fake: FakeStore, path: Path) -> None:
    shift = time.time() - time.monotonic()  # the log's monotonic times as wall times
    rows = [
        [
            r.time + shift,
            r.kind,
            r.query.get("activeOnly", "false").lower() in ("true", "1"),
            "after" in r.query or "before" in r.query,
            r.status,
            r.customer_id,
        ]
        for r in fake.log
    ]
    path.write_text(json.dumps(rows))


def _command(store: _Store, words: list[str]) -> str:
    command = words[0]
    if command == "events":  # events PURCHASES REVOKES SECONDS SEED [URL]
        purchases, revokes, seconds, seed = int(words[1]), int(words[2]), float(words[3]), words[4]
        if revokes > len(store.revocable):
            return f"error only {len(store.revocable)} live vip items left to revoke"
        rng = random.Random(seed)
        plan = _plan(purchases, revokes, seconds, rng)
        store.planned = len(store.events) + len(plan)
        _spawn(store, _run_events(store, plan, rng, words[5] if len(words) > 5 else None))
        return "ok"
    if command == "progress":
        return f"{len(store.events)} {store.planned}"
    if command == "dump_events":
        Path(words[1]).write_text(json.dumps(store.events))
        return "ok"
    if command == "dump_requests":
        _dump_requests(store.fake, Path(words[1]))
        return "ok"
    if command == "cpu":
        return cpu()
    return f"error unknown command {command!r}"


async def serve_store(args: argparse.Namespace) -> None:
    fake = FakeStore(keep_log=True)
    customers = populate(fake, args.customers, args.items, args.live)
    live = live_configured(fake)
    info = {"store_id": fake.store_id, "api_key": fake.api_key, "live": live}
    (Path(args.workdir) / "store.json").write_text(json.dumps(info))
    revocable = [one["item"] for one in live if one["product"] == "vip"]
    store = _Store(fake, customers, args.secret, revocable)
    await fake.start("127.0.0.1", 0)
    reply(f"ready {fake.port}")
    try:
        await answer_lines(lambda words: _command(store, words))
    finally:
        for task in list(store.tasks):
            task.cancel()
        await fake.stop()
