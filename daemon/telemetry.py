"""What the engine reports as it works: the hook behind metrics and health.

The engine calls a `Telemetry`; `--sync-now` uses the no-op `NullTelemetry`,
the service a Prometheus-backed one (daemon/metrics.py) that also answers
/healthz. Keeping the hook this small keeps prometheus-client out of the
engine and out of one-shot runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Telemetry(Protocol):
    def poll_succeeded(self, label: str, at: float) -> None:
        """A customer's whole inventory was read and committed (`at`: unix time)."""

    def poll_failed(self, label: str, kind: str) -> None:
        """Polling a customer failed; `kind` is PayNowError.kind or "unexpected"."""

    def poll_skipped(self, label: str) -> None:
        """A poll was due while the previous one of the same customer still ran."""

    def command_finished(self, server: str, outcome: str) -> None:
        """A journal row reached an outcome: "delivered", "failed", "skipped" or
        "rejected" (the server's reply was an error)."""

    def delivery_failed(self, server: str, reason: str) -> None:
        """The server could not be reached or broke mid-command (rows stay pending)."""

    def backlog(self, server: str, pending: int) -> None:
        """The number of pending journal rows of a server, as last seen."""

    def store_read(self, read: str, error_kind: str | None, at: float) -> None:
        """Store mode: a read ("new_items", "snapshot", "look_up") finished at
        unix time `at`, complete (`error_kind` None) or not."""

    def items_missing(self, count: int) -> None:
        """Store mode: items held live that the last snapshot and look-ups lacked."""

    def undelivered(self, unmapped: Mapping[str, int], missing_id: Mapping[str, int]) -> None:
        """Live items that reach no server, per product slug, as last checked:
        of products the config does not map, and of mapped products whose
        customers lack the id every server of the product needs."""


class NullTelemetry:
    """Reports nowhere (one-shot runs)."""

    def poll_succeeded(self, label: str, at: float) -> None:
        pass

    def poll_failed(self, label: str, kind: str) -> None:
        pass

    def poll_skipped(self, label: str) -> None:
        pass

    def command_finished(self, server: str, outcome: str) -> None:
        pass

    def delivery_failed(self, server: str, reason: str) -> None:
        pass

    def backlog(self, server: str, pending: int) -> None:
        pass

    def store_read(self, read: str, error_kind: str | None, at: float) -> None:
        pass

    def items_missing(self, count: int) -> None:
        pass

    def undelivered(self, unmapped: Mapping[str, int], missing_id: Mapping[str, int]) -> None:
        pass
