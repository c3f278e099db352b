"""Token mode: the Storefront API as one customer's token sees it.

- `GET /v1/store/customer` → `Customer`
- `GET /v1/store/customer/delivery/items` → every `InventoryItem`, following
  the cursor pagination (`limit=100&asc=true&after=<last id>`) to the end.

Either the whole answer or a `PayNowError`, never a partial inventory; a
failed page retries that page only. Header `Authorization: Customer <token>`;
no message ever contains the token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from yarl import URL

from daemon.models import Customer, InventoryItem
from daemon.paynow import parse
from daemon.paynow.client import ApiClient
from daemon.paynow.transport import Credential

log = logging.getLogger(__name__)

CUSTOMER_PATH: Final = "/v1/store/customer"
ITEMS_PATH: Final = "/v1/store/customer/delivery/items"


@dataclass(slots=True)
class InventoryPages:
    """An inventory as read by `StorefrontClient.read_inventory`: every page's
    body as sent, the items validated so far, and the last page, decoded but
    not yet validated."""

    bodies: list[bytes] = field(default_factory=list)
    items: list[InventoryItem] = field(default_factory=list)
    after: int | None = None  # the id of the last validated item
    last: list[Any] = field(default_factory=list)
    last_what: str = "inventory page 1"
    unchanged: bool = False  # the caller's `unchanged` said so: the last body was not decoded


class StorefrontClient(ApiClient):
    """Reads customers and inventories with customer tokens (see `ApiClient`
    for the keyword arguments)."""

    @functools.cached_property
    def _customer_url(self) -> URL:
        return URL(self.api_url + CUSTOMER_PATH, encoded=True)

    @functools.cached_property
    def _items_prefix(self) -> str:
        return f"{self.api_url}{ITEMS_PATH}?limit={self.page_limit}&asc=true"

    @functools.cached_property
    def _items_first_url(self) -> URL:
        return URL(self._items_prefix, encoded=True)

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
        return await self._get(self._customer_url, Credential.customer(token), "customer")

    def parse_customer(self, token: str, body: bytes) -> Customer:
        with Credential.customer(token):
            return parse.customer(body, "customer")

    async def read_inventory(
        self, token: str, unchanged: Callable[[InventoryPages], bool] | None = None
    ) -> InventoryPages:
        """Every page of the inventory, as sent and decoded. The items of every
        page but the last are validated on the way (the next page starts after
        the last id of the one before); `inventory_items` validates the rest.

        `unchanged` is asked after each page is read, before it is decoded:
        True means the bodies so far are the ones the caller already acted on
        (it compares digests), so reading stops there, `pages.unchanged` is
        set and the last page is left undecoded."""
        credential = Credential.customer(token)
        pages = InventoryPages()
        limit = self.page_limit
        url = self._items_first_url
        with credential:
            for page in range(1, self.max_pages + 1):
                what = (
                    f"inventory page {page}"
                    if pages.after is None
                    else f"inventory page {page} (after={pages.after})"
                )
                body = await self._get(url, credential, what)
                pages.bodies.append(body)
                if unchanged is not None and unchanged(pages):
                    pages.unchanged = True
                    return pages
                data = parse.decode_list(body, what)
                if len(data) < limit:
                    pages.last, pages.last_what = data, what
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("PayNow inventory complete: %d pages", page)
                    return pages
                pages.after = parse.add_items(data, what, pages.after, pages.items)
                url = URL(f"{self._items_prefix}&after={pages.after}", encoded=True)
            parse.bad("inventory", f"more than {self.max_pages} pages; giving up")

    def inventory_items(self, token: str, pages: InventoryPages) -> list[InventoryItem]:
        """The validated items of every page, in the API's order."""
        if pages.unchanged:
            raise ValueError("the caller already has this inventory: its last page was not read")
        if pages.last:
            with Credential.customer(token):
                pages.after = parse.add_items(pages.last, pages.last_what, pages.after, pages.items)
            pages.last = []
        return pages.items
