"""Store mode in-process: the Management fake, a config.yaml pointing at it,
a state store and the wiring (`Core`) with its `StoreSource`.

Tests drive the reads themselves (`await rig.source.snapshot()`) and look at
the journal rows they produced, or at the requests the fake saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import Settings, load_settings
from daemon.paynow import ManagementClient, make_session
from daemon.sources.store import StoreSource
from daemon.state import JournalRow, Store, StoreError, open_store
from daemon.state import memory as memory_backend
from daemon.wiring import Core
from tests.fakes.paynow_store import FakeStore

T = TypeVar("T")

API_KEY_ENV = "PAYNOW_API_KEY"
WEBHOOK_ENV = "PAYNOW_WEBHOOK"
VIP: dict[str, Any] = {
    "on_active": ["lp user {customer.minecraft_uuid} parent add vip {item.id}"],
    "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
    "on_revoke": ["lp user {customer.minecraft_uuid} parent remove vip {item.id}"],
}
SURVIVAL: dict[str, Any] = {
    "platform": "minecraft", "host": "127.0.0.1", "port": 1, "password": "rcon-pw",
}  # fmt: skip


def run_async(test: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async test function to completion (pytest-asyncio is not used)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(test(*args, **kwargs))

    return wrapper


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or datetime.now(UTC)
        self.mono = 0.0

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)
        self.mono += seconds


def write_store_config(
    folder: Path,
    fake: FakeStore,
    products: Mapping[str, Any],
    *,
    servers: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """config.yaml for store mode against `fake`; the API key comes from
    $PAYNOW_API_KEY (see `secrets_env`)."""
    data: dict[str, Any] = {
        "paynow": {
            "api_url": fake.url,
            "timeout_seconds": 2,
            "requests_per_second": 0,
            "store_id": fake.store_id,
            "api_key_env": API_KEY_ENV,
        },
        "sync": {"state_db": "state.sqlite3", "expiry_grace_seconds": 0},
        "servers": dict(servers if servers is not None else {"survival": SURVIVAL}),
        "products": dict(products),
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def secrets_env(fake: FakeStore, webhook_secret: str | None = None) -> dict[str, str]:
    env = {API_KEY_ENV: fake.api_key}
    if webhook_secret is not None:
        env[WEBHOOK_ENV] = webhook_secret
    return env


class CountingStore:
    """A store that counts the commits of customer blocks (an apply that finds
    nothing to change commits nothing), and refuses those of the customers in
    `refuse` with a `StoreError`."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.commits = 0
        self.refuse: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @contextlib.asynccontextmanager
    async def customer(self, customer_id: str) -> AsyncIterator[Any]:
        async with self.inner.customer(customer_id) as txn:
            yield _CountingTxn(txn, self, customer_id)


class _CountingTxn:
    def __init__(self, txn: Any, counter: CountingStore, customer_id: str) -> None:
        self.txn = txn
        self.counter = counter
        self.customer_id = customer_id

    @property
    def known(self) -> Any:
        return self.txn.known

    async def commit(self, change: Any) -> list[int]:
        if self.customer_id in self.counter.refuse:
            raise StoreError(f"refused for customer {self.customer_id} (test)")
        ids: list[int] = await self.txn.commit(change)
        self.counter.commits += 1
        return ids


@dataclass
class Rig:
    fake: FakeStore
    settings: Settings
    store: Store
    counter: CountingStore
    core: Core
    source: StoreSource
    clock: Clock

    @property
    def commits(self) -> int:
        """Customer blocks committed so far."""
        return self.counter.commits

    async def rows(self, server: str | None = None) -> list[JournalRow]:
        return await self.store.rows(server)

    async def commands(self, server: str | None = None) -> list[str]:
        return [row.command for row in await self.store.rows(server)]

    async def events(self, item_id: str) -> list[tuple[str, str]]:
        """(server, event) of the item's journal rows, in order."""
        return [(r.server, r.event) for r in await self.store.rows() if r.item_id == item_id]


@contextlib.asynccontextmanager
async def store_rig(
    folder: Path,
    products: Mapping[str, Any] | None = None,
    *,
    servers: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    state: str = "memory",
    page_limit: int = 100,
    clock: Clock = SYSTEM_CLOCK,
    fake: FakeStore | None = None,
) -> AsyncIterator[Rig]:
    """A started fake (or `fake`, started here), settings, a store (`memory`
    or `sqlite`, in `folder`) and a StoreSource reading with `page_limit`."""
    fake = fake or FakeStore()
    await fake.start()
    url = f"memory://{folder}" if state == "memory" else str(folder / "state.sqlite3")
    store = open_store(url)
    try:
        path = write_store_config(
            folder, fake, products or {"vip": VIP}, servers=servers, extra=extra
        )
        settings = load_settings(path, env=secrets_env(fake))
        counter = CountingStore(store)
        core = Core(settings, cast(Store, counter), clock)
        async with make_session() as session:
            client = ManagementClient(
                session, fake.url, fake.store_id, fake.api_key, requests_per_second=0,
                timeout_seconds=2, page_limit=page_limit, backoff_base_seconds=0.01,
                backoff_max_seconds=0.02, retry_budget_seconds=2,
            )  # fmt: skip
            yield Rig(fake, settings, store, counter, core, core.store_source(client), clock)
    finally:
        await store.close()
        memory_backend.forget(url)
        await fake.stop()


def old(days: float) -> datetime:
    """`days` ago: an item added then has an id far below the overlap window."""
    return datetime.now(UTC) - timedelta(days=days)
