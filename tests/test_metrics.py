"""PrometheusTelemetry: counters and gauges follow the hooks; the health model; summary."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import PrometheusTelemetry, default_poll_stale_seconds
from daemon.telemetry import Telemetry

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None, **kwargs: object) -> tuple[PrometheusTelemetry, Clock]:
    clock = clock or Clock()
    kwargs.setdefault("interval_seconds", 60.0)
    return PrometheusTelemetry(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def value(t: PrometheusTelemetry, name: str, **labels: str) -> float | None:
    return t.registry.get_sample_value(name, labels)


def test_is_a_telemetry() -> None:
    t, _ = make()
    hook: Telemetry = t  # mypy checks the protocol; this checks nothing is missing at runtime
    for name in (
        "poll_succeeded",
        "poll_failed",
        "poll_skipped",
        "command_finished",
        "delivery_failed",
        "backlog",
        "undelivered",
    ):
        assert callable(getattr(hook, name))


def test_poll_counters_and_last_sync_gauge() -> None:
    t, _ = make(customers=["alice", "bob"])
    assert value(t, "perksync_polls_total", outcome="ok") == 0
    assert value(t, "perksync_api_errors_total", kind="auth") == 0
    t.poll_succeeded("alice", T0 + 5)
    t.poll_succeeded("alice", T0 + 65)
    t.poll_failed("bob", "auth")
    t.poll_failed("bob", "auth")
    t.poll_failed("bob", "some_new_kind")
    t.poll_skipped("alice")
    assert value(t, "perksync_polls_total", outcome="ok") == 2
    assert value(t, "perksync_polls_total", outcome="failed") == 3
    assert value(t, "perksync_polls_total", outcome="skipped") == 1
    assert value(t, "perksync_api_errors_total", kind="auth") == 2
    assert value(t, "perksync_api_errors_total", kind="some_new_kind") == 1
    assert value(t, "perksync_last_successful_sync_timestamp_seconds", customer="alice") == T0 + 65
    # Never synced: no series (not a misleading 0).
    assert value(t, "perksync_last_successful_sync_timestamp_seconds", customer="bob") is None


def test_server_counters_and_backlog() -> None:
    t, _ = make(servers=["survival", "jailbreak"])
    # Configured servers start at zero so rate() sees their first event.
    assert value(t, "perksync_commands_total", server="jailbreak", outcome="delivered") == 0
    assert value(t, "perksync_delivery_failures_total", server="jailbreak") == 0
    t.command_finished("survival", "delivered")
    t.command_finished("survival", "delivered")
    t.command_finished("survival", "failed")
    t.command_finished("survival", "skipped")
    t.delivery_failed("jailbreak", "connection refused")
    t.backlog("jailbreak", 7)
    t.backlog("survival", 0)
    assert value(t, "perksync_commands_total", server="survival", outcome="delivered") == 2
    assert value(t, "perksync_commands_total", server="survival", outcome="failed") == 1
    assert value(t, "perksync_commands_total", server="survival", outcome="skipped") == 1
    assert value(t, "perksync_delivery_failures_total", server="jailbreak") == 1
    assert value(t, "perksync_journal_backlog", server="jailbreak") == 7
    assert value(t, "perksync_journal_backlog", server="survival") == 0
    # A server that is not configured still counts (the engine knows best).
    t.command_finished("legacy", "delivered")
    assert value(t, "perksync_commands_total", server="legacy", outcome="delivered") == 1


def test_static_metrics_and_exposition_parses() -> None:
    t, _ = make(customers=["a", "b", "c"], version="9.9.9")
    t.poll_succeeded("a", T0)
    t.refresh()
    assert value(t, "perksync_up") == 1
    assert value(t, "perksync_build_info", version="9.9.9") == 1
    assert value(t, "perksync_customers_linked") == 3
    assert value(t, "perksync_healthy") == 1
    names = {f.name for f in text_string_to_metric_families(generate_latest(t.registry).decode())}
    assert {
        "perksync_polls",
        "perksync_api_errors",
        "perksync_commands",
        "perksync_delivery_failures",
        "perksync_last_successful_sync_timestamp_seconds",
        "perksync_up",
        "perksync_build_info",
    } <= names


def test_separate_registries_do_not_collide() -> None:
    a, _ = make()
    b, _ = (
        make()
    )  # a second instance (a reload, another test) must not raise "Duplicated timeseries"
    a.poll_failed("x", "timeout")
    assert value(a, "perksync_polls_total", outcome="failed") == 1
    assert value(b, "perksync_polls_total", outcome="failed") == 0


def test_configure_drops_series_of_removed_customers_and_servers() -> None:
    t, _ = make(customers=["alice", "bob"], servers=["survival", "jailbreak"])
    t.poll_succeeded("alice", T0)
    t.poll_succeeded("bob", T0)
    t.backlog("jailbreak", 3)
    t.configure(customers=["alice"], servers=["survival"])
    t.refresh()
    assert value(t, "perksync_last_successful_sync_timestamp_seconds", customer="alice") == T0
    assert value(t, "perksync_last_successful_sync_timestamp_seconds", customer="bob") is None
    assert value(t, "perksync_journal_backlog", server="jailbreak") is None
    assert value(t, "perksync_commands_total", server="jailbreak", outcome="delivered") is None
    assert value(t, "perksync_commands_total", server="survival", outcome="delivered") == 0
    assert value(t, "perksync_customers_linked") == 1


def test_undelivered_items_gauge_per_product() -> None:
    t, _ = make()
    t.undelivered({"gem": 3}, {"vip": 2, "kit": 1})
    assert value(t, "perksync_undelivered_items", product="gem", reason="unmapped") == 3
    assert value(t, "perksync_undelivered_items", product="vip", reason="missing_id") == 2
    assert value(t, "perksync_undelivered_items", product="kit", reason="missing_id") == 1
    # Each report replaces the last: a product no longer reported loses its series.
    t.undelivered({"gem": 4}, {"kit": 0})
    assert value(t, "perksync_undelivered_items", product="gem", reason="unmapped") == 4
    assert value(t, "perksync_undelivered_items", product="vip", reason="missing_id") is None
    assert value(t, "perksync_undelivered_items", product="kit", reason="missing_id") is None
    exposition = generate_latest(t.registry).decode()
    assert 'perksync_undelivered_items{product="gem",reason="unmapped"} 4.0' in exposition


def test_default_poll_threshold() -> None:
    assert default_poll_stale_seconds(5) == 300
    assert default_poll_stale_seconds(60) == 300
    assert default_poll_stale_seconds(600) == 3000
    t, _ = make(interval_seconds=600)
    assert t.poll_stale_seconds == 3000
    t.configure(interval_seconds=30)
    assert t.poll_stale_seconds == 300
    fixed, _ = make(poll_stale_seconds=42)
    fixed.configure(interval_seconds=3600)
    assert fixed.poll_stale_seconds == 42


def test_failing_polls_turn_unhealthy_after_the_threshold_and_back_on_success() -> None:
    t, clock = make(customers=["alice"], poll_stale_seconds=300)
    t.poll_failed("alice", "unavailable")
    clock.now = T0 + 299
    # Right after the start: failures, but not for long enough.
    assert t.health() == (True, "ok")
    t.poll_failed("alice", "timeout")
    clock.now = T0 + 301
    healthy, reason = t.health()
    assert not healthy
    assert "no poll succeeded" in reason
    assert "2 failed (last: timeout)" in reason
    assert "\n" not in reason
    t.refresh()
    assert value(t, "perksync_healthy") == 0

    t.poll_succeeded("alice", T0 + 302)
    clock.now = T0 + 303
    assert t.health() == (True, "ok")
    # Failing again: the threshold counts from the last success, not from the start.
    t.poll_failed("alice", "unavailable")
    clock.now = T0 + 302 + 300
    assert t.health()[0]
    clock.now = T0 + 302 + 301
    healthy, reason = t.health()
    assert not healthy
    assert "no successful poll for" in reason


def test_one_broken_customer_does_not_make_the_service_unhealthy() -> None:
    t, clock = make(customers=["alice", "bob"], poll_stale_seconds=300)
    for minute in range(1, 20):
        clock.now = T0 + 60 * minute
        t.poll_failed("bob", "auth")
        t.poll_succeeded("alice", clock.now)
    assert t.health() == (True, "ok")


def test_skipped_polls_count_as_trouble() -> None:
    t, clock = make(customers=["alice"], poll_stale_seconds=300)
    t.poll_skipped("alice")
    clock.now = T0 + 400
    healthy, reason = t.health()
    assert not healthy
    assert "1 skipped" in reason


def test_stalled_polling_is_unhealthy_only_with_linked_customers() -> None:
    t, clock = make(customers=["alice"], poll_stale_seconds=300)
    clock.now = T0 + 200
    assert t.health()[0]
    clock.now = T0 + 301
    healthy, reason = t.health()
    assert not healthy
    assert "no poll finished" in reason
    nobody, clock2 = make(customers=[], poll_stale_seconds=300)
    clock2.now = T0 + 10_000
    assert nobody.health() == (True, "ok")


def test_a_host_that_does_not_poll_is_not_unhealthy_for_want_of_polls() -> None:
    """Several hosts on one database: one polls; the others stand by."""
    t, clock = make(customers=["alice"], poll_stale_seconds=300)
    t.polls_here(False)
    clock.now = T0 + 10_000
    assert t.health() == (True, "ok")
    # It takes polling over: the rules count from then on.
    t.polls_here(True)
    clock.now = T0 + 10_000 + 299
    assert t.health() == (True, "ok")
    clock.now = T0 + 10_000 + 301
    healthy, reason = t.health()
    assert not healthy and "no poll finished for 5 min" in reason


def test_health_now_argument_overrides_the_clock() -> None:
    t, _ = make(customers=["alice"], poll_stale_seconds=300)
    t.poll_failed("alice", "unavailable")
    assert t.health(T0 + 10)[0]
    assert not t.health(T0 + 1000)[0]


def test_server_with_only_delivery_failures_turns_unhealthy() -> None:
    t, clock = make(servers=["survival", "jailbreak"], delivery_stale_seconds=600)
    t.backlog("jailbreak", 4)
    t.delivery_failed("jailbreak", "connection refused")
    clock.now = T0 + 300
    t.delivery_failed("jailbreak", "auth failed\nsecond line")
    clock.now = T0 + 599
    assert t.health()[0]
    clock.now = T0 + 601
    healthy, reason = t.health()
    assert not healthy
    assert "server jailbreak" in reason
    assert "4 pending" in reason
    assert "2 delivery failures" in reason
    assert "auth failed second line" in reason  # one line, whatever the engine's text was
    assert "survival" not in reason
    # The server answers again: healthy at once.
    t.command_finished("jailbreak", "delivered")
    assert t.health() == (True, "ok")


def test_delivery_failures_without_pending_rows_are_healthy() -> None:
    t, clock = make(servers=["survival"], delivery_stale_seconds=600)
    t.delivery_failed("survival", "connection refused")
    t.backlog("survival", 0)  # nothing waits for it
    clock.now = T0 + 10_000
    assert t.health() == (True, "ok")
    # Work arrives and keeps failing: the clock starts from that failure.
    t.backlog("survival", 2)
    t.delivery_failed("survival", "timeout")
    clock.now = T0 + 10_000 + 601
    assert not t.health()[0]


def test_permanent_command_failures_do_not_clear_a_failing_server() -> None:
    t, clock = make(servers=["survival"], delivery_stale_seconds=600)
    t.backlog("survival", 5)
    t.delivery_failed("survival", "timeout")
    t.command_finished("survival", "failed")  # a command refused for good: not a sign of life
    clock.now = T0 + 700
    assert not t.health()[0]


def test_rejected_commands_are_counted_and_show_the_server_answers() -> None:
    t, clock = make(servers=["survival"], delivery_stale_seconds=600)
    assert value(t, "perksync_commands_total", server="survival", outcome="rejected") == 0
    t.backlog("survival", 5)
    t.delivery_failed("survival", "timeout")
    t.command_finished("survival", "rejected")  # an error reply is still an answer
    clock.now = T0 + 700
    assert t.health() == (True, "ok")
    assert value(t, "perksync_commands_total", server="survival", outcome="rejected") == 1


def test_both_reasons_are_reported() -> None:
    t, clock = make(customers=["a"], servers=["s"], poll_stale_seconds=300)
    t.poll_failed("a", "unavailable")
    t.backlog("s", 1)
    t.delivery_failed("s", "refused")
    clock.now = T0 + 1000
    healthy, reason = t.health()
    assert not healthy
    assert "no poll succeeded" in reason
    assert "server s" in reason
    assert "; " in reason


def test_summary() -> None:
    customers = [f"c{i}" for i in range(10_000)]
    t, clock = make(customers=customers, servers=["survival", "jailbreak"])
    assert t.summary() == "10000 customers (0 synced), no poll ok yet, 0 pending, 2/2 servers up"
    for label in customers[:9_998]:
        t.poll_succeeded(label, T0)
    t.backlog("survival", 3)
    t.backlog("jailbreak", 2)
    t.delivery_failed("jailbreak", "refused")
    clock.now = T0 + 3
    assert (
        t.summary()
        == "10000 customers (9998 synced), last poll ok 3 s ago, 5 pending, 1/2 servers up"
    )
    clock.now = T0 + 3 + 3600
    line = t.summary()
    assert line.startswith("10000 customers (9998 synced), last poll ok 60 min ago")
    assert "UNHEALTHY: " in line
    assert "server jailbreak" in line
    assert "\n" not in line


def test_summary_without_configure_counts_seen_customers() -> None:
    t, _ = make()
    t.poll_succeeded("a", T0)
    t.poll_failed("b", "auth")
    assert t.summary().startswith(
        "2 customers (1 synced), last poll ok 0 s ago, 0 pending, no servers"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval_seconds": 0},
        {"interval_seconds": 60, "poll_stale_seconds": 0},
        {"interval_seconds": 60, "delivery_stale_seconds": -1},
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrometheusTelemetry(**kwargs)  # type: ignore[arg-type]
