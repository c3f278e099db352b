"""Who is online on a game server: the player list a server prints over RCON,
read as ids (pure functions; the delivery worker sends the command).

- Minecraft: `minecraft:list uuids` (the namespaced name, because plugins such
  as EssentialsX replace `list`). Vanilla and Paper answer `There are 2 of a
  max of 20 players online: Notch (069a79f4-44e9-4726-a5be-fca90e38aaf5),
  jeb_ (853c80ef-3c37-49fd-aa49-938b674adae6)`.
  The ids are the UUIDs in parentheses: a player name is at most 16
  characters of `A-Z a-z 0-9 _`, so it can never hold one.
- Source: `status`, one line per player, `# userid [slot] "name" uniqueid
  connected ping …`; the id is the field right after the quoted name, taken
  after the name's last quote (a name may hold quotes and ids of its own).
  SteamID2 (`STEAM_0:1:…`, `STEAM_1:1:…`), SteamID3 (`[U:1:…]`) and
  SteamID64 all name the same account.
- `servers.<name>.players_command` and `players_pattern` (a regular
  expression whose group `id`, else its first group, is the id; `^` and `$`
  match at each line) replace the defaults for games whose list differs.

Ids are compared as keys: a Minecraft UUID as 32 lowercase hex digits, a
Steam account as its account number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from adapters import PLATFORMS
from daemon.placeholders import steam_account

_UUID: Final = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
_STEAM2: Final = re.compile(r"STEAM_[0-5]:([01]):([0-9]{1,10})", re.I)
_STEAM3: Final = re.compile(r"\[U:1:([0-9]{1,10})\]")
_STEAM64: Final = re.compile(r"[0-9]{17}")


@dataclass(frozen=True, slots=True)
class PlayerList:
    """How one server's player list is read."""

    platform: str
    command: str
    pattern: re.Pattern[str]  # group `id` (else group 1) is a player's id
    # A reply without this is no player list (an error, another command's
    # output); None: any reply is one.
    header: re.Pattern[str] | None

    def ids(self, reply: str) -> frozenset[str] | None:
        """The keys of the players the reply lists; None if it is no player list."""
        if self.header is not None and not self.header.search(reply):
            return None
        group = "id" if "id" in self.pattern.groupindex else 1
        keys = (player_key(self.platform, m.group(group)) for m in self.pattern.finditer(reply))
        return frozenset(key for key in keys if key is not None)


_DEFAULTS: Final[Mapping[str, PlayerList]] = {
    "minecraft": PlayerList(
        "minecraft",
        "minecraft:list uuids",
        re.compile(rf"\((?P<id>{_UUID.pattern})\)", re.I),
        # 1.13 and later; before, "There are 1/20 players online:".
        re.compile(r"There are \d+(?: of a max of |/)\d+ players online"),
    ),
    "source": PlayerList(
        "source",
        "status",
        # Greedy: the name ends at the line's last quote that a field follows.
        re.compile(r'^#\s*\d+(?:[ \t]+\d+)?[ \t]+".*"[ \t]+(?P<id>\S+)', re.M),
        re.compile(r"^#\s*userid\s+name\s+uniqueid", re.M),
    ),
}


def player_list(
    platform: str, command: str | None = None, pattern: str | None = None
) -> PlayerList:
    """The platform's player list, with the server's overrides."""
    default = _DEFAULTS[platform]
    if pattern is None:
        return PlayerList(platform, command or default.command, default.pattern, default.header)
    # An operator's pattern says nothing about what else the reply holds.
    return PlayerList(platform, command or default.command, re.compile(pattern, re.M), None)


def player_key(platform: str, text: str) -> str | None:
    """The comparable key of a player id as a server or PayNow writes it; None
    if `text` is no id of that platform (a bot, `STEAM_ID_PENDING`, a name)."""
    text = text.strip()
    if platform == "minecraft":
        return text.replace("-", "").lower() if _UUID.fullmatch(text) else None
    if m := _STEAM2.fullmatch(text):
        account = int(m.group(2)) * 2 + int(m.group(1))
    elif m := _STEAM3.fullmatch(text):
        account = int(m.group(1))
    elif _STEAM64.fullmatch(text):
        found = steam_account(text)
        if found is None:
            return None
        account = found
    else:
        return None
    return str(account) if 0 < account <= 0xFFFFFFFF else None


def customer_key(platform: str, customer: Mapping[str, object]) -> str | None:
    """The key of the customer's player on that platform (its `minecraft_uuid`,
    `steam_id`, as the customer's JSON has it); None without one."""
    value = customer.get(PLATFORMS[platform].routing_field)
    return player_key(platform, value) if isinstance(value, str) else None
