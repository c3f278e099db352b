"""The floor of the poll pass: a bare aiohttp loop making the very same requests.

    python -m bench.floor --url URL --tokens FILE --concurrency C

For every customer (one line of FILE: the token, then the `after` cursors of
its later inventory pages, as `bench.fakes` writes them) it requests the
customer, then every inventory page, exactly as `StorefrontClient` does (same
URLs, headers, connection pool and per-request timeout), `concurrency`
customers at a time, one customer after the other per worker as the engine's
pollers do, and does nothing with the answers but read them. It imports
nothing of perksync, so its start-up is aiohttp's alone.

    python -m bench.floor --url URL --tokens FILE --paced RATE --seconds S

is the idle service's floor instead (`paced`): RATE inventory requests a
second, spread evenly as the service's scheduler spreads its polls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys

import aiohttp
from yarl import URL


def _session() -> aiohttp.ClientSession:
    """The same pool and session settings as daemon.paynow.make_session()."""
    connector = aiohttp.TCPConnector(
        limit=100, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30.0
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": "perksync/0.1.0", "Accept": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
        trust_env=False,
    )


async def run(
    url: str, lines: list[list[str]], concurrency: int, request_timeout: float
) -> dict[str, int]:
    session = _session()
    per_request = aiohttp.ClientTimeout(total=request_timeout)
    customer_url = URL(url + "/v1/store/customer", encoded=True)
    items = f"{url}/v1/store/customer/delivery/items?limit=100&asc=true"
    first_page = URL(items, encoded=True)
    stats = {"requests": 0, "bytes": 0, "errors": 0}
    queue = iter(lines)

    async def get(target: URL, headers: dict[str, str]) -> None:
        async with session.get(
            target, headers=headers, timeout=per_request, allow_redirects=False
        ) as resp:
            body = await resp.read()
            stats["requests"] += 1
            stats["bytes"] += len(body)
            if resp.status != 200:
                stats["errors"] += 1

    async def worker() -> None:
        for token, *cursors in queue:
            headers = {"Authorization": "Customer " + token}
            await get(customer_url, headers)
            await get(first_page, headers)
            for after in cursors:
                await get(URL(f"{items}&after={after}", encoded=True), headers)

    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(lines)) or 1)))
    finally:
        await session.close()
    return stats


async def paced(
    url: str, tokens: list[str], rate: float, seconds: float, request_timeout: float
) -> dict[str, float]:
    """The idle service's floor: one inventory request every 1/`rate` s (to the
    customers in turn), each started on time whether or not the one before is
    done, as the service's scheduler fires polls; nothing done with the
    answers. CPU is counted from the first request to the last answer."""
    session = _session()
    per_request = aiohttp.ClientTimeout(total=request_timeout)
    first_page = URL(f"{url}/v1/store/customer/delivery/items?limit=100&asc=true", encoded=True)
    stats = {"requests": 0, "errors": 0}

    async def get(token: str) -> None:
        async with session.get(
            first_page,
            headers={"Authorization": "Customer " + token},
            timeout=per_request,
            allow_redirects=False,
        ) as resp:
            await resp.read()
            stats["requests"] += 1
            if resp.status != 200:
                stats["errors"] += 1

    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    try:
        cpu0, started = _cpu(), loop.time()
        sent = 0
        while loop.time() - started < seconds:
            task = asyncio.create_task(get(tokens[sent % len(tokens)]))
            running.add(task)
            task.add_done_callback(running.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        await asyncio.gather(*running)
        cpu, wall = _cpu() - cpu0, loop.time() - started
    finally:
        await session.close()
    return {**stats, "seconds": wall, "cpu_s": cpu}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--url", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--paced", type=float, metavar="RATE", help="the idle floor instead")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with open(args.tokens) as f:
        lines = [line.split() for line in f if line.strip()]
    if args.paced:
        tokens = [line[0] for line in lines]
        idle = asyncio.run(paced(args.url, tokens, args.paced, args.seconds, args.timeout))
        json.dump(idle, sys.stdout)
        return
    stats = asyncio.run(run(args.url, lines, args.concurrency, args.timeout))
    json.dump(stats, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(1 if stats["errors"] else 0)


if __name__ == "__main__":
    main()
