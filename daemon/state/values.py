"""Values every backend turns the same way: times to store, replies to keep,
which ids a customer's JSON sets, and the limits callers may ask for."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from daemon.state import REPLY_LIMIT


def utc(value: datetime) -> datetime:
    """`value` in UTC; ValueError for a naive time (the store needs aware ones)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs aware times")
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def check_limit(limit: int | None) -> None:
    """ValueError for a row limit under 1 (None: no limit)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def cut_reply(reply: str | None) -> str | None:
    """A server's reply as kept: its first `REPLY_LIMIT` characters."""
    return None if reply is None else reply[:REPLY_LIMIT]


def ids_set(raw: str | None, fields: Sequence[str]) -> frozenset[str] | None:
    """Which of `fields` the customer's JSON sets (not missing, null, "", false
    or 0); None without JSON, or with JSON that does not parse."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return frozenset()
    return frozenset(f for f in fields if value.get(f) not in ("", 0, None))
