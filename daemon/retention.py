"""Journal retention: finished rows older than `sync.journal_retention_days` go.

Delivered, skipped, kept, failed, rejected and cancelled rows whose age,
counted from when they finished, is over the retention are deleted at the
start of every pass (`--sync-now` too) and periodically by the service;
pending and waiting rows never are. No decision reads old rows (marks hold
what was granted), so pruning changes nothing but what `perksync journal`
can show.

Deletion runs in small batches, each one short transaction, with a pause in
between: a journal of millions of rows (the first prune after an upgrade)
never holds the database for long, so delivery, polls and an operator's
command in another process go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Final

from daemon.state import Store

log = logging.getLogger(__name__)

PRUNE_BATCH: Final = 500  # rows per transaction
PRUNE_PAUSE: Final = 0.01  # seconds between two batches, for other writers


async def prune_journal(
    store: Store,
    retention_days: float,
    now: datetime,
    *,
    batch: int = PRUNE_BATCH,
    pause: float = PRUNE_PAUSE,
) -> int:
    """Delete the finished rows older than the retention; how many went."""
    cutoff = now - timedelta(days=retention_days)
    pruned = 0
    while True:
        went = await store.prune_journal(cutoff, batch)
        pruned += went
        if went < batch:
            break
        await asyncio.sleep(pause)  # let delivery and other processes write
    if pruned:
        log.info(
            "journal: pruned %d finished rows older than %g days (sync.journal_retention_days)",
            pruned,
            retention_days,
        )
    return pruned
