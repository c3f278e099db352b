"""systemd/perksync.service: the keys the service contract depends on, and its hardening.

systemd unit files repeat keys (LoadCredential=, SystemCallFilter=), so they are
read with a small parser that keeps every value, not configparser.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "perksync.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):  # continuation line
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        key, value = key.strip(), value.strip()
        values = current.get(key, [])
        if value == "" or values == [""]:
            # An empty assignment resets a list setting (kept as [""] while nothing follows:
            # `CapabilityBoundingSet=` means "none").
            values = []
        values.append(value)
        current[key] = values
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_parser_keeps_repeated_keys_and_resets() -> None:
    parsed = parse_unit("[Service]\nA=1\nA=2\nB=x\nB=\nB=y\nC=a \\\n  b\nD=x\nD=\n")
    assert parsed == {"Service": {"A": ["1", "2"], "B": ["y"], "C": ["a b"], "D": [""]}}


def test_service_contract(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec") == "60"
    exec_start = one(unit, "ExecStart").split()
    assert exec_start[0].endswith("/perksync")
    assert exec_start[1:] == ["--config", "/etc/perksync/config.yaml"]
    reload = one(unit, "ExecReload")
    assert "-HUP" in reload.split()
    assert "$MAINPID" in reload
    assert one(unit, "KillSignal") == "SIGTERM"
    # SIGTERM must be answered within 10 s; systemd waits a little longer before SIGKILL.
    assert 10 < int(one(unit, "TimeoutStopSec")) <= 30
    assert one(unit, "Restart") == "on-failure"
    assert "2" in one(unit, "RestartPreventExitStatus").split()


def test_user_state_and_credentials(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    dynamic = service.get("DynamicUser", ["no"])[-1] == "yes"
    static_user = service.get("User", ["root"])[-1] not in {"root", "0"}
    assert dynamic or static_user, "the service must not run as root"
    assert one(unit, "StateDirectory") == "perksync"
    assert one(unit, "ConfigurationDirectory") == "perksync"
    assert one(unit, "UMask") == "0077"
    credentials = service.get("LoadCredential", [])
    assert credentials, "LoadCredential= examples are missing"
    for credential in credentials:
        name, sep, path = credential.partition(":")
        assert sep
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name)
        assert path.startswith("/etc/perksync/credentials/")
    # The config refers to credentials through $CREDENTIALS_DIRECTORY (see the comments).
    assert "${CREDENTIALS_DIRECTORY}/" in UNIT.read_text(encoding="utf-8")


HARDENING = {
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_hardening(unit: dict[str, dict[str, list[str]]], key: str, expected: str) -> None:
    assert one(unit, key) == expected


def test_capabilities_and_syscalls(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["AmbientCapabilities"] == [""]
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = service["SystemCallFilter"]
    assert "@system-service" in filters
    denied = [f for f in filters if f.startswith("~")]
    assert denied
    assert {"@privileged", "@resources"} <= set(" ".join(denied).lstrip("~").split())
    # It must reach PayNow and the game servers: no IP allow list.
    assert "IPAddressDeny" not in service
    assert "PrivateNetwork" not in service


def test_install_section(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    assert "network-online.target" in one(unit, "After", "Unit")


def _security_supported(analyze: str) -> bool:
    out = subprocess.run(
        [analyze, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    # "systemd 252 (252.38-1~deb12u1)": --offline=yes arrived in systemd 250.
    return len(out) > 1 and out[1].isdigit() and int(out[1]) >= 250


def test_systemd_analyze_security_is_ok_or_better() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this)")
    if not _security_supported(analyze):
        pytest.skip("systemd-analyze is older than 250 (no --offline=yes)")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, f"no score in the output:\n{result.stdout}\n{result.stderr}"
    score, verdict = float(match.group(1)), match.group(2)
    # systemd's scale: ≤ 4.9 is "OK" (below that: MEDIUM, EXPOSED, UNSAFE).
    assert score <= 4.9, f"exposure {score} {verdict}:\n{result.stdout}"
    assert verdict in {"PERFECT", "SAFE", "OK"}
