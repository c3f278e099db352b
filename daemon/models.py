"""Pydantic models of the PayNow objects perksync reads (Storefront and Management).

They follow the seed documentation and the newer OpenAPI spec. Unknown extra
fields are tolerated (PayNow adds fields over time) and an unknown item state is
kept as a plain string rather than rejected, so that a new state never crashes
a pass; the diff decides what (not) to do with it.

Placeholders render from the raw JSON the API sent (see `raw`), so they name
fields exactly as the API spells them; these models are the validation and the
typed view used for decisions.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Item states known to the spec. Anything else is kept and treated as "unknown".
KNOWN_STATES: Final = frozenset({"usable", "active", "used", "revoked", "renewed"})

_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:?\d{2})$"
)
# The shape the API sends: `T`, 0-6 fractional digits, `Z` or `+hh:mm`, ASCII
# digits only. `datetime.fromisoformat` parses exactly this the same way.
_CANONICAL = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO 8601 timestamp with 0-9 fractional digits into an aware UTC datetime.

    `datetime.fromisoformat` rejects more than 6 fractional digits on some
    versions, and the API sends anything from none to nanoseconds; it also
    accepts forms that are not timestamps (a bare date, week dates, no zone).
    So it only parses what `_CANONICAL` has checked is the usual shape (about
    5x faster than the general path: every item of every pass goes through
    here); the general path handles the rest.
    """
    if _CANONICAL.fullmatch(text):
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    match = _TIMESTAMP.match(text)
    if match is None:
        raise ValueError(f"not an ISO 8601 timestamp: {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    if zone in ("Z", "z"):
        offset = timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    naive = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro)
    return (naive - offset).replace(tzinfo=UTC)


def encodable(text: str) -> str:
    """`text` as it can be stored and logged: each lone surrogate (JSON can
    carry one, as `"\\ud800"`; UTF-8, and so SQLite, cannot) written as that
    JSON escape. Anything else is kept as sent."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def _flake(value: Any) -> Any:
    # Flakes are 64-bit integers sent as strings; accept a bare integer too.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and not value.isascii():
        raise ValueError("id must be ASCII digits")
    return value


def _timestamp(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("timestamp must be a string")
    parse_timestamp(value)
    return value


# Validated inside pydantic-core (no Python call per field: a page of 100 items
# has about 900 flakes): a bare integer becomes its decimal string, anything
# else but a string of 1-20 ASCII digits is refused.
Flake = Annotated[str, Field(pattern=r"^[0-9]{1,20}$", coerce_numbers_to_str=True)]
# The constraint must sit on the `str` branch: on `str | None` pydantic raises a
# TypeError (not a ValidationError) when the API sends null.
OptionalFlake = Flake | None
Timestamp = Annotated[str, BeforeValidator(_timestamp)]
OptionalTimestamp = Annotated[str | None, BeforeValidator(_timestamp)]


class _ApiObject(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class SteamProfile(_ApiObject):
    id: Annotated[str, BeforeValidator(_flake)]
    name: str | None = None
    avatar_url: str | None = None


class MinecraftProfile(_ApiObject):
    id: str
    name: str | None = None
    avatar_url: str | None = None


class GenericProfile(_ApiObject):
    id: str
    platform: str
    name: str | None = None
    avatar_url: str | None = None


class _RawApiObject(_ApiObject):
    """A top-level API object that keeps the JSON it was read from.

    The JSON lives in the model's private storage (`__pydantic_private__`,
    where a `PrivateAttr`'s value would be) without a declared private
    attribute: for a model that declares one, pydantic runs
    `init_private_attributes` on every validation (about 4.5 µs, a fifth of
    validating an item; every item of every pass is validated) only for
    `from_api` to replace its default at once. Copies, pickling and equality
    treat that storage as they treat a declared private attribute's.
    """

    @property
    def raw(self) -> dict[str, Any]:
        """The JSON object exactly as the API sent it (for placeholders)."""
        private = self.__pydantic_private__
        raw: dict[str, Any] = private["_raw"] if private else {}
        return raw

    @classmethod
    def from_api(cls, data: Any) -> Self:
        obj = cls.model_validate(data)
        object.__setattr__(obj, "__pydantic_private__", {"_raw": data})
        return obj


class Customer(_RawApiObject):
    id: Flake
    store_id: Flake
    profile: GenericProfile | None = None
    steam_id: Annotated[str | None, BeforeValidator(_flake)] = None
    steam: SteamProfile | None = None
    minecraft_uuid: str | None = None
    minecraft: MinecraftProfile | None = None
    minecraft_platform: str | None = None
    xbox_xuid: str | None = None
    name: str | None = None
    created_at: OptionalTimestamp = None
    updated_at: OptionalTimestamp = None
    metadata: dict[str, str] | None = None


class PartialProduct(_ApiObject):
    id: Flake
    store_id: OptionalFlake = None
    version_id: str
    slug: str
    name: str


class InventoryItem(_RawApiObject):
    id: Flake
    store_id: Flake
    customer_id: Flake
    order_id: OptionalFlake = None
    order_line_id: OptionalFlake = None
    subscription_id: OptionalFlake = None
    execute_on_gameserver_id: OptionalFlake = None
    quantity_index: int | None = None
    product: PartialProduct
    state: str
    expirable: bool
    gift: bool
    added_at: Timestamp
    active_at: OptionalTimestamp = None
    expires_at: OptionalTimestamp = None
    override_expires_at: OptionalTimestamp = None
    removed_at: OptionalTimestamp = None
    revoked_at: OptionalTimestamp = None
    revoke_reason: str | None = None
    # Sent by the Management API (store mode) only.
    skip_commands: bool = False  # run nothing for this item
    custom_variables: dict[str, str] | None = None  # the buyer's checkout choices


# Placeholder paths that exist on every Customer / InventoryItem, as the API
# spells them. Config validation checks every `{customer.X}` / `{item.X}` against
# these; only leaves (strings, numbers, booleans) can be placeholders.
CUSTOMER_FIELDS: Final = frozenset(
    {
        "id", "store_id", "steam_id", "minecraft_uuid", "minecraft_platform", "xbox_xuid",
        "name", "created_at", "updated_at",
        "profile.id", "profile.platform", "profile.name", "profile.avatar_url",
        "steam.id", "steam.name", "steam.avatar_url",
        "minecraft.id", "minecraft.name", "minecraft.avatar_url",
    }
)  # fmt: skip
ITEM_FIELDS: Final = frozenset(
    {
        "id", "store_id", "customer_id", "order_id", "order_line_id", "subscription_id",
        "execute_on_gameserver_id", "quantity_index", "state", "expirable", "gift",
        "added_at", "active_at", "expires_at", "override_expires_at", "removed_at",
        "revoked_at", "revoke_reason",
        "product.id", "product.store_id", "product.version_id", "product.slug", "product.name",
    }
)  # fmt: skip
