"""One HTTP attempt against PayNow: the body of a 2xx answer, or a typed error.

`Transport.get` makes exactly one GET (no retry, no redirect followed) and
raises a `PayNowError` whose class says whether another attempt could help
(`retryable`): timeouts, connection errors, 408, 429 and 5xx can; 401/403,
404, other 4xx, redirects, a body over the size cap and a truncated body
cannot. A 429 or 503 carries its `Retry-After` in `retry_after`.

A body is read as it arrives and refused once it passes the cap after
decompression, so neither a gzip bomb nor an endless stream can exhaust
memory; an error body's size only costs that error its detail. Messages name
what was asked for, never the credential.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import aiohttp
from yarl import URL

from daemon.paynow.errors import (
    PayNowAuthError,
    PayNowBadResponse,
    PayNowError,
    PayNowHTTPError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowTimeout,
    PayNowUnavailable,
    exc_text,
    one_line,
    scrub_error,
)

log = logging.getLogger(__name__)

RETRYABLE_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})  # and every other 5xx
# A full inventory page (100 items of 1-2 KB) is about 200 KB: 4 MiB is far
# above any real answer, and bounds what a broken or hostile one (a gzip body
# that inflates to gigabytes, an endless stream) can make us hold. (Decoding
# the worst 4 MiB of JSON, a million empty objects, takes about 120 MB.)
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# What a credential may be made of: visible ASCII (no space, control or
# non-ASCII character could be sent in a header safely).
_SENDABLE: Final = re.compile(r"[!-~]+")


@dataclass(frozen=True, slots=True)
class Credential:
    """What a request authenticates with: `Authorization: <scheme> <secret>`."""

    scheme: str  # "Customer" (Storefront) or "APIKey" (Management)
    secret: str = field(repr=False)
    name: str  # what messages call it
    placeholder: str  # what replaces it in a message that echoes it

    @classmethod
    def customer(cls, token: str) -> Credential:
        return cls("Customer", token, "customer token", "<token>")

    @classmethod
    def api_key(cls, key: str) -> Credential:
        return cls("APIKey", key, "API key", "<api key>")

    # `with credential:` - a PayNowError leaving the block is scrubbed of the secret.
    def __enter__(self) -> Credential:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, PayNowError):
            scrub_error(exc, self.secret, self.placeholder)

    def scrubbed(self, error: PayNowError) -> PayNowError:
        """`error`, its message made safe in place (see `errors.scrub`)."""
        scrub_error(error, self.secret, self.placeholder)
        return error

    def header(self, what: str) -> str:
        """The Authorization header's value; PayNowAuthError if it cannot be sent."""
        secret = self.secret
        if _SENDABLE.fullmatch(secret) is None:
            raise PayNowAuthError(
                f"PayNow {what}: the {self.name} is empty or has whitespace, "
                "control or non-ASCII characters"
            )
        return f"{self.scheme} {secret}"


class Transport:
    """Makes single GET attempts through one session (see the module's docstring)."""

    def __init__(self, session: aiohttp.ClientSession, *, max_body_bytes: int = MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.session = session
        self.max_body_bytes = max_body_bytes

    async def get(self, url: URL, credential: Credential, what: str, time_limit: float) -> bytes:
        """GET `url` once, within `time_limit` seconds (connection, headers and
        body); the body of a 2xx answer. `what` names the request in messages."""
        headers = {"Authorization": credential.header(what)}
        error: PayNowError
        try:
            async with self.session.get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=time_limit),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    body = await _read_capped(resp, self.max_body_bytes)
                else:
                    body = await _read_error_body(resp, self.max_body_bytes)
                retry_after = resp.headers.get("Retry-After") if status in (429, 503) else None
        except TimeoutError:
            error = PayNowTimeout(f"PayNow {what}: timed out after {time_limit:g}s")
        except aiohttp.ClientPayloadError as exc:
            detail = f"response body truncated ({exc_text(exc)})"
            error = PayNowBadResponse(f"PayNow {what}: {detail}")
        except aiohttp.ClientError as exc:
            error = PayNowUnavailable(f"PayNow {what}: {exc_text(exc)}")
        else:
            if log.isEnabledFor(logging.DEBUG):
                size = -1 if body is None else len(body)
                log.debug("PayNow GET %s -> %d, %d bytes", url.path_qs, status, size)
            if body is None:
                error = PayNowBadResponse(
                    f"PayNow {what}: body larger than {self.max_body_bytes:,} bytes "
                    "(decompressed); not read further"
                )
            elif 200 <= status < 300:
                return body
            else:
                error = status_error(what, status, body, parse_retry_after(retry_after))
        # Raised outside the handlers: no aiohttp exception becomes its context.
        raise credential.scrubbed(error)


def status_error(
    what: str, status: int, body: bytes, retry_after: float | None = None
) -> PayNowError:
    """The error for a non-2xx answer: its class by the status, its message
    by what PayNow said (`{code, message, trace_id}`) in `body`, if anything."""
    code, message, trace_id = error_fields(body)
    detail = f"HTTP {status}"
    if code:
        detail += f" {code}"
    if message:
        detail += f": {message}"
    if trace_id:
        detail += f" (trace_id {trace_id})"
    cls: type[PayNowError]
    if status == 429:
        cls = PayNowRateLimited
    elif status in RETRYABLE_STATUS or status >= 500:
        cls = PayNowUnavailable
    elif status in (401, 403):
        cls = PayNowAuthError
    elif status == 404:
        cls = PayNowNotFound
    elif 300 <= status < 400:
        cls = PayNowBadResponse
        detail += " (unexpected redirect)"
    else:
        cls = PayNowHTTPError
    return cls(
        f"PayNow {what}: {detail}",
        status=status,
        code=code,
        trace_id=trace_id,
        retry_after=retry_after if cls.retryable else None,
    )


def error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
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
        fields.append(one_line(value) if isinstance(value, str) and value.strip() else None)
    return fields[0], fields[1], fields[2]


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


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body (decompressed), read as it arrives; None as soon as it passes
    `limit` bytes, without reading the rest (the connection is then closed)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            resp.close()  # the rest is never read: the connection cannot be reused
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
