"""Example tests of `diff_inventory`, one or more per rule of when commands run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from daemon.diff import DiffResult, EventKind, Mark, MarkKey, Phase, ProductRules, diff_inventory
from tests.conftest import ITEM_A, ITEM_B, ITEM_C, by_product, item

VIP_ON_SURVIVAL = by_product({"vip": ["survival"]})


def granted(*keys: MarkKey) -> dict[MarkKey, Mark]:
    return {key: Mark(Phase.GRANTED, 1) for key in keys}


def kinds(result: DiffResult) -> list[tuple[str, str, EventKind]]:
    return [(e.item.id, e.server, e.kind) for e in result.events]


# --------------------------------------------------------------------- grants


def test_first_seen_active_is_granted() -> None:
    result = diff_inventory({}, set(), [item(state="active")], VIP_ON_SURVIVAL)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.GRANTED, 1)}
    assert result.events[0].cycle == 1
    assert result.events[0].happened_at == datetime(2023, 4, 11, 21, 52, 53, 665450, tzinfo=UTC)


def test_first_seen_renewed_is_granted_like_active() -> None:
    result = diff_inventory({}, set(), [item(state="renewed")], VIP_ON_SURVIVAL)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
    assert result.marks == granted((ITEM_A, "survival"))


def test_active_then_active_again_runs_nothing() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="active")], VIP_ON_SURVIVAL
    )
    assert result.events == []
    assert result.marks == {}


def test_active_then_renewed_keeps_the_perk() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="renewed")], VIP_ON_SURVIVAL
    )
    assert result.events == []
    assert result.marks == {}


def test_usable_then_active_is_granted() -> None:
    first = diff_inventory({}, set(), [item(state="usable")], VIP_ON_SURVIVAL)
    assert first.events == [] and first.marks == {}
    second = diff_inventory(first.marks, {ITEM_A}, [item(state="active")], VIP_ON_SURVIVAL)
    assert kinds(second) == [(ITEM_A, "survival", EventKind.ACTIVE)]


def test_active_at_missing_falls_back_to_added_at() -> None:
    result = diff_inventory({}, set(), [item(state="active", active_at=None)], VIP_ON_SURVIVAL)
    assert result.events[0].happened_at == datetime(2023, 4, 11, 20, 52, 13, 659206, tzinfo=UTC)


# ---------------------------------------------------------------- end events


def test_active_then_used_expires() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="used")], VIP_ON_SURVIVAL
    )
    assert kinds(result) == [(ITEM_A, "survival", EventKind.EXPIRE)]
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1)}
    assert result.events[0].happened_at == datetime(2023, 5, 11, 21, 53, 55, 763216, tzinfo=UTC)


def test_active_then_revoked_revokes() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="revoked")], VIP_ON_SURVIVAL
    )
    assert kinds(result) == [(ITEM_A, "survival", EventKind.REVOKE)]
    assert result.events[0].item.revoke_reason == "chargeback"
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1)}


def test_end_event_keeps_the_grant_cycle() -> None:
    result = diff_inventory(
        {(ITEM_A, "survival"): Mark(Phase.GRANTED, 3)},
        {ITEM_A},
        [item(state="revoked")],
        VIP_ON_SURVIVAL,
    )
    assert [(e.kind, e.cycle) for e in result.events] == [(EventKind.REVOKE, 3)]
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 3)}


def test_ended_item_runs_nothing_more() -> None:
    ended = {(ITEM_A, "survival"): Mark(Phase.ENDED, 1)}
    for state in ("used", "revoked", "active", "renewed", "usable"):
        result = diff_inventory(ended, {ITEM_A}, [item(state=state)], VIP_ON_SURVIVAL)
        assert result.events == [], state
        assert result.marks == {}, state


def test_used_after_revoke_does_not_also_expire() -> None:
    marks = granted((ITEM_A, "survival"))
    first = diff_inventory(marks, {ITEM_A}, [item(state="revoked")], VIP_ON_SURVIVAL)
    marks = {**marks, **first.marks}
    second = diff_inventory(marks, {ITEM_A}, [item(state="used")], VIP_ON_SURVIVAL)
    assert kinds(first) == [(ITEM_A, "survival", EventKind.REVOKE)]
    assert second.events == []


# ------------------------------------------------------- first seen, no grant


def test_first_seen_used_revoked_or_usable_runs_nothing() -> None:
    for state in ("used", "revoked", "usable"):
        result = diff_inventory({}, set(), [item(state=state)], VIP_ON_SURVIVAL)
        assert result.events == [], state
        assert result.marks == {}, state


def test_seen_usable_then_revoked_runs_nothing() -> None:
    result = diff_inventory({}, {ITEM_A}, [item(state="revoked")], VIP_ON_SURVIVAL)
    assert result.events == []


# ------------------------------------------------------ unknown, disappeared


def test_unknown_state_runs_nothing_and_is_reported() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="suspended")], VIP_ON_SURVIVAL
    )
    assert result.events == []
    assert result.marks == {}
    assert result.unknown_states == [(ITEM_A, "suspended")]
    assert result.disappeared == []


def test_item_missing_from_the_list_is_reported_without_event() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival"), (ITEM_B, "survival")),
        {ITEM_A, ITEM_B},
        [item(ITEM_B, state="active")],
        VIP_ON_SURVIVAL,
    )
    assert result.events == []
    assert result.marks == {}
    assert result.disappeared == [ITEM_A]


def test_disappeared_items_are_in_flake_order() -> None:
    result = diff_inventory({}, {"20", "3", "100"}, [], VIP_ON_SURVIVAL)
    assert result.disappeared == ["3", "20", "100"]


# ------------------------------------------------------------------- routing


def test_products_not_routed_are_ignored() -> None:
    result = diff_inventory({}, set(), [item(slug="banana")], VIP_ON_SURVIVAL)
    assert result.events == []
    assert result.marks == {}


def test_only_the_listed_servers_get_commands() -> None:
    routes = by_product({"vip": ["survival", "creative"], "banana": ["lobby"]})
    result = diff_inventory({}, set(), [item(ITEM_A, slug="vip")], routes)
    assert sorted(e.server for e in result.events) == ["creative", "survival"]
    assert set(result.marks) == {(ITEM_A, "survival"), (ITEM_A, "creative")}


def test_servers_are_tracked_independently() -> None:
    # vip was granted on survival; the operator adds creative to vip's servers.
    routes = by_product({"vip": ["survival", "creative"]})
    result = diff_inventory(granted((ITEM_A, "survival")), {ITEM_A}, [item()], routes)
    assert kinds(result) == [(ITEM_A, "creative", EventKind.ACTIVE)]
    assert result.marks == granted((ITEM_A, "creative"))


def test_end_event_only_where_the_grant_ran() -> None:
    routes = by_product({"vip": ["survival", "creative"]})
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item(state="revoked")], routes
    )
    assert kinds(result) == [(ITEM_A, "survival", EventKind.REVOKE)]
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1)}


def test_server_listed_twice_is_granted_once() -> None:
    result = diff_inventory({}, set(), [item()], by_product({"vip": ["survival", "survival"]}))
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]


# ------------------------------------------------------------------ ordering


def test_events_are_ordered_by_when_they_happened() -> None:
    marks = granted((ITEM_A, "survival"))
    items = [
        # granted earlier, revoked on April 20th
        item(ITEM_A, state="revoked", revoked_at="2023-04-20T10:00:00Z"),
        # bought and activated before that revoke
        item(ITEM_B, state="active", active_at="2023-04-15T08:00:00.5Z"),
        # activated after it
        item(ITEM_C, state="active", active_at="2023-04-25T08:00:00Z"),
    ]
    result = diff_inventory(marks, {ITEM_A}, items, VIP_ON_SURVIVAL)
    assert kinds(result) == [
        (ITEM_B, "survival", EventKind.ACTIVE),
        (ITEM_A, "survival", EventKind.REVOKE),
        (ITEM_C, "survival", EventKind.ACTIVE),
    ]


def test_same_time_events_are_ordered_by_item_then_server() -> None:
    routes = by_product({"vip": ["b-server", "a-server"]})
    items = [item("20"), item("3")]
    result = diff_inventory({}, set(), items, routes)
    assert [(e.item.id, e.server) for e in result.events] == [
        ("3", "a-server"),
        ("3", "b-server"),
        ("20", "a-server"),
        ("20", "b-server"),
    ]


def test_timestamps_with_offsets_are_compared_as_instants() -> None:
    items = [
        item(ITEM_A, active_at="2023-04-15T10:00:00+02:00"),  # 08:00Z
        item(ITEM_B, active_at="2023-04-15T09:00:00Z"),
    ]
    result = diff_inventory({}, set(), items, VIP_ON_SURVIVAL)
    assert [e.item.id for e in result.events] == [ITEM_A, ITEM_B]


def test_revoke_never_overtakes_its_grant_across_passes() -> None:
    # Pass 1 grants; pass 2 sees it revoked with a revoke time that is *before*
    # active_at (clock skew): the grant was still journaled first.
    first = diff_inventory({}, set(), [item()], VIP_ON_SURVIVAL)
    skewed = item(state="revoked", revoked_at="2023-01-01T00:00:00Z")
    second = diff_inventory(first.marks, {ITEM_A}, [skewed], VIP_ON_SURVIVAL)
    assert kinds(first) + kinds(second) == [
        (ITEM_A, "survival", EventKind.ACTIVE),
        (ITEM_A, "survival", EventKind.REVOKE),
    ]


# -------------------------------------------------------- duplicated entries


def test_item_listed_twice_in_the_same_state_is_granted_once() -> None:
    result = diff_inventory({}, set(), [item(), item()], VIP_ON_SURVIVAL)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
    assert result.duplicates == [ITEM_A]


def test_item_listed_twice_in_different_states_runs_nothing() -> None:
    marks = granted((ITEM_A, "survival"))
    result = diff_inventory(
        marks, {ITEM_A}, [item(state="revoked"), item(state="used")], VIP_ON_SURVIVAL
    )
    assert result.events == []
    assert result.marks == {}
    assert result.duplicates == [ITEM_A]
    assert result.disappeared == []


# --------------------------------------------------------------- local expiry

LAPSED = {(ITEM_A, "survival"): Mark(Phase.LAPSED, 1)}
AFTER_EXPIRY = datetime(2023, 5, 12, tzinfo=UTC)  # the item's expires_at has passed


def test_lapsed_item_still_active_with_the_old_expiry_runs_nothing() -> None:
    result = diff_inventory(LAPSED, {ITEM_A}, [item(state="active")], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert result.events == []
    assert result.marks == {}


def test_lapsed_item_renewed_to_a_later_expiry_is_granted_again_as_a_new_cycle() -> None:
    renewed = item(state="active", expires_at="2023-06-11T21:52:53Z")
    result = diff_inventory(LAPSED, {ITEM_A}, [renewed], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
    assert result.events[0].cycle == 2
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.GRANTED, 2)}


def test_override_expiry_counts_for_a_renewal() -> None:
    extended = item(state="active", override_expires_at="2023-06-11T21:52:53Z")
    result = diff_inventory(LAPSED, {ITEM_A}, [extended], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert [e.cycle for e in result.events] == [2]


def test_lapsed_item_then_used_or_revoked_runs_nothing_more() -> None:
    for state in ("used", "revoked"):
        result = diff_inventory(
            LAPSED, {ITEM_A}, [item(state=state)], VIP_ON_SURVIVAL, AFTER_EXPIRY
        )
        assert result.events == []
        assert result.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1)}


# --------------------------------------------------------------- shared perks

VIP_PERK = ProductRules(perks={"vip": "rank"})


def test_a_grant_records_its_products_perk_and_an_end_keeps_the_marks() -> None:
    result = diff_inventory({}, set(), [item()], VIP_ON_SURVIVAL, rules=VIP_PERK)
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.GRANTED, 1, "rank")}
    # The config changed since: the end keeps the perk the grant was made under.
    marks = {(ITEM_A, "survival"): Mark(Phase.GRANTED, 1, "old-rank")}
    ended = diff_inventory(marks, {ITEM_A}, [item(state="used")], VIP_ON_SURVIVAL, rules=VIP_PERK)
    assert ended.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1, "old-rank")}
    lapsed = {(ITEM_A, "survival"): Mark(Phase.LAPSED, 1, "old-rank")}
    ended = diff_inventory(lapsed, {ITEM_A}, [item(state="used")], VIP_ON_SURVIVAL, rules=VIP_PERK)
    assert ended.marks == {(ITEM_A, "survival"): Mark(Phase.ENDED, 1, "old-rank")}


def test_a_renewal_after_a_lapse_is_a_new_grant_under_the_perk_of_now() -> None:
    lapsed = {(ITEM_A, "survival"): Mark(Phase.LAPSED, 1, "old-rank")}
    renewed = item(state="active", expires_at="2023-06-11T21:52:53Z")
    result = diff_inventory(
        lapsed, {ITEM_A}, [renewed], VIP_ON_SURVIVAL, AFTER_EXPIRY, rules=VIP_PERK
    )
    assert result.marks == {(ITEM_A, "survival"): Mark(Phase.GRANTED, 2, "rank")}


# ---------------------------------------------------------- one-time products

KEYS_ONCE = ProductRules(once=frozenset({"vip"}))


def test_a_one_time_product_is_not_granted_on_a_server_added_later() -> None:
    routes = by_product({"vip": ["survival", "creative"]})
    first = diff_inventory({}, set(), [item()], routes, rules=KEYS_ONCE)
    assert sorted(e.server for e in first.events) == ["creative", "survival"]
    # Granted on survival before creative was added: creative gets nothing.
    result = diff_inventory(
        granted((ITEM_A, "survival")), {ITEM_A}, [item()], routes, rules=KEYS_ONCE
    )
    assert result.events == [] and result.marks == {}
    # Without `once`, creative is granted.
    again = diff_inventory(granted((ITEM_A, "survival")), {ITEM_A}, [item()], routes)
    assert kinds(again) == [(ITEM_A, "creative", EventKind.ACTIVE)]


def test_a_one_time_product_is_not_granted_again_by_a_renewal() -> None:
    renewed = item(state="active", expires_at="2023-06-11T21:52:53Z")
    result = diff_inventory(
        LAPSED, {ITEM_A}, [renewed], VIP_ON_SURVIVAL, AFTER_EXPIRY, rules=KEYS_ONCE
    )
    assert result.events == [] and result.marks == {}


def test_a_one_time_product_still_ends_where_it_was_granted() -> None:
    result = diff_inventory(
        granted((ITEM_A, "survival")),
        {ITEM_A},
        [item(state="revoked")],
        VIP_ON_SURVIVAL,
        rules=KEYS_ONCE,
    )
    assert kinds(result) == [(ITEM_A, "survival", EventKind.REVOKE)]


# ------------------------------------------------------- first seen, expired

GRACE = ProductRules(grace=timedelta(minutes=1))
EXPIRY = datetime(2023, 5, 11, 21, 52, 53, 665450, tzinfo=UTC)  # the item's expires_at


def test_an_item_first_seen_active_after_its_expiry_and_grace_runs_nothing() -> None:
    for state in ("active", "renewed"):
        at_end = EXPIRY + timedelta(minutes=1)
        result = diff_inventory(
            {}, set(), [item(state=state)], VIP_ON_SURVIVAL, at_end, rules=GRACE
        )
        assert result.events == [] and result.marks == {}, state
        assert result.expired_unseen == [ITEM_A]
        # Within the grace, it is granted.
        within = EXPIRY + timedelta(seconds=59)
        result = diff_inventory(
            {}, set(), [item(state=state)], VIP_ON_SURVIVAL, within, rules=GRACE
        )
        assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)], state
        assert result.expired_unseen == []


def test_the_override_expiry_decides_whether_a_first_seen_item_expired() -> None:
    extended = item(override_expires_at="2023-06-11T21:52:53Z")
    result = diff_inventory({}, set(), [extended], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
    shortened = item(expires_at="2023-06-11T21:52:53Z", override_expires_at="2023-05-01T00:00:00Z")
    result = diff_inventory({}, set(), [shortened], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert result.events == [] and result.expired_unseen == [ITEM_A]


def test_an_expired_item_is_not_granted_on_a_new_server_nor_after_being_usable() -> None:
    routes = by_product({"vip": ["survival", "creative"]})
    result = diff_inventory(granted((ITEM_A, "survival")), {ITEM_A}, [item()], routes, AFTER_EXPIRY)
    assert result.events == [] and result.marks == {}
    # Seen usable before, activated and past its expiry by the next look.
    result = diff_inventory({}, {ITEM_A}, [item()], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert result.events == [] and result.expired_unseen == [ITEM_A]


def test_an_item_without_expiry_is_always_granted() -> None:
    result = diff_inventory({}, set(), [item(expires_at=None)], VIP_ON_SURVIVAL, AFTER_EXPIRY)
    assert kinds(result) == [(ITEM_A, "survival", EventKind.ACTIVE)]
