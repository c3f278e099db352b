"""The fake PayNow Management API and webhook sender: spec-shaped objects, paging,
activeOnly, consistency knobs, auth, faults, counters, signatures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from daemon.models import Customer, InventoryItem
from tests.fakes import openapi_shape
from tests.fakes.openapi_shape import load, response_schema, shape_errors, webhook_schema
from tests.fakes.paynow_api import FLAKE_EPOCH
from tests.fakes.paynow_store import (
    _CUSTOMER_NOT_NULLABLE,
    _ITEM_NOT_NULLABLE,
    DELIVERY_EVENTS,
    NULLS_MODES,
    TAMPERS,
    FakeStore,
)

T = TypeVar("T")

STORE = "/v1/stores/{storeId}/delivery/items"
CUSTOMER = "/v1/stores/{storeId}/customers/{customerId}/delivery/items"
SECRET = "whsec_test-secret"
# The webhook spec marks a customer's `steam`, `minecraft` and `profile` (and an
# order's `coupon_id`) required without null, yet a customer may have no Steam
# account and an order no coupon: the fake sends null there.
WEBHOOK_NULLABLE = ("steam", "minecraft", "profile", "coupon_id")


def run(scenario: Callable[[FakeStore, aiohttp.ClientSession], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        async with FakeStore(**kw) as fake, aiohttp.ClientSession() as session:
            return await scenario(fake, session)

    return asyncio.run(main())


async def get(
    fake: FakeStore,
    session: aiohttp.ClientSession,
    customer: str | None = None,
    *,
    auth: str | None = "",
    store: str | None = None,
    **query: str,
) -> tuple[int, Any]:
    """GET a listing (store-wide, or `customer`'s); auth "" means the right key."""
    store = store or fake.store_id
    path = f"/v1/stores/{store}/delivery/items"
    if customer is not None:
        path = f"/v1/stores/{store}/customers/{customer}/delivery/items"
    headers = {"Authorization": auth or f"APIKey {fake.api_key}"} if auth is not None else {}
    async with session.get(fake.url + path, headers=headers, params=query) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if body else None


async def ids(
    fake: FakeStore, session: aiohttp.ClientSession, *args: Any, **query: str
) -> list[str]:
    status, body = await get(fake, session, *args, **query)
    assert status == 200, body
    return [item["id"] for item in body]


def varied_store(fake: FakeStore) -> dict[str, str]:
    """Customers of every platform and items of every state and option."""
    people = {
        platform: fake.add_customer(platform, metadata={"discord": f"{platform}#1"})["id"]
        for platform in ("minecraft", "steam", "both", "offline", "none")
    }
    mc, steam = people["minecraft"], people["steam"]
    soon = datetime.now(UTC) + timedelta(days=3)
    made = {
        "active": fake.add_item(mc, product="vip", expirable=True),
        "usable": fake.add_item(mc, product="crate-key", state="usable"),
        "used": fake.add_item(steam, state="used", expirable=True),
        "revoked": fake.add_item(steam, state="revoked", revoke_reason="chargeback"),
        "renewed": fake.add_item(people["both"], state="renewed", expires_at=soon),
        "gift": fake.add_item(people["offline"], gift_from=mc, custom_variables={"colour": "red"}),
        "routed": fake.add_item(
            people["none"], skip_commands=True, execute_on_gameserver_id="411486491630370816"
        ),
        "override": fake.add_item(mc, expirable=True, override_expires_at=soon),
    }
    return {name: item["id"] for name, item in made.items()} | {"mc": mc, "steam": steam}


# ------------------------------------------------------------- spec checker


def test_checker_finds_each_kind_of_mismatch() -> None:
    doc = load("management-api.yaml")
    item_schema = {"$ref": "#/components/schemas/DeliveryItemDto"}
    fake = FakeStore()
    cid = fake.add_customer("both")["id"]
    good = fake.served_item(fake.add_item(cid, state="revoked")["id"])
    assert shape_errors(doc, item_schema, good) == []
    broken = {
        "required": {k: v for k, v in good.items() if k != "skip_commands"},
        "undeclared": good | {"surprise": 1},
        "leaf type": good | {"gift": "false"},
        "integer is not boolean": good | {"expirable": 1},
        "null not allowed": good | {"order_id": None},
        "date-time": good | {"added_at": "yesterday"},
        "flake": good | {"id": "12ab"},
        "enum": good | {"state": "expired"},
        "nested": good | {"customer": good["customer"] | {"metadata": {"k": 3}}},
        "array items": good | {"command_attempts": [{"id": "1"}]},
    }
    for name, value in broken.items():
        assert shape_errors(doc, item_schema, value), name
    # Leniency is explicit and narrow.
    assert shape_errors(doc, item_schema, good | {"order_id": None}, null_optional=True) == []
    assert shape_errors(doc, item_schema, good | {"id": None}, null_optional=True)
    assert shape_errors(doc, item_schema, good | {"order_id": None}, nullable={"order_id"}) == []
    # oneOf with null: the webhook's customer may be null, not a string.
    hooks = load("webhook-definitions.yaml")
    body = webhook_schema(hooks, "ON_DELIVERY_ITEM_ADDED")["properties"]["body"]
    customer = body["properties"]["customer"]
    assert shape_errors(hooks, customer, None) == []
    assert shape_errors(hooks, customer, "x")


def test_vendored_subsets_match_paynows_specs() -> None:
    source = openapi_shape.originals_dir()
    if source is None:
        pytest.skip("PayNow's full OpenAPI specs are not beside this checkout")
    for name, chosen in openapi_shape.SUBSETS.items():
        original = openapi_shape.read_spec(source / name)
        expected = openapi_shape.subset(original, chosen["paths"], chosen["webhooks"])
        assert load(name) == expected, f"tests/fakes/openapi/{name} is stale: regenerate it"


def test_not_nullable_lists_are_the_specs() -> None:
    """The fake leaves out exactly the optional fields whose schema refuses null."""
    doc = load("management-api.yaml")
    for schema_name, listed in (
        ("DeliveryItemDto", _ITEM_NOT_NULLABLE),
        ("CustomerDto", _CUSTOMER_NOT_NULLABLE),
    ):
        schema = doc["components"]["schemas"][schema_name]
        refusing = {
            name
            for name, prop in schema["properties"].items()
            if name not in schema["required"] and shape_errors(doc, prop, None)  # null breaks it
        }
        assert refusing == listed, schema_name


# ------------------------------------------------------------ served shapes


@pytest.mark.parametrize("nulls", NULLS_MODES)
def test_listings_follow_the_management_spec(nulls: str) -> None:
    doc = load("management-api.yaml")

    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        made = varied_store(fake)
        status, store_items = await get(fake, session)
        assert status == 200 and len(store_items) == 8
        status, customer_items = await get(fake, session, made["mc"])
        assert status == 200 and len(customer_items) == 3
        lenient = nulls == "always"  # null for every unset field, as some serialisers write
        for path, body in ((STORE, store_items), (CUSTOMER, customer_items)):
            schema = response_schema(doc, path)
            assert shape_errors(doc, schema, body, null_optional=lenient) == []
        if nulls == "always":
            assert shape_errors(doc, response_schema(doc, STORE), store_items)  # strictly: not
        by_id = {item["id"]: item for item in store_items}
        unset_revoked_at = [("revoked_at" in item) for item in store_items]
        unset_trial = [("trial_id" in item) for item in store_items]
        if nulls == "spec":  # absent where null is refused, null where allowed
            assert not any(unset_trial) and all(unset_revoked_at)
        elif nulls == "never":
            assert not any(unset_trial) and not all(unset_revoked_at)
        else:
            assert all(unset_trial) and all(unset_revoked_at)
        assert by_id[made["revoked"]]["revoke_reason"] == "chargeback"

    run(scenario, nulls=nulls)


@pytest.mark.parametrize("nulls", NULLS_MODES)
def test_listings_validate_with_perksyncs_models(nulls: str) -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        made = varied_store(fake)
        _, body = await get(fake, session, asc="true")
        for raw in body:
            item = InventoryItem.from_api(raw)
            customer = Customer.from_api(raw["customer"])
            assert item.customer_id == customer.id
        by_id = {raw["id"]: raw for raw in body}
        gift = by_id[made["gift"]]
        assert gift["gift"] is True and gift["customer"].get("minecraft_uuid") is None
        assert gift["customer"]["minecraft"]["id"] == gift["customer"]["name"]  # offline mode
        assert gift["order_customer_id"] == gift["order_customer"]["id"] == made["mc"]
        assert gift["customer_id"] != made["mc"]
        assert gift["custom_variables"] == {"colour": "red"}
        routed = by_id[made["routed"]]
        assert routed["skip_commands"] is True
        assert routed["execute_on_gameserver_id"] == "411486491630370816"
        assert InventoryItem.from_api(by_id[made["override"]]).override_expires_at
        assert Customer.from_api(by_id[made["active"]]["customer"]).metadata == {
            "discord": "minecraft#1"
        }

    run(scenario, nulls=nulls)


def test_ids_grow_with_creation_and_encode_its_time() -> None:
    fake = FakeStore()
    cid = fake.add_customer()["id"]
    before = datetime.now(UTC)
    made = [fake.add_item(cid)["id"] for _ in range(50)]
    made.append(fake.add_item(cid, added_at=before - timedelta(days=3))["id"])  # still higher
    assert [int(i) for i in made] == sorted({int(i) for i in made})
    created = FLAKE_EPOCH + timedelta(milliseconds=int(made[0]) >> 22)
    assert abs(created - before) < timedelta(seconds=5)


# ---------------------------------------------------------------- listings


def test_paging_forwards_and_backwards() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        cid = fake.add_customer()["id"]
        other = fake.add_customer()["id"]
        made = []
        for n in range(7):
            made.append(fake.add_item(cid if n % 2 else other)["id"])
        forward: list[str] = []
        after: dict[str, str] = {}
        while True:
            page = await ids(fake, session, limit="3", asc="true", **after)
            forward += page
            if len(page) < 3:
                break
            after = {"after": page[-1]}
        assert forward == made
        backward: list[str] = []
        before: dict[str, str] = {}
        while True:
            page = await ids(fake, session, limit="3", **before)  # descending by default
            backward += page
            if len(page) < 3:
                break
            before = {"before": page[-1]}
        assert backward == made[::-1]
        mine = [i for n, i in enumerate(made) if n % 2]
        assert await ids(fake, session, cid, asc="true", limit="2", after=mine[0]) == mine[1:3]
        assert await ids(fake, session, after=made[2], before=made[5], asc="true") == made[3:5]
        assert await ids(fake, session, after=made[-1], asc="true") == []

    run(scenario)


def test_active_only_and_its_readings() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        cid = fake.add_customer()["id"]
        states = ("usable", "active", "used", "renewed", "revoked", "active")
        made = {fake.add_item(cid, state=s)["id"]: s for s in states}
        live = [i for i, s in made.items() if s in ("active", "renewed")]
        assert await ids(fake, session, activeOnly="true", asc="true") == live
        assert await ids(fake, session, cid, activeOnly="TRUE", asc="true") == live
        assert await ids(fake, session, activeOnly="false", asc="true") == list(made)
        # Filters first, then the limit: the first two live items, not the first two items.
        assert await ids(fake, session, activeOnly="1", asc="true", limit="2") == live[:2]
        fake.active_only_states = {"active", "renewed", "usable"}
        with_usable = [i for i, s in made.items() if s in ("active", "renewed", "usable")]
        assert await ids(fake, session, activeOnly="true", asc="true") == with_usable
        fake.active_only_states = {"active"}
        assert len(await ids(fake, session, activeOnly="true")) == 2

    run(scenario)


def test_late_items_and_snapshot_gaps() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        cid = fake.add_customer()["id"]
        early = fake.add_item(cid)["id"]
        late = fake.add_item(cid, visible=False)["id"]
        newest = fake.add_item(cid)["id"]
        assert int(early) < int(late) < int(newest)
        assert await ids(fake, session, asc="true") == [early, newest]
        assert await ids(fake, session, cid) == [newest, early]
        fake.reveal(late)
        # A cursor read past `newest` misses it; a read from before it finds it.
        assert await ids(fake, session, asc="true", after=newest) == []
        assert await ids(fake, session, asc="true", after=early) == [late, newest]
        fake.hide_from_snapshot(early)
        assert await ids(fake, session, activeOnly="true", asc="true") == [late, newest]
        assert await ids(fake, session, cid, activeOnly="true", asc="true") == [late, newest]
        assert await ids(fake, session, cid, asc="true") == [early, late, newest]
        assert await ids(fake, session, asc="true") == [early, late, newest]
        fake.show_in_snapshot(early)
        fake.conceal(newest)
        assert await ids(fake, session, activeOnly="true", asc="true") == [early, late]
        assert await ids(fake, session, cid, asc="true") == [early, late]

    run(scenario)


def test_changes_are_served_at_once() -> None:
    """Cached bodies follow every change: state, customer, knobs."""

    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        buyer = fake.add_customer("none", name="Gordon")["id"]
        cid = fake.add_customer("none", name="Steve")["id"]
        gift = fake.add_item(cid, state="usable", expirable=True, gift_from=buyer)["id"]

        async def served() -> dict[str, Any]:
            _, body = await get(fake, session)
            (item,) = body
            return dict(item)

        assert (await served())["state"] == "usable"
        fake.activate(gift)
        assert (await served())["active_at"]
        fake.link_account(cid, "minecraft")
        assert (await served())["customer"]["minecraft_uuid"]
        fake.link_account(buyer, "steam")
        assert (await served())["order_customer"]["steam_id"]
        fake.update_customer(cid, metadata={"tier": "gold"})
        assert (await served())["customer"]["metadata"] == {"tier": "gold"}
        fake.nulls = "always"
        assert (await served())["customer"]["steam"] is None
        fake.revoke(gift, "refund")
        item = await served()
        assert item["state"] == "revoked" and item["revoke_reason"] == "refund"

    run(scenario)


def test_state_changes_fill_their_timestamps() -> None:
    fake = FakeStore()
    cid = fake.add_customer()["id"]
    item = fake.add_item(cid, state="usable", expirable=True)
    assert item["active_at"] is None and item["expires_at"] is None
    fake.activate(item["id"])
    first_expiry = datetime.fromisoformat(str(item["expires_at"]))
    assert item["state"] == "active" and item["active_at"]
    fake.renew(item["id"])
    assert item["state"] == "renewed"
    assert datetime.fromisoformat(item["expires_at"]) > first_expiry
    fake.expire(item["id"])
    assert item["state"] == "used" and item["removed_at"]
    assert datetime.fromisoformat(item["expires_at"]) <= datetime.now(UTC)
    other = fake.add_item(cid)
    fake.revoke(other["id"], "chargeback")
    assert other["revoked_at"] and other["revoke_reason"] == "chargeback"
    used = fake.use(fake.add_item(cid)["id"])
    assert used["state"] == "used" and used["removed_at"]
    with pytest.raises(KeyError, match="no item 1"):
        fake.revoke("1")
    with pytest.raises(ValueError, match="platform"):
        fake.add_customer("xbox")


def test_storefront_items_are_the_token_modes_view() -> None:
    fake = FakeStore()
    cid = fake.add_customer()["id"]
    fake.add_item(cid, custom_variables={"a": "b"})
    fake.add_item(cid, visible=False)
    (item,) = fake.storefront_items(cid)
    assert "custom_variables" not in item and "customer" not in item
    assert InventoryItem.from_api(item).customer_id == cid


def test_populate_is_servable() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        people = fake.populate(20, 250, live=90, products=("vip", "mvp"))
        assert len(people) == 20 and len(fake.items()) == 250
        seen: list[str] = []
        after: dict[str, str] = {}
        while True:
            page = await ids(fake, session, activeOnly="true", asc="true", limit="100", **after)
            seen += page
            if len(page) < 100:
                break
            after = {"after": page[-1]}
        assert len(seen) == len(set(seen)) == 90

    run(scenario)


# ------------------------------------------------------- errors and counters


def test_auth_store_and_customer_errors() -> None:
    doc = load("management-api.yaml")
    error_schema = response_schema(doc, STORE, "default")

    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        cid = fake.add_customer()["id"]
        fake.add_item(cid)
        for scheme in ("APIKey", "apikey", "APIKEY"):
            status, _ = await get(fake, session, auth=f"{scheme} {fake.api_key}")
            assert status == 200
        cases: list[tuple[dict[str, Any], int]] = [
            ({"auth": None}, 401),
            ({"auth": "APIKey wrong"}, 401),
            ({"auth": f"Bearer {fake.api_key}"}, 401),
            ({"auth": f"Customer {fake.api_key}"}, 401),
            ({"store": "411486491630370816"}, 403),
            ({"store": "411486491630370816", "auth": "APIKey wrong"}, 401),
            ({"customer": "411486491630370816"}, 404),
        ]
        for kwargs, expected in cases:
            status, body = await get(fake, session, **kwargs)
            assert status == expected, kwargs
            assert body["status"] == expected and body["message"] and body["trace_id"]
            assert shape_errors(doc, error_schema, body) == []
        assert fake.api_key not in json.dumps([r.query for r in fake.log])

    run(scenario)


def test_query_validation() -> None:
    doc = load("management-api.yaml")
    error_schema = response_schema(doc, CUSTOMER, "default")

    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        cid = fake.add_customer()["id"]
        bad = ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"after": "abc"},
               {"before": "-1"}, {"asc": "maybe"}, {"activeOnly": "yes"})  # fmt: skip
        for query in bad:
            status, body = await get(fake, session, cid, **query)
            assert status == 400, query
            assert body["code"] == "validation-error"
            assert body["errors"][0]["path"] == next(iter(query))
            assert shape_errors(doc, error_schema, body) == []
        for query in ({"limit": "1"}, {"limit": "100"}, {"after": "null"}, {"after": ""}):
            assert (await get(fake, session, cid, **query))[0] == 200, query

    run(scenario)


def test_counters_and_request_log() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        a = fake.add_customer()["id"]
        b = fake.add_customer()["id"]
        await get(fake, session, asc="true", after="1")
        await get(fake, session, activeOnly="true")
        await get(fake, session, a)
        await get(fake, session, b, activeOnly="true")
        await get(fake, session, b, auth=None)
        assert fake.count("store_items") == 2
        assert fake.count("customer_items") == 3
        assert fake.count("customer_items", customer=b) == 2
        assert fake.count(customer=a) == 1 and fake.count() == 5
        (snapshot,) = [r for r in fake.requests("store_items") if "activeOnly" in r.query]
        assert snapshot.query == {"activeOnly": "true"} and snapshot.status == 200
        assert [r.status for r in fake.requests(customer=b)] == [200, 401]
        assert fake.requests(customer=a)[0].token == fake.api_key
        async with session.get(fake.url + "/v1/store/customer") as resp:
            assert resp.status == 404
        assert fake.count("other") == 1
        fake.reset_counters()
        assert fake.count() == 0 and fake.log == []

    run(scenario)


def test_faults_reuse_the_storefront_machinery() -> None:
    async def scenario(fake: FakeStore, session: aiohttp.ClientSession) -> None:
        a = fake.add_customer()["id"]
        b = fake.add_customer()["id"]
        made = [fake.add_item(a if n % 2 else b)["id"] for n in range(6)]
        fake.fault("rate_limit", path="store_items", page=2, retry_after=3)
        assert await ids(fake, session, asc="true", limit="2") == made[:2]
        async with session.get(
            f"{fake.url}/v1/stores/{fake.store_id}/delivery/items",
            params={"asc": "true", "limit": "2", "after": made[1]},
            headers={"Authorization": f"APIKey {fake.api_key}"},
        ) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        assert await ids(fake, session, asc="true", limit="2", after=made[1]) == made[2:4]
        fake.fault("status", customer=b, status=503, times=None)
        assert (await get(fake, session, b))[0] == 503
        assert (await get(fake, session, a))[0] == 200
        fake.clear_faults()
        fake.fault("status", path="customer_items", request=2, status=500)
        c = fake.add_customer()["id"]
        assert (await get(fake, session, c))[0] == 200  # c's first look-up
        assert (await get(fake, session, a))[0] == 500  # a's second
        assert (await get(fake, session, c))[0] == 200  # the fault is spent
        fake.fault("truncated", path="store_items")
        async with session.get(
            f"{fake.url}/v1/stores/{fake.store_id}/delivery/items",
            headers={"Authorization": f"APIKey {fake.api_key}"},
        ) as resp:
            text = await resp.text()
            assert resp.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
        fake.fault("repeat_page", path="store_items")
        assert await ids(fake, session, asc="true", limit="2", after=made[3]) == made[:2]
        fake.fault("missing_field", path="store_items", field="customer")
        _, body = await get(fake, session, limit="1")
        assert "customer" not in body[0]
        assert [r.fault for r in fake.log if r.fault] == [
            "rate_limit", "status", "status", "truncated", "repeat_page", "missing_field"
        ]  # fmt: skip
        with pytest.raises(ValueError, match="path"):
            fake.fault("status", path="items")
        assert fake.pending_faults == []

    run(scenario)


def test_stall_ends_when_the_fake_stops() -> None:
    async def main() -> None:
        fake = FakeStore()
        await fake.start()
        fake.fault("stall", path="store_items")  # no delay: until stop()
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(get(fake, session))
            while fake.count("store_items") == 0:  # noqa: ASYNC110 (no arrival event to wait on)
                await asyncio.sleep(0.01)
            assert not request.done()
            await fake.stop()
            # The stall ends (the answer may come or the connection close);
            # without it, this would wait for the test's timeout.
            outcome: object = (await asyncio.gather(request, return_exceptions=True))[0]
            assert outcome == (200, []) or isinstance(outcome, aiohttp.ClientError)

    asyncio.run(main())


# ---------------------------------------------------------------- webhooks


def verify(secret: str, headers: Any, raw: bytes, now_ms: int) -> bool:
    """The rule a receiver applies, written from the contract, not from the fake."""
    stamp = headers.get("PayNow-Timestamp")
    signature = headers.get("PayNow-Signature")
    if not stamp or not signature or not stamp.isdigit():
        return False
    if abs(now_ms - int(stamp)) > 5 * 60 * 1000:
        return False
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + raw, hashlib.sha256).digest()
    return hmac.compare_digest(signature, mac.hex()) or hmac.compare_digest(
        signature, base64.b64encode(mac).decode()
    )


class Receiver:
    """A loopback webhook endpoint: keeps what arrives, answers 200 or 401."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.received.append((dict(request.headers), raw))
        if not verify(SECRET, request.headers, raw, int(time.time() * 1000)):
            return web.Response(status=401, text="bad signature")
        return web.Response(status=200, text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/paynow/webhook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/paynow/webhook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def run_hooks(scenario: Callable[[FakeStore, Receiver], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        async with FakeStore(**kw) as fake, Receiver() as receiver:
            return await scenario(fake, receiver)

    return asyncio.run(main())


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_webhook_signature_recomputed_independently(encoding: str) -> None:
    async def scenario(fake: FakeStore, receiver: Receiver) -> None:
        cid = fake.add_customer()["id"]
        item = fake.add_item(cid)["id"]
        result = await fake.send_webhook(
            receiver.url, "ON_DELIVERY_ITEM_ADDED", item, SECRET, encoding=encoding
        )
        assert (result.status, result.body) == (200, "ok")
        headers, raw = receiver.received[-1]
        assert raw == result.raw
        stamp = headers["PayNow-Timestamp"]
        assert abs(int(stamp) - time.time() * 1000) < 60_000  # milliseconds, not seconds
        mac = hmac.new(SECRET.encode(), f"{stamp}.".encode() + raw, hashlib.sha256).digest()
        expected = mac.hex() if encoding == "hex" else base64.b64encode(mac).decode()
        assert headers["PayNow-Signature"] == expected
        payload = json.loads(raw)
        assert payload["event_type"] == "ON_DELIVERY_ITEM_ADDED"
        assert payload["event_id"] == result.event_id and payload["body"]["id"] == item
        at = await fake.send_webhook(
            receiver.url, "ON_DELIVERY_ITEM_ADDED", item, SECRET, timestamp_ms=1_700_000_000_000
        )
        assert receiver.received[-1][0]["PayNow-Timestamp"] == "1700000000000"
        assert at.status == 401  # far outside the window

    run_hooks(scenario)


@pytest.mark.parametrize("nulls", NULLS_MODES)
def test_webhook_bodies_follow_the_webhook_spec(nulls: str) -> None:
    hooks = load("webhook-definitions.yaml")

    async def scenario(fake: FakeStore, receiver: Receiver) -> None:
        made = varied_store(fake)
        events = [(event, made["active"], True) for event in DELIVERY_EVENTS]
        events += [
            ("ON_DELIVERY_ITEM_REVOKED", made["revoked"], False),
            ("ON_DELIVERY_ITEM_ADDED", made["gift"], True),
            ("ON_DELIVERY_ITEM_ADDED", made["routed"], True),
            ("ON_ORDER_COMPLETED", made["gift"], True),
        ]
        for event, item, customer in events:
            result = await fake.send_webhook(receiver.url, event, item, SECRET, customer=customer)
            assert result.status == 200
            payload = json.loads(result.raw)
            schema = webhook_schema(hooks, event)
            assert shape_errors(hooks, schema, payload, nullable=WEBHOOK_NULLABLE) == [], event
            if event in DELIVERY_EVENTS:
                stored = fake.item(item)
                assert payload["body"]["state"] == stored["state"]
                assert payload["body"]["product"]["slug"] == stored["product"]["slug"]
                embedded = payload["body"]["customer"]
                if customer:
                    assert embedded["id"] == stored["customer_id"]
                else:
                    assert embedded is None
        _, revoked = receiver.received[-4]
        assert json.loads(revoked)["body"]["customer"] is None
        order = json.loads(receiver.received[-1][1])["body"]
        assert order["customer"]["id"] == made["mc"]  # the buyer; the line names the recipient
        assert order["lines"][0]["gift_to_customer"]["id"] == fake.item(made["gift"])["customer_id"]
        routed = json.loads(receiver.received[-2][1])["body"]
        assert routed["execute_on_gameserver"]["id"] == routed["execute_on_gameserver_id"]
        with pytest.raises(ValueError, match="ON_REFUND"):
            await fake.send_webhook(receiver.url, "ON_REFUND", made["active"], SECRET)
        other = await fake.send_webhook(receiver.url, "ON_REFUND", None, SECRET, body={"id": "5"})
        assert other.status == 200 and json.loads(other.raw)["body"] == {"id": "5"}

    run_hooks(scenario, nulls=nulls)


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_each_tamper_is_a_forgery(tamper: str) -> None:
    async def scenario(fake: FakeStore, receiver: Receiver) -> None:
        item = fake.add_item(fake.add_customer()["id"])["id"]
        honest = await fake.send_webhook(receiver.url, "ON_DELIVERY_ITEM_ADDED", item, SECRET)
        assert honest.status == 200
        forged = await fake.send_webhook(
            receiver.url, "ON_DELIVERY_ITEM_ADDED", item, SECRET, tamper=tamper
        )
        assert forged.status == 401
        assert fake.webhooks_sent == [honest, forged]

    run_hooks(scenario)


def test_replays() -> None:
    async def scenario(fake: FakeStore, receiver: Receiver) -> None:
        item = fake.add_item(fake.add_customer()["id"])["id"]
        first = await fake.send_webhook(receiver.url, "ON_DELIVERY_ITEM_ACTIVATED", item, SECRET)
        same = await fake.replay_webhook(receiver.url, first)
        (h1, raw1), (h2, raw2) = receiver.received
        assert raw2 == raw1
        for header in ("PayNow-Timestamp", "PayNow-Signature"):
            assert h2[header] == h1[header]
        assert same.status == 200 and same.event_id == first.event_id
        retried = await fake.replay_webhook(
            receiver.url, first, SECRET, timestamp_ms=int(first.headers["PayNow-Timestamp"]) + 7
        )
        assert retried.status == 200 and retried.raw == first.raw
        assert retried.headers["PayNow-Signature"] != first.headers["PayNow-Signature"]
        again = await fake.send_webhook(
            receiver.url, "ON_DELIVERY_ITEM_ACTIVATED", item, SECRET, event_id=first.event_id
        )
        assert json.loads(again.raw)["event_id"] == first.event_id

    run_hooks(scenario)
