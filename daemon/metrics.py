"""Prometheus metrics and the health model of the service.

`PrometheusTelemetry` implements the engine's `Telemetry` hook
(daemon/telemetry.py) on its own `CollectorRegistry`, so a test, or a reload
that builds a new one, never collides with another instance or with the
process-global registry. It also keeps the little state /healthz and the
systemd STATUS line need.

Metrics:

| name | type | labels |
| --- | --- | --- |
| `perksync_polls_total` | counter | `outcome` = ok / failed / skipped |
| `perksync_api_errors_total` | counter | `kind` (PayNowError.kind, or "unexpected") |
| `perksync_commands_total` | counter | `server`, `outcome` = delivered/failed/skipped/rejected |
| `perksync_delivery_failures_total` | counter | `server` |
| `perksync_journal_backlog` | gauge | `server` (pending journal rows, as last seen) |
| `perksync_undelivered_items` | gauge | `product`, `reason` = unmapped / missing_id (live items) |
| `perksync_last_successful_sync_timestamp_seconds` | gauge | `customer` (the link's label) |
| `perksync_customers_linked` | gauge | |
| `perksync_healthy` | gauge | 1 or 0, as /healthz would answer at the scrape |
| `perksync_up` | gauge | always 1 |
| `perksync_build_info` | gauge | `version` |

A customer's last-sync series appears at its first successful poll (a missing
series means "never synced since the state was created or the service
started"); `configure()` drops the series of customers and servers that are no
longer in the configuration.

Health (`health(now)`): the service is unhealthy when

1. polls are failing: no poll has succeeded for `poll_stale_seconds`
   (default max(5 × interval, 300 s)), counted from the last success or from
   the start, and at least one poll failed or was skipped since then; or
2. polling has stalled: customers are linked but no poll finished at all
   (neither ok, failed nor skipped) for `poll_stale_seconds`; or
3. a server is failing: it has had delivery failures and no delivered command
   for `delivery_stale_seconds` (default 600 s) while its backlog is not known
   to be empty.

One customer whose token is revoked does not make the service unhealthy as
long as others succeed (see its own `perksync_last_successful_sync…` series).
Right after a start everything is healthy until a threshold has passed.

All methods are meant to be called from the event loop thread; the only thing
another thread may do is read `registry` (prometheus-client is thread-safe),
which is how daemon/http_api.py renders /metrics off the loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from daemon import __version__

DEFAULT_DELIVERY_STALE_SECONDS = 600.0
MIN_POLL_STALE_SECONDS = 300.0
POLL_STALE_INTERVALS = 5

POLL_OUTCOMES = ("ok", "failed", "skipped")
COMMAND_OUTCOMES = ("delivered", "failed", "skipped", "rejected")
# PayNowError kinds (daemon/paynow/errors.py) plus the engine's "unexpected": created at
# zero so that rate() and alerts work before the first error. Others still count.
KNOWN_API_ERROR_KINDS = (
    "auth",
    "not_found",
    "http_error",
    "unavailable",
    "timeout",
    "rate_limited",
    "bad_response",
    "unexpected",
)

_REASON_LIMIT = 160


def default_poll_stale_seconds(interval_seconds: float) -> float:
    """max(5 × interval, 300 s): a few missed polls are not yet an incident."""
    return max(POLL_STALE_INTERVALS * interval_seconds, MIN_POLL_STALE_SECONDS)


def _one_line(text: str, limit: int = _REASON_LIMIT) -> str:
    """`text` safe for a one-line health reason or STATUS= (no control characters)."""
    shown = "".join(ch if ch.isprintable() else " " for ch in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86_400:.0f} d"


class _ServerHealth:
    __slots__ = ("failing_since", "failures", "last_reason", "pending")

    def __init__(self) -> None:
        self.pending: int | None = None  # None: not reported yet
        self.failing_since: float | None = None  # first failure since the last delivery
        self.failures = 0  # delivery failures since the last delivery
        self.last_reason = ""


class PrometheusTelemetry:
    """The service's `Telemetry`: Prometheus metrics plus health and a summary line.

    `interval_seconds` is `sync.interval_seconds`; `customers` are the labels the
    engine passes to the poll hooks (`CustomerLink.describe(index)`), `servers`
    the configured server names (both optional; see `configure`). `clock` is
    unix time (it must agree with the `at` given to `poll_succeeded`).
    """

    def __init__(
        self,
        *,
        interval_seconds: float,
        customers: Iterable[str] | None = None,
        servers: Iterable[str] | None = None,
        poll_stale_seconds: float | None = None,
        delivery_stale_seconds: float = DEFAULT_DELIVERY_STALE_SECONDS,
        clock: Callable[[], float] = time.time,
        version: str = __version__,
        store_mode: bool = False,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        if poll_stale_seconds is not None and poll_stale_seconds <= 0:
            raise ValueError("poll_stale_seconds must be positive")
        if delivery_stale_seconds <= 0:
            raise ValueError("delivery_stale_seconds must be positive")
        self._clock = clock
        self.store_mode = store_mode  # the summary speaks of store reads, not customers
        self._interval = interval_seconds
        self._poll_stale_fixed = poll_stale_seconds
        self.delivery_stale_seconds = delivery_stale_seconds
        self.started_at = clock()
        # Since when this process polls (None: another host of the database does).
        self._polls_since: float | None = self.started_at

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._polls = Counter(
            "perksync_polls", "Customer inventory polls by outcome.", ["outcome"], registry=r
        )
        self._api_errors = Counter(
            "perksync_api_errors",
            "Failed customer polls by error kind (auth, unavailable, timeout, ...).",
            ["kind"],
            registry=r,
        )
        self._commands = Counter(
            "perksync_commands",
            "Journal rows that reached an outcome, by server.",
            ["server", "outcome"],
            registry=r,
        )
        self._delivery_failures = Counter(
            "perksync_delivery_failures",
            "Times a server could not be reached or broke mid-command (rows stay pending).",
            ["server"],
            registry=r,
        )
        self._backlog = Gauge(
            "perksync_journal_backlog",
            "Pending journal rows of a server, as last seen.",
            ["server"],
            registry=r,
        )
        self._last_sync = Gauge(
            "perksync_last_successful_sync_timestamp_seconds",
            "Unix time of the last complete, committed inventory read of a customer.",
            ["customer"],
            registry=r,
        )
        self._undelivered = Gauge(
            "perksync_undelivered_items",
            "Live items that reach no server, by product: its slug is not mapped in the "
            "config (unmapped) or the customer lacks the id its servers need (missing_id).",
            ["product", "reason"],
            registry=r,
        )
        self._undelivered_series: set[tuple[str, str]] = set()
        self._store_reads = Counter(
            "perksync_store_reads",
            "Store mode: reads of PayNow by kind (new_items, snapshot, look_up) and outcome.",
            ["read", "outcome"],
            registry=r,
        )
        self._last_store_read = Gauge(
            "perksync_last_store_read_timestamp_seconds",
            "Store mode: unix time of the last complete read of a kind.",
            ["read"],
            registry=r,
        )
        self._items_missing = Gauge(
            "perksync_items_missing",
            "Store mode: items held live that the last snapshot and their customer's "
            "items both lacked (they stay granted).",
            registry=r,
        )
        self._customers_linked = Gauge(
            "perksync_customers_linked", "Customers in the configuration.", registry=r
        )
        self._healthy = Gauge("perksync_healthy", "1 when /healthz answers ok, else 0.", registry=r)
        Gauge("perksync_up", "Always 1 while the service answers.", registry=r).set(1)
        Info("perksync_build", "perksync version.", registry=r).info({"version": version})
        for outcome in POLL_OUTCOMES:
            self._polls.labels(outcome)
        for kind in KNOWN_API_ERROR_KINDS:
            self._api_errors.labels(kind)

        # Health state.
        self._customers: set[str] | None = None  # None: not configured (count what is seen)
        self._seen_customers: set[str] = set()
        self._servers: dict[str, _ServerHealth] = {}
        self._configured_servers: set[str] = set()
        self._last_success: dict[str, float] = {}
        self._last_any_success: float | None = None
        self._last_poll_activity: float | None = None
        self._failed_since_success = 0
        self._skipped_since_success = 0
        self._last_failure_kind = ""
        self.configure(customers=customers, servers=servers)
        self.refresh()

    # ------------------------------------------------------------- configuration

    @property
    def interval_seconds(self) -> float:
        return self._interval

    @property
    def poll_stale_seconds(self) -> float:
        if self._poll_stale_fixed is not None:
            return self._poll_stale_fixed
        return default_poll_stale_seconds(self._interval)

    def configure(
        self,
        *,
        customers: Iterable[str] | None = None,
        servers: Iterable[str] | None = None,
        interval_seconds: float | None = None,
    ) -> None:
        """Tell the linked customers and servers (at start and after a reload).

        Series of customers and servers no longer listed are dropped; `None`
        leaves that part as it is. A derived poll threshold follows a new interval.
        """
        if interval_seconds is not None:
            if interval_seconds <= 0:
                raise ValueError("interval_seconds must be positive")
            self._interval = interval_seconds
        if customers is not None:
            wanted = set(customers)
            for label in list(self._last_success):
                if label not in wanted:
                    del self._last_success[label]
                    self._remove(self._last_sync, label)
            self._seen_customers &= wanted
            self._customers = wanted
        if servers is not None:
            wanted = set(servers)
            for name in list(self._servers):
                if name not in wanted:
                    self._drop_server(name)
            self._configured_servers = wanted
            for name in sorted(wanted):
                self._server(name)

    def _server(self, name: str) -> _ServerHealth:
        state = self._servers.get(name)
        if state is None:
            state = self._servers[name] = _ServerHealth()
            # Create the series at zero so that rate() and increase() see the first event.
            for outcome in COMMAND_OUTCOMES:
                self._commands.labels(name, outcome)
            self._delivery_failures.labels(name)
        return state

    def _drop_server(self, name: str) -> None:
        del self._servers[name]
        for outcome in COMMAND_OUTCOMES:
            self._remove(self._commands, name, outcome)
        self._remove(self._delivery_failures, name)
        self._remove(self._backlog, name)

    @staticmethod
    def _remove(metric: Counter | Gauge, *labels: str) -> None:
        # prometheus-client < 0.21 raises KeyError for a series never created.
        with contextlib.suppress(KeyError):
            metric.remove(*labels)

    # ---------------------------------------------------------- Telemetry hooks

    def poll_succeeded(self, label: str, at: float) -> None:
        self._polls.labels("ok").inc()
        self._last_sync.labels(label).set(at)
        self._last_success[label] = at
        self._seen_customers.add(label)
        if self._last_any_success is None or at > self._last_any_success:
            self._last_any_success = at
        self._last_poll_activity = max(at, self._last_poll_activity or at)
        self._failed_since_success = 0
        self._skipped_since_success = 0

    def poll_failed(self, label: str, kind: str) -> None:
        self._polls.labels("failed").inc()
        self._api_errors.labels(kind).inc()
        self._seen_customers.add(label)
        self._last_poll_activity = self._clock()
        self._failed_since_success += 1
        self._last_failure_kind = kind

    def poll_skipped(self, label: str) -> None:
        self._polls.labels("skipped").inc()
        self._seen_customers.add(label)
        self._last_poll_activity = self._clock()
        self._skipped_since_success += 1

    def command_finished(self, server: str, outcome: str) -> None:
        state = self._server(server)
        self._commands.labels(server, outcome).inc()
        if outcome in ("delivered", "rejected"):
            # The server answered: whatever failed before is over.
            state.failing_since = None
            state.failures = 0

    def delivery_failed(self, server: str, reason: str) -> None:
        state = self._server(server)
        self._delivery_failures.labels(server).inc()
        if state.failing_since is None:
            state.failing_since = self._clock()
        state.failures += 1
        state.last_reason = _one_line(reason)

    def backlog(self, server: str, pending: int) -> None:
        state = self._server(server)
        self._backlog.labels(server).set(pending)
        state.pending = pending
        if pending == 0:
            # Nothing is waiting, so nothing is failing to arrive.
            state.failing_since = None
            state.failures = 0

    def store_read(self, read: str, error_kind: str | None, at: float) -> None:
        """Counted like a poll for health: a failing store is as unhealthy."""
        if error_kind is None:
            self._store_reads.labels(read, "ok").inc()
            self._last_store_read.labels(read).set(at)
            self._last_any_success = max(at, self._last_any_success or at)
            self._last_poll_activity = max(at, self._last_poll_activity or at)
            self._failed_since_success = 0
            self._skipped_since_success = 0
        else:
            self._store_reads.labels(read, "failed").inc()
            self._api_errors.labels(error_kind).inc()
            self._last_poll_activity = self._clock()
            self._failed_since_success += 1
            self._last_failure_kind = error_kind

    def items_missing(self, count: int) -> None:
        self._items_missing.set(count)

    def undelivered(self, unmapped: Mapping[str, int], missing_id: Mapping[str, int]) -> None:
        series = {(slug, "unmapped"): n for slug, n in unmapped.items() if n}
        series.update({(slug, "missing_id"): n for slug, n in missing_id.items() if n})
        for gone in self._undelivered_series - series.keys():
            self._remove(self._undelivered, *gone)
        for (slug, reason), count in series.items():
            self._undelivered.labels(slug, reason).set(count)
        self._undelivered_series = set(series)

    # ------------------------------------------------------------------- health

    def health(self, now: float | None = None) -> tuple[bool, str]:
        """(True, "ok") or (False, one line naming every reason, "; "-separated)."""
        now = self._clock() if now is None else now
        reasons: list[str] = [] if self._polls_since is None else self._poll_reasons(now)
        for name in sorted(self._servers):
            state = self._servers[name]
            if state.failing_since is None or state.pending == 0:
                continue
            failing_for = now - state.failing_since
            if failing_for > self.delivery_stale_seconds:
                pending = "?" if state.pending is None else str(state.pending)
                reasons.append(
                    f"server {name}: {pending} pending, {state.failures} delivery failures "
                    f"and nothing delivered for {_ago(failing_for)} (last: {state.last_reason})"
                )
        if reasons:
            return False, "; ".join(reasons)
        return True, "ok"

    def polls_here(self, polling: bool) -> None:
        """Several hosts on one database: whether this one polls now (the
        health rules about polls hold only while it does, from then on)."""
        if polling and self._polls_since is None:
            self._polls_since = self._clock()
        elif not polling:
            self._polls_since = None

    def _poll_reasons(self, now: float) -> list[str]:
        """Why polling is unhealthy (see `health`)."""
        reasons: list[str] = []
        start = self._polls_since or self.started_at
        limit = self.poll_stale_seconds
        since = max(self._last_any_success or start, start)
        troubled = self._failed_since_success + self._skipped_since_success
        if now - since > limit and troubled:
            parts = []
            if self._failed_since_success:
                parts.append(
                    f"{self._failed_since_success} failed (last: {self._last_failure_kind})"
                )
            if self._skipped_since_success:
                parts.append(f"{self._skipped_since_success} skipped (overrunning)")
            what = "no poll succeeded" if self._last_any_success is None else "no successful poll"
            reasons.append(f"{what} for {_ago(now - since)}: {', '.join(parts)}")
        elif self._linked_count():
            # (A failure or skip since `since` would make `active` recent too.)
            active = max(self._last_poll_activity or start, start)
            if now - active > limit:
                reasons.append(
                    f"no poll finished for {_ago(now - active)} "
                    f"({self._linked_count()} customers linked)"
                )
        return reasons

    def refresh(self, now: float | None = None) -> None:
        """Update the derived gauges before a scrape (on the loop thread)."""
        self._customers_linked.set(self._linked_count())
        self._healthy.set(1 if self.health(now)[0] else 0)

    # ------------------------------------------------------------------ summary

    def _linked_count(self) -> int:
        return len(self._customers) if self._customers is not None else len(self._seen_customers)

    def summary(self, now: float | None = None) -> str:
        """One line for systemd's STATUS=, e.g.
        "10000 customers (9998 synced), last poll ok 3 s ago, 0 pending, 2/2 servers up"."""
        now = self._clock() if now is None else now
        what = "read" if self.store_mode else "poll"
        if self.store_mode:
            parts = ["store mode"]
        else:
            parts = [f"{self._linked_count()} customers ({len(self._last_success)} synced)"]
        if self._last_any_success is None:
            parts.append(f"no {what} ok yet")
        else:
            parts.append(f"last {what} ok {_ago(now - self._last_any_success)} ago")
        parts.append(f"{sum(s.pending or 0 for s in self._servers.values())} pending")
        if self._servers:
            up = sum(1 for s in self._servers.values() if s.failing_since is None)
            parts.append(f"{up}/{len(self._servers)} servers up")
        else:
            parts.append("no servers")
        line = ", ".join(parts)
        healthy, reason = self.health(now)
        if not healthy:
            line += f"; UNHEALTHY: {reason}"
        return _one_line(line, 400)


__all__ = [
    "COMMAND_OUTCOMES",
    "DEFAULT_DELIVERY_STALE_SECONDS",
    "KNOWN_API_ERROR_KINDS",
    "MIN_POLL_STALE_SECONDS",
    "POLL_OUTCOMES",
    "PrometheusTelemetry",
    "default_poll_stale_seconds",
]
