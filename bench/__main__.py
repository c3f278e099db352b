"""`python -m bench`: run the benchmarks and write bench/results/latest.{md,json}.

    python -m bench                       # poll, rcon, growth: ~7 minutes
    python -m bench poll --customers 10000
    python -m bench rcon --commands 5000
    python -m bench growth --sizes 1000,10000,50000
    python -m bench idle                  # service mode, opt-in: ~11 minutes
    python -m bench store                 # store mode as a service, opt-in: ~20 minutes

A single part writes `<part>-latest.{md,json}` instead of `latest.{md,json}`.
The idle and store parts are not in the default run (either would take it
past ~18 minutes): `python -m bench idle` and `python -m bench store` also
fold their results into an existing `latest.{json,md}`, and a default run
keeps the idle and store results it finds there (the report names the date
and commit they were measured at).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.idle import DEFAULT_RATE_LIMITS, run_idle
from bench.poll import run_poll
from bench.procs import REPO
from bench.rcon import run_rcon
from bench.report import (
    growth_analysis,
    idle_verdict,
    machine,
    markdown,
    poll_verdict,
    rcon_verdict,
)
from bench.store import BACKENDS, Scenario, run_store
from bench.store_report import store_line, store_verdict

PARTS = ("poll", "rcon", "growth")  # what `python -m bench` runs
OPT_IN = ("idle", "store")  # run only when named: ~11 and ~20 minutes


def pass_timeout(customers: int) -> float:
    """Upper bound for one child process of a poll scenario (generous: ~4× the expected)."""
    return 120.0 + customers * 0.008


def _sizes(text: str) -> list[int]:
    return sorted({int(part) for part in text.split(",") if part.strip()})


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {sorted(unknown)[0]!r}; {BACKENDS}")
    return names


def _rates(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="perksync benchmarks")
    parser.add_argument("part", nargs="?", default="all", choices=["all", *PARTS, *OPT_IN])
    parser.add_argument("--customers", type=int, default=10_000, help="poll / idle: customers")
    parser.add_argument("--items", type=int, default=5, help="poll: items per customer")
    parser.add_argument("--concurrency", type=int, default=16, help="poll: sync.concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="poll: warm passes")
    parser.add_argument("--commands", type=int, default=5000, help="rcon: commands per client")
    parser.add_argument(
        "--sizes", type=_sizes, default=[1000, 10_000, 50_000], help="growth: customer counts"
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="idle: minutes sampled")
    parser.add_argument("--interval", type=float, default=60.0, help="idle: sync.interval_seconds")
    parser.add_argument(
        "--rate-limits",
        type=_rates,
        default=DEFAULT_RATE_LIMITS,
        help="idle: paynow.requests_per_second of each service run (0: no limit)",
    )
    store = parser.add_argument_group("store (store mode as a service; --customers, --interval)")
    store.add_argument("--store-items", type=int, default=50_000, help="items in the store")
    store.add_argument("--live", type=int, default=20_000, help="of them live")
    store.add_argument("--new-items", type=float, default=5.0, help="sync.new_items_seconds")
    store.add_argument("--idle-minutes", type=float, default=2.0)
    store.add_argument("--phase-minutes", type=float, default=3.0, help="without, with webhooks")
    store.add_argument("--purchases", type=int, default=60, help="per phase")
    store.add_argument("--revokes", type=int, default=20, help="chargebacks per phase")
    store.add_argument("--backends", type=_names, default=BACKENDS, help="sqlite,postgres")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    started = time.perf_counter()
    parts = PARTS if args.part == "all" else (args.part,)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": shlex.join(["python", "-m", "bench", *argv]),
    }
    polls: dict[int, dict[str, Any]] = {}

    def poll(customers: int, rounds: int) -> dict[str, Any]:
        if customers not in polls:
            _say(f"poll pass: {customers:,} customers ...")
            polls[customers] = run_poll(
                customers,
                items=args.items,
                concurrency=args.concurrency,
                rounds=rounds,
                pass_timeout=pass_timeout(customers),
            )
            _say(_poll_line(polls[customers]))
        return polls[customers]

    if "poll" in parts:
        results["poll"] = poll(args.customers, args.rounds)
        results["poll"]["verdict"] = poll_verdict(results["poll"])
    if "rcon" in parts:
        _say(f"rcon: {args.commands:,} commands per client ...")
        results["rcon"] = run_rcon(args.commands)
        results["rcon"]["verdict"] = rcon_verdict(results["rcon"])
        _say(
            "rcon: "
            + ", ".join(
                f"{k} {v['commands_per_s']:,.0f}/s" for k, v in results["rcon"]["clients"].items()
            )
        )
    if "growth" in parts:
        points = [poll(n, 1) for n in args.sizes]
        results["growth"] = {"points": points, "analysis": growth_analysis(points)}
    if "idle" in parts:
        _say(
            f"idle service: {args.customers:,} customers every {args.interval:g} s, "
            f"{args.minutes:g} minutes sampled, rate limits {args.rate_limits} ..."
        )
        idle = run_idle(
            args.customers,
            minutes=args.minutes,
            interval_s=args.interval,
            rate_limits=args.rate_limits,
            concurrency=args.concurrency,
        )
        m = results["machine"]
        idle["measured"] = {
            "command": results["command"],
            **{k: m[k] for k in ("date", "commit", "loadavg_at_start")},
        }
        for one in idle["runs"]:
            one["verdict"] = idle_verdict(one)
            st = one["steady"]
            _say(
                f"  requests_per_second {one['requests_per_second']:g}: "
                f"{st['polls_per_min']:,.0f} polls/min, CPU {st['cpu_percent_of_one_core']:.2f} %,"
                f" RSS {st['rss_mb_avg']:.1f} MB avg, peak {one['peak_rss_mb']:.1f} MB"
            )
        results["idle"] = idle
    if "store" in parts:
        results["store"] = _store(args, results)
    results["elapsed_s"] = time.perf_counter() - started
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _store(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    scenario = Scenario(
        customers=args.customers, items=args.store_items, live=args.live,
        interval_s=args.interval, new_items_s=args.new_items, idle_minutes=args.idle_minutes,
        phase_minutes=args.phase_minutes, purchases=args.purchases, revokes=args.revokes,
    )  # fmt: skip
    _say(
        f"store mode: {scenario.customers:,} customers, {scenario.items:,} items "
        f"({scenario.live:,} live), backends {', '.join(args.backends)} ..."
    )
    store = run_store(scenario, args.backends)
    m = results["machine"]
    store["measured"] = {
        "command": results["command"],
        **{k: m[k] for k in ("date", "commit", "loadavg_at_start")},
    }
    for one in store["runs"]:
        one["verdict"] = store_verdict(one, scenario)
        _say(f"  {one['backend']}: {store_line(one)}")
    return store


def _poll_line(p: dict[str, Any]) -> str:
    warm = p["warm_median"]["wall_s"]
    return (
        f"  {p['customers']:,} customers: cold {p['cold']['process']['wall_s']:.1f} s, "
        f"warm {warm:.1f} s, floor {p['floor']['wall_s']:.1f} s "
        f"(ratio {p['ratio_wall']:.2f}), config {p['check_config']['wall_s']:.1f} s"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    results = run(args, argv)
    stem = "latest" if args.part == "all" else f"{args.part}-latest"
    args.out.mkdir(parents=True, exist_ok=True)
    latest = args.out / "latest.json"
    previous = json.loads(latest.read_text()) if latest.exists() else None
    for part in OPT_IN:
        if stem == "latest" and part not in results and previous and previous.get(part):
            results[part] = previous[part]  # opt-in part: keep the last one measured
    _write(args.out, stem, results)
    if args.part in OPT_IN and previous is not None:
        previous[args.part] = results[args.part]  # fold it into the full report
        _write(args.out, "latest", previous)
    return 0


def _write(out: Path, stem: str, results: dict[str, Any]) -> None:
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    _say(f"wrote {out / (stem + '.md')} and {stem}.json")


if __name__ == "__main__":
    sys.exit(main())
