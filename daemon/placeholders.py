"""Command templates: `{customer.X}`, `{item.X}` and `{product.X}` placeholders.

A template is parsed once, when the configuration is loaded (`parse_template`),
and rendered for each event (`render`). The parser is a small hand-written one:
`str.format` is never used, so a template cannot reach attributes, indexes or
format specs, and a value is never parsed again.

Syntax
------
- `{customer.X}`: a field of the Customer object, as the API spells it, nested
  with dots (`{customer.steam.name}`); X must be in `CUSTOMER_FIELDS`.
- `{item.X}`: a field of the InventoryItem (`{item.product.slug}`); X must be in
  `ITEM_FIELDS`.
- `{product.X}`: short for `{item.product.X}`.
- Store mode only: `{customer.metadata.KEY}` (the customer's metadata) and
  `{item.custom_variables.KEY}` (the buyer's checkout choices); KEY is 1-64
  letters, digits, `_` or `-`. In token mode they are unknown placeholders.
- Derived: `{customer.steam_id2}` is the SteamID2 form `STEAM_0:Y:Z` of the
  customer's SteamID64 `steam_id`, and `{customer.steam_id3}` the SteamID3 form
  `[U:1:N]`. The universe digit of SteamID2 is always `0`, the form Source 1
  games (CS:S, TF2, GMod, L4D2…) and most SourceMod plugins (`sm_addvip`-style
  commands) use; CS:GO-era plugins that compare the text against `STEAM_1:…`
  need their own handling. Both are null when `steam_id` is null or is not a
  valid SteamID64 of an individual account (universe public, type individual,
  instance 1, account number > 0).
- `{{` and `}}` are a literal `{` and `}`.

Anything else (an unknown name, an unclosed or unmatched brace, `{}`, a
conversion `{customer.name!r}`, a format spec `{customer.name:>10}`, index or
attribute syntax) raises `TemplateError` with a one-line message naming the
placeholder; the config loader prefixes it with the key path. The literal text
of a template may not contain control characters or line/paragraph separators
either: a command is one line, and a stray newline (a YAML block scalar adds
one) would otherwise reach the server.

Rendering
---------
Values are looked up in the raw JSON the API sent (`Customer.raw`,
`InventoryItem.raw`), so strings render exactly as sent, integers in decimal,
booleans as `true`/`false`. Substitution is a single pass: a value that
contains `{customer.id}` is inserted literally.

`render` returns a `Refusal` instead of a command when
- a value is null or missing, or is an object/array rather than a single value
  (`kind="null"`: the command is skipped by design), or
- a value contains a character that could break out of the command or that we
  refuse to relay (`kind="unsafe"`): every control character (Unicode category
  Cc: NUL, TAB, CR, LF, ESC, DEL, the C1 controls including NEL U+0085), the
  line and paragraph separators (Zl, Zp: U+2028, U+2029), lone surrogates (Cs:
  they cannot even be encoded as UTF-8), every invisible *format* character (Cf,
  see below), and every character of the platform's `forbidden` set (Source
  passes `;` and `"`).

A refusal's `reason` is one line, safe to log: it names the placeholder and
describes the first offending character by code point and Unicode name
(`customer.name contains a newline (U+000A) at offset 5`); it never contains the
value itself.

Format characters (category Cf) are refused
-------------------------------------------
Bidi overrides and isolates (U+202A–U+202E, U+2066–U+2069), zero-width spaces and
joiners (U+200B–U+200D), the BOM U+FEFF, the soft hyphen U+00AD, tag characters
(U+E0001–U+E007F) and the like cannot end a command, but they are invisible:
- A value with U+202E makes a log line, a chat message or the server console
  display something other than what was sent, and a name with a zero-width
  character looks exactly like another player's name. Commands that take a
  name as an identifier (`lp user {customer.minecraft.name} …`) must never
  act on a look-alike, and an operator reading logs must be able to trust them.
- Stripping them instead would silently change the value (`No\\u200btch`
  would become `Notch`, someone else), which is worse than refusing.
The cost: a display name containing an emoji ZWJ sequence (👨‍👩‍👧) or a flag
tag sequence is refused too, so a cosmetic `say Thanks {customer.name}!` is not
sent for that customer (journaled as failed with the reason). Identifiers
(`minecraft_uuid`, `steam_id`, ids) never contain such characters; prefer them
in commands that act on a player. Variation selectors (U+FE0F, category Mn),
emoji and CJK text are allowed.

Characters that are not ASCII are never a separator on the wire: in UTF-8 every
byte of a multi-byte sequence is >= 0x80, so e.g. the fullwidth semicolon U+FF1B
cannot become `;` for the Source tokenizer, and is allowed. Length limits are
the adapter's job (`CommandTooLong`), not this module's.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from daemon.models import CUSTOMER_FIELDS, ITEM_FIELDS, Customer, InventoryItem

__all__ = [
    "PLACEHOLDERS",
    "Refusal",
    "Template",
    "TemplateError",
    "parse_template",
    "render",
    "steam_id2",
    "steam_id3",
]

_DERIVED: Final = frozenset({"customer.steam_id2", "customer.steam_id3"})

PLACEHOLDERS: Final[frozenset[str]] = frozenset(
    {f"customer.{name}" for name in CUSTOMER_FIELDS}
    | {f"item.{name}" for name in ITEM_FIELDS}
    | {name for name in ITEM_FIELDS if name.startswith("product.")}
    | _DERIVED
)
"""Every placeholder name a template may use (without the braces)."""

# Characters refused in every value, by Unicode category (see the module docstring).
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Characters refused in the literal text of a template: what breaks a one-line
# command or its encoding. Format characters written by the operator are theirs.
_BAD_LITERAL_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})

_CATEGORY_WORDS: Final = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_CHAR_WORDS: Final = {
    "\n": "a newline",
    "\r": "a carriage return",
    "\t": "a tab",
    "\x00": "a NUL",
    "\x1b": "an escape (ESC)",
    "\x7f": "a DEL",
    "\x85": "a next-line (NEL)",
}

# SteamID64 of an individual account: universe 1, type 1, instance 1.
_STEAM64_INDIVIDUAL_BASE: Final = 0x0110000100000000
_ASCII_DIGITS = re.compile(r"[0-9]{1,20}")


class TemplateError(ValueError):
    """A command template is invalid. The message is one line naming the placeholder."""


@dataclass(frozen=True, slots=True)
class _Field:
    """A placeholder resolved at parse time."""

    name: str  # as written, e.g. "product.slug"
    source: Literal["customer", "item"]
    path: tuple[str, ...]  # in the raw JSON, e.g. ("product", "slug")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed command template. Build it with `parse_template`."""

    text: str
    # The placeholder names used, as written, without braces, in order of first use.
    placeholders: tuple[str, ...]
    # Literal strings and placeholders, in order (internal to this module).
    parts: tuple[str | _Field, ...] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a template could not be rendered for this customer and item.

    `kind` is "null" (a value is null or missing: skip the command by design)
    or "unsafe" (a value could break out of the command: never send it).
    `reason` is one line, safe to log, and never contains the value itself.
    """

    kind: Literal["null", "unsafe"]
    placeholder: str
    reason: str


# --------------------------------------------------------------------------- parsing


def printable(text: str, limit: int = 60) -> str:
    """`text` made safe for a one-line message: non-printables as \\uXXXX escapes."""
    shown = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _describe(ch: str) -> str:
    """A log-safe description of one character (never the character if it is not printable)."""
    code = f"U+{ord(ch):04X}"
    if ch in _CHAR_WORDS:
        return f"{_CHAR_WORDS[ch]} ({code})"
    if ch.isascii() and ch.isprintable():
        return f"{ch!r} ({code})"
    category = unicodedata.category(ch)
    words = _CATEGORY_WORDS.get(category, "a forbidden character")
    name = unicodedata.name(ch, "")
    return f"{words} {name} ({code})" if name else f"{words} ({code})"


def _resolve(name: str) -> _Field:
    head, _, rest = name.partition(".")
    if head == "customer":
        return _Field(name, "customer", tuple(rest.split(".")))
    if head == "item":
        return _Field(name, "item", tuple(rest.split(".")))
    return _Field(name, "item", ("product", *rest.split(".")))


# Store mode adds free-form keys: the customer's metadata and the buyer's
# checkout choices (`{customer.metadata.discord}`, `{item.custom_variables.color}`).
STORE_MODE_PREFIXES: Final = ("customer.metadata.", "item.custom_variables.")
_FREE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _store_mode_name(content: str) -> bool:
    return any(
        content.startswith(prefix) and _FREE_KEY.fullmatch(content[len(prefix) :]) is not None
        for prefix in STORE_MODE_PREFIXES
    )


def _check_name(content: str, store_mode: bool) -> None:
    written = "{" + printable(content) + "}"
    if not content.strip():
        raise TemplateError(f"empty placeholder {written}")
    if "!" in content:
        raise TemplateError(f"conversions are not supported: {written}")
    if ":" in content:
        raise TemplateError(f"format specs are not supported: {written}")
    if "[" in content or "]" in content:
        raise TemplateError(f"index syntax is not supported: {written}")
    if content in PLACEHOLDERS or (store_mode and _store_mode_name(content)):
        return
    message = f"unknown placeholder {written}"
    if _store_mode_name(content):
        raise TemplateError(f"{message}: it exists in store mode only (paynow.api_key)")
    close = difflib.get_close_matches(content.strip(), sorted(PLACEHOLDERS), n=1, cutoff=0.6)
    if close:
        message += f" (did you mean {{{close[0]}}}?)"
    raise TemplateError(message)


def parse_template(text: str, *, store_mode: bool = False) -> Template:
    """Parse one command template; raise `TemplateError` if it is not valid.
    `store_mode` allows the placeholders only store mode has."""
    for offset, ch in enumerate(text):
        if unicodedata.category(ch) in _BAD_LITERAL_CATEGORIES:
            raise TemplateError(
                f"the command contains {_describe(ch)} at offset {offset}: a command is one line"
            )
    parts: list[str | _Field] = []
    names: dict[str, None] = {}
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "}":
            if text.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError(
                f"unmatched '}}' at offset {i}: {printable(text[max(0, i - 30) : i + 1])}"
                " (write '}}' for a literal brace)"
            )
        if ch != "{":
            literal.append(ch)
            i += 1
            continue
        if text.startswith("{{", i):
            literal.append("{")
            i += 2
            continue
        close = text.find("}", i + 1)
        reopen = text.find("{", i + 1)
        if close == -1 or (reopen != -1 and reopen < close):
            end = close + 1 if close != -1 else len(text)
            raise TemplateError(
                f"unclosed '{{' at offset {i}: {printable(text[i:end], 40)}"
                " (write '{{' for a literal brace)"
            )
        content = text[i + 1 : close]
        _check_name(content, store_mode)
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_resolve(content))
        names[content] = None
        i = close + 1
    if literal:
        parts.append("".join(literal))
    return Template(text=text, placeholders=tuple(names), parts=tuple(parts))


# --------------------------------------------------------------------------- SteamIDs


def steam_account(steam_id64: object) -> int | None:
    """The account number of an individual SteamID64, or None if it is not one."""
    if isinstance(steam_id64, bool):
        return None
    if isinstance(steam_id64, int):
        value = steam_id64
    elif isinstance(steam_id64, str) and _ASCII_DIGITS.fullmatch(steam_id64):
        value = int(steam_id64)
    else:
        return None
    account = value - _STEAM64_INDIVIDUAL_BASE
    if not 0 < account <= 0xFFFFFFFF:
        return None
    return account


def steam_id2(steam_id64: object) -> str | None:
    """`STEAM_0:Y:Z` for an individual SteamID64 (string or int), else None."""
    account = steam_account(steam_id64)
    if account is None:
        return None
    return f"STEAM_0:{account & 1}:{account >> 1}"


def steam_id3(steam_id64: object) -> str | None:
    """`[U:1:N]` for an individual SteamID64 (string or int), else None."""
    account = steam_account(steam_id64)
    if account is None:
        return None
    return f"[U:1:{account}]"


# --------------------------------------------------------------------------- rendering

_MISSING: Final = object()


def _lookup(raw: Mapping[str, Any], path: tuple[str, ...]) -> object:
    node: object = raw
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _value(placeholder: _Field, customer: Customer, item: InventoryItem) -> str | Refusal:
    name = placeholder.name
    if name == "customer.steam_id2" or name == "customer.steam_id3":
        convert = steam_id2 if name == "customer.steam_id2" else steam_id3
        derived = convert(customer.raw.get("steam_id"))
        if derived is None:
            return Refusal(
                "null", name, f"{name} is null (customer.steam_id is null or not an individual "
                "SteamID64)"
            )  # fmt: skip
        return derived
    raw = customer.raw if placeholder.source == "customer" else item.raw
    value = _lookup(raw, placeholder.path)
    if value is _MISSING:
        return Refusal("null", name, f"{name} is missing")
    if value is None:
        return Refusal("null", name, f"{name} is null")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    kind = "an object" if isinstance(value, Mapping) else "an array"
    return Refusal("null", name, f"{name} is {kind}, not a single value")


def _unsafe(name: str, value: str, forbidden: frozenset[str]) -> Refusal | None:
    for offset, ch in enumerate(value):
        if ch in forbidden or unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            return Refusal("unsafe", name, f"{name} contains {_describe(ch)} at offset {offset}")
    return None


def render(
    template: Template,
    customer: Customer,
    item: InventoryItem,
    *,
    forbidden: frozenset[str] = frozenset(),
) -> str | Refusal:
    """Render `template` for one customer and item, or say why it must not be sent.

    `forbidden` holds the platform's extra forbidden characters
    (`GameServer.forbidden_in_values`). The first problem in template order
    is returned.
    """
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = _value(part, customer, item)
        if isinstance(value, Refusal):
            return value
        refusal = _unsafe(part.name, value, forbidden)
        if refusal is not None:
            return refusal
        out.append(value)
    return "".join(out)
