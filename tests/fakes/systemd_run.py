"""What systemd does with `LoadCredential=`, and a stand-in for `systemd-run`.

A test cannot start a systemd unit here (no systemd as PID 1, nor a user
`perksync`), so it does what systemd does with the unit's credential line:

- `load_credentials("ID:/etc/perksync/credentials", into, root)`: a folder is
  read recursively, each regular file becoming the credential `ID_<path>`
  (the path below the folder, "/" turned into "_"); symlinks, sockets and
  names starting with "." are skipped, and a name met twice keeps its first
  file (systemd.exec(5), "Credentials"). A single file becomes `ID`. Absolute
  paths are read under `root`, the test's stand-in for `/`.

`python -m tests.fakes.systemd_run [OPTIONS] COMMAND [ARGS...]` stands in for
`systemd-run` as README "Install" uses it (a test puts a `systemd-run` script
calling it first on PATH): it understands `--quiet`, `--pipe`, `--wait`,
`--collect`, `--service-type=` and the properties `User=`, `Group=` and
`LoadCredential=`, refuses anything else (so that a README command it cannot
stand for fails the test), and needs `--pipe` and `--wait` (without them
`systemd-run` returns before the command ends, and its exit status is not the
command's). Like a transient service, the command gets a fresh environment:
`PATH`, `CREDENTIALS_DIRECTORY` and nothing else of the caller's but
`PYTHONPATH` (so that it can be this checkout); its exit status is the
command's (243 when a credential cannot be read, as systemd's). Not emulated: the change of user (`User=` must be given; the
command runs as the caller). `$FAKE_SYSTEMD_ROOT` is `root`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT_VARIABLE = "FAKE_SYSTEMD_ROOT"
# systemd's default PATH for the services it starts.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FLAGS = {"--quiet", "-q", "--pipe", "-P", "--wait", "--collect", "-G"}
PROPERTIES = ("User", "Group", "LoadCredential")
# The exit status of a unit whose credentials systemd could not load (243/CREDENTIALS).
EXIT_CREDENTIALS = 243


def load_credentials(spec: str, into: Path, root: Path = Path("/")) -> list[str]:
    """Copy what `LoadCredential=<spec>` names into the folder `into`, under the
    names systemd gives them; return those names, sorted."""
    ident, sep, path = spec.partition(":")
    if not sep or not path.startswith("/"):
        raise ValueError(f"LoadCredential={spec}: only ID:/ABSOLUTE/PATH is emulated")
    source = root / path.lstrip("/")
    found = _folder_files(source, ident) if source.is_dir() else [(ident, source)]
    names = []
    for name, file in found:
        target = into / name
        if target.exists():
            continue  # systemd: a duplicate ID keeps the credential loaded first
        target.write_bytes(file.read_bytes())  # a missing file fails, as systemd's start does
        target.chmod(0o400)
        names.append(name)
    return sorted(names)


def _folder_files(folder: Path, ident: str) -> list[tuple[str, Path]]:
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            found += _folder_files(entry, f"{ident}_{entry.name}")
        elif stat.S_ISREG(mode):
            found.append((f"{ident}_{entry.name}", entry))
    return found


def _parse(argv: list[str]) -> tuple[set[str], list[tuple[str, str]], list[str]]:
    """(flags, properties, command) of a systemd-run command line."""
    flags: set[str] = set()
    properties: list[tuple[str, str]] = []
    args = list(argv)
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        if arg in FLAGS:
            flags.add(arg)
        elif arg.startswith("--service-type="):
            continue
        elif arg in ("-p", "--property") and args:
            key, _, value = args.pop(0).partition("=")
            if key not in PROPERTIES:
                raise SystemExit(f"fake systemd-run: property {key}= is not emulated")
            properties.append((key, value))
        else:
            raise SystemExit(f"fake systemd-run: option {arg} is not emulated")
    if not args:
        raise SystemExit("fake systemd-run: no command")
    if not ({"--pipe", "-P"} & flags and "--wait" in flags):
        raise SystemExit(
            "fake systemd-run: without --pipe and --wait the exit status is not perksync's"
        )
    if "User" not in dict(properties):
        raise SystemExit("fake systemd-run: no User=: the command would run as root")
    return flags, properties, args


def main(argv: list[str] | None = None) -> int:
    _, properties, command = _parse(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get(ROOT_VARIABLE, "/"))
    folder = Path(tempfile.mkdtemp(prefix="credentials-"))
    try:
        try:
            for key, value in properties:
                if key == "LoadCredential":
                    load_credentials(value, folder, root)
        except OSError as exc:
            print(f"fake systemd-run: failed to set up credentials: {exc}", file=sys.stderr)
            return EXIT_CREDENTIALS
        env = {"PATH": SERVICE_PATH, "CREDENTIALS_DIRECTORY": str(folder)}
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return subprocess.run(command, env=env, cwd="/", check=False).returncode
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # systemd removes them when the unit stops


if __name__ == "__main__":
    sys.exit(main())
