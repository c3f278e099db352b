"""Journal retention (daemon/retention.py): finished rows older than
`sync.journal_retention_days` are pruned in short batches that let other
work run in between; pending and waiting rows never go.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon.diff import Mark, Phase
from daemon.retention import prune_journal
from daemon.state import CustomerChange, CustomerRecord, JournalEntry, JournalStatus, SeenItem
from daemon.state.sqlite import SqliteStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


class CountingStore(SqliteStore):
    """SQLite (which never awaits) that notes, at each prune batch, how often
    another task has run so far."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ticks = 0
        self.seen_at_batches: list[int] = []

    async def prune_journal(self, finished_before: datetime, limit: int) -> int:
        self.seen_at_batches.append(self.ticks)
        return await super().prune_journal(finished_before, limit)


def entry(index: int, status: JournalStatus) -> JournalEntry:
    return JournalEntry("100", "1", "kit", "survival", "on_active", 1, index, f"c{index}", status)


async def journal_rows(store: SqliteStore, finished: int, unfinished: int) -> list[int]:
    """`finished` delivered rows (finished a day apart from T0 on), then pending
    and waiting ones journaled at T0 (so as old as any)."""
    entries = [entry(i, JournalStatus.PENDING) for i in range(finished)]
    entries += [
        entry(finished + i, JournalStatus.WAITING if i % 2 else JournalStatus.PENDING)
        for i in range(unfinished)
    ]
    async with store.customer("100") as txn:
        ids = await txn.commit(
            CustomerChange(
                T0,
                CustomerRecord("A", '{"id": "100"}'),
                [SeenItem("1", "kit", "active")],
                {("1", "survival"): Mark(Phase.GRANTED, 1)},
                entries,
            )
        )
    for n, row_id in enumerate(ids[:finished]):
        await store.mark_delivered(row_id, T0 + n * DAY)
    return ids


def test_prunes_in_batches_letting_other_tasks_run_between(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = CountingStore(tmp_path / "state.sqlite3")
        await journal_rows(store, finished=10, unfinished=4)
        done = asyncio.Event()

        async def other_work() -> None:
            while not done.is_set():
                store.ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        pruned = await prune_journal(store, 0, T0 + 100 * DAY, batch=3, pause=0)
        done.set()
        await other
        assert pruned == 10
        assert len(store.seen_at_batches) == 4  # 3 + 3 + 3 + 1
        ticks = store.seen_at_batches
        assert all(a < b for a, b in itertools.pairwise(ticks)), ticks
        left = await store.journal(limit=None)
        assert sorted(r.status for r in left) == ["pending", "pending", "waiting", "waiting"]
        await store.close()

    asyncio.run(scenario())


def test_only_rows_older_than_the_retention_go(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteStore(tmp_path / "state.sqlite3")
        ids = await journal_rows(store, finished=5, unfinished=2)
        # Rows finished on days 0..4; 90 days' retention, as of day 92.5: days 0-2 go.
        assert await prune_journal(store, 90, T0 + timedelta(days=92.5)) == 3
        assert sorted(r.id for r in await store.journal(limit=None)) == ids[3:]
        # 0: every finished row goes at once.
        assert await prune_journal(store, 0, T0 + 5 * DAY) == 2
        assert {r.status for r in await store.journal(limit=None)} == {"pending", "waiting"}
        await store.close()

    asyncio.run(scenario())


def test_nothing_to_prune_is_one_quiet_batch(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = CountingStore(tmp_path / "state.sqlite3")
        await journal_rows(store, finished=2, unfinished=1)
        assert await prune_journal(store, 90, T0 + 30 * DAY) == 0
        assert len(store.seen_at_batches) == 1
        await store.close()

    asyncio.run(scenario())


def test_a_finished_cancelled_row_is_pruned_like_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteStore(tmp_path / "state.sqlite3")
        ids = await journal_rows(store, finished=0, unfinished=2)
        async with store.customer("100") as txn:
            await txn.commit(CustomerChange(T0, cancel_rows=ids[:1]))
        assert await prune_journal(store, 1, T0 + 2 * DAY) == 1
        assert [r.id for r in await store.journal()] == ids[1:]
        await store.close()

    asyncio.run(scenario())
