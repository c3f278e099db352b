"""PayNow's bodies → JSON → models, and the checks of cursor pagination.

Pure functions: no I/O. Anything that is not what the spec says raises
`PayNowBadResponse` with a one-line message naming `what` was read: JSON that
is malformed, truncated or nested deeper than `MAX_JSON_DEPTH` (refused
before anything walks it recursively), the wrong shape, a failed validation,
or a page whose ids do not follow the cursor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import pydantic

from daemon.models import Customer, InventoryItem
from daemon.paynow.errors import PayNowBadResponse, exc_text, one_line

# Real answers nest 4 levels (page, item, embedded customer, its profile).
# Deeper JSON is refused before anything walks it recursively (validation,
# storing it, rendering).
MAX_JSON_DEPTH: Final = 32
_MAX_FLAKE: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class StoreItem:
    """A Management API delivery item: the item, and the customer embedded in
    it (a gift's recipient). Both keep the JSON they were read from (`.raw`)."""

    item: InventoryItem
    customer: Customer


def bad(what: str, detail: str) -> NoReturn:
    raise PayNowBadResponse(f"PayNow {what}: {detail}") from None


def decode(body: bytes, what: str) -> Any:
    """The JSON of a 2xx answer's body."""
    try:
        data = json.loads(body)
    except RecursionError:
        data = _TOO_DEEP
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        kind = "truncated" if _looks_truncated(body, exc) else "malformed"
        bad(what, f"{kind} JSON in a body of {len(body)} bytes ({one_line(str(exc), 80)})")
    if data is _TOO_DEEP or _nested_deeper(data, MAX_JSON_DEPTH):
        bad(
            what,
            f"JSON nested more than {MAX_JSON_DEPTH} levels deep in a body of {len(body)} bytes",
        )
    return data


def decode_list(body: bytes, what: str) -> list[Any]:
    """The JSON array of a listing page."""
    data = decode(body, what)
    if not isinstance(data, list):
        bad(what, f"expected a JSON array, got {json_type(data)}")
    return data


def customer(body: bytes, what: str) -> Customer:
    """The Customer a body holds."""
    data = decode(body, what)
    if not isinstance(data, dict):
        bad(what, f"expected a JSON object, got {json_type(data)}")
    try:
        return Customer.from_api(data)
    except (pydantic.ValidationError, ValueError, TypeError) as exc:
        bad(what, validation_summary(exc))


def add_items(
    data: list[Any], what: str, after: int | None, into: list[InventoryItem]
) -> int | None:
    """Validate a page of inventory items onto `into` (the items of the pages
    before it); return the id of its last item. Each id must follow `after`
    (the cursor the page was asked for) and the one before it."""
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            bad(what, f"item {index} is {json_type(raw)}, not an object")
        try:
            item = InventoryItem.from_api(raw)
        except (pydantic.ValidationError, ValueError, TypeError) as exc:
            bad(what, f"item {index}: {validation_summary(exc)}")
        item_id = int(item.id)
        if after is not None and item_id <= after:
            repeated = any(i.id == item.id for i in into)
            _cursor_ignored(what, index, item.id, after, repeated)
        after = item_id
        into.append(item)
    return after


def check_page(data: list[Any], what: str, after: int | None, previous: list[Any]) -> int | None:
    """Check a page of raw items (not validated) follows the cursor: each an
    object whose id follows `after` and the one before it. `previous` is the
    page before (to tell a repeated id from one out of order). Returns the
    id of the page's last item."""
    for index, raw in enumerate(data):
        item_id = raw_id(raw, what, index)
        if after is not None and item_id <= after:
            seen = {raw_id(r, what, i) for i, r in enumerate(previous)}
            seen.update(raw_id(r, what, i) for i, r in enumerate(data[:index]))
            _cursor_ignored(what, index, str(item_id), after, item_id in seen)
        after = item_id
    return after


def raw_id(raw: Any, what: str, index: int) -> int:
    """The id of item `index` of a page, as an int (ids are 64-bit flakes,
    sent as strings of digits)."""
    if not isinstance(raw, dict):
        bad(what, f"item {index} is {json_type(raw)}, not an object")
    value = raw.get("id")
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        bad(what, f"item {index} has no id of 1-20 digits (got {json_type(value)})")
    if not 0 <= number <= _MAX_FLAKE:
        bad(what, f"item {index} has an id out of range")
    return number


def store_item(raw: Any, what: str) -> StoreItem:
    """Validate a Management API item and the customer embedded in it."""
    if not isinstance(raw, dict):
        bad(what, f"expected a JSON object, got {json_type(raw)}")
    try:
        item = InventoryItem.from_api(raw)
    except (pydantic.ValidationError, ValueError, TypeError) as exc:
        bad(what, validation_summary(exc))
    embedded = raw.get("customer")
    if not isinstance(embedded, dict):
        bad(what, f"customer: expected a JSON object, got {json_type(embedded)}")
    try:
        owner = Customer.from_api(embedded)
    except (pydantic.ValidationError, ValueError, TypeError) as exc:
        bad(what, f"customer: {validation_summary(exc)}")
    if owner.id != item.customer_id:
        bad(what, f"its customer is {owner.id}, not its customer_id {item.customer_id}")
    return StoreItem(item, owner)


def _cursor_ignored(what: str, index: int, item_id: str, after: int, repeated: bool) -> NoReturn:
    problem = "repeated" if repeated else "out of order"
    bad(
        what,
        f"item {index} id {item_id} is {problem} (not after {after}): the API ignored the cursor",
    )


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "a number"


def validation_summary(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if errors:
            first = errors[0]
            loc = ".".join(str(part) for part in first.get("loc", ())) or "(root)"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            return f"failed validation: {loc}: {one_line(str(first.get('msg', '')), 120)}{more}"
    return f"failed validation: {exc_text(exc)}"


def _looks_truncated(body: bytes, exc: ValueError) -> bool:
    """Did the JSON text end too early (as opposed to being garbage)? `exc` is
    what decoding it raised."""
    if not isinstance(exc, json.JSONDecodeError) or not body.strip():
        return False
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(body.rstrip())


# What `decode` holds when the decoder itself ran out of stack.
_TOO_DEEP: Final = object()
_CONTAINERS: Final = (dict, list)


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether decoded JSON nests more than `limit` arrays and objects deep.
    Level by level, without recursion (it guards what recurses)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level:
            return False
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in _CONTAINERS
        ]
    return bool(level)
