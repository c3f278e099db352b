"""`python -m bench`: run the benchmarks and write bench/results/latest.{md,json}.

    python -m bench                       # everything (poll, rcon, growth): ~10 minutes
    python -m bench poll --customers 10000
    python -m bench rcon --commands 5000
    python -m bench growth --sizes 1000,10000,50000
    python -m bench idle                  # TODO(idle-bench): service mode, on request only

A single part writes `<part>-latest.{md,json}` instead of `latest.{md,json}`.
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

from bench.poll import run_poll
from bench.procs import REPO
from bench.rcon import run_rcon
from bench.report import growth_analysis, machine, markdown, poll_verdict, rcon_verdict

PARTS = ("poll", "rcon", "growth")  # what `python -m bench` runs ("idle" waits: see bench.idle)


def pass_timeout(customers: int) -> float:
    """Upper bound for one child process of a poll scenario (generous: ~4× the expected)."""
    return 120.0 + customers * 0.008


def _sizes(text: str) -> list[int]:
    return sorted({int(part) for part in text.split(",") if part.strip()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="perksync benchmarks (issue 4)"
    )
    parser.add_argument("part", nargs="?", default="all", choices=["all", *PARTS, "idle"])
    parser.add_argument("--customers", type=int, default=10_000, help="poll / idle: customers")
    parser.add_argument("--items", type=int, default=5, help="poll: items per customer")
    parser.add_argument("--concurrency", type=int, default=16, help="poll: sync.concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="poll: warm passes")
    parser.add_argument("--commands", type=int, default=5000, help="rcon: commands per client")
    parser.add_argument(
        "--sizes", type=_sizes, default=[1000, 10_000, 50_000], help="growth: customer counts"
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="idle: minutes sampled")
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
        from bench.idle import run_idle  # TODO(idle-bench): see bench/idle.py

        _say(f"idle service: {args.customers:,} customers, {args.minutes:g} minutes ...")
        results["idle"] = run_idle(args.customers, minutes=args.minutes)
        results["idle_note"] = "Measured with `python -m bench idle` (service mode)."
    results["elapsed_s"] = time.perf_counter() - started
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


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
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    _say(f"wrote {args.out / (stem + '.md')} and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
