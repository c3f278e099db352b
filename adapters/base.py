"""The small interface every game-server adapter implements (one class per platform).

The engine only ever talks to a `GameServer`: connect once per pass, run
commands one at a time in journal order, close. Which platform class serves a
server comes from the explicit registry in `adapters/__init__.py`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class RconError(Exception):
    """Base of every error raised by an adapter. Messages never contain the password."""


class RconConnectError(RconError):
    """Could not connect (refused, unreachable, connect timeout): the server is down."""


class RconAuthError(RconError):
    """The server refused the password (reply id -1). Never retried within a pass."""


class RconTimeout(RconError):
    """No (complete) reply in time. The command may or may not have run."""


class RconConnectionLost(RconError):
    """The connection closed or broke mid-request. The command may or may not have run."""


class RconProtocolError(RconError):
    """The server sent something that is not RCON (bad size, wrong id, garbage)."""


class RconUnconfirmed(RconProtocolError):
    """The command was sent, but what came back does not confirm it: no answer
    for it before the end of the reply, an answer for another request, or bytes
    that are not RCON. The command may or may not have run."""


class CommandTooLong(RconError):
    """The command can never be sent to this platform: it is longer than its limit."""


class GameServer(Protocol):
    # "minecraft" | "source"
    platform: ClassVar[str]
    # The Customer field a customer must have for this platform to act on them
    # ("minecraft_uuid" / "steam_id").
    routing_field: ClassVar[str]
    # Longest command body in UTF-8 bytes this platform accepts.
    max_command_bytes: ClassVar[int]
    # Characters that must never reach this platform from a placeholder value,
    # on top of the control characters refused everywhere (Source: ';' and '"').
    forbidden_in_values: ClassVar[frozenset[str]]

    name: str

    def __init__(
        self, name: str, host: str, port: int, password: str, *, timeout: float = 5.0
    ) -> None:
        """Every platform class is built the same way (adapters.PLATFORMS[platform](...))."""
        ...

    async def connect(self) -> None:
        """Open the connection and authenticate (raises RconConnectError, RconAuthError)."""
        ...

    async def run(self, command: str) -> str:
        """Send one command and return the server's whole reply (fragments joined).

        Reconnects first if a previous error closed the connection. Raises
        CommandTooLong before sending anything if the command is over the limit.
        """
        ...

    async def close(self) -> None: ...
