"""Smoke run of the benchmarks (bench/) at a tiny size.

`python -m bench` as a whole, with 50 customers, 200 RCON commands and growth
at 20 and 50 customers: the result files exist and have the expected
structure, and every perksync pass delivered exactly the commands expected
from the fake's data. `python -m bench idle` (opt-in) with 20 customers every
2 s, for a few seconds. `python -m bench store` (opt-in) with 10 customers and
50 items, reads every second and snapshots every 3 s, a few purchases and
chargebacks without and with webhooks, on SQLite and on PostgreSQL. Timings
are only checked to be there: they are the benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import main
from bench.report import markdown
from tests.postgres_db import require_server

pytestmark = pytest.mark.timeout(300)

CUSTOMERS = 50


def _process_ok(process: dict[str, Any]) -> None:
    assert process["returncode"] == 0
    for key in ("wall_s", "user_s", "sys_s", "cpu_s", "peak_rss_mb"):
        assert math.isfinite(process[key]) and process[key] >= 0, key
    assert process["peak_rss_mb"] > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["--customers", str(CUSTOMERS), "--rounds", "1", "--commands", "200"]
    assert main([*argv, "--sizes", f"20,{CUSTOMERS}", "--out", str(out)]) == 0
    assert (out / "latest.md").read_text().startswith("# perksync benchmark results")
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return data


def test_poll_pass_delivers_exactly_the_expected_commands(results: dict[str, Any]) -> None:
    poll = results["poll"]
    assert poll["customers"] == CUSTOMERS
    cold = poll["cold"]
    _process_ok(cold["process"])
    # Two configured products of five: vip and crate-key, one of each per customer.
    assert cold["expected_commands"] == cold["received_commands"] == 2 * CUSTOMERS
    assert cold["delivered_exactly"]
    assert f"{CUSTOMERS} customers polled (0 failed)" in cold["summary"]
    [warm] = poll["warm"]
    _process_ok(warm["process"])
    # Customers 0, 10, 20, 30, 40 change: 0, 20, 40 expire (1 command each),
    # 10 and 30 are charged back (2 commands each).
    assert warm["changed_customers"] == 5
    assert warm["expected_commands"] == warm["received_commands"] == 7
    assert warm["delivered_exactly"]
    assert "7 commands journaled, 7 delivered, 0 failed, 0 skipped, 0 pending" in warm["summary"]


def test_floor_makes_the_same_requests_as_perksync(results: dict[str, Any]) -> None:
    poll = results["poll"]
    floor = poll["floor"]
    assert len(floor["runs"]) == 2  # before and after the warm pass
    for run in floor["runs"]:
        _process_ok(run)
    # 2 perksync passes + 2 floor runs, each reading every customer and one page.
    served = poll["fake_requests_served"]
    assert served == {
        "/v1/store/customer": 4 * CUSTOMERS,
        "/v1/store/customer/delivery/items": 4 * CUSTOMERS,
    }
    assert poll["http_requests_per_pass"] == 2 * CUSTOMERS
    assert poll["ratio_wall"] > 0 and poll["ratio_cpu"] > 0
    _process_ok(poll["check_config"])
    assert set(poll["verdict"]) == {"wall_within_1.3x_floor", "peak_rss_under_150mb"}


def test_rcon_clients_each_ran_every_command(results: dict[str, Any]) -> None:
    rcon = results["rcon"]
    assert set(rcon["clients"]) == {"ours", "bare", "mcrcon"}
    for client in rcon["clients"].values():
        assert client["commands"] == client["executed_by_server"] == 200
        assert client["commands_per_s"] > 0 and client["cpu_us_per_command"] >= 0
        _process_ok(client["process"])
    assert rcon["ours_vs_mcrcon"] > 0 and rcon["bare_vs_ours"] > 0
    assert set(rcon["verdict"]) == {"at_least_10x_mcrcon", "within_2x_bare_loop"}


def test_growth_reuses_the_poll_run_and_analyses_the_sizes(results: dict[str, Any]) -> None:
    growth = results["growth"]
    sizes = [p["customers"] for p in growth["points"]]
    assert sizes == [20, CUSTOMERS]
    assert growth["points"][1] == results["poll"]  # the same run, not measured twice
    small = growth["points"][0]
    assert small["cold"]["delivered_exactly"] and small["warm"][0]["delivered_exactly"]
    assert small["cold"]["expected_commands"] == 40
    analysis = growth["analysis"]
    assert analysis["sizes"] == [20, CUSTOMERS]
    for values in analysis["marginal"].values():
        assert len(values) == 1


def test_report_names_the_machine_and_the_command(results: dict[str, Any]) -> None:
    text = markdown(results)
    assert results["machine"]["cores"] >= 1
    assert results["command"].startswith("python -m bench ")
    for heading in (
        "## Poll pass", "## RCON throughput", "## Growth", "## Idle service",
        "## Store mode as a service",
    ):  # fmt: skip
        assert heading in text
    # The idle and store parts are opt-in: not in this run, and the report says how to run them.
    assert "idle" not in results and "store" not in results
    assert "python -m bench idle" in text and "python -m bench store" in text


def test_idle_service_runs_each_rate_limit(tmp_path: Path) -> None:
    customers = 20
    argv = ["idle", "--customers", str(customers), "--interval", "2", "--minutes", "0.05"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "latest.json").exists()  # nothing to fold the results into
    assert "## Idle service" in (tmp_path / "idle-latest.md").read_text()
    idle = json.loads((tmp_path / "idle-latest.json").read_text())["idle"]
    assert idle["customers"] == customers and idle["interval_s"] == 2
    assert [run["requests_per_second"] for run in idle["runs"]] == [20, 0]
    for run in idle["runs"]:
        assert run["exit_code"] == 0
        first, steady = run["first_interval"], run["steady"]
        # The seeding pass delivers every vip and crate-key, once; the service
        # that follows finds nothing to do, and reads only inventories.
        assert run["seeded"]["commands_delivered"] == 2 * customers
        assert first["commands_delivered"] == steady["commands_delivered"] == 0
        assert first["polls"] > 0 and steady["polls"] > 0
        assert first["customer_requests"] + steady["customer_requests"] == 0
        assert run["effective_interval_s"] == 2
        floor = run["paced_floor"]  # bare requests at the pace the service polled
        assert floor["errors"] == 0 and floor["requests"] > 0 and floor["cpu_s"] > 0
        assert abs(floor["rate"] - steady["polls"] / steady["seconds"]) < 1e-6
        assert steady["polls_metric"]["failed"] == 0
        assert steady["cpu_percent_of_one_core"] >= 0 and first["cpu_s"] > 0
        assert 0 < steady["rss_mb_avg"] <= steady["rss_mb_max"] <= run["peak_rss_mb"]
        assert set(run["verdict"]) == {"cpu_under_3pct", "rss_under_150mb"}


PURCHASES, REVOKES = 4, 2  # per phase


def _store_run(tmp_path: Path, backend: str) -> dict[str, Any]:
    argv = [
        "store", "--customers", "10", "--store-items", "50", "--live", "20",
        "--interval", "2", "--new-items", "1", "--idle-minutes", "0.05", "--phase-minutes", "0.05",
        "--purchases", str(PURCHASES), "--revokes", str(REVOKES), "--backends", backend,
    ]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "latest.json").exists()  # nothing to fold the results into
    assert "## Store mode as a service" in (tmp_path / "store-latest.md").read_text()
    store: dict[str, Any] = json.loads((tmp_path / "store-latest.json").read_text())["store"]
    runs: list[dict[str, Any]] = store["runs"]
    [run] = runs
    assert run["backend"] == backend
    return run


def _store_run_ok(run: dict[str, Any]) -> None:
    # 10 customers × 5 items, the newest 20 live: one vip and one crate-key each.
    assert run["seeded"]["commands_delivered"] == 20
    # Each purchase's grant and each chargeback's take-back, in both phases, once.
    expected = 2 * (PURCHASES + REVOKES)
    assert run["delivered"] == {"expected": expected, "received": expected}
    for phase in ("polling", "webhooks"):
        assert run[phase]["purchase"]["latency_s"]["n"] == PURCHASES
        assert run[phase]["revoke"]["latency_s"]["n"] == REVOKES
        for kind in ("purchase", "revoke"):
            latency = run[phase][kind]["latency_s"]
            assert 0 <= latency["p50"] <= latency["p95"] <= latency["max"]
    assert run["webhooks"]["statuses"] == {"200": PURCHASES + REVOKES}
    # Without webhooks a purchase is found by a new-items read, a chargeback
    # through a snapshot and its customer's look-up.
    assert set(run["polling"]["purchase"]["stages_s"]) == {
        "wait_for_new_items_read", "read_to_command",
    }  # fmt: skip
    assert set(run["polling"]["revoke"]["stages_s"]) == {
        "wait_for_snapshot", "snapshot_to_look_up", "look_up_to_command",
    }  # fmt: skip
    idle = run["windows"]["idle"]
    assert idle["by_read_per_min"]["look_ups"] == 0  # nothing changed: nothing looked up
    assert (
        idle["by_read_per_min"]["new_items"] > 0 and idle["by_read_per_min"]["snapshot_pages"] > 0
    )
    assert idle["not_ok"] == 0 and idle["cpu_percent_of_one_core"] >= 0
    assert 0 < idle["rss_mb_avg"] <= idle["rss_mb_max"] <= run["peak_rss_mb"]
    assert run["snapshots"]["count"] >= 2 and run["snapshots"]["pages"]["max"] == 1
    assert run["exit_code"] == 0
    assert set(run["verdict"]) == {
        "purchase_p95_polling", "purchase_p95_webhooks", "revoke_p95", "idle_cpu", "rss",
    }  # fmt: skip


def test_store_mode_service_on_sqlite(tmp_path: Path) -> None:
    _store_run_ok(_store_run(tmp_path, "sqlite"))


def test_store_mode_service_on_postgres(tmp_path: Path) -> None:
    require_server()
    _store_run_ok(_store_run(tmp_path, "postgres"))
