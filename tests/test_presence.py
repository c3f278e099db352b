"""The player lists servers print, read as ids; and what a reply to a command says.

The samples are what the servers print (vanilla and Paper `list uuids`; the
`status` of CS:S, TF2, Garry's Mod, CS:GO and CS2), with the players
changed to known accounts.
"""

from __future__ import annotations

import pytest

from daemon.presence import customer_key, player_key, player_list
from daemon.replies import ReplyRules, Verdict

NOTCH = "069a79f4-44e9-4726-a5be-fca90e38aaf5"
JEB = "853c80ef-3c37-49fd-aa49-938b674adae6"
NOTCH_KEY = "069a79f444e94726a5befca90e38aaf5"

# m0uka: SteamID64 76561198006409530 = STEAM_0:0:23071901 = [U:1:46143802].
M0UKA_64 = "76561198006409530"
M0UKA = "46143802"  # its key: the account number
OTHER = "99999999"  # [U:1:99999999] = STEAM_1:1:49999999

VANILLA_TWO = f"There are 2 of a max of 20 players online: Notch ({NOTCH}), jeb_ ({JEB})"
VANILLA_NONE = "There are 0 of a max of 20 players online: "
# Paper runs vanilla's command; a Bukkit-side message ends with a newline.
PAPER_ONE = f"There are 1 of a max of 100 players online: Notch ({NOTCH})\n"
# Minecraft before 1.13 (no namespaces: Spigot 1.12 still has minecraft:list).
LEGACY_ONE = f"There are 1/20 players online:Notch ({NOTCH})"

TF2 = f"""hostname: Valve Matchmaking Server (Virginia iad-1/srcds1009 #61)
version : 8604597/24 8604597 secure
udp/ip  : 169.254.156.123:44339  (public ip: 162.254.192.155)
steamid : [G:1:1234567] (85568392921274567)
account : not logged in  (No account specified)
map     : pl_upward at: 0 x, 0 y, 0 z
tags    : cp,increased_maxplayers,payload,valve
players : 3 humans, 1 bots (32 max)
edicts  : 1182 used of 2048 max
# userid name                uniqueid            connected ping loss state  adr
#    422 "m0uka"             [U:1:{M0UKA}]      32:07       54    0 active
#    431 "Bob, the builder"  [U:1:{OTHER}]      1:02:03     78    0 active
#    433 "Heavy Weapons Guy" BOT                                     active
"""

CSS = """hostname: Counter-Strike: Source
version : 7968474/24 7968474 secure
udp/ip  : 10.0.0.2:27015  (public ip: 203.0.113.7)
account : not logged in  (No account specified)
map     : de_dust2 at: 0 x, 0 y, 0 z
tags    : increased_maxplayers,startmoney
players : 1 humans, 1 bots (16/0 max) (not hibernating)

# userid name uniqueid connected ping loss state adr
#     2 "m0uka" STEAM_0:0:23071901 01:23 38 0 active 10.0.0.5:27005
#     3 "BOT Zach" BOT active
"""

GMOD = """hostname: Garry's Mod
version : 2023.06.28/24 9084 secure
udp/ip  : 10.0.0.2:27015  (public ip: 203.0.113.7)
map     : gm_construct at: 0 x, 0 y, 0 z
players : 1 (32 max)

# userid name                uniqueid            connected ping loss state  adr
#      2 "m0uka"             STEAM_0:0:23071901  05:11       40    0 active 10.0.0.5:27005
"""

CSGO = """Connected to =[A:1:1854291972:19856]:0
hostname: Valve CS:GO EU West Server (srcds112-fra2.271.194)
version : 1.38.2.2 secure
os      :  Linux
type    :  official dedicated
map     : de_dust2
players : 2 humans, 1 bots (16/0 max) (not hibernating)

# userid name uniqueid connected ping loss state rate adr
# 93 2 "m0uka" STEAM_1:0:23071901 00:21 31 0 active 196608 10.0.0.5:27005
# 91 3 "ERZ" STEAM_1:1:49999999 06:21 49 0 active 128000 10.0.0.6:27005
#103 "Jeff" BOT active 64
#end
"""

# CS2's status shows no Steam ids: it needs players_command/players_pattern.
CS2 = """Server:  Running [0.0.0.0:27015]
Client:  Disconnected
Source TV:  Not Active
---------players--------
  id     time ping loss      state   rate adr name
65535 [NoChan]    0    0 challenging      0unknown ''
    2      00:18   32    0     active 786432 10.0.0.5:27005 'm0uka'
#end
"""


def ids(platform: str, reply: str) -> frozenset[str] | None:
    return player_list(platform).ids(reply)


# --- Minecraft -----------------------------------------------------------------


def test_minecraft_reads_the_list_with_the_namespaced_command() -> None:
    assert player_list("minecraft").command == "minecraft:list uuids"
    assert player_list("minecraft", command="list uuids").command == "list uuids"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (VANILLA_TWO, {NOTCH_KEY, JEB.replace("-", "")}),
        (VANILLA_NONE, set()),
        (PAPER_ONE, {NOTCH_KEY}),
        (LEGACY_ONE, {NOTCH_KEY}),
        # Formatting codes around a name change nothing.
        (f"There are 1 of a max of 20 players online: §aNotch§r ({NOTCH})", {NOTCH_KEY}),
    ],
)
def test_minecraft_lists_give_the_uuids(reply: str, expected: set[str]) -> None:
    assert ids("minecraft", reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        # `list uuids` answered by something else: unknown, not "nobody is online".
        "Unknown or incomplete command, see below for errorminecraft:list uuids<--[HERE]",
        # EssentialsX's own list (`players_command: list` without a pattern).
        "§6There are §c1§6 out of maximum §c20§6 players online.\n§6default§r: Notch§f",
        "",
    ],
)
def test_a_minecraft_reply_that_is_no_player_list_is_unknown(reply: str) -> None:
    assert ids("minecraft", reply) is None


def test_a_minecraft_uuid_outside_parentheses_is_no_player() -> None:
    assert ids("minecraft", f"There are 1 of a max of 20 players online: {NOTCH}") == set()


@pytest.mark.parametrize("uuid", [NOTCH, NOTCH.upper(), NOTCH_KEY, NOTCH_KEY.upper()])
def test_the_customers_uuid_matches_in_any_case_with_or_without_dashes(uuid: str) -> None:
    assert customer_key("minecraft", {"minecraft_uuid": uuid}) == NOTCH_KEY
    reply = f"There are 1 of a max of 20 players online: Notch ({uuid})"
    assert ids("minecraft", reply) == {NOTCH_KEY}


# --- Source --------------------------------------------------------------------


def test_source_reads_the_list_with_status() -> None:
    assert player_list("source").command == "status"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (TF2, {M0UKA, OTHER}),  # SteamID3
        (CSS, {M0UKA}),  # SteamID2, universe 0
        (GMOD, {M0UKA}),
        (CSGO, {M0UKA, OTHER}),  # SteamID2, universe 1; userid and slot
    ],
    ids=["tf2", "css", "gmod", "csgo"],
)
def test_source_status_gives_the_steam_accounts(reply: str, expected: set[str]) -> None:
    assert ids("source", reply) == expected


def test_source_status_without_players_is_an_empty_list() -> None:
    header = "# userid name                uniqueid            connected ping loss state  adr\n"
    assert ids("source", "hostname: x\nplayers : 0 (32 max)\n\n" + header) == set()


def test_cs2_status_shows_no_ids_so_it_is_no_player_list() -> None:
    assert ids("source", CS2) is None
    assert ids("source", 'Unknown command "status"\n') is None


def test_the_id_is_never_taken_from_a_name() -> None:
    # Names that hold ids, quotes and whole fake lines of their own.
    reply = (
        "# userid name uniqueid connected ping loss state adr\n"
        f'#     2 "[U:1:{M0UKA}]" [U:1:{OTHER}] 01:23 38 0 active 10.0.0.5:27005\n'
        f'#     3 "x" STEAM_0:0:23071901 00:01 5 0 active" BOT active\n'
        f'#     4 "STEAM_0:0:23071901" STEAM_ID_PENDING 00:01 5 0 spawning\n'
    )
    assert ids("source", reply) == {OTHER}


@pytest.mark.parametrize(
    "written", [M0UKA_64, "STEAM_0:0:23071901", "STEAM_1:0:23071901", f"[U:1:{M0UKA}]"]
)
def test_every_steam_id_form_names_the_same_account(written: str) -> None:
    assert player_key("source", written) == M0UKA
    assert customer_key("source", {"steam_id": M0UKA_64}) == M0UKA


@pytest.mark.parametrize(
    "text", ["BOT", "STEAM_ID_PENDING", "STEAM_ID_LAN", "m0uka", "[U:1:0]", "[A:1:123:4]", "123"]
)
def test_what_is_no_steam_id(text: str) -> None:
    assert player_key("source", text) is None


def test_customers_without_the_id_have_no_key() -> None:
    assert customer_key("source", {"steam_id": None}) is None
    assert customer_key("minecraft", {}) is None
    assert customer_key("minecraft", {"minecraft_uuid": "Notch"}) is None


def test_a_players_pattern_replaces_the_default_and_reads_any_reply() -> None:
    # A game whose list prints one `<SteamID64> <name>` per line.
    listing = f"{M0UKA_64} m0uka\n76561198060265727 other\n"
    custom = player_list("source", command="listplayers", pattern=r"^(\d{17}) ")
    assert (custom.command, custom.ids(listing)) == ("listplayers", {M0UKA, OTHER})
    named = player_list("source", pattern=r"^(\S+) (?P<id>\d{17})$")
    assert named.ids(f"x {M0UKA_64}\n") == {M0UKA}
    assert custom.ids("") == set()


# --- replies ---------------------------------------------------------------------


MINECRAFT = ReplyRules.of("minecraft")
SOURCE = ReplyRules.of("source")


@pytest.mark.parametrize(
    ("reply", "pattern"),
    [
        (f"Unknown or incomplete command, see below for errorlp usr {NOTCH}<--[HERE]",
         "Unknown or incomplete command"),
        ("Incorrect argument for command...et day foo<--[HERE]", "Incorrect argument for command"),
        ('Unknown command. Type "/help" for help.\n', "Unknown command"),
    ],
)  # fmt: skip
def test_minecraft_error_replies_reject(reply: str, pattern: str) -> None:
    judgement = MINECRAFT.judge(reply, online=False)
    assert (judgement.verdict, judgement.pattern) == (Verdict.REJECTED, pattern)


def test_source_error_replies_start_a_line() -> None:
    assert SOURCE.judge('Unknown command "sm_addvp"\n', online=False).verdict is Verdict.REJECTED
    assert SOURCE.judge('L 01/01\nUnknown command "x"\n', online=False).verdict is Verdict.REJECTED
    said = SOURCE.judge("Console: Unknown command is a fine band\n", online=False)
    assert said.verdict is Verdict.DELIVERED


@pytest.mark.parametrize(
    "reply",
    ["", "[LP] Notch now inherits permissions from vip in context global.", "Gave 64 [Diamond]"],
)
def test_other_replies_are_delivered(reply: str) -> None:
    assert MINECRAFT.judge(reply, online=True).verdict is Verdict.DELIVERED


def test_no_player_found_sends_an_online_only_command_back_to_waiting() -> None:
    assert MINECRAFT.judge("No player was found", online=True).verdict is Verdict.OFFLINE
    # Not online-only: the operator chose to send it anyway.
    assert MINECRAFT.judge("No player was found", online=False).verdict is Verdict.DELIVERED


def test_a_servers_own_replies_are_searched_anywhere() -> None:
    rules = ReplyRules.of(
        "source", error_replies=[r"could not be found\.$"], offline_replies=["No matching client"]
    )
    lost = rules.judge("[LP] A group named vipp could not be found.\n", online=True)
    assert (lost.verdict, lost.pattern) == (Verdict.REJECTED, r"could not be found\.$")
    away = rules.judge("[SM] No matching client was found.", online=True)
    assert (away.verdict, away.pattern) == (Verdict.OFFLINE, "No matching client")
    assert rules.judge('Unknown command "x"', online=False).verdict is Verdict.REJECTED
    assert rules.error_in("all fine") is None
