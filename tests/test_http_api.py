"""The /healthz and /metrics listener, on a real loopback socket."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon import http_api
from daemon.http_api import (
    ListenError,
    bound_addresses,
    is_loopback,
    parse_listen,
    start_http,
    stop_http,
)
from daemon.metrics import PrometheusTelemetry

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def fetch(
    session: aiohttp.ClientSession, base: str, path: str, method: str = "GET"
) -> tuple[int, str, str]:
    async with session.request(method, base + path) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def test_healthz_metrics_and_404() -> None:
    clock = Clock()
    telemetry = PrometheusTelemetry(
        interval_seconds=60, customers=["alice", "bob"], servers=["survival"], clock=clock
    )

    async def scenario() -> None:
        runner = await start_http("127.0.0.1:0", telemetry)
        try:
            [(host, port)] = bound_addresses(runner)
            assert host == "127.0.0.1"
            assert port > 0
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session:
                assert await fetch(session, base, "/healthz") == (
                    200,
                    "text/plain; charset=utf-8",
                    "ok\n",
                )

                telemetry.poll_succeeded("alice", T0 + 1)
                telemetry.poll_failed("bob", "auth")
                telemetry.command_finished("survival", "delivered")
                telemetry.backlog("survival", 3)
                telemetry.delivery_failed("survival", "connection refused")
                status, ctype, text = await fetch(session, base, "/metrics")
                assert status == 200
                assert ctype.startswith("text/plain; version=")
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }
                assert samples[("perksync_polls_total", (("outcome", "ok"),))] == 1
                assert samples[("perksync_polls_total", (("outcome", "failed"),))] == 1
                assert samples[("perksync_api_errors_total", (("kind", "auth"),))] == 1
                key = (
                    "perksync_commands_total",
                    (("outcome", "delivered"), ("server", "survival")),
                )
                assert samples[key] == 1
                assert samples[("perksync_journal_backlog", (("server", "survival"),))] == 3
                assert samples[("perksync_delivery_failures_total", (("server", "survival"),))] == 1
                last = ("perksync_last_successful_sync_timestamp_seconds", (("customer", "alice"),))
                assert samples[last] == T0 + 1
                assert samples[("perksync_healthy", ())] == 1

                # Ten minutes of nothing but delivery failures: 503 with the reason.
                clock.now = T0 + 700
                status, ctype, text = await fetch(session, base, "/healthz")
                assert status == 503
                assert ctype.startswith("text/plain")
                assert text.endswith("\n")
                assert text.count("\n") == 1
                assert "server survival: 3 pending" in text
                assert "connection refused" in text
                status, _, text = await fetch(session, base, "/metrics")
                assert "perksync_healthy 0.0" in text

                status, _, text = await fetch(session, base, "/")
                assert status == 404
                status, _, _ = await fetch(session, base, "/metrics/extra")
                assert status == 404
                status, _, _ = await fetch(session, base, "/healthz", method="POST")
                assert status == 405
        finally:
            await stop_http(runner)
        # Stopped means closed.
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()

    asyncio.run(scenario())


def test_metrics_of_ten_thousand_customers_do_not_block_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    telemetry = PrometheusTelemetry(interval_seconds=60)
    for i in range(10_000):
        telemetry.poll_succeeded(f"customer {i}", T0)
    ticks = 0
    renders: list[tuple[int, int, int]] = []  # (thread, ticks before, ticks after)

    def spied_render(registry: Any) -> bytes:
        # The real rendering, noting where it ran and whether the loop ran meanwhile.
        before = ticks
        body = generate_latest(registry)
        renders.append((threading.get_ident(), before, ticks))
        return body

    monkeypatch.setattr(http_api, "generate_latest", spied_render)

    async def scenario() -> None:
        runner = await start_http("127.0.0.1:0", telemetry)
        try:
            [(_, port)] = bound_addresses(runner)

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            task = asyncio.create_task(ticker())
            async with aiohttp.ClientSession() as session:
                status, _, text = await fetch(session, f"http://127.0.0.1:{port}", "/metrics")
            task.cancel()
            assert status == 200
            assert text.count("perksync_last_successful_sync_timestamp_seconds{") == 10_000
        finally:
            await stop_http(runner)

    asyncio.run(scenario())
    # Rendered in a worker thread, and the loop kept ticking while it ran (the
    # GIL changes hands every 5 ms; rendered on the loop, no tick could run).
    ((thread, before, after),) = renders
    assert thread != threading.get_ident()
    assert after > before


def test_ipv6_loopback() -> None:
    telemetry = PrometheusTelemetry(interval_seconds=60)

    async def scenario() -> None:
        try:
            runner = await start_http("[::1]:0", telemetry)
        except ListenError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        try:
            [(host, port)] = bound_addresses(runner)
            assert host == "::1"
            async with aiohttp.ClientSession() as session:
                status, _, text = await fetch(session, f"http://[::1]:{port}", "/healthz")
            assert (status, text) == (200, "ok\n")
        finally:
            await stop_http(runner)

    asyncio.run(scenario())


def test_non_loopback_is_allowed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = PrometheusTelemetry(interval_seconds=60)

    async def scenario() -> None:
        runner = await start_http("0.0.0.0:0", telemetry)
        await stop_http(runner)

    with caplog.at_level(logging.WARNING, logger="perksync.http"):
        asyncio.run(scenario())
    assert any("not a loopback address" in r.getMessage() for r in caplog.records)


def test_loopback_address_gives_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = PrometheusTelemetry(interval_seconds=60)

    async def scenario() -> None:
        runner = await start_http("127.0.0.1:0", telemetry)
        await stop_http(runner)

    with caplog.at_level(logging.WARNING, logger="perksync.http"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_address_in_use_is_one_line_naming_the_address() -> None:
    telemetry = PrometheusTelemetry(interval_seconds=60)

    async def scenario() -> None:
        first = await start_http("127.0.0.1:0", telemetry)
        try:
            [(_, port)] = bound_addresses(first)
            with pytest.raises(ListenError) as caught:
                await start_http(f"127.0.0.1:{port}", telemetry)
        finally:
            await stop_http(first)
        assert str(caught.value) == (
            f"http.listen 127.0.0.1:{port}: cannot listen there: address already in use; "
            "something else listens there: stop it, or choose another port"
        )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("localhost:0", ("localhost", 0)),
        (" 10.8.0.1:80 ", ("10.8.0.1", 80)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9108", ":9108", "127.0.0.1:", "127.0.0.1:http", "h:70000"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(listen)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.8.0.1", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
