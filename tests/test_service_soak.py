"""An hour of service life, accelerated: 60 one-second intervals of random activity.

Purchases, activations, expiries (from PayNow and local), revokes, renewals,
a game server going down and up, the API failing, config reloads. At the end
nothing is lost (every item still active is granted, every granted item that
ended was taken back) and nothing repeated (no grant or take-back twice, no
take-back without a grant).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fakes.paynow_api import iso
from tests.fakes.world import RCON_PASSWORD, World
from tests.test_service_process import wait_until

# Alone among the timed tests (see tests/conftest.py), so a longer timeout.
pytestmark = [pytest.mark.usefixtures("one_timed_test_at_a_time"), pytest.mark.timeout(400)]

SECONDS = float(os.environ.get("PERKSYNC_SOAK_SECONDS", "60"))
PRODUCTS = {
    "vip": {
        "on_active": ["grant {item.id}"],
        "on_expire": ["take {item.id}"],
        "on_revoke": ["take {item.id}", "say revoked {item.id} {item.revoke_reason}"],
    }
}


def test_an_hour_of_accelerated_activity(tmp_path: Path) -> None:
    rng = random.Random(42)
    with World(tmp_path, {"survival": "minecraft"}) as world:
        tokens = [world.add_customer(platform="minecraft")[0] for _ in range(8)]
        state: dict[str, tuple[str, str]] = {}  # item → (token, state)
        settled_at: dict[str, float] = {}  # item → when it last changed
        expiring: set[str] = set()  # left alone: local expiry takes them back

        def add(token: str, item_state: str, **kwargs: object) -> None:
            item = world.add_item(token, "vip", state=item_state, **kwargs)
            state[item] = (token, item_state)
            settled_at[item] = time.monotonic()

        for token in tokens:
            add(token, "active")
        extra = {"sync": {"interval_seconds": 1, "expiry_grace_seconds": 0}}
        world.config(PRODUCTS, extra=extra)
        proc = world.start_service()
        try:
            server = world.rcon["survival"]
            down_until = api_down_until = 0.0
            end = time.monotonic() + SECONDS
            while time.monotonic() < end:
                now = time.monotonic()
                roll = rng.random()
                token = rng.choice(tokens)
                # Each item keeps a state for at least 2.5 intervals, so polls can see it.
                ripe = [i for i in state if now - settled_at[i] > 2.5 and i not in expiring]
                if roll < 0.25:
                    add(token, rng.choice(["active", "active", "usable"]))
                elif roll < 0.35:
                    expires = datetime.now(UTC) + timedelta(seconds=rng.uniform(1, 4))
                    add(token, "active", expirable=True)
                    item = list(state)[-1]
                    world.sync(world.paynow.update_item, token, item, expires_at=iso(expires))
                    expiring.add(item)
                elif roll < 0.75 and ripe:
                    item = rng.choice(ripe)
                    owner, current = state[item]
                    moves = {
                        "usable": ["active"],
                        "active": ["used", "revoked", "renewed"],
                        "renewed": ["used", "revoked"],
                    }.get(current)
                    if moves:
                        new = rng.choice(moves)
                        world.set_state(owner, item, new, rng.choice(["refund", "chargeback"]))
                        state[item] = (owner, new)
                        settled_at[item] = now
                elif roll < 0.82 and not down_until:
                    world.call(server.go_down())
                    down_until = now + rng.uniform(1, 4)
                elif roll < 0.88 and not api_down_until:
                    world.sync(world.paynow.fault, None, "status", status=503, times=None)
                    api_down_until = now + rng.uniform(1, 3)
                elif roll < 0.90:
                    proc.send_signal(signal.SIGHUP)
                if down_until and now > down_until:
                    world.call(server.come_up())
                    down_until = 0.0
                if api_down_until and now > api_down_until:
                    world.sync(world.paynow.clear_faults)
                    api_down_until = 0.0
                time.sleep(0.25)
            if down_until:
                world.call(server.come_up())
            world.sync(world.paynow.clear_faults)

            # Let the service catch up, then check the books. An expiring item
            # first seen past its expiry is never granted, by design.
            active = {
                i for i, (_, s) in state.items() if s in ("active", "renewed") and i not in expiring
            }

            def caught_up() -> bool:
                got = Counter(world.received("survival"))
                return all(got[f"grant {i}"] == 1 for i in active)

            assert wait_until(caught_up, timeout=30)
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log = world.service_log()
        assert "Traceback" not in log
        assert RCON_PASSWORD not in log
        received = world.received("survival")
        got = Counter(received)
        assert max(got.values()) == 1, [c for c, n in got.items() if n > 1]
        for item, (_, final) in state.items():
            granted, taken = got[f"grant {item}"], got[f"take {item}"]
            if granted and taken:
                assert received.index(f"grant {item}") < received.index(f"take {item}")
            assert taken <= granted, f"{item} taken back without a grant"
            if item in expiring:
                # Granted, it is taken back; first seen past its expiry, never granted.
                assert taken == granted, f"{item} expired but was never taken back"
            elif final in ("active", "renewed"):
                assert (granted, taken) == (1, 0), item
            elif final in ("used", "revoked") and granted:
                assert taken == 1, f"{item} ({final}) was granted but never taken back"
        assert len(state) > 30  # the run did exercise a real amount of activity
        assert sum(1 for c in received if c.startswith("take")) > 5
