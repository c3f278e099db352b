"""What many test files build: PayNow objects shaped like the API's, routes,
and a clock tests move by hand.

`item(...)` and `customer(...)` give validated models (with their raw JSON),
`item_data(...)` / `customer_data(...)` the JSON itself; `by_product(...)`
turns a product → servers mapping into the router `daemon.diff` takes.
`ManualClock` is a `daemon.clock.Clock` whose time only moves when a test
moves it. `one_timed_test_at_a_time` keeps the tests that hold processes to
wall-clock bounds from running beside each other.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon.models import Customer, InventoryItem

STORE_ID = "94688451781206016"
CUSTOMER_ID = "150352880618967040"
ITEM_A = "149643503939362817"
ITEM_B = "149643503939362818"
ITEM_C = "149643503939362819"

PRODUCTS: dict[str, dict[str, Any]] = {
    "vip": {
        "id": "124249183568797696",
        "store_id": STORE_ID,
        "version_id": "147121000780144640",
        "slug": "vip",
        "name": "VIP",
    },
    "banana": {
        "id": "124249183568797697",
        "store_id": STORE_ID,
        "version_id": "147121000780144641",
        "slug": "banana",
        "name": "Banana",
    },
}

STEAM_CUSTOMER: dict[str, Any] = {
    "id": CUSTOMER_ID,
    "store_id": STORE_ID,
    "profile": {"id": "76561198006409530", "platform": "steam", "name": "m0uka"},
    "steam_id": "76561198006409530",
    "steam": {"id": "76561198006409530", "name": "m0uka", "avatar_url": None},
    "minecraft_uuid": None,
    "minecraft": None,
    "minecraft_platform": None,
    "name": "m0uka",
    "created_at": "2023-04-13T19:51:02Z",
    "updated_at": None,
}

MINECRAFT_CUSTOMER: dict[str, Any] = {
    "id": "150352880618967041",
    "store_id": STORE_ID,
    "profile": {"id": "069a79f4-44e9-4726-a5be-fca90e38aaf5", "platform": "minecraft"},
    "steam_id": None,
    "steam": None,
    "minecraft_uuid": "069a79f4-44e9-4726-a5be-fca90e38aaf5",
    "minecraft": {"id": "069a79f4-44e9-4726-a5be-fca90e38aaf5", "name": "Notch"},
    "minecraft_platform": "java",
    "name": "Notch",
    "created_at": "2023-04-13T19:51:02Z",
    "updated_at": None,
}


def product(slug: str) -> dict[str, Any]:
    """A product's JSON: one of `PRODUCTS`, or a made-up one for any other slug."""
    if slug in PRODUCTS:
        return dict(PRODUCTS[slug])
    return {
        "id": "124249183568797699",
        "store_id": STORE_ID,
        "version_id": "147121000780144649",
        "slug": slug,
        "name": slug.upper(),
    }


def item_data(
    item_id: str = ITEM_A, state: str = "active", slug: str = "vip", **fields: Any
) -> dict[str, Any]:
    """An item's JSON shaped like the seed's example, in `state` (the times that
    state implies filled in); `fields` replace any key."""
    data: dict[str, Any] = {
        "id": item_id,
        "store_id": STORE_ID,
        "customer_id": CUSTOMER_ID,
        "order_id": "149643389770407936",
        "order_line_id": "149643389770407937",
        "quantity_index": 1,
        "product": product(slug),
        "state": state,
        "expirable": True,
        "gift": False,
        "added_at": "2023-04-11T20:52:13.659206Z",
        "active_at": None,
        "expires_at": None,
        "removed_at": None,
        "revoked_at": None,
        "revoke_reason": None,
    }
    if state in ("active", "renewed", "used", "revoked"):
        data["active_at"] = "2023-04-11T21:52:53.66545Z"
        data["expires_at"] = "2023-05-11T21:52:53.66545Z"
    if state == "used":
        data["removed_at"] = "2023-05-11T21:53:55.763216Z"
    if state == "revoked":
        data["revoked_at"] = "2023-04-20T10:00:00Z"
        data["revoke_reason"] = "chargeback"
    data.update(fields)
    return data


def item(
    item_id: str = ITEM_A, state: str = "active", slug: str = "vip", **fields: Any
) -> InventoryItem:
    return InventoryItem.from_api(item_data(item_id, state, slug, **fields))


def customer_data(base: Mapping[str, Any] = STEAM_CUSTOMER, **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(dict(base))
    data.update(changes)
    return data


def customer(base: Mapping[str, Any] = STEAM_CUSTOMER, **changes: Any) -> Customer:
    return Customer.from_api(customer_data(base, **changes))


def by_product(
    routes: Mapping[str, Sequence[str]],
) -> Callable[[InventoryItem], Sequence[str]]:
    """The router of `daemon.diff`: an item goes to its product's servers."""
    return lambda it: routes.get(it.product.slug, ())


class ManualClock:
    """A `daemon.clock.Clock` that stands still until a test moves it.

    It starts at the real time (the fakes stamp items with it), `advance`
    moves both its times and wakes the `sleep`s that are then due; `set`
    moves the wall time alone, as a changed system clock would."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._monotonic = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._monotonic + seconds, woken))
        await woken

    @property
    def sleeping(self) -> int:
        """How many `sleep`s wait for the clock to move."""
        return sum(not woken.done() for _, woken in self._sleepers)

    def advance(self, seconds: float = 0, **more: float) -> None:
        """Move on by `seconds` plus a `timedelta(**more)` (e.g. `days=30`)."""
        step = seconds + timedelta(**more).total_seconds()
        if step < 0:
            raise ValueError("a clock never goes back")
        self._now += timedelta(seconds=step)
        self._monotonic += step
        waiting = []
        for due, woken in self._sleepers:
            if woken.done():
                continue
            if due <= self._monotonic:
                woken.set_result(None)
            else:
                waiting.append((due, woken))
        self._sleepers = waiting

    def set(self, moment: datetime) -> None:
        """Set the wall time (either way); monotonic time stays."""
        if moment.tzinfo is None:
            raise ValueError("a naive datetime: give the time zone")
        self._now = moment.astimezone(UTC)


@pytest.fixture
def one_timed_test_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run alone among the tests that use this fixture, across pytest-xdist's
    workers (a file lock in the run's temporary folder). Such tests hold several
    perksync processes to wall-clock bounds (a lease taken over within one
    interval, a host stopping before another starts): two of them side by side
    on two cores would measure the machine's load, not perksync. Tests that
    use it need a timeout long enough to wait for the others."""
    lock_path = tmp_path_factory.getbasetemp().parent / "perksync-timed-tests.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The timed tests first: they run one at a time, so the sooner they start,
    the sooner the whole run ends (the other workers take the rest meanwhile)."""
    items.sort(key=lambda item: "one_timed_test_at_a_time" not in getattr(item, "fixturenames", ()))
