"""The README's "Selling ranks, kits and keys" example is a valid config, uses
the keys it explains, and `make demo` runs it."""

from __future__ import annotations

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


def test_make_demo_runs_the_readme_example() -> None:
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
    assert "perk: vip" in result.stdout  # the config it wrote is the README's
    assert "=== pass 4: the resend is delivered" in result.stdout
    assert "exit status: 1" not in result.stdout and "exit status: 2" not in result.stdout
