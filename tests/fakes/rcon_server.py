"""Fake RCON servers that behave like vanilla Minecraft and like SRCDS.

Written from the servers' own code (vanilla ``net.minecraft.server.rcon.thread.
RconClient``; Source ``sv_rcon.cpp`` / ``sv_remoteaccess.cpp``), independently
of ``adapters/rcon_codec.py`` so that a codec bug cannot hide in both.
``tests/test_rcon_fakes_honest.py`` checks them against third-party clients.

Usage::

    server = FakeRconServer("minecraft", password="pw")
    await server.start()            # listens on 127.0.0.1:<server.port>
    ...
    server.commands                 # every command executed, in order
    server.command_log              # the same as Executed(command, client, at)
    server.received                 # every packet parsed: ReceivedPacket(id, type, body)
    server.auth_attempts, server.connections_accepted, server.violations
    server.clients                  # who connected, in order (see ``identify``)
    await server.stop()

``server.identify`` (peer address -> anything, default: the address itself)
names the client of each connection when it is accepted, while the client's
socket is surely open (tests that run several client processes map the peer
to a process there); ``clients`` and ``command_log`` carry that name.

Replies: ``server.reply`` is a callable ``str -> str`` (default: echo the
command back). The game's own answers come first:

* ``server.players`` (name → id: a UUID on Minecraft, a SteamID64 on SRCDS)
  are the players online. Minecraft answers ``list uuids`` and
  ``minecraft:list uuids`` as vanilla does (Paper runs vanilla's command);
  SRCDS answers ``status`` in the layout of ``server.game``: ``"tf2"``
  (SteamID3), ``"css"`` and ``"gmod"`` (``STEAM_0``), ``"csgo"`` (``STEAM_1``,
  userid and slot). ``server.list_reads`` counts these answers.
* ``server.known_commands`` (first words; None: every command is known): a
  command outside it gets the game's unknown-command reply: vanilla's
  ``Unknown or incomplete command, see below for error<command><--[HERE]``
  (RCON joins vanilla's two messages without a newline), Paper's (``game``
  ``"paper"``) Spigot line ``Unknown command. Type "/help" for help.`` plus
  the newline CraftBukkit adds to each message, SRCDS's
  ``Unknown command "<word>"``.

Faults, switchable at any time (plain attributes):

* ``stall``: read everything, answer nothing, run nothing (a hung server);
* ``stall_after_execute``: run (and record) a command, never answer;
* ``close_mid_reply``: run a command, send part of its reply, close;
* ``drop_after_execute``: run a command, close without a reply (the
  "command in flight" case);
* ``marker_only_reply``: neither run nor answer a command, but answer what
  follows as usual: on SRCDS the reply is then the end marker's mirror and
  00 01 00 00 alone (Minecraft: no answer at all, the client times out);
* ``wrong_reply_id``: run a command and answer it with the id of the next
  request (the client's end marker) instead of its own;
* ``early_marker_answer``: run a command and send the first packet of its
  reply only; the end marker is answered as usual, and the rest of the reply
  comes just before the answer to the next command (a server that answers
  the end marker before the end of the reply);
* ``latency``: seconds to wait before handling each request;
* ``await go_down()`` / ``await come_up()``: stop listening (and cut every
  connection) / listen again on the same port; ``unused_port()`` gives a port
  with nothing listening;
* ``drop_connections()``: cut every open connection, keep listening (a restart
  between passes);
* ``arm(fault, times=1)``: turn a fault on for the next ``times`` commands only;
* wrong password: start the server with another password (or set ``password``).

Minecraft profile, as vanilla does it:

* each request is read with ONE read of at most 1460 bytes; if that read does
  not hold exactly one whole packet (two pipelined packets, a packet split
  across reads, or a packet over 1460 bytes, i.e. a body over 1446) the server
  closes the connection without running anything (``violations`` counts these);
* AUTH with the right (non-empty) password: AUTH_RESPONSE with the request id;
  a wrong one: AUTH_RESPONSE with id -1; the connection stays open;
* EXECCOMMAND before authenticating: AUTH_RESPONSE id -1 (type 2, empty body),
  nothing runs, the connection stays open;
* replies are split every 4096 UTF-16 code units, each piece UTF-8-encoded on
  its own (a surrogate pair cut in half becomes "??", as Java's getBytes does);
* any other packet type gets a RESPONSE_VALUE "Unknown request <hex type>"
  with the request id.

SRCDS profile, as sv_rcon.cpp does it:

* reads whatever arrived and handles every whole packet in it (a size field
  over ``max_packet_size``, 4096, closes the connection; below 10 too);
* after handling each packet it flushes the console output captured meanwhile
  as a RESPONSE_VALUE with that packet's id (possibly empty, possibly several
  packets of at most 4086 body bytes), and only then the queued answer; so:
  AUTH -> empty RESPONSE_VALUE, then AUTH_RESPONSE (id, or -1 if wrong);
  EXECCOMMAND -> the output; an empty RESPONSE_VALUE -> empty mirror, then a
  RESPONSE_VALUE with body 00 01 00 00;
* before authentication: EXECCOMMAND runs nothing and gets only an empty
  RESPONSE_VALUE; an empty RESPONSE_VALUE gets only its mirror;
* a command over 510 bytes is refused by the console tokenizer: it does not
  run and the reply is the tokenizer's warning.

Run ``python -m tests.fakes.rcon_server --profile minecraft --port 25575
--password secret`` for a standalone demo server that prints each command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Literal, NamedTuple

Profile = Literal["minecraft", "srcds"]
Game = Literal["vanilla", "paper", "tf2", "css", "gmod", "csgo"]
GAMES: dict[str, tuple[str, ...]] = {
    "minecraft": ("vanilla", "paper"),
    "srcds": ("tf2", "css", "gmod", "csgo"),
}

AUTH = 3
EXECCOMMAND = 2
AUTH_RESPONSE = 2
RESPONSE_VALUE = 0

MC_READ_SIZE = 1460  # vanilla's per-read buffer
MC_CHUNK_UNITS = 4096  # vanilla splits replies every 4096 UTF-16 code units
SRCDS_MAX_PACKET_SIZE = 4096  # largest size field SRCDS accepts from a client
SRCDS_CHUNK_BYTES = 4096 - 10  # body bytes per reply packet (size field 4096)
SRCDS_MAX_COMMAND = 510  # COMMAND_MAX_LENGTH 512 incl. "\n" and NUL
SRCDS_END_BODY = b"\x00\x01\x00\x00"
SRCDS_TOKENIZER_WARNING = (
    "CCommand::Tokenize: Encountered command which overflows the tokenizer buffer.. Skipping!\n"
)

FAULTS = (
    "stall",
    "stall_after_execute",
    "close_mid_reply",
    "drop_after_execute",
    "marker_only_reply",
    "wrong_reply_id",
    "early_marker_answer",
)

_HEADER = struct.Struct("<iii")


class Executed(NamedTuple):
    command: str
    client: object  # what ``identify`` said of the connection's peer
    at: float  # time.monotonic() when the command ran


class ReceivedPacket(NamedTuple):
    request_id: int
    type: int
    body: bytes


def _peer_address(peer: Any) -> object:
    return peer


def pack(request_id: int, packet_type: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + 10, request_id, packet_type) + body + b"\x00\x00"


def echo(command: str) -> str:
    return command


def java_utf8_chunks(text: str, units: int = MC_CHUNK_UNITS) -> list[bytes]:
    """Vanilla's sendCmdResponse: split by UTF-16 code units, encode each piece.

    Always at least one piece (an empty reply is one empty packet).
    """
    if not text or max(text) < "\U00010000":
        # No surrogate pairs: code points are UTF-16 code units.
        pieces = [text[i : i + units] for i in range(0, max(len(text), 1), units)]
        return [piece.encode("utf-8") for piece in pieces]
    utf16 = text.encode("utf-16-le", "surrogatepass")
    step = 2 * units
    out = []
    for i in range(0, len(utf16), step):
        piece = utf16[i : i + step].decode("utf-16-le", "surrogatepass")
        # Java's String.getBytes(UTF_8) writes '?' for an unpaired surrogate.
        out.append(piece.encode("utf-8", "replace"))
    return out


def minecraft_list(players: dict[str, str], max_players: int) -> str:
    """Vanilla's `list uuids`: commands.list.players around commands.list.nameAndId."""
    named = ", ".join(f"{name} ({uuid})" for name, uuid in players.items())
    return f"There are {len(players)} of a max of {max_players} players online: {named}"


STEAM64_BASE = 76561197960265728

_STATUS_HEAD = {
    "tf2": (
        "hostname: perksync test\nversion : 8604597/24 8604597 secure\n"
        "udp/ip  : 127.0.0.1:27015  (public ip: 127.0.0.1)\n"
        "steamid : [G:1:1234567] (85568392921274567)\n"
        "account : not logged in  (No account specified)\n"
        "map     : ctf_2fort at: 0 x, 0 y, 0 z\ntags    : ctf\n"
        "players : {n} humans, 0 bots ({max} max)\nedicts  : 1024 used of 2048 max\n"
        "# userid name                uniqueid            connected ping loss state  adr\n"
    ),
    "css": (
        "hostname: perksync test\nversion : 7968474/24 7968474 secure\n"
        "udp/ip  : 127.0.0.1:27015  (public ip: 127.0.0.1)\n"
        "account : not logged in  (No account specified)\n"
        "map     : de_dust2 at: 0 x, 0 y, 0 z\ntags    : \n"
        "players : {n} humans, 0 bots ({max}/0 max) (not hibernating)\n\n"
        "# userid name uniqueid connected ping loss state adr\n"
    ),
    "gmod": (
        "hostname: perksync test\nversion : 2023.06.28/24 9084 secure\n"
        "udp/ip  : 127.0.0.1:27015  (public ip: 127.0.0.1)\n"
        "map     : gm_construct at: 0 x, 0 y, 0 z\nplayers : {n} ({max} max)\n\n"
        "# userid name                uniqueid            connected ping loss state  adr\n"
    ),
    "csgo": (
        "hostname: perksync test\nversion : 1.38.2.2 secure\nos      :  Linux\n"
        "type    :  community dedicated\nmap     : de_dust2\n"
        "players : {n} humans, 0 bots ({max}/0 max) (not hibernating)\n\n"
        "# userid name uniqueid connected ping loss state rate adr\n"
    ),
}


def srcds_status(game: str, players: dict[str, str], max_players: int) -> str:
    """`status` as the game prints it, one line per player (ids from SteamID64s)."""
    lines = [_STATUS_HEAD[game].format(n=len(players), max=max_players)]
    for userid, (name, steam64) in enumerate(players.items(), start=2):
        account = int(steam64) - STEAM64_BASE
        y, z = account & 1, account >> 1
        if game == "tf2":
            lines.append(f'#    {userid:3d} "{name}"  [U:1:{account}]  00:42  54  0 active\n')
        elif game == "csgo":
            lines.append(
                f'# {userid} {userid - 1} "{name}" STEAM_1:{y}:{z} 00:21 31 0 active 196608 '
                f"127.0.0.1:27005\n"
            )
        else:
            lines.append(
                f'#  {userid:5d} "{name}"  STEAM_0:{y}:{z}  05:11  40  0 active 127.0.0.1:27005\n'
            )
    if game == "csgo":
        lines.append("#end\n")
    return "".join(lines)


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _Connection:
    """What both profiles share per connection."""

    server: FakeRconServer
    transport: asyncio.Transport | None
    authed: bool
    hung: bool
    # The rest of a reply held back by early_marker_answer.
    held: bytes
    client: object

    def _start(self, server: FakeRconServer, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.server = server
        self.transport = transport
        self.authed = False
        self.hung = False
        self.held = b""
        self.client = server.identify(transport.get_extra_info("peername"))
        server.clients.append(self.client)
        server.connections_accepted += 1
        server._conns.add(self)

    def _stop(self) -> None:
        self.server._conns.discard(self)
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def run_command(
        self, request_id: int, command: str, reply_packets: Callable[[int, str], bytes]
    ) -> bool:
        """Run + record a command and send its reply, applying faults.

        ``reply_packets(request_id, text)`` builds the reply's packets.
        Returns False when the connection was closed by a fault.
        """
        server = self.server
        if server._take("marker_only_reply"):
            return True
        server.commands.append(command)
        server.command_log.append(Executed(command, self.client, time.monotonic()))
        if server.on_command is not None:
            server.on_command(command)
        if server._take("drop_after_execute"):
            self.close()
            return False
        if server._take("stall_after_execute"):
            self.hung = True  # like a server thread stuck in the command: nothing more
            return False
        if server._take("wrong_reply_id"):
            request_id += 1
        data = reply_packets(request_id, server.answer(command))
        held, self.held = self.held, b""
        if server._take("early_marker_answer"):
            first = 4 + int.from_bytes(data[:4], "little", signed=True)
            data, self.held = data[:first], data[first:]
        data = held + data
        if server._take("close_mid_reply"):
            self.write(data[: max(1, len(data) // 2)])
            self.close()
            return False
        self.write(data)
        return True


class _MinecraftProtocol(asyncio.BufferedProtocol, _Connection):
    def __init__(self, server: FakeRconServer) -> None:
        self._server_ref = server
        self._buf = bytearray(MC_READ_SIZE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start(self._server_ref, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def eof_received(self) -> bool:
        return False  # close

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buf  # one read() of at most 1460 bytes, like vanilla

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        data = bytes(self._buf[:nbytes])
        if server.stall or self.hung:
            return
        # if (10 > i) return;  if (size != i - 4) return;  -> closeSocket()
        if nbytes < 10 or int.from_bytes(data[:4], "little", signed=True) != nbytes - 4:
            server.violations += 1
            self.close()
            return
        request_id, packet_type = struct.unpack_from("<ii", data, 4)
        end = data.find(b"\x00", 12)
        body = data[12 : nbytes if end < 0 else end]
        server.received.append(ReceivedPacket(request_id, packet_type, body))
        if server.latency > 0 and self.transport is not None:
            # Vanilla's thread handles a request before it reads again.
            self.transport.pause_reading()
            server._spawn(self._handle_later(request_id, packet_type, body))
        else:
            self._handle(request_id, packet_type, body)

    async def _handle_later(self, request_id: int, packet_type: int, body: bytes) -> None:
        await asyncio.sleep(self.server.latency)
        if self.transport is None or self.transport.is_closing():
            return
        if self._handle(request_id, packet_type, body) and self.transport is not None:
            self.transport.resume_reading()

    @staticmethod
    def _reply_packets(request_id: int, text: str) -> bytes:
        return b"".join(pack(request_id, RESPONSE_VALUE, c) for c in java_utf8_chunks(text))

    def _handle(self, request_id: int, packet_type: int, body: bytes) -> bool:
        server = self.server
        text = body.decode("utf-8", "replace")
        if server.stall:
            return True
        if packet_type == AUTH:
            server.auth_attempts += 1
            if text and text == server.password:
                self.authed = True
                self.write(pack(request_id, AUTH_RESPONSE, b""))
            else:
                self.authed = False
                self.write(pack(-1, AUTH_RESPONSE, b""))
            return True
        if packet_type == EXECCOMMAND:
            if not self.authed:
                self.write(pack(-1, AUTH_RESPONSE, b""))
                return True
            return self.run_command(request_id, text, self._reply_packets)
        unknown = f"Unknown request {packet_type & 0xFFFFFFFF:x}"
        self.write(self._reply_packets(request_id, unknown))
        return True


class _SrcdsProtocol(asyncio.Protocol, _Connection):
    def __init__(self, server: FakeRconServer) -> None:
        self._server_ref = server
        self._buf = bytearray()
        self._queue: list[ReceivedPacket] = []
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._start(self._server_ref, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server.stall or self.hung:
            return
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            size = int.from_bytes(buf[pos : pos + 4], "little", signed=True)
            if size > server.max_packet_size or size < 10:
                server.violations += 1
                self.close()
                return
            if len(buf) - pos - 4 < size:
                break
            request_id, packet_type = struct.unpack_from("<ii", buf, pos + 4)
            raw = bytes(buf[pos + 12 : pos + 4 + size])
            end = raw.find(b"\x00")
            body = raw if end < 0 else raw[:end]
            packet = ReceivedPacket(request_id, packet_type, body)
            server.received.append(packet)
            self._queue.append(packet)
            pos += 4 + size
        del buf[:pos]
        self._drain()

    def _drain(self) -> None:
        if self._busy:
            return
        if self.server.latency > 0:
            if self._queue:
                self._busy = True
                self.server._spawn(self._drain_later())
            return
        while self._queue and self.transport is not None:
            if not self._handle(self._queue.pop(0)):
                self._queue.clear()

    async def _drain_later(self) -> None:
        while self._queue and self.transport is not None:
            await asyncio.sleep(self.server.latency)
            if not self._handle(self._queue.pop(0)):
                self._queue.clear()
        self._busy = False

    def _flush(self, request_id: int, output: bytes = b"") -> bytes:
        """The console redirect flush: RESPONSE_VALUE(s) carrying the output."""
        if not output:
            return pack(request_id, RESPONSE_VALUE, b"")
        return b"".join(
            pack(request_id, RESPONSE_VALUE, output[i : i + SRCDS_CHUNK_BYTES])
            for i in range(0, len(output), SRCDS_CHUNK_BYTES)
        )

    def _handle(self, packet: ReceivedPacket) -> bool:
        server = self.server
        if server.stall:
            return True
        request_id, packet_type, body = packet
        if packet_type == AUTH:
            server.auth_attempts += 1
            ok = bool(server.password) and body.decode("utf-8", "replace") == server.password
            self.authed = ok
            self.write(self._flush(request_id) + pack(request_id if ok else -1, AUTH_RESPONSE, b""))
            return True
        if packet_type == EXECCOMMAND:
            if not self.authed:
                self.write(self._flush(request_id))
                return True
            if len(body) > SRCDS_MAX_COMMAND:
                self.write(self._flush(request_id, SRCDS_TOKENIZER_WARNING.encode()))
                return True
            command = body.decode("utf-8", "replace")
            return self.run_command(
                request_id, command, lambda rid, text: self._flush(rid, text.encode("utf-8"))
            )
        if packet_type == RESPONSE_VALUE and self.authed:
            # RequestValue(""): mirror (the flush), then the 00 01 00 00 packet.
            self.write(self._flush(request_id) + pack(request_id, RESPONSE_VALUE, SRCDS_END_BODY))
            return True
        self.write(self._flush(request_id))
        return True


class FakeRconServer:
    """An RCON server on loopback that behaves like vanilla Minecraft or SRCDS."""

    def __init__(
        self,
        profile: Profile = "minecraft",
        password: str = "secret",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reply: Callable[[str], str] = echo,
        latency: float = 0.0,
        game: Game | None = None,
    ) -> None:
        if profile not in ("minecraft", "srcds"):
            raise ValueError(f"unknown profile {profile!r}")
        self.profile: Profile = profile
        self.game: Game = game or ("vanilla" if profile == "minecraft" else "tf2")
        if self.game not in GAMES[profile]:
            raise ValueError(f"unknown {profile} game {self.game!r}; one of {GAMES[profile]}")
        self.players: dict[str, str] = {}
        self.max_players = 20
        self.known_commands: frozenset[str] | None = None
        self.list_reads = 0
        self.password = password
        self.host = host
        self._port = port
        self.reply = reply
        self.latency = latency
        self.max_packet_size = SRCDS_MAX_PACKET_SIZE
        # faults
        self.stall = False
        self.stall_after_execute = False
        self.close_mid_reply = False
        self.drop_after_execute = False
        self.marker_only_reply = False
        self.wrong_reply_id = False
        self.early_marker_answer = False
        self._armed: dict[str, int] = {}
        # records
        self.commands: list[str] = []
        self.command_log: list[Executed] = []
        self.clients: list[object] = []
        self.identify: Callable[[Any], object] = _peer_address
        self.received: list[ReceivedPacket] = []
        self.auth_attempts = 0
        self.connections_accepted = 0
        self.violations = 0
        self.on_command: Callable[[str], None] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<FakeRconServer {self.profile} {self.host}:{self._port}>"

    @property
    def port(self) -> int:
        return self._port

    @property
    def is_down(self) -> bool:
        return self._server is None

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def arm(self, fault: str, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` commands only."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        self._armed[fault] = self._armed.get(fault, 0) + times

    def _take(self, fault: str) -> bool:
        if getattr(self, fault):
            return True
        left = self._armed.get(fault, 0)
        if left > 0:
            self._armed[fault] = left - 1
            return True
        return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.profile == "minecraft":
            return _MinecraftProtocol(self)
        return _SrcdsProtocol(self)

    async def start(self) -> FakeRconServer:
        if self._server is not None:
            return self
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_connections(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    async def go_down(self) -> None:
        """Stop listening and cut every connection; the port stays reserved for come_up()."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_connections()
        if server is not None:
            await server.wait_closed()
        # Let clients in this loop see their connections die, as they would
        # long before a server that went down is contacted again.
        await asyncio.sleep(0.02)

    async def come_up(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.go_down()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    async def __aenter__(self) -> FakeRconServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- the game's answers ---------------------------------------------------

    def answer(self, command: str) -> str:
        """What the game prints for a command (see the module docstring)."""
        word = command.split(" ", 1)[0]
        if self.profile == "minecraft":
            if command in ("list uuids", "minecraft:list uuids"):
                self.list_reads += 1
                return minecraft_list(self.players, self.max_players)
            known = self.known_commands is None or word.removeprefix("minecraft:") in (
                self.known_commands
            )
            if known:
                return self.reply(command)
            if self.game == "paper":
                return 'Unknown command. Type "/help" for help.\n'
            return f"Unknown or incomplete command, see below for error{command}<--[HERE]"
        if command == "status":
            self.list_reads += 1
            return srcds_status(self.game, self.players, self.max_players)
        if self.known_commands is None or word in self.known_commands:
            return self.reply(command)
        return f'Unknown command "{word}"\n'

    # -- helpers for tests ---------------------------------------------------

    def packets_of_type(self, packet_type: int) -> list[ReceivedPacket]:
        return [p for p in self.received if p.type == packet_type]


@contextlib.contextmanager
def running_in_thread(server: FakeRconServer) -> Iterator[ThreadedServer]:
    """Run ``server`` in a background thread's event loop (for blocking clients)."""
    threaded = ThreadedServer(server)
    threaded.start()
    try:
        yield threaded
    finally:
        threaded.stop()


class ThreadedServer:
    def __init__(self, server: FakeRconServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self._thread.start()
        self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Minecraft/SRCDS RCON server")
    parser.add_argument("--profile", choices=["minecraft", "srcds"], default="minecraft")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=25575)
    parser.add_argument("--password", default="secret")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)

    async def serve() -> None:
        server = FakeRconServer(
            args.profile, args.password, args.host, args.port, latency=args.latency
        )
        server.on_command = lambda command: print(f"[{server.profile}] {command}", flush=True)
        await server.start()
        print(f"fake {args.profile} RCON listening on {args.host}:{server.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
