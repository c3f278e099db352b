"""Idle cost of the service: CPU and RSS of `perksync` in service mode, from /proc.

TODO(idle-bench): hook only. The service mode is being built in another issue
(daemon/service.py); until it has landed, `python -m bench` does not run this
part and the report says so. `python -m bench idle` runs it on request. Once
the service is done: check that it starts with the config written here (10,000
customers, `sync.interval_seconds: 60`), add "idle" to `bench.__main__.PARTS`
run by default, and put its targets (under 3 % of one core, RSS under 150 MB)
in `bench.report`.

What it does: start the fakes (`bench.fakes`), write the config, start
`python -m daemon --config ...` (service mode: no flag) as a child, let it run
for `warmup_s` (the first pass), then sample `/proc/<pid>/stat` (utime +
stime, in clock ticks) and `/proc/<pid>/status` (VmRSS, VmHWM) every
`sample_s` for `minutes`, then SIGTERM it and wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.poll import RCON_PASSWORD, write_config
from bench.procs import Fake, child_env

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces: split after its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a live process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def sample(pid: int, seconds: float, every: float = 1.0) -> dict[str, Any]:
    """Average CPU (% of one core) and RSS of `pid` over `seconds`."""
    cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < seconds:
        time.sleep(every)
        rss.append(proc_memory_mb(pid)["VmRSS"])
    cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
    return {
        "seconds": t1 - t0,
        "cpu_percent_of_one_core": 100 * (cpu1 - cpu0) / (t1 - t0),
        "rss_mb_avg": sum(rss) / len(rss),
        "rss_mb_max": max(rss),
        "peak_rss_mb": proc_memory_mb(pid)["VmHWM"],
    }


def run_idle(
    customers: int = 10_000,
    *,
    minutes: float = 3.0,
    interval_s: int = 60,
    warmup_s: float | None = None,
    concurrency: int = 16,
) -> dict[str, Any]:
    """TODO(idle-bench): the service is not finished; see the module docstring."""
    warmup = interval_s if warmup_s is None else warmup_s
    with tempfile.TemporaryDirectory(prefix="perksync-idle-") as tmp:
        folder = Path(tmp)
        with (
            Fake(["paynow", "--customers", str(customers), "--workdir", str(folder)]) as paynow,
            Fake(["rcon", "--password", RCON_PASSWORD]) as rcon,
        ):
            tokens = folder / "tokens.txt"
            config = write_config(folder, paynow.port, rcon.port, concurrency, tokens)
            interval = f"sync:\n  interval_seconds: {interval_s}\n"
            config.write_text(config.read_text().replace("sync:\n", interval, 1))
            with (folder / "service.log").open("w") as log:
                service = subprocess.Popen(
                    [sys.executable, "-m", "daemon", "--config", str(config)],
                    cwd=folder, env=child_env(perksync=True), stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
                try:
                    time.sleep(warmup)
                    if service.poll() is not None:
                        raise RuntimeError(f"the service exited with {service.returncode}")
                    result = sample(service.pid, minutes * 60)
                finally:
                    service.send_signal(signal.SIGTERM)
                    try:
                        service.wait(30)
                    except subprocess.TimeoutExpired:
                        service.kill()
                        service.wait(10)
    return {
        "customers": customers,
        "interval_s": interval_s,
        "warmup_s": warmup,
        "minutes": minutes,
        **result,
    }
