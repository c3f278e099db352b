"""A first pass's commits, SQLite beside PostgreSQL: `python -m bench.store_commits`.

Each customer is one block as apply runs it (read `known`, commit the
customer, two items, two marks, four journal rows and the link), every
customer new, one at a time and then `--concurrency` at a time (the pass's
`sync.concurrency`). PostgreSQL is `PERKSYNC_TEST_POSTGRES_URL` (default the
test server), in a schema of its own dropped after. Prints one line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from daemon.diff import Mark, Phase
from daemon.state import (
    CustomerChange,
    CustomerRecord,
    JournalEntry,
    LinkSync,
    SeenItem,
    Store,
    open_store,
)

AT = datetime(2024, 5, 1, tzinfo=UTC)
SERVERS = ("survival", "jailbreak")


def change(n: int) -> CustomerChange:
    customer = str(10_000_000 + n)
    items = [f"{customer}-{i}" for i in (1, 2)]
    raw = f'{{"id": "{customer}", "name": "player{n}", "minecraft_uuid": "u-{n}"}}'
    return CustomerChange(
        AT,
        CustomerRecord(f"player{n}", raw, b"digest"),
        [SeenItem(i, "vip", "active", None, f'{{"id": "{i}"}}', AT) for i in items],
        {(items[0], server): Mark(Phase.GRANTED, 1) for server in SERVERS},
        [
            JournalEntry(customer, items[0], "vip", server, "on_active", 1, index, f"cmd {n}")
            for server in SERVERS
            for index in (0, 1)
        ],
        LinkSync(f"link {n}", b"answers"),
    )


async def one(store: Store, n: int) -> float:
    start = time.perf_counter()
    async with store.customer(str(10_000_000 + n)) as txn:
        await txn.commit(change(n))
    return time.perf_counter() - start


async def run(url: str, customers: int, concurrency: int, offset: int) -> tuple[float, list[float]]:
    store = open_store(url)
    await store.totals()  # opened (and migrated) before the clock starts
    gate = asyncio.Semaphore(concurrency)

    async def limited(n: int) -> float:
        async with gate:
            return await one(store, n)

    start = time.perf_counter()
    times = await asyncio.gather(*(limited(offset + n) for n in range(customers)))
    elapsed = time.perf_counter() - start
    await store.close()
    return elapsed, list(times)


@contextmanager
def databases() -> Iterator[dict[str, str]]:
    from tests.postgres_db import empty_schema

    with tempfile.TemporaryDirectory() as folder, empty_schema(durable=True) as postgres:
        yield {"sqlite": str(Path(folder) / "state.sqlite3"), "postgres": postgres}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_commits")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with databases() as urls:
        for name, url in urls.items():
            for index, concurrency in enumerate((1, args.concurrency)):
                elapsed, times = asyncio.run(
                    run(url, args.customers, concurrency, index * args.customers)
                )
                ms = sorted(t * 1000 for t in times)
                print(
                    f"{name:8} concurrency {concurrency:2}: {args.customers} first commits in "
                    f"{elapsed:.2f} s ({args.customers / elapsed:.0f}/s); per block "
                    f"p50 {statistics.median(ms):.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.2f} ms"
                )


if __name__ == "__main__":
    main()
