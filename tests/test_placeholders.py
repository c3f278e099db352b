"""Tests of command templates: parsing, rendering and the hostile-value corpus."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.models import CUSTOMER_FIELDS, ITEM_FIELDS, Customer, InventoryItem
from daemon.placeholders import (
    PLACEHOLDERS,
    Refusal,
    Template,
    TemplateError,
    parse_template,
    render,
    steam_id2,
    steam_id3,
)
from tests import conftest
from tests.conftest import MINECRAFT_CUSTOMER, STEAM_CUSTOMER, customer_data

SOURCE = frozenset({";", '"'})  # SourceServer.forbidden_in_values
MINECRAFT: frozenset[str] = frozenset()

# The Steam customer of these tests: Rabscuttle, whose Steam id converts to small numbers.
RABSCUTTLE = customer_data(
    STEAM_CUSTOMER,
    profile={"id": "76561197960287930", "platform": "steam", "name": "Rabscuttle"},
    steam_id="76561197960287930",
    steam={
        "id": "76561197960287930",
        "name": "Rabscuttle",
        "avatar_url": "https://avatars.akamai.steamstatic.com/c5d56249ee5d28a07db4ac9f7f60af961fab5426_full.jpg",
    },
    name="Rabscuttle",
    created_at="2023-04-13T19:51:02.162046Z",
    updated_at="2023-04-13T19:55:13.122010Z",
)


def customer(base: Mapping[str, Any] = RABSCUTTLE, **changes: Any) -> Customer:
    return conftest.customer(base, **changes)


def item(**changes: Any) -> InventoryItem:
    """An active banana (the seed's example item)."""
    return conftest.item(slug="banana", **changes)


def named(name: str) -> Customer:
    return customer(name=name)


def render_name(name: str, forbidden: frozenset[str] = MINECRAFT) -> str | Refusal:
    return render(parse_template("say {customer.name}"), named(name), item(), forbidden=forbidden)


# ===================================================================== parsing


def test_parse_plain_template() -> None:
    template = parse_template("lp user {customer.minecraft_uuid} parent add {product.slug}")
    assert isinstance(template, Template)
    assert template.text == "lp user {customer.minecraft_uuid} parent add {product.slug}"
    assert template.placeholders == ("customer.minecraft_uuid", "product.slug")


def test_placeholders_are_listed_once_in_order_of_first_use() -> None:
    template = parse_template("{item.id} {customer.id} {item.id} {item.product.slug}")
    assert template.placeholders == ("item.id", "customer.id", "item.product.slug")


def test_template_without_placeholders() -> None:
    template = parse_template("sm_reloadadmins")
    assert template.placeholders == ()
    assert render(template, customer(), item()) == "sm_reloadadmins"


def test_every_documented_field_parses() -> None:
    names = (
        [f"customer.{f}" for f in CUSTOMER_FIELDS]
        + [f"item.{f}" for f in ITEM_FIELDS]
        + [f[len("item.") :] for f in (f"item.{f}" for f in ITEM_FIELDS) if "product." in f]
        + ["customer.steam_id2", "customer.steam_id3"]
    )
    for name in names:
        assert parse_template("{" + name + "}").placeholders == (name,)
    assert set(names) == PLACEHOLDERS


def test_literal_braces() -> None:
    template = parse_template('tellraw @a {{"text":"{customer.name}"}}')
    assert template.placeholders == ("customer.name",)
    assert render(template, customer(), item()) == 'tellraw @a {"text":"Rabscuttle"}'


def test_literal_braces_around_a_placeholder() -> None:
    template = parse_template("{{{customer.id}}}")
    assert render(template, customer(), item()) == "{150352880618967040}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lp user {customer.nmae} x", "unknown placeholder {customer.nmae}"),
        ("{customer.nmae}", "(did you mean {customer.name}?)"),
        ("{product.slg}", "(did you mean {product.slug}?)"),
        ("{item.revoke_reasn}", "(did you mean {item.revoke_reason}?)"),
        ("{user.name}", "unknown placeholder {user.name}"),
        ("{customer}", "unknown placeholder {customer}"),
        ("{customer.steam}", "unknown placeholder {customer.steam}"),  # not a leaf
        ("{customer.metadata}", "unknown placeholder {customer.metadata}"),
        ("{customer.name.upper}", "unknown placeholder {customer.name.upper}"),
        ("{customer.__class__}", "unknown placeholder {customer.__class__}"),
        ("{0}", "unknown placeholder {0}"),
        ("{}", "empty placeholder {}"),
        ("{ }", "empty placeholder { }"),
        ("{customer.name!r}", "{customer.name!r}"),
        ("{customer.name!s}", "conversions are not supported"),
        ("{customer.name:>10}", "{customer.name:>10}"),
        ("{customer.name:>10}", "format specs are not supported"),
        ("{customer.name[0]}", "{customer.name[0]}"),
        ("{customer.name[0]}", "index syntax is not supported"),
        ("{item.product[slug]}", "{item.product[slug]}"),
        ("say {customer.name", "unclosed '{' at offset 4: {customer.name"),
        ("say {customer.{name}", "unclosed '{' at offset 4: {customer.{name}"),
        ("say }", "unmatched '}' at offset 4"),
        ("{customer.name}}", "unmatched '}' at offset 15"),
        ("{", "unclosed '{'"),
        ("}", "unmatched '}'"),
    ],
)
def test_parse_errors_name_the_placeholder(text: str, expected: str) -> None:
    with pytest.raises(TemplateError) as raised:
        parse_template(text)
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_placeholder_without_close_match_suggests_nothing() -> None:
    with pytest.raises(TemplateError) as raised:
        parse_template("{zzzzzzzz}")
    assert str(raised.value) == "unknown placeholder {zzzzzzzz}"


def test_error_messages_never_contain_raw_control_or_format_characters() -> None:
    with pytest.raises(TemplateError) as raised:
        parse_template("{customer.\x1b[31mname}")
    assert str(raised.value).isprintable()
    assert "an escape (ESC) (U+001B)" in str(raised.value)
    with pytest.raises(TemplateError) as raised:
        parse_template("{customer.\u202ename}")
    assert str(raised.value).isprintable()
    assert "unknown placeholder {customer.\\u202ename}" in str(raised.value)


@pytest.mark.parametrize("text", ["op x\n", "say a\r\nop b", "say \x00", "say \u2028", "a\tb"])
def test_templates_are_one_line(text: str) -> None:
    with pytest.raises(TemplateError, match="a command is one line"):
        parse_template(text)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


# =================================================================== rendering


def test_render_customer_item_and_product_fields() -> None:
    template = parse_template(
        "give {customer.steam.name} {item.product.slug} {product.name} "
        "{item.quantity_index} {item.gift} {item.expirable} {customer.steam_id}"
    )
    assert render(template, customer(), item()) == (
        "give Rabscuttle banana Banana 1 false true 76561197960287930"
    )


def test_render_minecraft_customer() -> None:
    template = parse_template("lp user {customer.minecraft_uuid} parent add vip")
    assert render(template, customer(MINECRAFT_CUSTOMER), item()) == (
        "lp user 069a79f4-44e9-4726-a5be-fca90e38aaf5 parent add vip"
    )


def test_values_render_exactly_as_the_api_spelled_them() -> None:
    # Timestamps keep the API's spelling (5 fractional digits here).
    template = parse_template("{item.active_at} {customer.created_at}")
    assert render(template, customer(), item()) == (
        "2023-04-11T21:52:53.66545Z 2023-04-13T19:51:02.162046Z"
    )


def test_integer_flakes_render_as_decimal() -> None:
    # The models accept ids sent as JSON numbers; the raw value is rendered.
    rendered = render(parse_template("{item.id}"), customer(), item(id=149643503939362817))
    assert rendered == "149643503939362817"


def test_render_revoke_reason() -> None:
    template = parse_template("say revoked ({item.revoke_reason})")
    revoked = item(state="revoked", revoked_at="2023-04-12T00:00:00Z", revoke_reason="chargeback")
    assert render(template, customer(), revoked) == "say revoked (chargeback)"


def test_value_is_inserted_once_never_expanded() -> None:
    for name in ("{customer.id}", "{{customer.id}}", "{product.slug}", "{", "}}"):
        assert render_name(name) == f"say {name}"


@pytest.mark.parametrize(
    "payload",
    ["%s%s%n", "{}", "{0}", "$(rm -rf /)", "`id`", "&& op me", "| nc x 1", "\\n", "${HOME}"],
)
def test_shell_and_format_payloads_are_just_text(payload: str) -> None:
    # RCON is not a shell: these are inert and rendered as they are.
    assert render_name(payload, SOURCE) == f"say {payload}"


@pytest.mark.parametrize("name", ["Rabscuttle😀", "李小龙", "Ünïcødé", "خالد", "🎮🔥", "a\ufe0fb"])
def test_emoji_and_cjk_names_are_allowed(name: str) -> None:
    assert render_name(name, SOURCE) == f"say {name}"


# ------------------------------------------------------------------ null/missing


def test_null_value_is_refused_as_null() -> None:
    result = render(
        parse_template("lp user {customer.minecraft_uuid} parent add vip"),
        customer(minecraft_uuid=None),
        item(),
    )
    assert result == Refusal("null", "customer.minecraft_uuid", "customer.minecraft_uuid is null")


def test_missing_value_is_refused_as_null() -> None:
    # STEAM_CUSTOMER has no "minecraft" key at all.
    result = render(parse_template("{customer.minecraft.name}"), customer(), item())
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("null", "customer.minecraft.name")
    assert "missing" in result.reason


def test_null_parent_object_is_refused_as_null() -> None:
    result = render(parse_template("{customer.steam.name}"), customer(MINECRAFT_CUSTOMER), item())
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("null", "customer.steam.name")


def test_object_or_array_where_a_value_was_expected_is_null() -> None:
    odd = customer(name=None)
    odd.raw["name"] = {"first": "Rab"}
    result = render(parse_template("say {customer.name}"), odd, item())
    assert isinstance(result, Refusal) and result.kind == "null"
    odd.raw["name"] = ["Rab"]
    result = render(parse_template("say {customer.name}"), odd, item())
    assert isinstance(result, Refusal) and result.kind == "null"


def test_revoke_reason_is_null_on_items_not_revoked() -> None:
    result = render(parse_template("say {item.revoke_reason}"), customer(), item())
    assert result == Refusal("null", "item.revoke_reason", "item.revoke_reason is null")


def test_empty_string_is_not_null() -> None:
    assert render_name("") == "say "


def test_first_problem_in_template_order_is_reported() -> None:
    template = parse_template("{customer.name} {customer.minecraft_uuid}")
    result = render(template, named("a\nb"), item())
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("unsafe", "customer.name")


# ====================================================================== SteamIDs


@pytest.mark.parametrize(
    ("steam64", "id2", "id3"),
    [
        ("76561197960287930", "STEAM_0:0:11101", "[U:1:22202]"),
        ("76561197960265729", "STEAM_0:1:0", "[U:1:1]"),
        ("76561197960265730", "STEAM_0:0:1", "[U:1:2]"),
        ("76561198000000000", "STEAM_0:0:19867136", "[U:1:39734272]"),
        ("76561202255233023", "STEAM_0:1:2147483647", "[U:1:4294967295]"),
        (76561197960287930, "STEAM_0:0:11101", "[U:1:22202]"),
    ],
)
def test_steam_id_conversions(steam64: str | int, id2: str, id3: str) -> None:
    assert steam_id2(steam64) == id2
    assert steam_id3(steam64) == id3


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "abc",
        "STEAM_0:0:11101",
        "76561197960265728",  # account 0
        "76561202255233024",  # account number overflows into the instance
        "103582791429521412",  # a group (type 7), not an individual
        "90071996842377216",  # universe 1, type 1, instance 0
        "7656119796028793O",
        " 76561197960287930",
        "76561197960287930\n",
        "+76561197960287930",
        "７６５６１１９７９６０２８７９３０",  # fullwidth digits
        "-1",
        "1",
        "999999999999999999999999",
        True,
        1.5,
    ],
)
def test_steam_id_conversions_of_garbage_are_none(garbage: Any) -> None:
    assert steam_id2(garbage) is None
    assert steam_id3(garbage) is None


def test_steam_id_placeholders_render() -> None:
    template = parse_template("sm_addvip {customer.steam_id2} {customer.steam_id3}")
    assert render(template, customer(), item(), forbidden=SOURCE) == (
        "sm_addvip STEAM_0:0:11101 [U:1:22202]"
    )


def test_steam_id_placeholders_are_null_without_a_steam_id() -> None:
    template = parse_template("sm_addvip {customer.steam_id2}")
    result = render(template, customer(MINECRAFT_CUSTOMER), item())
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("null", "customer.steam_id2")


def test_steam_id_placeholders_are_null_for_an_invalid_steam_id() -> None:
    template = parse_template("sm_addvip {customer.steam_id3}")
    result = render(template, customer(steam_id="103582791429521412"), item())
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("null", "customer.steam_id3")


# ============================================================== hostile corpus

# (value, substring the reason must contain)
ALWAYS_REFUSED = [
    ("evil\nop Notch", "a newline (U+000A)"),
    ("evil\r\nop Notch", "a carriage return (U+000D)"),
    ("evil\rop Notch", "a carriage return (U+000D)"),
    ("evil\x00op", "a NUL (U+0000)"),
    ("\x1b[2J\x1b[31mred", "an escape (ESC) (U+001B)"),
    ("a\x7fb", "a DEL (U+007F)"),
    ("a\tb", "a tab (U+0009)"),
    ("a\x07b", "a control character (U+0007)"),
    ("a\x9bb", "a control character (U+009B)"),  # C1 CSI
    ("a\x85b", "a next-line (NEL) (U+0085)"),
    ("a\u2028op Notch", "a line separator LINE SEPARATOR (U+2028)"),
    ("a\u2029op Notch", "a paragraph separator PARAGRAPH SEPARATOR (U+2029)"),
    ("a\u202egnp.exe", "RIGHT-TO-LEFT OVERRIDE (U+202E)"),
    ("a\u2066b\u2069", "LEFT-TO-RIGHT ISOLATE (U+2066)"),
    ("No\u200btch", "ZERO WIDTH SPACE (U+200B)"),
    ("👨\u200d👩\u200d👧", "ZERO WIDTH JOINER (U+200D)"),
    ("\ufeffNotch", "ZERO WIDTH NO-BREAK SPACE (U+FEFF)"),
    ("No\u00adtch", "SOFT HYPHEN (U+00AD)"),
    ("a\ud800b", "a lone surrogate (U+D800)"),
]


@pytest.mark.parametrize(("value", "described"), ALWAYS_REFUSED)
@pytest.mark.parametrize("forbidden", [MINECRAFT, SOURCE], ids=["minecraft", "source"])
def test_hostile_values_are_refused_everywhere(
    value: str, described: str, forbidden: frozenset[str]
) -> None:
    result = render_name(value, forbidden)
    assert isinstance(result, Refusal)
    assert result.kind == "unsafe"
    assert result.placeholder == "customer.name"
    assert result.reason.startswith("customer.name contains ")
    assert described in result.reason
    assert_log_safe(result.reason, value)


def assert_log_safe(reason: str, value: str) -> None:
    """One printable ASCII line, short, pointing at the first offending character."""
    assert reason.isascii() and reason.isprintable(), repr(reason)
    assert len(reason) < 160
    if len(value) > 3:
        assert value not in reason


@pytest.mark.parametrize(
    ("value", "described"),
    [
        ("x; sm_ban Someone", "';' (U+003B)"),
        ('x" ; quit; "', "'\"' (U+0022)"),
        ('Rab"scuttle', "'\"' (U+0022)"),
    ],
)
def test_semicolon_and_double_quote_are_refused_on_source(value: str, described: str) -> None:
    result = render_name(value, SOURCE)
    assert isinstance(result, Refusal)
    assert result.kind == "unsafe"
    assert described in result.reason
    assert_log_safe(result.reason, value)


@pytest.mark.parametrize("value", ["x; sm_ban Someone", 'Rab"scuttle', "O'Brien", "`quoted`"])
def test_quotes_and_semicolons_are_allowed_on_minecraft(value: str) -> None:
    # One command per RCON packet: ';' and '"' cannot start another command.
    assert render_name(value, MINECRAFT) == f"say {value}"


def test_single_quote_is_allowed_on_source() -> None:
    assert render_name("O'Brien", SOURCE) == "say O'Brien"


def test_fullwidth_semicolon_is_allowed_on_source() -> None:
    # U+FF1B is EF BC 9B in UTF-8: no byte of it is ';' (0x3B), so Source's
    # command splitter cannot see a separator; it is an ordinary character.
    value = "evil\uff1b sm_ban Someone"
    assert b";" not in value.encode("utf-8")
    assert render_name(value, SOURCE) == f"say {value}"


def test_unsafe_offset_points_at_the_first_offending_character() -> None:
    result = render_name("abc;d\ne", SOURCE)
    assert isinstance(result, Refusal)
    assert result.reason == "customer.name contains ';' (U+003B) at offset 3"


def test_refusal_reason_does_not_repeat_the_value() -> None:
    value = "Notch\nop EvilGuy please_log_me"
    result = render_name(value)
    assert isinstance(result, Refusal)
    assert "EvilGuy" not in result.reason
    assert "please_log_me" not in result.reason


def test_ten_kilobyte_value_renders_here() -> None:
    # Length limits are the adapter's (CommandTooLong), not the renderer's.
    big = "A" * 10_240
    assert render_name(big, SOURCE) == f"say {big}"
    hostile = big + "\n"
    result = render_name(hostile, SOURCE)
    assert isinstance(result, Refusal)
    assert result.reason == "customer.name contains a newline (U+000A) at offset 10240"


def test_unsafe_item_value_is_refused() -> None:
    odd = item()
    odd.raw["product"]["name"] = "Banana\nop me"
    result = render(parse_template("say {product.name}"), customer(), odd)
    assert isinstance(result, Refusal)
    assert (result.kind, result.placeholder) == ("unsafe", "product.name")


def test_operator_text_is_not_checked_against_forbidden() -> None:
    # The operator may chain commands on Source; only values are restricted.
    template = parse_template("sm_addvip {customer.steam_id2}; sm_reloadadmins")
    assert render(template, customer(), item(), forbidden=SOURCE) == (
        "sm_addvip STEAM_0:0:11101; sm_reloadadmins"
    )


# ================================================================== properties

REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def bad(ch: str, forbidden: frozenset[str]) -> bool:
    return ch in forbidden or unicodedata.category(ch) in REFUSED_CATEGORIES


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(
        st.characters(codec=None)
        | st.sampled_from(';"\n\r\x00\x1b\x7f\x85\u2028\u2029\u202e\u200d\uff1b{}'),
        max_size=40,
    ),
    platform=st.sampled_from([MINECRAFT, SOURCE]),
)
def test_any_value_is_refused_or_rendered_safely(value: str, platform: frozenset[str]) -> None:
    template = parse_template("say [{customer.name}] {{x}}")
    result = render(template, named(value), item(), forbidden=platform)
    if isinstance(result, Refusal):
        assert result.kind == "unsafe"
        assert result.placeholder == "customer.name"
        first = next(i for i, ch in enumerate(value) if bad(ch, platform))
        assert result.reason.endswith(f" at offset {first}")
        assert_log_safe(result.reason, value)
    else:
        # Rendered verbatim, exactly once, and nothing dangerous came with it.
        assert result == f"say [{value}] {{x}}"
        inserted = result[len("say [") : len(result) - len("] {x}")]
        assert inserted == value
        for ch in inserted:
            assert unicodedata.category(ch) not in {"Cc", "Zl", "Zp"}
            assert ch not in platform
        assert not any(bad(ch, platform) for ch in value)
