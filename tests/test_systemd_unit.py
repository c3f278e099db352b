"""systemd/perksync.service: the keys the service contract depends on, and its hardening.

systemd unit files repeat keys (LoadCredential=, SystemCallFilter=), so they are
read with a small parser that keeps every value, not configparser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
        if not line or line.startswith("#"):
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


def test_user_and_state(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    dynamic = service.get("DynamicUser", ["no"])[-1] == "yes"
    static_user = service.get("User", ["root"])[-1] not in {"root", "0"}
    assert dynamic or static_user, "the service must not run as root"
    assert one(unit, "StateDirectory") == "perksync"
    assert one(unit, "ConfigurationDirectory") == "perksync"
    assert one(unit, "UMask") == "0077"


def test_documentation_links_nothing_that_is_not_installed(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    for value in unit["Unit"].get("Documentation", []):
        for link in value.split():
            assert not link.startswith("file:"), f"{link}: no install step puts it there"


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


# --- secrets: the unit's EnvironmentFile=, the example config and secrets.env ----------

REPO = UNIT.parent.parent
SECRETS_PATH = "/etc/perksync/secrets.env"  # where README "Install" puts secrets.env
# The one form the README allows: systemd.exec(5) and a POSIX shell both take
# a single-quoted value verbatim.
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)='([^']*)'")


def read_environment_file(text: str) -> dict[str, str]:
    """What systemd's EnvironmentFile= makes of a file in the documented form
    (comments start with #: systemd's other comment mark, ;, is an error to sh);
    any other line fails the test."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = ASSIGNMENT.fullmatch(line)
        assert match, f"not NAME='value': {line!r}"
        values[match[1]] = match[2]
    return values


def secret_names(config: Path) -> set[str]:
    """Every *_env name the config reads a secret from; it holds no other kind."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    entries = [*data["customers"], *data["servers"].values()]
    assert not [e for e in entries if {"token", "token_file", "password", "password_file"} & set(e)]
    return {e.get("token_env") or e["password_env"] for e in entries}


def check_config(
    tmp_path: Path, env: dict[str, str], hand_run: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`perksync --check-config` on the example config.yaml as a subprocess with
    only `env`; given `hand_run` (a shell function definition), as
    `sh -c 'HAND_RUN; perksync_run --check-config …'`."""
    args = ["--check-config", "--config", str(REPO / "config.yaml")]
    command = [sys.executable, "-m", "daemon", *args]
    if hand_run is not None:
        command = ["sh", "-c", hand_run + '\nperksync_run "$@"', "sh", *args]
    base = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        # The one path of the example that a test cannot have: the state folder.
        "PERKSYNC_SYNC__STATE_DB": str(tmp_path / "state.sqlite3"),
    }
    return subprocess.run(
        command, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False
    )


def readme_hand_run(secrets: Path) -> str:
    """README's `perksync_run` shell function, reading `secrets` and running this
    checkout's perksync (not as the user perksync, whom a test does not have)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    [line] = [line for line in readme.splitlines() if line.startswith("perksync_run() {")]
    as_service_user = "runuser -u perksync -- perksync "
    assert f". {SECRETS_PATH} " in line
    assert as_service_user in line
    line = line.replace(SECRETS_PATH, str(secrets))
    return line.replace(as_service_user, f"{sys.executable} -m daemon ")


def installed_secrets(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def test_unit_loads_the_secrets_file_the_readme_installs(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    assert "LoadCredential" not in service
    # "-": a missing file is not a start failure of its own; perksync names what is missing.
    assert service.get("EnvironmentFile") == [f"-{SECRETS_PATH}"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"install -m 0600 secrets.env {SECRETS_PATH}" in readme


def test_the_units_set_up_finds_every_secret_of_the_example_config(tmp_path: Path) -> None:
    names = secret_names(REPO / "config.yaml")
    assert len(names) == 4
    example = (REPO / "secrets.env").read_text(encoding="utf-8")
    from_systemd = read_environment_file(example)
    assert set(from_systemd) == names
    # What systemd hands the service: the file's variables and nothing else.
    result = check_config(tmp_path, from_systemd)
    assert result.returncode == 0, result.stderr
    assert "OK (2 customers, 2 servers, 2 products)" in result.stdout
    # The same command run by hand, as README "Install" says.
    hand_run = readme_hand_run(installed_secrets(tmp_path, example))
    result = check_config(tmp_path, {}, hand_run)
    assert result.returncode == 0, result.stderr
    assert "OK (2 customers, 2 servers, 2 products)" in result.stdout
    # Without the file, each missing secret is named: exit 2, which stops the restarts.
    result = check_config(tmp_path, {})
    assert result.returncode == 2
    for name in names:
        assert name in result.stderr


def test_systemd_and_a_hand_run_read_the_same_values(tmp_path: Path) -> None:
    tricky = ["a b  c", "$HOME and ${PATH}", 'say "hi" `id`', "back\\slash\\", "#;= x"]
    text = "# comment\n\n" + "".join(f"SECRET_{i}='{value}'\n" for i, value in enumerate(tricky))
    from_systemd = read_environment_file(text)
    assert list(from_systemd.values()) == tricky
    path = installed_secrets(tmp_path, text)
    result = subprocess.run(
        ["sh", "-c", f"set -a && . {path} && exec env"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    from_shell = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert {name: from_shell.get(name) for name in from_systemd} == from_systemd


def test_readme_shell_blocks_are_posix_sh() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        assert "<<<" not in block
        result = subprocess.run(
            ["sh", "-n"], input=block, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, f"{result.stderr}\n{block}"
