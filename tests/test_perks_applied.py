"""Shared perks, one-time products, per-item commands, first-seen expired items
and cancelled grants, run in-process through `daemon.wiring.Core`: answers
applied (token-mode answers built from the API's JSON, store mode read from
the PayNow store fake), local expiry swept, and the journal delivered to the
loopback RCON fakes over real sockets, on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.config import Settings, load_settings
from daemon.delivery import make_server_factory
from daemon.expiry import sweep_expiries
from daemon.models import Customer, InventoryItem
from daemon.paynow import ManagementClient, make_session
from daemon.sources import Answer
from daemon.state import JournalRow, JournalStatus
from daemon.state.sqlite import SqliteStore
from daemon.wiring import Core
from tests.conftest import MINECRAFT_CUSTOMER, customer_data, item_data
from tests.fakes.paynow_store import FakeStore
from tests.fakes.rcon_server import FakeRconServer

STEAM_ID = "76561198006409530"
BOTH = customer_data(
    MINECRAFT_CUSTOMER,
    steam_id=STEAM_ID,
    steam={"id": STEAM_ID, "name": "Notch", "avatar_url": None},
)
UUID = BOTH["minecraft_uuid"]
# After the conftest items' active_at, before their expires_at (2023-05-11).
APRIL = datetime(2023, 4, 20, tzinfo=UTC)

ADD = f"lp user {UUID} parent add vip"
REMOVE = f"lp user {UUID} parent remove vip"
VIP: dict[str, Any] = {
    "perk": "rank",
    "on_active": ["lp user {customer.minecraft_uuid} parent add vip"],
    "on_expire": ["lp user {customer.minecraft_uuid} parent remove vip"],
    "on_revoke": ["lp user {customer.minecraft_uuid} parent remove vip"],
}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()


@dataclass
class Rig:
    """Game servers on loopback, a SQLite store and a Core, as a pass wires them."""

    folder: Path
    servers: dict[str, FakeRconServer]
    clock: Clock
    core: Core | None = None
    # Store mode: the PayNow store fake whose key the config names.
    paynow_store: FakeStore | None = None

    def configure(self, products: Mapping[str, Any], servers: Sequence[str] = ()) -> Settings:
        fake = self.paynow_store
        data: dict[str, Any] = {
            "paynow": {"api_url": "http://127.0.0.1:9"}
            if fake is None
            else {"api_url": fake.url, "store_id": fake.store_id, "api_key": fake.api_key},
            "sync": {"state_db": "state.sqlite3"},
            "customers": [{"token": "tok", "label": "notch"}] if fake is None else [],
            "servers": {
                name: {
                    "platform": "minecraft" if fake.profile == "minecraft" else "source",
                    "host": "127.0.0.1",
                    "port": fake.port,
                    "password": fake.password,
                }
                for name, fake in self.servers.items()
                if not servers or name in servers
            },
            "products": dict(products),
        }
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        settings = load_settings(path, env={})
        if self.core is None:
            store = SqliteStore(self.folder / "state.sqlite3")
            self.core = Core(settings, store, clock=self.clock)
        else:
            self.core.use_settings(settings)
        return settings

    @property
    def the_core(self) -> Core:
        assert self.core is not None
        return self.core

    async def apply(self, *items: dict[str, Any], complete: bool = True) -> None:
        """One answer of the customer's items (JSON as the API sends it)."""
        answer = Answer(
            Customer.from_api(BOTH),
            [InventoryItem.from_api(data) for data in items],
            complete,
            self.clock.now(),
        )
        await self.the_core.applier.apply(answer, label="notch")

    async def deliver(self) -> None:
        core = self.the_core
        factory = make_server_factory(core.settings)
        for name in core.settings.servers:
            worker = core.worker(name, factory)
            assert await worker.deliver_available()
            await worker.close()

    async def rows(self, server: str = "survival") -> list[tuple[str, str, str, JournalStatus]]:
        """(item, event, command, status) of every journal row of `server`."""
        found: list[JournalRow] = await self.the_core.store.rows(server)
        return [(r.item_id, r.event, r.command, r.status) for r in found]

    def received(self, server: str = "survival") -> list[str]:
        """The commands `server` got, without the reads of its player list."""
        lists = ("minecraft:list uuids", "status")
        return [c for c in self.servers[server].commands if c not in lists]


@asynccontextmanager
async def rig(tmp_path: Path, *, source: bool = False) -> AsyncIterator[Rig]:
    servers = {"survival": FakeRconServer("minecraft", password="pw")}
    if source:
        servers["jail"] = FakeRconServer("srcds", password="pw")
    for server in servers.values():
        await server.start()
    made = Rig(tmp_path, servers, Clock(APRIL))
    try:
        yield made
    finally:
        if made.core is not None:
            await made.core.store.close()
        for server in servers.values():
            await server.stop()


def item(item_id: str, slug: str, state: str = "active", **fields: Any) -> dict[str, Any]:
    return item_data(item_id, state, slug, **fields)


KEPT, PENDING, DELIVERED = JournalStatus.KEPT, JournalStatus.PENDING, JournalStatus.DELIVERED


# --- two items of one rank ---------------------------------------------------------------


def test_two_vip_items_one_expires_kept_then_the_other_revoked_takes_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.apply")

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": VIP})
            month, year = item("1", "vip_month"), item("2", "vip_year")
            await r.apply(month, year)
            await r.deliver()
            assert r.received() == [ADD]
            assert await r.rows() == [
                ("1", "on_active", ADD, DELIVERED),
                ("2", "on_active", ADD, KEPT),
            ]

            # The monthly item ends while the yearly one is active: nothing is sent.
            await r.apply(item("1", "vip_month", "used"), year)
            await r.deliver()
            assert r.received() == [ADD]
            assert (await r.rows())[2:] == [("1", "on_expire", REMOVE, KEPT)]
            kept = [m for m in caplog.messages if "on_expire kept on survival" in m]
            assert kept == [
                "customer notch: item 1 (vip_month) on_expire kept on survival: perk rank "
                "is held there by another item (only per_item commands are sent)"
            ]

            # The yearly one is revoked: the last holder, so the take-back runs, once.
            revoked = item("2", "vip_year", "revoked")
            await r.apply(item("1", "vip_month", "used"), revoked)
            await r.apply(item("1", "vip_month", "used"), revoked)
            await r.deliver()
            assert r.received() == [ADD, REMOVE]
            assert (await r.rows())[3:] == [("2", "on_revoke", REMOVE, DELIVERED)]

    asyncio.run(main())


def test_a_shared_perk_across_two_products_on_two_servers(tmp_path: Path) -> None:
    """The perk is held per server: where the yearly item does not go, the end of
    the monthly one takes the rank back; where it goes, the rank is kept."""
    steam_vip = {
        "perk": "rank",
        "on_active": ['sm_addvip "{customer.steam_id2}" vip'],
        "on_expire": ['sm_removevip "{customer.steam_id2}"'],
    }
    add_src, remove_src = 'sm_addvip "STEAM_0:0:23071901" vip', 'sm_removevip "STEAM_0:0:23071901"'

    async def main() -> None:
        async with rig(tmp_path, source=True) as r:
            month = {**VIP, "servers": ["survival"]}
            r.configure({"vip_month": month, "vip_month_src": {**steam_vip, "servers": ["jail"]},
                         "vip_year": {**VIP, "servers": ["survival"]}})  # fmt: skip
            await r.apply(item("1", "vip_month"), item("2", "vip_month_src"), item("3", "vip_year"))
            await r.deliver()
            assert (r.received("survival"), r.received("jail")) == ([ADD], [add_src])

            await r.apply(item("1", "vip_month", "used"), item("2", "vip_month_src", "used"),
                          item("3", "vip_year"))  # fmt: skip
            await r.deliver()
            # survival: the yearly item holds the rank; jail: nothing else did.
            assert (r.received("survival"), r.received("jail")) == ([ADD], [add_src, remove_src])

            await r.apply(item("3", "vip_year", "used"))
            await r.deliver()
            assert r.received("survival") == [ADD, REMOVE]
            assert r.received("jail") == [add_src, remove_src]

    asyncio.run(main())


def test_a_second_products_extra_on_active_never_runs_while_the_perk_is_held(
    tmp_path: Path,
) -> None:
    year = {**VIP, "on_active": [*VIP["on_active"], "say {customer.minecraft.name} went yearly"]}

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": year})
            await r.apply(item("1", "vip_month"))
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            assert r.received() == [ADD]
            assert [status for *_, status in await r.rows()] == [DELIVERED, KEPT, KEPT]
            # Once the monthly item has ended, a new yearly item starts the perk whole.
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "revoked"))
            await r.apply(item("3", "vip_year", active_at="2023-04-19T00:00:00Z"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE, ADD, "say Notch went yearly"]

    asyncio.run(main())


def test_per_item_commands_run_for_their_own_item(tmp_path: Path) -> None:
    """A welcome on joining a held rank, and a ban on a chargeback while another
    item keeps the rank, are sent; the rank's own commands are kept."""
    vip = {
        **VIP,
        "on_active": [*VIP["on_active"],
                      {"run": "say welcome {customer.minecraft.name}", "per_item": True}],
        "on_revoke": [*VIP["on_revoke"],
                      {"run": "ban {customer.minecraft.name} {item.revoke_reason}",
                       "per_item": True}],
    }  # fmt: skip

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": vip, "vip_year": vip})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.apply(item("1", "vip_month", "revoked"), item("2", "vip_year"))
            await r.deliver()
            assert r.received() == [ADD, "say welcome Notch", "say welcome Notch",
                                    "ban Notch chargeback"]  # fmt: skip
            assert [(i, e, s) for i, e, _, s in await r.rows()] == [
                ("1", "on_active", DELIVERED),
                ("1", "on_active", DELIVERED),
                ("2", "on_active", KEPT),
                ("2", "on_active", DELIVERED),
                ("1", "on_revoke", KEPT),
                ("1", "on_revoke", DELIVERED),
            ]

    asyncio.run(main())


# --- local expiry and renewals ------------------------------------------------------


def test_local_expiry_and_renewal_with_a_shared_perk(tmp_path: Path) -> None:
    expiring = {"expires_at": "2023-05-01T00:00:00Z"}

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": VIP})
            applier = r.the_core.applier
            month, year = item("1", "vip_month", **expiring), item("2", "vip_year")
            await r.apply(month, year)
            # The monthly item's expiry passes: the sweep keeps the rank (yearly holds it).
            r.clock.at = datetime(2023, 5, 2, tzinfo=UTC)
            assert await sweep_expiries(applier) == 1
            await r.deliver()
            assert r.received() == [ADD]
            assert (await r.rows())[2:] == [("1", "on_expire", REMOVE, KEPT)]
            # Renewed to a later expiry: a new grant, joining the held rank.
            renewed = item("1", "vip_month", expires_at="2023-06-01T00:00:00Z")
            await r.apply(renewed, year)
            assert (await r.rows())[3:] == [("1", "on_active", ADD, KEPT)]
            # The yearly item's expiry passes: kept, since the renewed one holds it.
            r.clock.at = datetime(2023, 5, 13, tzinfo=UTC)
            assert await sweep_expiries(applier) == 1
            # Then the renewed one lapses too: the last holder, the rank is taken back.
            r.clock.at = datetime(2023, 6, 2, tzinfo=UTC)
            assert await sweep_expiries(applier) == 1
            await r.deliver()
            assert r.received() == [ADD, REMOVE]
            assert [(i, e, s) for i, e, _, s in (await r.rows())[4:]] == [
                ("2", "on_expire", KEPT),
                ("1", "on_expire", DELIVERED),
            ]

    asyncio.run(main())


def test_two_expiries_in_one_sweep_take_the_rank_back_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            r.clock.at = datetime(2023, 6, 1, tzinfo=UTC)
            assert await sweep_expiries(r.the_core.applier) == 2
            await r.deliver()
            assert r.received() == [ADD, REMOVE]
            # The API then says both are used: nothing more runs.
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "used"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE]

    asyncio.run(main())


# --- across restarts, and a config change ----------------------------------------------


def test_the_perk_is_decided_from_the_stored_marks_after_a_restart(tmp_path: Path) -> None:
    """A restart between two items' events, and the perk taken off the products
    meanwhile: the grants made under the perk still share it."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            await r.the_core.store.close()
            r.core = None  # a new process on the same file
            plain = {k: v for k, v in VIP.items() if k != "perk"}
            r.configure({"vip_month": plain, "vip_year": plain})
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year"))
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "used"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE]

    asyncio.run(main())


def test_grants_made_before_the_perk_was_configured_join_it(tmp_path: Path) -> None:
    """An operator adds `perk` to products customers already hold: their
    existing grants share it from then on (the rank is no longer lost when
    the first of two items ends)."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            plain = {k: v for k, v in VIP.items() if k != "perk"}
            r.configure({"vip_month": plain, "vip_year": plain})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            assert r.received() == [ADD, ADD]
            r.configure({"vip_month": VIP, "vip_year": VIP})
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year"))
            await r.deliver()
            assert r.received() == [ADD, ADD]
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "revoked"))
            await r.deliver()
            assert r.received() == [ADD, ADD, REMOVE]

    asyncio.run(main())


# --- one-time products and first-seen expired items ---------------------------------


def test_a_one_time_product_is_not_granted_on_a_server_added_later(tmp_path: Path) -> None:
    keys = {"once": True, "on_active": ["crate give {customer.name} 5"]}
    kit = {"on_active": ["kit give {customer.name}"]}

    async def main() -> None:
        async with rig(tmp_path, source=True) as r:
            r.configure({"keys": keys, "kit": kit}, servers=["survival"])
            await r.apply(item("1", "keys"), item("2", "kit"))
            r.configure({"keys": keys, "kit": kit})  # jail added
            await r.apply(item("1", "keys"), item("2", "kit"))
            await r.deliver()
            assert r.received("survival") == ["crate give Notch 5", "kit give Notch"]
            assert r.received("jail") == ["kit give Notch"]

    asyncio.run(main())


def test_an_item_first_seen_past_its_expiry_runs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.apply")

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP})
            r.clock.at = datetime(2023, 5, 12, tzinfo=UTC)  # a day after its expiry
            stale = item("1", "vip_month")
            await r.apply(stale)
            await r.apply(stale)
            assert await r.rows() == []
            assert await sweep_expiries(r.the_core.applier) == 0
            logged = [m for m in caplog.messages if "it is not granted" in m]
            assert logged == [
                "customer notch: item 1 (vip_month) is listed active but expired at "
                "2023-05-11T21:52:53+00:00: it is not granted (nothing runs for it)"
            ]
            # Renewed past now: granted like a new item.
            await r.apply(item("1", "vip_month", "renewed", expires_at="2023-06-11T00:00:00Z"))
            await r.deliver()
            assert r.received() == [ADD]

    asyncio.run(main())


# --- cancelled grants --------------------------------------------------------------------


def test_a_take_back_cancels_its_items_grants_that_wait(tmp_path: Path) -> None:
    """A delayed grant not due yet is cancelled by the revoke; a plain grant
    still pending (its server was down) is sent before the take-back."""
    vip = {
        **VIP,
        "on_active": [*VIP["on_active"],
                      {"run": "give {customer.minecraft.name} diamond 64", "delay_seconds": 600}],
    }  # fmt: skip

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip": vip})
            await r.apply(item("1", "vip"))
            rows = await r.the_core.store.rows("survival")
            assert [(x.status, x.not_before) for x in rows] == [
                (PENDING, None),
                (PENDING, APRIL + timedelta(seconds=600)),
            ]
            await r.apply(item("1", "vip", "revoked"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE]
            assert [s for *_, s in await r.rows()] == [
                DELIVERED,
                JournalStatus.CANCELLED,
                DELIVERED,
            ]

    asyncio.run(main())


ONLINE_VIP = {**VIP, "on_active": [{"run": VIP["on_active"][0], "online": True}]}


def test_a_kept_take_back_cancels_nothing(tmp_path: Path) -> None:
    """The monthly item's online-only grant is still unsent when it ends while
    the yearly item holds the rank through it: it stays, to be sent when the
    player is online."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": ONLINE_VIP, "vip_year": ONLINE_VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year"))
            assert [(i, e, s) for i, e, _, s in await r.rows()] == [
                ("1", "on_active", PENDING),
                ("2", "on_active", KEPT),
                ("1", "on_expire", KEPT),
            ]

    asyncio.run(main())


def test_the_last_take_back_cancels_every_waiting_grant_of_the_rank(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": ONLINE_VIP, "vip_year": ONLINE_VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year"))
            # Both end before the player came online: the grant of the monthly
            # item, which the yearly one held the rank through, goes too.
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "used"))
            await r.deliver()
            assert r.received() == [REMOVE]
            assert [(i, e, s) for i, e, _, s in await r.rows()] == [
                ("1", "on_active", JournalStatus.CANCELLED),
                ("2", "on_active", KEPT),
                ("1", "on_expire", KEPT),
                ("2", "on_expire", DELIVERED),
            ]

    asyncio.run(main())


def test_a_waiting_grant_the_rank_is_held_through_is_sent_when_the_player_joins(
    tmp_path: Path,
) -> None:
    """The monthly item's online-only grant waits for the player; the monthly
    item ends (kept: the yearly one holds the rank through that grant); the
    player joins: the grant is sent. Then the yearly one ends: taken back."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": ONLINE_VIP, "vip_year": ONLINE_VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year"))
            await r.deliver()
            assert r.received() == []
            assert [s for *_, s in await r.rows()] == [JournalStatus.WAITING, KEPT, KEPT]
            r.servers["survival"].players = {"Notch": UUID}
            r.clock.at += timedelta(minutes=1)
            await r.deliver()
            assert r.received() == [ADD]
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "revoked"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE]

    asyncio.run(main())


def test_a_grant_waiting_for_the_player_is_cancelled_when_the_rank_ends(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": ONLINE_VIP, "vip_year": ONLINE_VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.deliver()
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "revoked"))
            await r.deliver()
            # The cancelled grant holds nothing back: the take-back goes out at once.
            assert r.received() == [REMOVE]
            r.servers["survival"].players = {"Notch": UUID}
            r.clock.at += timedelta(minutes=1)
            await r.deliver()
            assert r.received() == [REMOVE]
            assert [(i, e, s) for i, e, _, s in await r.rows()] == [
                ("1", "on_active", JournalStatus.CANCELLED),
                ("2", "on_active", KEPT),
                # In the order they happened: the revoke, then the expiry.
                ("2", "on_revoke", KEPT),
                ("1", "on_expire", DELIVERED),
            ]

    asyncio.run(main())


def test_a_plain_grant_still_pending_is_sent_before_the_take_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            r.configure({"vip_month": VIP, "vip_year": VIP})
            await r.apply(item("1", "vip_month"), item("2", "vip_year"))
            await r.apply(item("1", "vip_month", "used"), item("2", "vip_year", "used"))
            await r.deliver()
            assert r.received() == [ADD, REMOVE]

    asyncio.run(main())


# --- store mode ----------------------------------------------------------------------


def test_store_mode_partial_answers_share_the_perk(tmp_path: Path) -> None:
    """New-items reads and snapshots hand partial answers: a new item joins the
    rank the stored marks say is held; a look-up's complete answer ends items."""

    async def main() -> None:
        async with rig(tmp_path) as r, FakeStore() as fake, make_session() as session:
            r.clock.at, r.paynow_store = datetime.now(UTC), fake
            customer = fake.add_customer("minecraft", name="steve")
            uuid = customer["minecraft_uuid"]
            add, remove = f"lp user {uuid} parent add vip", f"lp user {uuid} parent remove vip"
            month = fake.add_item(customer["id"], product="vip_month")["id"]
            year = fake.add_item(customer["id"], product="vip_year")["id"]
            r.configure({"vip_month": VIP, "vip_year": VIP})
            client = ManagementClient(session, fake.url, fake.store_id, fake.api_key,
                                      requests_per_second=0)  # fmt: skip
            source = r.the_core.store_source(client)
            assert await source.read_new_items()  # the cursor starts at the newest item
            assert await source.snapshot()  # both live items (a partial answer)
            await r.deliver()
            assert r.received() == [add]

            # A new item, read alone by the new-items read: it joins the held rank.
            third = fake.add_item(customer["id"], product="vip_month")["id"]
            assert await source.read_new_items()
            # Two items end: missing from the snapshot, the look-up reads them used.
            fake.use(month)
            fake.revoke(year, "refund")
            assert await source.snapshot()
            await r.deliver()
            assert r.received() == [add]
            statuses = {(i, e): s for i, e, _, s in await r.rows()}
            assert statuses == {
                (month, "on_active"): DELIVERED,
                (year, "on_active"): KEPT,
                (third, "on_active"): KEPT,
                (month, "on_expire"): KEPT,
                (year, "on_revoke"): KEPT,
            }
            # The last one ends: the rank is taken back.
            fake.revoke(third, "chargeback")
            assert await source.snapshot()
            await r.deliver()
            assert r.received() == [add, remove]

    asyncio.run(main())
