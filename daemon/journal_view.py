"""`perksync journal`: the delivery journal, newest first, for an operator's
eyes (one line per row) or a script's (`--json`: one JSON array).

It only reads (never prunes, never creates the state database) and works
beside a running service. Each row shows its id, which `perksync cancel` and
`perksync retry` take.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from daemon.config import Settings
from daemon.operator import open_existing
from daemon.placeholders import printable
from daemon.state import JournalRow, JournalStatus

DEFAULT_LIMIT = 100


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def row_json(row: JournalRow) -> dict[str, Any]:
    """A row as `journal --json` gives it (`id` for cancel and retry)."""
    return {
        "id": row.id,
        "time": _utc(row.created_at),
        "server": row.server,
        "customer": row.customer_id,
        "product": row.product,
        "item": row.item_id,
        "event": row.event,
        "resend": row.resend > 0,
        "status": str(row.status),
        "command": row.command,
        "reply": row.reply,
    }


def row_line(row: JournalRow) -> str:
    """A row on one line: when it was journaled, where, whose, what, how it went."""
    when = row.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    event = row.event + (f" (resend {row.resend})" if row.resend else "")
    status = str(row.status)
    if row.reason:
        status += f" ({printable(row.reason, 200)})"
    line = (
        f"#{row.id} {when} server={row.server} customer={row.customer_id} "
        f"product={printable(row.product)} item={row.item_id} event={event} "
        f"{status}: {printable(row.command, 1000)}"
    )
    if row.reply is not None:
        line += f" | reply: {printable(row.reply.strip(), 300)}"
    return line


async def show_journal(
    settings: Settings,
    *,
    server: str | None,
    customer_id: str | None,
    statuses: Sequence[JournalStatus],
    limit: int | None,
    as_json: bool,
    output: Callable[[str], None] = print,
) -> int:
    store = open_existing(settings)
    rows: list[JournalRow] = []
    if store is not None:
        try:
            rows = await store.journal(
                server=server, customer_id=customer_id, statuses=statuses, limit=limit
            )
        finally:
            await store.close()
    if as_json:
        # One row per line: still one JSON array, and easy to read or grep.
        body = ",\n".join(json.dumps(row_json(row)) for row in rows)
        output(f"[\n{body}\n]" if rows else "[]")
    elif rows:
        for row in rows:
            output(row_line(row))
    elif store is None:
        output(f"state: {settings.state_db_path} does not exist yet (no pass has run)")
    else:
        output("no journal rows match")
    return 0
