"""Idle cost of the service: CPU and RSS of `perksync` in service mode, from /proc.

One fake PayNow process serves N customers with 5 items each and one fake
Minecraft RCON process takes the commands (the same fakes and config as the
poll pass, `bench.poll.write_config`), with `sync.interval_seconds` (60 s)
and `http.listen` on a free loopback port (for `/metrics`). For each rate
limit asked for (by default 20 requests/s, perksync's default, and 0, no
limit) a fresh `python -m daemon --config ...` (service mode: no flag) runs
with a fresh state database against the same fakes:

0. `perksync --sync-now` (no rate limit) on that state database first, so
   the service starts as one that has been running: every customer seen,
   every command delivered, every answer's digest stored;
1. the first interval (start-up, loading the config, scheduling N jobs and
   the first polls): its CPU is reported on its own;
2. the steady window (`minutes`): `/proc/<pid>/stat` utime + stime at both
   ends (average CPU, % of one core), `/proc/<pid>/status` VmRSS every
   `sample_s` (average and max) and VmHWM (peak, whole run) at the end; the
   requests the PayNow fake served and perksync's `perksync_polls_total`
   (ok / failed / skipped) at both ends, so polls per minute are counted, not
   assumed; the PayNow fake's CPU meanwhile;
3. SIGTERM, and the exit status and how long stopping took;
4. the floor at that pace (`bench.floor --paced`): a bare aiohttp loop
   making as many inventory requests a second as the service made polls, for
   up to a minute, against the same fake: its CPU is what the HTTP requests
   alone cost, spread out as the scheduler spreads them.

Nothing changes in the fake's data, so every poll of the service finds its
customer unchanged: that is the idle state being measured.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.poll import RCON_PASSWORD, write_config
from bench.procs import REPO, Fake, child_env, perksync_source, stop_service

_TICKS = os.sysconf("SC_CLK_TCK")

CUSTOMER_PATH = "/v1/store/customer"
ITEMS_PATH = "/v1/store/customer/delivery/items"
DEFAULT_RATE_LIMITS = (20.0, 0.0)  # perksync's default, and no limit


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STRETCHED = re.compile(r"polling each every (\d+(?:\.\d+)?)s instead")
_POLLS = re.compile(r'^perksync_polls_total\{outcome="(\w+)"\}\s+(\S+)', re.MULTILINE)


def scrape_polls(port: int, timeout: float = 10.0) -> dict[str, int] | None:
    """perksync_polls_total by outcome from the service's /metrics (None if unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    return {outcome: int(float(value)) for outcome, value in _POLLS.findall(text)}


def _delta(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


class Watch:
    """Samples one live process: CPU between marks, VmRSS every `every` seconds."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, every: float) -> None:
        self.proc = proc
        self.log = log
        self.every = every

    def alive(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{tail}")

    def wait(self, until: float, rss: list[float] | None = None) -> None:
        """Sleep until time.monotonic() reaches `until`, sampling VmRSS into `rss`."""
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(self.every, left))
            self.alive()
            if rss is not None:
                rss.append(proc_memory_mb(self.proc.pid)["VmRSS"])


def _requests(paynow: Fake) -> dict[str, int]:
    served: dict[str, int] = json.loads(paynow.ask("requests"))
    return served


def run_service(
    folder: Path,
    paynow: Fake,
    rcon: Fake,
    customers: int,
    *,
    requests_per_second: float,
    minutes: float,
    interval_s: float,
    warmup_s: float,
    concurrency: int,
    sample_s: float,
) -> dict[str, Any]:
    """One service run against the running fakes, in `folder` (its config and state)."""
    folder.mkdir()
    http_port = free_port()
    config = write_config(folder, paynow.port, rcon.port, concurrency, folder.parent / "tokens.txt")
    # The state a running service has: one `--sync-now` (no rate limit) has
    # seen every customer and delivered their commands. Measured from a fresh
    # database instead, the window would hold the first polls of thousands of
    # customers (at 20 requests/s a first round takes many minutes).
    rcon.ask("clear")
    seed_log = folder / "seed.log"
    seed0 = time.monotonic()
    with seed_log.open("w") as out:
        seed = subprocess.run(
            [sys.executable, "-m", "daemon", "--config", str(config), "--sync-now"],
            cwd=folder, env=child_env(perksync=True), stdout=out, stderr=subprocess.STDOUT,
            timeout=1200, check=False,
        )  # fmt: skip
    if seed.returncode != 0:
        tail = "\n".join(seed_log.read_text(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"the seeding --sync-now exited with {seed.returncode}:\n{tail}")
    seeded = {"seconds": time.monotonic() - seed0, "commands_delivered": int(rcon.ask("count"))}
    text = config.read_text()
    rate = f"  requests_per_second: {requests_per_second:g}\n"
    text = text.replace("  requests_per_second: 0\n", rate, 1)
    text = text.replace("sync:\n", f"sync:\n  interval_seconds: {interval_s:g}\n", 1)
    text = text.replace("servers:\n", f"http:\n  listen: 127.0.0.1:{http_port}\n" + "servers:\n", 1)
    config.write_text(text)
    rcon.ask("clear")
    log = folder / "service.log"
    with log.open("w") as out:
        requests0 = _requests(paynow)
        t0 = time.monotonic()
        service = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(config)],
            cwd=folder, env=child_env(perksync=True), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        watch = Watch(service, log, sample_s)
        try:
            # 1. The first interval: start-up, the config, the first polls.
            watch.wait(t0 + warmup_s)
            t1, cpu1 = time.monotonic(), proc_cpu_seconds(service.pid)
            requests1, polls1 = _requests(paynow), scrape_polls(http_port)
            commands_first = int(rcon.ask("count"))
            fake1 = paynow.cpu()
            # 2. The steady window, with a CPU mark every interval.
            rss: list[float] = []
            marks = [(t1, cpu1)]
            end = t1 + minutes * 60
            while (now := time.monotonic()) < end - 0.5:
                watch.wait(min(end, now + interval_s), rss)
                marks.append((time.monotonic(), proc_cpu_seconds(service.pid)))
            t2, cpu2 = marks[-1]
            requests2, polls2 = _requests(paynow), scrape_polls(http_port)
            fake2 = paynow.cpu()
            commands_steady = int(rcon.ask("count")) - commands_first
            peak = proc_memory_mb(service.pid)["VmHWM"]
        finally:
            # 3. Stop it.
            _, stop_s = stop_service(service, 30)
    steady_s = t2 - t1
    stretched = _STRETCHED.search(log.read_text(errors="replace"))
    polls = requests2.get(ITEMS_PATH, 0) - requests1.get(ITEMS_PATH, 0)
    # The floor at this pace: a bare aiohttp loop making as many inventory
    # requests a second as the service made polls, against the same fake.
    floor = paced_floor(folder, paynow, polls / steady_s, min(steady_s, 60.0)) if polls else None
    # Every poll reads the inventory (one page at 5 items); the customer itself
    # is read on a first poll, when the inventory changed, and every few polls.
    polls_first = requests1.get(ITEMS_PATH, 0) - requests0.get(ITEMS_PATH, 0)
    customers_first = requests1.get(CUSTOMER_PATH, 0) - requests0.get(CUSTOMER_PATH, 0)
    customer_reads = requests2.get(CUSTOMER_PATH, 0) - requests1.get(CUSTOMER_PATH, 0)
    cpu_s = cpu2 - cpu1
    return {
        "requests_per_second": requests_per_second,
        "seeded": seeded,
        "first_interval": {
            "seconds": t1 - t0,
            "cpu_s": cpu1,
            "cpu_percent_of_one_core": 100 * cpu1 / (t1 - t0),
            "polls": polls_first,  # inventory requests the fake served
            "customer_requests": customers_first,
            "commands_delivered": commands_first,
            "polls_metric": polls1,
        },
        "steady": {
            "seconds": steady_s,
            "cpu_s": cpu_s,
            "cpu_percent_of_one_core": 100 * cpu_s / steady_s,
            "cpu_percent_per_interval": [
                100 * (c2 - c1) / (b - a) for (a, c1), (b, c2) in itertools.pairwise(marks)
            ],
            "rss_mb_avg": sum(rss) / len(rss),
            "rss_mb_max": max(rss),
            "polls": polls,
            "customer_requests": customer_reads,
            "http_requests_per_s": (polls + customer_reads) / steady_s,
            "polls_per_min": polls / steady_s * 60,
            "polls_metric": _delta(polls2, polls1),
            "cpu_us_per_poll": cpu_s / polls * 1e6 if polls else None,
            "commands_delivered": commands_steady,
            "fake_paynow_cpu_percent": 100 * (fake2 - fake1) / steady_s,
        },
        "paced_floor": floor,
        "peak_rss_mb": peak,
        # The poll period the service chose (it stretches the interval, with a
        # warning, when the rate limit cannot poll everyone that often).
        "effective_interval_s": float(stretched.group(1)) if stretched else interval_s,
        "exit_code": service.returncode,
        "stop_s": stop_s,
    }


def paced_floor(folder: Path, paynow: Fake, rate: float, seconds: float) -> dict[str, Any]:
    """`bench.floor --paced`: CPU of bare inventory requests at `rate` a second."""
    out = folder / "paced-floor.json"
    with out.open("w") as f:
        subprocess.run(
            [sys.executable, "-m", "bench.floor", "--url", f"http://127.0.0.1:{paynow.port}",
             "--tokens", str(folder.parent / "tokens.txt"), "--paced", f"{rate:.3f}",
             "--seconds", f"{seconds:.1f}", "--timeout", "30"],
            cwd=REPO, env=child_env(), stdout=f, timeout=seconds + 60, check=True,
        )  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    result["rate"] = rate
    result["cpu_percent_of_one_core"] = 100 * result["cpu_s"] / result["seconds"]
    result["cpu_us_per_request"] = result["cpu_s"] / max(1, result["requests"]) * 1e6
    return result


def _dirty() -> list[str]:
    """Uncommitted changes to the measured daemon/ and adapters/ (`git status`)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "daemon", "adapters"],
            cwd=perksync_source(), capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
    except OSError:
        return []
    return [line.strip() for line in out.splitlines()]


def run_idle(
    customers: int = 10_000,
    *,
    minutes: float = 3.0,
    interval_s: float = 60,
    warmup_s: float | None = None,
    rate_limits: tuple[float, ...] = DEFAULT_RATE_LIMITS,
    concurrency: int = 16,
    sample_s: float = 1.0,
) -> dict[str, Any]:
    """The service at each rate limit in turn, against the same fakes; a JSON-able dict."""
    warmup = interval_s if warmup_s is None else warmup_s
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="perksync-idle-") as tmp:
        folder = Path(tmp)
        with (
            Fake(["paynow", "--customers", str(customers), "--workdir", str(folder)]) as paynow,
            Fake(["rcon", "--password", RCON_PASSWORD]) as rcon,
        ):
            for index, rate in enumerate(rate_limits):
                one = run_service(
                    folder / f"run-{index}", paynow, rcon, customers,
                    requests_per_second=rate, minutes=minutes, interval_s=interval_s,
                    warmup_s=warmup, concurrency=concurrency, sample_s=sample_s,
                )  # fmt: skip
                runs.append(one)
    return {
        "customers": customers,
        "items_per_customer": 5,
        "interval_s": interval_s,
        "warmup_s": warmup,
        "minutes": minutes,
        "concurrency": concurrency,
        "perksync_changes": _dirty(),
        "runs": runs,
        "elapsed_s": time.perf_counter() - started,
    }
