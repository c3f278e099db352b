"""Delivery of online-only and delayed commands, and what servers reply: the
server workers in-process against the loopback RCON fakes and a SQLite state.

Rows are journaled here as apply journals them (online-only rows flagged,
delayed ones with their time), so each test sets up exactly the rows it is
about.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.clock import SYSTEM_CLOCK, Clock
from daemon.config import load_settings
from daemon.delivery import ServerWorker, make_server_factory, waiting_kind
from daemon.service import Service
from daemon.state import (
    CustomerChange,
    CustomerRecord,
    JournalEntry,
    JournalRow,
    JournalStatus,
    Store,
)
from daemon.state.sqlite import SqliteStore
from daemon.status import print_status
from daemon.wiring import Core
from tests.fakes.paynow_api import FakePayNow
from tests.fakes.rcon_server import FakeRconServer, unused_port

T = TypeVar("T")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PASSWORD = "rcon-pw"

NOTCH = {"id": "501", "name": "Notch", "minecraft_uuid": "069a79f4-44e9-4726-a5be-fca90e38aaf5"}
JEB = {"id": "502", "name": "jeb_", "minecraft_uuid": "853C80EF3C3749FDAA49938B674ADAE6"}
M0UKA = {"id": "503", "name": "m0uka", "steam_id": "76561198006409530"}
LIST = "minecraft:list uuids"


def run_async(test: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(test(*args, **kwargs))

    return wrapper


class ManualClock:
    """Time that moves only when told (both the wall clock and the monotonic one)."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@dataclass(frozen=True)
class Command:
    text: str
    online: bool = False
    delay: float = 0.0


class Rig:
    """One state file, fake servers, and the wiring the pass and the service use."""

    def __init__(
        self,
        tmp_path: Path,
        servers: Mapping[str, FakeRconServer],
        *,
        clock: Clock | None = None,
        config: Mapping[str, Any] | None = None,
        **extra: Any,
    ):
        self.tmp_path = tmp_path
        self.fakes = dict(servers)
        self.extra = extra  # server name → more settings of it
        self.clock: Any = clock or ManualClock()
        self.more_config = dict(config or {})  # top-level sections to add
        self.indexes: dict[str, int] = {}

    async def start(self) -> Rig:
        for fake in self.fakes.values():
            await fake.start()
        self.open()
        return self

    def open(self) -> None:
        """(Again:) a new process on the same state file."""
        servers = {
            name: {
                "platform": "minecraft" if fake.profile == "minecraft" else "source",
                "host": "127.0.0.1",
                "port": fake.port,
                "password": PASSWORD,
                "timeout_seconds": 2,
                **self.extra.get(name, {}),
            }
            for name, fake in self.fakes.items()
        }
        config = {
            "paynow": {"api_url": "http://127.0.0.1:9"},
            "sync": {"state_db": "state.sqlite3"},
            "customers": [{"token": "tok"}],
            "servers": servers,
            **self.more_config,
        }
        path = self.config_path = self.tmp_path / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.settings = load_settings(path, env={})
        self.store: Store = SqliteStore(self.tmp_path / "state.sqlite3")
        self.core = Core(self.settings, self.store, self.clock)
        self.wake = self.core.wakers.ring  # what journaling rows rings

    def worker(self, name: str, *, one_pass: bool = False) -> ServerWorker:
        return self.core.worker(name, make_server_factory(self.settings), one_pass=one_pass)

    async def journal(
        self, customer: Mapping[str, Any], server: str, *commands: Command | str
    ) -> list[int]:
        """Journal the commands for the customer, as apply does at the clock's time."""
        entries = []
        for command in commands:
            spec = Command(command) if isinstance(command, str) else command
            index = self.indexes[customer["id"]] = self.indexes.get(customer["id"], -1) + 1
            entries.append(
                JournalEntry(
                    customer_id=customer["id"],
                    item_id=f"item-{customer['id']}",
                    product="kit",
                    server=server,
                    event="on_active",
                    cycle=1,
                    command_index=index,
                    command=spec.text,
                    online=spec.online,
                    not_before=self.clock.now() + timedelta(seconds=spec.delay)
                    if spec.delay
                    else None,
                )
            )
        record = CustomerRecord(customer["name"], json.dumps(customer))
        async with self.store.customer(customer["id"]) as txn:
            ids = await txn.commit(CustomerChange(self.clock.now(), record, entries=entries))
        self.wake(server)
        return ids

    async def rows(self) -> dict[int, JournalRow]:
        return {row.id: row for row in await self.store.rows()}

    async def stop(self) -> None:
        await self.store.close()
        for fake in self.fakes.values():
            await fake.stop()


@contextlib.asynccontextmanager
async def rigged(*args: Any, **kwargs: Any) -> AsyncIterator[Rig]:
    rig = await Rig(*args, **kwargs).start()
    try:
        yield rig
    finally:
        await rig.stop()


def sent(fake: FakeRconServer) -> list[str]:
    """What the server ran, its player-list reads left out."""
    return [c for c in fake.commands if c not in (LIST, "status")]


def state(rows: Mapping[int, JournalRow], row_id: int) -> tuple[JournalStatus, str | None]:
    return rows[row_id].status, rows[row_id].reason


WAITING = JournalStatus.WAITING
DELIVERED = JournalStatus.DELIVERED


# --- online-only commands ----------------------------------------------------------


@run_async
async def test_an_online_only_command_waits_for_its_player_and_is_delivered_once_they_join(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        give, rank = await rig.journal(
            NOTCH,
            "survival",
            Command("give Notch diamond 64", online=True),
            "lp user 069a79f4-44e9-4726-a5be-fca90e38aaf5 parent add vip",
        )
        [other] = await rig.journal(JEB, "survival", "give jeb_ diamond 1")
        worker = rig.worker("survival")

        assert await worker.deliver_available()
        rows = await rig.rows()
        assert state(rows, give) == (WAITING, "for the player")
        assert state(rows, rank) == (WAITING, f"behind row {give}")  # kept behind it
        assert rows[other].status is DELIVERED  # another player is not held up
        assert sent(fake) == ["give jeb_ diamond 1"]
        assert fake.list_reads == 1
        assert await rig.store.pending_counts() == {}  # waiting is not pending
        assert worker.seconds_to_wait() == 10  # the next look at the player list

        fake.players = {"Notch": NOTCH["minecraft_uuid"]}
        rig.clock.advance(10)
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert (rows[give].status, rows[rank].status) == (DELIVERED, DELIVERED)
        assert sent(fake)[1:] == [
            "give Notch diamond 64",
            "lp user 069a79f4-44e9-4726-a5be-fca90e38aaf5 parent add vip",
        ]
        assert worker.seconds_to_wait() is None  # nothing waits: no more list reads

        rig.clock.advance(60)
        assert await worker.deliver_available()
        assert len(sent(fake)) == 3  # once
        assert fake.list_reads == 2
        assert rig.core.report.delivered["survival"] == 3


@run_async
async def test_the_player_list_is_read_at_most_every_presence_seconds_and_only_when_needed(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}, survival={"presence_seconds": 30}) as rig:
        worker = rig.worker("survival")
        await rig.journal(JEB, "survival", "say hello")
        assert await worker.deliver_available()
        assert fake.list_reads == 0  # no online-only command: the list is never read

        [give] = await rig.journal(NOTCH, "survival", Command("give Notch apple", online=True))
        for _ in range(3):  # new rows wake the worker within the interval
            await rig.journal(JEB, "survival", "say again")
            assert await worker.deliver_available()
            rig.clock.advance(9)
        assert fake.list_reads == 1
        assert worker.seconds_to_wait() == 3  # 30 s after the read
        rig.clock.advance(3)
        assert await worker.deliver_available()
        assert fake.list_reads == 2
        assert (await rig.rows())[give].status is WAITING


@run_async
async def test_one_pass_reads_each_player_list_once_and_waits_for_nothing(tmp_path: Path) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        worker = rig.worker("survival", one_pass=True)
        [give] = await rig.journal(NOTCH, "survival", Command("give Notch apple", online=True))
        assert await worker.deliver_available()
        fake.players = {"Notch": NOTCH["minecraft_uuid"]}
        rig.clock.advance(3600)
        await rig.journal(JEB, "survival", "say hi")
        assert await worker.deliver_available()  # the pass goes on: rows were journaled
        assert fake.list_reads == 1
        assert (await rig.rows())[give].status is WAITING
        assert sent(fake) == ["say hi"]


@run_async
async def test_no_player_found_sends_an_online_only_command_back_to_waiting(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    fake.players = {"Notch": NOTCH["minecraft_uuid"]}  # the list still shows them...
    fake.reply = lambda c: "No player was found" if c.startswith("give") else c
    async with rigged(tmp_path, {"survival": fake}) as rig:
        give, after = await rig.journal(
            NOTCH, "survival", Command("give Notch diamond 1", online=True), "say thanks Notch"
        )
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert state(rows, give) == (WAITING, "for the player")  # ...but they just left
        assert state(rows, after) == (WAITING, f"behind row {give}")
        assert (rows[give].attempts, rows[give].reply) == (1, None)
        assert await worker.deliver_available()  # the list is not read again yet,
        assert sent(fake) == ["give Notch diamond 1"]  # and the server is believed

        fake.reply = lambda c: f"Gave 1 [Diamond] to Notch ({c})"
        rig.clock.advance(10)
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert (rows[give].status, rows[after].status) == (DELIVERED, DELIVERED)
        assert rows[give].reply == "Gave 1 [Diamond] to Notch (give Notch diamond 1)"
        assert sent(fake) == ["give Notch diamond 1", "give Notch diamond 1", "say thanks Notch"]


@run_async
async def test_a_plain_command_is_delivered_whatever_the_server_says_of_the_player(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD, reply=lambda c: "No player was found")
    async with rigged(tmp_path, {"survival": fake}) as rig:
        [give] = await rig.journal(NOTCH, "survival", "give Notch diamond 1")
        assert await rig.worker("survival").deliver_available()
        row = (await rig.rows())[give]
        assert (row.status, row.reply) == (DELIVERED, "No player was found")
        assert fake.list_reads == 0


@pytest.mark.parametrize("game", ["tf2", "css", "gmod", "csgo"])
@run_async
async def test_a_steam_player_is_found_in_each_games_status(tmp_path: Path, game: str) -> None:
    fake = FakeRconServer("srcds", PASSWORD, game=game)  # type: ignore[arg-type]
    # Another player whose name is the customer's SteamID3: never taken for them.
    fake.players = {"[U:1:46143802] STEAM_0:0:23071901": "76561198060265727"}
    async with rigged(tmp_path, {"jail": fake}) as rig:
        worker = rig.worker("jail")
        [vip] = await rig.journal(M0UKA, "jail", Command('sm_addvip "STEAM_0:0:23071901"', True))
        assert await worker.deliver_available()
        assert (await rig.rows())[vip].status is WAITING

        fake.players["m0uka"] = M0UKA["steam_id"]
        rig.clock.advance(10)
        assert await worker.deliver_available()
        assert (await rig.rows())[vip].status is DELIVERED
        assert fake.commands == ["status", "status", 'sm_addvip "STEAM_0:0:23071901"']


@run_async
async def test_players_command_and_pattern_read_a_list_of_the_games_own(tmp_path: Path) -> None:
    def plugin(command: str) -> str:
        # A plugin's list: "<slot> <SteamID64> <name>" per line.
        return f"2 {M0UKA['steam_id']} m0uka\n" if command == "sm_plist" else command

    fake = FakeRconServer("srcds", PASSWORD, reply=plugin)
    extra = {"players_command": "sm_plist", "players_pattern": r"^\d+ (?P<id>\d{17}) "}
    async with rigged(tmp_path, {"jail": fake}, jail=extra) as rig:
        [vip] = await rig.journal(M0UKA, "jail", Command("sm_addvip m0uka", online=True))
        assert await rig.worker("jail").deliver_available()
        assert (await rig.rows())[vip].status is DELIVERED
        assert fake.commands == ["sm_plist", "sm_addvip m0uka"]


@run_async
async def test_a_player_list_that_cannot_be_read_keeps_online_commands_waiting_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    fake.known_commands = frozenset({"give"})
    async with rigged(tmp_path, {"survival": fake}, survival={"players_command": "who"}) as rig:
        worker = rig.worker("survival")
        [give] = await rig.journal(NOTCH, "survival", Command("give Notch apple", online=True))
        with caplog.at_level(logging.WARNING, logger="daemon.delivery"):
            for _ in range(3):
                assert await worker.deliver_available()
                rig.clock.advance(10)
        row = (await rig.rows())[give]
        assert (row.status, row.reason) == (
            WAITING,
            "for the player (the player list cannot be read)",
        )
        assert waiting_kind(row.reason) == "player"
        assert fake.commands == ["who", "who", "who"]
        [warning] = [r.getMessage() for r in caplog.records]  # told once, not every read
        assert warning.startswith(
            "server survival: the reply to `who` is not a player list: "
            "Unknown or incomplete command, see below for errorwho<--[HERE];"
        )
        assert "servers.survival.players_command and players_pattern" in warning


@run_async
async def test_a_customer_without_the_platforms_id_waits_without_a_list_read(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        bedrock = {"id": "505", "name": "Steve", "minecraft_uuid": None}
        [give] = await rig.journal(bedrock, "survival", Command("give Steve apple", online=True))
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        row = (await rig.rows())[give]
        assert (row.status, row.reason) == (
            WAITING,
            "for the player (the customer has no minecraft_uuid)",
        )
        assert (fake.list_reads, worker.seconds_to_wait()) == (0, None)


# --- delayed commands ----------------------------------------------------------------


@run_async
async def test_a_delayed_command_waits_for_its_time_and_holds_what_follows(tmp_path: Path) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        later, after = await rig.journal(
            NOTCH, "survival", Command("crate give Notch vote 1", delay=30), "say enjoy"
        )
        [other] = await rig.journal(JEB, "survival", "say hi jeb_")
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert state(rows, later) == (WAITING, "until 2026-03-01 12:00:30 UTC")
        assert waiting_kind(rows[later].reason) == "time"
        assert state(rows, after) == (WAITING, f"behind row {later}")
        assert waiting_kind(rows[after].reason) == "behind"
        assert rows[other].status is DELIVERED
        assert worker.seconds_to_wait() == 30

        rig.clock.advance(29)
        assert await worker.deliver_available()
        assert sent(fake) == ["say hi jeb_"]
        assert worker.seconds_to_wait() == 1
        rig.clock.advance(1)
        assert await worker.deliver_available()
        assert sent(fake) == ["say hi jeb_", "crate give Notch vote 1", "say enjoy"]
        assert worker.seconds_to_wait() is None
        assert fake.list_reads == 0


@run_async
async def test_a_delayed_online_only_command_looks_for_its_player_once_its_time_came(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        [row] = await rig.journal(NOTCH, "survival", Command("give Notch cake", True, delay=60))
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        assert fake.list_reads == 0
        rig.clock.advance(60)
        assert await worker.deliver_available()
        assert fake.list_reads == 1
        assert state(await rig.rows(), row) == (WAITING, "for the player")


# --- replies --------------------------------------------------------------------------


@run_async
async def test_an_error_reply_rejects_the_command_keeps_the_reply_and_holds_nothing_back(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    fake.known_commands = frozenset({"give", "lp"})
    async with rigged(tmp_path, {"survival": fake}) as rig:
        typo, kit = await rig.journal(
            NOTCH, "survival", "lpp user Notch parent add vip", "give Notch diamond 1"
        )
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert rows[typo].status is JournalStatus.REJECTED
        assert rows[typo].reply == (
            "Unknown or incomplete command, see below for errorlpp user Notch parent add vip<--[HERE]"
        )
        assert rows[typo].reason == (
            "the server's reply is an error (it matches 'Unknown or incomplete command')"
        )
        assert rows[typo].finished_at == T0
        assert (rows[kit].status, rows[kit].reply) == (DELIVERED, "give Notch diamond 1")
        report = rig.core.report
        assert report.rejected == {"survival": 1}
        assert report.exit_code == 3

        assert await worker.deliver_available()  # never retried
        assert sent(fake) == ["lpp user Notch parent add vip", "give Notch diamond 1"]
        [counts] = await rig.store.server_counts()
        assert (counts.rejected, counts.delivered, counts.pending) == (1, 1, 0)


@run_async
async def test_a_servers_own_error_and_offline_replies(tmp_path: Path) -> None:
    def sourcemod(command: str) -> str:
        if command.startswith("sm_addvip"):
            return "[SM] No matching client was found.\n"
        return f"[SM] Group {command.split()[-1]} could not be found.\n"

    fake = FakeRconServer("srcds", PASSWORD, reply=sourcemod)
    fake.players = {"m0uka": M0UKA["steam_id"]}
    extra = {"error_replies": [r"could not be found\.$"], "offline_replies": ["No matching client"]}
    async with rigged(tmp_path, {"jail": fake}, jail=extra) as rig:
        online, group = await rig.journal(
            M0UKA, "jail", Command("sm_addvip m0uka", online=True), "sm_setgroup m0uka vipp"
        )
        assert await rig.worker("jail").deliver_available()
        rows = await rig.rows()
        assert state(rows, online) == (WAITING, "for the player")
        assert rows[group].status is WAITING  # behind it

        [plain] = await rig.journal(
            {**M0UKA, "id": "504", "name": "other"}, "jail", "sm_setgroup other vipp"
        )
        assert await rig.worker("jail").deliver_available()
        row = (await rig.rows())[plain]
        assert (row.status, row.reply) == (
            JournalStatus.REJECTED,
            "[SM] Group vipp could not be found.\n",
        )


@run_async
async def test_replies_are_kept_up_to_1000_characters(tmp_path: Path) -> None:
    fake = FakeRconServer("minecraft", PASSWORD, reply=lambda c: "é" * 5000)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        [row] = await rig.journal(NOTCH, "survival", "data get entity Notch")
        assert await rig.worker("survival").deliver_available()
        assert (await rig.rows())[row].reply == "é" * 1000


@run_async
async def test_status_tells_per_server_what_rows_wait_for_and_how_many_were_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    fake.known_commands = frozenset({"give", "say"})
    async with rigged(tmp_path, {"survival": fake}) as rig:
        await rig.journal(NOTCH, "survival", Command("give Notch apple", online=True), "say hi")
        await rig.journal(JEB, "survival", Command("say soon", delay=30), "oops")
        await rig.journal(M0UKA, "survival", Command("say later", delay=90))
        await rig.journal({**M0UKA, "id": "504"}, "survival", "gvie x y")
        assert await rig.worker("survival").deliver_available()
        await print_status(rig.settings)
    out = capsys.readouterr().out
    assert (
        "  survival: 0 pending, 0 failed, 0 skipped, 0 delivered, 5 waiting (1 for the player, "
        "2 delayed, the first until 2026-03-01 12:00:30 UTC, 2 behind them), 1 rejected\n"
    ) in out
    assert "perksync journal --status rejected" in out


# --- across a restart -------------------------------------------------------------------


@run_async
async def test_order_per_customer_and_server_holds_across_a_restart_while_waiting(
    tmp_path: Path,
) -> None:
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        first = await rig.journal(
            NOTCH, "survival", Command("give Notch sword", online=True), "say one", "say two"
        )
        assert await rig.worker("survival").deliver_available()
        await rig.store.close()

        rig.open()  # a new process
        more = await rig.journal(NOTCH, "survival", "say three")
        worker = rig.worker("survival")
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert [rows[i].status for i in first + more] == [WAITING] * 4
        assert [rows[i].reason for i in first[1:] + more] == [f"behind row {first[0]}"] * 3

        assert fake.list_reads == 2  # the new process read the list afresh

        fake.players = {"Notch": NOTCH["minecraft_uuid"]}
        rig.clock.advance(10)
        assert await worker.deliver_available()
        assert sent(fake) == ["give Notch sword", "say one", "say two", "say three"]


# --- the service -------------------------------------------------------------------------


async def eventually(check: Callable[[], Coroutine[Any, Any, bool]]) -> bool:
    deadline = asyncio.get_running_loop().time() + 20
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return text


@run_async
async def test_the_service_delivers_when_the_player_joins_or_the_time_comes_without_polling_more(
    tmp_path: Path,
) -> None:
    paynow = FakePayNow()
    await paynow.start()
    token = paynow.new_token()
    paynow.add_customer(token, platform="minecraft")  # polled: nothing to do
    fake = FakeRconServer("minecraft", PASSWORD)
    fake.known_commands = frozenset({"give", "say"})
    port = unused_port()
    config = {
        "paynow": {"api_url": paynow.url},
        "customers": [{"token": token}],
        "sync": {"state_db": "state.sqlite3", "interval_seconds": 3600},
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    rig = Rig(tmp_path, {"survival": fake}, clock=SYSTEM_CLOCK, config=config)
    rig.extra["survival"] = {"presence_seconds": 1}
    await rig.start()
    service = Service(rig.config_path, rig.settings, rig.store, handle_signals=False)
    rig.wake = service.core.wakers.ring
    running = asyncio.create_task(service.run())
    try:
        # A delayed command is sent when its time comes, with nothing else to wake the worker.
        [delayed] = await rig.journal(JEB, "survival", Command("say later jeb_", delay=1.5))
        [typo] = await rig.journal(M0UKA, "survival", "gvie m0uka apple")
        assert await eventually(lambda: _status_is(rig, delayed, DELIVERED))
        assert await _status_is(rig, typo, JournalStatus.REJECTED)
        assert fake.list_reads == 0

        # An online-only one when its player joins.
        give, after = await rig.journal(
            NOTCH, "survival", Command("give Notch diamond 1", online=True), "say welcome"
        )
        started = asyncio.get_running_loop().time()
        assert await eventually(lambda: _status_is(rig, give, WAITING))
        fake.players = {"Notch": NOTCH["minecraft_uuid"]}
        assert await eventually(lambda: _status_is(rig, after, DELIVERED))
        elapsed = asyncio.get_running_loop().time() - started
        assert sent(fake) == [
            "gvie m0uka apple",
            "say later jeb_",
            "give Notch diamond 1",
            "say welcome",
        ]
        # At most one read of the player list a second, and only while a command waits.
        assert 2 <= fake.list_reads <= 2 + elapsed
        assert service.workers["survival"].seconds_to_wait() is None
        text = await metrics(port)
        assert 'perksync_commands_total{outcome="rejected",server="survival"} 1.0' in text
        assert 'perksync_commands_total{outcome="delivered",server="survival"} 3.0' in text
    finally:
        service.stop()
        assert await running == 0
        await rig.stop()
        await paynow.stop()


async def _status_is(rig: Rig, row: int, status: JournalStatus) -> bool:
    return (await rig.rows())[row].status is status


# --- rows finished while a round holds them --------------------------------------------


@run_async
async def test_a_row_cancelled_after_the_round_read_it_is_not_sent(tmp_path: Path) -> None:
    """An operator's cancel (or a take-back cancelling a waiting grant) may land
    between the worker reading its rows and sending them: the cancelled one
    must not go out, and the rows after it still do."""
    fake = FakeRconServer("minecraft", PASSWORD)
    async with rigged(tmp_path, {"survival": fake}) as rig:
        first, doomed, last = await rig.journal(NOTCH, "survival", "say one", "say two", "say 3")
        worker = rig.worker("survival")
        read = rig.store.unfinished

        async def read_then_cancel(*args: Any, **kwargs: Any) -> list[JournalRow]:
            rows = await read(*args, **kwargs)
            if any(row.id == doomed for row in rows):
                async with rig.store.customer(NOTCH["id"]) as txn:
                    await txn.commit(CustomerChange(rig.clock.now(), cancel_rows=[doomed]))
            return rows

        rig.store.unfinished = read_then_cancel  # type: ignore[method-assign]
        assert await worker.deliver_available()
        rows = await rig.rows()
        assert [rows[i].status for i in (first, doomed, last)] == [
            DELIVERED,
            JournalStatus.CANCELLED,
            DELIVERED,
        ]
        assert sent(fake) == ["say one", "say 3"]
