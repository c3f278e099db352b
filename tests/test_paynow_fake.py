"""The fake PayNow API itself: spec-shaped data, query handling, auth, faults, counters."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pytest

from daemon.models import Customer, InventoryItem
from tests.fakes.paynow_api import FakePayNow, FlakeGenerator, iso

T = TypeVar("T")

ITEMS = "/v1/store/customer/delivery/items"
CUSTOMER = "/v1/store/customer"


def run(scenario: Callable[[FakePayNow, aiohttp.ClientSession], Awaitable[T]]) -> T:
    async def main() -> T:
        async with FakePayNow() as fake, aiohttp.ClientSession() as session:
            return await scenario(fake, session)

    return asyncio.run(main())


async def get(
    fake: FakePayNow,
    session: aiohttp.ClientSession,
    path: str,
    token: str | None,
    *,
    scheme: str = "Customer",
    **query: str,
) -> tuple[int, Any]:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    async with session.get(fake.url + path, headers=headers, params=query) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if body else None


def test_generated_data_is_spec_shaped_and_validates() -> None:
    fake = FakePayNow()
    customer = fake.make_customer(platform="both")
    assert set(customer) >= {"id", "store_id", "created_at", "metadata"}
    assert Customer.from_api(customer).steam_id == customer["steam"]["id"]
    item = fake.make_item(customer["id"], product="vip", expirable=True)
    assert set(item["product"]) == {"id", "version_id", "slug", "name"}
    parsed = InventoryItem.from_api(item)
    assert parsed.state == "active" and parsed.active_at and parsed.expires_at
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
    assert all(stamp.match(item[k]) for k in ("added_at", "active_at", "expires_at"))


def test_flakes_increase_and_encode_time() -> None:
    flakes = FlakeGenerator()
    ids = [int(flakes.next()) for _ in range(1000)]
    assert ids == sorted(set(ids))
    # The seed's customer id decodes to its created_at (2023-04-13T19:51:02Z).
    from tests.fakes.paynow_api import FLAKE_EPOCH

    seconds = (150352880618967040 >> 22) / 1000
    assert (FLAKE_EPOCH.timestamp() + seconds) // 60 == 1681415462 // 60


def test_iso_trims_trailing_zeros_like_the_seed() -> None:
    from datetime import UTC, datetime

    assert (
        iso(datetime(2023, 4, 11, 21, 52, 53, 665450, tzinfo=UTC)) == "2023-04-11T21:52:53.66545Z"
    )
    assert iso(datetime(2023, 4, 11, 21, 52, 53, tzinfo=UTC)) == "2023-04-11T21:52:53Z"


def test_set_state_fills_timestamps() -> None:
    fake = FakePayNow()
    token = fake.new_token()
    fake.add_customer(token)
    item = fake.add_item(token, state="usable", expirable=True)
    assert item["active_at"] is None
    fake.set_state(token, item["id"], "active")
    assert item["active_at"] and item["expires_at"]
    fake.set_state(token, item["id"], "revoked", "chargeback")
    assert item["revoked_at"] and item["revoke_reason"] == "chargeback"
    fake.set_state(token, item["id"], "used")
    assert item["removed_at"] and item["state"] == "used"


def test_auth_header() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token)
        for scheme in ("Customer", "customer", "CUSTOMER"):
            status, _ = await get(fake, session, CUSTOMER, token, scheme=scheme)
            assert status == 200
        for scheme, tok in (("Bearer", token), ("Customer", "wrong"), ("Customer", None)):
            status, body = await get(fake, session, CUSTOMER, tok, scheme=scheme)
            assert status == 401
            assert body["status"] == 401 and body["code"] == "unauthorized"
            assert body["message"] and body["trace_id"]
        assert fake.count("customer") == 6 and fake.count("customer", token) == 3

    run(scenario)


def test_query_validation() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token, items=3)
        for query in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"after": "abc"},
                      {"asc": "maybe"}):  # fmt: skip
            status, body = await get(fake, session, ITEMS, token, **query)
            assert status == 400, query
            assert body["code"] == "validation-error" and body["errors"]
        assert (await get(fake, session, ITEMS, token, limit="100"))[0] == 200
        status, body = await get(fake, session, "/v1/nope", token)
        assert status == 404 and body["status"] == 404

    run(scenario)


def test_ordering_and_cursors() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token, items=7)
        ids = [i["id"] for i in fake.items(token)]
        _, asc = await get(fake, session, ITEMS, token, asc="true", limit="3")
        assert [i["id"] for i in asc] == ids[:3]
        _, nxt = await get(fake, session, ITEMS, token, asc="true", limit="3", after=ids[2])
        assert [i["id"] for i in nxt] == ids[3:6]
        _, desc = await get(fake, session, ITEMS, token, asc="false", limit="3")
        assert [i["id"] for i in desc] == ids[::-1][:3]
        _, back = await get(fake, session, ITEMS, token, asc="false", limit="3", before=ids[4])
        assert [i["id"] for i in back] == [ids[3], ids[2], ids[1]]
        _, default = await get(fake, session, ITEMS, token)
        assert [i["id"] for i in default] == ids[::-1]  # default: descending, limit 100

    run(scenario)


def test_changes_are_served() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token, items=2)
        first = fake.items(token)[0]["id"]
        _, before = await get(fake, session, ITEMS, token, asc="true")
        fake.set_state(token, first, "revoked", "refund")
        fake.add_item(token, product="mvp")
        _, after = await get(fake, session, ITEMS, token, asc="true")
        assert before[0]["state"] == "active" and after[0]["state"] == "revoked"
        assert len(after) == 3 and after[2]["product"]["slug"] == "mvp"

    run(scenario)


def test_faults_by_page_request_and_times() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token, items=5)
        ids = [i["id"] for i in fake.items(token)]
        fake.fault(token, "status", status=503, page=2, times=2)
        fake.fault(token, "status", status=418, path="customer", request=2)
        page2 = {"asc": "true", "limit": "2", "after": ids[1]}
        assert (await get(fake, session, ITEMS, token, asc="true", limit="2"))[0] == 200
        assert (await get(fake, session, ITEMS, token, **page2))[0] == 503
        assert (await get(fake, session, ITEMS, token, **page2))[0] == 503
        assert (await get(fake, session, ITEMS, token, **page2))[0] == 200
        assert (await get(fake, session, CUSTOMER, token))[0] == 200
        assert (await get(fake, session, CUSTOMER, token))[0] == 418
        assert (await get(fake, session, CUSTOMER, token))[0] == 200
        assert fake.pending_faults == []
        assert [r.status for r in fake.requests("items")] == [200, 503, 503, 200]
        assert [r.page for r in fake.requests("items")] == [1, 2, 2, 2]
        with pytest.raises(ValueError, match="unknown fault kind"):
            fake.fault(token, "nonsense")

    run(scenario)


def test_rate_limit_fault_sends_retry_after() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        token = fake.new_token()
        fake.add_customer(token)
        fake.fault(token, "rate_limit", retry_after=7)
        async with session.get(
            fake.url + CUSTOMER, headers={"Authorization": f"Customer {token}"}
        ) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "7"
            assert (await resp.json())["code"] == "too-many-requests"

    run(scenario)


def test_populate_is_servable() -> None:
    async def scenario(fake: FakePayNow, session: aiohttp.ClientSession) -> None:
        tokens = fake.populate(20, 5, products=("vip", "mvp"))
        assert len(set(tokens)) == 20
        status, items = await get(fake, session, ITEMS, tokens[7], asc="true")
        assert status == 200 and [i["product"]["slug"] for i in items][:2] == ["vip", "mvp"]
        assert all(InventoryItem.from_api(i).customer_id == items[0]["customer_id"] for i in items)

    run(scenario)
