"""What a game server's reply to a command says (pure; the delivery worker acts on it).

- An error reply marks the command rejected: it ran into an error and running
  it again would only fail again (a typo such as `lp usr …`, a plugin that is
  not installed). Minecraft's are `Unknown or incomplete command`,
  `Incorrect argument for command` and `Unknown command` (Spigot's, and
  vanilla's before 1.13); a Source server's reply to an unknown command
  starts a line with `Unknown command`. `servers.<name>.error_replies` add
  more.
- A reply to an online-only command saying the player is not there
  (`No player was found`, plus `servers.<name>.offline_replies`) sends it
  back to waiting for the player.

Patterns are regular expressions searched anywhere in the reply; `^` and `$`
match at each line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

_ERRORS: Final[Mapping[str, Sequence[str]]] = {
    # Plain words: no character in them is special in a regular expression.
    "minecraft": (
        "Unknown or incomplete command",
        "Incorrect argument for command",
        "Unknown command",
    ),
    "source": ("^Unknown command",),
}
_OFFLINE: Final = ("No player was found",)


class Verdict(StrEnum):
    DELIVERED = "delivered"
    REJECTED = "rejected"  # an error reply
    OFFLINE = "offline"  # the player is not there: wait for them again


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    pattern: str | None = None  # the pattern found (REJECTED, OFFLINE)


@dataclass(frozen=True, slots=True)
class ReplyRules:
    errors: tuple[re.Pattern[str], ...]
    offline: tuple[re.Pattern[str], ...]

    @classmethod
    def of(
        cls, platform: str, error_replies: Iterable[str] = (), offline_replies: Iterable[str] = ()
    ) -> ReplyRules:
        """The platform's replies plus the server's own (already checked by the config)."""
        return cls(
            tuple(re.compile(p, re.M) for p in (*_ERRORS[platform], *error_replies)),
            tuple(re.compile(p, re.M) for p in (*_OFFLINE, *offline_replies)),
        )

    def judge(self, reply: str, *, online: bool) -> Judgement:
        """What the reply to a command makes of it. A player who is not there
        comes first: an online-only command must not be lost to a reply that
        also reads as an error."""
        if online and (found := _first(self.offline, reply)) is not None:
            return Judgement(Verdict.OFFLINE, found)
        if (found := _first(self.errors, reply)) is not None:
            return Judgement(Verdict.REJECTED, found)
        return Judgement(Verdict.DELIVERED)

    def error_in(self, reply: str) -> str | None:
        """The first error pattern found in the reply, or None."""
        return _first(self.errors, reply)


def _first(patterns: Iterable[re.Pattern[str]], reply: str) -> str | None:
    return next((p.pattern for p in patterns if p.search(reply)), None)
