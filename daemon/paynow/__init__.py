"""Client of the PayNow Storefront API (the two endpoints perksync reads).

- `GET /v1/store/customer` → `Customer`
- `GET /v1/store/customer/delivery/items` → every `InventoryItem`, following the
  cursor pagination (`limit=100&asc=true&after=<last id>`) to the end.

Contract:

- Either the whole answer or a `PayNowError`; never a partial inventory.
- Timeouts, connection errors, 408, 429 and 5xx are retried (exponential backoff
  with jitter, `Retry-After` honoured) within `max_attempts` and
  `retry_budget_seconds` per request; a failed page retries that page only.
  401/403, 404, other 4xx and malformed answers are not retried.
- Every HTTP attempt (retries included) passes through one `RateLimiter`.
- A body is read as it arrives and refused (a malformed answer) once it passes
  `MAX_BODY_BYTES` after decompression; JSON nested deeper than `MAX_JSON_DEPTH`
  is malformed too. Neither can exhaust memory or the stack, and an error
  body's size or depth only costs that error its detail.
- Error messages are one line of printable text (what PayNow sent is escaped)
  and never contain the customer token; exceptions are raised without a
  chained cause so no traceback can carry request headers.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, NoReturn
from urllib.parse import urlsplit

import aiohttp
import pydantic
from yarl import URL

from daemon import __version__
from daemon.models import Customer, InventoryItem

log = logging.getLogger(__name__)

CUSTOMER_PATH: Final = "/v1/store/customer"
ITEMS_PATH: Final = "/v1/store/customer/delivery/items"
PAGE_LIMIT: Final = 100  # the API's maximum `limit`
MAX_PAGES: Final = 10_000  # 1,000,000 items: beyond that the API is misbehaving
USER_AGENT: Final = f"perksync/{__version__}"

_RETRYABLE_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DETAIL: Final = 200  # characters kept of a PayNow error message
MIN_RETRY_SECONDS: Final = 0.1  # (or the whole timeout, if shorter) see `_get_body`
# A full inventory page (100 items of 1-2 KB) is about 200 KB: 4 MiB is far
# above any real answer, and bounds what a broken or hostile one (a gzip body
# that inflates to gigabytes, an endless stream) can make us hold. (Decoding
# the worst 4 MiB of JSON, a million empty objects, takes about 120 MB.)
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# Real answers nest 3 levels (page, item, product). Deeper JSON is refused
# before anything walks it recursively (validation, storing it, rendering).
MAX_JSON_DEPTH: Final = 32


# --------------------------------------------------------------------------- errors


class PayNowError(Exception):
    """Base of every error of this module. `str(exc)` is one line without secrets.

    `kind` is a short machine string for metrics and status output.
    """

    kind: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        trace_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status, when there was a response
        self.code = code  # PayNow's error `code`, when the body had one
        self.trace_id = trace_id  # PayNow's `trace_id`, when the body had one
        self.attempts = attempts  # HTTP attempts made for the failing request

    def __str__(self) -> str:
        return self.message


class PayNowAuthError(PayNowError):
    """401/403, or a token that cannot be sent at all. Never retried."""

    kind = "auth"


class PayNowNotFound(PayNowError):
    """404. Never retried."""

    kind = "not_found"


class PayNowHTTPError(PayNowError):
    """Any other non-retryable 4xx status (400, 405, 409, 422, ...)."""

    kind = "http_error"


class PayNowUnavailable(PayNowError):
    """Connection errors and 5xx, after the retries were used up."""

    kind = "unavailable"


class PayNowTimeout(PayNowUnavailable):
    """The last attempt timed out."""

    kind = "timeout"


class PayNowRateLimited(PayNowUnavailable):
    """429 after the retries were used up (or `Retry-After` beyond the budget)."""

    kind = "rate_limited"


class PayNowBadResponse(PayNowError):
    """A 2xx answer that is not what the spec says: malformed or truncated JSON,
    wrong shape, a failed validation, bad pagination, or an unexpected redirect."""

    kind = "bad_response"


# ---------------------------------------------------------------------- api_url


def validate_api_url(url: str) -> str:
    """Check `paynow.api_url`; return it without a trailing slash.

    It must be https://, except that http:// is allowed for a loopback host
    (127.0.0.0/8, ::1, localhost), e.g. a local fake or a proxy on the box.
    It is the API's root: no path (a proxy must serve the API at its root).
    Raises ValueError with a one-line reason.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("api_url is empty")
    if url != url.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("api_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"api_url is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ValueError(f"api_url must start with https:// (got {scheme or 'no'} scheme)")
    if not host:
        raise ValueError("api_url has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("api_url must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError("api_url must not contain a query or fragment")
    if parts.path not in ("", "/"):
        # perksync appends /v1/store/...: `https://api.paynow.gg/v1` would ask
        # for /v1/v1/store/customer. One rule, no guessing which prefix is meant.
        raise ValueError(
            f"api_url must be the API's root, without a path (got {parts.path}): "
            f"write {scheme}://{parts.netloc}; perksync adds /v1/store/... itself"
        )
    if scheme == "http" and not _is_loopback(host):
        raise ValueError(
            f"api_url must use https:// unless the host is loopback (got http://{host})"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ rate limiter


class RateLimiter:
    """Process-wide request rate limit (GCRA, i.e. a token bucket).

    `rate` requests per second on average with bursts of up to `burst`
    requests; `rate` of 0 or None means unlimited. `acquire()` returns at once
    while under the limit; otherwise it reserves the next free slot and sleeps
    until then, so waiters are served in arrival order. One event loop only.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is not None and rate < 0:
            raise ValueError("rate must be >= 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = rate or 0.0
        self.burst = burst
        self._interval = 1.0 / self.rate if self.rate else 0.0
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next request

    @property
    def unlimited(self) -> bool:
        return self._interval == 0.0

    def reserve(self) -> float:
        """Take the next slot; return how many seconds to wait for it (0 = now)."""
        if self._interval == 0.0:
            return 0.0
        now = self._clock()
        tat = self._tat if self._tat > now else now
        self._tat = tat + self._interval
        wait = tat - self._tolerance - now
        return wait if wait > 0.0 else 0.0

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0.0:
            await asyncio.sleep(wait)


# ----------------------------------------------------------------------- session


def make_session(
    *,
    limit: int = 100,
    limit_per_host: int = 0,
    ttl_dns_cache: int = 300,
    keepalive_timeout: float = 30.0,
) -> aiohttp.ClientSession:
    """The one aiohttp session of the process. Call it from a coroutine and
    close it (`await session.close()`) on shutdown.

    Keep the number of concurrent PayNow requests at or below `limit`: the
    per-request timeout also counts the wait for a free connection.
    """
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit_per_host,
        ttl_dns_cache=ttl_dns_cache,
        keepalive_timeout=keepalive_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),  # set per request by PayNowClient
        raise_for_status=False,
        trust_env=False,
    )


# ------------------------------------------------------------------------- client


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN/inf
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return _printable(text)


class _Failure:
    """A retryable failure of one attempt."""

    __slots__ = ("cls", "code", "detail", "retry_after", "status", "trace_id")

    def __init__(
        self,
        cls: type[PayNowError],
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        trace_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.cls = cls
        self.detail = detail
        self.status = status
        self.code = code
        self.trace_id = trace_id
        self.retry_after = retry_after


@dataclass(slots=True)
class InventoryPages:
    """An inventory as read by `PayNowClient.read_inventory`: every page's body as
    sent, the items validated so far, and the last page, decoded but not yet
    validated."""

    bodies: list[bytes] = field(default_factory=list)
    items: list[InventoryItem] = field(default_factory=list)
    after: int | None = None  # the id of the last validated item
    last: list[Any] = field(default_factory=list)
    last_what: str = "inventory page 1"
    known_answer: bool = False  # `known` said so: the last body was not decoded


class PayNowClient:
    """Reads customers and inventories from the PayNow Storefront API.

    One instance (and one session) per process; safe to use from many tasks at
    once. `rate_limiter` lets several clients share one limit; without it the
    client makes its own from `requests_per_second` (None or 0 = unlimited).

    `timeout_seconds` bounds one HTTP attempt (connection, headers and body).
    `retry_budget_seconds` bounds one request with all its retries (one page of
    an inventory, not the whole listing): a retry whose wait would leave it
    less than `MIN_RETRY_SECONDS` (or the timeout, if shorter) is not made,
    and a retry's timeout is cut to what is left of it. The first attempt
    always gets the full timeout.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        *,
        timeout_seconds: float = 10.0,
        requests_per_second: float | None = 20.0,
        max_attempts: int = 4,
        retry_budget_seconds: float = 30.0,
        rate_limiter: RateLimiter | None = None,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 8.0,
        page_limit: int = PAGE_LIMIT,
        max_pages: int = MAX_PAGES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if retry_budget_seconds < 0:
            raise ValueError("retry_budget_seconds must be >= 0")
        if not 1 <= page_limit <= PAGE_LIMIT:
            raise ValueError(f"page_limit must be between 1 and {PAGE_LIMIT}")
        if max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self._session = session
        self.api_url = validate_api_url(api_url)
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts
        self.retry_budget_seconds = retry_budget_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.page_limit = page_limit
        self.max_pages = max_pages
        self.max_body_bytes = max_body_bytes
        self.rate_limiter = (
            rate_limiter if rate_limiter is not None else RateLimiter(requests_per_second)
        )
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._customer_url = URL(self.api_url + CUSTOMER_PATH, encoded=True)
        self._items_prefix = f"{self.api_url}{ITEMS_PATH}?limit={page_limit}&asc=true"
        self._items_first_url = URL(self._items_prefix, encoded=True)

    # -------------------------------------------------------------- public API

    async def fetch_customer(self, token: str) -> Customer:
        """GET /v1/store/customer → the token's Customer."""
        return self.parse_customer(token, await self.read_customer(token))

    async def fetch_inventory(self, token: str) -> list[InventoryItem]:
        """Every delivery item of the token's customer, ascending by id.

        All pages or an exception: nothing partial is ever returned.
        """
        return self.inventory_items(token, await self.read_inventory(token))

    # The two steps of each, for a caller that can tell from the bytes alone
    # that an answer is the one it already acted on (and so skip validating it).

    async def read_customer(self, token: str) -> bytes:
        """The body of GET /v1/store/customer as sent (checked by `parse_customer`)."""
        return await self._get_body(self._customer_url, token, "customer")

    def parse_customer(self, token: str, body: bytes) -> Customer:
        data = self._decode(token, "customer", body)
        if not isinstance(data, dict):
            self._bad(token, "customer", f"expected a JSON object, got {_json_type(data)}")
        try:
            return Customer.from_api(data)
        except (pydantic.ValidationError, ValueError, TypeError) as exc:
            self._bad(token, "customer", _validation_summary(exc))

    async def read_inventory(
        self, token: str, known: Callable[[InventoryPages], bool] | None = None
    ) -> InventoryPages:
        """Every page of the inventory, as sent and decoded. The items of every
        page but the last are validated on the way (the next page starts after
        the last id of the one before); `inventory_items` validates the rest.

        `known` is asked after each page is read, before it is decoded: True
        means the bodies so far are an inventory the caller already has (it
        compares digests), so reading stops there, `known_answer` is set and
        the last page is left undecoded."""
        pages = InventoryPages()
        limit = self.page_limit
        url = self._items_first_url
        for page in range(1, self.max_pages + 1):
            what = (
                f"inventory page {page}"
                if pages.after is None
                else f"inventory page {page} (after={pages.after})"
            )
            body = await self._get_body(url, token, what)
            pages.bodies.append(body)
            if known is not None and known(pages):
                pages.known_answer = True
                return pages
            data = self._decode(token, what, body)
            if not isinstance(data, list):
                self._bad(token, what, f"expected a JSON array, got {_json_type(data)}")
            if len(data) < limit:
                pages.last, pages.last_what = data, what
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("PayNow inventory complete: %d pages", page)
                return pages
            self._add_items(token, what, data, pages)
            url = URL(f"{self._items_prefix}&after={pages.after}", encoded=True)
        self._bad(token, "inventory", f"more than {self.max_pages} pages; giving up")

    def inventory_items(self, token: str, pages: InventoryPages) -> list[InventoryItem]:
        """The validated items of every page, in the API's order."""
        if pages.known_answer:
            raise ValueError("the caller already has this inventory: its last page was not read")
        if pages.last:
            self._add_items(token, pages.last_what, pages.last, pages)
            pages.last = []
        return pages.items

    def _add_items(self, token: str, what: str, data: list[Any], pages: InventoryPages) -> None:
        items = pages.items
        after = pages.after
        for index, raw in enumerate(data):
            if not isinstance(raw, dict):
                self._bad(token, what, f"item {index} is {_json_type(raw)}, not an object")
            try:
                item = InventoryItem.from_api(raw)
            except (pydantic.ValidationError, ValueError, TypeError) as exc:
                self._bad(token, what, f"item {index}: {_validation_summary(exc)}")
            item_id = int(item.id)
            if after is not None and item_id <= after:
                problem = "repeated" if any(i.id == item.id for i in items) else "out of order"
                self._bad(
                    token,
                    what,
                    f"item {index} id {item.id} is {problem} (not after {after}): "
                    "the API ignored the cursor",
                )
            after = item_id
            items.append(item)
        pages.after = after

    # ----------------------------------------------------------------- plumbing

    def _bad(self, token: str, what: str, detail: str) -> NoReturn:
        raise PayNowBadResponse(_scrub(f"PayNow {what}: {detail}", token)) from None

    def _decode(self, token: str, what: str, body: bytes) -> Any:
        """The JSON of a 2xx answer's body."""
        try:
            data = json.loads(body)
        except RecursionError:
            data = _TOO_DEEP
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            kind = "truncated" if _looks_truncated(body, exc) else "malformed"
            self._bad(
                token,
                what,
                f"{kind} JSON in a body of {len(body)} bytes ({_one_line(str(exc), 80)})",
            )
        if data is _TOO_DEEP or _nested_deeper(data, MAX_JSON_DEPTH):
            self._bad(
                token,
                what,
                f"JSON nested more than {MAX_JSON_DEPTH} levels deep in a body of "
                f"{len(body)} bytes",
            )
        return data

    async def _get_body(self, url: URL, token: str, what: str) -> bytes:
        """GET `url` with retries; return the body of a 2xx answer."""
        if not token or not token.isascii() or any(c <= " " or c == "\x7f" for c in token):
            raise PayNowAuthError(
                f"PayNow {what}: the customer token is empty or has whitespace, "
                "control or non-ASCII characters"
            )
        headers = {"Authorization": "Customer " + token}
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.retry_budget_seconds
        timeout = self._timeout
        # A retry is only made if it leaves the attempt at least this long:
        # one cut to a few milliseconds could only time out.
        min_attempt = min(MIN_RETRY_SECONDS, self.timeout_seconds)
        attempt = 0
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            attempt += 1
            await self.rate_limiter.acquire()
            t0 = loop.time()
            failure: _Failure
            retry_after: float | None = None
            try:
                async with self._session.get(
                    url, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        read = await _read_capped(resp, self.max_body_bytes)
                        if read is None:
                            self._bad(token, what, self._too_large())
                        body = read
                    else:
                        body = await _read_error_body(resp, self.max_body_bytes)
                        retry_after = (
                            parse_retry_after(resp.headers.get("Retry-After"))
                            if status in (429, 503)
                            else None
                        )
            except TimeoutError:
                failure = _Failure(PayNowTimeout, f"timed out after {timeout.total:g}s")
            except aiohttp.ClientPayloadError as exc:
                self._bad(token, what, f"response body truncated ({_exc_text(exc)})")
            except aiohttp.ClientError as exc:
                failure = _Failure(PayNowUnavailable, _exc_text(exc))
            else:
                if debug:
                    log.debug(
                        "PayNow GET %s -> %d, %d bytes in %.1f ms (attempt %d)",
                        url.path_qs,
                        status,
                        len(body),
                        (loop.time() - t0) * 1000,
                        attempt,
                    )
                if 200 <= status < 300:
                    return body
                failure = self._status_failure(token, what, status, body, attempt, retry_after)

            # A retryable failure: wait and try again, if attempts and budget allow.
            now = loop.time()
            remaining = deadline - now
            reason = ""
            delay = 0.0
            if attempt >= self.max_attempts:
                reason = f"giving up after {attempt} attempts"
            elif failure.retry_after is not None and failure.retry_after > remaining:
                reason = (
                    f"giving up: Retry-After {failure.retry_after:g}s exceeds the remaining retry "
                    f"budget ({max(remaining, 0.0):.1f}s)"
                )
            else:
                delay = self._backoff(attempt, failure.retry_after)
                if delay + min_attempt >= remaining:
                    reason = self._out_of_budget(attempt, now - started)
            if reason:
                self._give_up(token, what, failure, reason, attempt)
            log.warning(
                "%s",
                _scrub(
                    f"PayNow {what}: {failure.detail}; retrying in {delay:.2f}s "
                    f"(attempt {attempt + 1} of {self.max_attempts})",
                    token,
                ),
            )
            await asyncio.sleep(delay)
            left = deadline - loop.time()
            if left < min_attempt:  # the sleep overran: no time left worth an attempt
                reason = self._out_of_budget(attempt, loop.time() - started)
                self._give_up(token, what, failure, reason, attempt)
            timeout = (
                self._timeout
                if left >= self.timeout_seconds
                else aiohttp.ClientTimeout(total=max(left, 0.001))
            )

    def _too_large(self) -> str:
        return f"body larger than {self.max_body_bytes:,} bytes (decompressed); not read further"

    def _out_of_budget(self, attempts: int, elapsed: float) -> str:
        return (
            f"giving up after {attempts} attempts in {elapsed:.1f}s "
            f"(retry budget {self.retry_budget_seconds:g}s)"
        )

    def _give_up(
        self, token: str, what: str, failure: _Failure, reason: str, attempts: int
    ) -> NoReturn:
        raise failure.cls(
            _scrub(f"PayNow {what}: {failure.detail}; {reason}", token),
            status=failure.status,
            code=failure.code,
            trace_id=failure.trace_id,
            attempts=attempts,
        ) from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _status_failure(
        self,
        token: str,
        what: str,
        status: int,
        body: bytes,
        attempt: int,
        retry_after: float | None,
    ) -> _Failure:
        """Raise for a final status; return a `_Failure` for a retryable one."""
        code, message, trace_id = _error_fields(body)
        detail = f"HTTP {status}"
        if code:
            detail += f" {code}"
        if message:
            detail += f": {message}"
        if trace_id:
            detail += f" (trace_id {trace_id})"
        if status in _RETRYABLE_STATUS or status >= 500:
            cls: type[PayNowError] = PayNowRateLimited if status == 429 else PayNowUnavailable
            return _Failure(
                cls, detail, status=status, code=code, trace_id=trace_id, retry_after=retry_after
            )
        if status in (401, 403):
            cls = PayNowAuthError
        elif status == 404:
            cls = PayNowNotFound
        elif 300 <= status < 400:
            cls = PayNowBadResponse
            detail += " (unexpected redirect)"
        elif 200 <= status < 300:  # pragma: no cover - handled by the caller
            cls = PayNowBadResponse
        else:
            cls = PayNowHTTPError
        raise cls(
            _scrub(f"PayNow {what}: {detail}", token),
            status=status,
            code=code,
            trace_id=trace_id,
            attempts=attempt,
        ) from None


# ------------------------------------------------------------------------ helpers


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body (decompressed), read as it arrives; None as soon as it passes
    `limit` bytes, without reading the rest (the connection is then closed)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_error_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of an error answer; b"" if it cannot be read or is larger than
    `limit` (it is only a detail: the status decides)."""
    try:
        return await _read_capped(resp, limit) or b""
    except (aiohttp.ClientError, TimeoutError):
        return b""


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(code, message, trace_id) of a PayNowError body, or Nones."""
    if not body:
        return None, None, None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # only its top-level strings are used
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    fields = []
    for key in ("code", "message", "trace_id"):
        value = data.get(key)
        fields.append(_one_line(value) if isinstance(value, str) and value.strip() else None)
    return fields[0], fields[1], fields[2]


def _scrub(message: str, token: str) -> str:
    """One line of printable text, and the token (should anything echo it) replaced."""
    message = _printable(" ".join(message.split()))
    if token and token in message:
        message = message.replace(token, "<token>")
    return message


def _printable(text: str) -> str:
    """`text` with what PayNow may send but a log line, SQLite or a terminal
    cannot take (control characters, lone surrogates, invisible bidi
    overrides) written as \\uXXXX escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def _exc_text(exc: BaseException) -> str:
    text = _one_line(str(exc), 160)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def _looks_truncated(body: bytes, exc: ValueError) -> bool:
    """Did the JSON text end too early (as opposed to being garbage)? `exc` is
    what decoding it raised."""
    if not isinstance(exc, json.JSONDecodeError) or not body.strip():
        return False
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(body.rstrip())


# What `_decode` holds when the decoder itself ran out of stack.
_TOO_DEEP: Final = object()
_CONTAINERS: Final = (dict, list)


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests more than `limit` arrays and objects deep.
    Level by level, without recursion (it guards what recurses)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level:
            return False
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in _CONTAINERS
        ]
    return bool(level)


def _validation_summary(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if errors:
            first = errors[0]
            loc = ".".join(str(part) for part in first.get("loc", ())) or "(root)"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            return f"failed validation: {loc}: {_one_line(str(first.get('msg', '')), 120)}{more}"
    return f"failed validation: {_exc_text(exc)}"
