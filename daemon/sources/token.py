"""Token mode: each linked customer polled with its own Storefront token.

A poll reads the customer and every inventory page and hands the whole
inventory to `Applier.apply` as a complete answer.

**Unchanged answers.** Per link the store keeps a digest of the answers the
last applied poll acted on: 16 bytes of the customer's body, then 16 bytes
keyed by the settings (`settings_key`) of that and every inventory page. A
poll whose bodies give the same digest would change nothing, so its answers
are neither decoded nor validated nor diffed: only its sync time is
recorded, in batches (`flush_unchanged`). The settings key makes every
digest mismatch once `products` or the servers' platforms change what the
same answers mean; a commit for the customer that was not this link's poll
(local expiry) drops its digest.

In the service most polls read only the inventory (`cache_customers`): the
customer's part of the stored digest stands in for the customer's body, which
is read again whenever the inventory changed and at least every
`CUSTOMER_REFRESH_POLLS` polls (a newly linked account changes where perks go).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime

from daemon.apply import Applier
from daemon.clock import Clock
from daemon.config import CustomerLink, Settings
from daemon.paynow import InventoryPages, PayNowAuthError, PayNowError, StorefrontClient
from daemon.report import PassReport
from daemon.sources import Answer
from daemon.state import LinkSync, Store, StoreError, StoreWriteError
from daemon.telemetry import Telemetry

log = logging.getLogger(__name__)

# A link's customer is read again at least every this many polls.
CUSTOMER_REFRESH_POLLS = 10

# Part of every answers digest: a version whose diff or stored state differs
# must not trust the digests an older one stored. Bump it when they change.
DIGEST_VERSION = b"perksync answers digest 2"

# Unchanged polls' sync times are written this many at a time (one transaction).
UNCHANGED_BATCH = 1000


def settings_key(settings: Settings) -> bytes:
    """What of the settings decides a poll's outcome besides the API's answers:
    the products (which servers, which commands) and the servers' platforms
    and PayNow game-server ids."""
    products = {slug: spec.model_dump(mode="json") for slug, spec in settings.products.items()}
    servers = {
        name: [server.platform, server.paynow_gameserver_id]
        for name, server in settings.servers.items()
    }
    text = json.dumps([products, servers], sort_keys=True)
    return hashlib.blake2b(DIGEST_VERSION + text.encode(), digest_size=32).digest()


def customer_digest(body: bytes) -> bytes:
    """16 bytes: the customer's answer, byte for byte."""
    return hashlib.blake2b(body, digest_size=16).digest()


def answers_digest(key: bytes, customer: bytes, inventory: InventoryPages) -> bytes:
    """The 32 bytes stored per link: the customer's digest, then a digest keyed
    by the settings of that and every inventory page."""
    digest = hashlib.blake2b(customer, digest_size=16, key=key)
    for body in inventory.bodies:
        digest.update(len(body).to_bytes(8, "big"))
        digest.update(body)
    return customer + digest.digest()


def _unchanged_test(
    key: bytes, customer: bytes, stored: bytes | None
) -> Callable[[InventoryPages], bool] | None:
    """The `unchanged` test of `StorefrontClient.read_inventory` for one poll."""
    if stored is None:
        return None
    return lambda pages: answers_digest(key, customer, pages) == stored


class TokenSource:
    """Polls linked customers; hands changed inventories to the applier."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: StorefrontClient,
        applier: Applier,
        *,
        clock: Clock,
        report: PassReport,
        telemetry: Telemetry,
        cache_customers: bool = False,
    ) -> None:
        self.store = store
        self.client = client
        self.applier = applier
        self.clock = clock
        self.report = report
        self.telemetry = telemetry
        self.auth_failures: set[str] = set()  # labels whose token PayNow rejects (logged once)
        self._reads_left: dict[str, int] | None = {} if cache_customers else None
        self._digests: dict[str, bytes] | None = None  # label → stored; loaded at the first poll
        self._labels: dict[str, set[str]] = {}  # customer id → labels of its links
        self._unchanged: dict[str, datetime] = {}  # sync times not yet written
        self.use_settings(settings)
        applier.on_unlinked_commit = self._forget_customer

    def use_settings(self, settings: Settings) -> None:
        """A reload. If it changed what answers mean, no stored digest matches
        any more, and every link's next poll reads and diffs everything."""
        self.settings = settings
        self._key = settings_key(settings)

    async def poll(self, index: int, link: CustomerLink) -> bool:
        """Poll one linked customer; False if its inventory could not be read."""
        label = link.describe(index)
        token = link.secret.get_secret_value()
        if self._digests is None:
            await self._load_links()
        assert self._digests is not None
        stored = self._digests.get(label)
        reads_left = self._reads_left
        client = self.client
        key = self._key
        read_at = self.clock.now()
        try:
            inventory: InventoryPages | None = None
            if reads_left is not None and stored is not None and reads_left.get(label, 1) > 0:
                # The usual service poll: the inventory alone tells whether
                # anything changed; only then is the customer read again.
                inventory = await client.read_inventory(
                    token, _unchanged_test(key, stored[:16], stored)
                )
                if inventory.unchanged:
                    reads_left[label] = reads_left.get(label, CUSTOMER_REFRESH_POLLS) - 1
                    await self._record_unchanged(label)
                    return True
            customer_body = await client.read_customer(token)
            customer_part = customer_digest(customer_body)
            if inventory is None:
                unchanged = _unchanged_test(key, customer_part, stored)
                inventory = await client.read_inventory(token, unchanged)
            digest = answers_digest(key, customer_part, inventory)
            if digest != stored:
                customer = client.parse_customer(token, customer_body)
                items = client.inventory_items(token, inventory)
        except PayNowError as exc:
            await self._failed(label, exc)
            return False
        self.auth_failures.discard(label)
        if digest == stored:
            await self._record_unchanged(label)
        elif not await self._apply(label, Answer(customer, items, True, read_at), digest):
            return False
        if reads_left is not None:
            reads_left[label] = CUSTOMER_REFRESH_POLLS
        return True

    async def _apply(self, label: str, answer: Answer, digest: bytes) -> bool:
        self._unchanged.pop(label, None)  # superseded by what is written now
        try:
            await self.applier.apply(answer, label=label, link=LinkSync(label, digest))
        except StoreWriteError:
            raise  # not this customer's fault: nothing more can be recorded
        except Exception as exc:  # one broken customer never stops the others
            log.exception("customer %s: unexpected error; nothing changed for this customer", label)
            self._poll_failed(label, "unexpected", f"unexpected error: {exc.__class__.__name__}")
            return False
        assert self._digests is not None
        self._digests[label] = digest
        self._labels.setdefault(answer.customer.id, set()).add(label)
        self._poll_ok(label)
        return True

    async def _failed(self, label: str, exc: PayNowError) -> None:
        self._poll_failed(label, exc.kind, str(exc))
        if isinstance(exc, PayNowAuthError) and label in self.auth_failures:
            log.debug("customer %s: %s (still)", label, exc)
        else:
            log.error("customer %s: %s; nothing changed for this customer", label, exc)
        if isinstance(exc, PayNowAuthError):
            self.auth_failures.add(label)
        self._unchanged.pop(label, None)  # the error is the newer news
        await self.store.record_link_error(label, str(exc), self.clock.now())

    async def _load_links(self) -> None:
        self._digests = await self.store.link_digests()
        for status in await self.store.links():
            if status.customer_id is not None:
                self._labels.setdefault(status.customer_id, set()).add(status.label)

    def _forget_customer(self, customer_id: str) -> None:
        """The store dropped the digests of this customer's links (a commit
        that was not their poll): drop ours too."""
        if self._digests is not None:
            for label in self._labels.get(customer_id, ()):
                self._digests.pop(label, None)

    async def _record_unchanged(self, label: str) -> None:
        self._unchanged[label] = self.clock.now()
        self._poll_ok(label)
        if len(self._unchanged) >= UNCHANGED_BATCH:
            await self.flush_unchanged()

    async def flush_unchanged(self) -> None:
        """Write the sync times of unchanged polls. They are only what
        `perksync status` shows, so a crash before this loses no perk, and a
        failure is logged, not raised (but for `StoreWriteError`: the database
        cannot be written at all)."""
        if not self._unchanged:
            return
        synced, self._unchanged = self._unchanged, {}
        try:
            await self.store.record_unchanged(synced)
        except StoreWriteError:
            raise
        except StoreError as exc:
            log.warning("cannot record the sync time of %d customers: %s", len(synced), exc)

    def _poll_ok(self, label: str) -> None:
        self.report.polls_ok += 1
        self.report.customers_failed.pop(label, None)
        self.telemetry.poll_succeeded(label, self.clock.now().timestamp())

    def _poll_failed(self, label: str, kind: str, error: str) -> None:
        self.report.polls_failed += 1
        self.report.customers_failed[label] = error
        self.telemetry.poll_failed(label, kind)
