"""A fake PayNow Storefront API (aiohttp.web) for tests, demos and benchmarks.

It serves the two endpoints perksync reads, shaped as in PayNow's OpenAPI spec
(`CustomerDto`, `StorefrontDeliveryItemDto`, `PayNowError`):

- `GET /v1/store/customer`
- `GET /v1/store/customer/delivery/items` with `limit` (1-100, default 100),
  `after`, `before` (ids compared as integers: `id > after`, `id < before`) and
  `asc` (true: ascending by id; false, the default: descending). The filters
  apply first, then the order, then the limit, so `asc=false&before=<last id>`
  pages backwards and `asc=true&after=<last id>` forwards. The spec leaves both
  defaults open; these are this fake's choices.

Auth: `Authorization: Customer <token>` (prefix case-insensitive). A missing
header or an unknown token gives 401 `{status, code: "unauthorized", message,
trace_id}`. Bad query parameters give 400 with `code: "validation-error"` and
`errors`. Any other path gives 404.

Usage::

    async with FakePayNow() as fake:          # or: await fake.start() / fake.stop()
        token = fake.new_token()
        customer = fake.add_customer(token, items=3)
        fake.set_state(token, fake.items(token)[0]["id"], "revoked", "refund")
        fake.fault(token, "status", status=503, times=2, path="items", page=2)
        ... StorefrontClient(session, fake.url) ...
        assert fake.count(path="items", token=token) == 4

Faults (see `FAULT_KINDS`) are queued per token (`token=None`: any request) and
consumed first-match, first-queued; `times=None` means forever. They can be
limited to a `path` ("customer", "items" or a full path), to a `page` of the
inventory (its position: page 2 is the request whose cursor sits after the
first `limit` items, so a retry of page 2 is page 2 again) and to the n-th
`request` of that token (to that path, when one is given; 1-based).

Standalone: `python -m tests.fakes.paynow_api --port 8080 --customers 3 --items 5`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gzip
import hashlib
import itertools
import json
import secrets
import time
import uuid as uuid_module
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NoReturn

from aiohttp import web

CUSTOMER_PATH: Final = "/v1/store/customer"
ITEMS_PATH: Final = "/v1/store/customer/delivery/items"
PATH_ALIASES: Final = {"customer": CUSTOMER_PATH, "items": ITEMS_PATH, "inventory": ITEMS_PATH}
MAX_LIMIT: Final = 100

# PayNow flakes are snowflakes: milliseconds since 2022-02-22T22:22:22Z shifted
# left by 22 bits (derived from the seed's ids and timestamps).
FLAKE_EPOCH: Final = datetime(2022, 2, 22, 22, 22, 22, tzinfo=UTC)
_FLAKE_EPOCH_MS: Final = int(FLAKE_EPOCH.timestamp() * 1000)

FAULT_KINDS: Final = frozenset(
    {
        "status",  # HTTP `status` (default 500) with a PayNowError body (or `body`)
        "status_empty",  # HTTP `status` with an empty body
        "status_text",  # HTTP `status` with a non-JSON (HTML) body, like a proxy's
        "rate_limit",  # 429 with `Retry-After: <retry_after>` (default "1") + PayNowError body
        "stall",  # wait `delay` seconds (default: until stop()) before answering normally
        "stall_body",  # send the headers and half the body, then wait `delay`, then the rest
        "malformed",  # 200 with invalid JSON
        "truncated",  # 200 with the real body cut in half; Content-Length honest (the cut size)
        "disconnect",  # 200, Content-Length of the full body, half sent, connection closed
        "reset",  # connection closed before any response
        "wrong_shape",  # customer: an array; items: an object {"items": [...]}
        "missing_field",  # drop `field` (default "id" / "state") from the customer / first item
        "repeat_page",  # ignore `after`/`before`: always serve the first page
        "reverse_page",  # serve the right page in the wrong order
        "duplicate_item",  # second item of the page replaced by a copy of the first
        "body",  # raw `body` with `status` (default 200) and `content_type`
        "gzip_body",  # like "body", sent gzip-compressed with `Content-Encoding: gzip`
        "endless",  # `status` (default 200), chunked: `body` (default "[") then spaces, forever
    }
)


def iso(moment: datetime) -> str:
    """Timestamp as PayNow writes it: UTC, `Z`, microseconds minus trailing zeros."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    m = moment
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


class FlakeGenerator:
    """Strictly increasing flake ids that encode their timestamp, like PayNow's."""

    def __init__(self, worker: int = 2) -> None:
        self._low = (worker & 0x3FF) << 12
        self._last = 0

    def next(self, at: datetime | None = None) -> str:
        moment = at or datetime.now(UTC)
        ms = int(moment.timestamp() * 1000) - _FLAKE_EPOCH_MS
        value = (max(ms, 0) << 22) | self._low
        if value <= self._last:
            value = self._last + 1
        self._last = value
        return str(value)


@dataclass
class Fault:
    kind: str
    token: str | None = None
    times: int | None = 1
    path: str | None = None
    page: int | None = None
    request: int | None = None
    status: int | None = None
    retry_after: str | None = None
    delay: float | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    field: str | None = None
    message: str | None = None
    used: int = 0


@dataclass
class RequestRecord:
    time: float  # time.monotonic() when the request arrived
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    user_agent: str | None
    page: int | None = None
    status: int = 0  # 0 when the connection was dropped
    fault: str | None = None


@dataclass
class _Account:
    token: str
    customer: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)  # sorted by int(id)
    ids: list[int] = field(default_factory=list)
    customer_body: bytes | None = None
    item_bodies: list[bytes] | None = None
    pages: dict[tuple[int, int | None, int | None, bool], bytes] = field(default_factory=dict)

    def items_changed(self) -> None:
        self.item_bodies = None
        self.pages.clear()

    def resort(self) -> None:
        self.items.sort(key=lambda item: int(item["id"]))
        self.ids = [int(item["id"]) for item in self.items]
        self.items_changed()

    def bodies(self) -> list[bytes]:
        if self.item_bodies is None:
            self.item_bodies = [_dumps(item) for item in self.items]
        return self.item_bodies


def _dumps(value: Any) -> bytes:
    # A lone surrogate (a name "\ud800Eve") cannot be UTF-8: backslashreplace
    # writes it as the JSON escape `\ud800`, as a JavaScript server sends it.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


_NO_FAULT: Final = Fault(kind="none", times=0)


class _Reject(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


class FakePayNow:
    """The fake API. Data helpers are synchronous; start()/stop() are async."""

    def __init__(
        self,
        *,
        store_id: str | None = None,
        default_limit: int = MAX_LIMIT,
        default_asc: bool = False,
        keep_log: bool = True,
    ) -> None:
        self.flakes = FlakeGenerator()
        self.store_id = store_id or self.flakes.next(datetime(2022, 11, 11, tzinfo=UTC))
        self.default_limit = default_limit
        self.default_asc = default_asc
        self.keep_log = keep_log
        self._accounts: dict[str, _Account] = {}
        self._products: dict[str, dict[str, Any]] = {}
        self._faults: list[Fault] = []
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._trace = itertools.count(1)
        self.host = "127.0.0.1"
        self.port = 0
        # Counters (see count()); `log` holds every request when keep_log.
        self.requests_by_path: Counter[str] = Counter()
        self.requests_by_token: Counter[str | None] = Counter()
        self.requests_by_path_token: Counter[tuple[str, str | None]] = Counter()
        self.log: list[RequestRecord] = []
        self.endless_bytes_sent = 0  # by "endless" faults, until the client hung up

    # ------------------------------------------------------------------ server

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = a free port); return `self.url`."""
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get(CUSTOMER_PATH, self._handle_customer)
        app.router.add_get(ITEMS_PATH, self._handle_items)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5, keepalive_timeout=75
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self.host, self.port = address[0], address[1]
        return self.url

    async def stop(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakePayNow:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------ data helpers

    @staticmethod
    def new_token() -> str:
        return "pnc_" + secrets.token_urlsafe(24)

    def product(self, slug: str, name: str | None = None) -> dict[str, Any]:
        """The DeliveryItemProductDto of a product (created on first use)."""
        product = self._products.get(slug)
        if product is None:
            product = {
                "id": self.flakes.next(datetime(2023, 1, 31, tzinfo=UTC)),
                "version_id": self.flakes.next(datetime(2023, 4, 4, tzinfo=UTC)),
                "slug": slug,
                "name": name or slug.replace("-", " ").replace("_", " ").title(),
            }
            self._products[slug] = product
        return dict(product)

    def make_customer(
        self,
        *,
        platform: str = "minecraft",
        name: str | None = None,
        customer_id: str | None = None,
        created_at: datetime | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A CustomerDto. platform: "minecraft", "steam", "both" or "none"."""
        created = created_at or datetime.now(UTC) - timedelta(days=30)
        cid = customer_id or self.flakes.next(created)
        name = name or f"player{int(cid) % 100000}"
        digest = hashlib.blake2b(cid.encode(), digest_size=16).digest()
        customer: dict[str, Any] = {
            "id": cid,
            "store_id": self.store_id,
            "profile": None,
            "steam_id": None,
            "steam": None,
            "minecraft_uuid": None,
            "minecraft": None,
            "xbox_xuid": None,
            "minecraft_platform": None,
            "name": name,
            "created_at": iso(created),
            "updated_at": iso(created + timedelta(minutes=4, seconds=11, microseconds=431)),
            "metadata": dict(metadata or {}),
        }
        if platform in ("steam", "both"):
            steam_id = str(76561197960265728 + int.from_bytes(digest[:4], "big"))
            customer["steam_id"] = steam_id
            customer["steam"] = {
                "id": steam_id,
                "name": name,
                "avatar_url": f"https://avatars.steamstatic.com/{steam_id}_full.jpg",
            }
            customer["profile"] = {
                "id": steam_id,
                "platform": "steam",
                "name": name,
                "avatar_url": customer["steam"]["avatar_url"],
            }
        if platform in ("minecraft", "both"):
            uuid = str(uuid_module.UUID(bytes=digest[:16], version=4))
            customer["minecraft_uuid"] = uuid
            customer["minecraft_platform"] = "java"
            customer["minecraft"] = {
                "id": uuid,
                "name": name,
                "avatar_url": f"https://mc-heads.net/avatar/{uuid}",
            }
            customer["profile"] = {
                "id": uuid,
                "platform": "minecraft",
                "name": name,
                "avatar_url": customer["minecraft"]["avatar_url"],
            }
        return customer

    def make_item(
        self,
        customer_id: str,
        *,
        product: str = "vip",
        product_name: str | None = None,
        state: str = "active",
        expirable: bool = False,
        gift: bool = False,
        added_at: datetime | None = None,
        item_id: str | None = None,
        order_id: str | None = None,
        quantity_index: int | None = 0,
        revoke_reason: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A StorefrontDeliveryItemDto; timestamps consistent with `state`."""
        added = added_at or datetime.now(UTC) - timedelta(hours=1)
        order = order_id or self.flakes.next(added - timedelta(seconds=27))
        item: dict[str, Any] = {
            "id": item_id or self.flakes.next(added),
            "store_id": self.store_id,
            "customer_id": customer_id,
            "order_id": order,
            "order_line_id": str(int(order) + 1),
            "subscription_id": None,
            "execute_on_gameserver_id": None,
            "quantity_index": quantity_index,
            "product": self.product(product, product_name),
            "state": "usable",
            "expirable": expirable,
            "gift": gift,
            "added_at": iso(added),
            "active_at": None,
            "expires_at": None,
            "override_expires_at": None,
            "removed_at": None,
            "revoked_at": None,
            "revoke_reason": None,
        }
        _apply_state(item, state, revoke_reason, added + timedelta(seconds=40, microseconds=6545))
        item.update(extra)
        return item

    def add_customer(
        self,
        token: str,
        customer: dict[str, Any] | None = None,
        items: Iterable[dict[str, Any]] | int = (),
        **customer_kwargs: Any,
    ) -> dict[str, Any]:
        """Register `token` for `customer` (generated when None) with `items`
        (dicts, or a number of generated active "vip" items). Returns the customer."""
        if customer is None:
            customer = self.make_customer(**customer_kwargs)
        account = _Account(token=token, customer=customer)
        self._accounts[token] = account
        if isinstance(items, int):
            self.add_items(token, items)
        else:
            account.items.extend(items)
            account.resort()
        return customer

    def add_item(
        self, token: str, item: dict[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Add one item (generated from kwargs when None); returns it."""
        account = self._account(token)
        if item is None:
            item = self.make_item(account.customer["id"], **kwargs)
        item_id = int(item["id"])
        if account.ids and item_id > account.ids[-1]:
            account.items.append(item)
            account.ids.append(item_id)
            if account.item_bodies is not None:
                account.item_bodies.append(_dumps(item))
            account.pages.clear()
        else:
            account.items.append(item)
            account.resort()
        return item

    def add_items(self, token: str, count: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Add `count` generated items, one second apart, ending an hour ago."""
        start = kwargs.pop("added_at", None) or datetime.now(UTC) - timedelta(
            hours=1, seconds=count
        )
        return [
            self.add_item(
                token, added_at=start + timedelta(seconds=i, microseconds=659206), **kwargs
            )
            for i in range(count)
        ]

    def populate(
        self,
        customers: int,
        items_per_customer: int = 5,
        *,
        platform: str = "minecraft",
        products: tuple[str, ...] = ("vip",),
        token_prefix: str = "tok",
        serialize: bool = True,
    ) -> list[str]:
        """Bulk-add customers with active items (for benchmarks); returns the tokens.

        With `serialize`, the JSON bodies are built now rather than on first request.
        """
        tokens = []
        base = datetime.now(UTC) - timedelta(days=10)
        for n in range(customers):
            token = f"{token_prefix}{n:06d}_{secrets.token_hex(8)}"
            customer = self.make_customer(platform=platform, created_at=base)
            cid = customer["id"]
            items = [
                self.make_item(
                    cid,
                    product=products[i % len(products)],
                    added_at=base + timedelta(seconds=i + 1),
                    quantity_index=0,
                )
                for i in range(items_per_customer)
            ]
            self.add_customer(token, customer, items)
            if serialize:
                account = self._accounts[token]
                account.customer_body = _dumps(customer)
                account.bodies()
            tokens.append(token)
        return tokens

    def set_state(
        self,
        token: str,
        item_id: str,
        state: str,
        revoke_reason: str | None = None,
        *,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Move an item to `state`, filling active_at/expires_at/removed_at/revoked_at."""
        account = self._account(token)
        item = self._item(account, item_id)
        _apply_state(item, state, revoke_reason, at or datetime.now(UTC))
        account.items_changed()
        return item

    def update_item(self, token: str, item_id: str, **fields: Any) -> dict[str, Any]:
        account = self._account(token)
        item = self._item(account, item_id)
        item.update(fields)
        if "id" in fields:
            account.resort()
        account.items_changed()
        return item

    def update_customer(self, token: str, **fields: Any) -> dict[str, Any]:
        account = self._account(token)
        account.customer.update(fields)
        account.customer_body = None
        return account.customer

    def remove_item(self, token: str, item_id: str) -> None:
        account = self._account(token)
        account.items.remove(self._item(account, item_id))
        account.resort()

    def remove_customer(self, token: str) -> None:
        del self._accounts[token]

    def customer(self, token: str) -> dict[str, Any]:
        return self._account(token).customer

    def items(self, token: str) -> list[dict[str, Any]]:
        """The token's items, ascending by id (the stored dicts themselves)."""
        return list(self._account(token).items)

    @property
    def tokens(self) -> list[str]:
        return list(self._accounts)

    def _account(self, token: str) -> _Account:
        try:
            return self._accounts[token]
        except KeyError:
            raise KeyError("unknown token") from None

    @staticmethod
    def _item(account: _Account, item_id: str) -> dict[str, Any]:
        for item in account.items:
            if item["id"] == str(item_id):
                return item
        raise KeyError(f"no item {item_id}")

    # ------------------------------------------------------------------ faults

    def fault(
        self,
        token: str | None,
        kind: str,
        *,
        times: int | None = 1,
        path: str | None = None,
        page: int | None = None,
        request: int | None = None,
        status: int | None = None,
        retry_after: float | str | None = None,
        delay: float | None = None,
        body: bytes | str | None = None,
        content_type: str = "application/json",
        field: str | None = None,
        message: str | None = None,
    ) -> Fault:
        """Queue a fault for `token` (None: any request). See FAULT_KINDS."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if path is not None:
            path = PATH_ALIASES.get(path, path)
        if isinstance(body, str):
            body = body.encode()
        if retry_after is not None and not isinstance(retry_after, str):
            retry_after = f"{retry_after:g}"
        fault = Fault(
            kind=kind,
            token=token,
            times=times,
            path=path,
            page=page,
            request=request,
            status=status,
            retry_after=retry_after,
            delay=delay,
            body=body,
            content_type=content_type,
            field=field,
            message=message,
        )
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def pending_faults(self) -> list[Fault]:
        return [f for f in self._faults if f.times is None or f.used < f.times]

    def _take_fault(self, token: str | None, path: str, page: int | None) -> Fault | None:
        if not self._faults:
            return None
        for fault in self._faults:
            if fault.times is not None and fault.used >= fault.times:
                continue
            if fault.token is not None and fault.token != token:
                continue
            if fault.path is not None and fault.path != path:
                continue
            if fault.page is not None and fault.page != page:
                continue
            if fault.request is not None:
                n = (
                    self.requests_by_path_token[(path, token)]
                    if fault.path is not None
                    else self.requests_by_token[token]
                )
                if n != fault.request:
                    continue
            fault.used += 1
            return fault
        return None

    # ---------------------------------------------------------------- counters

    def count(self, path: str | None = None, token: str | None = None) -> int:
        """Requests received, optionally only to `path` ("customer"/"items") and/or by `token`."""
        if path is not None:
            path = PATH_ALIASES.get(path, path)
            if token is None:
                return self.requests_by_path[path]
            return self.requests_by_path_token[(path, token)]
        if token is not None:
            return self.requests_by_token[token]
        return sum(self.requests_by_path.values())

    def requests(self, path: str | None = None, token: str | None = None) -> list[RequestRecord]:
        path = PATH_ALIASES.get(path, path) if path is not None else None
        return [
            r
            for r in self.log
            if (path is None or r.path == path) and (token is None or r.token == token)
        ]

    def reset_counters(self) -> None:
        self.requests_by_path.clear()
        self.requests_by_token.clear()
        self.requests_by_path_token.clear()
        self.log.clear()

    # ---------------------------------------------------------------- handlers

    def _record(self, request: web.Request, token: str | None, page: int | None) -> RequestRecord:
        path = request.path
        self.requests_by_path[path] += 1
        self.requests_by_token[token] += 1
        self.requests_by_path_token[(path, token)] += 1
        record = RequestRecord(
            time=time.monotonic(),
            method=request.method,
            path=path,
            query=dict(request.query),
            token=token,
            user_agent=request.headers.get("User-Agent"),
            page=page,
        )
        if self.keep_log:
            self.log.append(record)
        return record

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body: dict[str, Any] = {
            "status": status,
            "code": code,
            "message": message,
            "trace_id": f"{next(self._trace):032x}",
        }
        if errors is not None:
            body["errors"] = errors
        return web.Response(
            status=status, body=_dumps(body), content_type="application/json", headers=headers
        )

    @staticmethod
    def _token(request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "customer" or not token:
            return None
        return token

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        self._record(request, self._token(request), None).status = 404
        return self._error(404, "not-found", f"no route for {request.method} {request.path}")

    async def _handle_customer(self, request: web.Request) -> web.StreamResponse:
        token = self._token(request)
        record = self._record(request, token, None)
        fault = self._take_fault(token, CUSTOMER_PATH, None)
        account = self._accounts.get(token) if token is not None else None
        if fault is not None:
            record.fault = fault.kind
            response = await self._apply_fault(request, fault, account, None, record)
            if response is not None:
                return response
        if account is None:
            record.status = 401
            return self._unauthorized(token)
        if account.customer_body is None:
            account.customer_body = _dumps(account.customer)
        record.status = 200
        return web.Response(body=account.customer_body, content_type="application/json")

    async def _handle_items(self, request: web.Request) -> web.StreamResponse:
        token = self._token(request)
        try:
            limit, after, before, asc = self._parse_query(request)
        except _Reject as reject:
            record = self._record(request, token, None)
            record.status = reject.response.status
            return reject.response
        account = self._accounts.get(token) if token is not None else None
        ids = account.ids if account is not None else []
        # Which page is this (by cursor position)? Used to target faults.
        if asc:
            start = bisect.bisect_right(ids, after) if after is not None else 0
            page = start // limit + 1
        else:
            end = bisect.bisect_left(ids, before) if before is not None else len(ids)
            page = (len(ids) - end) // limit + 1
        record = self._record(request, token, page)
        fault = self._take_fault(token, ITEMS_PATH, page)
        if fault is not None:
            record.fault = fault.kind
            if fault.kind == "repeat_page":
                after = before = None
            response = await self._apply_fault(
                request, fault, account, (limit, after, before, asc), record
            )
            if response is not None:
                return response
        if account is None:
            record.status = 401
            return self._unauthorized(token)
        record.status = 200
        return web.Response(
            body=self._page_body(account, limit, after, before, asc, fault),
            content_type="application/json",
        )

    def _unauthorized(self, token: str | None) -> web.Response:
        if token is None:
            return self._error(401, "unauthorized", "missing or malformed customer authorization")
        return self._error(401, "unauthorized", "invalid customer token")

    def _parse_query(self, request: web.Request) -> tuple[int, int | None, int | None, bool]:
        query = request.query
        errors: list[dict[str, Any]] = []

        def bad(name: str, message: str) -> None:
            errors.append(
                {"code": "invalid", "message": message, "path": name, "validation": "query"}
            )

        limit = self.default_limit
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                bad("limit", "limit must be an integer")
            else:
                if not 1 <= limit <= MAX_LIMIT:
                    bad("limit", f"limit must be between 1 and {MAX_LIMIT}")
        cursors: dict[str, int | None] = {"after": None, "before": None}
        for name in cursors:
            value = query.get(name)
            if value is None or value in ("", "null"):
                continue
            if not value.isascii() or not value.isdigit() or len(value) > 20:
                bad(name, f"{name} must be a flake id")
            else:
                cursors[name] = int(value)
        asc = self.default_asc
        if "asc" in query:
            text = query["asc"].lower()
            if text in ("true", "1"):
                asc = True
            elif text in ("false", "0"):
                asc = False
            else:
                bad("asc", "asc must be true or false")
        if errors:
            raise _Reject(self._error(400, "validation-error", errors[0]["message"], errors=errors))
        return limit, cursors["after"], cursors["before"], asc

    def _page_body(
        self,
        account: _Account,
        limit: int,
        after: int | None,
        before: int | None,
        asc: bool,
        fault: Fault | None,
    ) -> bytes:
        if fault is None:
            key = (limit, after, before, asc)
            cached = account.pages.get(key)
            if cached is None:
                cached = account.pages[key] = self._page_body(account, *key, _NO_FAULT)
            return cached
        bodies = account.bodies()
        ids = account.ids
        lo = bisect.bisect_right(ids, after) if after is not None else 0
        hi = bisect.bisect_left(ids, before) if before is not None else len(ids)
        chosen = bodies[lo : min(hi, lo + limit)] if asc else bodies[max(lo, hi - limit) : hi][::-1]
        if fault.kind == "reverse_page":
            chosen = chosen[::-1]
        elif fault.kind == "duplicate_item" and len(chosen) >= 2:
            chosen = [chosen[0], chosen[0], *chosen[2:]]
        return b"[" + b",".join(chosen) + b"]"

    def _normal_body(
        self,
        account: _Account | None,
        page_args: tuple[int, int | None, int | None, bool] | None,
    ) -> bytes:
        if account is None:
            return b"[]" if page_args is not None else b"{}"
        if page_args is None:
            return _dumps(account.customer)
        return self._page_body(account, *page_args, None)

    async def _apply_fault(
        self,
        request: web.Request,
        fault: Fault,
        account: _Account | None,
        page_args: tuple[int, int | None, int | None, bool] | None,
        record: RequestRecord,
    ) -> web.StreamResponse | None:
        """The faulty response, or None to continue normally (possibly altered)."""
        kind = fault.kind
        status = fault.status
        if kind in ("status", "rate_limit"):
            status = status or (429 if kind == "rate_limit" else 500)
            headers = {}
            if kind == "rate_limit" or fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after or "1"
            record.status = status
            if fault.body is not None:
                return web.Response(
                    status=status,
                    body=fault.body,
                    content_type=fault.content_type,
                    headers=headers,
                )
            code = {
                400: "bad-request",
                401: "unauthorized",
                403: "forbidden",
                404: "not-found",
                429: "too-many-requests",
            }.get(status, "internal-server-error" if status >= 500 else "error")
            return self._error(
                status, code, fault.message or f"fake fault: HTTP {status}", headers=headers
            )
        if kind == "status_empty":
            record.status = status or 500
            return web.Response(status=record.status)
        if kind == "status_text":
            record.status = status or 502
            return web.Response(
                status=record.status,
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if kind == "body":
            record.status = status or 200
            return web.Response(
                status=record.status, body=fault.body or b"", content_type=fault.content_type
            )
        if kind == "gzip_body":
            record.status = status or 200
            return web.Response(
                status=record.status,
                body=gzip.compress(fault.body or b"", compresslevel=9),
                content_type=fault.content_type,
                headers={"Content-Encoding": "gzip"},
            )
        if kind == "endless":
            record.status = status or 200
            await self._endless(request, record.status, fault)
        if kind == "malformed":
            record.status = 200
            body = b'[{"id": "1",, ]' if page_args is not None else b'{"id": "1",, }'
            return web.Response(body=body, content_type="application/json")
        if kind == "wrong_shape":
            record.status = 200
            normal = json.loads(self._normal_body(account, page_args))
            shaped = {"items": normal} if page_args is not None else [normal]
            return web.Response(body=_dumps(shaped), content_type="application/json")
        if kind == "missing_field":
            record.status = 200
            normal = json.loads(self._normal_body(account, page_args))
            if page_args is not None:
                if normal:
                    normal[0].pop(fault.field or "state", None)
            else:
                normal.pop(fault.field or "id", None)
            return web.Response(body=_dumps(normal), content_type="application/json")
        if kind == "truncated":
            record.status = 200
            full = self._normal_body(account, page_args)
            return web.Response(
                body=full[: max(1, len(full) // 2)], content_type="application/json"
            )
        if kind == "reset":
            record.status = 0
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to send on this connection
        if kind == "disconnect":
            record.status = 0
            full = self._normal_body(account, page_args)
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(full)
            await response.prepare(request)
            await response.write(full[: max(1, len(full) // 2)])
            await asyncio.sleep(0.01)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if kind == "stall":
            await self._sleep(fault.delay)
            return None
        if kind == "stall_body":
            record.status = 200
            full = self._normal_body(account, page_args)
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(full)
            await response.prepare(request)
            half = max(1, len(full) // 2)
            await response.write(full[:half])
            await self._sleep(fault.delay)
            try:
                await response.write(full[half:])
                await response.write_eof()
            except ConnectionError:  # the client gave up (timed out) meanwhile
                raise asyncio.CancelledError from None
            return response
        # repeat_page / reverse_page / duplicate_item alter the normal answer.
        return None

    async def _endless(self, request: web.Request, status: int, fault: Fault) -> NoReturn:
        """Stream a body that never ends, until the client hangs up or stop()."""
        response = web.StreamResponse(status=status)
        response.content_type = fault.content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * 65536
        closing = self._closing
        try:
            await response.write(fault.body or b"[")
            while closing is None or not closing.is_set():
                await response.write(chunk)
                self.endless_bytes_sent += len(chunk)
        except ConnectionError:
            pass
        raise asyncio.CancelledError  # nothing more to send on this connection

    async def _sleep(self, delay: float | None) -> None:
        closing = self._closing
        if closing is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), delay)


def _apply_state(item: dict[str, Any], state: str, revoke_reason: str | None, at: datetime) -> None:
    item["state"] = state
    if state == "usable":
        for key in ("active_at", "expires_at", "removed_at", "revoked_at", "revoke_reason"):
            item[key] = None
        return
    if state in ("active", "renewed", "used", "revoked") and item.get("active_at") is None:
        item["active_at"] = iso(at)
    if state in ("active", "renewed"):
        item["removed_at"] = item["revoked_at"] = item["revoke_reason"] = None
        if item.get("expirable"):
            item["expires_at"] = iso(at + timedelta(days=30))
    elif state == "used":
        item["removed_at"] = iso(at)
        if item.get("expirable") and item.get("expires_at") is None:
            item["expires_at"] = iso(at)
    elif state == "revoked":
        item["revoked_at"] = iso(at)
        item["revoke_reason"] = revoke_reason or "admin"


# ------------------------------------------------------------------- standalone


async def _serve(args: argparse.Namespace) -> None:
    fake = FakePayNow()
    tokens = fake.populate(
        args.customers, args.items, platform=args.platform, products=tuple(args.products)
    )
    await fake.start(args.host, args.port)
    print(f"fake PayNow Storefront API on {fake.url}", flush=True)
    for token in tokens[: args.show]:
        print(f"  Authorization: Customer {token}", flush=True)
    if len(tokens) > args.show:
        print(f"  ... and {len(tokens) - args.show} more", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--customers", type=int, default=3)
    parser.add_argument("--items", type=int, default=5, help="items per customer")
    parser.add_argument(
        "--platform", default="both", choices=["minecraft", "steam", "both", "none"]
    )
    parser.add_argument("--products", nargs="+", default=["vip"])
    parser.add_argument("--show", type=int, default=20, help="tokens to print")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
