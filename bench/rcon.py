"""RCON throughput: N commands over one connection to one Minecraft-profile fake.

The fake (`bench.fakes rcon`, the vanilla Minecraft profile of
`tests/fakes/rcon_server.py`) runs in its own process; each client
(`bench.rcon_clients`) runs in its own process, one after the other, against
the same fake. After each client the fake's count of executed commands must
be exactly N.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import REPO, Fake, child_env, measure

RCON_PASSWORD = "bench-rcon-pw"
CLIENTS = ("ours", "bare", "mcrcon")


def run_rcon(commands: int = 5000, *, timeout: float = 300.0) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Fake(["rcon", "--password", RCON_PASSWORD]) as fake, tempfile.TemporaryDirectory() as tmp:
        for client in CLIENTS:
            out = Path(tmp) / f"{client}.json"
            with out.open("w") as f:
                process = measure(
                    [sys.executable, "-m", "bench.rcon_clients", client,
                     "--port", str(fake.port), "--password", RCON_PASSWORD,
                     "--commands", str(commands)],
                    timeout=timeout, cwd=REPO, env=child_env(perksync=True), stdout=f,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            text = out.read_text()
            if process.returncode != 0:
                raise RuntimeError(f"rcon client {client} failed: {text[-800:]}")
            loop = json.loads(text.splitlines()[-1])
            executed = int(fake.ask("count"))
            fake.ask("clear")
            if executed != commands:
                raise RuntimeError(f"{client}: the server ran {executed} of {commands} commands")
            results[client] = {
                "commands": commands,
                "executed_by_server": executed,
                "wall_s": loop["wall_s"],
                "cpu_s": loop["cpu_s"],
                "commands_per_s": commands / loop["wall_s"],
                "cpu_us_per_command": loop["cpu_s"] / commands * 1e6,
                "process": process.as_dict(),
            }
    ours, bare, mcrcon = results["ours"], results["bare"], results["mcrcon"]
    return {
        "commands": commands,
        "clients": results,
        "ours_vs_mcrcon": ours["commands_per_s"] / mcrcon["commands_per_s"],
        "bare_vs_ours": bare["commands_per_s"] / ours["commands_per_s"],
    }
