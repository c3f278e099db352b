"""Store mode: the Management API as the store's API key sees it.

- `GET /v1/stores/{storeId}/delivery/items`: every item of the store, each
  with its `customer` embedded;
- `GET /v1/stores/{storeId}/customers/{customerId}/delivery/items`: one
  customer's items.

Both are read ascending by id (`asc=true&limit=100&after=<last id>`) to the
first short page, optionally `activeOnly=true`. A page is handed over as
the decoded list of raw item objects, checked for depth and for following
the cursor but not validated (`parse.store_item` does that for the items
the caller needs): a snapshot of thousands of live items need not validate
the ones it already holds. Any failure raises, and the caller treats the
whole read as incomplete. Header `Authorization: APIKey <key>`; no message
ever contains the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from yarl import URL

from daemon.paynow import parse
from daemon.paynow.client import ApiClient, ClientOptions
from daemon.paynow.transport import Credential

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing-only: typing.Unpack is 3.12+

STORE_ITEMS_PATH: Final = "/v1/stores/{store_id}/delivery/items"
CUSTOMER_ITEMS_PATH: Final = "/v1/stores/{store_id}/customers/{customer_id}/delivery/items"

Page = list[dict[str, Any]]


class ManagementClient(ApiClient):
    """Reads a store's delivery items with its API key (see `ApiClient` for
    the keyword arguments; give both clients the process's one `rate_limiter`)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        store_id: str,
        api_key: str,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(session, api_url, **options)
        self.store_id = flake_text(store_id, "store_id")
        self._credential = Credential.api_key(api_key)
        self._store_items = self.api_url + STORE_ITEMS_PATH.format(store_id=self.store_id)

    async def newest_item_id(self) -> str | None:
        """The id of the store's newest item (any state), or None if it has none."""
        what = "newest store item"
        url = URL(f"{self._store_items}?limit=1&asc=false", encoded=True)
        credential = self._credential
        with credential:
            data = parse.decode_list(await self._get(url, credential, what), what)
            return str(parse.raw_id(data[0], what, 0)) if data else None

    def store_item_pages(
        self, after: str | int | None = None, *, active_only: bool = False
    ) -> AsyncIterator[Page]:
        """Every page of the store's items with an id above `after` (None:
        from the first), ascending; only the live ones if `active_only`."""
        cursor = None if after is None else int(flake_text(after, "after"))
        return self._pages(self._store_items, "store items", cursor, active_only)

    def customer_item_pages(
        self, customer_id: str, *, active_only: bool = False
    ) -> AsyncIterator[Page]:
        """Every page of one customer's items, ascending (see `store_item_pages`)."""
        customer_id = flake_text(customer_id, "customer id")
        path = CUSTOMER_ITEMS_PATH.format(store_id=self.store_id, customer_id=customer_id)
        return self._pages(
            self.api_url + path, f"items of customer {customer_id}", None, active_only
        )

    async def _pages(
        self, base: str, name: str, cursor: int | None, active_only: bool
    ) -> AsyncIterator[Page]:
        if active_only:
            name = "active " + name
        prefix = f"{base}?limit={self.page_limit}&asc=true"
        if active_only:
            prefix += "&activeOnly=true"
        credential = self._credential
        previous: Page = []
        for page in range(1, self.max_pages + 1):
            what = f"{name} page {page}"
            if cursor is None:
                url = URL(prefix, encoded=True)
            else:
                what += f" (after={cursor})"
                url = URL(f"{prefix}&after={cursor}", encoded=True)
            with credential:
                data = parse.decode_list(await self._get(url, credential, what), what)
                last = parse.check_page(data, what, cursor, previous)
            if data:
                yield data
            if len(data) < self.page_limit:
                return
            cursor, previous = last, data
        parse.bad(name, f"more than {self.max_pages} pages; giving up")


def flake_text(value: str | int, name: str) -> str:
    """`value` as a flake id's decimal text (it goes into a URL); ValueError
    naming `name` if it is not 1-20 ASCII digits."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64:
        return str(value)
    if (
        isinstance(value, str)
        and 0 < len(value) <= 20
        and value.isascii()
        and value.isdigit()
        and int(value) < 2**64
    ):
        return value
    raise ValueError(f"{name} must be a PayNow id (1-20 digits)")
