"""What an operator reads from the CLI: `--help`, and log lines under journald
(a syslog priority per line, so `journalctl -p err` filters)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.log_format import JournalFormatter, syslog_priority
from tests.fakes.world import REPO, World

VIP = {"on_active": ["lp user {customer.minecraft_uuid} parent add vip"]}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path, {"survival": "minecraft"}) as w:
        yield w


def perksync(
    *args: str, cwd: Path, stderr: int | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PERKSYNC_")}
    full_env.pop("JOURNAL_STREAM", None)
    full_env.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_help_says_plain_perksync_is_the_service_and_lists_the_exit_codes(
    tmp_path: Path,
) -> None:
    result = perksync("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = squeeze(result.stdout)
    assert (
        "Plain `perksync` (no --sync-now, --check-config or command) runs the long-lived service"
        in text
    )
    # The same codes and meanings as the README's table.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| (.+) \|$", readme, flags=re.MULTILINE)
    assert sorted(code for code, _ in rows) == ["0", "1", "2", "3"]
    for code, meaning in rows:
        assert f"{code} {squeeze(meaning)}" in text


def run_under_journald(world: World, *args: str, same_stream: bool = True) -> tuple[int, str]:
    """Run perksync with standard error on a file that $JOURNAL_STREAM names (as
    systemd names its journald stream), or, with `same_stream=False`, with a
    JOURNAL_STREAM that was only inherited."""
    stream = world.folder / "journal-stream"
    stream.touch()
    status = stream.stat()
    inode = status.st_ino if same_stream else status.st_ino + 1
    with stream.open("w") as stderr:
        result = perksync(
            "--config",
            str(world.folder / "config.yaml"),
            *args,
            cwd=world.folder,
            stderr=stderr.fileno(),
            JOURNAL_STREAM=f"{status.st_dev}:{inode}",
        )
    return result.returncode, stream.read_text()


def test_log_lines_carry_their_syslog_priority_under_journald(world: World) -> None:
    token, _ = world.add_customer(platform="minecraft")
    world.add_item(token, "vip")
    world.config({"vip": VIP})
    world.call(world.rcon["survival"].go_down())
    status, log = run_under_journald(world, "--sync-now", "-v")
    assert status == 3
    lines = log.splitlines()
    assert lines
    for line in lines:
        assert re.match(r"<[2-7]>(CRITICAL|ERROR|WARNING|INFO|DEBUG) ", line), line
    levels = {line[1]: line.split()[0][3:] for line in lines}
    assert levels.get("3") == "ERROR"  # the server that is down
    assert levels.get("6") == "INFO"  # the pass summary
    assert levels.get("7") == "DEBUG"
    assert any(line.startswith("<3>ERROR ") and "server survival:" in line for line in lines)
    assert any(line.startswith("<6>INFO perksync: pass done:") for line in lines)


def test_config_errors_are_err_priority_under_journald(world: World) -> None:
    world.config({"vip": {"on_active": ["say {customer.nmae}"]}})
    status, log = run_under_journald(world, "--check-config")
    assert status == 2
    assert log.startswith("<3>perksync: config error: products.vip.on_active[0]: ")


def test_an_inherited_journal_stream_gets_plain_timestamped_lines(world: World) -> None:
    world.add_customer(platform="minecraft")
    world.config({"vip": VIP})
    status, log = run_under_journald(world, "--sync-now", same_stream=False)
    assert status == 0
    line = log.splitlines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO perksync: pass done:", line), line


def test_every_line_of_a_traceback_carries_the_priority() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "perksync", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    lines = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(record).splitlines()
    assert len(lines) > 3
    assert lines[0] == "<3>ERROR perksync: failed"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


LEVELS = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
BETWEEN = {logging.DEBUG: 7, logging.INFO + 1: 6, logging.WARNING - 1: 6, 5: 7}


@pytest.mark.parametrize(("level", "priority"), sorted({**LEVELS, **BETWEEN}.items()))
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority
