"""The summary lines: `pass done: …` of a pass, `last interval: …` of the service."""

from __future__ import annotations

from collections import Counter

from daemon.report import PassReport


def test_a_pass_counts_customers() -> None:
    report = PassReport(polls_ok=2, customers_failed={"bob": "HTTP 503"}, journaled=5)
    report.delivered = Counter({"survival": 3})
    report.pending_left = {"lobby": 2, "survival": 0}
    assert report.summary() == (
        "pass done: 3 customers polled (1 failed), 5 commands journaled, 3 delivered, "
        "0 failed, 0 skipped, 2 pending (lobby: 2)"
    )
    assert report.exit_code == 3


def test_the_service_counts_polls_and_failed_polls() -> None:
    # Three customers, four polls in the interval: bob failed once, then succeeded.
    report = PassReport(polls_ok=3, polls_failed=1, expired_locally=1)
    report.pending_left = {"lobby": 2}
    assert report.summary(service=True) == (
        "last interval: 4 polls (1 failed), 1 expired locally, 0 commands journaled, "
        "0 delivered, 0 failed, 0 skipped, 2 pending (lobby: 2)"
    )


def test_live_items_that_reach_no_server_are_told_without_changing_the_exit_status() -> None:
    report = PassReport(polls_ok=1, undelivered_items=1)
    assert report.summary().endswith(
        "0 pending; 1 live item reaches no server (see the warnings above)"
    )
    report.undelivered_items = 3
    assert report.summary(service=True).endswith(
        "; 3 live items reach no server (perksync status lists them)"
    )
    assert report.exit_code == 0
