"""Store mode's webhooks: PayNow says where to look, the API read is the truth.

`POST /paynow/webhook` (on `http.listen`) counts only when `PayNow-Signature`
is the HMAC-SHA256, keyed by the webhook secret, of
`<PayNow-Timestamp>.<raw body>` (hex or base64), and the timestamp (Unix
milliseconds) is within `WINDOW_SECONDS` of now; anything else is answered
401 and changes nothing. A good request is answered 2xx at once:

- an `event_id` already accepted (PayNow retries when our answer was lost)
  is acknowledged and does nothing more; ids are remembered in the state
  database for `REMEMBER_SECONDS`, so across restarts too;
- an `ON_DELIVERY_ITEM_*` event asks for a look-up of its customer's items
  (`customer` null: a new-items read and a snapshot at once);
- any other event is acknowledged and ignored.

Polling goes on beside it: a lost webhook delays a delivery, never loses it.
`verify` and `read_event` are pure; `WebhookReceiver` adds the store and the
hint.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from daemon.clock import Clock
from daemon.placeholders import printable
from daemon.sources.store import LAST_WEBHOOK
from daemon.state import Store

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "PayNow-Signature"
TIMESTAMP_HEADER: Final = "PayNow-Timestamp"
WINDOW_SECONDS: Final = 300  # a signed timestamp further from now than this is stale
REMEMBER_SECONDS: Final = 3600  # event ids are remembered at least this long
REFUSAL_LOG_SECONDS: Final = 60  # refused requests are logged at most once this often
DELIVERY_EVENT_PREFIX: Final = "ON_DELIVERY_ITEM_"


class Forged(Exception):
    """The request does not come from PayNow, or not now: 401, nothing changes.
    The message says why, for the log (never the secret or a signature)."""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    event_id: str
    event_type: str
    # For delivery-item events: whose items to read (None: the event has no
    # customer, so read new items); None for other events too.
    customer_id: str | None

    @property
    def about_delivery_items(self) -> bool:
        return self.event_type.startswith(DELIVERY_EVENT_PREFIX)


def signature(secret: bytes, timestamp: str, body: bytes) -> bytes:
    """The HMAC-SHA256 PayNow sends: over `<timestamp>.<raw body>`."""
    return hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).digest()


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now: datetime) -> None:
    """Raise `Forged` unless the request is signed by `secret` and fresh."""
    sent = headers.get(SIGNATURE_HEADER, "").strip()
    stamp = headers.get(TIMESTAMP_HEADER, "").strip()
    if not sent or not stamp:
        raise Forged(f"no {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 16):
        raise Forged(f"{TIMESTAMP_HEADER} is not Unix milliseconds")
    expected = signature(secret, stamp, body)
    if not any(hmac.compare_digest(expected, given) for given in _decodings(sent)):
        raise Forged("the signature does not match")
    age = now.timestamp() - int(stamp) / 1000
    if abs(age) > WINDOW_SECONDS:
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        raise Forged(f"the signed timestamp is {when} (allowed: {WINDOW_SECONDS} s either way)")


def _decodings(text: str) -> list[bytes]:
    """The signature as hex and as base64 (whichever it is)."""
    found = []
    with contextlib.suppress(ValueError):
        found.append(bytes.fromhex(text))
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        with contextlib.suppress(binascii.Error, ValueError):
            found.append(decode(text + "=" * (-len(text) % 4)))
    return found


def read_event(body: bytes) -> WebhookEvent:
    """The parts of a (verified) webhook's JSON perksync acts on; ValueError if
    it is not PayNow's webhook shape."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    event_id, event_type = data.get("event_id"), data.get("event_type")
    if not isinstance(event_id, str | int) or not isinstance(event_type, str):
        raise ValueError("no event_id or event_type")
    customer_id = None
    inner = data.get("body")
    if event_type.startswith(DELIVERY_EVENT_PREFIX) and isinstance(inner, dict):
        customer = inner.get("customer")
        if isinstance(customer, dict) and isinstance(customer.get("id"), str | int):
            customer_id = str(customer["id"])
    return WebhookEvent(str(event_id), event_type, customer_id)


class WebhookReceiver:
    """Turns verified webhooks into hints; `hint(customer_id | None, event_id)`
    must return soon (it asks for a read, or records the hint for the host
    that reads)."""

    def __init__(
        self,
        secret: bytes,
        store: Store,
        hint: Callable[[str | None, str], Awaitable[None]],
        *,
        clock: Clock,
    ) -> None:
        self.secret = secret
        self.store = store
        self.hint = hint
        self.clock = clock
        self._refusals = 0  # refused since the last refusal logged
        self._refused_logged_at: float | None = None

    def _refused(self, why: str) -> None:
        """Log a refusal: the first at once, then at most one line a minute
        with how many (anyone on the internet can send them)."""
        now = self.clock.monotonic()
        self._refusals += 1
        if self._refused_logged_at is None or now - self._refused_logged_at >= REFUSAL_LOG_SECONDS:
            more = (
                f" ({self._refusals} refused since the last such line)"
                if self._refusals > 1
                else ""
            )
            log.warning("webhook refused (401): %s%s", why, more)
            self._refused_logged_at = now
            self._refusals = 0

    async def receive(self, headers: Mapping[str, str], body: bytes) -> int:
        """Handle one request; the HTTP status to answer."""
        now = self.clock.now()
        try:
            verify(self.secret, headers, body, now)
        except Forged as exc:
            self._refused(str(exc))
            return 401
        try:
            event = read_event(body)
        except ValueError as exc:
            log.error("webhook signed but not understood (400): %s", printable(str(exc), 200))
            return 400
        forget = now - timedelta(seconds=REMEMBER_SECONDS)
        shown = f"{printable(event.event_id, 40)} ({printable(event.event_type, 60)})"
        if not await self.store.remember_webhook(event.event_id, now, forget):
            log.info("webhook %s seen before: acknowledged", shown)
            return 200
        await self.store.set_meta({LAST_WEBHOOK: now.isoformat(timespec="seconds")})
        if event.about_delivery_items:
            whose = printable(event.customer_id or "(none: reading new items)", 40)
            log.info("webhook %s for customer %s: reading its items", shown, whose)
            await self.hint(event.customer_id, event.event_id)
        else:
            log.debug("webhook %s ignored", shown)
        return 200
