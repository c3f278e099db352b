"""`perksync status`: what the state says, for an operator's eyes.

On a PostgreSQL state: every host seen in the last 3 intervals (its site,
the leases it holds, when it last renewed them) and the fleet's settings.
Token mode: the linked customers and when each was last synced. Store mode:
a summary (customers seen, live items, when the last snapshot, new-items
read and webhook happened, items PayNow no longer lists). Both: pending,
failed, skipped and delivered commands per server, and those waiting (for
the player, until a time, behind another) and rejected; and the live items
that reach no server. It only reads, and works beside a running service.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from daemon.config import Settings
from daemon.delivery import waiting_kind
from daemon.fleet.fingerprint import fingerprint, short
from daemon.fleet.leases import roles
from daemon.placeholders import printable
from daemon.sources.store import CURSOR, LAST_NEW_ITEMS, LAST_SNAPSHOT, LAST_WEBHOOK, MISSING
from daemon.state import (
    JournalStatus,
    LinkStatus,
    ServerCounts,
    Store,
    Totals,
    describe_postgres_url,
    open_store,
)
from daemon.state.shared import FleetSettings, HostStatus, SharedStore
from daemon.undelivered import (
    Undelivered,
    describe_unmapped,
    describe_unroutable,
    find_undelivered,
    id_fields,
)

HOSTS_SEEN_INTERVALS = 3  # hosts renewed within this many intervals are listed


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


@dataclass
class _State:
    """What status shows, read from the store in one go."""

    links: list[LinkStatus] = field(default_factory=list)
    counts: list[ServerCounts] = field(default_factory=list)
    undelivered: Undelivered = field(default_factory=Undelivered)
    totals: Totals = field(default_factory=lambda: Totals(0, 0))
    meta: dict[str, str | None] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)  # server → why rows wait
    hosts: list[HostStatus] | None = None  # a PostgreSQL state's hosts
    fleet: FleetSettings | None = None


@dataclass
class Waiting:
    """A server's waiting rows, by what they wait for."""

    kinds: Counter[str] = field(default_factory=Counter)  # waiting_kind → rows
    first_due: datetime | None = None  # the earliest time a delayed row waits for

    def describe(self) -> str:
        parts = []
        if n := self.kinds["player"]:
            parts.append(f"{n} for the player")
        if n := self.kinds["time"]:
            first = _when(self.first_due)
            parts.append(
                f"{n} until {first}" if n == 1 else f"{n} delayed, the first until {first}"
            )
        if n := self.kinds["behind"]:
            parts.append(f"{n} behind them")
        return ", ".join(parts)


async def _waiting(store: Store, server: str) -> Waiting:
    waiting, after = Waiting(), 0
    while rows := await store.unfinished(server, after_id=after):
        for row in rows:
            if row.status is not JournalStatus.WAITING:
                continue
            kind = waiting_kind(row.reason)
            waiting.kinds[kind] += 1
            if kind == "time" and row.not_before is not None:
                due = waiting.first_due
                waiting.first_due = row.not_before if due is None else min(due, row.not_before)
        after = rows[-1].id
    return waiting


async def _read(settings: Settings, store: Store) -> _State:
    live = await store.live_item_counts(id_fields(settings))
    meta_keys = (LAST_SNAPSHOT, LAST_NEW_ITEMS, LAST_WEBHOOK, CURSOR, MISSING)
    counts = await store.server_counts()
    return _State(
        links=await store.links(),
        counts=counts,
        waiting={c.server: await _waiting(store, c.server) for c in counts if c.waiting},
        undelivered=find_undelivered(settings, live),
        totals=await store.totals(),
        meta={key: await store.get_meta(key) for key in meta_keys},
    )


async def _read_hosts(settings: Settings, store: Store, state: _State) -> None:
    if not settings.state_db_postgres:
        return
    shared = cast(SharedStore, store)
    state.hosts = await shared.hosts(HOSTS_SEEN_INTERVALS * settings.sync.interval_seconds)
    state.fleet = await shared.fleet_settings()


async def print_status(settings: Settings) -> int:
    db_path = settings.state_db_path
    if not settings.state_db_postgres and not db_path.exists():
        print(f"state: {db_path} does not exist yet (no pass has run)")
        state = _State()
    else:
        store = open_store(settings.state_db_url, password=settings.state_db_password)
        try:
            state = await _read(settings, store)
            await _read_hosts(settings, store, state)
        finally:
            await store.close()
        where = settings.state_db_url
        print(f"state: {describe_postgres_url(where) if settings.state_db_postgres else where}")
    if state.hosts is not None:
        _print_hosts(settings, state.hosts, state.fleet)
    if settings.store_mode:
        _print_store(settings, state)
    else:
        _print_links(settings, state.links)
    _print_servers(settings, state.counts, state.waiting)
    _print_undelivered(state.undelivered)
    return 0


def _print_hosts(settings: Settings, hosts: list[HostStatus], fleet: FleetSettings | None) -> None:
    every = HOSTS_SEEN_INTERVALS * settings.sync.interval_seconds
    if fleet is None:
        print(f"hosts (seen in the last {every:g}s): none has run yet")
        return
    ours = fingerprint(settings)
    same = (
        "this config.yaml's"
        if fleet.fingerprint == ours
        else f"NOT this config.yaml's ({short(ours)})"
    )
    print(
        f"hosts (seen in the last {every:g}s; settings {short(fleet.fingerprint)}, {same}, "
        f"stored by {fleet.stored_by} at {_when(fleet.stored_at)}):"
    )
    for host in hosts:
        print(f"  {_host_line(host)}")
    if not hosts:
        print("  none")


def _host_line(host: HostStatus) -> str:
    doing = roles(list(host.holds)) or "standing by"
    if host.stopped_at is not None:
        doing = f"stopped at {_when(host.stopped_at)}"
    site = f", site {host.site}" if host.site else ""
    return (
        f"{host.hostname} pid {host.pid}{site}: {doing}; last renewed {_when(host.renewed_at)} "
        f"(settings {short(host.fingerprint)})"
    )


def _print_store(settings: Settings, state: _State) -> None:
    meta = state.meta
    print(f"store {settings.paynow.store_id} (store mode):")
    print(f"  customers seen: {state.totals.customers}, live items: {state.totals.live_items}")
    print(f"  last snapshot: {_stamp(meta.get(LAST_SNAPSHOT))}")
    cursor = meta.get(CURSOR)
    after = f" (new items after {cursor})" if cursor else ""
    print(f"  last new-items read: {_stamp(meta.get(LAST_NEW_ITEMS))}{after}")
    webhooks = "off" if settings.paynow.webhook_secret_value is None else "on"
    print(f"  last webhook: {_stamp(meta.get(LAST_WEBHOOK))} (webhooks {webhooks})")
    missing = json.loads(meta.get(MISSING) or '{"count": 0, "items": []}')
    if missing["count"]:
        shown = ", ".join(missing["items"])
        more = "" if missing["count"] == len(missing["items"]) else ", …"
        print(
            f"  items held live that PayNow no longer lists (they stay granted): "
            f"{missing['count']}: {shown}{more}"
        )


def _stamp(text: str | None) -> str:
    return _when(datetime.fromisoformat(text)) if text else "never"


def _print_links(settings: Settings, links: list[LinkStatus]) -> None:
    by_label = {c.label: c for c in links}
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


def _print_servers(
    settings: Settings, counts: list[ServerCounts], waiting: dict[str, Waiting]
) -> None:
    print("servers:")
    by_server = {c.server: c for c in counts}
    for name in sorted(set(settings.servers) | set(by_server)):
        c = by_server.get(name)
        note = "" if name in settings.servers else " (no longer in the config)"
        if c is None:
            print(f"  {name}: nothing journaled yet{note}")
            continue
        line = (
            f"  {name}: {c.pending} pending, {c.failed} failed, {c.skipped} skipped, "
            f"{c.delivered} delivered"
        )
        if c.waiting:
            line += f", {c.waiting} waiting ({waiting[name].describe()})"
        for count, word in ((c.rejected, "rejected"), (c.kept, "kept"), (c.cancelled, "cancelled")):
            if count:
                line += f", {count} {word}"
        print(line + note)
    if any(c.rejected for c in counts):
        print("  (perksync journal --status rejected shows what the servers answered)")


def _print_undelivered(undelivered: Undelivered) -> None:
    if not (undelivered.unmapped or undelivered.unroutable):
        print("live items that reach no server: none")
        return
    print(f"live items that reach no server: {undelivered.items}")
    for unmapped in undelivered.unmapped:
        print(f"  {describe_unmapped(unmapped)}")
    for unroutable in undelivered.unroutable:
        print(f"  {describe_unroutable(unroutable)}")
