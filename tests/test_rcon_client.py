"""Our RCON client against the fake vanilla-Minecraft and SRCDS servers, over loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from adapters import (
    PLATFORMS,
    CommandNotAllowed,
    CommandTooLong,
    MinecraftServer,
    RconAuthError,
    RconConnectError,
    RconConnectionLost,
    RconError,
    RconProtocolError,
    RconTimeout,
    RconUnconfirmed,
    SourceServer,
)
from adapters.base import GameServer
from adapters.rcon import MINECRAFT_MARKER_TYPE, RconGameServer, RequestIds
from adapters.rcon_codec import INT32_MAX
from tests.fakes.rcon_server import FakeRconServer, ReceivedPacket, unused_port

T = TypeVar("T")
PASSWORD = "hunter2-Sekr1t"
PROFILES = [("minecraft", MinecraftServer), ("srcds", SourceServer)]


def arun(coro: Coroutine[Any, Any, T], limit: float = 15.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def served(
    profile: str,
    cls: type[RconGameServer],
    *,
    password: str = PASSWORD,
    timeout: float = 2.0,  # noqa: ASYNC109 - the client's own timeout, passed through
) -> AsyncIterator[tuple[FakeRconServer, RconGameServer]]:
    server = FakeRconServer(profile, PASSWORD)  # type: ignore[arg-type]
    await server.start()
    client = cls("test", "127.0.0.1", server.port, password, timeout=timeout)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


both = pytest.mark.parametrize(("profile", "cls"), PROFILES, ids=["minecraft", "srcds"])


def test_registry_and_class_vars() -> None:
    assert dict(PLATFORMS) == {"minecraft": MinecraftServer, "source": SourceServer}
    assert (MinecraftServer.platform, MinecraftServer.routing_field) == (
        "minecraft",
        "minecraft_uuid",
    )
    assert (SourceServer.platform, SourceServer.routing_field) == ("source", "steam_id")
    assert MinecraftServer.max_command_bytes == 1446
    assert SourceServer.max_command_bytes == 510
    assert MinecraftServer.forbidden_in_values == frozenset()
    assert SourceServer.forbidden_in_values == frozenset(';"')
    server: GameServer = PLATFORMS["source"]("s", "127.0.0.1", 1, "pw", timeout=1.0)
    assert server.name == "s"


@both
def test_auth_and_command(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            await client.connect()
            assert client.connected
            assert await client.run("say hello") == "say hello"
            server.reply = lambda c: ""
            assert await client.run("op bob") == ""
            assert server.commands == ["say hello", "op bob"]
            assert server.auth_attempts == 1
            assert server.connections_accepted == 1

    arun(go())


@both
def test_run_connects_by_itself(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            assert await client.run("list") == "list"
            assert server.auth_attempts == 1

    arun(go())


@both
def test_wrong_password_one_attempt_only(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls, password="wrong-" + PASSWORD) as (server, client):
            with pytest.raises(RconAuthError) as info:
                await client.connect()
            assert PASSWORD not in str(info.value)
            assert not client.connected
            # run() never re-sends a refused password by itself.
            for _ in range(3):
                with pytest.raises(RconAuthError):
                    await client.run("say hi")
            assert server.auth_attempts == 1
            assert server.commands == []
            assert server.packets_of_type(2) == []  # no EXECCOMMAND ever sent
            # An explicit connect() is a new, deliberate attempt.
            with pytest.raises(RconAuthError):
                await client.connect()
            assert server.auth_attempts == 2

    arun(go())


@both
@pytest.mark.parametrize("size", [0, 1, 3999, 4000, 4086, 4095, 4096, 4097, 8192, 10_000, 20_000])
def test_long_replies_joined_exactly(profile: str, cls: type[RconGameServer], size: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(size))

    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.reply = lambda c: text
            assert await client.run("big") == text
            assert await client.run("next") == text  # nothing left over from the first reply

    arun(go())


@both
def test_multibyte_replies_joined_exactly(profile: str, cls: type[RconGameServer]) -> None:
    # 2- and 3-byte UTF-8 characters: fragment boundaries fall inside characters
    # (SRCDS splits bytes) or between them (vanilla splits UTF-16 code units).
    text = ("é€中ß" * 6000)[:20_001]

    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.reply = lambda c: text
            assert await client.run("multibyte") == text
            server.reply = lambda c: "x" * 4095 + "é" * 5000
            assert await client.run("again") == "x" * 4095 + "é" * 5000

    arun(go())


def test_srcds_astral_characters_survive_packet_splits() -> None:
    text = "🎉" * 5000  # 20,000 bytes; SRCDS cuts packets inside the emoji

    async def go() -> None:
        async with served("srcds", SourceServer) as (server, client):
            server.reply = lambda c: text
            assert await client.run("party") == text

    arun(go())


def test_minecraft_surrogate_pair_cut_by_vanilla_comes_back_as_vanilla_sent_it() -> None:
    # Vanilla cuts replies every 4096 UTF-16 code units and encodes each piece
    # alone: a surrogate pair straddling the cut becomes "??". We return what
    # the server sent; nothing on the client side can undo that.
    text = "a" * 4095 + "🎉" + "b" * 10

    async def go() -> None:
        async with served("minecraft", MinecraftServer) as (server, client):
            server.reply = lambda c: text
            assert await client.run("x") == "a" * 4095 + "??" + "b" * 10

    arun(go())


def test_minecraft_marker_only_for_long_first_fragments() -> None:
    async def go() -> None:
        async with served("minecraft", MinecraftServer) as (server, client):
            server.reply = lambda c: "s" * 3999
            await client.run("short")
            assert server.packets_of_type(MINECRAFT_MARKER_TYPE) == []
            server.reply = lambda c: "l" * 5000
            await client.run("long")
            assert len(server.packets_of_type(MINECRAFT_MARKER_TYPE)) == 1

    arun(go())


@both
def test_request_ids_unique_positive(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.reply = lambda c: "r" * 5000 if c.endswith("0") else "ok"
            for i in range(60):
                await client.run(f"cmd {i}")
            await client.close()
            await client.run("after reconnect")
            ids = [p.request_id for p in server.received]
            assert len(ids) == len(set(ids))
            assert all(i > 0 for i in ids)
            assert ids == sorted(ids)

    arun(go())


def test_request_ids_wrap_within_positive_int32() -> None:
    ids = RequestIds(start=INT32_MAX - 1)
    assert [ids.next() for _ in range(4)] == [INT32_MAX - 1, INT32_MAX, 1, 2]
    with pytest.raises(ValueError):
        RequestIds(start=0)


@both
def test_stall_times_out_within_timeout(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls, timeout=0.5) as (server, client):
            await client.connect()
            server.stall = True
            started = time.monotonic()
            with pytest.raises(RconTimeout) as info:
                await client.run("say stuck")
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 1.5
            assert PASSWORD not in str(info.value)
            assert not client.connected
            # A stalled server during connect: nothing was sent, so it is a connect error.
            with pytest.raises(RconConnectError):
                await client.run("say again")
            assert server.commands == []
            server.stall = False
            assert await client.run("say recovered") == "say recovered"
            assert server.commands == ["say recovered"]

    arun(go())


@both
def test_close_mid_reply_then_reconnect(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.reply = lambda c: "z" * 9000
            await client.connect()
            server.close_mid_reply = True
            with pytest.raises(RconConnectionLost):
                await client.run("give bob diamond")
            assert server.commands == ["give bob diamond"]  # it did run
            assert not client.connected
            server.close_mid_reply = False
            assert await client.run("give bob apple") == "z" * 9000
            assert server.connections_accepted == 2

    arun(go())


@both
def test_drop_after_execute_is_connection_lost(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.arm("drop_after_execute")
            with pytest.raises(RconConnectionLost):
                await client.run("lp user x parent add vip")
            assert server.commands == ["lp user x parent add vip"]
            assert await client.run("next") == "next"  # the fault was one-shot

    arun(go())


@both
def test_stall_after_execute_is_timeout(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls, timeout=0.3) as (server, client):
            server.arm("stall_after_execute")
            with pytest.raises(RconTimeout):
                await client.run("ran but silent")
            assert server.commands == ["ran but silent"]
            assert await client.run("next") == "next"

    arun(go())


@both
def test_server_down_is_connect_error_and_recovery(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            await client.connect()
            await server.go_down()
            with pytest.raises(RconConnectError) as info:
                await client.run("say 1")
            assert PASSWORD not in str(info.value)
            with pytest.raises(RconConnectError):
                await client.connect()
            await server.come_up()
            assert await client.run("say 2") == "say 2"
            assert server.commands == ["say 2"]

    arun(go())


def test_nothing_listening_is_connect_error() -> None:
    async def go() -> None:
        client = MinecraftServer("m", "127.0.0.1", unused_port(), PASSWORD, timeout=1.0)
        with pytest.raises(RconConnectError) as info:
            await client.run("say hi")
        assert PASSWORD not in str(info.value)
        assert PASSWORD not in repr(client)

    arun(go())


def test_connect_timeout_is_connect_error() -> None:
    # 192.0.2.0/24 (TEST-NET-1) is never routed: connecting hangs or fails fast.
    async def go() -> None:
        client = SourceServer("s", "192.0.2.1", 27015, PASSWORD, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RconConnectError):
            await client.connect()
        assert time.monotonic() - started < 1.5

    arun(go())


@both
def test_idle_connection_closed_by_server_reconnects_silently(
    profile: str, cls: type[RconGameServer]
) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            await client.run("one")
            server.drop_connections()  # e.g. the server restarted between passes
            await asyncio.sleep(0.05)
            assert await client.run("two") == "two"
            assert server.commands == ["one", "two"]
            assert server.connections_accepted == 2

    arun(go())


@both
def test_command_too_long_sends_nothing(profile: str, cls: type[RconGameServer]) -> None:
    limit = cls.max_command_bytes

    async def go() -> None:
        async with served(profile, cls) as (server, client):
            with pytest.raises(CommandTooLong) as info:
                await client.run("x" * (limit + 1))
            assert str(limit) in str(info.value)
            assert server.connections_accepted == 0  # not even connected
            await client.connect()
            received = len(server.received)
            with pytest.raises(CommandTooLong):
                await client.run("é" * (limit // 2 + 1))  # counted in UTF-8 bytes
            assert len(server.received) == received
            exact = "y" * limit
            assert await client.run(exact) == exact
            multibyte = "é" * (limit // 2)
            assert await client.run(multibyte) == multibyte
            assert server.commands == [exact, multibyte]
            assert server.violations == 0

    arun(go())


@both
@pytest.mark.parametrize("bad", ["say a\nop eve", "say a\rb", "say \x00", "say \x1b[0m"])
def test_control_characters_refused(profile: str, cls: type[RconGameServer], bad: str) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            with pytest.raises(CommandNotAllowed):
                await client.run(bad)
            assert issubclass(CommandNotAllowed, CommandTooLong)
            assert server.connections_accepted == 0

    arun(go())


def test_no_pipelining_against_vanilla() -> None:
    async def go() -> None:
        async with served("minecraft", MinecraftServer) as (server, client):
            server.reply = lambda c: ("w" * 5000) if c.endswith("7") else c
            sent = [f"say {i}" for i in range(200)]
            for command in sent:
                await client.run(command)
            assert server.commands == sent
            assert server.violations == 0  # vanilla would have dropped us otherwise
            assert server.connections_accepted == 1

    arun(go())


@both
def test_concurrent_callers_are_serialised(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.latency = 0.001
            sent = [f"cmd {i}" for i in range(40)]
            replies = await asyncio.gather(*(client.run(c) for c in sent))
            assert replies == sent
            assert server.commands == sent  # asyncio.Lock is FIFO
            assert server.violations == 0
            assert server.connections_accepted == 1

    arun(go())


@both
def test_utf8_commands_arrive_intact(profile: str, cls: type[RconGameServer]) -> None:
    command = "say héllo wörld 世界 🎉 §a"

    async def go() -> None:
        async with served(profile, cls) as (server, client):
            assert await client.run(command) == command
            assert server.commands == [command]
            assert server.packets_of_type(2)[-1].body == command.encode()

    arun(go())


def test_srcds_trailing_packet_consumed() -> None:
    async def go() -> None:
        async with served("srcds", SourceServer) as (server, client):
            for i in range(20):
                assert await client.run(f"echo {i}") == f"echo {i}"
            # each command was followed by exactly one empty RESPONSE_VALUE
            empties = [p for p in server.received if p.type == 0]
            assert len(empties) == 20 and all(p.body == b"" for p in empties)

    arun(go())


def test_srcds_command_and_end_marker_share_one_write() -> None:
    # Not a requirement of SRCDS, but proves we rely on it handling several
    # packets per read (the fake processes whatever one read returned).
    async def go() -> None:
        async with served("srcds", SourceServer) as (server, client):
            await client.run("status")
            exec_packet, end_packet = server.received[-2:]
            assert exec_packet == ReceivedPacket(exec_packet.request_id, 2, b"status")
            assert end_packet == ReceivedPacket(exec_packet.request_id + 1, 0, b"")

    arun(go())


async def _garbage_server(payload: bytes) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_non_rcon_server_is_protocol_error() -> None:
    async def go() -> None:
        srv = await _garbage_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        port = srv.sockets[0].getsockname()[1]
        client = MinecraftServer("m", "127.0.0.1", port, PASSWORD, timeout=1.0)
        try:
            with pytest.raises(RconProtocolError):
                await client.connect()
            assert not client.connected
        finally:
            srv.close()
            await client.close()

    arun(go())


@both
def test_password_never_in_messages_or_reprs(profile: str, cls: type[RconGameServer]) -> None:
    async def go() -> None:
        errors: list[RconError] = []
        async with served(profile, cls, password="bad" + PASSWORD) as (server, client):
            try:
                await client.connect()
            except RconError as exc:
                errors.append(exc)
            assert PASSWORD not in repr(client)
            assert PASSWORD not in repr(client._client)
        async with served(profile, cls, timeout=0.2) as (server, client):
            server.stall = True
            for call in (client.connect(), client.run("x")):
                try:
                    await call
                except RconError as exc:
                    errors.append(exc)
        assert len(errors) == 3
        for err in errors:
            assert PASSWORD not in str(err) and PASSWORD not in repr(err)

    arun(go())


def test_cancellation_drops_the_connection() -> None:
    async def go() -> None:
        async with served("minecraft", MinecraftServer) as (server, client):
            await client.connect()
            server.stall = True
            task = asyncio.ensure_future(client.run("slow"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not client.connected
            server.stall = False
            assert await client.run("fresh") == "fresh"

    arun(go())


# -- what an error says about the command ------------------------------------

NOT_SENT = "(no command was sent)"
MAYBE_RAN = "(the command was sent and may or may not have run)"


def one_line_without_secret(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and "\r" not in message
    assert message.isprintable()
    assert PASSWORD not in message
    return message


async def _impostor(banner: bytes, answer: bytes | None, got: bytearray) -> asyncio.Server:
    """A server that is not RCON: says `banner` at once, then `answer` (if any) to
    whatever it reads, then closes. What it read is added to `got`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        if answer is not None:
            got.extend(await reader.read(100))
            writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


IMPOSTORS = {
    "http": (b"", b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"),
    # SSH servers speak first.
    "ssh": (
        b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
        b"Invalid SSH identification string.\r\n",
    ),
    # A TLS server's alert (protocol_version) on bytes that are no ClientHello.
    "tls-alert": (b"", b"\x15\x03\x01\x00\x02\x02\x46"),
    # OpenSSL's TLS servers close without a word; so does a server that is busy elsewhere.
    "silent-close": (b"", b""),
    "close-at-once": (b"", None),
}
EXPECTED = {
    "http": 'invalid packet size 1347703880 (bytes "HTTP", expected 10..',
    "ssh": 'invalid packet size 759714643 (bytes "SSH-", expected 10..',
    "tls-alert": 'invalid packet size 66325 (bytes "\\x15\\x03\\x01\\x00", a TLS record',
    "silent-close": "the server closed the connection before answering the login",
    "close-at-once": "the server closed the connection before answering the login",
}


@both
@pytest.mark.parametrize("kind", list(IMPOSTORS))
def test_not_an_rcon_port_says_so_and_that_nothing_was_sent(
    profile: str, cls: type[RconGameServer], kind: str
) -> None:
    banner, answer = IMPOSTORS[kind]

    async def go() -> None:
        got = bytearray()
        srv = await _impostor(banner, answer, got)
        port = srv.sockets[0].getsockname()[1]
        client = cls("x", "127.0.0.1", port, PASSWORD, timeout=2.0)
        try:
            with pytest.raises((RconProtocolError, RconConnectError)) as info:
                await client.run("op eve")
            assert not isinstance(info.value, RconUnconfirmed)
            message = one_line_without_secret(info.value)
            assert message.startswith(f"127.0.0.1:{port}: ")
            assert EXPECTED[kind] in message
            assert "RCON port" in message
            assert message.endswith(NOT_SENT)
            assert b"op eve" not in got
        finally:
            srv.close()
            await client.close()

    arun(go())


def test_srcds_marker_only_reply_is_not_a_delivery() -> None:
    """SRCDS answers every command with a RESPONSE_VALUE of its own before the
    marker's mirror; a mirror alone does not show the command arrived."""

    async def go() -> None:
        async with served("srcds", SourceServer) as (server, client):
            server.reply = lambda c: ""
            assert await client.run("sm_reloadadmins") == ""  # empty output is still an answer
            server.arm("marker_only_reply")
            with pytest.raises(RconUnconfirmed) as info:
                await client.run('sm_addvip "STEAM_0:1:2" vip')
            assert isinstance(info.value, RconProtocolError)
            message = one_line_without_secret(info.value)
            assert "answered the end-of-reply marker without answering the command" in message
            assert message.endswith(MAYBE_RAN)
            assert not client.connected
            assert server.commands == ["sm_reloadadmins"]
            assert await client.run('sm_addvip "STEAM_0:1:2" vip') == ""
            assert server.commands == ["sm_reloadadmins", 'sm_addvip "STEAM_0:1:2" vip']

    arun(go())


@both
def test_reply_for_another_request_is_not_a_delivery(
    profile: str, cls: type[RconGameServer]
) -> None:
    # On SRCDS the wrong id is the end marker's: the reply would pass for its mirror.
    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.arm("wrong_reply_id")
            with pytest.raises(RconUnconfirmed) as info:
                await client.run("lp user bob parent add vip")
            message = one_line_without_secret(info.value)
            assert "unexpected packet id" in message or "without answering the command" in message
            assert message.endswith(MAYBE_RAN)
            assert server.commands == ["lp user bob parent add vip"]  # it did run
            assert await client.run("next") == "next"

    arun(go())


def test_minecraft_command_without_answer_is_a_timeout_that_may_have_run() -> None:
    # The marker is sent only after the command's first fragment, so on Minecraft
    # a swallowed command leaves nothing to mistake for an answer.
    async def go() -> None:
        async with served("minecraft", MinecraftServer, timeout=0.3) as (server, client):
            server.arm("marker_only_reply")
            with pytest.raises(RconTimeout) as info:
                await client.run("op bob")
            assert one_line_without_secret(info.value).endswith(MAYBE_RAN)
            assert server.packets_of_type(MINECRAFT_MARKER_TYPE) == []
            assert server.commands == []
            assert await client.run("op bob") == "op bob"

    arun(go())


@both
def test_rest_of_a_reply_after_the_marker_answer_does_not_fail_the_next_command(
    profile: str, cls: type[RconGameServer]
) -> None:
    """The next command ran: failing it would send it a second time."""

    async def go() -> None:
        async with served(profile, cls) as (server, client):
            server.reply = lambda c: "l" * 5000 if c == "long" else c
            server.arm("early_marker_answer")
            first = await client.run("long")
            assert first and set(first) == {"l"} and len(first) < 5000
            assert await client.run("give bob diamond") == "give bob diamond"
            assert await client.run("give bob apple") == "give bob apple"
            assert server.commands == ["long", "give bob diamond", "give bob apple"]
            assert server.connections_accepted == 1

    arun(go())


@both
def test_errors_after_sending_say_the_command_may_have_run(
    profile: str, cls: type[RconGameServer]
) -> None:
    async def go() -> None:
        async with served(profile, cls, timeout=0.3) as (server, client):
            for fault, error in [
                ("drop_after_execute", RconConnectionLost),
                ("stall_after_execute", RconTimeout),
            ]:
                server.arm(fault)
                with pytest.raises(error) as info:
                    await client.run("say hi")
                assert one_line_without_secret(info.value).endswith(MAYBE_RAN)
            await server.go_down()
            with pytest.raises(RconConnectError) as down:
                await client.run("say hi")
            assert one_line_without_secret(down.value).endswith(NOT_SENT)

    arun(go())
