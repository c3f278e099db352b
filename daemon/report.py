"""What a pass (or an interval of the service) did: counted as it happens by
the sources, apply and delivery; told in one summary line and, for a pass,
its exit status (0 all done, 3 something not delivered)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from daemon.undelivered import live_items_phrase


@dataclass(slots=True)
class PassReport:
    """What happened since it was created: the line a pass (or a service
    interval) ends with, and the exit status of a pass."""

    polls_ok: int = 0
    polls_failed: int = 0
    customers_failed: dict[str, str] = field(default_factory=dict)  # label → error
    journaled: int = 0
    expired_locally: int = 0
    delivered: Counter[str] = field(default_factory=Counter)  # server → count
    failed: Counter[str] = field(default_factory=Counter)  # server → newly failed rows
    skipped: Counter[str] = field(default_factory=Counter)  # server → null-placeholder skips
    rejected: Counter[str] = field(default_factory=Counter)  # server → error replies
    pending_left: dict[str, int] = field(default_factory=dict)  # server → rows still pending
    # server → rows waiting (for a player, a delay): left so by design, no exit 3
    waiting_left: dict[str, int] = field(default_factory=dict)
    # Several hosts: server → rows pending for servers of other sites (their hosts send them)
    left_to_others: dict[str, int] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # server → why it stopped
    undelivered_items: int = 0  # live items that reach no server (warned about; no exit 3)

    def take(self) -> PassReport:
        """What was counted so far, as a report of its own; this one starts
        again from zero (the service's summary per interval)."""
        taken = PassReport(**{name: getattr(self, name) for name in self.__slots__})
        fresh = PassReport()
        for name in self.__slots__:
            setattr(self, name, getattr(fresh, name))
        return taken

    @property
    def exit_code(self) -> int:
        undelivered = (
            sum(self.failed.values())
            or sum(self.rejected.values())
            or any(self.pending_left.values())
        )
        return 3 if self.customers_failed or undelivered else 0

    def summary(
        self, *, service: bool = False, dry_run: bool = False, store_mode: bool = False
    ) -> str:
        """`pass done: …` after a pass, which polls each linked customer once;
        `last interval: …` in the service, which counts polls (a customer may
        be polled several times in an interval, or not at all). Store mode
        counts its reads of the store instead (new items, snapshots,
        look-ups). A dry run printed, rather than delivered, its commands."""
        if store_mode:
            reads = self.polls_ok + self.polls_failed
            parts = [f"{reads} store reads ({self.polls_failed} failed)"]
        elif service:
            polls = self.polls_ok + self.polls_failed
            parts = [f"{polls} polls ({self.polls_failed} failed)"]
        else:
            failed = len(self.customers_failed)
            parts = [f"{self.polls_ok + failed} customers polled ({failed} failed)"]
        if self.expired_locally:
            parts.append(f"{self.expired_locally} expired locally")
        parts += [
            f"{self.journaled} commands journaled",
            f"{sum(self.delivered.values())} {'printed' if dry_run else 'delivered'}",
            f"{sum(self.failed.values())} failed",
            f"{sum(self.skipped.values())} skipped",
        ]
        if rejected := sum(self.rejected.values()):
            parts.append(f"{rejected} rejected")
        parts.append(f"{sum(self.pending_left.values())} pending" + _per_server(self.pending_left))
        if waiting := sum(self.waiting_left.values()):
            parts.append(f"{waiting} waiting" + _per_server(self.waiting_left))
        if others := sum(self.left_to_others.values()):
            parts.append(
                f"{others} pending for other sites' hosts" + _per_server(self.left_to_others)
            )
        text = ("last interval: " if service else "pass done: ") + ", ".join(parts)
        if self.undelivered_items:
            items = live_items_phrase(self.undelivered_items)
            reach = "reaches" if self.undelivered_items == 1 else "reach"
            # A pass has just warned about each; the service may have done so days ago.
            where = "perksync status lists them" if service else "see the warnings above"
            text += f"; {items} {reach} no server ({where})"
        return text


def _per_server(counts: dict[str, int]) -> str:
    named = ", ".join(f"{server}: {n}" for server, n in sorted(counts.items()) if n)
    return f" ({named})" if named else ""
