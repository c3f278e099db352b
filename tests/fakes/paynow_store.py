"""A fake PayNow Management API (store mode) and webhook sender, for tests and benchmarks.

It serves the two listings perksync reads with a store's API key, shaped as
PayNow's `management-api.yaml` (`DeliveryItemDto` with its `CustomerDto`
embedded, `PayNowError`):

- `GET /v1/stores/{storeId}/delivery/items`: every item of the store.
- `GET /v1/stores/{storeId}/customers/{customerId}/delivery/items`: one customer's.

Both take `limit` (1-100, default 100), `after`, `before` (ids compared as
integers), `asc` (default false: descending) and `activeOnly`. As in the
Storefront fake, the filters apply first, then the order, then the limit.
`activeOnly=true` lists the items whose state is in `active_only_states`
(default `active` and `renewed`; whether PayNow counts `usable` is open, so a
test may add it). A gift's `customer` is its recipient; `order_customer_id`
and `order_customer` name the buyer.

Auth: `Authorization: APIKey <key>` (prefix case-insensitive); a missing or
wrong key gives 401, another store's id 403 (the key is valid, the store is
not its own), an unknown customer 404, bad query parameters 400 with
`errors`; every error body is a `PayNowError`. Faults are taken only by
requests that would otherwise succeed.

Usage::

    async with FakeStore() as fake:               # or: await fake.start() / fake.stop()
        steve = fake.add_customer("minecraft", name="Steve", metadata={"discord": "steve#1"})
        vip = fake.add_item(steve["id"], product="vip", expirable=True)
        late = fake.add_item(steve["id"], visible=False)   # listed only after reveal()
        fake.revoke(vip["id"], "chargeback")
        fake.reveal(late["id"])
        fake.hide_from_snapshot(vip["id"])                 # left out of activeOnly listings
        fake.fault("rate_limit", path="store_items", retry_after=2)
        ... client with fake.url, fake.store_id and f"APIKey {fake.api_key}" ...
        assert fake.count("customer_items", customer=steve["id"]) <= 1
        result = await fake.send_webhook(url, "ON_DELIVERY_ITEM_REVOKED", vip["id"], secret)
        assert result.status == 200

Data helpers are synchronous and keep each object as stored (every field,
None when unset); `served_item` / `served_customer` give what the API sends.
Unset fields are sent per `nulls`: "spec" (default) null where the schema
allows null and absent where it does not, "always" null, "never" absent.

Faults are the Storefront fake's (`FAULT_KINDS` in `paynow_api`): queued with
`fault()`, consumed first-match, first-queued, optionally limited to a `path`
("store_items" or "customer_items"), a `customer`, a `page` (its position in
the listing, as there) and the n-th `request` (to that path, for the same
customer; store-wide requests count as one customer).

Webhooks: `send_webhook` POSTs `{"event_type", "event_id", "body"}` built from
the item as it is now, signed as PayNow signs: `PayNow-Timestamp` (Unix
milliseconds) and `PayNow-Signature` = HMAC-SHA256 keyed by the secret over
`<timestamp>.<raw body>`, hex or base64. `tamper` (see `TAMPERS`) forges one;
`replay_webhook` sends an earlier one again. A lost webhook is one not sent.

Standalone: `python -m tests.fakes.paynow_store --port 8081 --customers 3 --items 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import aiohttp
from aiohttp import web

from tests.fakes.paynow_api import (
    FLAKE_EPOCH,
    MAX_LIMIT,
    FakePayNow,
    Fault,
    FlakeGenerator,
    RequestRecord,
    _Account,
    _apply_state,
    _dumps,
    _Reject,
    iso,
)

STORE_ITEMS_PATH: Final = "/v1/stores/{store_id}/delivery/items"
CUSTOMER_ITEMS_PATH: Final = "/v1/stores/{store_id}/customers/{customer_id}/delivery/items"
PATH_KINDS: Final = ("store_items", "customer_items")
NULLS_MODES: Final = ("spec", "always", "never")
PLATFORMS: Final = ("minecraft", "steam", "both", "offline", "none")

DELIVERY_EVENTS: Final = (
    "ON_DELIVERY_ITEM_ADDED",
    "ON_DELIVERY_ITEM_ACTIVATED",
    "ON_DELIVERY_ITEM_USED",
    "ON_DELIVERY_ITEM_REVOKED",
    "ON_DELIVERY_ITEM_EXPIRED",
    "ON_DELIVERY_ITEM_RENEWED",
)
TAMPERS: Final = frozenset(
    {
        "wrong_secret",  # signed with another secret
        "body_changed",  # body.id replaced by another id after signing
        "body_whitespace",  # a space appended after signing: same JSON, other bytes
        "stale",  # signed and sent with a timestamp 6 minutes old
        "future",  # ... 6 minutes ahead
        "timestamp_changed",  # signed with one timestamp, sent with another (1 s later)
        "timestamp_seconds",  # Unix seconds where milliseconds belong (signed so)
        "no_signature",  # PayNow-Signature header left out
        "no_timestamp",  # PayNow-Timestamp header left out
        "empty_signature",  # PayNow-Signature present but empty
        "garbage_signature",  # PayNow-Signature neither hex nor base64 of anything
    }
)

# Optional fields whose schema does not admit null: with nulls="spec" an unset
# one is left out (the spec tests check this list against the schemas).
_ITEM_NOT_NULLABLE: Final = frozenset(
    {
        "order_customer_id", "order_customer", "checkout_id", "checkout_line_id", "order_id",
        "order_line_id", "subscription_id", "trial_id", "execute_on_gameserver_id", "added_by",
        "revoked_by",
    }
)  # fmt: skip
_CUSTOMER_NOT_NULLABLE: Final = frozenset(
    {"profile", "steam_id", "steam", "minecraft", "minecraft_platform"}
)
# DeliveryItemDto fields the Storefront's item does not have.
_STORE_ONLY_ITEM_FIELDS: Final = frozenset(
    {
        "order_customer_id", "checkout_id", "checkout_line_id", "trial_id", "added_by",
        "revoked_by", "command_attempts", "skip_commands", "custom_variables",
    }
)  # fmt: skip
_STALE: Final = timedelta(minutes=6)


def sign_webhook(secret: str, timestamp_ms: int | str, raw: bytes, encoding: str = "hex") -> str:
    """PayNow's webhook signature: HMAC-SHA256(secret, "<timestamp>.<raw body>")."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}.".encode() + raw, hashlib.sha256).digest()
    if encoding == "hex":
        return mac.hex()
    if encoding == "base64":
        return base64.b64encode(mac).decode()
    raise ValueError(f"unknown signature encoding {encoding!r}; hex or base64")


@dataclass
class StoreRequest(RequestRecord):
    """A request as received: `token` is the API key presented (None: none)."""

    kind: str = "other"  # "store_items", "customer_items" or "other"
    customer_id: str | None = None
    client: object = None  # what `FakeStore.identify` said of the peer


@dataclass(frozen=True)
class WebhookResult:
    """One webhook as sent, and the receiver's answer."""

    status: int
    body: str
    event_type: str
    event_id: str
    raw: bytes  # the request body exactly as sent
    headers: dict[str, str]  # the request headers as sent


@dataclass
class _Item:
    data: dict[str, Any]  # every DeliveryItemDto field but the embedded customers
    visible: bool = True  # False: listed nowhere (not yet visible, or concealed)
    in_snapshot: bool = True  # False: left out of activeOnly listings
    body: bytes | None = None  # the served JSON, cached until the item or a customer changes

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def customer_id(self) -> str:
        return str(self.data["customer_id"])


class _Query(NamedTuple):
    limit: int
    after: int | None
    before: int | None
    asc: bool
    active_only: bool


class FakeStore:
    """The fake Management API. Data helpers are synchronous; start()/stop() are async."""

    def __init__(
        self,
        *,
        store_id: str | None = None,
        api_key: str | None = None,
        nulls: str = "spec",
        active_only_states: Iterable[str] = ("active", "renewed"),
        default_limit: int = MAX_LIMIT,
        default_asc: bool = False,
        keep_log: bool = True,
    ) -> None:
        # A Storefront fake that never listens: its builders, its fault queue
        # and its faulty answers serve this fake too, so both fail alike.
        self._storefront = FakePayNow(
            store_id=store_id, default_limit=default_limit, default_asc=default_asc, keep_log=False
        )
        self.store_id: str = self._storefront.store_id
        self.flakes: FlakeGenerator = self._storefront.flakes
        self.api_key = api_key or "pnapi_" + secrets.token_urlsafe(32)
        self.keep_log = keep_log
        self.log: list[StoreRequest] = []
        # Names each request's client from its peer address (tests with several
        # client processes map it to a process while the connection is open).
        self.identify: Callable[[Any], object] = lambda peer: peer
        self.webhooks_sent: list[WebhookResult] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._customers: dict[str, dict[str, Any]] = {}
        self._items: dict[str, _Item] = {}
        self._ordered: list[_Item] = []  # by int(id)
        self._ordered_ids: list[int] = []
        self._by_customer: dict[str, list[_Item]] = {}  # each by int(id)
        # What each listing shows, by (customer id or None, activeOnly); dropped on change.
        self._views: dict[tuple[str | None, bool], _Account] = {}
        self._nulls = "spec"
        self.nulls = nulls
        self._active_only_states = frozenset(active_only_states)
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ server

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = a free port); return `self.url`."""
        self._closing = asyncio.Event()
        self._storefront._closing = self._closing  # its "stall" faults end when we stop
        app = web.Application()
        app.router.add_get(STORE_ITEMS_PATH, self._handle_listing)
        app.router.add_get(CUSTOMER_ITEMS_PATH, self._handle_listing)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5, keepalive_timeout=75
        )
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        self.host, self.port = runner.addresses[0][:2]
        return self.url

    async def stop(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------- listing knobs

    @property
    def nulls(self) -> str:
        """How unset fields are sent: "spec", "always" (null) or "never" (absent)."""
        return self._nulls

    @nulls.setter
    def nulls(self, mode: str) -> None:
        if mode not in NULLS_MODES:
            raise ValueError(f"nulls must be one of {NULLS_MODES}, not {mode!r}")
        self._nulls = mode
        for item in self._items.values():
            item.body = None
        self._views.clear()

    @property
    def active_only_states(self) -> frozenset[str]:
        """The states `activeOnly=true` lists (add "usable" to try the other reading)."""
        return self._active_only_states

    @active_only_states.setter
    def active_only_states(self, states: Iterable[str]) -> None:
        self._active_only_states = frozenset(states)
        self._views.clear()

    # --------------------------------------------------------------- customers

    def add_customer(
        self,
        platform: str = "minecraft",
        *,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        customer_id: str | None = None,
        created_at: datetime | None = None,
    ) -> dict[str, Any]:
        """A new customer (CustomerDto, stored). platform: one of PLATFORMS;
        "offline" is an offline-mode Minecraft store's (a name, no UUID)."""
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, not {platform!r}")
        customer = self._storefront.make_customer(
            platform="none", name=name, customer_id=customer_id, created_at=created_at
        )
        if customer["id"] in self._customers:
            raise ValueError(f"customer {customer['id']} exists already")
        customer["metadata"] = dict(metadata or {})
        if platform in ("minecraft", "both", "offline"):
            self._link(customer, "offline" if platform == "offline" else "minecraft")
        if platform in ("steam", "both"):
            self._link(customer, "steam")
        self._customers[customer["id"]] = customer
        self._by_customer.setdefault(customer["id"], [])
        return customer

    def link_account(self, customer_id: str, platform: str) -> dict[str, Any]:
        """The customer links a "minecraft", "steam" or "offline" account later."""
        customer = self.customer(customer_id)
        self._link(customer, platform)
        return self.update_customer(customer_id)

    def update_customer(self, customer_id: str, **fields: Any) -> dict[str, Any]:
        """Change customer fields (None unsets); `updated_at` becomes now."""
        customer = self.customer(customer_id)
        customer.update({key: _json_value(value) for key, value in fields.items()})
        if "updated_at" not in fields:
            customer["updated_at"] = iso(datetime.now(UTC))
        # A customer is embedded in their items and in the gifts they bought.
        for item in self._items.values():
            if customer["id"] in (item.customer_id, item.data["order_customer_id"]):
                self._changed(item)
        return customer

    def customer(self, customer_id: str) -> dict[str, Any]:
        """The stored customer (live: later changes show in it)."""
        try:
            return self._customers[str(customer_id)]
        except KeyError:
            raise KeyError(f"no customer {customer_id}") from None

    @property
    def customer_ids(self) -> list[str]:
        return list(self._customers)

    def _link(self, customer: dict[str, Any], platform: str) -> None:
        name = customer["name"]
        if platform == "offline":
            avatar = f"https://mc-heads.net/avatar/{name}"
            customer["minecraft_uuid"] = None  # offline-mode stores have none
            customer["minecraft_platform"] = "java"
            customer["minecraft"] = {"id": name, "name": name, "avatar_url": avatar}
            linked = {"id": name, "platform": "minecraft", "name": name, "avatar_url": avatar}
        elif platform in ("minecraft", "steam"):
            made = self._storefront.make_customer(
                platform=platform, name=name, customer_id=customer["id"]
            )
            keys = ("minecraft_uuid", "minecraft", "minecraft_platform")
            for key in keys if platform == "minecraft" else ("steam_id", "steam"):
                customer[key] = made[key]
            linked = made["profile"]
        else:
            raise ValueError(f"cannot link a {platform!r} account; minecraft, steam or offline")
        if customer.get("profile") is None:
            customer["profile"] = linked

    # ------------------------------------------------------------------- items

    def add_item(
        self,
        customer_id: str,
        *,
        product: str = "vip",
        product_name: str | None = None,
        state: str = "active",
        expirable: bool = False,
        expires_at: datetime | None = None,
        override_expires_at: datetime | None = None,
        custom_variables: Mapping[str, str] | None = None,
        skip_commands: bool = False,
        execute_on_gameserver_id: str | None = None,
        gift_from: str | None = None,
        revoke_reason: str | None = None,
        added_at: datetime | None = None,
        visible: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """A new item of `customer_id` (the recipient, for a gift `gift_from` a
        buyer); its id is higher than every id so far. `visible=False`: listed
        nowhere until `reveal()`. Returns the stored item (live)."""
        self.customer(customer_id)
        buyer = self.customer(gift_from)["id"] if gift_from is not None else str(customer_id)
        added = added_at or datetime.now(UTC)
        checkout, checkout_line, order, order_line = (
            self.flakes.next(added - timedelta(seconds=seconds)) for seconds in (90, 90, 27, 27)
        )
        data = self._storefront.make_item(
            str(customer_id),
            product=product,
            product_name=product_name,
            state=state,
            expirable=expirable or expires_at is not None,
            gift=gift_from is not None,
            added_at=added,
            order_id=order,
            revoke_reason=revoke_reason,
            order_line_id=order_line,
            execute_on_gameserver_id=execute_on_gameserver_id,
        )
        data.update(
            order_customer_id=buyer,
            checkout_id=checkout,
            checkout_line_id=checkout_line,
            trial_id=None,
            added_by=None,
            revoked_by=None,
            command_attempts=[],
            skip_commands=skip_commands,
            custom_variables=dict(custom_variables or {}),
        )
        if expires_at is not None:
            data["expires_at"] = iso(expires_at)
        if override_expires_at is not None:
            data["override_expires_at"] = iso(override_expires_at)
        data.update({key: _json_value(value) for key, value in extra.items()})
        item = _Item(data, visible=visible)
        self._insert(item)
        return data

    def set_state(
        self,
        item_id: str,
        state: str,
        revoke_reason: str | None = None,
        *,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Move an item to `state`, filling active_at/expires_at/removed_at/revoked_at."""
        item = self._item(item_id)
        _apply_state(item.data, state, revoke_reason, at or datetime.now(UTC))
        self._changed(item)
        return item.data

    def activate(
        self, item_id: str, *, expires_at: datetime | None = None, at: datetime | None = None
    ) -> dict[str, Any]:
        """usable → active (an expirable item expires 30 days on, or at `expires_at`)."""
        data = self.set_state(item_id, "active", at=at)
        if expires_at is not None:
            return self.update_item(item_id, expirable=True, expires_at=expires_at)
        return data

    def use(self, item_id: str, *, at: datetime | None = None) -> dict[str, Any]:
        """The item is used up (state `used`, `removed_at` set)."""
        return self.set_state(item_id, "used", at=at)

    def expire(self, item_id: str, *, at: datetime | None = None) -> dict[str, Any]:
        """The item expires naturally (state `used`, `expires_at` no later than now)."""
        moment = at or datetime.now(UTC)
        current = self._item(item_id).data["expires_at"]
        if current is not None and datetime.fromisoformat(current) < moment:
            moment = datetime.fromisoformat(current)
        self.set_state(item_id, "used", at=moment)
        return self.update_item(item_id, expirable=True, expires_at=moment)

    def revoke(
        self, item_id: str, reason: str = "admin", *, at: datetime | None = None
    ) -> dict[str, Any]:
        """The item is taken back (refund, chargeback, admin ...)."""
        return self.set_state(item_id, "revoked", reason, at=at)

    def renew(
        self, item_id: str, *, expires_at: datetime | None = None, at: datetime | None = None
    ) -> dict[str, Any]:
        """A subscription renews: state `renewed`, a later expiry (default: 30 more days)."""
        data = self._item(item_id).data
        moment = at or datetime.now(UTC)
        if expires_at is None:
            current = data["expires_at"]
            base = max(datetime.fromisoformat(current), moment) if current else moment
            expires_at = base + timedelta(days=30)
        self.set_state(item_id, "renewed", at=moment)
        return self.update_item(item_id, expirable=True, expires_at=expires_at)

    def update_item(self, item_id: str, **fields: Any) -> dict[str, Any]:
        """Change item fields (datetimes become PayNow timestamps). The id cannot change."""
        if "id" in fields:
            raise ValueError("an item's id cannot change; add another item")
        item = self._item(item_id)
        item.data.update({key: _json_value(value) for key, value in fields.items()})
        if "customer_id" in fields:
            self._rebuild_customer_index()
            self._views.clear()
        self._changed(item)
        return item.data

    def reveal(self, item_id: str) -> None:
        """An item added with visible=False (or concealed) becomes listed."""
        self._set_flags(item_id, visible=True)

    def conceal(self, item_id: str) -> None:
        """The item is listed nowhere (neither listing, with or without activeOnly)."""
        self._set_flags(item_id, visible=False)

    def hide_from_snapshot(self, item_id: str) -> None:
        """The item is left out of every activeOnly listing, still listed without it."""
        self._set_flags(item_id, in_snapshot=False)

    def show_in_snapshot(self, item_id: str) -> None:
        self._set_flags(item_id, in_snapshot=True)

    def item(self, item_id: str) -> dict[str, Any]:
        """The stored item (live), without the embedded customers."""
        return self._item(item_id).data

    def items(self, customer_id: str | None = None) -> list[dict[str, Any]]:
        """Stored items ascending by id (visible or not), of one customer or all."""
        chosen = self._ordered if customer_id is None else self._by_customer[str(customer_id)]
        return [item.data for item in chosen]

    def populate(
        self,
        customers: int,
        items: int,
        *,
        live: int | None = None,
        platform: str = "minecraft",
        products: tuple[str, ...] = ("vip",),
    ) -> list[str]:
        """Bulk-add customers and items (for benchmarks), items spread over the
        customers in turn; the first `live` (default all) active, the rest used.
        Returns the new customer ids."""
        ids = [self.add_customer(platform)["id"] for _ in range(customers)]
        start = datetime.now(UTC) - timedelta(days=10)
        for n in range(items):
            self.add_item(
                ids[n % customers],
                product=products[n % len(products)],
                state="active" if live is None or n < live else "used",
                added_at=start + timedelta(milliseconds=n),
            )
        return ids

    def _item(self, item_id: str) -> _Item:
        try:
            return self._items[str(item_id)]
        except KeyError:
            raise KeyError(f"no item {item_id}") from None

    def _insert(self, item: _Item) -> None:
        self._items[item.id] = item
        key = int(item.id)
        at = bisect.bisect(self._ordered_ids, key)
        self._ordered.insert(at, item)
        self._ordered_ids.insert(at, key)
        owned = self._by_customer[item.customer_id]
        bisect.insort(owned, item, key=lambda i: int(i.id))
        self._changed(item)

    def _rebuild_customer_index(self) -> None:
        self._by_customer = {cid: [] for cid in self._customers}
        for item in self._ordered:
            self._by_customer[item.customer_id].append(item)

    def _set_flags(self, item_id: str, **flags: bool) -> None:
        item = self._item(item_id)
        for name, value in flags.items():
            setattr(item, name, value)
        self._changed(item)

    def _changed(self, item: _Item) -> None:
        item.body = None
        for key in (
            (None, False),
            (None, True),
            (item.customer_id, False),
            (item.customer_id, True),
        ):
            self._views.pop(key, None)

    # --------------------------------------------------------- served objects

    def served_customer(self, customer_id: str) -> dict[str, Any]:
        """The CustomerDto as the API sends it (unset fields per `nulls`)."""
        return self._shaped(self.customer(customer_id), _CUSTOMER_NOT_NULLABLE)

    def served_item(self, item_id: str) -> dict[str, Any]:
        """The DeliveryItemDto as the API sends it, its customer embedded."""
        data = self._item(item_id).data
        served = self._shaped(data, _ITEM_NOT_NULLABLE)
        served["customer"] = self.served_customer(data["customer_id"])
        if data["gift"] and data["order_customer_id"] in self._customers:
            served["order_customer"] = self.served_customer(data["order_customer_id"])
        return served

    def storefront_items(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's items as the Storefront API shows them (for token mode:
        `FakePayNow.add_customer(token, fake.customer(id), fake.storefront_items(id))`)."""
        return [
            {k: v for k, v in item.data.items() if k not in _STORE_ONLY_ITEM_FIELDS}
            for item in self._by_customer[str(customer_id)]
            if item.visible
        ]

    def _shaped(self, data: Mapping[str, Any], not_nullable: frozenset[str]) -> dict[str, Any]:
        if self._nulls == "always":
            return dict(data)
        keep_null = self._nulls == "spec"
        return {
            key: value
            for key, value in data.items()
            if value is not None or (keep_null and key not in not_nullable)
        }

    def _body(self, item: _Item) -> bytes:
        if item.body is None:
            item.body = _dumps(self.served_item(item.id))
        return item.body

    def _view(self, customer_id: str | None, active_only: bool) -> _Account:
        """What one listing shows, ascending, as the Storefront fake's paging expects."""
        key = (customer_id, active_only)
        view = self._views.get(key)
        if view is None:
            pool = self._ordered if customer_id is None else self._by_customer[customer_id]
            states = self._active_only_states
            chosen = [
                item
                for item in pool
                if item.visible
                and (not active_only or (item.in_snapshot and item.data["state"] in states))
            ]
            view = _Account(
                token=customer_id or "",
                customer={},
                items=[item.data for item in chosen],
                ids=[int(item.id) for item in chosen],
                item_bodies=[self._body(item) for item in chosen],
            )
            self._views[key] = view
        return view

    # ------------------------------------------------------------------ faults

    def fault(
        self,
        kind: str,
        *,
        path: str | None = None,
        customer: str | None = None,
        page: int | None = None,
        request: int | None = None,
        times: int | None = 1,
        **options: Any,
    ) -> Fault:
        """Queue a fault (a kind of `paynow_api.FAULT_KINDS`; `options` as there:
        status, retry_after, delay, body, content_type, field, message)."""
        if path is not None and path not in PATH_KINDS:
            raise ValueError(f"path must be one of {PATH_KINDS}, not {path!r}")
        return self._storefront.fault(
            customer, kind, path=path, page=page, request=request, times=times, **options
        )

    def clear_faults(self) -> None:
        self._storefront.clear_faults()

    @property
    def pending_faults(self) -> list[Fault]:
        return self._storefront.pending_faults

    # ---------------------------------------------------------------- counters

    def count(self, kind: str | None = None, customer: str | None = None) -> int:
        """Requests received: of a `kind` ("store_items", "customer_items",
        "other") and/or for a `customer` (customer listings only)."""
        sf = self._storefront
        if kind is not None:
            if customer is None:
                return sf.requests_by_path[kind]
            return sf.requests_by_path_token[(kind, str(customer))]
        if customer is not None:
            return sf.requests_by_token[str(customer)]
        return sum(sf.requests_by_path.values())

    def requests(self, kind: str | None = None, customer: str | None = None) -> list[StoreRequest]:
        """The logged requests (keep_log), oldest first, optionally filtered."""
        return [
            r
            for r in self.log
            if (kind is None or r.kind == kind)
            and (customer is None or r.customer_id == str(customer))
        ]

    def reset_counters(self) -> None:
        self._storefront.reset_counters()
        self.log.clear()

    def _record(self, request: web.Request, kind: str, customer_id: str | None) -> StoreRequest:
        sf = self._storefront  # its counters: its faults' `request` option reads them
        sf.requests_by_path[kind] += 1
        sf.requests_by_token[customer_id] += 1
        sf.requests_by_path_token[(kind, customer_id)] += 1
        record = StoreRequest(
            time=time.monotonic(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            token=_api_key(request),
            user_agent=request.headers.get("User-Agent"),
            kind=kind,
            customer_id=customer_id,
            client=self.identify(
                request.transport and request.transport.get_extra_info("peername")
            ),
        )
        if self.keep_log:
            self.log.append(record)
        return record

    # ---------------------------------------------------------------- handlers

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        self._record(request, "other", None).status = 404
        return self._storefront._error(
            404, "not-found", f"no route for {request.method} {request.path}"
        )

    async def _handle_listing(self, request: web.Request) -> web.StreamResponse:
        customer_id = request.match_info.get("customer_id")
        kind = "store_items" if customer_id is None else "customer_items"
        record = self._record(request, kind, customer_id)
        try:
            self._authorize(record.token, request.match_info["store_id"])
            query = self._parse_query(request)
            if customer_id is not None and customer_id not in self._customers:
                raise _Reject(self._storefront._error(404, "not-found", "customer not found"))
        except _Reject as reject:
            record.status = reject.response.status
            return reject.response
        view = self._view(customer_id, query.active_only)
        record.page = _page_number(view.ids, query)
        sf = self._storefront
        fault = sf._take_fault(customer_id, kind, record.page)
        after, before = query.after, query.before
        if fault is not None:
            record.fault = fault.kind
            if fault.kind == "repeat_page":
                after = before = None
            page_args = (query.limit, after, before, query.asc)
            response = await sf._apply_fault(request, fault, view, page_args, record)
            if response is not None:
                return response
        record.status = 200
        return web.Response(
            body=sf._page_body(view, query.limit, after, before, query.asc, fault),
            content_type="application/json",
        )

    def _authorize(self, api_key: str | None, store_id: str) -> None:
        error = self._storefront._error
        if api_key is None:
            raise _Reject(error(401, "unauthorized", "missing or malformed API key authorization"))
        if not hmac.compare_digest(api_key.encode(), self.api_key.encode()):
            raise _Reject(error(401, "unauthorized", "invalid API key"))
        if store_id != self.store_id:
            raise _Reject(error(403, "forbidden", f"the API key has no access to store {store_id}"))

    def _parse_query(self, request: web.Request) -> _Query:
        """The Storefront fake's paging parameters, and `activeOnly`."""
        sf = self._storefront
        limit, after, before, asc = sf._parse_query(request)
        text = request.query.get("activeOnly", "false").lower()
        if text not in ("true", "false", "1", "0"):
            message = "activeOnly must be true or false"
            error = {
                "code": "invalid",
                "message": message,
                "path": "activeOnly",
                "validation": "query",
            }
            raise _Reject(sf._error(400, "validation-error", message, [error]))
        return _Query(limit, after, before, asc, active_only=text in ("true", "1"))

    # ---------------------------------------------------------------- webhooks

    def webhook_payload(
        self,
        event_type: str,
        item_id: str | None = None,
        *,
        event_id: str | None = None,
        customer: bool = True,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`{"event_type", "event_id", "body"}`: an ON_DELIVERY_ITEM_* body from
        the item as it is now (`customer=False`: `customer` null), an
        ON_ORDER_COMPLETED body for the item's order, or the `body` given."""
        if body is None:
            if item_id is None:
                raise ValueError(f"{event_type} needs an item_id (or a body)")
            item = self._item(item_id)
            if event_type in DELIVERY_EVENTS:
                body = self._webhook_item(item, customer)
            elif event_type == "ON_ORDER_COMPLETED":
                body = self._webhook_order(item)
            else:
                raise ValueError(f"no body is built for {event_type}; pass body=")
        return {
            "event_type": event_type,
            "event_id": event_id or self.flakes.next(),
            "body": dict(body),
        }

    async def send_webhook(
        self,
        url: str,
        event_type: str,
        item_id: str | None,
        secret: str,
        *,
        event_id: str | None = None,
        timestamp_ms: int | None = None,
        encoding: str = "hex",
        tamper: str | None = None,
        customer: bool = True,
        body: Mapping[str, Any] | None = None,
    ) -> WebhookResult:
        """POST one webhook to `url`, signed with `secret` (forged per `tamper`)."""
        if tamper is not None and tamper not in TAMPERS:
            raise ValueError(f"unknown tamper {tamper!r}; one of {sorted(TAMPERS)}")
        payload = self.webhook_payload(
            event_type, item_id, event_id=event_id, customer=customer, body=body
        )
        raw = json.dumps(payload, separators=(",", ":")).encode()
        now_ms = int(time.time() * 1000)
        stamp = now_ms if timestamp_ms is None else timestamp_ms
        if tamper in ("stale", "future"):
            shift = int(_STALE.total_seconds() * 1000)
            stamp += shift if tamper == "future" else -shift
        elif tamper == "timestamp_seconds":
            stamp //= 1000
        key = secret + "-not" if tamper == "wrong_secret" else secret
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "PayNow-Webhooks (perksync test fake)",
            "PayNow-Timestamp": str(stamp),
            "PayNow-Signature": sign_webhook(key, stamp, raw, encoding),
        }
        raw, headers = _forge(tamper, raw, headers, payload)
        return await self._post(url, event_type, str(payload["event_id"]), raw, headers)

    async def replay_webhook(
        self,
        url: str,
        sent: WebhookResult,
        secret: str | None = None,
        *,
        timestamp_ms: int | None = None,
        encoding: str = "hex",
    ) -> WebhookResult:
        """Send an earlier webhook again: the very same request (secret=None, as
        an eavesdropper would), or re-signed with a new timestamp (as PayNow
        retries when our answer was lost). Same event_id, same body bytes."""
        headers = dict(sent.headers)
        if secret is not None:
            stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            headers["PayNow-Timestamp"] = str(stamp)
            headers["PayNow-Signature"] = sign_webhook(secret, stamp, sent.raw, encoding)
        return await self._post(url, sent.event_type, sent.event_id, sent.raw, headers)

    async def _post(
        self, url: str, event_type: str, event_id: str, raw: bytes, headers: dict[str, str]
    ) -> WebhookResult:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        async with self._session.post(url, data=raw, headers=headers) as response:
            text = await response.text()
            result = WebhookResult(response.status, text, event_type, event_id, raw, headers)
        self.webhooks_sent.append(result)
        return result

    def _webhook_customer(self, customer_id: str) -> dict[str, Any]:
        """The webhooks' CustomerDTO (an unlinked platform's profile is null)."""
        customer = self.customer(customer_id)
        return {
            "id": customer["id"],
            "name": customer["name"],
            "steam": customer["steam"],
            "minecraft": customer["minecraft"],
            "profile": customer["profile"],
        }

    def _webhook_product(self, product: Mapping[str, Any]) -> dict[str, Any]:
        """The webhooks' ProductDTO of a DeliveryItemProductDto."""
        created = iso(_flake_time(product["id"]))
        return {
            "id": product["id"],
            "store_id": self.store_id,
            "version_id": product["version_id"],
            "image_url": None,
            "slug": product["slug"],
            "name": product["name"],
            "description": f"<p>{product['name']}</p>",
            "enabled": True,
            "label": None,
            "sort_order": 0,
            "price": 999,
            "single_game_server_only": False,
            "allow_one_time_purchase": True,
            "allow_subscription": False,
            "subscription_interval_value": None,
            "subscription_interval_scale": None,
            "remove_after_enabled": False,
            "remove_after_time_value": None,
            "remove_after_time_scale": None,
            "tags": [],
            "tag_names": "",
            "gameservers": [],
            "gameserver_names": "",
            "commands": [],
            "created_at": created,
            "updated_at": created,
            "metadata": {},
        }

    def _webhook_item(self, item: _Item, customer: bool) -> dict[str, Any]:
        data = item.data
        server = data["execute_on_gameserver_id"]
        body = {
            "id": data["id"],
            "store_id": data["store_id"],
            "customer": self._webhook_customer(data["customer_id"]) if customer else None,
            "order_customer_id": data["order_customer_id"],
            "checkout_id": data["checkout_id"],
            "order_id": data["order_id"],
            "order_line_id": data["order_line_id"],
            "subscription_id": data["subscription_id"],
            "execute_on_gameserver_id": server,
            "execute_on_gameserver": (
                {"id": server, "name": f"server-{server[-4:]}", "enabled": True} if server else None
            ),
            "product_id": data["product"]["id"],
            "product_version_id": data["product"]["version_id"],
            "product": self._webhook_product(data["product"]),
            **{key: data[key] for key in ("state", "added_at", "active_at", "expires_at")},
            **{key: data[key] for key in ("removed_at", "revoked_at", "revoke_reason")},
        }
        if self._nulls == "never":
            return {k: v for k, v in body.items() if v is not None or k == "customer"}
        return body

    def _webhook_order(self, item: _Item) -> dict[str, Any]:
        """The webhooks' OrderDTO of the order that bought `item`."""
        data = item.data
        product = self._webhook_product(data["product"])
        buyer = data["order_customer_id"]
        gift_to = self._webhook_customer(data["customer_id"]) if data["gift"] else None
        line_ids = {"product_id": product["id"], "product_version_id": product["version_id"]}
        checkout_line = {"id": data["checkout_line_id"], **line_ids, "metadata": {}}
        line = {
            "id": data["order_line_id"],
            "checkout_line_id": data["checkout_line_id"],
            **line_ids,
            "product": product,
            "product_name": product["name"],
            "product_image_url": None,
            "subscription_id": data["subscription_id"],
            "gift_to_customer": gift_to,
            "price": product["price"],
            "quantity": 1,
            "discount_amount": 0,
            "subtotal_amount": product["price"],
            "tax_amount": 0,
            "total_amount": product["price"],
            "selected_gameserver_id": data["execute_on_gameserver_id"],
        }
        return {
            "id": data["order_id"],
            "store_id": self.store_id,
            "customer": self._webhook_customer(buyer),
            "checkout_id": data["checkout_id"],
            "checkout": {"id": data["checkout_id"], "metadata": {}, "lines": [checkout_line]},
            "subscription_id": data["subscription_id"],
            "applied_coupons": [],
            "applied_giftcards": [],
            "coupon_id": None,
            "type": "one_time",
            "currency": "usd",
            "tax_inclusive": False,
            "tax_amount": 0,
            "discount_amount": 0,
            "subtotal_amount": product["price"],
            "total_amount": product["price"],
            "created_at": data["added_at"],
            "completed_at": data["added_at"],
            "billing_name": self.customer(buyer)["name"] or "",
            "billing_email": f"customer{buyer}@example.com",
            "billing_address_country": "US",
            "customer_ip": "192.0.2.10",
            "giftcard_usage_amount": 0,
            "lines": [line],
            "product_names": product["name"],
            "product_tags": "",
            "product_gameservers": "",
            "status": "completed",
        }


# ------------------------------------------------------------------ helpers


def _api_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "apikey" and key else None


def _page_number(ids: list[int], query: _Query) -> int:
    """Which page a request is (by its cursor's position), as the Storefront fake counts."""
    if query.asc:
        start = bisect.bisect_right(ids, query.after) if query.after is not None else 0
        return start // query.limit + 1
    end = bisect.bisect_left(ids, query.before) if query.before is not None else len(ids)
    return (len(ids) - end) // query.limit + 1


def _json_value(value: Any) -> Any:
    return iso(value) if isinstance(value, datetime) else value


def _flake_time(flake: str) -> datetime:
    return FLAKE_EPOCH + timedelta(milliseconds=int(flake) >> 22)


def _forge(
    tamper: str | None, raw: bytes, headers: dict[str, str], payload: Mapping[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """The request after signing, as `tamper` alters it."""
    if tamper == "body_changed":
        altered = json.loads(raw)
        altered["body"]["id"] = str(int(payload["body"].get("id") or 0) + 1)
        raw = json.dumps(altered, separators=(",", ":")).encode()
    elif tamper == "body_whitespace":
        raw += b" "
    elif tamper == "timestamp_changed":
        headers["PayNow-Timestamp"] = str(int(headers["PayNow-Timestamp"]) + 1000)
    elif tamper == "no_signature":
        del headers["PayNow-Signature"]
    elif tamper == "no_timestamp":
        del headers["PayNow-Timestamp"]
    elif tamper == "empty_signature":
        headers["PayNow-Signature"] = ""
    elif tamper == "garbage_signature":
        headers["PayNow-Signature"] = "not-a-signature!"
    return raw, headers


# ------------------------------------------------------------------- standalone


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeStore(api_key=args.api_key)
    fake.populate(args.customers, args.customers * args.items, platform=args.platform)
    await fake.start(args.host, args.port)
    print(f"fake PayNow Management API on {fake.url}", flush=True)
    print(f"  store id: {fake.store_id}", flush=True)
    print(f"  Authorization: APIKey {fake.api_key}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--customers", type=int, default=3)
    parser.add_argument("--items", type=int, default=5, help="items per customer")
    parser.add_argument("--platform", default="both", choices=PLATFORMS)
    parser.add_argument("--api-key", default=None, help="default: a random one, printed")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
