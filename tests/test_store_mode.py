"""Store mode in-process: StoreSource and Applier against the Management fake
over loopback, with the in-memory (or SQLite) state store.

What each read asks PayNow for (the first start never pages through the
store's history; a quiet new-items read is one request), what it grants and
takes back, and that absence alone never takes a perk back.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.expiry import sweep_expiries
from daemon.paynow.parse import store_item
from daemon.sources import Answer
from daemon.sources.store import CONFIRMED_SNAPSHOTS, CURSOR, MISSING
from tests.fakes.paynow_store import FakeStore
from tests.store_rig import SURVIVAL, ManualClock, Rig, old, run_async, store_rig


def grant(rig: Rig, customer_id: str, item_id: str) -> str:
    uuid = rig.fake.customer(customer_id)["minecraft_uuid"]
    return f"lp user {uuid} parent add vip {item_id}"


def remove(rig: Rig, customer_id: str, item_id: str) -> str:
    uuid = rig.fake.customer(customer_id)["minecraft_uuid"]
    return f"lp user {uuid} parent remove vip {item_id}"


def queries(fake: FakeStore, kind: str | None = None) -> list[dict[str, str]]:
    return [r.query for r in fake.requests(kind)]


def history(fake: FakeStore, customer_id: str) -> dict[str, str]:
    """A store with years of history: used and revoked items, a few live ones,
    an hour apart (far outside the overlap window). State → item id of each."""
    ids = {}
    for n, state in enumerate(["used", "revoked", "active", "used", "active", "revoked"]):
        item = fake.add_item(customer_id, state=state, added_at=old(days=30 - n))
        ids.setdefault(state, item["id"])
        ids[f"{state}{n}"] = item["id"]
    return ids


async def first_pass(rig: Rig) -> None:
    assert await rig.source.read_new_items()
    assert await rig.source.snapshot()


# --- the first start ----------------------------------------------------------------


@run_async
async def test_a_first_start_reads_the_newest_item_then_the_live_snapshot(tmp_path: Path) -> None:
    async with store_rig(tmp_path, page_limit=2) as rig:
        steve = rig.fake.add_customer(name="Steve")["id"]
        items = history(rig.fake, steve)

        assert await rig.source.read_new_items()
        assert queries(rig.fake) == [{"limit": "1", "asc": "false"}]
        assert await rig.store.get_meta(CURSOR) == items["revoked5"]
        assert await rig.commands() == []

        rig.fake.reset_counters()
        assert await rig.source.snapshot()
        # Two live items, pages of two: a full page, then an empty one; every
        # request asks for live items only (no paging over used or revoked ones).
        seen = queries(rig.fake)
        assert all(q["activeOnly"] == "true" and q["asc"] == "true" for q in seen), seen
        assert len(seen) == 2
        assert await rig.commands() == [
            grant(rig, steve, items["active2"]),
            grant(rig, steve, items["active4"]),
        ]


@run_async
async def test_a_store_with_no_item_yet_starts_its_cursor_at_zero(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        assert await rig.store.get_meta(CURSOR) == "0"
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve)["id"]
        assert await rig.source.read_new_items()
        assert await rig.commands() == [grant(rig, steve, vip)]


# --- new purchases by cursor -----------------------------------------------------------


@run_async
async def test_new_purchases_are_read_by_cursor_one_request_when_nothing_is_new(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path, page_limit=5) as rig:
        steve = rig.fake.add_customer()["id"]
        history(rig.fake, steve)
        await first_pass(rig)
        granted = await rig.commands()

        rig.fake.reset_counters()
        assert await rig.source.read_new_items()
        assert await rig.source.read_new_items()
        assert rig.fake.count() == 2
        assert await rig.commands() == granted

        alex = rig.fake.add_customer()["id"]
        bought = rig.fake.add_item(alex)["id"]
        rig.fake.reset_counters()
        assert await rig.source.read_new_items()
        assert rig.fake.count() == 1
        assert await rig.commands() == [*granted, grant(rig, alex, bought)]
        assert await rig.store.get_meta(CURSOR) == bought


@run_async
async def test_the_overlap_rereads_an_item_that_became_visible_late(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        rig.fake.add_item(steve, state="used", added_at=old(days=3))
        await first_pass(rig)

        late = rig.fake.add_item(steve, visible=False)["id"]
        on_time = rig.fake.add_item(steve)["id"]
        assert int(late) < int(on_time)
        assert await rig.source.read_new_items()
        assert await rig.store.get_meta(CURSOR) == on_time
        assert await rig.commands() == [grant(rig, steve, on_time)]

        rig.fake.reveal(late)
        assert await rig.source.read_new_items()
        assert await rig.store.get_meta(CURSOR) == on_time
        assert await rig.commands() == [grant(rig, steve, on_time), grant(rig, steve, late)]

        # Read again (and again by the snapshot): seen again, nothing changes.
        commits = rig.commits
        assert await rig.source.read_new_items()
        assert await rig.source.snapshot()
        assert rig.commits == commits
        assert len(await rig.commands()) == 2


@run_async
async def test_new_items_of_many_customers_are_each_applied(tmp_path: Path) -> None:
    async with store_rig(tmp_path, page_limit=2) as rig:
        await first_pass(rig)
        bought = {}
        for _ in range(3):
            customer = rig.fake.add_customer()["id"]
            bought[customer] = [rig.fake.add_item(customer)["id"] for _ in range(2)]
        assert await rig.source.read_new_items()
        expected = {grant(rig, c, i) for c, items in bought.items() for i in items}
        assert set(await rig.commands()) == expected
        assert len(await rig.commands()) == 6


# --- the snapshot and its look-ups -------------------------------------------------------


@run_async
async def test_an_item_hidden_from_the_snapshot_but_listed_active_is_not_taken_back(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.hide_from_snapshot(vip)

        rig.fake.reset_counters()
        assert await rig.source.snapshot()
        assert rig.fake.count("customer_items", steve) == 1
        assert await rig.commands() == [grant(rig, steve, vip)]
        assert json.loads(await rig.store.get_meta(MISSING) or "")["count"] == 0

        # Confirmed live by that look-up: the next snapshots do not look it up again.
        for _ in range(3):
            assert await rig.source.snapshot()
        assert rig.fake.count("customer_items", steve) == 1


@run_async
async def test_one_look_up_per_customer_whatever_number_of_items_it_lacks(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vips = [rig.fake.add_item(steve, added_at=old(days=1))["id"] for _ in range(3)]
        await first_pass(rig)
        for vip in vips:
            rig.fake.hide_from_snapshot(vip)
        rig.fake.reset_counters()
        assert await rig.source.snapshot()
        assert rig.fake.count("customer_items") == 1


@run_async
async def test_an_item_missing_from_both_stays_granted_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        other = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.conceal(vip)

        assert await rig.source.snapshot()
        assert await rig.commands() == [grant(rig, steve, vip), grant(rig, steve, other)]
        missing = json.loads(await rig.store.get_meta(MISSING) or "")
        assert missing == {"count": 1, "items": [vip]}
        assert (
            f"1 item held live is listed neither in the snapshot nor among their customer's "
            f"items (first: {vip}); they stay granted" in caplog.text
        )

        rig.fake.reveal(vip)
        assert await rig.source.snapshot()
        assert json.loads(await rig.store.get_meta(MISSING) or "")["count"] == 0
        assert len(await rig.commands()) == 2


@pytest.mark.parametrize("end", ["revoke", "expire"])
@run_async
async def test_an_end_seen_by_a_look_up_runs_its_commands_once(tmp_path: Path, end: str) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        getattr(rig.fake, end)(vip)  # no longer live: the snapshot lacks it

        for _ in range(3):
            assert await rig.source.snapshot()
            assert await rig.source.read_new_items()
        event = "on_revoke" if end == "revoke" else "on_expire"
        assert await rig.events(vip) == [("survival", "on_active"), ("survival", event)]
        assert await rig.commands() == [grant(rig, steve, vip), remove(rig, steve, vip)]


@run_async
async def test_a_revoke_read_by_the_new_items_overlap_runs_on_revoke_once(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve)["id"]
        assert await rig.source.read_new_items()
        rig.fake.revoke(vip, "chargeback")
        assert await rig.source.read_new_items()  # still inside the overlap
        assert await rig.source.snapshot()
        assert await rig.source.read_new_items()
        assert await rig.events(vip) == [("survival", "on_active"), ("survival", "on_revoke")]


@run_async
async def test_a_renewal_in_the_snapshot_keeps_the_perk(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, expirable=True, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.renew(vip)
        assert await rig.source.snapshot()
        assert await rig.events(vip) == [("survival", "on_active")]
        baseline = await rig.store.live_baseline()
        assert baseline.items[vip].state == "renewed"


@run_async
async def test_a_snapshot_that_matches_the_store_commits_nothing(tmp_path: Path) -> None:
    async with store_rig(tmp_path, state="sqlite") as rig:
        for _ in range(3):
            customer = rig.fake.add_customer(metadata={"discord": "x#1"})["id"]
            rig.fake.add_item(customer, expirable=True, added_at=old(days=1))
        await first_pass(rig)
        commits = rig.commits
        assert await rig.source.snapshot()
        assert rig.commits == commits

        # A customer's change (a new name) is stored; no command runs for it.
        changed = rig.fake.customer_ids[0]
        rig.fake.update_customer(changed, name="Renamed")
        assert await rig.source.snapshot()
        assert rig.commits == commits + 1
        assert len(await rig.commands()) == 3


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "path", "page"),
    [
        ("snapshot", "store_items", 2),
        ("read_new_items", "store_items", 2),
        ("snapshot", "customer_items", 1),
    ],
)
@run_async
async def test_a_failed_page_changes_nothing(
    tmp_path: Path, read: str, path: str, page: int
) -> None:
    async with store_rig(tmp_path, page_limit=2) as rig:
        steve = rig.fake.add_customer()["id"]
        kept = rig.fake.add_item(steve, added_at=old(days=2))["id"]
        gone = rig.fake.add_item(steve, added_at=old(days=2))["id"]
        await first_pass(rig)
        cursor = await rig.store.get_meta(CURSOR)
        rig.fake.revoke(gone)  # missing from the next snapshot: looked up
        bought = [rig.fake.add_item(steve)["id"] for _ in range(3)]
        rig.fake.fault("malformed", path=path, page=page, times=None)

        before = await rig.commands()
        assert not await getattr(rig.source, read)()
        assert await rig.commands() == before
        assert await rig.store.get_meta(CURSOR) == cursor
        assert rig.source.report.customers_failed
        assert (await rig.store.live_baseline()).items.keys() == {kept, gone}
        del bought


# --- ordering of answers ---------------------------------------------------------------------


def answer(rig: Rig, item_ids: list[str], read_at: datetime, *, complete: bool) -> Answer:
    """What a read at `read_at` would hand over: the items as the fake serves them now."""
    found = [store_item(rig.fake.served_item(i), f"item {i}") for i in item_ids]
    return Answer(found[-1].customer, [f.item for f in found], complete, read_at)


@run_async
async def test_an_answer_read_before_the_last_applied_one_never_changes_its_items(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with store_rig(tmp_path, clock=clock) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        # A snapshot starts and sees `vip` active and a new purchase; before it
        # is applied, the customer is refunded and a webhook's look-up (read
        # later) is applied first.
        bought = rig.fake.add_item(steve)["id"]
        clock.advance(1)
        snapshot = answer(rig, [vip, bought], clock.now(), complete=False)
        rig.fake.revoke(vip, "refund")
        rig.fake.revoke(bought, "refund")
        clock.advance(1)
        assert await rig.source.look_up(steve, why="a webhook") == {vip, bought}
        assert await rig.events(vip) == [("survival", "on_active"), ("survival", "on_revoke")]

        clock.advance(1)
        await rig.core.applier.apply(snapshot, label="steve")
        assert await rig.events(vip) == [("survival", "on_active"), ("survival", "on_revoke")]
        assert await rig.events(bought) == []  # first seen revoked: nothing, then or now
        baseline = await rig.store.live_baseline()
        assert vip not in baseline.items and bought not in baseline.items


@run_async
async def test_an_older_answer_still_applies_the_items_the_newer_one_did_not_cover(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with store_rig(tmp_path, clock=clock) as rig:
        await first_pass(rig)
        steve = rig.fake.add_customer()["id"]
        first = rig.fake.add_item(steve)["id"]
        second = rig.fake.add_item(steve)["id"]
        clock.advance(1)
        older = answer(rig, [first, second], clock.now(), complete=False)
        rig.fake.revoke(second, "refund")
        clock.advance(1)
        await rig.core.applier.apply(answer(rig, [second], clock.now(), complete=False), label="s")
        await rig.core.applier.apply(older, label="s")
        assert await rig.events(first) == [("survival", "on_active")]
        assert await rig.events(second) == []


# --- routing and placeholders -------------------------------------------------------------

TWO_SERVERS: dict[str, Any] = {
    "survival": {**SURVIVAL, "paynow_gameserver_id": "111"},
    "creative": {**SURVIVAL, "port": 2, "paynow_gameserver_id": "222"},
    "lobby": {**SURVIVAL, "port": 3},
}


@run_async
async def test_skip_commands_runs_nothing_and_a_game_server_id_picks_its_server(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path, servers=TWO_SERVERS) as rig:
        await first_pass(rig)
        steve = rig.fake.add_customer()["id"]
        skipped = rig.fake.add_item(steve, skip_commands=True)["id"]
        creative = rig.fake.add_item(steve, execute_on_gameserver_id="222")["id"]
        anywhere = rig.fake.add_item(steve)["id"]
        unknown = rig.fake.add_item(steve, execute_on_gameserver_id="999")["id"]
        assert await rig.source.read_new_items()

        assert await rig.events(skipped) == []
        assert await rig.events(creative) == [("creative", "on_active")]
        assert {s for s, _ in await rig.events(anywhere)} == {"survival", "creative", "lobby"}
        assert {s for s, _ in await rig.events(unknown)} == {"survival", "creative", "lobby"}

        for item in (skipped, creative):
            rig.fake.revoke(item)
        assert await rig.source.read_new_items()
        assert await rig.events(skipped) == []
        assert await rig.events(creative) == [("creative", "on_active"), ("creative", "on_revoke")]


STORE_PLACEHOLDERS: dict[str, Any] = {
    "on_active": [
        "link {customer.minecraft_uuid} {customer.metadata.discord}",
        "colour {customer.name} {item.custom_variables.colour}",
    ]
}


@run_async
async def test_metadata_and_custom_variables_render_and_unsafe_values_are_refused(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path, {"vip": STORE_PLACEHOLDERS}) as rig:
        await first_pass(rig)
        steve = rig.fake.add_customer(name="Steve", metadata={"discord": "steve#1"})
        alex = rig.fake.add_customer(name="Alex", metadata={"discord": "alex\nop Alex"})
        rig.fake.add_item(steve["id"], custom_variables={"colour": "red"})
        rig.fake.add_item(alex["id"], custom_variables={"colour": "blue; op Alex"})
        rig.fake.add_item(alex["id"])  # no colour chosen
        assert await rig.source.read_new_items()

        rows = [(r.customer_id, r.status.value, r.command, r.reason) for r in await rig.rows()]
        assert rows[:2] == [
            (steve["id"], "pending", f"link {steve['minecraft_uuid']} steve#1", None),
            (steve["id"], "pending", "colour Steve red", None),
        ]
        by_status = [(c, s) for c, s, _, _ in rows[2:]]
        assert by_status == [
            (alex["id"], "failed"),  # a newline in the metadata
            (alex["id"], "pending"),  # `;` is harmless on a Minecraft server
            (alex["id"], "failed"),
            (alex["id"], "skipped"),  # no colour: the placeholder is missing
        ]
        assert "customer.metadata.discord contains a newline" in str(rows[2][3])
        assert rows[3][2] == "colour Alex blue; op Alex"
        assert "item.custom_variables.colour is missing" in str(rows[5][3])


@run_async
async def test_a_gifts_customer_placeholders_are_the_recipients(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        buyer = rig.fake.add_customer(name="Buyer")["id"]
        friend = rig.fake.add_customer(name="Friend")["id"]
        gift = rig.fake.add_item(friend, gift_from=buyer)["id"]
        assert rig.fake.served_item(gift)["order_customer"]["id"] == buyer
        assert await rig.source.read_new_items()
        assert await rig.commands() == [grant(rig, friend, gift)]
        assert [r.customer_id for r in await rig.rows()] == [friend]


# --- whichever states activeOnly lists ------------------------------------------------------


@run_async
async def test_a_snapshot_that_lists_usable_items_grants_them_only_once_activated(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path) as rig:
        rig.fake.active_only_states = {"active", "renewed", "usable"}
        steve = rig.fake.add_customer()["id"]
        crate = rig.fake.add_item(steve, state="usable", added_at=old(days=1))["id"]
        await first_pass(rig)
        assert await rig.commands() == []
        commits = rig.commits
        assert await rig.source.snapshot()
        assert rig.commits == commits

        rig.fake.activate(crate)
        assert await rig.source.snapshot()
        assert await rig.source.snapshot()
        assert await rig.commands() == [grant(rig, steve, crate)]


@run_async
async def test_a_snapshot_without_renewed_items_looks_them_up_and_keeps_them(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path) as rig:
        rig.fake.active_only_states = {"active"}
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, expirable=True, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.renew(vip)
        rig.fake.reset_counters()
        for _ in range(CONFIRMED_SNAPSHOTS):
            assert await rig.source.snapshot()
        assert rig.fake.count("customer_items", steve) == 1
        assert await rig.events(vip) == [("survival", "on_active")]
        assert (await rig.store.live_baseline()).items[vip].state == "renewed"
        assert await rig.source.snapshot()
        assert rig.fake.count("customer_items", steve) == 2  # confirmed again, now and then


# --- local expiry ----------------------------------------------------------------------------


@run_async
async def test_local_expiry_then_paynows_end_runs_on_expire_once(tmp_path: Path) -> None:
    clock = ManualClock()
    async with store_rig(tmp_path, clock=clock) as rig:
        steve = rig.fake.add_customer()["id"]
        ends = clock.now() + timedelta(hours=1)
        vip = rig.fake.add_item(steve, expires_at=ends, added_at=old(days=1))["id"]
        await first_pass(rig)
        clock.advance(2 * 3600)
        assert await sweep_expiries(rig.core.applier) == 1
        rig.fake.expire(vip, at=ends)
        assert await rig.source.snapshot()
        assert await rig.source.read_new_items()
        assert await rig.commands() == [grant(rig, steve, vip), remove(rig, steve, vip)]


# --- one broken customer ---------------------------------------------------------------------


@pytest.mark.parametrize("read", ["read_new_items", "snapshot"])
@run_async
async def test_a_malformed_item_fails_its_customer_only(tmp_path: Path, read: str) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        steve = rig.fake.add_customer()["id"]
        alex = rig.fake.add_customer()["id"]
        broken = rig.fake.add_item(steve)["id"]
        also_steve = rig.fake.add_item(steve)["id"]
        fine = rig.fake.add_item(alex)["id"]
        rig.fake.update_item(broken, active_at="yesterday")

        assert not await getattr(rig.source, read)()
        assert await rig.commands() == [grant(rig, alex, fine)]
        assert list(rig.source.report.customers_failed) == [steve]
        if read == "read_new_items":
            assert await rig.store.get_meta(CURSOR) == fine

        # Once PayNow sends it whole again, the snapshot delivers the customer's items.
        rig.fake.update_item(broken, active_at=rig.fake.item(fine)["active_at"])
        assert await rig.source.snapshot()
        assert set(await rig.commands()) == {
            grant(rig, alex, fine),
            grant(rig, steve, broken),
            grant(rig, steve, also_steve),
        }


@run_async
async def test_a_look_up_applies_only_the_customers_own_items(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        buyer = rig.fake.add_customer(name="Buyer")["id"]
        friend = rig.fake.add_customer(name="Friend")["id"]
        own = rig.fake.add_item(buyer)["id"]
        gift = rig.fake.add_item(friend, gift_from=buyer)["id"]
        # Should PayNow list a gift among its buyer's items too:
        listing = [rig.fake.served_item(own), rig.fake.served_item(gift)]
        rig.fake.fault("status", path="customer_items", customer=buyer, status=200,
                       body=json.dumps(listing).encode())  # fmt: skip

        assert await rig.source.look_up(buyer, why="a webhook") == {own}
        assert await rig.commands() == [grant(rig, buyer, own)]
        assert [r.customer_id for r in await rig.rows()] == [buyer]
        assert await rig.source.look_up(friend, why="a webhook") == {gift}
        assert await rig.commands() == [grant(rig, buyer, own), grant(rig, friend, gift)]


@run_async
async def test_a_customer_paynow_no_longer_knows_keeps_its_perks_as_missing(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.conceal(vip)
        rig.fake.fault("status", path="customer_items", customer=steve, status=404, times=None)
        assert await rig.source.snapshot()
        assert json.loads(await rig.store.get_meta(MISSING) or "") == {"count": 1, "items": [vip]}
        assert await rig.commands() == [grant(rig, steve, vip)]
        assert not rig.source.report.customers_failed


@run_async
async def test_a_customer_whose_only_item_is_listed_nowhere_keeps_it(tmp_path: Path) -> None:
    async with store_rig(tmp_path) as rig:
        steve = rig.fake.add_customer()["id"]
        vip = rig.fake.add_item(steve, added_at=old(days=1))["id"]
        await first_pass(rig)
        rig.fake.conceal(vip)
        assert await rig.source.snapshot()
        assert json.loads(await rig.store.get_meta(MISSING) or "")["items"] == [vip]
        assert await rig.commands() == [grant(rig, steve, vip)]


@run_async
async def test_a_customer_that_cannot_be_stored_is_read_again_and_stops_no_other(
    tmp_path: Path,
) -> None:
    async with store_rig(tmp_path) as rig:
        await first_pass(rig)
        cursor = await rig.store.get_meta(CURSOR)
        steve = rig.fake.add_customer()["id"]
        alex = rig.fake.add_customer()["id"]
        refused = rig.fake.add_item(steve)["id"]
        fine = rig.fake.add_item(alex)["id"]
        rig.counter.refuse.add(steve)
        assert not await rig.source.read_new_items()
        assert await rig.commands() == [grant(rig, alex, fine)]
        assert await rig.store.get_meta(CURSOR) == cursor  # read again next time

        rig.counter.refuse.clear()
        assert await rig.source.read_new_items()
        assert await rig.commands() == [grant(rig, alex, fine), grant(rig, steve, refused)]
        assert await rig.store.get_meta(CURSOR) == fine
