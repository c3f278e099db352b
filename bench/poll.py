"""The poll pass: `perksync --sync-now` over N customers beside its floor.

One fake PayNow process serves N customers with 5 items each (one of each of
`bench.fakes.PRODUCTS`); one fake Minecraft RCON process takes the commands.
perksync is configured with two of those products (`PRODUCTS` below), so a
cold pass journals and delivers 2 commands per customer.

The run, all against the same fakes:
1. `perksync --check-config` (interpreter start-up + loading the config of N
   customers: the fixed cost inside every pass below);
2. the cold pass: everything is new (2N commands);
3. per round: a tenth of the customers change state (`bench.fakes._mutate`),
   the floor (`bench.floor`) runs, then the warm pass, then the floor again
   (the floor's figure is the median of those runs).
   The warm pass is the one compared with the floor: the same HTTP requests
   (2 per customer at 5 items), the same concurrency, nothing done with the
   answers.

After each pass the commands the RCON fake received are compared with the
ones expected from the fake's data: exactly these, each once.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import REPO, Fake, Measured, child_env, measure

RCON_PASSWORD = "bench-rcon-pw"

PRODUCTS: dict[str, dict[str, list[str]]] = {
    "vip": {
        "on_active": ["lp user {customer.minecraft_uuid} parent add vip"],
        "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"],
        "on_revoke": [
            "lp user {customer.minecraft_uuid} parent remove vip",
            "say {customer.minecraft.name} lost vip ({item.revoke_reason})",
        ],
    },
    "crate-key": {"on_active": ["crate key give {customer.minecraft.name} vote 1"]},
}


def expected_cold(world: list[dict[str, Any]]) -> Counter[str]:
    """The commands of a first pass: `on_active` of every active configured item."""
    out: Counter[str] = Counter()
    for customer in world:
        for _id, product, state, _reason in customer["items"]:
            if state not in ("active", "renewed"):
                continue
            if product == "vip":
                out[f"lp user {customer['uuid']} parent add vip"] += 1
            elif product == "crate-key":
                out[f"crate key give {customer['name']} vote 1"] += 1
    return out


def expected_changes(changes: list[dict[str, Any]]) -> Counter[str]:
    """The commands of the `vip` items that expired or were revoked."""
    out: Counter[str] = Counter()
    for change in changes:
        out[f"lp user {change['uuid']} parent remove vip"] += 1
        if change["state"] == "revoked":
            out[f"say {change['name']} lost vip ({change['revoke_reason']})"] += 1
    return out


def write_config(
    folder: Path, paynow_port: int, rcon_port: int, concurrency: int, tokens_file: Path
) -> Path:
    lines = [
        "paynow:",
        f"  api_url: http://127.0.0.1:{paynow_port}",
        "  timeout_seconds: 30",
        "  requests_per_second: 0",
        "sync:",
        "  state_db: state.sqlite3",
        f"  concurrency: {concurrency}",
        "servers:",
        "  survival:",
        "    platform: minecraft",
        "    host: 127.0.0.1",
        f"    port: {rcon_port}",
        f"    password: {RCON_PASSWORD}",
        "    timeout_seconds: 10",
        "products:",
    ]
    for slug, events in PRODUCTS.items():
        lines.append(f"  {slug}:")
        for event, commands in events.items():
            lines.append(f"    {event}:")
            lines.extend(f"      - {json.dumps(c)}" for c in commands)
    lines.append("customers:")
    with tokens_file.open() as f:
        lines.extend(f"  - token: {line.split()[0]}" for line in f if line.strip())
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _summary(log: Path) -> str:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "pass done:" in line:
            return line.split("pass done:", 1)[1].strip()
    return "(no summary line)"


class _Run:
    """The fakes and the folder of one poll scenario."""

    def __init__(self, folder: Path, paynow: Fake, rcon: Fake, config: Path) -> None:
        self.folder = folder
        self.paynow = paynow
        self.rcon = rcon
        self.config = config
        self.passes = 0
        self.floor_fake_cpu: list[float] = []  # the PayNow fake's CPU during each floor run

    def fakes_cpu(self) -> dict[str, float]:
        return {"paynow": self.paynow.cpu(), "rcon": self.rcon.cpu()}

    def perksync(self, *args: str, timeout: float) -> tuple[Measured, Path, dict[str, float]]:
        """Run perksync; its figures, its log, and the CPU the fakes spent meanwhile."""
        self.passes += 1
        log = self.folder / f"perksync-{self.passes}.log"
        before = self.fakes_cpu()
        with log.open("w") as err:
            measured = measure(
                [sys.executable, "-m", "daemon", "--config", str(self.config), *args],
                timeout=timeout,
                cwd=self.folder,
                env=child_env(perksync=True),
                stderr=err,
            )
        after = self.fakes_cpu()
        return measured, log, {k: after[k] - before[k] for k in after}

    def floor(self, concurrency: int, timeout: float) -> Measured:
        out = self.folder / "floor.out"
        before = self.paynow.cpu()
        with out.open("w") as f:
            measured = measure(
                [sys.executable, "-m", "bench.floor",
                 "--url", f"http://127.0.0.1:{self.paynow.port}",
                 "--tokens", str(self.folder / "tokens.txt"),
                 "--concurrency", str(concurrency), "--timeout", "30"],
                timeout=timeout, cwd=REPO, env=child_env(), stdout=f,
            )  # fmt: skip
        if measured.returncode != 0:
            raise RuntimeError(f"the floor loop failed: {out.read_text()[:500]}")
        self.floor_fake_cpu.append(self.paynow.cpu() - before)
        return measured

    def received(self) -> Counter[str]:
        dump = self.folder / "received.json"
        self.rcon.ask(f"dump {dump}")
        self.rcon.ask("clear")
        return Counter(json.loads(dump.read_text()))

    def check_pass(
        self,
        name: str,
        measured: Measured,
        log: Path,
        fakes_cpu: dict[str, float],
        expected: Counter[str],
    ) -> dict[str, Any]:
        received = self.received()
        missing = expected - received
        extra = received - expected
        result = {
            "process": measured.as_dict(),
            "fakes_cpu_s": fakes_cpu,
            "summary": _summary(log),
            "expected_commands": sum(expected.values()),
            "received_commands": sum(received.values()),
            "delivered_exactly": not missing and not extra,
        }
        if measured.returncode != 0 or missing or extra:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(
                f"{name} pass: exit {measured.returncode}, {sum(missing.values())} commands "
                f"missing, {sum(extra.values())} unexpected; log tail:\n{tail}"
            )
        return result


def run_poll(
    customers: int,
    *,
    items: int = 5,
    concurrency: int = 16,
    rounds: int = 1,
    pass_timeout: float = 600.0,
    keep: Path | None = None,
) -> dict[str, Any]:
    """The poll scenario at one size; a JSON-able dict of everything measured."""
    with tempfile.TemporaryDirectory(prefix="perksync-bench-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paynow_args = ["paynow", "--customers", str(customers), "--items", str(items)]
        with (
            Fake([*paynow_args, "--workdir", str(folder)]) as paynow,
            Fake(["rcon", "--password", RCON_PASSWORD]) as rcon,
        ):
            tokens = folder / "tokens.txt"
            config = write_config(folder, paynow.port, rcon.port, concurrency, tokens)
            run = _Run(folder, paynow, rcon, config)
            check, _, _ = run.perksync("--check-config", timeout=pass_timeout)
            paynow.ask("world")
            world = json.loads((folder / "world.json").read_text())
            floor_runs = []
            measured, log, fakes = run.perksync("--sync-now", timeout=pass_timeout)
            cold = run.check_pass("cold", measured, log, fakes, expected_cold(world))
            del world
            warm = []
            for round_ in range(rounds):
                paynow.ask(f"mutate {round_}")
                changes = json.loads((folder / "changes.json").read_text())
                floor_runs.append(run.floor(concurrency, pass_timeout))
                measured, log, fakes = run.perksync("--sync-now", timeout=pass_timeout)
                result = run.check_pass("warm", measured, log, fakes, expected_changes(changes))
                result["changed_customers"] = len(changes)
                warm.append(result)
                floor_runs.append(run.floor(concurrency, pass_timeout))
            requests = json.loads(paynow.ask("requests"))
    floor = {
        "wall_s": statistics.median(m.wall_s for m in floor_runs),
        "cpu_s": statistics.median(m.cpu_s for m in floor_runs),
        "peak_rss_mb": max(m.peak_rss_mb for m in floor_runs),
        "fake_paynow_cpu_s": statistics.median(run.floor_fake_cpu),
        "runs": [m.as_dict() for m in floor_runs],
    }
    median_warm = {
        "wall_s": statistics.median(w["process"]["wall_s"] for w in warm),
        "cpu_s": statistics.median(w["process"]["cpu_s"] for w in warm),
        "peak_rss_mb": max(w["process"]["peak_rss_mb"] for w in warm),
    }
    return {
        "customers": customers,
        "items_per_customer": items,
        "concurrency": concurrency,
        "http_requests_per_pass": 2 * customers,  # customer + one page (5 items < 100)
        "fake_requests_served": requests,
        "check_config": check.as_dict(),
        "cold": cold,
        "warm": warm,
        "warm_median": median_warm,
        "floor": floor,
        "ratio_wall": median_warm["wall_s"] / floor["wall_s"],
        "ratio_cpu": median_warm["cpu_s"] / floor["cpu_s"],
    }
