"""systemd/perksync.service: the keys the service contract depends on, its hardening,
and the secrets: the unit's one LoadCredential= line and README's hand runs
through systemd-run find every secret the example config names (both emulated,
as no systemd runs here: tests/fakes/systemd_run.py).

systemd unit files repeat keys (LoadCredential=, SystemCallFilter=), so they are
read with a small parser that keeps every value, not configparser.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import systemd_run
from tests.fakes.rcon_server import unused_port
from tests.fakes.systemd_run import ROOT_VARIABLE, load_credentials

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


# --- secrets: the unit's LoadCredential=, the example config and README "Install" ------

REPO = UNIT.parent.parent
CREDENTIALS = "/etc/perksync/credentials"  # where README "Install" puts the secrets
IN_CREDENTIALS = "${CREDENTIALS_DIRECTORY}/"
SECRETS = ("token", "password", "api_key", "webhook_secret", "state_db_password")
STORE_ID = "94688451781206016"  # the example config's
# What `perksync --check-config` says of each variant of the example config.
CHECKED = {
    "store": f"OK (store mode (store {STORE_ID}), 2 servers, 2 products)",
    "token": "OK (2 customers, 2 servers, 2 products)",
    "postgresql": f"OK (store mode (store {STORE_ID}), 2 servers, 2 products)",
}


def readme_text() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def readme_secret_files() -> set[str]:
    """The files README's shell blocks write into the credentials folder
    (`(umask 077 && cat > NAME)`, after `cd` there, or with the folder's path)."""
    blocks = re.findall(r"```sh\n(.*?)```", readme_text(), flags=re.DOTALL)
    names = set()
    for written in re.findall(r"cat > (\S+)\)", "".join(blocks)):
        folder, _, name = written.rpartition("/")
        assert folder in ("", CREDENTIALS), f"{written}: not in {CREDENTIALS}"
        names.add(name)
    return names


def uncommented(text: str, indent: str, pattern: str) -> Any:
    """The YAML of the lines of `text` commented out at `indent` that match
    `pattern` after their `# `."""
    found = re.finditer(rf"^{indent}# ({pattern}.*)$", text, flags=re.MULTILINE)
    lines = [indent + match[1] for match in found]
    assert lines, f"no commented {pattern!r} in config.yaml"
    return yaml.safe_load("\n".join(lines))


def example_variants() -> dict[str, dict[str, Any]]:
    """The example config.yaml as it is (store mode), with its commented
    customers instead of the store's key (token mode), and with its commented
    PostgreSQL state."""
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    store = yaml.safe_load(text)
    token = copy.deepcopy(store)
    for key in ("store_id", "api_key_file", "webhook_secret_file"):
        del token["paynow"][key]
    token.update(uncommented(text, "", r"customers:|  ( |-) "))
    postgresql = copy.deepcopy(store)
    postgresql["sync"].update(uncommented(text, "  ", r"state_db(_password_file)?: "))
    return {"store": store, "token": token, "postgresql": postgresql}


def secret_sources(data: dict[str, Any]) -> dict[str, str]:
    """Every secret the config names: its key path → where it is read from."""
    found = {}
    places = [(f"customers[{i}]", c) for i, c in enumerate(data.get("customers", []))]
    places += [(f"servers.{n}", s) for n, s in data["servers"].items()]
    places += [("paynow", data["paynow"]), ("sync", data["sync"])]
    for where, section in places:
        for secret in SECRETS:
            for key in (f"{secret}_file", f"{secret}_env", secret):
                if key in section:
                    found[f"{where}.{key}"] = section[key]
    return found


def credential_spec(unit: dict[str, dict[str, list[str]]]) -> str:
    [spec] = unit["Service"]["LoadCredential"]
    return spec


def install(root: Path, data: dict[str, Any]) -> Path:
    """What README "Install" sets up, under `root` instead of /: the config
    (its state folder and listen port made the test's own) and every secret
    file README's blocks write. Returns the config's path."""
    data = copy.deepcopy(data)
    if data["sync"]["state_db"].startswith("/var/lib/perksync/"):
        (root / "state").mkdir()
        data["sync"]["state_db"] = str(root / "state" / "state.sqlite3")
    data["http"]["listen"] = f"127.0.0.1:{unused_port()}"
    config = root / "etc" / "perksync" / "config.yaml"
    credentials = root / CREDENTIALS.lstrip("/")
    credentials.mkdir(parents=True, mode=0o700)
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    for name in readme_secret_files():
        (credentials / name).write_text(f"{name}-SECRET\n", encoding="utf-8")
    return config


def checked(result: subprocess.CompletedProcess[str], expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert expected in result.stdout
    assert "-SECRET" not in output


def run_as_the_unit(
    unit: dict[str, dict[str, list[str]]], root: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStart with `args`, given what systemd gives it: the
    credentials its LoadCredential= line names (read under `root`) in
    $CREDENTIALS_DIRECTORY, and no other variable of ours."""
    folder = root / "run" / "credentials" / "perksync.service"
    folder.mkdir(parents=True)
    load_credentials(credential_spec(unit), folder, root)
    program, *options = one(unit, "ExecStart").split()
    assert program.endswith("/perksync")
    options = [str(root / o.lstrip("/")) if o.startswith("/") else o for o in options]
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "CREDENTIALS_DIRECTORY": str(folder),
    }
    return subprocess.run(
        [sys.executable, "-m", "daemon", *options, *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def readme_hand_run() -> str:
    """README's `perksync_run` shell function, running this checkout's perksync."""
    [line] = [line for line in readme_text().splitlines() if line.startswith("perksync_run() {")]
    assert " systemd-run " in line
    assert "/usr/local/bin/perksync " in line
    return line.replace("/usr/local/bin/perksync ", f"{sys.executable} -m daemon ")


def run_by_hand(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`perksync_run ARGS` as README "Install" defines it, in `sh`, with a
    `systemd-run` that emulates the real one (tests/fakes/systemd_run.py)
    reading its credentials under `root`."""
    bin_folder = root / "bin"
    bin_folder.mkdir()
    fake = bin_folder / "systemd-run"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -m tests.fakes.systemd_run "$@"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_folder}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        ROOT_VARIABLE: str(root),
    }
    return subprocess.run(
        ["sh", "-c", readme_hand_run() + '\nperksync_run "$@"', "sh", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_unit_loads_the_credentials_folder_the_readme_installs(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    assert credential_spec(unit) == f"perksync:{CREDENTIALS}"
    # No secret reaches the service through its environment.
    assert "EnvironmentFile" not in service
    assert "Environment" not in service
    # A missing folder fails the start (243/CREDENTIALS): no restart loop.
    assert "243" in one(unit, "RestartPreventExitStatus").split()
    readme = readme_text()
    assert f"install -d -m 0700 {CREDENTIALS}" in readme
    assert not (REPO / "secrets.env").exists()


@pytest.mark.parametrize("variant", sorted(CHECKED))
def test_the_example_config_takes_every_secret_from_the_credentials(variant: str) -> None:
    sources = secret_sources(example_variants()[variant])
    assert len(sources) == (5 if variant == "postgresql" else 4), sources
    files = readme_secret_files()
    for where, source in sources.items():
        assert where.endswith("_file"), f"{where}: not a credential file"
        assert source.startswith(f"{IN_CREDENTIALS}perksync_"), f"{where}: {source}"
        assert source.removeprefix(f"{IN_CREDENTIALS}perksync_") in files, f"{where}: {source}"


@pytest.mark.parametrize("variant", sorted(CHECKED))
def test_the_units_set_up_finds_every_secret_of_the_example_config(
    unit: dict[str, dict[str, list[str]]], tmp_path: Path, variant: str
) -> None:
    install(tmp_path, example_variants()[variant])
    checked(run_as_the_unit(unit, tmp_path, "--check-config"), CHECKED[variant])


@pytest.mark.parametrize("variant", sorted(CHECKED))
def test_a_hand_run_as_the_readme_says_finds_them_too(tmp_path: Path, variant: str) -> None:
    config = install(tmp_path, example_variants()[variant])
    checked(run_by_hand(tmp_path, "--check-config", "--config", str(config)), CHECKED[variant])


def test_a_missing_secret_file_is_named_and_stops_the_restarts(
    unit: dict[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    install(tmp_path, example_variants()["store"])
    (tmp_path / CREDENTIALS.lstrip("/") / "rcon_jailbreak").unlink()
    result = run_as_the_unit(unit, tmp_path, "--check-config")
    assert result.returncode == 2  # RestartPreventExitStatus=2: not restarted
    assert "servers.jailbreak.password_file: cannot read " in result.stderr
    assert "/perksync_rcon_jailbreak: No such file or directory" in result.stderr
    assert "-SECRET" not in result.stdout + result.stderr


def test_a_plain_run_by_hand_says_how_to_reach_the_credentials(tmp_path: Path) -> None:
    config = install(tmp_path, example_variants()["store"])
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--check-config", "--config", str(config)],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 4  # one per secret, each naming its key
    assert lines[0].startswith(
        "perksync: config error: servers.survival.password_file: environment variable "
        "CREDENTIALS_DIRECTORY is not set"
    )
    assert all("systemd-run" in line for line in lines)


def test_credentials_are_named_as_systemd_names_a_folders_files(tmp_path: Path) -> None:
    folder = tmp_path / "credentials"
    (folder / "sub").mkdir(parents=True)
    for name in ("api_key", "sub/nested", ".hidden"):
        (folder / name).write_text(name)
    (folder / "link").symlink_to(folder / "api_key")
    into = tmp_path / "loaded"
    into.mkdir()
    loaded = load_credentials(f"perksync:{folder}", into)
    assert loaded == ["perksync_api_key", "perksync_sub_nested"]
    assert (into / "perksync_sub_nested").read_text() == "sub/nested"
    assert stat.S_IMODE((into / "perksync_api_key").stat().st_mode) == 0o400


def test_the_fake_systemd_run_refuses_what_it_does_not_emulate(tmp_path: Path) -> None:
    for argv, problem in [
        (
            ["--pipe", "--wait", "-p", "User=perksync", "-p", "DynamicUser=yes", "true"],
            "DynamicUser",
        ),
        (["--pipe", "-p", "User=perksync", "true"], "--wait"),
        (["--pipe", "--wait", "true"], "User="),
        (["--pty", "--wait", "-p", "User=perksync", "true"], "--pty"),
    ]:
        with pytest.raises(SystemExit, match=problem):
            systemd_run.main(argv)


def test_systemd_analyze_verify_knows_every_key() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd to run this)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # The one thing it may miss here: perksync installed at /usr/local/bin.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "/usr/local/bin/perksync is not executable" not in line
    ]
    assert problems == []


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
