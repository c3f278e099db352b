"""Targets, the growth analysis and the Markdown report of a bench run."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

from bench.procs import REPO, SOURCE_VARIABLE, perksync_source
from bench.store_report import store_section

# Issue 4's targets.
POLL_MAX_RATIO = 1.3  # warm pass wall time / bare aiohttp loop wall time
POLL_MAX_RSS_MB = 150.0
RCON_MIN_VS_MCRCON = 10.0  # our commands/s / mcrcon's
RCON_MAX_BARE_RATIO = 2.0  # bare loop's commands/s / ours
IDLE_MAX_CPU_PERCENT = 3.0  # of one core, averaged over the steady window
IDLE_MAX_RSS_MB = 150.0
LINEAR_SLACK = 1.25  # a later marginal cost may exceed the first one by this much


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    source = perksync_source()
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=source, capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return {
        "perksync_source": None if source == REPO.resolve() else str(source),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def poll_verdict(poll: dict[str, Any]) -> dict[str, bool]:
    peak = max(p["process"]["peak_rss_mb"] for p in [poll["cold"], *poll["warm"]])
    return {
        "wall_within_1.3x_floor": poll["ratio_wall"] <= POLL_MAX_RATIO,
        "peak_rss_under_150mb": peak < POLL_MAX_RSS_MB,
    }


def rcon_verdict(rcon: dict[str, Any]) -> dict[str, bool]:
    return {
        "at_least_10x_mcrcon": rcon["ours_vs_mcrcon"] >= RCON_MIN_VS_MCRCON,
        "within_2x_bare_loop": rcon["bare_vs_ours"] <= RCON_MAX_BARE_RATIO,
    }


def idle_verdict(run: dict[str, Any]) -> dict[str, bool]:
    """One service run (one rate limit): average CPU and peak RSS against the targets."""
    return {
        "cpu_under_3pct": run["steady"]["cpu_percent_of_one_core"] < IDLE_MAX_CPU_PERCENT,
        "rss_under_150mb": run["peak_rss_mb"] < IDLE_MAX_RSS_MB,
    }


def growth_analysis(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Marginal cost per added customer between consecutive sizes, and a verdict.

    Growth is called linear (or better) when no later marginal cost exceeds
    the first one by more than LINEAR_SLACK: a cost that grew faster than
    linearly would show as a rising marginal cost.
    """
    points = sorted(points, key=lambda p: p["customers"])
    metrics: dict[str, Callable[[dict[str, Any]], float]] = {
        "warm_wall_s": lambda p: p["warm_median"]["wall_s"],
        "warm_cpu_s": lambda p: p["warm_median"]["cpu_s"],
        "cold_wall_s": lambda p: p["cold"]["process"]["wall_s"],
        "peak_rss_mb": lambda p: max(x["process"]["peak_rss_mb"] for x in [p["cold"], *p["warm"]]),
        "config_rss_mb": lambda p: p["check_config"]["peak_rss_mb"],
    }
    out: dict[str, Any] = {"sizes": [p["customers"] for p in points], "marginal": {}}
    verdict = {}
    for name, get in metrics.items():
        marginals = []
        for a, b in itertools.pairwise(points):
            added = b["customers"] - a["customers"]
            scale = 1e6 if name.endswith("_s") else 1024  # µs or KiB per customer
            marginals.append((get(b) - get(a)) / added * scale)
        out["marginal"][name] = marginals
        if len(marginals) >= 2 and marginals[0] > 0:
            verdict[name] = all(m <= marginals[0] * LINEAR_SLACK for m in marginals[1:])
    out["linear"] = verdict
    return out


def _f(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# perksync benchmark results",
        "",
        f"{m['date']}, commit `{m['commit']}`; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB RAM, Linux {m['kernel']}, Python {m['python']}.",
        f"Reproduce: `{results['command']}` (total run time {_f(results['elapsed_s'], 0)} s; "
        f"load average {m['loadavg_at_start'][0]:g} before, "
        f"{results.get('loadavg_at_end', ['?'])[0]} after).",
        "",
        *(
            [
                f"perksync measured from a checkout of that commit, `{m['perksync_source']}` "
                f"(`{SOURCE_VARIABLE}`).",
                "",
            ]
            if m.get("perksync_source")
            else []
        ),
        "Every figure is one child process measured from fork to exit with `os.wait4` (by a "
        "small middleman, `bench/spawn.py`, so that the peak RSS is the child's own): wall "
        "time, CPU time (user + sys) and peak RSS (`ru_maxrss`), interpreter start-up "
        "included. The fakes (PayNow, RCON) run in processes of their own; on this machine "
        f"they share its {m['cores']} cores with the process measured. Details: "
        "`bench/README.md`.",
    ]
    poll = results.get("poll")
    if poll:
        lines += _poll_section(poll)
    rcon = results.get("rcon")
    if rcon:
        lines += _rcon_section(rcon)
    growth = results.get("growth")
    if growth:
        lines += _growth_section(growth)
    lines += store_section(results.get("store"))
    idle = results.get("idle")
    lines += (
        _idle_section(idle, poll)
        if idle
        else [
            "",
            "## Idle service",
            "",
            "Not measured in this run. The idle part is opt-in: `python -m bench idle` (about "
            "11 minutes: per rate limit a `--sync-now` to bring the state up to date, a service "
            "with a 60 s first interval and 3 minutes sampled, and its floor), which would "
            "take `python -m bench` past ~18 minutes.",
        ]
    )
    return "\n".join(lines) + "\n"


def _poll_section(poll: dict[str, Any]) -> list[str]:
    n = poll["customers"]
    warm = poll["warm"][0]
    wp, fl, cold = poll["warm_median"], poll["floor"], poll["cold"]
    check = poll["check_config"]
    verdict = poll_verdict(poll)
    peak = max(p["process"]["peak_rss_mb"] for p in [cold, *poll["warm"]])
    warm_fake = statistics.median(w["fakes_cpu_s"]["paynow"] for w in poll["warm"])
    return [
        "",
        f"## Poll pass: {n:,} customers × {poll['items_per_customer']} items",
        "",
        f"`perksync --sync-now` with `sync.concurrency: {poll['concurrency']}` and no rate "
        f"limit, {poll['http_requests_per_pass']:,} HTTP requests per pass (the customer and "
        "one inventory page each). The compared pass is a warm one: "
        f"{warm['changed_customers']:,} customers (a tenth) changed state since the last pass "
        f"({warm['expected_commands']:,} commands). The floor is a bare aiohttp loop making "
        "the same requests with the same concurrency and doing nothing with the answers "
        f"(median of {len(fl['runs'])} runs).",
        "",
        "| process | wall s | CPU s | peak RSS MB | PayNow fake's CPU s meanwhile |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| perksync, warm pass (median of {len(poll['warm'])}) | {_f(wp['wall_s'])} | "
        f"{_f(wp['cpu_s'])} | {_f(wp['peak_rss_mb'], 1)} | {_f(warm_fake)} |",
        f"| bare aiohttp loop (floor) | {_f(fl['wall_s'])} | {_f(fl['cpu_s'])} | "
        f"{_f(fl['peak_rss_mb'], 1)} | {_f(fl['fake_paynow_cpu_s'])} |",
        f"| **ratio** | **{_f(poll['ratio_wall'])}×** | {_f(poll['ratio_cpu'])}× | | |",
        f"| perksync, cold pass ({cold['expected_commands']:,} commands delivered) | "
        f"{_f(cold['process']['wall_s'])} | {_f(cold['process']['cpu_s'])} | "
        f"{_f(cold['process']['peak_rss_mb'], 1)} | {_f(cold['fakes_cpu_s']['paynow'])} |",
        f"| `perksync --check-config` (start-up and loading the config of {n:,} "
        f"customers, part of every pass) | {_f(check['wall_s'])} | {_f(check['cpu_s'])} | "
        f"{_f(check['peak_rss_mb'], 1)} | |",
        "",
        f"Every pass delivered exactly the expected commands: "
        f"{all(p['delivered_exactly'] for p in [cold, *poll['warm']])}.",
        f"Targets: wall ≤ {POLL_MAX_RATIO}× the floor: {_ok(verdict['wall_within_1.3x_floor'])} "
        f"({_f(poll['ratio_wall'])}×); peak RSS < {POLL_MAX_RSS_MB:g} MB: "
        f"{_ok(verdict['peak_rss_under_150mb'])} ({_f(peak, 1)} MB).",
    ]


def _rcon_section(rcon: dict[str, Any]) -> list[str]:
    names = {
        "ours": "perksync (`MinecraftServer.run`)",
        "bare": "bare asyncio socket loop",
        "mcrcon": "mcrcon 0.7.0",
    }
    verdict = rcon_verdict(rcon)
    lines = [
        "",
        f"## RCON throughput: {rcon['commands']:,} commands, one connection",
        "",
        "To one fake vanilla-Minecraft RCON server in its own process; each client in its "
        "own process, one after the other; the timed loop excludes connecting. CPU is the "
        "client process's only.",
        "",
        "| client | commands/s | CPU µs/command | loop wall s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key in ("ours", "bare", "mcrcon"):
        c = rcon["clients"][key]
        lines.append(
            f"| {names[key]} | {_f(c['commands_per_s'], 0)} | "
            f"{_f(c['cpu_us_per_command'], 1)} | {_f(c['wall_s'])} |"
        )
    lines += [
        "",
        f"Targets: ≥ {RCON_MIN_VS_MCRCON:g}× mcrcon: {_ok(verdict['at_least_10x_mcrcon'])} "
        f"({_f(rcon['ours_vs_mcrcon'], 1)}×); within {RCON_MAX_BARE_RATIO:g}× of the bare "
        f"loop: {_ok(verdict['within_2x_bare_loop'])} (the bare loop is "
        f"{_f(rcon['bare_vs_ours'])}× as fast).",
    ]
    return lines


def _growth_section(growth: dict[str, Any]) -> list[str]:
    points = sorted(growth["points"], key=lambda p: p["customers"])
    lines = [
        "",
        "## Growth",
        "",
        "The same poll scenario at each size (one warm pass; the floor is measured beside it).",
        "",
        "| customers | config load s | cold pass s (commands) | warm pass wall s | "
        "warm CPU s | floor wall s | CPU µs / customer (warm) | peak RSS MB | "
        "config-only RSS MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        warm = p["warm_median"]
        peak = max(x["process"]["peak_rss_mb"] for x in [p["cold"], *p["warm"]])
        lines.append(
            f"| {p['customers']:,} | {_f(p['check_config']['wall_s'])} | "
            f"{_f(p['cold']['process']['wall_s'])} ({p['cold']['expected_commands']:,}) | "
            f"{_f(warm['wall_s'])} | {_f(warm['cpu_s'])} | {_f(p['floor']['wall_s'])} | "
            f"{_f(warm['cpu_s'] / p['customers'] * 1e6, 0)} | {_f(peak, 1)} | "
            f"{_f(p['check_config']['peak_rss_mb'], 1)} |"
        )
    analysis = growth["analysis"]
    sizes = analysis["sizes"]
    steps = [f"{a:,}→{b:,}" for a, b in itertools.pairwise(sizes)]
    lines += ["", "Marginal cost per added customer:", ""]
    lines.append("| | " + " | ".join(steps) + " | linear or better |")
    lines.append("| --- |" + " ---: |" * len(steps) + " :---: |")
    labels = {
        "warm_wall_s": "warm pass wall, µs",
        "warm_cpu_s": "warm pass CPU, µs",
        "cold_wall_s": "cold pass wall, µs",
        "peak_rss_mb": "peak RSS, KiB",
        "config_rss_mb": "config-only RSS, KiB",
    }
    for key, label in labels.items():
        values = " | ".join(_f(v, 1) for v in analysis["marginal"][key])
        linear = analysis["linear"].get(key)
        mark = "n/a" if linear is None else ("yes" if linear else "**no**")
        lines.append(f"| {label} | {values} | {mark} |")
    return lines


def _rate(rps: float) -> str:
    return f"{rps:g}/s" if rps else "0 (no limit)"


def _paced(floor: dict[str, Any] | None) -> str:
    if not floor:
        return "n/a"
    return f"{_f(floor['cpu_percent_of_one_core'])} %, {_f(floor['cpu_us_per_request'], 0)}"


def _idle_section(idle: dict[str, Any], poll: dict[str, Any] | None) -> list[str]:
    n, interval = idle["customers"], idle["interval_s"]
    measured = idle.get("measured", {})
    lines = [
        "",
        f"## Idle service: {n:,} customers × {idle['items_per_customer']} items, "
        f"every {interval:g} s",
        "",
        f"Measured by `{measured.get('command', 'python -m bench idle')}` "
        f"({measured.get('date', '?')}, commit `{measured.get('commit', '?')}`, load average "
        f"{measured.get('loadavg_at_start', ['?'])[0]} before; "
        f"{_f(idle.get('elapsed_s', 0), 0)} s).",
        "",
        f"`perksync` in service mode, `sync.interval_seconds: {interval:g}`, "
        f"`sync.concurrency: {idle['concurrency']}`, against the poll pass's fakes; one "
        "service per `paynow.requests_per_second`, each on a state database that one "
        "`perksync --sync-now` has just brought up to date (every customer seen, every "
        "command delivered), as a service that has been running would have. The first "
        f"interval ({_f(idle['warmup_s'], 0)} s: start-up, the config, scheduling {n:,} jobs "
        "and the first polls) is reported on its "
        f"own; then {idle['minutes']:g} minutes are sampled, in which nothing changes at "
        "PayNow: CPU from `/proc/<pid>/stat` (utime + stime at both ends), RSS from "
        "`/proc/<pid>/status` (VmRSS every second; VmHWM, the peak of the whole run). Polls "
        "are counted from the inventory requests the fake served (every poll reads the "
        "inventory; the customer itself is read again only every few polls or on a change); "
        "skipped polls from perksync's own `perksync_polls_total`.",
        "",
        "| `requests_per_second` | poll interval s | polls/min (due) | HTTP req/s | "
        "skipped polls | CPU % of one core "
        "(per interval) | CPU µs/poll | RSS MB avg / max | peak RSS MB | first interval: "
        "CPU %, polls, commands | PayNow fake CPU % | bare aiohttp loop at that pace: CPU %, "
        "µs/request |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in idle["runs"]:
        st, first = run["steady"], run["first_interval"]
        metric = st.get("polls_metric") or {}
        per = ", ".join(_f(x, 1) for x in st["cpu_percent_per_interval"])
        per_poll = "n/a" if st["cpu_us_per_poll"] is None else _f(st["cpu_us_per_poll"], 0)
        period = run.get("effective_interval_s", interval)
        lines.append(
            f"| {_rate(run['requests_per_second'])} | {_f(period, 0)} | "
            f"{_f(st['polls_per_min'], 0)} ({_f(n * 60 / period, 0)}) | "
            f"{_f(st['http_requests_per_s'], 1)} | {metric.get('skipped', '?'):,} | "
            f"**{_f(st['cpu_percent_of_one_core'])}** ({per}) | {per_poll} | "
            f"{_f(st['rss_mb_avg'], 1)} / {_f(st['rss_mb_max'], 1)} | "
            f"{_f(run['peak_rss_mb'], 1)} | {_f(first['cpu_percent_of_one_core'], 1)} %, "
            f"{first['polls']:,}, {first['commands_delivered']:,} | "
            f"{_f(st['fake_paynow_cpu_percent'], 1)} | {_paced(run.get('paced_floor'))} |"
        )
    lines.append("")
    for run in idle["runs"]:
        verdict = idle_verdict(run)
        st = run["steady"]
        lines.append(
            f"- `requests_per_second: {run['requests_per_second']:g}`: CPU < "
            f"{IDLE_MAX_CPU_PERCENT:g} % {_ok(verdict['cpu_under_3pct'])} "
            f"({_f(st['cpu_percent_of_one_core'])} %), RSS < {IDLE_MAX_RSS_MB:g} MB "
            f"{_ok(verdict['rss_under_150mb'])} (peak {_f(run['peak_rss_mb'], 1)} MB); "
            f"service stopped by SIGTERM with status {run['exit_code']} in "
            f"{_f(run['stop_s'], 1)} s."
        )
    floor_us = None
    if poll:
        requests = poll["http_requests_per_pass"]
        floor_us = poll["floor"]["cpu_s"] / requests * 1e6
    unlimited = [r for r in idle["runs"] if not r["requests_per_second"]]
    if unlimited and unlimited[0]["steady"]["cpu_us_per_poll"]:
        st = unlimited[0]["steady"]
        budget = IDLE_MAX_CPU_PERCENT / 100 * interval / n * 1e6
        min_interval = st["cpu_us_per_poll"] * n / 1e4 / IDLE_MAX_CPU_PERCENT
        text = (
            f"What bounds it: CPU = CPU per poll × polls per second. Polling all {n:,} "
            f"customers every {interval:g} s is {_f(n / interval, 1)} polls/s; at the "
            f"measured {_f(st['cpu_us_per_poll'], 0)} µs per poll (the scheduler's run, the "
            "HTTP request, the digest check, the batched sync time) that is "
            f"{_f(st['cpu_us_per_poll'] * n / interval / 1e4, 1)} % of one core. Under "
            f"{IDLE_MAX_CPU_PERCENT:g} % would need ≤ {_f(budget, 0)} µs per poll at this "
            f"size, or an interval of ≥ {_f(min_interval, 0)} s."
        )
        paced = unlimited[0].get("paced_floor")
        if paced:
            text += (
                " The HTTP request alone costs more than that: a bare aiohttp loop making "
                f"the same {_f(paced['rate'], 1)} inventory requests a second, spread out "
                "the same way and doing nothing with the answers, used "
                f"{_f(paced['cpu_percent_of_one_core'])} % of one core "
                f"({_f(paced['cpu_us_per_request'], 0)} µs per request), so perksync is "
                f"{_f(st['cpu_us_per_poll'] / paced['cpu_us_per_request'])}× that floor."
            )
        if floor_us:
            text += (
                f" (Back to back, as in the poll pass, a request costs {_f(floor_us, 0)} µs: "
                "requests that arrive one at a time each pay for their own turns of the "
                "event loop.)"
            )
        lines += ["", text]
    for run in idle["runs"]:
        rate = run["requests_per_second"]
        period = run.get("effective_interval_s", interval)
        if not rate or period <= interval:
            continue
        st = run["steady"]
        skipped = (st.get("polls_metric") or {}).get("skipped", 0)
        lines += [
            "",
            f"With `requests_per_second: {rate:g}` (perksync's default) the rate limit cannot "
            f"poll {n:,} customers every {interval:g} s (a steady poll is one request, and "
            "one in ten also reads the customer), so perksync says so in a warning and polls "
            f"each every {_f(period, 0)} s instead: {_f(st['polls_per_min'], 0)} polls/min "
            f"happened ({_f(n * 60 / period, 0)} due at that period), {skipped:,} skipped, "
            f"{_f(st['http_requests_per_s'], 1)} requests/s. That is the default "
            "configuration's idle cost at this size.",
        ]
    return lines
