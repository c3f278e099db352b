"""What a lease tick changed for a host, and the log lines of a failover (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from daemon.fleet.leases import elsewhere_line, gained_line, read_tick, roles
from daemon.state.shared import LeaseState

AT = datetime(2026, 5, 1, 14, 3, 37, tzinfo=UTC)
ME, OTHER = "web-2:977:bb", "web-1:4242:aa"


def held(name: str, token: int, was: str | None = ME, stopped: bool = False) -> LeaseState:
    return LeaseState(name, token, AT, was, AT, "web-1 pid 4242" if was == OTHER else None, stopped)


def elsewhere(name: str, holder: str | None = OTHER) -> LeaseState:
    return LeaseState(name, None, None, holder, AT, "web-1 pid 4242" if holder else None)


def test_a_tick_tells_what_was_gained_kept_lost_and_who_holds_the_rest() -> None:
    before = {"poll": 3, "server:lobby": 7, "server:arena": 2}
    outcome = read_tick(
        before,
        {"server:survival": OTHER},
        [
            held("poll", 3),  # renewed
            held("server:lobby", 8, was=OTHER),  # another host held it in between
            elsewhere("server:arena"),  # taken by another host
            elsewhere("server:survival"),  # still the same holder: nothing to say
            held("server:kiosk", 1, was=None),  # free
        ],
    )
    assert [lease.name for lease in outcome.kept] == ["poll"]
    assert [lease.name for lease in outcome.gained] == ["server:lobby", "server:kiosk"]
    assert outcome.lost == ["server:lobby", "server:arena"]
    assert [lease.name for lease in outcome.held_elsewhere] == ["server:arena"]


def test_failover_lines_say_what_was_taken_from_whom_and_why() -> None:
    ran_out = held("poll", 4, was=OTHER)
    assert gained_line(ran_out, ME) == (
        "took over polling (held by web-1 pid 4242 until 14:03:37, its lease ran out)"
    )
    stopped = held("server:lobby", 2, was=OTHER, stopped=True)
    assert gained_line(stopped, ME) == (
        "took over delivering to lobby (held by web-1 pid 4242 until 14:03:37, it stopped)"
    )
    assert gained_line(held("poll", 1, was=None), ME) == "now polling (the lease was free)"
    assert elsewhere_line(elsewhere("server:lobby")) == (
        "standing by: delivering to lobby held by web-1 pid 4242 until 14:03:37"
    )
    assert roles(["server:lobby", "poll", "server:arena"]) == (
        "polling, delivering to arena, lobby"
    )
    assert roles([]) == ""
