"""Sources: what hands PayNow's answers to `daemon.apply`.

A source reads PayNow and says what a customer owns; it never decides what
to run. Token mode polls each linked customer with its Storefront token
(`daemon/sources/token.py`); store mode reads new items by cursor, live
items by snapshot and single customers by look-up with one Management API
key (`daemon/sources/store.py`), woken early by webhooks
(`daemon/sources/webhooks.py`). Each hands `Answer`s to one `Applier`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from daemon.models import Customer, InventoryItem


@dataclass(frozen=True, slots=True)
class Answer:
    """What one read says about one customer's items."""

    customer: Customer  # in store mode: the items' embedded `customer`
    items: Sequence[InventoryItem]
    # Every item of the customer, in every state (an inventory, a look-up);
    # False for a part (new items, a snapshot of live items): items it does
    # not list are left as they are, never taken for vanished.
    complete: bool
    # When the read started: an answer read before the customer's last
    # applied one never changes the items that one covered.
    read_at: datetime
