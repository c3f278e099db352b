"""StorefrontClient (token mode) end to end against the fake PayNow API over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from daemon import __version__
from daemon.paynow import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    PayNowAuthError,
    PayNowBadResponse,
    PayNowError,
    PayNowHTTPError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowTimeout,
    PayNowUnavailable,
    RateLimiter,
    StorefrontClient,
    make_session,
)
from tests.fakes.paynow_api import FakePayNow

T = TypeVar("T")

FAST: dict[str, Any] = {
    "requests_per_second": 0,
    "timeout_seconds": 2.0,
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "retry_budget_seconds": 5.0,
}


def run(
    scenario: Callable[[FakePayNow, StorefrontClient], Awaitable[T]], **client_kwargs: Any
) -> T:
    """Run `scenario(fake, client)` with a fresh fake and client on a new loop."""

    async def main() -> T:
        async with env(**client_kwargs) as (fake, client):
            return await scenario(fake, client)

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def env(**client_kwargs: Any) -> AsyncIterator[tuple[FakePayNow, StorefrontClient]]:
    async with FakePayNow() as fake, make_session() as session:
        yield fake, StorefrontClient(session, fake.url, **{**FAST, **client_kwargs})


def raises(
    exc_type: type[PayNowError],
    scenario: Callable[[FakePayNow, StorefrontClient], Awaitable[Any]],
    **client_kwargs: Any,
) -> tuple[PayNowError, FakePayNow]:
    """Run `scenario`; assert it raised `exc_type`; return the error and the fake."""
    seen: dict[str, Any] = {}

    async def wrapped(fake: FakePayNow, client: StorefrontClient) -> None:
        seen["fake"] = fake
        await scenario(fake, client)

    with pytest.raises(exc_type) as info:
        run(wrapped, **client_kwargs)
    error = info.value
    assert "\n" not in str(error)
    return error, seen["fake"]


def customer_with(fake: FakePayNow, items: int = 0) -> str:
    token = fake.new_token()
    fake.add_customer(token, items=items)
    return token


# ------------------------------------------------------------------ happy paths


def test_fetch_customer() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = fake.new_token()
        sent = fake.add_customer(token, platform="both", name="Rabscuttle")
        customer = await client.fetch_customer(token)
        assert customer.id == sent["id"]
        assert customer.store_id == fake.store_id
        assert customer.name == "Rabscuttle"
        assert customer.steam_id == sent["steam_id"]
        assert customer.minecraft_uuid == sent["minecraft_uuid"]
        assert customer.raw == sent
        assert fake.count("customer", token) == 1
        (record,) = fake.requests("customer")
        assert record.user_agent == f"perksync/{__version__}"

    run(scenario)


@pytest.mark.parametrize("count", [0, 1, 99, 100, 101, 250])
def test_inventory_pagination(count: int) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, count)
        expected = fake.items(token)
        items = await client.fetch_inventory(token)
        assert [i.id for i in items] == [e["id"] for e in expected]
        assert [i.raw for i in items] == expected
        assert len({i.id for i in items}) == count
        pages = fake.requests("items", token)
        assert len(pages) == count // 100 + 1
        cursors = [p.query.get("after") for p in pages]
        assert cursors == [None] + [expected[100 * n - 1]["id"] for n in range(1, len(pages))]
        for page in pages:
            assert page.query["limit"] == "100"
            assert page.query["asc"] == "true"

    run(scenario)


def test_many_customers_concurrently_get_their_own_items() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        tokens = [customer_with(fake, n % 7) for n in range(40)]
        results = await asyncio.gather(*(client.fetch_inventory(t) for t in tokens))
        for token, items in zip(tokens, results, strict=True):
            assert [i.raw for i in items] == fake.items(token)

    run(scenario)


def test_extra_fields_and_unknown_state_are_tolerated() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = fake.new_token()
        customer = fake.make_customer()
        customer["loyalty_tier"] = {"name": "gold"}
        fake.add_customer(token, customer)
        item = fake.add_item(token, state="active")
        item["brand_new_field"] = [1, 2, 3]
        item["product"]["colour"] = "teal"
        fake.add_item(token, state="frozen")
        got = await client.fetch_customer(token)
        assert got.raw["loyalty_tier"] == {"name": "gold"}
        items = await client.fetch_inventory(token)
        assert items[0].raw["brand_new_field"] == [1, 2, 3]
        assert [i.state for i in items] == ["active", "frozen"]

    run(scenario)


def test_timestamps_with_0_to_9_fractional_digits() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        stamps = ["2023-04-11T21:52:53Z"] + [
            "2023-04-11T21:52:53." + "123456789"[:n] + "Z" for n in range(1, 10)
        ]
        for stamp in stamps:
            fake.add_item(token, added_at=datetime(2023, 4, 11, tzinfo=UTC), expires_at=stamp)
        items = await client.fetch_inventory(token)
        assert [i.expires_at for i in items] == stamps

    run(scenario)


# ------------------------------------------------------------- non-retried errors


def test_unknown_token_is_auth_error_not_retried() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        customer_with(fake)
        await client.fetch_inventory("nobody-has-this-token")

    error, fake = raises(PayNowAuthError, scenario)
    assert error.kind == "auth"
    assert error.status == 401 and error.code == "unauthorized"
    assert error.trace_id and error.trace_id in str(error)
    assert "401" in str(error) and "invalid customer token" in str(error)
    assert fake.count("items") == 1


@pytest.mark.parametrize("path", ["customer", "items"])
def test_403_is_auth_error_not_retried(path: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 3)
        fake.fault(token, "status", status=403, times=None)
        await (
            client.fetch_customer(token) if path == "customer" else client.fetch_inventory(token)
        )

    error, fake = raises(PayNowAuthError, scenario)
    assert error.status == 403 and error.attempts == 1
    assert fake.count(path) == 1


def test_404_is_not_found_not_retried() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status", status=404, times=None)
        await client.fetch_customer(token)

    error, fake = raises(PayNowNotFound, scenario)
    assert error.kind == "not_found" and error.code == "not-found"
    assert fake.count() == 1


def test_other_4xx_without_body_is_http_error_not_retried() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status_empty", status=400, times=None)
        await client.fetch_inventory(token)

    error, fake = raises(PayNowHTTPError, scenario)
    assert error.kind == "http_error" and error.code is None
    assert "HTTP 400" in str(error)
    assert fake.count() == 1


def test_redirect_is_not_followed() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status_empty", status=302, times=None)
        await client.fetch_customer(token)

    error, fake = raises(PayNowBadResponse, scenario)
    assert "HTTP 302" in str(error) and "redirect" in str(error)
    assert fake.count() == 1


BAD_BODIES = [
    ("customer", "malformed", "malformed JSON"),
    ("items", "malformed", "malformed JSON"),
    ("customer", "truncated", "truncated JSON"),
    ("items", "truncated", "truncated JSON"),
    ("items", "disconnect", "truncated"),
    ("customer", "wrong_shape", "expected a JSON object, got an array"),
    ("items", "wrong_shape", "expected a JSON array, got an object"),
    ("customer", "missing_field", "id: Field required"),
    ("items", "missing_field", "state: Field required"),
]


@pytest.mark.parametrize(("path", "kind", "words"), BAD_BODIES)
def test_bad_bodies_are_bad_response_not_retried(path: str, kind: str, words: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 3)
        fake.fault(token, kind, times=None)
        await (
            client.fetch_customer(token) if path == "customer" else client.fetch_inventory(token)
        )

    error, fake = raises(PayNowBadResponse, scenario)
    assert error.kind == "bad_response"
    assert words in str(error)
    assert fake.count(path) == 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[1, 2]", "item 0 is a number, not an object"),
        (b'[{"id": "1"}]', "item 0: failed validation"),
        (b"null", "expected a JSON array, got null"),
        (b"", "malformed JSON"),
        (b"\xff\xfe[]", "malformed JSON"),
    ],
)
def test_wrong_items_bodies(body: bytes, words: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 3)
        fake.fault(token, "body", body=body)
        await client.fetch_inventory(token)

    error, _ = raises(PayNowBadResponse, scenario)
    assert words in str(error)


def test_bad_item_id_is_bad_response() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        item = fake.make_item(fake.customer(token)["id"], item_id="12abc")
        fake.fault(token, "body", body=json.dumps([item]))
        await client.fetch_inventory(token)

    error, _ = raises(PayNowBadResponse, scenario)
    assert "item 0: failed validation: id" in str(error)


# ------------------------------------------------------ deep and large bodies


def nested(depth: int, inner: str = "1") -> str:
    """JSON text: `inner` inside `depth` arrays."""
    return "[" * depth + inner + "]" * depth


DEEP_BODIES = [
    pytest.param("customer", nested(100_000), id="customer-arrays"),
    pytest.param("items", nested(100_000), id="items-arrays"),
    pytest.param("customer", '{"a":' * 100_000 + "1" + "}" * 100_000, id="customer-objects"),
    pytest.param("items", "[" * 100_000, id="items-cut-short"),
    # The decoder copes with this one; the limit is ours.
    pytest.param("customer", nested(MAX_JSON_DEPTH + 1), id="customer-just-over"),
]


@pytest.mark.parametrize(("path", "body"), DEEP_BODIES)
def test_deeply_nested_json_is_bad_response(path: str, body: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 3)
        fake.fault(token, "body", body=body, path=path, times=None)
        await (
            client.fetch_customer(token) if path == "customer" else client.fetch_inventory(token)
        )

    error, fake = raises(PayNowBadResponse, scenario)
    assert f"JSON nested more than {MAX_JSON_DEPTH} levels deep" in str(error)
    assert fake.count(path) == 1


def test_deep_json_inside_an_item_or_customer() -> None:
    """Unknown fields are kept as sent; nested up to the limit they are fine,
    one level more is a malformed answer."""

    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        customer = fake.customer(token)
        # The customer is level 1: its field adds MAX_JSON_DEPTH - 1 levels.
        fine = {**customer, "x": json.loads(nested(MAX_JSON_DEPTH - 1))}
        fake.fault(token, "body", path="customer", body=json.dumps(fine))
        assert (await client.fetch_customer(token)).raw == fine
        item = fake.make_item(customer["id"], x=json.loads(nested(MAX_JSON_DEPTH - 2)))
        fake.fault(token, "body", path="items", body=json.dumps([item]))
        assert [i.raw for i in await client.fetch_inventory(token)] == [item]
        deep = fake.make_item(customer["id"], x=json.loads(nested(MAX_JSON_DEPTH - 1)))
        fake.fault(token, "body", path="items", body=json.dumps([deep]))
        with pytest.raises(PayNowBadResponse, match="nested more than"):
            await client.fetch_inventory(token)

    run(scenario)


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(503, PayNowUnavailable), (404, PayNowNotFound), (401, PayNowAuthError)],
)
def test_deeply_nested_error_body_keeps_the_error(status: int, exc_type: type[PayNowError]) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status", status=status, body=nested(100_000), times=None)
        await client.fetch_customer(token)

    error, _ = raises(exc_type, scenario, max_attempts=2)
    assert error.status == status
    assert f"HTTP {status}" in str(error)


def test_gzip_body_is_read_and_a_bomb_is_refused() -> None:
    """The cap counts decompressed bytes: ~4 KB on the wire that inflate past
    it are a malformed answer, not retried."""

    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "gzip_body", path="customer", body=json.dumps(fake.customer(token)))
        assert (await client.fetch_customer(token)).raw == fake.customer(token)
        padded = b"[" + b" " * MAX_BODY_BYTES + b"]"  # valid JSON: an empty array
        fake.fault(token, "gzip_body", path="items", body=padded, times=None)
        with pytest.raises(PayNowBadResponse, match=f"larger than {MAX_BODY_BYTES:,} bytes"):
            await client.fetch_inventory(token)
        assert fake.count("items", token) == 1
        fake.clear_faults()
        assert await client.fetch_inventory(token) == []

    run(scenario)


def test_endless_body_is_refused_once_it_passes_the_cap() -> None:
    """Read as it arrives: reading the whole body first would never end."""

    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 2)
        fake.fault(token, "endless", path="items")
        with pytest.raises(PayNowBadResponse, match="larger than 1,000,000 bytes"):
            await client.fetch_inventory(token)
        assert len(await client.fetch_inventory(token)) == 2  # a new connection

    run(scenario, max_body_bytes=1_000_000, timeout_seconds=30.0)


def test_endless_error_body_costs_only_its_detail() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "endless", status=503, body=b'{"message": "', times=None)
        await client.fetch_customer(token)

    error, _ = raises(
        PayNowUnavailable, scenario, max_body_bytes=100_000, max_attempts=2, timeout_seconds=30.0
    )
    assert error.status == 503 and error.attempts == 2
    assert str(error).startswith("PayNow customer: HTTP 503; giving up")


def test_what_paynow_says_in_an_error_is_escaped() -> None:
    """Control characters and lone surrogates in an error body reach logs,
    the state database and `status` only as escapes."""

    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        body = json.dumps({"code": "bad\ud800", "message": "no \x1b[31mred\u202e here"})
        fake.fault(token, "status", status=400, body=body)
        await client.fetch_customer(token)

    error, _ = raises(PayNowHTTPError, scenario)
    assert str(error) == ("PayNow customer: HTTP 400 bad\\ud800: no \\u001b[31mred\\u202e here")
    str(error).encode("utf-8")  # storable


# ---------------------------------------------------------------------- retries


def test_429_retry_after_is_honoured() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "rate_limit", retry_after=0.2)
        customer = await client.fetch_customer(token)
        assert customer.id == fake.customer(token)["id"]
        first, second = fake.requests("customer")
        assert first.status == 429 and second.status == 200
        assert second.time - first.time >= 0.19

    run(scenario)


def test_503_retry_after_is_honoured_on_a_page() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 150)
        fake.fault(token, "status", status=503, retry_after=0.2, page=2)
        items = await client.fetch_inventory(token)
        assert len(items) == 150
        pages = fake.requests("items")
        assert [p.page for p in pages] == [1, 2, 2]
        assert pages[2].time - pages[1].time >= 0.19

    run(scenario)


def test_retry_after_beyond_budget_gives_up_at_once() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "rate_limit", retry_after=30, times=None)
        await client.fetch_customer(token)

    started = time.monotonic()
    error, fake = raises(PayNowRateLimited, scenario, retry_budget_seconds=2.0)
    assert time.monotonic() - started < 1.5
    assert error.kind == "rate_limited" and error.status == 429
    assert "Retry-After 30s exceeds the remaining retry budget" in str(error)
    assert fake.count() == 1


def test_no_retry_is_made_that_the_budget_would_leave_no_time_to_answer() -> None:
    # After waiting 0.95 s of a 1 s budget the retry would have ~50 ms: too
    # short to be worth it (an attempt cut to a few ms can only time out, and
    # would then report a timeout instead of what PayNow said).
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "rate_limit", retry_after=0.95, times=None)
        await client.fetch_customer(token)

    error, fake = raises(PayNowRateLimited, scenario, retry_budget_seconds=1.0)
    assert error.status == 429 and "retry budget 1s" in str(error)
    assert fake.count() == 1


def test_429_forever_is_rate_limited_after_max_attempts() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "rate_limit", retry_after=0, times=None)
        await client.fetch_customer(token)

    error, fake = raises(PayNowRateLimited, scenario, max_attempts=3)
    assert error.attempts == 3 and fake.count() == 3
    assert "giving up after 3 attempts" in str(error)


@pytest.mark.parametrize("kind", ["status", "status_empty", "status_text", "reset"])
def test_5xx_and_resets_are_retried_then_succeed(kind: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> int:
        token = customer_with(fake, 5)
        fake.fault(token, kind, times=2)
        items = await client.fetch_inventory(token)
        assert len(items) == 5
        return fake.count("items")

    assert run(scenario) == 3


def test_retries_log_one_warning_each_and_use_backoff(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status", status=502, times=3)
        await client.fetch_customer(token)
        times = [r.time for r in fake.requests("customer")]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) == 3
        assert all(gap >= 0.02 for gap in gaps)  # base 0.04: jitter in [0.02, 0.04], ...

    with caplog.at_level(logging.WARNING, logger="daemon.paynow"):
        run(scenario, backoff_base_seconds=0.04, backoff_max_seconds=1.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("HTTP 502" in r.getMessage() and "retrying" in r.getMessage() for r in warnings)


def test_5xx_forever_gives_up_within_the_budget() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status", status=500, times=None)
        await client.fetch_customer(token)

    started = time.monotonic()
    error, fake = raises(
        PayNowUnavailable,
        scenario,
        max_attempts=1000,
        retry_budget_seconds=1.0,
        backoff_base_seconds=0.05,
        backoff_max_seconds=0.2,
    )
    elapsed = time.monotonic() - started
    assert type(error) is PayNowUnavailable and error.kind == "unavailable"
    assert error.status == 500 and error.code == "internal-server-error"
    assert elapsed < 1.6
    assert 3 <= fake.count() < 1000
    assert "retry budget" in str(error)


def test_5xx_forever_stops_at_max_attempts() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        fake.fault(token, "status", status=504, times=None)
        await client.fetch_inventory(token)

    error, fake = raises(PayNowUnavailable, scenario, max_attempts=3)
    assert fake.count() == 3 and error.attempts == 3


def test_connection_refused_is_unavailable() -> None:
    async def main() -> None:
        async with FakePayNow() as fake:
            url = fake.url
        async with make_session() as session:
            client = StorefrontClient(session, url, **{**FAST, "max_attempts": 2})
            await client.fetch_customer("some-token")

    with pytest.raises(PayNowUnavailable) as info:
        asyncio.run(main())
    assert info.value.kind == "unavailable" and info.value.attempts == 2


def test_stall_times_out_then_retry_succeeds() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 2)
        fake.fault(token, "stall", delay=5)
        items = await client.fetch_inventory(token)
        assert len(items) == 2
        assert fake.count() == 2

    started = time.monotonic()
    run(scenario, timeout_seconds=0.3)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("kind", ["stall", "stall_body"])
def test_stall_forever_is_timeout(kind: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 2)
        fake.fault(token, kind, times=None, delay=30)
        await client.fetch_inventory(token)

    error, fake = raises(PayNowTimeout, scenario, timeout_seconds=0.25, max_attempts=2)
    assert error.kind == "timeout" and isinstance(error, PayNowUnavailable)
    assert "timed out after 0.25s" in str(error)
    assert fake.count() == 2


# --------------------------------------------------------------- paged failures


def test_page_retry_retries_only_that_page() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        fake.fault(token, "status", status=503, page=2)
        items = await client.fetch_inventory(token)
        assert [i.raw for i in items] == fake.items(token)
        assert [p.page for p in fake.requests("items")] == [1, 2, 2, 3]

    run(scenario)


@pytest.mark.parametrize(
    ("kind", "exc_type"),
    [("status", PayNowUnavailable), ("malformed", PayNowBadResponse), ("stall", PayNowTimeout)],
)
def test_failure_on_page_2_of_3_returns_nothing(kind: str, exc_type: type[PayNowError]) -> None:
    result: list[Any] = []

    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        fake.fault(token, kind, page=2, times=None, delay=30)
        result.append(await client.fetch_inventory(token))

    error, fake = raises(exc_type, scenario, max_attempts=2, timeout_seconds=0.25)
    assert result == []
    assert "page 2" in str(error)
    pages = [p.page for p in fake.requests("items")]
    assert pages[0] == 1 and set(pages[1:]) == {2}


@pytest.mark.parametrize(
    ("kind", "page", "words"),
    [
        ("repeat_page", 2, "is repeated"),
        ("repeat_page", None, "is repeated"),
        ("reverse_page", 1, "is out of order"),
        ("duplicate_item", 3, "is repeated"),
    ],
)
def test_bad_pagination_is_bad_response(kind: str, page: int | None, words: str) -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        fake.fault(token, kind, page=page, times=None)
        await client.fetch_inventory(token)

    error, fake = raises(PayNowBadResponse, scenario)
    assert words in str(error)
    assert fake.count("items") <= 3


def test_page_cap() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        await client.fetch_inventory(token)

    error, fake = raises(PayNowBadResponse, scenario, max_pages=2)
    assert "more than 2 pages" in str(error)
    assert fake.count("items") == 2


# ----------------------------------------------------------------------- secrets


def test_token_never_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    token = "pnc_SECRET_b9f2c1d0e4a7"
    errors: list[PayNowError] = []

    async def main() -> None:
        async with env(max_attempts=2, timeout_seconds=0.25) as (fake, client):
            fake.add_customer(token, items=120)
            faults: list[tuple[str, dict[str, Any]]] = [
                ("status", {"status": 401, "message": f"token {token} is revoked"}),
                ("status", {"status": 500, "message": f"boom for Customer {token}"}),
                ("status", {"status": 404}),
                ("rate_limit", {"retry_after": 100}),
                ("malformed", {}),
                ("truncated", {}),
                ("disconnect", {}),
                ("wrong_shape", {}),
                ("missing_field", {}),
                ("repeat_page", {"page": 2}),
                ("stall", {"delay": 5}),
                ("reset", {}),
                ("body", {"body": f'[{{"id": "{token}"}}]'}),
            ]
            for kind, kwargs in faults:
                for fetch in (client.fetch_customer, client.fetch_inventory):
                    fake.clear_faults()
                    fake.fault(token, kind, times=None, **kwargs)
                    try:
                        await fetch(token)
                    except PayNowError as exc:
                        errors.append(exc)
            for bad in (f"{token}\nX-Evil: 1", f" {token}", ""):
                try:
                    await client.fetch_customer(bad)
                except PayNowAuthError as exc:
                    errors.append(exc)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert len(errors) >= 25
    for error in errors:
        assert token not in str(error) and token not in repr(error)
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
        assert "\n" not in str(error)
    assert any("<token>" in str(e) for e in errors)  # echoed tokens are scrubbed
    assert caplog.records
    for record in caplog.records:
        assert token not in record.getMessage()
    assert token not in caplog.text


def test_a_token_echoed_in_a_field_is_scrubbed_from_validation_errors() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake)
        item = fake.make_item(fake.customer(token)["id"], expires_at=token)
        fake.fault(token, "body", path="items", body=json.dumps([item]))
        await client.fetch_inventory(token)

    error, _ = raises(PayNowBadResponse, scenario)
    assert "not an ISO 8601 timestamp: '<token>'" in str(error)


def test_bad_token_characters_make_no_request() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        await client.fetch_customer("abc\r\ndef")

    error, fake = raises(PayNowAuthError, scenario)
    assert "abc" not in str(error)
    assert fake.count() == 0


def test_client_validates_api_url() -> None:
    async def main() -> None:
        async with make_session() as session:
            StorefrontClient(session, "http://api.paynow.gg")

    with pytest.raises(ValueError, match="https"):
        asyncio.run(main())


# ---------------------------------------------------------------- rate limiting


def test_rate_limiter_spaces_requests() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        tokens = [customer_with(fake) for _ in range(11)]
        await asyncio.gather(*(client.fetch_customer(t) for t in tokens))
        times = sorted(r.time for r in fake.requests("customer"))
        assert len(times) == 11
        assert 0.45 <= times[-1] - times[0] <= 2.0  # 10 intervals of 1/20 s

    run(scenario, requests_per_second=20)


def test_shared_rate_limiter() -> None:
    async def main() -> float:
        shared = RateLimiter(20)
        async with FakePayNow() as fake, make_session() as session:
            token = customer_with(fake)
            a = StorefrontClient(session, fake.url, rate_limiter=shared)
            b = StorefrontClient(session, fake.url, rate_limiter=shared)
            assert a.rate_limiter is b.rate_limiter is shared
            await asyncio.gather(*(c.fetch_customer(token) for c in (a, b) * 3))
            times = sorted(r.time for r in fake.requests("customer"))
            return times[-1] - times[0]

    assert 0.2 <= asyncio.run(main()) <= 1.5  # 5 intervals of 1/20 s


# ------------------------------------------------- reading without validating


def test_read_inventory_keeps_the_bodies_and_validates_on_demand() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        pages = await client.read_inventory(token, lambda pages: False)
        assert not pages.unchanged
        assert [len(json.loads(body)) for body in pages.bodies] == [100, 100, 50]
        items = client.inventory_items(token, pages)
        assert [i.raw for i in items] == fake.items(token)
        body = await client.read_customer(token)
        assert client.parse_customer(token, body).raw == json.loads(body) == fake.customer(token)

    run(scenario)


def test_read_inventory_stops_where_the_caller_has_it_unchanged() -> None:
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 250)
        asked: list[int] = []

        def unchanged(pages: Any) -> bool:
            asked.append(len(pages.bodies))
            return len(pages.bodies) == 2

        pages = await client.read_inventory(token, unchanged)
        assert pages.unchanged and asked == [1, 2]
        assert fake.count("items", token) == 2  # the third page is never asked for
        with pytest.raises(ValueError, match="already has this inventory"):
            client.inventory_items(token, pages)

    run(scenario)


def test_an_unchanged_answer_is_not_even_decoded() -> None:
    # What the caller already acted on was validated when it was first read; the same
    # bytes need no second look (here they would not even parse).
    async def scenario(fake: FakePayNow, client: StorefrontClient) -> None:
        token = customer_with(fake, 3)
        fake.fault(token, "malformed", path="items", times=2)
        pages = await client.read_inventory(token, lambda pages: True)
        assert pages.unchanged
        with pytest.raises(PayNowBadResponse, match="malformed JSON"):
            await client.read_inventory(token, lambda pages: False)

    run(scenario)
