"""What both PayNow clients share: the API's root, one attempt at a time
(`Transport`) under the `RetryPolicy` and the process's `RateLimiter`, and
the limits of cursor paging."""

from __future__ import annotations

from typing import Final, TypedDict

import aiohttp
from yarl import URL

from daemon.paynow.policy import RateLimiter, RetryPolicy
from daemon.paynow.session import validate_api_url
from daemon.paynow.transport import MAX_BODY_BYTES, Credential, Transport

PAGE_LIMIT: Final = 100  # the API's maximum `limit`
MAX_PAGES: Final = 10_000  # 1,000,000 items: beyond that the API is misbehaving


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of `ApiClient` (for a subclass's `**options`)."""

    timeout_seconds: float
    requests_per_second: float | None
    max_attempts: int
    retry_budget_seconds: float
    rate_limiter: RateLimiter | None
    backoff_base_seconds: float
    backoff_max_seconds: float
    page_limit: int
    max_pages: int
    max_body_bytes: int


class ApiClient:
    """One instance (and one session) per process; safe to use from many
    tasks at once. `rate_limiter` lets several clients share one limit;
    without it the client makes its own from `requests_per_second` (None or
    0 = unlimited). Every attempt, retries included, passes through it.

    `timeout_seconds` bounds one HTTP attempt (connection, headers and body);
    `max_attempts`, `retry_budget_seconds` and the backoff bound the retries
    of one request (one page of a listing, not the whole listing): see
    `RetryPolicy`.
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
        if not 1 <= page_limit <= PAGE_LIMIT:
            raise ValueError(f"page_limit must be between 1 and {PAGE_LIMIT}")
        if max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        self.policy = RetryPolicy(
            max_attempts=max_attempts,
            retry_budget_seconds=retry_budget_seconds,
            timeout_seconds=timeout_seconds,
            backoff_base_seconds=backoff_base_seconds,
            backoff_max_seconds=backoff_max_seconds,
        )
        self.transport = Transport(session, max_body_bytes=max_body_bytes)
        self.api_url = validate_api_url(api_url)
        self.rate_limiter = (
            rate_limiter if rate_limiter is not None else RateLimiter(requests_per_second)
        )
        self.page_limit = page_limit
        self.max_pages = max_pages

    async def _get(self, url: URL, credential: Credential, what: str) -> bytes:
        """GET `url` under the retry policy; the body of a 2xx answer."""
        transport = self.transport
        return await self.policy.run(
            lambda timeout: transport.get(url, credential, what, timeout), self.rate_limiter
        )
