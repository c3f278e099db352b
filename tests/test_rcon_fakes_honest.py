"""The fake servers are only worth something if they behave like the real ones.

Here they are driven by third-party clients that work against real servers:
``mcrcon`` (a Minecraft RCON client) against the vanilla fake and
``python-valve`` (a Source RCON client) against the SRCDS fake, plus raw
sockets for what those clients cannot show (vanilla dropping a connection
whose read holds two packets). The blocking clients run in the main thread
(mcrcon needs SIGALRM); the fake runs in a background thread's event loop.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
import valve.rcon
from mcrcon import MCRcon, MCRconException

from daemon.presence import player_list
from daemon.replies import ReplyRules, Verdict
from tests.fakes.rcon_server import FakeRconServer, ThreadedServer, running_in_thread

PASSWORD = "s3cret-pw"


@pytest.fixture
def minecraft() -> Iterator[ThreadedServer]:
    with running_in_thread(FakeRconServer("minecraft", PASSWORD)) as threaded:
        yield threaded


@pytest.fixture
def srcds() -> Iterator[ThreadedServer]:
    with running_in_thread(FakeRconServer("srcds", PASSWORD)) as threaded:
        yield threaded


def _packet(request_id: int, packet_type: int, body: bytes) -> bytes:
    return struct.pack("<iii", len(body) + 10, request_id, packet_type) + body + b"\x00\x00"


def _recv_packet(sock: socket.socket) -> tuple[int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    (size,) = struct.unpack("<i", exactly(4))
    payload = exactly(size)
    request_id, packet_type = struct.unpack("<ii", payload[:8])
    return request_id, packet_type, payload[8:-2]


def _closed_by_server(sock: socket.socket) -> bool:
    """EOF, or a reset (closing a socket with unread input sends RST, in Java too)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- vanilla Minecraft fake, driven by mcrcon --------------------------------


def test_mcrcon_auth_command_reply(minecraft: ThreadedServer) -> None:
    minecraft.server.reply = lambda c: f"There are 0 of a max of 20 players online: ({c})"
    with MCRcon("127.0.0.1", PASSWORD, port=minecraft.port, timeout=3) as mcr:
        assert mcr.command("list") == "There are 0 of a max of 20 players online: (list)"
        assert mcr.command("say héllo") == "There are 0 of a max of 20 players online: (say héllo)"
    assert minecraft.server.commands == ["list", "say héllo"]
    assert minecraft.server.auth_attempts == 1
    assert minecraft.server.violations == 0


def test_mcrcon_wrong_password_raises(minecraft: ThreadedServer) -> None:
    client = MCRcon("127.0.0.1", "not-" + PASSWORD, port=minecraft.port, timeout=3)
    try:
        with pytest.raises(MCRconException, match="Login failed"):
            client.connect()
    finally:
        client.disconnect()
    assert minecraft.server.auth_attempts == 1
    assert minecraft.server.commands == []


def test_mcrcon_unknown_type_gets_unknown_request_hex(minecraft: ThreadedServer) -> None:
    # What our client's end-of-reply marker relies on (type 200 = 0xc8).
    with MCRcon("127.0.0.1", PASSWORD, port=minecraft.port, timeout=3) as mcr:
        assert mcr._send(200, "") == "Unknown request c8"
        assert mcr._send(0, "") == "Unknown request 0"
    assert minecraft.server.commands == []


def test_vanilla_command_before_auth_gets_auth_failure(minecraft: ThreadedServer) -> None:
    with _connect(minecraft.port) as sock:
        sock.sendall(_packet(5, 2, b"op eve"))
        assert _recv_packet(sock) == (-1, 2, b"")
        sock.sendall(_packet(6, 3, PASSWORD.encode()))
        assert _recv_packet(sock) == (6, 2, b"")
        sock.sendall(_packet(7, 2, b"op bob"))
        assert _recv_packet(sock) == (7, 0, b"op bob")
    assert minecraft.server.commands == ["op bob"]


def test_vanilla_splits_long_replies_every_4096_code_units(minecraft: ThreadedServer) -> None:
    text = "é" * 5000  # 5000 code units: 4096 + 904, i.e. 8192 + 1808 bytes
    minecraft.server.reply = lambda c: text
    with _connect(minecraft.port) as sock:
        sock.sendall(_packet(1, 3, PASSWORD.encode()))
        _recv_packet(sock)
        sock.sendall(_packet(2, 2, b"data get"))
        first = _recv_packet(sock)
        second = _recv_packet(sock)
    assert (first[0], first[1], len(first[2])) == (2, 0, 8192)
    assert (second[0], second[1], len(second[2])) == (2, 0, 1808)
    assert (first[2] + second[2]).decode() == text


def test_vanilla_drops_a_connection_whose_read_holds_two_packets(minecraft: ThreadedServer) -> None:
    """Pipelining loses commands: vanilla checks size == bytes_read - 4 and hangs up."""
    with _connect(minecraft.port) as sock:
        sock.sendall(_packet(1, 3, PASSWORD.encode()))
        assert _recv_packet(sock) == (1, 2, b"")
        # python-valve style: the command and an empty RESPONSE_VALUE together.
        sock.sendall(_packet(2, 2, b"give bob diamond") + _packet(3, 0, b""))
        assert _closed_by_server(sock)  # no reply, connection gone
    assert minecraft.server.commands == []
    assert minecraft.server.violations == 1


def test_vanilla_drops_a_command_over_1446_bytes(minecraft: ThreadedServer) -> None:
    with _connect(minecraft.port) as sock:
        sock.sendall(_packet(1, 3, PASSWORD.encode()))
        _recv_packet(sock)
        sock.sendall(_packet(2, 2, b"s" * 1446))
        assert _recv_packet(sock) == (2, 0, b"s" * 1446)
        sock.sendall(_packet(3, 2, b"s" * 1447))
        assert _closed_by_server(sock)
    assert minecraft.server.commands == ["s" * 1446]


NOTCH = ("Notch", "069a79f4-44e9-4726-a5be-fca90e38aaf5")
JEB = ("jeb_", "853c80ef-3c37-49fd-aa49-938b674adae6")


def test_mcrcon_sees_vanillas_list_uuids(minecraft: ThreadedServer) -> None:
    with MCRcon("127.0.0.1", PASSWORD, port=minecraft.port, timeout=3) as mcr:
        assert mcr.command("minecraft:list uuids") == "There are 0 of a max of 20 players online: "
        minecraft.server.players = dict([NOTCH, JEB])
        reply = mcr.command("minecraft:list uuids")
        assert mcr.command("list uuids") == reply
    assert reply == (
        "There are 2 of a max of 20 players online: "
        "Notch (069a79f4-44e9-4726-a5be-fca90e38aaf5), jeb_ (853c80ef-3c37-49fd-aa49-938b674adae6)"
    )
    assert player_list("minecraft").ids(reply) == {
        "069a79f444e94726a5befca90e38aaf5",
        "853c80ef3c3749fdaa49938b674adae6",
    }
    assert minecraft.server.list_reads == 3


@pytest.mark.parametrize("game", ["vanilla", "paper"])
def test_mcrcon_sees_the_unknown_command_reply(game: str) -> None:
    server = FakeRconServer("minecraft", PASSWORD, game=game)  # type: ignore[arg-type]
    server.known_commands = frozenset({"give", "list"})
    with (
        running_in_thread(server) as threaded,
        MCRcon("127.0.0.1", PASSWORD, port=threaded.port, timeout=3) as mcr,
    ):
        unknown = mcr.command("lp usr Notch parent add vip")
        assert mcr.command("give Notch diamond 1") == "give Notch diamond 1"
        assert "players online" in mcr.command("minecraft:list uuids")
    if game == "vanilla":
        expected = (
            "Unknown or incomplete command, see below for errorlp usr Notch parent add vip<--[HERE]"
        )
    else:
        expected = 'Unknown command. Type "/help" for help.\n'
    assert unknown == expected
    assert ReplyRules.of("minecraft").judge(unknown, online=False).verdict is Verdict.REJECTED


# -- SRCDS fake, driven by python-valve --------------------------------------


# SteamID64s of accounts 46143802 (even) and 99999999 (odd).
M0UKA, ODD = "76561198006409530", "76561198060265727"


@pytest.mark.parametrize("game", ["tf2", "css", "gmod", "csgo"])
def test_python_valve_sees_each_games_status(game: str) -> None:
    server = FakeRconServer("srcds", PASSWORD, game=game)  # type: ignore[arg-type]
    server.players = {"m0uka": M0UKA, 'Bob "the" [U:1:1]': ODD}
    with (
        running_in_thread(server) as threaded,
        valve.rcon.RCON(("127.0.0.1", threaded.port), PASSWORD, timeout=3) as rcon,
    ):
        reply = rcon("status")
        threaded.server.players = {}
        empty = rcon("status")
    header = "# userid name"
    assert header in reply and header in empty
    assert player_list("source").ids(reply) == {"46143802", "99999999"}
    assert player_list("source").ids(empty) == set()
    form = {"tf2": "[U:1:46143802]", "csgo": "STEAM_1:0:23071901"}.get(game, "STEAM_0:0:23071901")
    assert '"m0uka"' in reply and form in reply


def test_python_valve_sees_a_long_status_whole(srcds: ThreadedServer) -> None:
    srcds.server.players = {f"player{n:03d}": str(76561198000000000 + n) for n in range(100)}
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        reply = rcon("status")
    assert len(reply.encode()) > 4096  # several packets
    assert len(player_list("source").ids(reply) or ()) == 100


def test_python_valve_sees_the_unknown_command_reply(srcds: ThreadedServer) -> None:
    srcds.server.known_commands = frozenset({"sm_addvip", "status"})
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        unknown = rcon('sm_addvp "STEAM_0:0:1" warden')
        assert rcon('sm_addvip "STEAM_0:0:1" warden') == 'sm_addvip "STEAM_0:0:1" warden'
    assert unknown == 'Unknown command "sm_addvp"\n'
    assert ReplyRules.of("source").judge(unknown, online=False).verdict is Verdict.REJECTED


def test_python_valve_auth_command_reply(srcds: ThreadedServer) -> None:
    srcds.server.reply = lambda c: f"hostname: fake ({c})\n"
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        assert rcon("hostname") == "hostname: fake (hostname)\n"
        assert rcon("sm_admin bob") == "hostname: fake (sm_admin bob)\n"
    assert srcds.server.commands == ["hostname", "sm_admin bob"]
    assert srcds.server.auth_attempts == 1


def test_python_valve_multi_packet_reply(srcds: ThreadedServer) -> None:
    text = "".join(f'cvar_{i:05d} : 1 : , "sv" : description\n' for i in range(400))
    assert len(text) > 3 * 4096
    srcds.server.reply = lambda c: text
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        assert rcon("cvarlist") == text
        assert rcon("echo after") == text  # the terminator packets did not leak
    assert srcds.server.commands == ["cvarlist", "echo after"]


def test_python_valve_empty_reply(srcds: ThreadedServer) -> None:
    srcds.server.reply = lambda c: ""
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        assert rcon("sv_cheats 0") == ""


def test_python_valve_wrong_password(srcds: ThreadedServer) -> None:
    rcon = valve.rcon.RCON(("127.0.0.1", srcds.port), "nope", timeout=3)
    rcon.connect()
    try:
        with pytest.raises(valve.rcon.RCONAuthenticationError):
            rcon.authenticate()
    finally:
        rcon.close()
    assert srcds.server.auth_attempts == 1
    assert srcds.server.commands == []


def test_srcds_auth_sends_empty_response_value_first(srcds: ThreadedServer) -> None:
    with _connect(srcds.port) as sock:
        sock.sendall(_packet(11, 3, b"wrong"))
        assert _recv_packet(sock) == (11, 0, b"")
        assert _recv_packet(sock) == (-1, 2, b"")
        sock.sendall(_packet(12, 3, PASSWORD.encode()))
        assert _recv_packet(sock) == (12, 0, b"")
        assert _recv_packet(sock) == (12, 2, b"")


def test_srcds_mirror_then_00_01_00_00(srcds: ThreadedServer) -> None:
    srcds.server.reply = lambda c: "x" * 5000
    with _connect(srcds.port) as sock:
        sock.sendall(_packet(1, 3, PASSWORD.encode()))
        _recv_packet(sock), _recv_packet(sock)
        sock.sendall(_packet(2, 2, b"cvarlist") + _packet(3, 0, b""))
        got = [_recv_packet(sock) for _ in range(4)]
    assert [(i, t) for i, t, _ in got] == [(2, 0), (2, 0), (3, 0), (3, 0)]
    assert got[0][2] + got[1][2] == b"x" * 5000
    assert got[2][2] == b""
    assert got[3][2] == b"\x00\x01\x00\x00"


def test_srcds_command_before_auth_does_not_run(srcds: ThreadedServer) -> None:
    with _connect(srcds.port) as sock:
        sock.sendall(_packet(4, 2, b"quit") + _packet(5, 0, b""))
        assert _recv_packet(sock) == (4, 0, b"")
        assert _recv_packet(sock) == (5, 0, b"")  # mirror only: no RequestValue unauthenticated
    assert srcds.server.commands == []


def test_srcds_refuses_commands_over_510_bytes(srcds: ThreadedServer) -> None:
    with valve.rcon.RCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        assert rcon("e" * 510) == "e" * 510
        assert "overflows the tokenizer buffer" in rcon("e" * 511)
    assert srcds.server.commands == ["e" * 510]


class NumberedRCON(valve.rcon.RCON):  # type: ignore[misc]
    """python-valve, but numbering its requests 1, 2, 3 ... instead of sending 0.

    python-valve gives a joined reply the id of the reply's first packet, so
    with distinct ids it shows whose answer a reply starts with.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.last_id = 0

    def _request(self, type_: object, body: str) -> None:
        self.last_id += 1
        self._socket.sendall(valve.rcon.RCONMessage(self.last_id, type_, body).encode())


def test_python_valve_sees_each_reply_start_with_the_commands_own_packet(
    srcds: ThreadedServer,
) -> None:
    """What our client relies on: SRCDS flushes the console output of every
    packet it handles as a RESPONSE_VALUE with that packet's id, even when
    there is no output, so a command's answer precedes the end marker's mirror."""
    with NumberedRCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        for output in ["", "x" * 5000, ""]:
            srcds.server.reply = lambda c, output=output: output
            reply = rcon.execute("sv_cheats 0")
            command_id = rcon.last_id - 1  # then came the end marker
            assert srcds.server.packets_of_type(2)[-1].request_id == command_id
            assert (reply.id, reply.body) == (command_id, output.encode())


def test_marker_only_fault_is_the_bare_end_marker(srcds: ThreadedServer) -> None:
    """The fault our client must not take for a delivery: to python-valve it is
    an empty reply, told apart only by its id, the end marker's."""
    with NumberedRCON(("127.0.0.1", srcds.port), PASSWORD, timeout=3) as rcon:
        srcds.server.arm("marker_only_reply")
        reply = rcon.execute("sm_addvip bob")
        assert (reply.id, reply.body) == (rcon.last_id, b"")
    assert srcds.server.commands == []


def test_srcds_empty_output_still_gets_its_own_packet(srcds: ThreadedServer) -> None:
    srcds.server.reply = lambda c: ""
    with _connect(srcds.port) as sock:
        sock.sendall(_packet(1, 3, PASSWORD.encode()))
        _recv_packet(sock), _recv_packet(sock)
        sock.sendall(_packet(2, 2, b"sv_cheats 0") + _packet(3, 0, b""))
        got = [_recv_packet(sock) for _ in range(3)]
    assert got == [(2, 0, b""), (3, 0, b""), (3, 0, b"\x00\x01\x00\x00")]
