"""Local expiry: `on_expire` for granted items whose expiry has passed, from
the stored JSON, without the API.

An active item whose `override_expires_at` (else `expires_at`) plus
`sync.expiry_grace_seconds` has passed gets its `on_expire` from perksync
itself, even while PayNow cannot be reached; its mark becomes LAPSED, so a
later `used` or `revoked` from the API runs nothing again, and a renewal
(active with a later expiry) grants it again as a new cycle. A `renewed`
item keeps its perk. Each customer's due items are checked again and
expired inside that customer's block (`Applier.expire`), so a poll that saw
a renewal meanwhile wins.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import groupby

from daemon.apply import Applier


async def sweep_expiries(applier: Applier) -> int:
    """Expire every due item; how many (item, server) took effect."""
    settings = applier.settings
    cutoff = applier.clock.now() - timedelta(seconds=settings.sync.expiry_grace_seconds)
    due = await applier.store.due_expiries(cutoff)
    expired = 0
    for _, group in groupby(sorted(due, key=lambda d: d.customer_id), key=lambda d: d.customer_id):
        expired += await applier.expire(list(group))
    return expired
