"""Store mode as a service: purchase and chargeback latencies, requests, CPU and RSS.

For each state backend asked for (SQLite, PostgreSQL), against fresh fakes in
processes of their own (`bench.fakes store`: a PayNow Management API with N
customers and M items, L of them live; `bench.fakes rcon`: a vanilla
Minecraft server stamping each command's arrival with `time.time()`):

0. `perksync --sync-now` with no rate limit brings a fresh state database up
   to date (every live item granted, the new-items cursor set), as a service
   that has been running would find it; its commands are checked;
1. `perksync` as the service, default rate limit (`paynow.requests_per_second`
   left out: 20), `sync.interval_seconds` and `sync.new_items_seconds` as
   asked (defaults 60 and 5), webhooks on `http.listen`; the first reads
   (a new-items read and a snapshot) are waited for;
2. idle: nothing changes at PayNow for `idle_minutes`: CPU from
   `/proc/<pid>/stat`, VmRSS every second, the requests the fake served;
3. polling: purchases and chargebacks at random moments over
   `phase_minutes`, no webhooks: perksync finds purchases by its new-items
   reads and chargebacks by its snapshots (an item missing from the snapshot
   is looked up through its customer's items);
4. webhooks: the same, each followed by PayNow's signed webhook;
5. SIGTERM; VmHWM is the peak RSS of the whole run.

Latency is from the moment the fake changed the item to the moment the RCON
fake received its command (one clock: this machine's). Every command carries
its item's id, so each is matched to its event; every expected command must
have arrived exactly once and no other, or the run fails. The requests the
fake served (with their times) say where the time went: the wait for the
next read that could see the change, and the read to the command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.idle import Watch, free_port, proc_cpu_seconds, proc_memory_mb
from bench.procs import Fake, child_env, stop_service
from bench.store_analysis import analyse, check_delivered
from bench.store_fake import CONFIGURED, ROUNDS

RCON_PASSWORD = "bench-rcon-pw"
_SNAPSHOTS_OK = re.compile(
    r'^perksync_store_reads_total\{(?=[^}]*read="snapshot")(?=[^}]*outcome="ok")[^}]*\}\s+(\S+)',
    re.MULTILINE,
)
WEBHOOK_SECRET = "bench-webhook-secret"
BACKENDS = ("sqlite", "postgres")

# Every command names its item, so that each can be matched to its event.
PRODUCTS: dict[str, dict[str, list[str]]] = {
    "vip": {
        "on_active": ["perk grant {item.id} vip {customer.minecraft_uuid}"],
        "on_expire": ["perk end {item.id} vip {customer.minecraft_uuid}"],
        "on_revoke": ["perk revoke {item.id} vip {customer.minecraft_uuid} {item.revoke_reason}"],
    },
    "crate-key": {"on_active": ["perk grant {item.id} crate-key {customer.minecraft.name}"]},
}
assert set(PRODUCTS) == set(CONFIGURED)
IGNORED = sorted(set(ROUNDS) - set(CONFIGURED))  # the store's other products: cosmetics


@dataclass(frozen=True, slots=True)
class Scenario:
    customers: int = 10_000
    items: int = 50_000
    live: int = 20_000
    interval_s: float = 60.0
    new_items_s: float = 5.0
    idle_minutes: float = 2.0
    phase_minutes: float = 3.0
    purchases: int = 60  # per phase
    revokes: int = 20  # per phase
    seed_timeout_s: float = 1800.0


def expected_command(event: dict[str, Any]) -> str:
    """The command a purchase (`on_active`) or chargeback (`on_revoke`) runs."""
    item, product = event["item"], event["product"]
    if event.get("kind") == "revoke":
        return f"perk revoke {item} vip {event['uuid']} chargeback"
    who = event["uuid"] if product == "vip" else event["name"]
    return f"perk grant {item} {product} {who}"


def write_config(
    folder: Path, store: dict[str, Any], ports: dict[str, int], state_db: str, sc: Scenario
) -> dict[str, Path]:
    """The service's config.yaml, and seed.yaml (the same with no rate limit)."""
    secrets = {"api_key": store["api_key"], "webhook": WEBHOOK_SECRET, "rcon": RCON_PASSWORD}
    for name, value in secrets.items():
        path = folder / f"secret-{name}"
        path.write_text(value + "\n")
        path.chmod(0o600)
    lines = [
        "paynow:",
        f"  api_url: http://127.0.0.1:{ports['paynow']}",
        "  timeout_seconds: 30",
        f'  store_id: "{store["store_id"]}"',
        f"  api_key_file: {folder / 'secret-api_key'}",
        f"  webhook_secret_file: {folder / 'secret-webhook'}",
        "sync:",
        f"  state_db: {json.dumps(state_db)}",
        f"  interval_seconds: {sc.interval_s:g}",
        f"  new_items_seconds: {sc.new_items_s:g}",
        "http:",
        f"  listen: 127.0.0.1:{ports['http']}",
        "servers:",
        "  survival:",
        "    platform: minecraft",
        "    host: 127.0.0.1",
        f"    port: {ports['rcon']}",
        f"    password_file: {folder / 'secret-rcon'}",
        # 10 s at the measured interval; shorter ones (the smoke test's) need a
        # timeout under a third of the interval on a PostgreSQL state.
        f"    timeout_seconds: {min(10.0, sc.interval_s / 4):g}",
        "products:",
    ]
    for slug, events in PRODUCTS.items():
        lines.append(f"  {slug}:")
        for event, commands in events.items():
            lines += [f"    {event}:", *(f"      - {json.dumps(c)}" for c in commands)]
    lines += [f"  {slug}: ignore" for slug in IGNORED]
    text = "\n".join(lines) + "\n"
    paths = {"service": folder / "config.yaml", "seed": folder / "seed.yaml"}
    paths["service"].write_text(text)
    paths["seed"].write_text(text.replace("paynow:\n", "paynow:\n  requests_per_second: 0\n", 1))
    return paths


def snapshots_done(port: int) -> int:
    """Complete snapshots so far, from the service's /metrics (0 if unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0
    found = _SNAPSHOTS_OK.search(text)
    return int(float(found.group(1))) if found else 0


class _Run:
    """One backend's run: its folder, fakes, service and what was sampled."""

    def __init__(self, folder: Path, store: Fake, rcon: Fake, sc: Scenario) -> None:
        self.folder, self.store, self.rcon, self.sc = folder, store, rcon, sc
        self.marks: dict[str, tuple[float, float, float]] = {}  # name → wall, CPU s, fake CPU s
        self.rss: dict[str, list[float]] = {}

    def received(self) -> list[list[Any]]:
        dump = self.folder / "received.json"
        self.rcon.ask(f"dump_timed {dump}")
        rows: list[list[Any]] = json.loads(dump.read_text())
        return rows

    def seed(self, config: Path, store_info: dict[str, Any]) -> dict[str, Any]:
        log = self.folder / "seed.log"
        t0 = time.monotonic()
        with log.open("w") as out:
            done = subprocess.run(
                [sys.executable, "-m", "daemon", "--config", str(config), "--sync-now"],
                cwd=self.folder, env=child_env(perksync=True), stdout=out,
                stderr=subprocess.STDOUT, timeout=self.sc.seed_timeout_s, check=False,
            )  # fmt: skip
        seconds = time.monotonic() - t0
        expected = Counter(expected_command(one) for one in store_info["live"])
        received = Counter(command for _, command in self.received())
        self.rcon.ask("clear")
        if done.returncode != 0 or received != expected:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(
                f"the seeding --sync-now: exit {done.returncode}, "
                f"{sum((expected - received).values())} commands missing, "
                f"{sum((received - expected).values())} unexpected; log tail:\n{tail}"
            )
        return {"seconds": seconds, "commands_delivered": sum(received.values())}

    def events_happened(self) -> bool:
        done, planned = self.store.ask("progress").split()
        return done == planned

    def mark(self, name: str, pid: int) -> None:
        self.marks[name] = (time.time(), proc_cpu_seconds(pid), self.store.cpu())


def _wait_for(
    what: str, done: Callable[[], bool], watch: Watch, timeout: float, rss: list[float]
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        watch.wait(time.monotonic() + 1.0, rss)


def _phase(run: _Run, watch: Watch, name: str, webhook_url: str | None, seed: int) -> None:
    """Purchases and chargebacks over the phase, then until their commands arrived."""
    sc = run.sc
    rss = run.rss.setdefault(name, [])
    run.mark(f"{name}_start", watch.proc.pid)
    seconds = sc.phase_minutes * 60
    words = ["events", sc.purchases, sc.revokes, f"{seconds:g}", seed]
    answer = run.store.ask(" ".join(map(str, [*words, *([webhook_url] if webhook_url else [])])))
    if answer != "ok":
        raise RuntimeError(f"the store fake refused the events: {answer}")
    planned = sc.purchases + sc.revokes
    _wait_for(f"the {name} events", run.events_happened, watch, seconds + 60, rss)
    run.mark(f"{name}_events_done", watch.proc.pid)
    events = _events(run)
    wanted = {expected_command(e) for e in events}
    arrived = lambda: wanted <= {c for _, c in run.received()}  # noqa: E731
    # A chargeback waits at most for the next snapshot, its look-up and delivery.
    drain = 2 * sc.interval_s + 120 + (sc.live / 100) / 20
    _wait_for(f"the {name} commands ({planned} events)", arrived, watch, drain, rss)
    watch.wait(time.monotonic() + 2.0, rss)  # anything sent twice would come now
    run.mark(f"{name}_end", watch.proc.pid)


def _events(run: _Run) -> list[dict[str, Any]]:
    dump = run.folder / "events.json"
    run.store.ask(f"dump_events {dump}")
    events: list[dict[str, Any]] = json.loads(dump.read_text())
    return events


def _idle(run: _Run, watch: Watch) -> None:
    pid = watch.proc.pid
    run.mark("idle_start", pid)
    rss = run.rss.setdefault("idle", [])
    watch.wait(time.monotonic() + run.sc.idle_minutes * 60, rss)
    run.mark("idle_end", pid)


def _service(run: _Run, config: Path, http_port: int) -> dict[str, Any]:
    """Start the service, wait for its first reads, then idle, polling, webhooks."""
    log = run.folder / "service.log"
    with log.open("w") as out:
        run.marks["service_start"] = (time.time(), 0.0, run.store.cpu())
        service = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(config)],
            cwd=run.folder, env=child_env(perksync=True), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        watch = Watch(service, log, 1.0)
        try:
            first = run.rss.setdefault("start", [])
            _wait_for(
                "the first snapshot", lambda: snapshots_done(http_port) >= 1, watch, 600, first
            )
            run.mark("started", service.pid)
            _idle(run, watch)
            _phase(run, watch, "polling", None, 1)
            _phase(run, watch, "webhooks", f"http://127.0.0.1:{http_port}/paynow/webhook", 2)
            peak = proc_memory_mb(service.pid)["VmHWM"]
        finally:
            code, stop_s = stop_service(service, 60)
    return {"peak_rss_mb": peak, "exit_code": code, "stop_s": stop_s}


def run_backend(backend: str, state_db: str, sc: Scenario, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    store_args = ["store", "--customers", sc.customers, "--items", sc.items, "--live", sc.live]
    store_args += ["--workdir", folder, "--secret", WEBHOOK_SECRET]
    with (
        Fake([str(a) for a in store_args]) as store,
        Fake(["rcon", "--password", RCON_PASSWORD]) as rcon,
    ):
        info = json.loads((folder / "store.json").read_text())
        ports = {"paynow": store.port, "rcon": rcon.port, "http": free_port()}
        configs = write_config(folder, info, ports, state_db, sc)
        run = _Run(folder, store, rcon, sc)
        seeded = run.seed(configs["seed"], info)
        service = _service(run, configs["service"], ports["http"])
        events = _events(run)
        received = run.received()
        requests_dump = folder / "requests.json"
        store.ask(f"dump_requests {requests_dump}")
        requests = json.loads(requests_dump.read_text())
    expected = Counter(expected_command(event) for event in events)
    delivered = check_delivered(expected, received, f"{backend}: the service")
    result = analyse(events, received, requests, run.marks, run.rss)
    result["delivered"] = delivered
    result.update(backend=backend, seeded=seeded, **service)
    return result


@contextmanager
def state_databases(backends: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Each backend's `sync.state_db`: a SQLite file, a PostgreSQL schema of its own
    (`PERKSYNC_TEST_POSTGRES_URL`, default the test server; dropped after)."""
    with tempfile.TemporaryDirectory(prefix="perksync-store-db-") as tmp:
        urls = {"sqlite": str(Path(tmp) / "state.sqlite3")}
        if "postgres" not in backends:
            yield urls
            return
        from tests.postgres_db import empty_schema

        with empty_schema(durable=True) as url:
            yield {**urls, "postgres": url}


def run_store(
    sc: Scenario, backends: tuple[str, ...] = BACKENDS, *, keep: Path | None = None
) -> dict[str, Any]:
    """The scenario on each backend in turn (its files kept in `keep`); a JSON-able dict."""
    started = time.perf_counter()
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="perksync-store-") as tmp,
        state_databases(backends) as urls,
    ):
        for backend in backends:
            folder = (keep or Path(tmp)) / backend
            runs.append(run_backend(backend, urls[backend], sc, folder))
    return {
        "scenario": {k: getattr(sc, k) for k in sc.__slots__},
        "requests_per_second": 20.0,  # perksync's default: left out of the config
        "runs": runs,
        "elapsed_s": time.perf_counter() - started,
    }
