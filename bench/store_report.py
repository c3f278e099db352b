"""Store mode's targets and its section of the Markdown report (`bench.store`'s results)."""

from __future__ import annotations

from typing import Any

from bench.store import Scenario

WEBHOOK_MAX_P95_S = 1.0
NEW_ITEMS_SLACK_S = 2.0  # purchase p95 without webhooks ≤ new_items_seconds + this
REVOKE_SLACK_S = 5.0  # revoke p95 ≤ interval + the snapshot's own duration + this
IDLE_MAX_CPU_PERCENT = 3.0
MAX_RSS_MB = 150.0
NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
STAGES = {
    "wait_for_new_items_read": "purchase → the next new-items read",
    "read_to_command": "that read → the command",
    "wait_for_snapshot": "chargeback → the next snapshot's first page",
    "snapshot_to_look_up": "its first page → the customer's look-up",
    "webhook_to_look_up": "change → the look-up the webhook asked for",
    "look_up_to_command": "look-up → the command",
}


def snapshot_s(run: dict[str, Any]) -> float:
    """The snapshot's own duration: the median of its first page to its last."""
    seconds = run["snapshots"]["seconds"]["p50"]
    return float(seconds or 0.0)


def _setting(sc: Scenario | dict[str, Any], key: str) -> float:
    return float(sc[key] if isinstance(sc, dict) else getattr(sc, key))


def targets(run: dict[str, Any], sc: Scenario | dict[str, Any]) -> dict[str, float]:
    return {
        "purchase_polling_p95_s": _setting(sc, "new_items_s") + NEW_ITEMS_SLACK_S,
        "purchase_webhook_p95_s": WEBHOOK_MAX_P95_S,
        "revoke_p95_s": _setting(sc, "interval_s") + snapshot_s(run) + REVOKE_SLACK_S,
        "idle_cpu_percent": IDLE_MAX_CPU_PERCENT,
        "rss_mb": MAX_RSS_MB,
    }


def store_verdict(run: dict[str, Any], sc: Scenario | dict[str, Any]) -> dict[str, bool]:
    t = targets(run, sc)
    p95 = run["polling"]["purchase"]["latency_s"]["p95"]
    webhook = run["webhooks"]["purchase"]["latency_s"]["p95"]
    revoke = run["polling"]["revoke"]["latency_s"]["p95"]
    return {
        "purchase_p95_polling": p95 is not None and p95 <= t["purchase_polling_p95_s"],
        "purchase_p95_webhooks": webhook is not None and webhook <= t["purchase_webhook_p95_s"],
        "revoke_p95": revoke is not None and revoke <= t["revoke_p95_s"],
        "idle_cpu": run["windows"]["idle"]["cpu_percent_of_one_core"] <= t["idle_cpu_percent"],
        "rss": run["peak_rss_mb"] <= t["rss_mb"],
    }


def _n(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _three(p: dict[str, Any]) -> str:
    return f"{_n(p['p50'])} / {_n(p['p95'])} / {_n(p['max'])}"


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def store_line(run: dict[str, Any]) -> str:
    """One line for the console."""
    lat = {
        f"{phase} {kind}": run[phase][kind]["latency_s"]["p95"]
        for phase in ("polling", "webhooks")
        for kind in ("purchase", "revoke")
    }
    idle = run["windows"]["idle"]
    return (
        ", ".join(f"{k} p95 {_n(v)} s" for k, v in lat.items())
        + f"; idle CPU {_n(idle['cpu_percent_of_one_core'])} %, peak RSS "
        + f"{_n(run['peak_rss_mb'], 1)} MB"
    )


def _row(label: str, runs: list[dict[str, Any]], cell: Any, target: str = "") -> str:
    return f"| {label} | " + " | ".join(cell(r) for r in runs) + f" | {target} |"


def _latency_rows(runs: list[dict[str, Any]], sc: dict[str, Any]) -> list[str]:
    def lat(phase: str, kind: str) -> Any:
        return lambda r: (
            f"{_three(r[phase][kind]['latency_s'])} (n {r[phase][kind]['latency_s']['n']})"
        )

    revoke_target = " / ".join(
        f"{_n(targets(r, sc)['revoke_p95_s'], 1)} ({NAMES[r['backend']]})" for r in runs
    )
    return [
        _row(
            "purchase → command, no webhooks", runs, lat("polling", "purchase"),
            f"p95 ≤ {sc['new_items_s'] + NEW_ITEMS_SLACK_S:g} s",
        ),
        _row("purchase → command, webhooks", runs, lat("webhooks", "purchase"), "p95 ≤ 1 s"),
        _row(
            "chargeback → take-back, no webhooks", runs, lat("polling", "revoke"),
            f"p95 ≤ interval + snapshot + 5 s = {revoke_target}",
        ),
        _row("chargeback → take-back, webhooks", runs, lat("webhooks", "revoke"), ""),
    ]  # fmt: skip


def _stage_rows(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for phase, kind, title in (
        ("polling", "purchase", "purchase, no webhooks"),
        ("polling", "revoke", "chargeback, no webhooks"),
        ("webhooks", "purchase", "purchase, webhooks"),
        ("webhooks", "revoke", "chargeback, webhooks"),
    ):
        names = [n for n in STAGES if any(n in r[phase][kind]["stages_s"] for r in runs)]
        for name in names:
            cells = [_three(r[phase][kind]["stages_s"].get(name) or _NONE) for r in runs]
            rows.append(f"| {title}: {STAGES[name]} | " + " | ".join(cells) + " | |")
    return rows


_NONE = {"p50": None, "p95": None, "max": None}


def _steady_rows(runs: list[dict[str, Any]]) -> list[str]:
    def window(name: str, key: str, digits: int = 1) -> Any:
        return lambda r: _n(r["windows"][name][key], digits)

    def reads(name: str) -> Any:
        return lambda r: " / ".join(
            _n(v, 1) for v in r["windows"][name]["by_read_per_min"].values()
        )

    snaps = "snapshots"
    return [
        _row("API requests/min, idle (steady state)", runs, window("idle", "requests_per_min")),
        _row("… of which new-items reads / snapshot pages / look-ups", runs, reads("idle")),
        _row("API requests/min, polling phase", runs, window("polling", "requests_per_min")),
        _row("… new-items / snapshot pages / look-ups per min", runs, reads("polling")),
        _row("API requests/min, webhook phase", runs, window("webhooks", "requests_per_min")),
        _row("… new-items / snapshot pages / look-ups per min", runs, reads("webhooks")),
        _row(
            "idle CPU, % of one core", runs, window("idle", "cpu_percent_of_one_core", 2), "≤ 3 %"
        ),
        _row("CPU % in the polling / webhook phase", runs, lambda r: " / ".join(
            _n(r["windows"][p]["cpu_percent_of_one_core"]) for p in ("polling", "webhooks"))),
        _row("RSS MB, idle avg / max", runs, lambda r: (
            f"{_n(r['windows']['idle']['rss_mb_avg'], 1)} / "
            f"{_n(r['windows']['idle']['rss_mb_max'], 1)}")),
        _row("peak RSS MB (VmHWM, whole run)", runs, lambda r: _n(r["peak_rss_mb"], 1), "≤ 150"),
        _row("snapshots: count, pages (median)", runs, lambda r: (
            f"{r[snaps]['count']}, {_n(r[snaps]['pages']['p50'], 0)}")),
        _row("snapshot first page → last, s: p50 / p95 / max", runs,
             lambda r: _three(r[snaps]["seconds"])),
        _row("… its floor at 20 requests/s (pages − 1) / 20, s", runs,
             lambda r: _n(r[snaps]["rate_limit_floor_s"])),
        _row("PayNow fake's CPU %, idle", runs, window("idle", "fake_cpu_percent")),
        _row("seeding `--sync-now` (no rate limit), s (commands)", runs, lambda r: (
            f"{_n(r['seeded']['seconds'], 0)} ({r['seeded']['commands_delivered']:,})")),
        _row("service start → first snapshot done, s", runs,
             lambda r: _n(r["first_snapshot_s"], 1)),
        _row("SIGTERM: exit status, s", runs, lambda r: f"{r['exit_code']}, {_n(r['stop_s'], 1)}"),
    ]  # fmt: skip


def _verdicts(runs: list[dict[str, Any]], sc: dict[str, Any]) -> list[str]:
    labels = {
        "purchase_p95_polling": "purchase p95 without webhooks",
        "purchase_p95_webhooks": "purchase p95 with webhooks",
        "revoke_p95": "chargeback p95",
        "idle_cpu": "idle CPU ≤ 3 %",
        "rss": "RSS ≤ 150 MB",
    }
    out = []
    for run in runs:
        verdict = store_verdict(run, sc)
        parts = [f"{label} {_ok(verdict[key])}" for key, label in labels.items()]
        out.append(
            f"- {NAMES[run['backend']]}: " + "; ".join(parts) + f". Delivered exactly: "
            f"{run['delivered']['received']:,} commands of {run['delivered']['expected']:,} "
            f"expected, each once."
        )
    return out


def store_section(store: dict[str, Any] | None) -> list[str]:
    if not store:
        return [
            "",
            "## Store mode as a service",
            "",
            "Not measured in this run. The store part is opt-in: `python -m bench store` (about "
            "20 minutes: per state backend a seeding `--sync-now`, then the service idle for 2 "
            "minutes, 3 minutes of purchases and chargebacks without webhooks, 3 with them).",
        ]
    sc, runs = store["scenario"], store["runs"]
    measured = store.get("measured", {})
    heads = " | ".join(NAMES[r["backend"]] for r in runs)
    rule = "| --- |" + " ---: |" * len(runs) + " --- |"
    return [
        "",
        f"## Store mode as a service: {sc['customers']:,} customers, {sc['items']:,} items "
        f"({sc['live']:,} live)",
        "",
        f"Measured by `{measured.get('command', 'python -m bench store')}` "
        f"({measured.get('date', '?')}, commit `{measured.get('commit', '?')}`, load average "
        f"{measured.get('loadavg_at_start', ['?'])[0]} before; {_n(store['elapsed_s'], 0)} s).",
        "",
        "`perksync` as the service in store mode against the PayNow Management fake, default "
        "rate limit (20 requests/s), `sync.interval_seconds` "
        f"{sc['interval_s']:g}, `sync.new_items_seconds` {sc['new_items_s']:g}, webhooks on, "
        "one vanilla Minecraft RCON fake; each state backend on a state database one "
        "`--sync-now` (no rate limit) brought up to date. Then "
        f"{sc['idle_minutes']:g} minutes idle, {sc['phase_minutes']:g} minutes of "
        f"{sc['purchases']} purchases and {sc['revokes']} chargebacks at random moments "
        f"without webhooks, {sc['phase_minutes']:g} minutes of as many with PayNow's webhook "
        "after each. Latency: from the moment the fake changed the item to the moment the "
        "RCON fake received its command (one clock). Seconds, p50 / p95 / max:",
        "",
        f"| | {heads} | target |",
        rule,
        *_latency_rows(runs, sc),
        "",
        "Where the time went (stages from the requests the fake served; seconds, p50 / p95 / max):",
        "",
        f"| | {heads} | |",
        rule,
        *_stage_rows(runs),
        "",
        "Steady state and cost:",
        "",
        f"| | {heads} | target |",
        rule,
        *_steady_rows(runs),
        "",
        *_verdicts(runs, sc),
    ]
