"""The README's "Selling ranks, kits and keys" example is a valid config, uses
the keys it explains, and `make demo` runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from daemon.config import load_settings
from tests.fakes.demo import readme_example
from tests.fakes.world import REPO


def test_the_readme_example_config_validates(tmp_path: Path) -> None:
    example = readme_example()
    example["customers"] = [{"token": "pnc_example"}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(example))
    (tmp_path / "perksync_rcon_survival").write_text("pw")
    settings = load_settings(path, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    products = settings.products
    assert products["vip-monthly"].perk == products["vip-yearly"].perk == "vip"
    assert products["vote-key"].once
    vip = products["vip-monthly"].commands("on_active")
    assert [(c.online, c.delay_seconds, c.per_item) for c in vip] == [
        (False, 0, False),
        (True, 0, True),
        (False, 30, False),
    ]
    assert [c.per_item for c in products["vip-yearly"].commands("on_revoke")] == [False, True]
    assert products["starter-kit"].commands("on_active")[0].online


def demo_steps(stdout: str) -> dict[str, str]:
    """The demo's output by step: its number ("1" …) → that step's text."""
    steps = re.split(r"^=== (\d)\. ", stdout, flags=re.MULTILINE)
    return dict(zip(steps[1::2], steps[2::2], strict=True))


UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def received(step: str) -> list[str]:
    """The commands the game server received in a step, sorted, player-list
    reads left out, UUIDs written <uuid>."""
    sent = re.findall(r"^ +> (.*)$", step, flags=re.MULTILINE)
    return sorted(UUID.sub("<uuid>", c) for c in sent if c != "minecraft:list uuids")


def test_make_demo_runs_the_readme_example_in_store_mode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fakes.demo"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    # The config it wrote: store mode, secrets as credential files, the README's products.
    assert "api_key_file: ${CREDENTIALS_DIRECTORY}/perksync_paynow_api_key" in out
    assert f"products: {', '.join(readme_example()['products'])}  (the README's" in out
    steps = demo_steps(out)
    assert list(steps) == ["1", "2", "3", "4", "5"]
    assert all("exit status: 0" in steps[n] for n in "1235")  # 4: the service, below
    first, second, third, webhook, status = steps.values()
    # A first pass grants what is live: the ranks, the kit of the player online.
    assert "pass done: 2 store reads (0 failed)" in first
    rank = "lp user <uuid> parent add vip"
    assert received(first) == ["kit vip Alice", rank, rank]
    # A new purchase while the rank is held: its kit only; Carol's kit and key once she is on.
    assert "(vip-yearly) granted on survival: perk vip is held there by another item" in second
    assert received(second) == ["crates key give Carol vote 1", "kit starter Carol"]
    # An expiry kept by the other item; a chargeback takes the rank and bans.
    assert "(vip-monthly) on_expire kept on survival: perk vip is held there" in third
    assert received(third) == [
        "ban Bob Purchase revoked: chargeback",
        "lp user <uuid> parent remove vip",
    ]
    # A webhook brings the purchase to the service (its own reads are an hour apart).
    assert "PayNow posts ON_DELIVERY_ITEM_ADDED for item" in webhook
    assert "answered 200" in webhook
    assert "(ON_DELIVERY_ITEM_ADDED) for customer" in webhook
    assert received(webhook) == ["kit vip Dave", rank]
    assert "SIGTERM: exit status 0" in webhook
    assert "(store mode):" in status and "(webhooks on)" in status
