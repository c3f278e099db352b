"""The pure functions of daemon.paynow.parse: bodies to JSON to models, cursor checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.models import InventoryItem
from daemon.paynow import MAX_JSON_DEPTH, PayNowBadResponse, StoreItem, parse
from tests.fakes.paynow_store import FakeStore


def bad(words: str) -> pytest.RaisesExc[PayNowBadResponse]:
    return pytest.raises(PayNowBadResponse, match=words)


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


@pytest.fixture
def store() -> FakeStore:
    """A Management fake used only for its builders (it never listens)."""
    return FakeStore()


def raw_items(store: FakeStore, count: int) -> list[dict[str, Any]]:
    customer = store.add_customer(name="Steve")["id"]
    return [store.served_item(store.add_item(customer)["id"]) for _ in range(count)]


# ------------------------------------------------------------------------ JSON


def test_decode() -> None:
    assert parse.decode(b'{"a": [1, {"b": null}]}', "customer") == {"a": [1, {"b": None}]}
    assert parse.decode(nested(MAX_JSON_DEPTH), "customer") == json.loads(nested(MAX_JSON_DEPTH))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "malformed JSON in a body of 0 bytes"),
        (b"{nope}", "malformed JSON"),
        (b"\xff\xfe[]", "malformed JSON"),
        (b'[{"id": "1", "name": "Ste', "truncated JSON"),
        (b'[{"id": "1"}, ', "truncated JSON"),
        (nested(MAX_JSON_DEPTH + 1), f"nested more than {MAX_JSON_DEPTH} levels deep"),
        (nested(100_000), "nested more than"),  # the decoder itself runs out of stack
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested more than"),
        (b"[" * 100_000, "nested more than"),
    ],
)
def test_decode_refuses(body: bytes, words: str) -> None:
    with bad(words) as info:
        parse.decode(body, "inventory page 2 (after=5)")
    assert str(info.value).startswith("PayNow inventory page 2 (after=5): ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("body", "got"), [(b"null", "null"), (b"{}", "an object"), (b'"x"', "a string")]
)
def test_decode_list_wants_an_array(body: bytes, got: str) -> None:
    with bad(f"expected a JSON array, got {got}"):
        parse.decode_list(body, "store items page 1")
    assert parse.decode_list(b"[]", "store items page 1") == []


def test_customer(store: FakeStore) -> None:
    sent = store.served_customer(store.add_customer("both", metadata={"discord": "x#1"})["id"])
    customer = parse.customer(json.dumps(sent).encode(), "customer")
    assert customer.raw == sent and customer.metadata == {"discord": "x#1"}
    with bad("PayNow customer: expected a JSON object, got an array"):
        parse.customer(b"[]", "customer")
    with bad("PayNow customer: failed validation: id: Field required"):
        parse.customer(
            json.dumps({k: v for k, v in sent.items() if k != "id"}).encode(), "customer"
        )


# ---------------------------------------------------------- inventory pages


def test_add_items_validates_onto_the_items_so_far(store: FakeStore) -> None:
    raw = raw_items(store, 5)
    into: list[InventoryItem] = []
    after = parse.add_items(raw[:3], "page 1", None, into)
    assert after == int(raw[2]["id"])
    assert parse.add_items(raw[3:], "page 2", after, into) == int(raw[4]["id"])
    assert [i.raw for i in into] == raw
    assert parse.add_items([], "page 3", after, into) == after


@pytest.mark.parametrize(
    ("page", "words"),
    [
        ([1], "item 0 is a number, not an object"),
        ([{"id": "1"}], "item 0: failed validation: store_id: Field required"),
    ],
)
def test_add_items_refuses_what_is_not_an_item(page: list[Any], words: str) -> None:
    with bad(words):
        parse.add_items(page, "inventory page 1", None, [])


def test_add_items_cursor_checks(store: FakeStore) -> None:
    raw = raw_items(store, 4)
    into: list[InventoryItem] = []
    after = parse.add_items(raw[:2], "page 1", None, into)
    with bad(f"item 0 id {raw[1]['id']} is repeated \\(not after {after}\\): the API ignored"):
        parse.add_items(raw[1:], "page 2", after, into)
    with bad(f"item 1 id {raw[2]['id']} is out of order"):
        parse.add_items([raw[3], raw[2]], "page 2", after, [])


# ---------------------------------------------------------- raw pages (store mode)


def test_check_page_checks_ids_only(store: FakeStore) -> None:
    raw = raw_items(store, 4)
    half_an_item = {"id": raw[3]["id"]}  # not validated here: store_item does that
    assert parse.check_page([*raw[:3], half_an_item], "p1", None, []) == int(raw[3]["id"])
    assert parse.check_page([{"id": 5}, {"id": "6"}], "p1", 4, []) == 6
    assert parse.check_page([], "p2", 4, raw) == 4


def test_check_page_tells_repeated_from_out_of_order(store: FakeStore) -> None:
    raw = raw_items(store, 6)
    first = raw[:3]
    after = int(first[-1]["id"])
    with bad("item 0 id .* is repeated .*: the API ignored the cursor"):
        parse.check_page(first, "p2", after, first)  # the first page again
    with bad("item 2 id .* is repeated"):
        parse.check_page([raw[3], raw[4], raw[4]], "p2", after, first)
    with bad("item 1 id .* is out of order"):
        parse.check_page([raw[4], raw[3]], "p2", after, first)
    with bad("item 0 id .* is out of order"):
        parse.check_page([raw[0]], "p1", int(raw[1]["id"]), [])  # before the start cursor


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"id": True}, "item 0 has no id of 1-20 digits \\(got a boolean\\)"),
        ({"id": "12a"}, "no id of 1-20 digits"),
        ({"id": "١٢"}, "no id of 1-20 digits"),
        ({"id": "1" * 21}, "no id of 1-20 digits"),
        ({"id": 2**64}, "id out of range"),
        ({"id": -1}, "id out of range"),
        ({"id": None}, "got null"),
        ({}, "got null"),
        (["1"], "item 0 is an array, not an object"),
    ],
)
def test_raw_id_refuses(raw: Any, words: str) -> None:
    with bad(words):
        parse.raw_id(raw, "store items page 1", 0)


# ----------------------------------------------------------------- store items


def test_store_item(store: FakeStore) -> None:
    steve = store.add_customer("minecraft", name="Steve", metadata={"rank": "gold"})["id"]
    made = store.add_item(steve, custom_variables={"colour": "teal"}, skip_commands=True)
    raw = store.served_item(made["id"])
    raw["brand_new_field"] = {"x": 1}
    raw["customer"]["loyalty"] = "high"
    got = parse.store_item(raw, "store item")
    assert isinstance(got, StoreItem)
    assert got.item.raw is raw and got.customer.raw is raw["customer"]
    assert got.item.skip_commands is True and got.item.custom_variables == {"colour": "teal"}
    assert got.customer.metadata == {"rank": "gold"} and got.customer.name == "Steve"
    assert got.item.raw["brand_new_field"] == {"x": 1}
    assert got.customer.raw["loyalty"] == "high"


def test_a_storefront_item_has_the_store_fields_defaulted(store: FakeStore) -> None:
    steve = store.add_customer()["id"]
    store.add_item(steve)
    (raw,) = store.storefront_items(steve)
    item = InventoryItem.from_api(raw)
    assert item.skip_commands is False and item.custom_variables is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda r: r.pop("customer"), "customer: expected a JSON object, got null"),
        (lambda r: r.update(customer=[]), "customer: expected a JSON object, got an array"),
        (lambda r: r["customer"].pop("id"), "customer: failed validation: id: Field required"),
        (lambda r: r.pop("state"), "failed validation: state: Field required"),
        (lambda r: r.update(skip_commands="maybe"), "failed validation: skip_commands"),
        (lambda r: r.update(custom_variables={"n": 5}), "failed validation: custom_variables.n"),
        (lambda r: r["customer"].update(id="42"), "its customer is 42, not its customer_id"),
    ],
)
def test_store_item_refuses(store: FakeStore, change: Any, words: str) -> None:
    (raw,) = raw_items(store, 1)
    change(raw)
    with bad(words) as info:
        parse.store_item(raw, f"store item {raw['id']}")
    assert str(info.value).startswith(f"PayNow store item {raw['id']}: ")


def test_store_item_refuses_what_is_not_an_object() -> None:
    with bad("PayNow store item: expected a JSON object, got a string"):
        parse.store_item("item", "store item")
