"""The asyncio RCON connection, with one profile per server family.

Minecraft and Source servers both speak Valve's RCON packet format, but they
disagree on everything around it. A :class:`RconProfile` names the
differences; :class:`RconClient` is one connection that follows a profile;
:class:`RconGameServer` wraps a client into the engine's ``GameServer``
interface (the platform classes live in ``minecraft.py`` and ``source.py``).

What the client promises the engine:

* one request at a time per connection (an ``asyncio.Lock``), request ids
  unique and increasing (1 .. 2**31-1, then wrapping to 1; never 0 or -1);
* ``run()`` raises ``CommandTooLong`` (or its subclass ``CommandNotAllowed``)
  before connecting or sending anything;
* any failure *before the command was written* is ``RconConnectError``,
  ``RconAuthError`` or ``RconProtocolError``, and its message ends with
  "(no command was sent)": the command certainly did not run;
* ``RconTimeout``, ``RconConnectionLost`` and ``RconUnconfirmed`` (a
  ``RconProtocolError`` raised after sending: a reply that does not confirm
  the command) mean the command was handed to the server and may or may not
  have run; their messages end with "(the command was sent and may or may not
  have run)";
* a command counts as done only once a reply carrying its own request id has
  arrived; an end-of-reply marker answered without one is ``RconUnconfirmed``;
* ``RconAuthError`` after sending means the server refused the command
  unauthenticated, without running it;
* a packet left over from an earlier request on the same connection is
  skipped (it cannot confirm anything), so it never fails the command after it;
* after any error the connection is dropped; the next ``run()`` opens a new
  one (at most one connection attempt per call);
* a refused password is never retried by ``run()``: once authentication
  failed, ``run()`` raises ``RconAuthError`` without contacting the server until
  ``connect()`` is called explicitly (SRCDS bans an address after
  ``sv_rcon_maxfailures`` bad passwords, 10 by default);
* the password never appears in exception messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Literal

from adapters.base import (
    CommandTooLong,
    RconAuthError,
    RconConnectError,
    RconConnectionLost,
    RconError,
    RconProtocolError,
    RconTimeout,
    RconUnconfirmed,
)
from adapters.rcon_codec import (
    AUTH_FAILED_ID,
    INT32_MAX,
    MIN_PACKET_SIZE,
    SERVERDATA_AUTH,
    SERVERDATA_AUTH_RESPONSE,
    SERVERDATA_EXECCOMMAND,
    SERVERDATA_RESPONSE_VALUE,
    Packet,
    PacketDecoder,
    encode_packet,
)

log = logging.getLogger(__name__)

# Body of the extra packet SRCDS sends after mirroring an empty RESPONSE_VALUE.
# It is what CServerRemoteAccess::RequestValue("") builds: the empty variable
# name's NUL, int32 1 (the value's length), the value's NUL; the last two bytes
# of it double as the packet's terminators, so the body is 00 01 00 00.
SOURCE_END_BODY = b"\x00\x01\x00\x00"

# Packet type Minecraft does not know: vanilla answers any unknown type with a
# RESPONSE_VALUE "Unknown request <type in hex>" carrying the packet's id.
MINECRAFT_MARKER_TYPE = 200  # "Unknown request c8"

# The end of every error message, saying whether the command can have run.
NOT_SENT = "no command was sent"
MAYBE_RAN = "the command was sent and may or may not have run"


class CommandNotAllowed(CommandTooLong):
    """The command contains a control character (NUL, CR, LF, ...), so it can never be sent.

    A NUL ends the body early on both platforms and a newline makes SRCDS run
    the rest as a second console command. It subclasses CommandTooLong so that
    callers treating CommandTooLong as "permanent, never retry" handle it too.
    """


@dataclass(frozen=True, slots=True)
class RconProfile:
    """How one server family speaks RCON."""

    name: str
    # Longest command body, in UTF-8 bytes, the server accepts.
    max_command_bytes: int
    # Largest size field accepted in a reply packet.
    max_reply_packet_size: int
    # How the end of a (possibly multi-packet) reply is found:
    #  "marker": after a long first fragment, send a packet of an unknown type
    #            and stop at its answer (Minecraft);
    #  "mirror": send an empty RESPONSE_VALUE right after the command and stop
    #            at its mirror + the 00 01 00 00 packet (SRCDS).
    reply_end: Literal["marker", "mirror"]
    # A first fragment shorter than this (in bytes) is the whole reply
    # ("marker" profiles only).
    short_fragment_bytes: int = 0


MINECRAFT = RconProfile(
    name="minecraft",
    # Vanilla reads each request with one read() into a 1460-byte buffer: 1460
    # minus the 4-byte size, 4-byte id, 4-byte type and 2 NULs leaves 1446. A
    # bigger packet (or two packets in one read) makes it drop the connection.
    max_command_bytes=1446,
    # Vanilla splits a reply every 4096 UTF-16 code units and UTF-8-encodes each
    # piece, so one fragment's body is 4096..12288 bytes (3 bytes per BMP code
    # unit at most; a surrogate pair is 4 bytes for 2 units).
    max_reply_packet_size=3 * 4096 + MIN_PACKET_SIZE,
    reply_end="marker",
    # Every fragment but the last holds exactly 4096 code units, which is at
    # least 4096 bytes, so a shorter first fragment is a complete reply. 4000
    # leaves a margin for servers that split by bytes and re-encode (a fragment
    # a few bytes under 4096); a 4000..4095-byte reply merely costs one extra
    # round trip for the marker.
    short_fragment_bytes=4000,
)

SOURCE = RconProfile(
    name="source",
    # SRCDS copies the body into char command[512] and the console tokenizer
    # (COMMAND_MAX_LENGTH = 512, including the terminator) refuses a line of
    # 511 characters or more, so 510 bytes is the longest command that runs.
    max_command_bytes=510,
    # The Valve wiki gives 4096 as the largest packet; allow a 4096-byte body.
    max_reply_packet_size=4096 + MIN_PACKET_SIZE,
    reply_end="mirror",
)


class RequestIds:
    """Unique, increasing request ids in 1 .. 2**31-1, wrapping back to 1.

    0 (used by most simple clients) and -1 (the bad-password id) never occur.
    """

    __slots__ = ("_next",)

    def __init__(self, start: int = 1) -> None:
        if not 1 <= start <= INT32_MAX:
            raise ValueError("start must be in 1..2**31-1")
        self._next = start

    def next(self) -> int:
        value = self._next
        self._next = 1 if value >= INT32_MAX else value + 1
        return value


class RconClient:
    """One RCON connection to one server, following ``profile``."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        profile: RconProfile,
        *,
        timeout: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.host = host
        self.port = port
        self.profile = profile
        self.timeout = timeout
        self.__password = password
        self._ids = RequestIds()
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = PacketDecoder(max_size=profile.max_reply_packet_size)
        self._pending: deque[Packet] = deque()
        self._auth_failed = False
        # Id of the first request on the current connection (its login).
        self._first_id = 0

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<RconClient {self.profile.name} {self._where} {state}>"

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True while an authenticated connection is open (as far as we know)."""
        return self._usable()

    async def __aenter__(self) -> RconClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- public API ---------------------------------------------------------

    async def connect(self) -> None:
        """Open and authenticate the connection if it is not already open.

        This is the only way to try the password again after RconAuthError.
        """
        async with self._lock:
            self._auth_failed = False
            if not self._usable():
                self._abort()
                await self._open()

    async def run(self, command: str) -> str:
        """Send one command; return the whole reply decoded as UTF-8 (errors replaced)."""
        body = self.encode_command(command)
        async with self._lock:
            if not self._usable():
                self._abort()
                await self._open()
            try:
                async with asyncio.timeout(self.timeout):
                    if self.profile.reply_end == "marker":
                        reply = await self._exchange_marker(body)
                    else:
                        reply = await self._exchange_mirror(body)
            except TimeoutError:
                self._abort()
                raise RconTimeout(
                    f"{self._where}: no complete reply within {self.timeout:g}s ({MAYBE_RAN})"
                ) from None
            except RconError as exc:
                self._abort()
                raise _after_sending(exc) from exc
            except OSError as exc:
                self._abort()
                raise RconConnectionLost(
                    f"{self._where}: connection broke: {exc} ({MAYBE_RAN})"
                ) from exc
            except BaseException:
                self._abort()
                raise
        return reply.decode("utf-8", errors="replace")

    async def close(self) -> None:
        async with self._lock:
            writer = self._writer
            self._drop_state()
            if writer is not None:
                writer.close()
                try:
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()
                except (OSError, TimeoutError):
                    pass

    def encode_command(self, command: str) -> bytes:
        """The command's body, or CommandTooLong / CommandNotAllowed."""
        for ch in command:
            if ch < " " or ch == "\x7f":
                raise CommandNotAllowed(
                    f"command contains control character {ch!r}; it can never be sent"
                )
        body = command.encode("utf-8")
        if len(body) > self.profile.max_command_bytes:
            raise CommandTooLong(
                f"command is {len(body)} bytes in UTF-8; {self.profile.name} servers "
                f"accept at most {self.profile.max_command_bytes}"
            )
        return body

    # -- connection ---------------------------------------------------------

    def _usable(self) -> bool:
        return (
            self._writer is not None
            and self._reader is not None
            and not self._writer.is_closing()
            and not self._reader.at_eof()
            and self._reader.exception() is None
            and not self._pending
            and self._decoder.pending_bytes == 0
        )

    def _drop_state(self) -> None:
        self._reader = None
        self._writer = None
        self._pending.clear()
        self._decoder = PacketDecoder(max_size=self.profile.max_reply_packet_size)

    def _abort(self) -> None:
        """Drop the connection at once (after an error: nothing more to say)."""
        writer = self._writer
        self._drop_state()
        if writer is not None:
            writer.transport.abort()

    async def _open(self) -> None:
        """Connect and authenticate. Nothing of a command has been sent when this fails,
        and the error says so."""
        try:
            await self._connect_and_authenticate()
        except RconError as exc:
            raise type(exc)(f"{exc} ({NOT_SENT})") from exc

    async def _connect_and_authenticate(self) -> None:
        if self._auth_failed:
            raise RconAuthError(
                f"{self._where}: the password was refused earlier; not retrying "
                "until connect() is called"
            )
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise RconConnectError(
                f"{self._where}: connect timed out after {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise RconConnectError(f"{self._where}: cannot connect: {exc}") from exc
        self._reader, self._writer = reader, writer
        try:
            async with asyncio.timeout(self.timeout):
                await self._authenticate()
        except TimeoutError:
            self._abort()
            raise RconConnectError(
                f"{self._where}: no answer to authentication within {self.timeout:g}s"
            ) from None
        except (RconConnectionLost, ConnectionError):
            self._abort()
            # Closed or reset: OpenSSL does this on bytes that are not TLS,
            # SRCDS to an address it banned after too many wrong passwords.
            raise RconConnectError(
                f"{self._where}: the server closed the connection before answering "
                "the login: not an RCON port, or an address it banned?"
            ) from None
        except OSError as exc:
            self._abort()
            raise RconConnectError(
                f"{self._where}: connection broke during authentication: {exc}"
            ) from exc
        except BaseException:
            self._abort()
            raise
        log.debug("rcon %s: connected to %s", self.profile.name, self._where)

    async def _authenticate(self) -> None:
        auth_id = self._ids.next()
        self._first_id = auth_id
        await self._send(encode_packet(auth_id, SERVERDATA_AUTH, self.__password.encode("utf-8")))
        while True:
            packet = await self._read_packet()
            if packet.type == SERVERDATA_AUTH_RESPONSE:
                if packet.request_id == AUTH_FAILED_ID:
                    self._auth_failed = True
                    raise RconAuthError(f"{self._where}: the server refused the RCON password")
                if packet.request_id != auth_id:
                    raise RconProtocolError(
                        f"{self._where}: auth reply has id {packet.request_id}, expected {auth_id}"
                    )
                return
            # SRCDS sends an empty RESPONSE_VALUE with our id before the
            # AUTH_RESPONSE (its console redirect being flushed); skip it.
            if packet.type == SERVERDATA_RESPONSE_VALUE and packet.request_id == auth_id:
                continue
            raise RconProtocolError(
                f"{self._where}: unexpected packet (id {packet.request_id}, "
                f"type {packet.type}) while authenticating"
            )

    async def _send(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise RconConnectionLost(f"{self._where}: not connected")
        writer.write(data)
        await writer.drain()

    async def _read_packet(self) -> Packet:
        while not self._pending:
            reader = self._reader
            if reader is None:
                raise RconConnectionLost(f"{self._where}: not connected")
            data = await reader.read(65536)
            if not data:
                raise RconConnectionLost(f"{self._where}: the server closed the connection")
            try:
                self._pending.extend(self._decoder.feed(data))
            except RconProtocolError as exc:
                raise RconProtocolError(f"{self._where}: {exc}") from None
        return self._pending.popleft()

    # -- one command --------------------------------------------------------

    def _unexpected(self, packet: Packet, *expected: int) -> RconError:
        if packet.request_id == AUTH_FAILED_ID:
            return RconAuthError(
                f"{self._where}: the server says this connection is not authenticated "
                "and refused the command"
            )
        return RconUnconfirmed(
            f"{self._where}: unexpected packet id {packet.request_id} type {packet.type} "
            f"(expected id {' or '.join(map(str, expected))})"
        )

    async def _read_answer(self, command_id: int) -> Packet:
        """The next packet that is not a leftover of an earlier request on this connection.

        A server that answered an earlier end marker before the rest of that
        request's reply sends the rest later. Failing on it would leave this
        command pending although it ran, and send it a second time.
        """
        while True:
            packet = await self._read_packet()
            # Ids only grow on a connection; after a wrap the range is empty
            # and nothing is skipped.
            if not self._first_id <= packet.request_id < command_id:
                return packet
            log.debug(
                "rcon %s %s: skipped a late packet of request %d",
                self.profile.name, self._where, packet.request_id,
            )  # fmt: skip

    async def _exchange_marker(self, body: bytes) -> bytes:
        """Minecraft: one packet per write, never more than one request in flight."""
        command_id = self._ids.next()
        log.debug("rcon minecraft %s: command id %d (%d bytes)", self._where, command_id, len(body))
        await self._send(encode_packet(command_id, SERVERDATA_EXECCOMMAND, body))
        # The marker is sent only after this, so its answer can never stand in
        # for the command's.
        first = await self._read_answer(command_id)
        if first.request_id != command_id or first.type != SERVERDATA_RESPONSE_VALUE:
            raise self._unexpected(first, command_id)
        if len(first.body) < self.profile.short_fragment_bytes:
            return first.body
        # Possibly more fragments. Vanilla writes all of them before it reads
        # the socket again, so the marker is read on its own, and its answer
        # comes after the last fragment.
        marker_id = self._ids.next()
        await self._send(encode_packet(marker_id, MINECRAFT_MARKER_TYPE))
        parts = [first.body]
        while True:
            packet = await self._read_answer(command_id)
            if packet.request_id == command_id and packet.type == SERVERDATA_RESPONSE_VALUE:
                parts.append(packet.body)
            elif packet.request_id == marker_id:
                return b"".join(parts)
            else:
                raise self._unexpected(packet, command_id, marker_id)

    async def _exchange_mirror(self, body: bytes) -> bytes:
        """SRCDS: command + empty RESPONSE_VALUE in one write; stop after the mirror.

        SRCDS handles the packets of a read in order and answers each with at
        least one RESPONSE_VALUE carrying its id (the console output, empty or
        not), so the command's answer always comes before the marker's mirror.
        A mirror without it confirms nothing: the command may not have arrived.
        """
        command_id = self._ids.next()
        end_id = self._ids.next()
        log.debug("rcon source %s: command id %d (%d bytes)", self._where, command_id, len(body))
        await self._send(
            encode_packet(command_id, SERVERDATA_EXECCOMMAND, body)
            + encode_packet(end_id, SERVERDATA_RESPONSE_VALUE)
        )
        parts: list[bytes] = []  # one per RESPONSE_VALUE of the command, even empty
        mirrored = False
        while True:
            packet = await self._read_answer(command_id)
            ours = packet.request_id in (command_id, end_id)
            if packet.type != SERVERDATA_RESPONSE_VALUE or not ours:
                raise self._unexpected(packet, command_id, end_id)
            if packet.request_id == command_id:
                if mirrored:
                    raise RconUnconfirmed(
                        f"{self._where}: reply fragment arrived after the end marker"
                    )
                parts.append(packet.body)
            elif not parts:
                raise RconUnconfirmed(
                    f"{self._where}: the server answered the end-of-reply marker "
                    "without answering the command"
                )
            # First the mirror (empty body), then the 00 01 00 00 packet:
            # consume both so neither is mistaken for the next reply.
            elif packet.body == SOURCE_END_BODY or mirrored:
                return b"".join(parts)
            else:
                mirrored = True


def _after_sending(exc: RconError) -> RconError:
    """``exc``, raised once the command was written, saying it may have run.

    A refusal for want of authentication says already that nothing ran; a
    reply that is not RCON or not for the command becomes RconUnconfirmed.
    """
    if isinstance(exc, RconAuthError):
        return exc
    kind = type(exc) if isinstance(exc, RconTimeout | RconConnectionLost) else RconUnconfirmed
    return kind(f"{exc} ({MAYBE_RAN})")


class RconGameServer:
    """A ``GameServer`` (adapters/base.py) over one RCON connection.

    Subclasses set the ClassVars and ``profile``.
    """

    platform: ClassVar[str]
    routing_field: ClassVar[str]
    max_command_bytes: ClassVar[int]
    forbidden_in_values: ClassVar[frozenset[str]]
    profile: ClassVar[RconProfile]

    def __init__(
        self, name: str, host: str, port: int, password: str, *, timeout: float = 5.0
    ) -> None:
        self.name = name
        self._client = RconClient(host, port, password, self.profile, timeout=timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.host}:{self.port}>"

    @property
    def host(self) -> str:
        return self._client.host

    @property
    def port(self) -> int:
        return self._client.port

    @property
    def timeout(self) -> float:
        return self._client.timeout

    @property
    def connected(self) -> bool:
        return self._client.connected

    async def connect(self) -> None:
        await self._client.connect()

    async def run(self, command: str) -> str:
        return await self._client.run(command)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> RconGameServer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
