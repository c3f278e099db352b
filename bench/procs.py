"""Child processes: measured runs (`measure`) and the driven fakes (`Fake`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


# Where the measured `perksync` (daemon/, adapters/) is imported from: this
# checkout, or another one named by BENCH_PERKSYNC_SOURCE (to compare two
# versions against the same fakes and floor, which always come from here).
SOURCE_VARIABLE = "BENCH_PERKSYNC_SOURCE"


def perksync_source() -> Path:
    return Path(os.environ.get(SOURCE_VARIABLE) or REPO).resolve()


def child_env(*, perksync: bool = False) -> dict[str, str]:
    """The environment of a child: no PERKSYNC_* overrides, this repo importable
    (and, for `perksync=True`, the measured perksync first)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKSYNC_")}
    paths = [str(perksync_source())] if perksync else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO)])
    return env


@dataclass(frozen=True, slots=True)
class Measured:
    """One child process, from fork to exit (interpreter start-up included)."""

    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float  # ru_maxrss of the child
    returncode: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_s": self.cpu_s}


class TimedOut(Exception):
    pass


def measure(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = subprocess.DEVNULL,
    stderr: IO[Any] | int | None = subprocess.DEVNULL,
) -> Measured:
    """Run `argv` to completion; its wall time and its own rusage (`os.wait4`).

    It runs under `bench.spawn`, a small middleman, so that its peak RSS is its
    own (see there). Raises TimedOut (after it was killed) if it runs longer
    than `timeout`.
    """
    with tempfile.TemporaryDirectory(prefix="perksync-bench-spawn-") as tmp:
        result = Path(tmp) / "result.json"
        spawn = [sys.executable, "-m", "bench.spawn", str(result), repr(timeout), *argv]
        proc = subprocess.Popen(
            spawn, cwd=cwd, env=dict(env or child_env()), stdout=stdout, stderr=stderr
        )
        try:
            proc.wait(timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise TimedOut(f"{shlex.join(argv[:4])} ...: the middleman hung") from None
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"bench.spawn failed (status {proc.returncode}) for {argv[:4]}")
        data = json.loads(result.read_text())
    if data.pop("timed_out"):
        raise TimedOut(f"{shlex.join(argv[:4])} ... did not finish within {timeout:g}s")
    return Measured(**data)


class Fake:
    """A fake from `bench.fakes` in its own process, driven one line at a time."""

    def __init__(self, args: Sequence[str], *, start_timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fakes", *args],
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        words = self._read(start_timeout).split()
        if words[:1] != ["ready"]:
            self.close()
            raise RuntimeError(f"fake {args[0]} did not start: {words}")
        self.port = int(words[1])

    def _read(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        box: list[str] = []
        stream = self.proc.stdout
        reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box:
            self.close()
            raise TimedOut(f"fake did not answer within {timeout:g}s")
        if not box[0]:
            raise RuntimeError(f"fake exited (status {self.proc.wait()})")
        return box[0].strip()

    def ask(self, line: str, timeout: float = 300.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def cpu(self) -> float:
        """The fake's own CPU time so far (user + sys), in seconds."""
        return float(self.ask("cpu"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Fake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_service(service: subprocess.Popen[bytes], grace: float) -> tuple[int | None, float]:
    """SIGTERM, then SIGKILL after `grace` seconds: (exit status, seconds to stop)."""
    t0 = time.monotonic()
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
    try:
        service.wait(grace)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait(10)
    return service.returncode, time.monotonic() - t0
