"""PayNow's webhooks: the signature check (pure), and the service in-process
with webhooks on `http.listen`, against the Management fake (which signs,
forges and replays them) and an RCON fake.

The service's reads are set an hour apart, so that only a webhook can
explain a delivery within the test; waits are bounded polls of a condition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.config import load_settings
from daemon.http_api import bound_addresses
from daemon.service import Service
from daemon.sources.store import CURSOR, LAST_SNAPSHOT, LAST_WEBHOOK
from daemon.sources.webhooks import Forged, read_event, signature, verify
from daemon.state import Store, open_store
from tests.fakes.paynow_store import TAMPERS, FakeStore, WebhookResult, sign_webhook
from tests.fakes.rcon_server import FakeRconServer, unused_port
from tests.store_rig import VIP, old, run_async, write_store_config

SECRET = "whsec-test-SECRET"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
HOUR = {"interval_seconds": 3600, "new_items_seconds": 3600}


# --- the signature check -----------------------------------------------------------------


def signed(body: bytes, at: datetime = NOW, encoding: str = "hex") -> dict[str, str]:
    stamp = int(at.timestamp() * 1000)
    return {
        "PayNow-Timestamp": str(stamp),
        "PayNow-Signature": sign_webhook(SECRET, stamp, body, encoding),
    }


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_a_signature_in_hex_or_base64_is_accepted(encoding: str) -> None:
    body = b'{"event_id":"1","event_type":"ON_DELIVERY_ITEM_ADDED","body":{}}'
    verify(SECRET.encode(), signed(body, encoding=encoding), body, NOW)
    urlsafe = base64.urlsafe_b64encode(signature(SECRET.encode(), "1", body)).decode().rstrip("=")
    verify(SECRET.encode(), {"PayNow-Timestamp": "1", "PayNow-Signature": urlsafe}, body,
           datetime.fromtimestamp(0.001, UTC))  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "at", "why"),
    [
        ({}, NOW, "no PayNow-Signature or PayNow-Timestamp header"),
        (signed(b"{}", NOW - timedelta(seconds=301)), NOW, "is 301 s old"),
        (signed(b"{}", NOW + timedelta(seconds=301)), NOW, "is 301 s in the future"),
        ({**signed(b"{}"), "PayNow-Timestamp": "1.5e12"}, NOW, "not Unix milliseconds"),
        ({**signed(b"{}"), "PayNow-Signature": "00" * 32}, NOW, "does not match"),
    ],
)
def test_forged_or_stale_requests_are_refused(
    headers: dict[str, str], at: datetime, why: str
) -> None:
    with pytest.raises(Forged, match=why) as info:
        verify(SECRET.encode(), headers, b"{}", at)
    assert SECRET not in str(info.value)


def test_a_request_within_five_minutes_either_way_is_fresh() -> None:
    for shift in (-299, 299):
        verify(SECRET.encode(), signed(b"{}", NOW + timedelta(seconds=shift)), b"{}", NOW)


@pytest.mark.parametrize(
    ("payload", "customer"),
    [
        (
            {
                "event_id": "7",
                "event_type": "ON_DELIVERY_ITEM_ADDED",
                "body": {"customer": {"id": "42"}},
            },
            "42",
        ),
        (
            {
                "event_id": 7,
                "event_type": "ON_DELIVERY_ITEM_REVOKED",
                "body": {"customer": {"id": 42}},
            },
            "42",
        ),
        (
            {"event_id": "7", "event_type": "ON_DELIVERY_ITEM_ADDED", "body": {"customer": None}},
            None,
        ),
        (
            {
                "event_id": "7",
                "event_type": "ON_ORDER_COMPLETED",
                "body": {"customer": {"id": "42"}},
            },
            None,
        ),
    ],
)
def test_read_event_finds_whose_items_to_read(
    payload: dict[str, Any], customer: str | None
) -> None:
    event = read_event(json.dumps(payload).encode())
    assert (event.event_id, event.customer_id) == ("7", customer)


# --- the service with webhooks -------------------------------------------------------------


@dataclass
class Running:
    service: Service
    task: asyncio.Task[int]
    url: str  # http://host:port of http.listen

    @property
    def webhook(self) -> str:
        return self.url + "/paynow/webhook"


@dataclass
class Scene:
    folder: Path
    fake: FakeStore
    rcon: FakeRconServer
    store: Store
    port: int

    def config(self, sync: dict[str, Any] | None = None, *, secret: str = SECRET) -> Path:
        """Store mode with webhooks; the API key and webhook secret in files
        (a reload reads them again)."""
        (self.folder / "api-key").write_text(self.fake.api_key)
        (self.folder / "webhook-secret").write_text(secret + "\n")
        servers = {
            "survival": {
                "platform": "minecraft", "host": "127.0.0.1", "port": self.rcon.port,
                "password": "rcon-pw", "timeout_seconds": 2,
            }
        }  # fmt: skip
        return write_store_config(
            self.folder, self.fake, {"vip": VIP}, servers=servers,
            extra={
                "paynow": {
                    "api_key_env": None, "api_key_file": "api-key",
                    "webhook_secret_file": "webhook-secret",
                },
                "sync": {**HOUR, **(sync or {})},
                "http": {"listen": f"127.0.0.1:{self.port}"},
            },
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def service(self, sync: dict[str, Any] | None = None) -> AsyncIterator[Running]:
        """The service, started and done with its first reads; stopped at the end."""
        path = self.config(sync)
        settings = load_settings(path)
        service = Service(path, settings, self.store, handle_signals=False)
        task = asyncio.create_task(service.run())
        try:
            await until(lambda: service.ready.is_set() or task.done(), "the service is ready")
            assert not task.done(), task.result()
            assert service.http is not None
            host, port = bound_addresses(service.http)[0]
            await until(self.first_reads_done, "the first new-items read and snapshot")
            yield Running(service, task, f"http://{host}:{port}")
        finally:
            service.stop()
            assert await asyncio.wait_for(task, 15) == 0

    async def first_reads_done(self) -> bool:
        return (
            await self.store.get_meta(CURSOR) is not None
            and await self.store.get_meta(LAST_SNAPSHOT) is not None
        )

    def grant(self, customer_id: str, item_id: str) -> str:
        uuid = self.fake.customer(customer_id)["minecraft_uuid"]
        return f"lp user {uuid} parent add vip {item_id}"

    async def send(
        self, running: Running, event: str, item: str | None, **kw: Any
    ) -> WebhookResult:
        return await self.fake.send_webhook(running.webhook, event, item, SECRET, **kw)

    async def delivered(self, *commands: str) -> None:
        """Wait until the RCON fake received `commands` (in any order, among others)."""
        await until(lambda: set(commands) <= set(self.rcon.commands), f"{commands} delivered")


async def until(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]], what: str, within: float = 10.0
) -> None:
    """Wait (polling) until `check` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    fake = FakeStore()
    rcon = FakeRconServer("minecraft", password="rcon-pw")
    await fake.start()
    await rcon.start()
    store = open_store(str(tmp_path / "state.sqlite3"))
    try:
        yield Scene(tmp_path, fake, rcon, store, unused_port())
    finally:
        await store.close()
        await rcon.stop()
        await fake.stop()


@run_async
async def test_a_webhook_brings_a_purchase_to_the_server_at_once(tmp_path: Path) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        steve = s.fake.add_customer(name="Steve")["id"]
        alex = s.fake.add_customer(name="Alex")["id"]
        s.fake.add_item(alex)  # bought by someone else: no webhook, so not read yet
        s.fake.reset_counters()

        bought = s.fake.add_item(steve)["id"]
        result = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought)
        assert result.status == 200
        await s.delivered(s.grant(steve, bought))
        assert s.rcon.commands == [s.grant(steve, bought)]
        assert s.fake.count("customer_items", steve) == 1
        assert s.fake.count() == 1  # the look-up, nothing else
        assert await s.store.get_meta(LAST_WEBHOOK) is not None


@run_async
async def test_forged_and_stale_webhooks_get_401_and_change_nothing(tmp_path: Path) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        steve = s.fake.add_customer()["id"]
        alex = s.fake.add_customer()["id"]
        bought = s.fake.add_item(steve)["id"]
        s.fake.reset_counters()
        for tamper in sorted(TAMPERS):
            result = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought, tamper=tamper,
                                  event_id=f"forged-{tamper}")  # fmt: skip
            assert result.status == 401, tamper
        assert await s.store.get_meta(LAST_WEBHOOK) is None

        # A genuine webhook after them is acted on: had a forged one asked for
        # a look-up, it would have run first.
        marker = s.fake.add_item(alex)["id"]
        assert (await s.send(running, "ON_DELIVERY_ITEM_ADDED", marker)).status == 200
        await s.delivered(s.grant(alex, marker))
        assert s.fake.count("customer_items", steve) == 0
        assert s.rcon.commands == [s.grant(alex, marker)]

        # A forged event id was not remembered: the genuine event with it counts.
        result = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought, event_id="forged-stale")
        assert result.status == 200
        await s.delivered(s.grant(steve, bought))


@run_async
async def test_a_replayed_event_is_acknowledged_and_acted_on_once_across_a_restart(
    tmp_path: Path,
) -> None:
    async with scene(tmp_path) as s:
        steve = s.fake.add_customer()["id"]
        alex = s.fake.add_customer()["id"]
        async with s.service() as running:
            bought = s.fake.add_item(steve)["id"]
            first = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought)
            await s.delivered(s.grant(steve, bought))
            for secret in (None, SECRET):  # as sent, and re-signed as PayNow retries
                again = await s.fake.replay_webhook(running.webhook, first, secret)
                assert again.status == 200
            marker = s.fake.add_item(alex)["id"]
            await s.send(running, "ON_DELIVERY_ITEM_ADDED", marker)
            await s.delivered(s.grant(alex, marker))
            assert s.fake.count("customer_items", steve) == 1

        s.fake.reset_counters()
        async with s.service() as running:
            again = await s.fake.replay_webhook(running.webhook, first, SECRET)
            assert again.status == 200
            marker = s.fake.add_item(alex)["id"]
            await s.send(running, "ON_DELIVERY_ITEM_ADDED", marker)
            await s.delivered(s.grant(alex, marker))
            assert s.fake.count("customer_items", steve) == 0
        assert s.rcon.commands.count(s.grant(steve, bought)) == 1


@run_async
async def test_an_event_without_a_customer_reads_new_items_and_a_snapshot_at_once(
    tmp_path: Path,
) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        steve = s.fake.add_customer()["id"]
        s.fake.reset_counters()
        bought = s.fake.add_item(steve)["id"]
        result = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought, customer=False)
        assert result.status == 200
        await s.delivered(s.grant(steve, bought))
        await until(lambda: any(r.query.get("activeOnly") for r in s.fake.requests()), "a snapshot")
        new_items = [r for r in s.fake.requests("store_items") if "activeOnly" not in r.query]
        assert new_items and all(r.query["asc"] == "true" for r in new_items)
        assert s.fake.count("customer_items") == 0


@run_async
async def test_other_events_are_acknowledged_and_ignored(tmp_path: Path) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        steve = s.fake.add_customer()["id"]
        alex = s.fake.add_customer()["id"]
        bought = s.fake.add_item(steve)["id"]
        s.fake.reset_counters()
        assert (await s.send(running, "ON_ORDER_COMPLETED", bought)).status == 200
        other = {"id": "1", "customer": {"id": steve}}
        assert (await s.send(running, "ON_SUBSCRIPTION_RENEWED", None, body=other)).status == 200

        marker = s.fake.add_item(alex)["id"]
        await s.send(running, "ON_DELIVERY_ITEM_ADDED", marker)
        await s.delivered(s.grant(alex, marker))
        assert s.fake.count("customer_items", steve) == 0
        assert s.rcon.commands == [s.grant(alex, marker)]


@run_async
async def test_metrics_and_healthz_share_the_webhook_listener(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        steve = s.fake.add_customer()["id"]
        vip = s.fake.add_item(steve, added_at=old(days=1))["id"]
        async with s.service() as running, aiohttp.ClientSession() as http:

            async def metrics() -> str:
                async with http.get(running.url + "/metrics") as response:
                    assert response.status == 200
                    return await response.text()

            async with http.get(running.url + "/healthz") as response:
                assert (response.status, await response.text()) == (200, "ok\n")
            assert 'perksync_store_reads_total{outcome="ok",read="snapshot"} 1.0' in await metrics()
            async with http.get(running.webhook) as response:
                assert response.status == 405

            # Listed nowhere any more: the next snapshot (asked for by a
            # webhook without a customer) counts it as missing.
            s.fake.conceal(vip)
            await s.send(running, "ON_DELIVERY_ITEM_REVOKED", vip, customer=False)

            async def missing_counted() -> bool:
                return "perksync_items_missing 1.0" in await metrics()

            await until(missing_counted, "the missing item counted")
            assert s.rcon.commands == [s.grant(steve, vip)]


@run_async
async def test_a_lost_webhook_delays_a_purchase_until_the_next_new_items_read(
    tmp_path: Path,
) -> None:
    async with scene(tmp_path) as s, s.service({"new_items_seconds": 1}):
        steve = s.fake.add_customer()["id"]
        s.fake.add_item(steve, state="used", added_at=old(days=1))
        bought = s.fake.add_item(steve)["id"]  # and no webhook about it
        await s.delivered(s.grant(steve, bought))
        assert s.fake.count("customer_items") == 0
        assert s.rcon.commands == [s.grant(steve, bought)]


@run_async
async def test_a_reload_takes_a_new_webhook_secret(tmp_path: Path) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        steve = s.fake.add_customer()["id"]
        bought = s.fake.add_item(steve)["id"]
        rotated = "whsec-rotated-SECRET"
        s.config(secret=rotated)
        running.service.reload()
        result = await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought)
        assert result.status == 401
        result = await s.fake.send_webhook(
            running.webhook, "ON_DELIVERY_ITEM_ADDED", bought, rotated
        )
        assert result.status == 200
        await s.delivered(s.grant(steve, bought))


@run_async
async def test_a_reload_into_token_mode_is_refused_and_store_mode_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with scene(tmp_path) as s, s.service() as running:
        path = s.config()
        token_mode = path.read_text().replace("  store_id:", "  old_store_id:")
        token_mode = token_mode.replace("  api_key_file: api-key\n", "")
        token_mode = token_mode.replace("  webhook_secret_file: webhook-secret\n", "")
        token_mode = token_mode.replace("  old_store_id:", "  # store_id:")
        path.write_text(token_mode + "customers:\n- token: tok-SECRET\n")
        running.service.reload()
        assert "restart perksync to switch" in caplog.text
        assert running.service.settings.store_mode

        steve = s.fake.add_customer()["id"]
        bought = s.fake.add_item(steve)["id"]
        assert (await s.send(running, "ON_DELIVERY_ITEM_ADDED", bought)).status == 200
        await s.delivered(s.grant(steve, bought))


@run_async
async def test_without_webhooks_the_service_delivers_a_purchase_expiry_and_chargeback_once(
    tmp_path: Path,
) -> None:
    fast = {"interval_seconds": 1, "new_items_seconds": 1, "new_items_overlap_seconds": 0}
    async with scene(tmp_path) as s, s.service(fast):
        steve = s.fake.add_customer()["id"]
        who = s.fake.customer(steve)["minecraft_uuid"]
        expiring = s.fake.add_item(steve, expires_at=datetime.now(UTC) + timedelta(days=1))["id"]
        charged = s.fake.add_item(steve)["id"]
        await s.delivered(s.grant(steve, expiring), s.grant(steve, charged))

        s.fake.expire(expiring)
        s.fake.revoke(charged, "chargeback")
        removals = [f"lp user {who} parent remove vip {item}" for item in (expiring, charged)]
        await s.delivered(*removals)
        # Several more new-items reads and snapshots change nothing.
        reads = s.fake.count()
        await until(lambda: s.fake.count() >= reads + 6, "six more reads")
        assert sorted(s.rcon.commands) == sorted(
            [s.grant(steve, expiring), s.grant(steve, charged), *removals]
        )
