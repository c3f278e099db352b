"""Minecraft (Java Edition) servers over RCON: vanilla, Paper, Spigot, Fabric, Forge.

Everything Minecraft-specific about the protocol is in ``adapters.rcon.MINECRAFT``:
one packet per write and never two requests in flight (vanilla reads each
request with a single read() into a 1460-byte buffer and drops the connection
when that read holds anything but exactly one packet), command bodies of at most
1446 bytes, and replies split every 4096 UTF-16 code units whose end is found
with a packet of an unknown type (vanilla answers "Unknown request c8").
"""

from __future__ import annotations

from typing import ClassVar

from adapters.rcon import MINECRAFT, RconGameServer, RconProfile


class MinecraftServer(RconGameServer):
    platform: ClassVar[str] = "minecraft"
    routing_field: ClassVar[str] = "minecraft_uuid"
    max_command_bytes: ClassVar[int] = MINECRAFT.max_command_bytes  # 1446
    # Minecraft commands are not split on any character; control characters
    # are refused for every platform elsewhere.
    forbidden_in_values: ClassVar[frozenset[str]] = frozenset()
    profile: ClassVar[RconProfile] = MINECRAFT
