"""Game-server adapters. The explicit registry ``PLATFORMS`` maps a config
``platform:`` value to its class (no import-by-string)."""

from __future__ import annotations

from adapters.base import (
    CommandTooLong,
    GameServer,
    RconAuthError,
    RconConnectError,
    RconConnectionLost,
    RconError,
    RconProtocolError,
    RconTimeout,
    RconUnconfirmed,
)
from adapters.minecraft import MinecraftServer
from adapters.rcon import CommandNotAllowed
from adapters.source import SourceServer

PLATFORMS: dict[str, type[GameServer]] = {
    "minecraft": MinecraftServer,
    "source": SourceServer,
}

__all__ = [
    "PLATFORMS",
    "CommandNotAllowed",
    "CommandTooLong",
    "GameServer",
    "MinecraftServer",
    "RconAuthError",
    "RconConnectError",
    "RconConnectionLost",
    "RconError",
    "RconProtocolError",
    "RconTimeout",
    "RconUnconfirmed",
    "SourceServer",
]
