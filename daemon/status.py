"""`perksync status`: what the state says, for an operator's eyes.

Linked customers and when each was last synced, pending, failed and skipped
commands per server, and the live items that reach no server. It only
reads, and works beside a running service.
"""

from __future__ import annotations

from datetime import datetime

from daemon.config import Settings
from daemon.placeholders import printable
from daemon.state import open_store
from daemon.undelivered import (
    Undelivered,
    describe_unmapped,
    describe_unroutable,
    find_undelivered,
    id_fields,
)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


async def print_status(settings: Settings) -> int:
    db_path = settings.state_db_path
    if not db_path.exists():
        print(f"state: {db_path} does not exist yet (no pass has run)")
        known_customers, counts, undelivered = [], [], Undelivered()
    else:
        store = open_store(str(db_path))
        try:
            known_customers = await store.links()
            counts = await store.server_counts()
            live = await store.live_item_counts(id_fields(settings))
            undelivered = find_undelivered(settings, live)
        finally:
            await store.close()
        print(f"state: {db_path}")
    by_label = {c.label: c for c in known_customers}
    print(f"customers ({len(settings.customers)} linked):")
    for index, link in enumerate(settings.customers):
        label = link.describe(index)
        known = by_label.get(label)
        if known is None:
            print(f"  {label}: never synced")
            continue
        who = known.customer_id or "?"
        if known.name:
            who += f" ({printable(known.name)})"
        line = f"  {label}: customer {who}, last synced {_when(known.last_synced_at)}"
        if known.last_error:
            line += f"; last error {_when(known.last_error_at)}: {printable(known.last_error, 200)}"
        print(line)
    print("servers:")
    by_server = {c.server: c for c in counts}
    for name in sorted(set(settings.servers) | set(by_server)):
        c = by_server.get(name)
        note = "" if name in settings.servers else " (no longer in the config)"
        if c is None:
            print(f"  {name}: nothing journaled yet{note}")
        else:
            print(
                f"  {name}: {c.pending} pending, {c.failed} failed, {c.skipped} skipped, "
                f"{c.delivered} delivered{note}"
            )
    _print_undelivered(undelivered)
    return 0


def _print_undelivered(undelivered: Undelivered) -> None:
    if not (undelivered.unmapped or undelivered.unroutable):
        print("live items that reach no server: none")
        return
    print(f"live items that reach no server: {undelivered.items}")
    for unmapped in undelivered.unmapped:
        print(f"  {describe_unmapped(unmapped)}")
    for unroutable in undelivered.unroutable:
        print(f"  {describe_unroutable(unroutable)}")
