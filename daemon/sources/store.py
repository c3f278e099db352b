"""Store mode: every customer of the store, through one Management API key.

Three reads, each handing `Answer`s to the applier:

- **New items** (`read_new_items`, every `sync.new_items_seconds`): the
  store's items after the highest id seen so far, ascending, so a purchase
  costs one request per period whatever the store's size. Ids may become
  visible slightly out of order, so each read starts
  `sync.new_items_overlap_seconds` before the newest seen (ids are flakes:
  milliseconds << 22); items seen again change nothing. With no cursor
  stored it starts at the store's newest item: older ones are known through
  the snapshot, and a first start never pages through the store's history.
- **Snapshot** (`snapshot`, every `sync.interval_seconds`): what
  `activeOnly=true` lists. Items and embedded customers that match what the
  store holds are not validated or applied again. An item held live that a
  complete snapshot lacks is looked up through its customer's items before
  anything is taken back: absence alone never expires or revokes. At most
  one look-up per customer per snapshot; an item a look-up found live is not
  looked up again for `CONFIRMED_SNAPSHOTS` snapshots; one missing from both
  stays granted, and is logged, counted and shown by `status`.
- **Look-up** (`look_up`): one customer's items, every state, applied as a
  complete answer. Webhooks ask for one (or, with no customer, for a
  new-items read and a snapshot at once).

A read that fails anywhere (any page) applies nothing and returns False.
An item that fails validation fails only its customer: none of that
customer's items in the read are applied (the read returns False), the
others are, and the cursor moves on (the snapshot delivers the customer's
live items once PayNow sends them whole).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from daemon.apply import Applier, customer_fingerprint, describe_customer
from daemon.clock import Clock
from daemon.models import parse_timestamp
from daemon.paynow import ManagementClient, PayNowBadResponse, PayNowError, PayNowNotFound
from daemon.paynow.parse import StoreItem, store_item
from daemon.report import PassReport
from daemon.sources import Answer
from daemon.state import LiveBaseline, Store, StoreWriteError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

CURSOR: Final = "store.new_items_cursor"  # the highest item id a new-items read applied
LAST_NEW_ITEMS: Final = "store.last_new_items_at"
LAST_SNAPSHOT: Final = "store.last_snapshot_at"
LAST_WEBHOOK: Final = "store.last_webhook_at"
MISSING: Final = "store.missing_items"  # JSON: items held live that PayNow no longer lists
CONFIRMED_SNAPSHOTS: Final = 10  # snapshots an item a look-up found live is not looked up
MISSING_SHOWN: Final = 50  # item ids kept for `status` (the count is exact)
FLAKE_TIME_SHIFT: Final = 22  # a flake is milliseconds since PayNow's epoch << 22


@dataclass(slots=True)
class _Customers:
    """The items a read found, grouped by customer (first seen first), and
    the customers none of whose items it applies (one failed validation)."""

    groups: dict[str, list[StoreItem]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # customer id → why

    def add(self, found: StoreItem) -> None:
        self.groups.setdefault(found.customer.id, []).append(found)

    def take(self, raw: Any, what: str) -> None:
        """Validate a listed item and add it. One that fails validation fails
        its customer; only one that names no customer clearly fails the read."""
        try:
            self.add(store_item(raw, what))
        except PayNowBadResponse as exc:
            owner = _owner(raw)
            if owner is None:
                raise
            self.broken.setdefault(owner, str(exc))


def overlap_cursor(cursor: str, overlap_seconds: float) -> int:
    """The id a new-items read starts after: `overlap_seconds` before `cursor`."""
    return max(0, int(cursor) - (int(overlap_seconds * 1000) << FLAKE_TIME_SHIFT))


class StoreSource:
    """Reads a whole store and hands what changed to the applier."""

    def __init__(
        self,
        store: Store,
        client: ManagementClient,
        applier: Applier,
        *,
        clock: Clock,
        report: PassReport,
        telemetry: Telemetry,
    ) -> None:
        self.store = store
        self.client = client
        self.applier = applier
        self.clock = clock
        self.report = report
        self.telemetry = telemetry
        self.snapshots = 0  # complete snapshots taken by this process
        self._confirmed: dict[str, int] = {}  # item id → snapshot number it was found live at

    # --- new items --------------------------------------------------------------

    async def read_new_items(self) -> bool:
        """Read and apply the items added since the cursor; False if incomplete."""
        read_at = self.clock.now()
        try:
            cursor = await self.store.get_meta(CURSOR)
            if cursor is None:
                return await self._start_cursor(read_at)
            after = overlap_cursor(cursor, self.applier.settings.sync.new_items_overlap_seconds)
            found = _Customers()
            highest = int(cursor)
            async for page in self.client.store_item_pages(after):
                for index, raw in enumerate(page):
                    found.take(raw, f"new item {index} after {after}")
                    highest = max(highest, int(raw["id"]))  # checked by the client
        except PayNowError as exc:
            self._read_failed("new_items", "new items", exc)
            return False
        if not await self._apply_all(found, read_at, complete=False):
            return False
        await self.store.set_meta(
            {CURSOR: str(highest), LAST_NEW_ITEMS: read_at.isoformat(timespec="seconds")}
        )
        self._read_ok("new_items")
        return self._none_broken(found, "these new items")

    async def _start_cursor(self, read_at: datetime) -> bool:
        newest = await self.client.newest_item_id()
        cursor = newest or "0"
        log.info(
            "store mode: new items are read from item %s on (older ones are known "
            "through the snapshot)", cursor,
        )  # fmt: skip
        await self.store.set_meta(
            {CURSOR: cursor, LAST_NEW_ITEMS: read_at.isoformat(timespec="seconds")}
        )
        self._read_ok("new_items")
        return True

    # --- snapshot -----------------------------------------------------------------

    async def snapshot(self) -> bool:
        """Read every live item, apply what changed, look up what went missing;
        False if the snapshot (or a look-up it called for) was incomplete."""
        read_at = self.clock.now()
        try:
            baseline = await self.store.live_baseline()
            listed: set[str] = set()
            changed = _Customers()
            async for page in self.client.store_item_pages(active_only=True):
                for index, raw in enumerate(page):
                    listed.add(str(raw["id"]))
                    if not _matches(baseline, raw):
                        changed.take(raw, f"live item {index} of the snapshot")
        except PayNowError as exc:
            self._read_failed("snapshot", "snapshot", exc)
            return False
        self.snapshots += 1
        look_ups = self._look_ups_due(baseline, listed)
        complete = await self._apply_all(changed, read_at, complete=False, skip=look_ups)
        complete = self._none_broken(changed, "the snapshot") and complete
        missing: list[str] = []
        for customer_id, item_ids in look_ups.items():
            found = await self.look_up(customer_id, why="items missing from the snapshot")
            if found is None:
                complete = False
                continue
            for item_id in item_ids:
                if item_id in found:
                    self._confirmed[item_id] = self.snapshots
                else:
                    missing.append(item_id)
        await self._record_missing(missing, read_at)
        if complete:
            self._read_ok("snapshot")
        return complete

    def _look_ups_due(self, baseline: LiveBaseline, listed: set[str]) -> dict[str, list[str]]:
        """Customer id → its items held live that the snapshot lacks (and that
        no look-up found live within the last `CONFIRMED_SNAPSHOTS` snapshots)."""
        due: dict[str, list[str]] = {}
        for item_id, live in baseline.items.items():
            if item_id in listed:
                continue
            confirmed = self._confirmed.get(item_id)
            if confirmed is not None and self.snapshots - confirmed < CONFIRMED_SNAPSHOTS:
                continue
            due.setdefault(live.customer_id, []).append(item_id)
        return due

    async def _record_missing(self, missing: Sequence[str], at: datetime) -> None:
        if missing:
            log.warning(
                "%d item%s held live %s listed neither in the snapshot nor among their "
                "customer's items (first: %s); they stay granted",
                len(missing), "" if len(missing) == 1 else "s",
                "is" if len(missing) == 1 else "are", ", ".join(missing[:5]),
            )  # fmt: skip
        self.telemetry.items_missing(len(missing))
        value = json.dumps({"count": len(missing), "items": list(missing[:MISSING_SHOWN])})
        await self.store.set_meta({MISSING: value, LAST_SNAPSHOT: at.isoformat(timespec="seconds")})

    # --- look-up -------------------------------------------------------------------

    async def look_up(self, customer_id: str, *, why: str) -> set[str] | None:
        """Read one customer's items (every state) and apply them as a complete
        answer; the ids it listed, or None if the read failed."""
        read_at = self.clock.now()
        items: list[StoreItem] = []
        try:
            async for page in self.client.customer_item_pages(customer_id):
                for index, raw in enumerate(page):
                    items.append(store_item(raw, f"item {index} of customer {customer_id}"))
        except PayNowNotFound:
            # PayNow knows no such customer (any more): it lists none of its
            # items, which stay as they are (held live ones are "missing").
            log.warning("store mode: PayNow knows no customer %s (%s)", customer_id, why)
            self._read_ok("look_up")
            return set()
        except PayNowError as exc:
            self._read_failed("look_up", f"look-up of customer {customer_id} ({why})", exc)
            return None
        # Only the customer's own: were a gift it bought listed too, it is the
        # recipient's, and goes with the recipient's reads.
        own = [one for one in items if one.customer.id == customer_id]
        found = _Customers({customer_id: own} if own else {})
        if not await self._apply_all(found, read_at, complete=True):
            return None
        self._read_ok("look_up")
        return {one.item.id for one in own}

    # --- applying -------------------------------------------------------------------

    async def _apply_all(
        self,
        found: _Customers,
        read_at: datetime,
        *,
        complete: bool,
        skip: dict[str, Any] | None = None,
    ) -> bool:
        """Apply each customer's items; False if any customer failed (the
        others are applied: one broken customer never stops the others)."""
        ok = True
        for customer_id, items in found.groups.items():
            if customer_id in found.broken:
                continue  # see _none_broken
            if skip and customer_id in skip:
                continue  # its look-up reads and applies everything
            customer = items[-1].customer  # the newest item's embedded customer
            answer = Answer(customer, [i.item for i in items], complete, read_at)
            label = describe_customer(customer)
            try:
                await self.applier.apply(answer, label=label)
            except StoreWriteError:
                raise  # not this customer's fault: nothing more can be recorded
            except Exception as exc:
                log.exception("customer %s: unexpected error; nothing changed for it", label)
                self.report.customers_failed[label] = f"unexpected error: {type(exc).__name__}"
                ok = False
        return ok

    def _none_broken(self, found: _Customers, read: str) -> bool:
        """Report the customers the read left out for a malformed item; True if none."""
        for customer_id, error in found.broken.items():
            label = self.applier.names.get(customer_id, customer_id)
            log.error("customer %s: %s; none of its items in %s applied", label, error, read)
            self.report.customers_failed[label] = error
        return not found.broken

    def _read_ok(self, read: str) -> None:
        self.report.polls_ok += 1
        self.telemetry.store_read(read, None, self.clock.now().timestamp())

    def _read_failed(self, read: str, what: str, exc: PayNowError) -> None:
        log.error("store mode: %s failed: %s; nothing changed", what, exc)
        self.report.polls_failed += 1
        self.report.customers_failed[what] = str(exc)
        self.telemetry.store_read(read, exc.kind, self.clock.now().timestamp())


def _owner(raw: Any) -> str | None:
    """The id of the customer a listed item (not validated) belongs to, if
    its `customer_id` and embedded `customer` agree on one."""
    if not isinstance(raw, dict):
        return None
    embedded = raw.get("customer")
    named = {raw.get("customer_id"), embedded.get("id") if isinstance(embedded, dict) else None}
    texts = {str(v) for v in named if isinstance(v, str | int) and not isinstance(v, bool)}
    if len(texts) != 1:
        return None
    text = texts.pop()
    return text if 0 < len(text) <= 20 and text.isascii() and text.isdigit() else None


def _matches(baseline: LiveBaseline, raw: Any) -> bool:
    """Whether a snapshot's item (not yet validated) says what the store holds:
    same state and expiry, same embedded customer. Anything odd is no match
    (it is then validated, and refused there if it must be)."""
    try:
        live = baseline.items.get(str(raw["id"]))
        if live is None or live.state != raw["state"]:
            return False
        stamp = raw.get("override_expires_at") or raw.get("expires_at")
        if (parse_timestamp(stamp) if stamp else None) != live.expires_at:
            return False
        customer = raw["customer"]
        stored = baseline.customers.get(str(customer["id"]))
        return stored == customer_fingerprint(json.dumps(customer, separators=(",", ":")))
    except (KeyError, TypeError, ValueError):
        return False
