"""The RCON clients compared, each run as its own process.

    python -m bench.rcon_clients {ours,mcrcon,bare} --port P --password PW --commands N

Each connects and authenticates, then sends N commands one after the other
over that one connection, waiting for each reply, and prints one JSON line:
the commands sent, the wall time of the loop and the CPU time (user + sys) of
this process during the loop. Connecting, authenticating and the interpreter's
start-up are outside the timed loop.

- ours: `adapters.MinecraftServer.run` (what perksync's delivery uses);
- mcrcon: `mcrcon.MCRcon.command` (0.7.0; blocking socket, SIGALRM timeouts,
  so it must run in the main thread of its own process);
- bare: the least an asyncio client can do: write one packet, read the reply
  (size, then the rest) with `StreamReader.readexactly`; no checks at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

# A realistic command: about the length of an `lp user <uuid> parent add vip`.
COMMAND = "lp user 6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d parent add vip #{}"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(loop: Callable[[], Any]) -> dict[str, float]:
    cpu0, t0 = _cpu(), time.perf_counter()
    loop()
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return {"wall_s": wall, "cpu_s": cpu}


def run_ours(port: int, password: str, n: int) -> dict[str, float]:
    from adapters import MinecraftServer

    async def main() -> dict[str, float]:
        server = MinecraftServer("bench", "127.0.0.1", port, password, timeout=10)
        await server.connect()
        cpu0, t0 = _cpu(), time.perf_counter()
        for i in range(n):
            await server.run(COMMAND.format(i))
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        await server.close()
        return {"wall_s": wall, "cpu_s": cpu}

    return asyncio.run(main())


def run_mcrcon(port: int, password: str, n: int) -> dict[str, float]:
    from mcrcon import MCRcon

    client = MCRcon("127.0.0.1", password, port=port, timeout=10)
    client.connect()
    try:
        return _timed(lambda: [client.command(COMMAND.format(i)) for i in range(n)])
    finally:
        client.disconnect()


def run_bare(port: int, password: str, n: int) -> dict[str, float]:
    header = struct.Struct("<iii")

    def packet(request_id: int, kind: int, body: bytes) -> bytes:
        return header.pack(len(body) + 10, request_id, kind) + body + b"\x00\x00"

    async def main() -> dict[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(packet(1, 3, password.encode()))
        size = int.from_bytes(await reader.readexactly(4), "little")
        await reader.readexactly(size)
        cpu0, t0 = _cpu(), time.perf_counter()
        for i in range(n):
            writer.write(packet(i + 2, 2, COMMAND.format(i).encode()))
            size = int.from_bytes(await reader.readexactly(4), "little")
            await reader.readexactly(size)
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
        writer.close()
        await writer.wait_closed()
        return {"wall_s": wall, "cpu_s": cpu}

    return asyncio.run(main())


CLIENTS: dict[str, Callable[[int, str, int], dict[str, float]]] = {
    "ours": run_ours,
    "mcrcon": run_mcrcon,
    "bare": run_bare,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rcon_clients")
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--commands", type=int, default=5000)
    args = parser.parse_args()
    result = CLIENTS[args.client](args.port, args.password, args.commands)
    json.dump({"client": args.client, "commands": args.commands, **result}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
