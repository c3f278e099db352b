"""`perksync cancel ROW…` and `perksync retry ROW…` / `retry --rejected`:
an operator's hand on single journal rows (ids as `perksync journal` shows).

- **cancel**: a pending or waiting row becomes `cancelled` (a player who
  never comes back, a server gone for good); any other row is reported and
  left as it is.
- **retry**: a failed or rejected row is journaled again as a new row
  (`resend` one more than the highest of that command's rows), rendered from
  the current config and the stored JSON, pending for the service or the
  next pass. Left as it is, with the reason: a row in another status; a
  row already journaled again (retry the newer one: a command is never
  queued twice); a grant whose item is no longer granted there in that
  cycle (its take-back is journaled); a take-back of an item granted again
  since; a command that is no longer in the config.

Both go through the customer's block (never racing a poll, also the
service's in another process). Row ids that do not exist are a usage error
(exit 2) and nothing changes; rows left as they are make exit status 3.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from daemon.config import Settings
from daemon.diff import Event, EventKind, Phase
from daemon.models import Customer, InventoryItem
from daemon.operator import UsageProblem, in_block
from daemon.placeholders import printable
from daemon.render import journal_entries
from daemon.state import (
    UNFINISHED,
    CustomerChange,
    CustomerTxn,
    JournalEntry,
    JournalRow,
    JournalStatus,
    KnownCustomer,
    Store,
    StoreWriteError,
)

log = logging.getLogger(__name__)

RETRYABLE = frozenset({JournalStatus.FAILED, JournalStatus.REJECTED})


@dataclass(slots=True)
class Outcome:
    """What became of the rows named: lines for the operator, and whether all were done."""

    lines: list[str] = field(default_factory=list)
    left: int = 0

    def done(self, line: str) -> None:
        self.lines.append(line)

    def leave(self, row: JournalRow, why: str) -> None:
        self.lines.append(f"row {row.id}: left as it is: {why}")
        self.left += 1

    def add(self, other: Outcome) -> None:
        self.lines += other.lines
        self.left += other.left


async def named_rows(store: Store, row_ids: Sequence[int], command: str) -> list[JournalRow]:
    """The rows named on the command line, oldest first; a missing one is a usage error."""
    rows = await store.journal(row_ids=row_ids, limit=None)
    missing = sorted(set(row_ids) - {r.id for r in rows})
    if missing:
        raise UsageProblem(f"{command}: no journal row {', '.join(map(str, missing))}")
    return rows[::-1]


def by_customer(rows: Iterable[JournalRow]) -> dict[str, list[JournalRow]]:
    grouped: dict[str, list[JournalRow]] = defaultdict(list)
    for row in rows:
        grouped[row.customer_id].append(row)
    return dict(grouped)


# --- cancel --------------------------------------------------------------------------


async def cancel(store: Store, row_ids: Sequence[int], *, now: Callable[[], datetime]) -> Outcome:
    outcome = Outcome()
    for customer_id, rows in by_customer(await named_rows(store, row_ids, "cancel")).items():
        ids = [r.id for r in rows]

        async def work(txn: CustomerTxn, ids: list[int] = ids) -> None:
            current = await store.journal(row_ids=ids, limit=None)
            open_ids = [r.id for r in current if r.status in UNFINISHED]
            if open_ids:
                await txn.commit(CustomerChange(now(), cancel_rows=open_ids))

        await in_block(store, customer_id, work)
        was = {r.id: r.status for r in rows}
        for row in (await store.journal(row_ids=ids, limit=None))[::-1]:
            if row.status is not JournalStatus.CANCELLED:
                outcome.leave(row, f"it is {row.status}; only pending or waiting rows are")
            elif was[row.id] in UNFINISHED:
                outcome.done(f"row {row.id}: cancelled (was {was[row.id]}): {_what(row)}")
            else:
                outcome.done(f"row {row.id}: already cancelled")
    return outcome


def _what(row: JournalRow) -> str:
    return f"{row.server} {row.event} of item {row.item_id}: {printable(row.command, 200)}"


# --- retry ---------------------------------------------------------------------------


async def retry(
    settings: Settings,
    store: Store,
    rows: Sequence[JournalRow],
    *,
    now: Callable[[], datetime],
    skip_retried: bool = False,
) -> Outcome:
    """Journal each failed or rejected row of `rows` again (see the module
    docstring). `skip_retried` (`--rejected`): rows already journaled again
    are passed over without a word (their newer row is in `rows` if it was
    rejected too)."""
    outcome = Outcome()
    for customer_id, wanted in by_customer(rows).items():

        async def work(txn: CustomerTxn, wanted: list[JournalRow] = wanted) -> Outcome:
            return await _retry_one(settings, store, txn, wanted, now(), skip_retried)

        try:
            outcome.add(await in_block(store, customer_id, work))
        except StoreWriteError:
            raise
        except Exception as exc:  # one broken customer never stops the others
            log.error("retry: customer %s: %s; nothing journaled for it", customer_id, exc)
            for row in wanted:
                outcome.leave(row, f"customer {customer_id} could not be read or changed")
    return outcome


async def _retry_one(
    settings: Settings,
    store: Store,
    txn: CustomerTxn,
    wanted: Sequence[JournalRow],
    at: datetime,
    skip_retried: bool,
) -> Outcome:
    known = txn.known
    history = await store.journal(item_ids=sorted({r.item_id for r in wanted}), limit=None)
    current = {r.id: r for r in history}
    outcome = Outcome()
    entries: list[tuple[JournalRow, JournalEntry]] = []
    for asked in wanted:
        row = current.get(asked.id, asked)
        newer = _newer(row, history)
        if newer is not None and skip_retried:
            continue
        why = _why_not(row, newer, known)
        entry = _render_again(settings, known, row, at) if why is None else why
        if isinstance(entry, str):
            outcome.leave(row, entry)
        else:
            entries.append((row, entry))
    if entries:
        new_ids = await txn.commit(CustomerChange(at, entries=[e for _, e in entries]))
        for (row, entry), new_id in zip(entries, new_ids, strict=True):
            status = str(entry.status) + (f": {entry.reason}" if entry.reason else "")
            outcome.done(
                f"row {row.id}: journaled again as row {new_id} ({status}): "
                f"{row.server}: {printable(entry.command, 200)}"
            )
            # Refused again as rendered now (an unsafe value, too long): not done.
            outcome.left += entry.status in (JournalStatus.FAILED, JournalStatus.SKIPPED)
    return outcome


def _command_key(row: JournalRow) -> tuple[str, str, int, str, int]:
    return (row.item_id, row.server, row.cycle, row.event, row.command_index)


def _newer(row: JournalRow, history: Sequence[JournalRow]) -> JournalRow | None:
    """The latest row of the same command journaled again after `row`, if any."""
    newer = [r for r in history if _command_key(r) == _command_key(row) and r.resend > row.resend]
    return max(newer, key=lambda r: r.resend, default=None)


def _why_not(row: JournalRow, newer: JournalRow | None, known: KnownCustomer) -> str | None:
    if row.status not in RETRYABLE:
        return f"it is {row.status}; only failed or rejected rows are retried"
    if newer is not None:
        return f"it was journaled again as row {newer.id} ({newer.status}): retry that one"
    mark = known.marks.get((row.item_id, row.server))
    granted_now = mark is not None and mark.phase is Phase.GRANTED
    if row.event == EventKind.ACTIVE.value:
        if not granted_now or mark is None or mark.cycle != row.cycle:
            return "the item is no longer granted there in that cycle (its take-back is journaled)"
    elif granted_now and mark is not None and mark.cycle > row.cycle:
        return f"the item was granted there again since (cycle {mark.cycle})"
    return None


def _render_again(
    settings: Settings, known: KnownCustomer, row: JournalRow, at: datetime
) -> JournalEntry | str:
    """The row's command rendered from the current config, as a new resend;
    or why it cannot be."""
    spec = settings.products.get(row.product)
    if spec is None or row.server not in settings.servers:
        gone = "product" if spec is None else "server"
        return f"its {gone} is no longer in the config"
    if row.command_index >= len(spec.commands(row.event)):
        return f"{row.product} has no command #{row.command_index + 1} in {row.event} now"
    stored = known.items.get(row.item_id)
    if stored is None or stored.raw is None or known.customer_raw is None:
        return "no JSON of the item or customer is stored to render from"
    customer = Customer.from_api(json.loads(known.customer_raw))
    item = InventoryItem.from_api(json.loads(stored.raw))
    event = Event(item, row.server, EventKind(row.event), row.cycle, at)
    rendered = journal_entries(settings, customer, [event], at=at)
    entry = next(e for e in rendered if e.command_index == row.command_index)
    return replace(entry, resend=row.resend + 1)
