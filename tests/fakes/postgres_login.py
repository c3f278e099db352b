"""A loopback stand-in for a PostgreSQL server that asks for a password and
refuses it, as a server configured for password authentication does.

The test server trusts local connections, so it never asks: this one speaks
the start of PostgreSQL's protocol (an SSL request is declined, the startup
message read, a clear-text password asked for and recorded, a FATAL
`28P01` error sent back) to show where the password goes and what the
operator is told. Its error message can echo the password, as a careless
proxy might, to show that perksync keeps it out of its own messages anyway.
"""

from __future__ import annotations

import asyncio
import struct

SSL_REQUEST = 80877103
AUTH_CLEARTEXT = 3


class FakeLoginServer:
    def __init__(self, *, echo_password: bool = False) -> None:
        self.echo_password = echo_password
        self.passwords: list[str] = []  # every password a client sent, in order
        self.users: list[str] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def url(self, user: str = "perksync", database: str = "perksync") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            params = await self._startup(reader, writer)
            self.users.append(params.get("user", ""))
            writer.write(b"R" + struct.pack("!ii", 8, AUTH_CLEARTEXT))
            await writer.drain()
            kind = await reader.readexactly(1)
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            if kind == b"p":
                self.passwords.append(body.rstrip(b"\0").decode())
            message = f'password authentication failed for user "{params.get("user", "")}"'
            if self.echo_password and self.passwords:
                message += f" (password {self.passwords[-1]})"
            writer.write(_error("28P01", message))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _startup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, str]:
        while True:
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code != SSL_REQUEST:
                break
            writer.write(b"N")  # no SSL here: the client goes on in the clear
            await writer.drain()
        fields = body[4:].rstrip(b"\0").split(b"\0")
        return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}


def _error(code: str, message: str) -> bytes:
    fields = b"".join(
        kind + value.encode() + b"\0"
        for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body
