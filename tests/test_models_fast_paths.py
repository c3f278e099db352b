"""The fast paths of daemon/models.py behave exactly like the general ones.

Every item of every pass is validated, so `parse_timestamp` parses the usual
shape with `datetime.fromisoformat`, flakes are checked inside pydantic-core,
and the raw JSON is kept without a declared private attribute (see the
benchmarks, bench/). These tests pin what must not change with them.
"""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.models import Customer, InventoryItem, parse_timestamp

SEED_ITEM: dict[str, Any] = {
    "id": "411486491630370816",
    "store_id": "411486491630370816",
    "customer_id": "411486491630370816",
    "order_id": "411486491630370816",
    "order_line_id": "411486491630370817",
    "subscription_id": None,
    "execute_on_gameserver_id": None,
    "quantity_index": 0,
    "product": {
        "id": "411486491630370816",
        "version_id": "411486491630370816",
        "slug": "vip",
        "name": "VIP",
    },
    "state": "active",
    "expirable": False,
    "gift": False,
    "added_at": "2024-08-29T21:52:53.66545Z",
    "active_at": "2024-08-29T21:52:53.66545Z",
    "expires_at": None,
    "override_expires_at": None,
    "removed_at": None,
    "revoked_at": None,
    "revoke_reason": None,
}


def _text(moment: datetime, digits: int, sep: str, zone: str) -> str:
    fraction = f"{moment.microsecond:06d}{moment.microsecond % 1000:03d}"[:digits]
    text = moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
    return text + (f".{fraction}" if digits else "") + zone


@given(
    moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
    digits=st.integers(0, 9),
    sep=st.sampled_from(["T", "t", " "]),
    offset_minutes=st.integers(-23 * 60 - 59, 23 * 60 + 59),
    zone_form=st.sampled_from(["Z", "z", "+hh:mm", "+hhmm"]),
)
def test_parse_timestamp_is_the_instant_whatever_the_form(
    moment: datetime, digits: int, sep: str, offset_minutes: int, zone_form: str
) -> None:
    if zone_form in ("Z", "z"):
        zone, offset = zone_form, timedelta(0)
    else:
        offset = timedelta(minutes=offset_minutes)
        sign = "-" if offset_minutes < 0 else "+"
        hours, minutes = divmod(abs(offset_minutes), 60)
        zone = f"{sign}{hours:02d}:{minutes:02d}" if zone_form == "+hh:mm" else (
            f"{sign}{hours:02d}{minutes:02d}"
        )  # fmt: skip
    text = _text(moment, digits, sep, zone)
    kept = int(f"{moment.microsecond:06d}"[:digits].ljust(6, "0")) if digits else 0
    expected = (moment.replace(microsecond=kept) - offset).replace(tzinfo=UTC)
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2024-08-29",  # a date: fromisoformat takes it, we do not
        "2024-08-29T21:52:53",  # no zone
        "2024-W35-4T21:52:53Z",  # a week date
        "20240829T215253Z",  # the basic format
        "2024-08-29T21:52Z",  # no seconds
        "2024-08-29T21:52:53.Z",
        "2024-08-29T21:52:53,5Z",
        "2024-08-29T21:52:53.1234567890Z",  # 10 digits
        "2024-08-29T21:52:53+05",
        "2024-08-29T21:52:53+05:30:10",
        "2024-08-29T25:52:53Z",
        "2024-02-30T21:52:53Z",
        "",
    ],
)
def test_parse_timestamp_refuses_what_is_not_a_timestamp(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_flakes_accept_integers_and_refuse_the_rest() -> None:
    item = InventoryItem.from_api({**SEED_ITEM, "id": 411486491630370999})
    assert item.id == "411486491630370999"
    for bad in (True, 1.5, 12.0, "١٢", "12a", "", "1" * 21, None, -5):
        with pytest.raises(pydantic.ValidationError):
            InventoryItem.from_api({**SEED_ITEM, "id": bad})


def test_raw_is_the_dict_sent_and_survives_copies() -> None:
    raw = {**SEED_ITEM, "brand_new_field": [1, 2]}
    item = InventoryItem.from_api(raw)
    assert item.raw is raw
    for other in (copy.copy(item), copy.deepcopy(item), item.model_copy()):
        assert other.raw == raw
    assert pickle.loads(pickle.dumps(item)).raw == raw
    assert item == InventoryItem.from_api(dict(raw))
    assert item != InventoryItem.from_api({**raw, "brand_new_field": [3]})
    assert InventoryItem.model_validate(raw).raw == {}  # not read through from_api
    customer_raw = {"id": "1", "store_id": "2", "name": "Steve", "created_at": None}
    customer = Customer.from_api(customer_raw)
    assert customer.raw is customer_raw


def test_offsets_are_converted_to_utc() -> None:
    parsed = parse_timestamp("2024-08-29T21:52:53.5+05:30")
    assert parsed == datetime(2024, 8, 29, 16, 22, 53, 500000, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)
