"""Clients of the PayNow APIs perksync reads.

- `StorefrontClient` (token mode): one customer's Customer and inventory,
  with that customer's token.
- `ManagementClient` (store mode): every item of the store, or of one of its
  customers, with the store's API key.

Layers, each in its module: `transport` makes one HTTP attempt and raises a
typed error saying whether another could help (`errors`); `policy` holds
the process-wide `RateLimiter` and the `RetryPolicy` that drives attempts;
`parse` turns bodies into JSON and models and checks cursor pagination;
`session` makes the process's HTTP session and checks `paynow.api_url`.

Either a whole answer or a `PayNowError`, never a partial one. Every error
message is one line of printable text without a token or API key.
"""

from daemon.paynow.client import MAX_PAGES, PAGE_LIMIT, ApiClient, ClientOptions
from daemon.paynow.errors import (
    PayNowAuthError,
    PayNowBadResponse,
    PayNowError,
    PayNowHTTPError,
    PayNowNotFound,
    PayNowRateLimited,
    PayNowTimeout,
    PayNowUnavailable,
)
from daemon.paynow.management import ManagementClient
from daemon.paynow.parse import MAX_JSON_DEPTH, StoreItem, store_item
from daemon.paynow.policy import MIN_RETRY_SECONDS, RateLimiter, RetryPolicy
from daemon.paynow.session import USER_AGENT, make_session, validate_api_url
from daemon.paynow.storefront import InventoryPages, StorefrontClient
from daemon.paynow.transport import MAX_BODY_BYTES, parse_retry_after

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_PAGES",
    "MIN_RETRY_SECONDS",
    "PAGE_LIMIT",
    "USER_AGENT",
    "ApiClient",
    "ClientOptions",
    "InventoryPages",
    "ManagementClient",
    "PayNowAuthError",
    "PayNowBadResponse",
    "PayNowError",
    "PayNowHTTPError",
    "PayNowNotFound",
    "PayNowRateLimited",
    "PayNowTimeout",
    "PayNowUnavailable",
    "RateLimiter",
    "RetryPolicy",
    "StoreItem",
    "StorefrontClient",
    "make_session",
    "parse_retry_after",
    "store_item",
    "validate_api_url",
]
