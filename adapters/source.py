"""Source-engine dedicated servers (SRCDS: CS:GO, TF2, Garry's Mod, L4D2, ...) over RCON.

Everything SRCDS-specific about the protocol is in ``adapters.rcon.SOURCE``:
the empty RESPONSE_VALUE before the AUTH_RESPONSE, and the end of a
(possibly multi-packet) reply found by sending an empty RESPONSE_VALUE after
each command, which SRCDS mirrors and follows with a 00 01 00 00 packet.
"""

from __future__ import annotations

from typing import ClassVar

from adapters.rcon import SOURCE, RconGameServer, RconProfile


class SourceServer(RconGameServer):
    platform: ClassVar[str] = "source"
    routing_field: ClassVar[str] = "steam_id"
    # Source's console line limit is 512 bytes including the terminator
    # (COMMAND_MAX_LENGTH); the tokenizer refuses a line of 511 characters or
    # more and SRCDS appends "\n" to every RCON command, so 510 is the longest
    # command body that actually runs.
    max_command_bytes: ClassVar[int] = SOURCE.max_command_bytes  # 510
    # ';' separates console commands and '"' ends a quoted argument: a value
    # containing either could run a command of its own.
    forbidden_in_values: ClassVar[frozenset[str]] = frozenset(';"')
    profile: ClassVar[RconProfile] = SOURCE
