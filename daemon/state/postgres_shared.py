"""The PostgreSQL side of several hosts on one database (see daemon/state/shared.py):
the tables' migration and the statements, each taking a connection.

Every time is the database's `now()`. Leases are taken and renewed by one
upsert whose conflict rule takes a row only when it ran out or is the
host's own: the row lock it takes makes two hosts that want the same lease
at the same moment queue, and the second finds it taken. Names are taken in
sorted order, so two hosts never wait for each other's rows. Notification
channels carry a hash of the schema, so that schemas of one database (a
deployment or a test per schema) do not wake each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from daemon.state.shared import (
    FleetClaim,
    FleetSettings,
    HostRecord,
    HostStatus,
    LeaseState,
    LiveHost,
    Tick,
)

FINGERPRINT: Final = "fleet.fingerprint"
STORED_BY: Final = "fleet.fingerprint_by"
STORED_AT: Final = "fleet.fingerprint_at"
FORGET_HOSTS: Final = "7 days"  # a host not renewed for this long leaves its row

TABLES: Final = [
    # One row per perksync process; `renewed_at` moves at every lease tick.
    """CREATE TABLE hosts (
        host_id     text COLLATE "C" PRIMARY KEY,
        hostname    text NOT NULL,
        pid         integer NOT NULL,
        site        text,
        fingerprint text NOT NULL,
        started_at  timestamptz NOT NULL,
        renewed_at  timestamptz NOT NULL,
        stopped_at  timestamptz
    )""",
    "CREATE INDEX hosts_renewed ON hosts (renewed_at)",
    # `poll` and `server:<name>`; `token` grows at every change of holder.
    """CREATE TABLE leases (
        name       text COLLATE "C" PRIMARY KEY,
        holder     text COLLATE "C" NOT NULL,
        token      bigint NOT NULL CHECK (token >= 1),
        expires_at timestamptz NOT NULL,
        taken_at   timestamptz NOT NULL
    )""",
    "CREATE INDEX leases_holder ON leases (holder)",
    # Webhooks any host accepted, for the polling host (customer NULL: new items).
    """CREATE TABLE webhook_hints (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        customer_id text COLLATE "C",
        event_id    text NOT NULL,
        received_at timestamptz NOT NULL
    )""",
]

# The channel of a notification kind ($1) in this schema.
_CHANNEL = "'perksync_' || $1::text || '_' || left(md5(coalesce(current_schema(), '')), 8)"

_LIVE_HOST = """
SELECT hostname, pid, renewed_at FROM hosts
WHERE stopped_at IS NULL AND renewed_at > now() - make_interval(secs => $1)
ORDER BY renewed_at DESC LIMIT 1
"""

_REGISTER = """
INSERT INTO hosts (host_id, hostname, pid, site, fingerprint, started_at, renewed_at)
VALUES ($1, $2, $3, $4, $5, now(), now())
"""

_STORE_FINGERPRINT = """
INSERT INTO meta (key, value)
VALUES ($1, $4), ($2, $5),
       ($3, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""

_TICK = """
WITH host AS (
    UPDATE hosts SET renewed_at = now() WHERE host_id = $1 AND stopped_at IS NULL RETURNING 1
), fleet AS (
    SELECT (SELECT value FROM meta WHERE key = $5) AS fingerprint
), wanted AS (
    SELECT DISTINCT name FROM unnest($2::text[]) AS w (name)
), before AS (
    SELECT l.name, l.holder, l.expires_at, h.hostname, h.pid, h.stopped_at IS NOT NULL AS stopped
    FROM leases AS l LEFT JOIN hosts AS h ON h.host_id = l.holder
    WHERE l.name IN (SELECT name FROM wanted)
), taken AS (
    INSERT INTO leases AS l (name, holder, token, expires_at, taken_at)
    SELECT name, $1, 1, now() + make_interval(secs => $3), now() FROM wanted
    WHERE EXISTS (SELECT FROM host) AND (SELECT fingerprint FROM fleet) = $4
    ORDER BY name
    ON CONFLICT (name) DO UPDATE SET
        holder = excluded.holder,
        token = CASE WHEN l.holder = excluded.holder THEN l.token ELSE l.token + 1 END,
        expires_at = excluded.expires_at,
        taken_at = CASE WHEN l.holder = excluded.holder THEN l.taken_at ELSE now() END
    WHERE l.holder = excluded.holder OR l.expires_at <= now()
    RETURNING l.name, l.token, l.expires_at
)
SELECT w.name, t.token, t.expires_at, b.holder, b.expires_at AS was_until,
       b.hostname, b.pid, coalesce(b.stopped, false) AS stopped,
       (SELECT fingerprint FROM fleet) AS fingerprint, now() AS now
FROM wanted AS w LEFT JOIN taken AS t USING (name) LEFT JOIN before AS b USING (name)
ORDER BY w.name
"""

_RELEASE = """
WITH released AS (
    UPDATE leases SET expires_at = now()
    WHERE holder = $1 AND expires_at > now() AND ($2::text[] IS NULL OR name = ANY($2::text[]))
    RETURNING name
), stopped AS (
    UPDATE hosts SET stopped_at = now() WHERE host_id = $1 AND $2::text[] IS NULL
)
SELECT name FROM released ORDER BY name
"""

_HOSTS = """
SELECT h.hostname, h.pid, h.site, h.started_at, h.renewed_at, h.stopped_at,
       ARRAY(SELECT l.name FROM leases AS l
             WHERE l.holder = h.host_id AND l.expires_at > now() ORDER BY l.name) AS holds,
       h.fingerprint
FROM hosts AS h WHERE h.renewed_at > now() - make_interval(secs => $1)
ORDER BY h.hostname, h.pid, h.started_at
"""

_ADD_HINT = f"""
WITH added AS (
    INSERT INTO webhook_hints (customer_id, event_id, received_at) VALUES ($2, $3, now())
    RETURNING 1
)
SELECT pg_notify({_CHANNEL}, '') FROM added
"""

_TAKE_HINTS = """
DELETE FROM webhook_hints WHERE id IN (
    SELECT id FROM webhook_hints ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $1
)
RETURNING id, customer_id
"""

NOTIFY: Final = f"SELECT pg_notify({_CHANNEL}, $2)"
CHANNEL: Final = f"SELECT {_CHANNEL}"

# An attempt counted only under the fence: $2 lease, $3 holder, $4 token, $5 margin.
MARK_ATTEMPT_FENCED: Final = """
WITH fence AS (
    SELECT FROM leases
    WHERE name = $2 AND holder = $3 AND token = $4
      AND expires_at > now() + make_interval(secs => $5)
), changed AS (
    UPDATE journal SET attempts = attempts + 1, status = 'pending', reason = NULL
    WHERE id = $1 AND status IN ('pending', 'waiting') AND EXISTS (SELECT FROM fence)
    RETURNING 1
)
SELECT EXISTS (SELECT FROM changed), EXISTS (SELECT FROM journal WHERE id = $1),
       EXISTS (SELECT FROM fence)
"""


async def fleet_settings(conn: Any) -> FleetSettings | None:
    rows = dict(
        await conn.fetch(
            "SELECT key, value FROM meta WHERE key = ANY($1::text[])",
            [FINGERPRINT, STORED_BY, STORED_AT],
        )
    )
    if FINGERPRINT not in rows:
        return None
    return FleetSettings(
        rows[FINGERPRINT], rows.get(STORED_BY, "?"), datetime.fromisoformat(rows[STORED_AT])
    )


async def join(conn: Any, host: HostRecord, quiet_seconds: float, lock: str) -> FleetClaim:
    """See `SharedStore.join`; `lock`: the statement taking the fleet's lock."""
    async with conn.transaction():
        await conn.execute(lock)
        await conn.execute(
            f"DELETE FROM hosts WHERE renewed_at < now() - interval '{FORGET_HOSTS}'"
        )
        stored = await fleet_settings(conn)
        if stored is not None and stored.fingerprint != host.fingerprint:
            live = await conn.fetchrow(_LIVE_HOST, quiet_seconds)
            if live is not None:
                return FleetClaim(stored, LiveHost(*live))
        if stored is None or stored.fingerprint != host.fingerprint:
            await conn.execute(
                _STORE_FINGERPRINT, FINGERPRINT, STORED_BY, STORED_AT,
                host.fingerprint, host.describe(),
            )  # fmt: skip
        await conn.execute(
            _REGISTER, host.host_id, host.hostname, host.pid, host.site, host.fingerprint
        )
    return FleetClaim(stored)


async def tick(
    conn: Any, host: HostRecord, wanted: Sequence[str], lease_seconds: float, within: float
) -> Tick:
    rows = await conn.fetch(
        _TICK, host.host_id, sorted(wanted), lease_seconds, host.fingerprint, FINGERPRINT,
        timeout=within,
    )  # fmt: skip
    leases = [
        LeaseState(
            name=r["name"], token=r["token"], expires_at=r["expires_at"],
            was_holder=r["holder"], was_until=r["was_until"],
            was_host=None if r["hostname"] is None else f"{r['hostname']} pid {r['pid']}",
            was_stopped=r["stopped"],
        )
        for r in rows
    ]  # fmt: skip
    fingerprint = rows[0]["fingerprint"] if rows else None
    now = rows[0]["now"] if rows else await conn.fetchval("SELECT now()")
    return Tick(leases, fingerprint, now)


async def release(conn: Any, host: HostRecord, names: Sequence[str] | None) -> list[str]:
    rows = await conn.fetch(_RELEASE, host.host_id, None if names is None else list(names))
    return [name for (name,) in rows]


async def hosts(conn: Any, seen_within_seconds: float) -> list[HostStatus]:
    rows = await conn.fetch(_HOSTS, seen_within_seconds)
    return [HostStatus(*row) for row in rows]


async def add_hint(conn: Any, kind: str, customer_id: str | None, event_id: str) -> None:
    await conn.execute(_ADD_HINT, kind, customer_id, event_id)


async def take_hints(conn: Any, limit: int) -> list[str | None]:
    rows = await conn.fetch(_TAKE_HINTS, limit)
    return [customer_id for _, customer_id in sorted(rows)]
