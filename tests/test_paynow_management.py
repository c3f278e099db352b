"""ManagementClient (store mode) end to end against the fake Management API over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from daemon.paynow import (
    ManagementClient,
    PayNowAuthError,
    PayNowBadResponse,
    PayNowError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowUnavailable,
    RateLimiter,
    StorefrontClient,
    make_session,
    store_item,
)
from tests.fakes.paynow_store import FakeStore

T = TypeVar("T")

FAST: dict[str, Any] = {
    "requests_per_second": 0,
    "timeout_seconds": 2.0,
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "retry_budget_seconds": 5.0,
}
Scenario = Callable[[FakeStore, ManagementClient], Awaitable[T]]


@contextlib.asynccontextmanager
async def env(
    api_key: str | None = None, **client_kwargs: Any
) -> AsyncIterator[tuple[FakeStore, ManagementClient]]:
    async with FakeStore() as fake, make_session() as session:
        key = fake.api_key if api_key is None else api_key
        options = {**FAST, **client_kwargs}
        yield fake, ManagementClient(session, fake.url, fake.store_id, key, **options)


def run(scenario: Scenario[T], **client_kwargs: Any) -> T:
    async def main() -> T:
        async with env(**client_kwargs) as (fake, client):
            return await scenario(fake, client)

    return asyncio.run(main())


def raises(
    exc_type: type[PayNowError], scenario: Scenario[Any], **client_kwargs: Any
) -> tuple[PayNowError, FakeStore]:
    """Run `scenario`; assert it raised `exc_type`; return the error and the fake."""
    seen: dict[str, FakeStore] = {}

    async def wrapped(fake: FakeStore, client: ManagementClient) -> None:
        seen["fake"] = fake
        await scenario(fake, client)

    with pytest.raises(exc_type) as info:
        run(wrapped, **client_kwargs)
    error = info.value
    assert "\n" not in str(error)
    assert seen["fake"].api_key not in str(error) and seen["fake"].api_key not in repr(error)
    return error, seen["fake"]


async def collect(pages: AsyncIterator[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    return [page async for page in pages]


def ids(pages: list[list[dict[str, Any]]]) -> list[list[str]]:
    return [[item["id"] for item in page] for page in pages]


def chunks(values: list[str], size: int = 100) -> list[list[str]]:
    return [values[n : n + size] for n in range(0, len(values), size)]


def populate(fake: FakeStore, customers: int, items: int) -> list[str]:
    """`items` items spread over `customers` new customers; their ids, ascending."""
    fake.populate(customers, items)
    return [item["id"] for item in fake.items()]


# ----------------------------------------------------------------- store items


@pytest.mark.parametrize("count", [0, 1, 99, 100, 101, 200, 250, 1234])
def test_store_items_are_read_forwards_to_the_first_short_page(count: int) -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        expected = populate(fake, 7, count)
        pages = await collect(client.store_item_pages())
        assert ids(pages) == chunks(expected)
        assert [item for page in pages for item in page] == [fake.served_item(i) for i in expected]
        requests = fake.requests("store_items")
        assert len(requests) == count // 100 + 1
        cursors = [r.query.get("after") for r in requests]
        assert cursors == [None] + [expected[100 * n - 1] for n in range(1, len(requests))]
        for request in requests:
            assert request.query["limit"] == "100" and request.query["asc"] == "true"
            assert "activeOnly" not in request.query
            assert request.path == f"/v1/stores/{fake.store_id}/delivery/items"
            assert request.token == fake.api_key  # sent as `Authorization: APIKey <key>`

    run(scenario)


def test_store_items_after_a_cursor() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        expected = populate(fake, 3, 150)
        pages = await collect(client.store_item_pages(after=expected[9]))
        assert ids(pages) == chunks(expected[10:])
        assert fake.requests("store_items")[0].query["after"] == expected[9]
        assert await collect(client.store_item_pages(after=int(expected[-1]))) == []

    run(scenario)


@pytest.mark.parametrize("usable_is_active", [False, True])
def test_active_only_lists_what_the_api_calls_active(usable_is_active: bool) -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        if usable_is_active:
            fake.active_only_states = {"active", "renewed", "usable"}
        steve = fake.add_customer(name="Steve")["id"]
        made = {state: fake.add_item(steve, state=state)["id"] for state in ("usable", "used")}
        live = [fake.add_item(steve)["id"] for _ in range(150)]
        fake.renew(live[3])
        fake.revoke(live[4])
        live.remove(live[4])
        pages = await collect(client.store_item_pages(active_only=True))
        listed = [item["id"] for page in pages for item in page]
        assert listed == ([made["usable"]] if usable_is_active else []) + live
        assert all(r.query["activeOnly"] == "true" for r in fake.requests("store_items"))

    run(scenario)


# --------------------------------------------------------------- cursor checks


@pytest.mark.parametrize(
    ("kind", "page", "words"),
    [
        ("repeat_page", 2, "page 2 (after="),
        ("repeat_page", None, "is repeated"),
        ("reverse_page", 1, "is out of order"),
        ("reverse_page", 3, "is out of order"),
        ("duplicate_item", 2, "is repeated"),
    ],
)
def test_a_page_that_ignores_the_cursor_fails_the_read(
    kind: str, page: int | None, words: str
) -> None:
    received: list[list[dict[str, Any]]] = []

    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        populate(fake, 5, 250)
        fake.fault(kind, path="store_items", page=page, times=None)
        async for items in client.store_item_pages():
            received.append(items)

    error, fake = raises(PayNowBadResponse, scenario)
    assert words in str(error) and "the API ignored the cursor" in str(error)
    assert len(received) == (page or 2) - 1  # nothing of the bad page is handed over
    assert fake.count("store_items") <= 3


def test_items_before_the_cursor_fail_the_read() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        expected = populate(fake, 2, 30)
        fake.fault("repeat_page", path="store_items")  # serves from the start
        await collect(client.store_item_pages(after=expected[20]))

    error, _ = raises(PayNowBadResponse, scenario)
    assert "item 0 id" in str(error) and "the API ignored the cursor" in str(error)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'[{"id": "12abc"}]', "item 0 has no id of 1-20 digits (got a string)"),
        (b'[{"state": "active"}]', "item 0 has no id of 1-20 digits (got null)"),
        (b'[{"id": "99999999999999999999"}]', "item 0 has an id out of range"),
        (b"[1]", "item 0 is a number, not an object"),
        (b'{"items": []}', "expected a JSON array, got an object"),
        (b"[" * 50 + b"]" * 50, "JSON nested more than 32 levels deep"),
        (b'[{"id": "1"', "truncated JSON"),
    ],
)
def test_a_malformed_page_fails_the_read(body: bytes, words: str) -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        populate(fake, 1, 3)
        fake.fault("body", path="store_items", body=body)
        await collect(client.store_item_pages())

    error, fake = raises(PayNowBadResponse, scenario)
    assert str(error).startswith("PayNow store items page 1: ") and words in str(error)
    assert fake.count("store_items") == 1


def test_page_cap() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        populate(fake, 2, 250)
        await collect(client.store_item_pages())

    error, fake = raises(PayNowBadResponse, scenario, max_pages=2)
    assert "more than 2 pages" in str(error)
    assert fake.count("store_items") == 2


# ---------------------------------------------------------------------- errors


def test_a_wrong_api_key_is_an_auth_error_not_retried() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        await collect(client.store_item_pages())

    error, fake = raises(PayNowAuthError, scenario, api_key="pnapi_not-the-key")
    assert error.status == 401 and error.code == "unauthorized" and error.attempts == 1
    assert "invalid API key" in str(error) and "pnapi_not-the-key" not in str(error)
    assert fake.count() == 1


def test_another_stores_id_is_an_auth_error_not_retried() -> None:
    async def main() -> None:
        async with FakeStore() as fake, make_session() as session:
            client = ManagementClient(session, fake.url, "123", fake.api_key, **FAST)
            with pytest.raises(PayNowAuthError) as info:
                await client.newest_item_id()
            assert info.value.status == 403 and fake.count() == 1

    asyncio.run(main())


def test_an_unknown_customer_is_not_found() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        await collect(client.customer_item_pages("1234567"))

    error, fake = raises(PayNowNotFound, scenario)
    assert error.status == 404 and fake.count("customer_items") == 1
    assert str(error).startswith("PayNow items of customer 1234567 page 1: HTTP 404")


def test_429_retry_after_is_honoured_on_a_page() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        expected = populate(fake, 4, 150)
        fake.fault("rate_limit", path="store_items", page=2, retry_after=0.2)
        pages = await collect(client.store_item_pages())
        assert ids(pages) == chunks(expected)
        requests = fake.requests("store_items")
        assert [(r.page, r.status) for r in requests] == [(1, 200), (2, 429), (2, 200)]
        assert requests[2].time - requests[1].time >= 0.19

    run(scenario)


def test_429_beyond_the_budget_is_rate_limited() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        populate(fake, 1, 3)
        fake.fault("rate_limit", retry_after=60, times=None)
        await client.newest_item_id()

    error, fake = raises(PayNowRateLimited, scenario)
    assert "Retry-After 60s exceeds the remaining retry budget" in str(error)
    assert fake.count() == 1


@pytest.mark.parametrize(
    ("kind", "exc_type"),
    [("status", PayNowUnavailable), ("malformed", PayNowBadResponse), ("stall", PayNowUnavailable)],
)
def test_a_failed_middle_page_fails_the_whole_read(kind: str, exc_type: type[PayNowError]) -> None:
    received: list[list[dict[str, Any]]] = []

    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        populate(fake, 3, 250)
        fake.fault(kind, path="store_items", page=2, times=None, delay=30)
        async for page in client.store_item_pages(active_only=True):
            received.append(page)

    error, fake = raises(exc_type, scenario, max_attempts=2, timeout_seconds=0.25)
    assert "active store items page 2 (after=" in str(error)
    assert len(received) == 1  # the caller has page 1, then the error: an incomplete read
    pages = [r.page for r in fake.requests("store_items")]
    assert pages[0] == 1 and set(pages[1:]) == {2}


def test_5xx_is_retried_then_the_read_goes_on() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        expected = populate(fake, 3, 250)
        fake.fault("status", path="store_items", page=2, status=503)
        fake.fault("reset", path="store_items", page=3, times=2)
        assert ids(await collect(client.store_item_pages())) == chunks(expected)

    run(scenario)


# -------------------------------------------------------------- one customer


def test_a_customers_items() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        steve, alex = (fake.add_customer(name=n)["id"] for n in ("Steve", "Alex"))
        for n in range(330):
            fake.add_item(steve if n % 2 else alex, state="used" if n % 3 == 0 else "active")
        mine = [item["id"] for item in fake.items(steve)]
        assert ids(await collect(client.customer_item_pages(steve))) == chunks(mine)
        live = [i["id"] for i in fake.items(steve) if i["state"] == "active"]
        assert ids(await collect(client.customer_item_pages(steve, active_only=True))) == chunks(
            live
        )
        requests = fake.requests("customer_items")
        assert {r.path for r in requests} == {
            f"/v1/stores/{fake.store_id}/customers/{steve}/delivery/items"
        }
        assert len(requests) == len(chunks(mine)) + len(chunks(live)) == 4
        assert await collect(client.customer_item_pages(fake.add_customer()["id"])) == []

    run(scenario)


def test_a_failed_page_of_a_customers_items_fails_the_read() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        steve = fake.add_customer()["id"]
        for _ in range(120):
            fake.add_item(steve)
        fake.fault("status", path="customer_items", customer=steve, page=2, status=500, times=None)
        await collect(client.customer_item_pages(steve))

    error, _ = raises(PayNowUnavailable, scenario, max_attempts=2)
    assert "items of customer" in str(error) and "page 2" in str(error)
    assert "giving up after 2 attempts" in str(error)


# ------------------------------------------------------------------ newest id


def test_newest_item_id() -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        assert await client.newest_item_id() is None  # an empty store
        expected = populate(fake, 3, 120)
        fake.add_item(fake.customer_ids[0], visible=False)  # not listed yet
        fake.revoke(expected[-1])  # any state counts
        assert await client.newest_item_id() == expected[-1]
        for request in fake.requests("store_items"):
            assert request.query == {"limit": "1", "asc": "false"}

    run(scenario)


# -------------------------------------------------------------- store items


@pytest.mark.parametrize("nulls", ["spec", "always", "never"])
def test_every_served_item_validates_with_its_customer(nulls: str) -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> None:
        fake.nulls = nulls
        steve = fake.add_customer("both", name="Steve", metadata={"discord": "steve#1"})["id"]
        alex = fake.add_customer("offline", name="Alex")["id"]
        fake.add_item(steve, custom_variables={"colour": "teal"}, execute_on_gameserver_id="77")
        fake.add_item(alex, skip_commands=True, expirable=True)
        gift = fake.add_item(alex, gift_from=steve)
        fake.revoke(gift["id"], "chargeback")
        made = [
            store_item(raw, "store item")
            for page in await collect(client.store_item_pages())
            for raw in page
        ]
        assert [m.customer.id for m in made] == [steve, alex, alex]  # a gift's is its recipient
        first, second, third = made
        assert first.item.custom_variables == {"colour": "teal"} and not first.item.skip_commands
        assert first.item.execute_on_gameserver_id == "77"
        assert first.customer.metadata == {"discord": "steve#1"}
        assert second.item.skip_commands and second.item.custom_variables == {}
        assert third.item.state == "revoked" and third.item.revoke_reason == "chargeback"
        for m in made:
            assert m.item.raw == fake.served_item(m.item.id)
            assert m.customer.raw == fake.served_customer(m.customer.id)

    run(scenario)


# ------------------------------------------------------- limits and secrets


def test_every_attempt_passes_through_the_shared_rate_limiter() -> None:
    class Counting(RateLimiter):
        acquired = 0

        async def acquire(self) -> None:
            self.acquired += 1

    async def main() -> None:
        limiter = Counting(None)
        async with FakeStore() as fake, make_session() as session:
            kwargs = {**FAST, "rate_limiter": limiter}
            client = ManagementClient(session, fake.url, fake.store_id, fake.api_key, **kwargs)
            storefront = StorefrontClient(session, fake.url, **kwargs)
            assert client.rate_limiter is storefront.rate_limiter is limiter
            populate(fake, 2, 250)
            fake.fault("status", path="store_items", page=2, status=502)
            await collect(client.store_item_pages())
            await client.newest_item_id()
            assert limiter.acquired == fake.count() == 5

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"store_id": "abc"}, "store_id must be a PayNow id"),
        ({"store_id": "1/../2"}, "store_id must be a PayNow id"),
        ({"api_url": "http://api.paynow.gg"}, "https"),
    ],
)
def test_client_settings_are_checked(kwargs: dict[str, str], words: str) -> None:
    async def main() -> None:
        async with make_session() as session:
            args = {"api_url": "https://api.paynow.gg", "store_id": "1", "api_key": "k", **kwargs}
            ManagementClient(session, **args)

    with pytest.raises(ValueError, match=words):
        asyncio.run(main())


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.customer_item_pages("../../orders"), "customer id must be a PayNow id"),
        (lambda c: c.customer_item_pages(""), "customer id must be a PayNow id"),
        (lambda c: c.store_item_pages(after="1 OR 1"), "after must be a PayNow id"),
        (lambda c: c.store_item_pages(after=-1), "after must be a PayNow id"),
    ],
)
def test_bad_ids_make_no_request(call: Callable[[ManagementClient], Any], words: str) -> None:
    async def scenario(fake: FakeStore, client: ManagementClient) -> int:
        with pytest.raises(ValueError, match=words):
            call(client)
        return fake.count()

    assert run(scenario) == 0


def test_api_key_never_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    key = "pnapi_SECRET_0d5e8c1f"
    errors: list[PayNowError] = []

    async def main() -> None:
        async with FakeStore(api_key=key) as fake, make_session() as session:
            options = {**FAST, "max_attempts": 2, "timeout_seconds": 0.25}
            client = ManagementClient(session, fake.url, fake.store_id, key, **options)
            steve = fake.add_customer()["id"]
            for _ in range(120):
                fake.add_item(steve)
            faults: list[tuple[str, dict[str, Any]]] = [
                ("status", {"status": 401, "message": f"key {key} is revoked"}),
                ("status", {"status": 500, "message": f"boom for APIKey {key}"}),
                ("status", {"status": 404}),
                ("rate_limit", {"retry_after": 100}),
                ("malformed", {}),
                ("truncated", {}),
                ("disconnect", {}),
                ("repeat_page", {"page": 2}),
                ("stall", {"delay": 5}),
                ("reset", {}),
                ("body", {"body": f'[{{"id": "{key}"}}]'}),
            ]
            reads: list[Callable[[], Awaitable[Any]]] = [
                client.newest_item_id,
                lambda: collect(client.store_item_pages()),
                lambda: collect(client.customer_item_pages(steve, active_only=True)),
            ]
            for kind, kwargs in faults:
                for read in reads:
                    fake.clear_faults()
                    fake.fault(kind, times=None, **kwargs)
                    try:
                        await read()
                    except PayNowError as exc:
                        errors.append(exc)
            fake.clear_faults()
            before = fake.count()
            for bad in (f"{key}\nX-Evil: 1", f" {key}", ""):
                unsendable = ManagementClient(session, fake.url, fake.store_id, bad, **options)
                try:
                    await unsendable.newest_item_id()
                except PayNowAuthError as exc:
                    errors.append(exc)
            assert fake.count() == before  # no request with a bad key

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert len(errors) >= 30
    for error in errors:
        assert key not in str(error) and key not in repr(error)
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
    assert any("<api key>" in str(e) for e in errors)  # echoed keys are scrubbed
    assert caplog.records
    assert key not in caplog.text
