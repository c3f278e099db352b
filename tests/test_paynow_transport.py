"""One HTTP attempt (Transport.get) against the fake PayNow API over loopback:
the body of a 2xx answer, or an error whose class says whether to retry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from yarl import URL

from daemon.paynow import (
    PayNowAuthError,
    PayNowBadResponse,
    PayNowError,
    PayNowHTTPError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowTimeout,
    PayNowUnavailable,
    make_session,
    parse_retry_after,
    validate_api_url,
)
from daemon.paynow.transport import Credential, Transport, error_fields, status_error
from tests.fakes.paynow_api import FakePayNow

T = TypeVar("T")
Scenario = Callable[[FakePayNow, Transport, str], Awaitable[T]]


def run(scenario: Scenario[T], max_body_bytes: int = 100_000) -> T:
    """Run `scenario(fake, transport, token)` with a fresh fake holding one customer."""

    async def main() -> T:
        async with FakePayNow() as fake, make_session() as session:
            token = fake.new_token()
            fake.add_customer(token, items=3)
            return await scenario(fake, Transport(session, max_body_bytes=max_body_bytes), token)

    return asyncio.run(main())


def customer_url(fake: FakePayNow) -> URL:
    return URL(fake.url + "/v1/store/customer", encoded=True)


def get_error(scenario: Scenario[Any], **kwargs: Any) -> tuple[PayNowError, FakePayNow]:
    """Run `scenario`, which must raise a PayNowError; return it and the fake."""
    seen: dict[str, Any] = {}

    async def wrapped(fake: FakePayNow, transport: Transport, token: str) -> None:
        seen["fake"] = fake
        await scenario(fake, transport, token)

    with pytest.raises(PayNowError) as info:
        run(wrapped, **kwargs)
    error = info.value
    assert "\n" not in str(error)
    assert error.attempts == 1
    assert error.__cause__ is None and error.__context__ is None
    return error, seen["fake"]


def test_a_2xx_body_is_returned_as_sent() -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        body = await transport.get(customer_url(fake), Credential.customer(token), "customer", 2.0)
        assert json.loads(body) == fake.customer(token)
        (record,) = fake.requests("customer")
        assert record.token == token  # sent as `Authorization: Customer <token>`

    run(scenario)


STATUSES = [
    (401, PayNowAuthError, False),
    (403, PayNowAuthError, False),
    (404, PayNowNotFound, False),
    (400, PayNowHTTPError, False),
    (409, PayNowHTTPError, False),
    (422, PayNowHTTPError, False),
    (301, PayNowBadResponse, False),
    (302, PayNowBadResponse, False),
    (408, PayNowUnavailable, True),
    (429, PayNowRateLimited, True),
    (500, PayNowUnavailable, True),
    (502, PayNowUnavailable, True),
    (503, PayNowUnavailable, True),
    (504, PayNowUnavailable, True),
    (507, PayNowUnavailable, True),
]


@pytest.mark.parametrize(("status", "exc_type", "retryable"), STATUSES)
def test_each_status_is_one_attempt_and_says_whether_to_retry(
    status: int, exc_type: type[PayNowError], retryable: bool
) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(token, "status_empty", status=status)
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 2.0)

    error, fake = get_error(scenario)
    assert type(error) is exc_type and error.retryable is retryable
    assert error.status == status
    assert str(error).startswith(f"PayNow customer: HTTP {status}")
    assert ("redirect" in str(error)) is (300 <= status < 400)
    assert fake.count() == 1


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, 2.5), (503, 0.0), (500, None), (401, None), (404, None)]
)
def test_retry_after_is_carried_by_429_and_503_only(status: int, retry_after: float | None) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(
            token, "status", status=status, retry_after=2.5 if retry_after is None else retry_after
        )
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 2.0)

    error, _ = get_error(scenario)
    assert error.retry_after == retry_after


def test_what_paynow_said_is_in_the_message() -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(token, "status", status=404, message="customer\nnot found")
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 2.0)

    error, _ = get_error(scenario)
    assert error.code == "not-found" and error.trace_id
    assert (
        str(error)
        == f"PayNow customer: HTTP 404 not-found: customer not found (trace_id {error.trace_id})"
    )


def test_a_timeout_is_retryable() -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(token, "stall", delay=5)
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 0.2)

    error, _ = get_error(scenario)
    assert type(error) is PayNowTimeout and error.retryable
    assert str(error) == "PayNow customer: timed out after 0.2s"


@pytest.mark.parametrize("kind", ["reset", "refused"])
def test_a_connection_error_is_retryable(kind: str) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        url = customer_url(fake)
        if kind == "refused":
            await fake.stop()
        else:
            fake.fault(token, "reset", times=2)  # aiohttp itself retries a GET once on a reset
        await transport.get(url, Credential.customer(token), "customer", 2.0)

    error, _ = get_error(scenario)
    assert type(error) is PayNowUnavailable and error.retryable
    assert error.status is None


@pytest.mark.parametrize(
    ("kind", "options", "words"),
    [
        ("disconnect", {}, "response body truncated"),
        ("endless", {}, "body larger than 100,000 bytes (decompressed); not read further"),
        ("gzip_body", {"body": b"[" + b" " * 100_000 + b"]"}, "body larger than 100,000 bytes"),
    ],
)
def test_a_broken_or_oversized_2xx_body_is_final(
    kind: str, options: dict[str, Any], words: str
) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(token, kind, **options)
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 5.0)

    error, _ = get_error(scenario)
    assert type(error) is PayNowBadResponse and not error.retryable
    assert words in str(error)


def test_an_oversized_error_body_only_loses_its_detail() -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(token, "endless", status=503, body=b'{"message": "')
        await transport.get(customer_url(fake), Credential.customer(token), "customer", 5.0)

    error, _ = get_error(scenario)
    assert type(error) is PayNowUnavailable and str(error) == "PayNow customer: HTTP 503"


@pytest.mark.parametrize(
    ("credential", "words"),
    [
        (Credential.customer("abc\r\nX-Evil: 1"), "the customer token is empty or has whitespace"),
        (Credential.customer(""), "the customer token is empty"),
        (Credential.customer("abc\x7fdef"), "the customer token is empty or has whitespace"),
        (Credential.customer("abc def"), "the customer token is empty or has whitespace"),
        (Credential.api_key("kéy"), "the API key is empty or has whitespace, control or non-ASCII"),
    ],
)
def test_a_credential_that_cannot_be_sent_makes_no_request(
    credential: Credential, words: str
) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        await transport.get(customer_url(fake), credential, "customer", 2.0)

    error, fake = get_error(scenario)
    assert type(error) is PayNowAuthError and not error.retryable
    assert words in str(error) and "abc" not in str(error) and "k\u00e9y" not in str(error)
    assert fake.count() == 0


@pytest.mark.parametrize(
    ("make", "placeholder"), [(Credential.customer, "<token>"), (Credential.api_key, "<api key>")]
)
def test_an_echoed_secret_is_replaced(make: Callable[[str], Credential], placeholder: str) -> None:
    async def scenario(fake: FakePayNow, transport: Transport, token: str) -> None:
        fake.fault(None, "status", status=401, message=f"{token} is not a valid {token[:4]}")
        await transport.get(customer_url(fake), make(token), "customer", 2.0)

    error, _ = get_error(scenario)
    assert f"HTTP 401 unauthorized: {placeholder} is not a valid" in str(error)
    assert placeholder in repr(error)


def test_a_credentials_repr_hides_its_secret() -> None:
    assert "pnapi_SECRET" not in repr(Credential.api_key("pnapi_SECRET"))
    assert "pnc_SECRET" not in repr(Credential.customer("pnc_SECRET"))


# ------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (418, PayNowHTTPError),
        (599, PayNowUnavailable),
        (308, PayNowBadResponse),
        (429, PayNowRateLimited),
    ],
)
def test_status_error_class(status: int, exc_type: type[PayNowError]) -> None:
    error = status_error("inventory page 2", status, b"", retry_after=3.0)
    assert type(error) is exc_type
    assert error.retry_after == (3.0 if exc_type.retryable else None)
    assert str(error).startswith(f"PayNow inventory page 2: HTTP {status}")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'"text"',
        b"<html>",
        b"[" * 100_000,
        b'{"code": 5, "message": ["x"], "trace_id": " "}',
    ],
)
def test_error_fields_of_bodies_without_them(body: bytes) -> None:
    assert error_fields(body) == (None, None, None)


def test_error_fields_are_one_escaped_line() -> None:
    body = json.dumps({"code": "bad\ud800", "message": "a\n b \x1b[31m", "trace_id": "t" * 300})
    code, message, trace_id = error_fields(body.encode())
    assert code == "bad\\ud800" and message == "a b \\u001b[31m"
    assert trace_id is not None and len(trace_id) == 200 and trace_id.endswith("…")


def test_parse_retry_after() -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(" 0.5 ", now=now) == 0.5
    assert parse_retry_after("-4", now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
    later = now + timedelta(seconds=90)
    assert parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), now=now) == 90.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now=now) is None


# ---------------------------------------------------------------------- api_url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1",
        "http://127.0.0.1:8080/",
        "http://127.1.2.3:9",
        "http://localhost",
        "http://LOCALHOST:8080",
        "http://[::1]",
        "http://[::1]:8080",
        "https://api.paynow.gg",
        "https://api.paynow.gg/",
        "HTTPS://proxy.example.com",
    ],
)
def test_api_url_accepted(url: str) -> None:
    assert validate_api_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://example.com", "https"),
        ("http://api.paynow.gg", "https"),
        ("http://10.0.0.1", "https"),
        ("http://localhost.example.com", "https"),
        ("ftp://api.paynow.gg", "https"),
        ("api.paynow.gg", "https"),
        ("https://", "no host"),
        ("", "empty"),
        ("https://user:pw@api.paynow.gg", "credentials"),
        ("https://api.paynow.gg/?x=1", "query"),
        ("https://api.paynow.gg:99999", "valid URL"),
        ("https://api.paynow.gg\n", "whitespace"),
        ("https://api.paynow.gg/v1", "without a path \\(got /v1\\): write https://api.paynow.gg;"),
        ("https://api.paynow.gg/v1/store/customer", "without a path"),
        ("https://proxy.example.com/paynow/", "without a path"),
    ],
)
def test_api_url_rejected(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        validate_api_url(url)
    assert "\n" not in str(info.value)
