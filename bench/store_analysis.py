"""What a store-mode service run measured: latencies, where they went, requests, CPU, RSS.

Pure functions over what the fakes recorded (`bench.store`):

- events: `{"kind": "purchase" | "revoke", "item", "customer", "at", ...}`,
  `at` the moment the fake changed the item (`time.time()`);
- received: `[time.time() on arrival, command]` from the RCON fake;
- requests: `[time.time(), kind, activeOnly, has a cursor, status, customer]`
  from the PayNow fake, kind "store_items" (a new-items read when not
  activeOnly, a snapshot page when activeOnly) or "customer_items" (a
  look-up);
- marks: name → (wall time, the service's CPU seconds, the fake's CPU seconds).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

PHASES = ("polling", "webhooks")
WINDOWS = {  # name → (first mark, last mark)
    "idle": ("idle_start", "idle_end"),
    "polling": ("polling_start", "polling_end"),
    "webhooks": ("webhooks_start", "webhooks_end"),
}


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """n, p50, p95 (nearest rank) and max, in seconds (None when there are none)."""
    xs = sorted(values)
    if not xs:
        return {"n": 0, "p50": None, "p95": None, "max": None}

    def rank(p: float) -> float:
        return xs[max(0, math.ceil(p * len(xs)) - 1)]

    return {"n": len(xs), "p50": rank(0.50), "p95": rank(0.95), "max": xs[-1]}


def check_delivered(
    expected: Counter[str], received: Sequence[Sequence[Any]], what: str
) -> dict[str, int]:
    """Every expected command arrived exactly once and nothing else; else RuntimeError."""
    got = Counter(str(command) for _, command in received)
    missing, extra = expected - got, got - expected
    if missing or extra:
        example = next(iter(missing or extra))
        raise RuntimeError(
            f"{what}: {sum(missing.values())} expected commands missing, "
            f"{sum(extra.values())} unexpected or repeated (e.g. {example!r})"
        )
    return {"expected": sum(expected.values()), "received": sum(got.values())}


def arrivals(received: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Each command's (first) arrival time, by its item id (the third word)."""
    out: dict[str, float] = {}
    for at, command in received:
        out.setdefault(str(command).split()[2], float(at))
    return out


class _Requests:
    """The fake's request log, sorted by time, with look-ups by customer."""

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        rows = sorted(rows, key=lambda r: r[0])
        self.rows = rows
        self.new_items = [r[0] for r in rows if r[1] == "store_items" and not r[2]]
        pages = [r for r in rows if r[1] == "store_items" and r[2]]
        self.snapshot_starts = [r[0] for r in pages if not r[3]]
        self.snapshots = _snapshots(pages)
        self.look_ups: dict[str, list[float]] = {}
        for r in rows:
            if r[1] == "customer_items":
                self.look_ups.setdefault(str(r[5]), []).append(r[0])

    def next_new_items(self, at: float) -> float | None:
        return _next(self.new_items, at)

    def next_look_up(self, customer: str, at: float) -> float | None:
        return _next(self.look_ups.get(customer, []), at)

    def snapshot_before(self, at: float) -> float | None:
        i = bisect.bisect_right(self.snapshot_starts, at)
        return self.snapshot_starts[i - 1] if i else None


def _next(times: list[float], at: float) -> float | None:
    i = bisect.bisect_left(times, at)
    return times[i] if i < len(times) else None


def _snapshots(pages: Sequence[Sequence[Any]]) -> list[dict[str, float]]:
    """Each snapshot: its first page's time, its pages, first to last page (s)."""
    out: list[dict[str, float]] = []
    for row in pages:
        if not row[3] or not out:
            out.append({"start": row[0], "pages": 0, "seconds": 0.0})
        out[-1]["pages"] += 1
        out[-1]["seconds"] = row[0] - out[-1]["start"]
    return out


def _breakdown(
    events: Sequence[dict[str, Any]],
    arrived: dict[str, float],
    stages: Callable[[dict[str, Any], float], dict[str, float | None]],
) -> dict[str, Any]:
    """Latency (event → command) and its stages, each as percentiles."""
    total: list[float] = []
    parts: dict[str, list[float]] = {}
    for event in events:
        done = arrived[str(event["item"])]
        total.append(done - event["at"])
        for name, value in stages(event, done).items():
            if value is not None:
                parts.setdefault(name, []).append(value)
    return {
        "latency_s": percentiles(total),
        "stages_s": {k: percentiles(v) for k, v in parts.items()},
    }


def _polled_purchase(req: _Requests) -> Callable[[dict[str, Any], float], dict[str, float | None]]:
    def stages(event: dict[str, Any], done: float) -> dict[str, float | None]:
        read = req.next_new_items(event["at"])
        if read is None or read > done:
            return {}
        return {"wait_for_new_items_read": read - event["at"], "read_to_command": done - read}

    return stages


def _polled_revoke(req: _Requests) -> Callable[[dict[str, Any], float], dict[str, float | None]]:
    def stages(event: dict[str, Any], done: float) -> dict[str, float | None]:
        look = req.next_look_up(str(event["customer"]), event["at"])
        start = req.snapshot_before(look) if look is not None else None
        if look is None or start is None or look > done:
            return {}
        return {
            "wait_for_snapshot": start - event["at"],
            "snapshot_to_look_up": look - start,
            "look_up_to_command": done - look,
        }

    return stages


def _hinted(req: _Requests) -> Callable[[dict[str, Any], float], dict[str, float | None]]:
    def stages(event: dict[str, Any], done: float) -> dict[str, float | None]:
        look = req.next_look_up(str(event["customer"]), event["at"])
        if look is None or look > done:
            return {}
        return {"webhook_to_look_up": look - event["at"], "look_up_to_command": done - look}

    return stages


def _window(
    req: _Requests,
    marks: dict[str, tuple[float, float, float]],
    rss: dict[str, list[float]],
    name: str,
) -> dict[str, Any]:
    """Requests per minute by read, the service's and the fake's CPU, RSS, in one window."""
    first, last = WINDOWS[name]
    (t1, cpu1, fake1), (t2, cpu2, fake2) = marks[first], marks[last]
    minutes = (t2 - t1) / 60
    rows = [r for r in req.rows if t1 <= r[0] < t2]
    counts = Counter(
        "look_ups" if r[1] == "customer_items" else ("snapshot_pages" if r[2] else "new_items")
        for r in rows
    )
    samples = rss.get(name) or [0.0]
    return {
        "seconds": t2 - t1,
        "requests_per_min": len(rows) / minutes,
        "by_read_per_min": {k: counts.get(k, 0) / minutes for k in _READS},
        "not_ok": sum(1 for r in rows if r[4] != 200),
        "cpu_percent_of_one_core": 100 * (cpu2 - cpu1) / (t2 - t1),
        "fake_cpu_percent": 100 * (fake2 - fake1) / (t2 - t1),
        "rss_mb_avg": statistics.fmean(samples),
        "rss_mb_max": max(samples),
    }


_READS = ("new_items", "snapshot_pages", "look_ups")


def _phase_events(
    events: Sequence[dict[str, Any]], marks: dict[str, tuple[float, float, float]], phase: str
) -> dict[str, list[dict[str, Any]]]:
    t1, t2 = marks[f"{phase}_start"][0], marks[f"{phase}_end"][0]
    chosen = [e for e in events if t1 <= e["at"] < t2]
    return {kind: [e for e in chosen if e["kind"] == kind] for kind in ("purchase", "revoke")}


def analyse(
    events: Sequence[dict[str, Any]],
    received: Sequence[Sequence[Any]],
    requests: Sequence[Sequence[Any]],
    marks: dict[str, tuple[float, float, float]],
    rss: dict[str, list[float]],
) -> dict[str, Any]:
    req = _Requests(requests)
    arrived = arrivals(received)
    polling = _phase_events(events, marks, "polling")
    hinted = _phase_events(events, marks, "webhooks")
    snaps = [
        s for s in req.snapshots if marks["started"][0] <= s["start"] < marks["webhooks_end"][0]
    ]
    return {
        "windows": {name: _window(req, marks, rss, name) for name in WINDOWS},
        "polling": {
            "purchase": _breakdown(polling["purchase"], arrived, _polled_purchase(req)),
            "revoke": _breakdown(polling["revoke"], arrived, _polled_revoke(req)),
        },
        "webhooks": {
            "purchase": _breakdown(hinted["purchase"], arrived, _hinted(req)),
            "revoke": _breakdown(hinted["revoke"], arrived, _hinted(req)),
            "statuses": dict(
                Counter(
                    str(e.get("webhook_status"))
                    for e in events
                    if e["at"] >= marks["webhooks_start"][0]
                )
            ),
        },
        "snapshots": {
            "count": len(snaps),
            "pages": percentiles([s["pages"] for s in snaps]),
            "seconds": percentiles([s["seconds"] for s in snaps]),
            # At the default 20 requests/s a snapshot cannot take less than this.
            "rate_limit_floor_s": (statistics.median(s["pages"] for s in snaps) - 1) / 20
            if snaps
            else None,
        },
        "first_snapshot_s": marks["started"][0] - marks.get("service_start", marks["started"])[0],
        "service_cpu_s": marks["webhooks_end"][1],
    }
