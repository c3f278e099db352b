"""The pure RCON packet codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import RconProtocolError
from adapters.rcon_codec import (
    DEFAULT_MAX_PACKET_SIZE,
    INT32_MAX,
    INT32_MIN,
    MIN_PACKET_SIZE,
    SERVERDATA_AUTH,
    SERVERDATA_AUTH_RESPONSE,
    SERVERDATA_EXECCOMMAND,
    SERVERDATA_RESPONSE_VALUE,
    Packet,
    PacketDecoder,
    decode_packet,
    encode_packet,
)


def test_type_constants_match_the_protocol() -> None:
    assert (SERVERDATA_AUTH, SERVERDATA_AUTH_RESPONSE) == (3, 2)
    assert (SERVERDATA_EXECCOMMAND, SERVERDATA_RESPONSE_VALUE) == (2, 0)


def test_encode_layout_is_little_endian_with_two_nuls() -> None:
    data = encode_packet(7, SERVERDATA_EXECCOMMAND, b"list")
    assert data == struct.pack("<iii", 14, 7, 2) + b"list\x00\x00"
    assert encode_packet(-1, 2) == b"\x0a\x00\x00\x00\xff\xff\xff\xff\x02\x00\x00\x00\x00\x00"


def test_encode_refuses_nul_in_body_and_out_of_range_ids() -> None:
    with pytest.raises(ValueError):
        encode_packet(1, 2, b"a\x00b")
    with pytest.raises(ValueError):
        encode_packet(INT32_MAX + 1, 2)
    with pytest.raises(ValueError):
        encode_packet(1, INT32_MIN - 1)


def test_srcds_end_packet_body_is_00_01_00_00() -> None:
    # What SRCDS sends after mirroring an empty RESPONSE_VALUE, byte for byte.
    wire = struct.pack("<iii", 14, 5, 0) + b"\x00\x01\x00\x00\x00\x00"
    assert decode_packet(wire) == Packet(5, 0, b"\x00\x01\x00\x00")


bodies = st.binary(max_size=600).map(lambda b: b.replace(b"\x00", b"x"))
packets = st.builds(
    Packet,
    st.integers(INT32_MIN, INT32_MAX),
    st.sampled_from([0, 2, 3, 200, -5]),
    bodies,
)


@given(packets)
def test_round_trip(packet: Packet) -> None:
    assert decode_packet(encode_packet(*packet)) == packet


@settings(max_examples=200)
@given(st.lists(packets, max_size=8), st.data())
def test_incremental_decoding_across_arbitrary_splits(
    plist: list[Packet], data: st.DataObject
) -> None:
    wire = b"".join(encode_packet(*p) for p in plist)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = PacketDecoder()
    out: list[Packet] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out.extend(decoder.feed(wire[prev:cut]))
        prev = cut
    assert out == plist
    assert decoder.pending_bytes == 0


def test_byte_at_a_time() -> None:
    plist = [Packet(1, 0, b"a" * 100), Packet(2, 0, b""), Packet(3, 2, "é".encode())]
    wire = b"".join(encode_packet(*p) for p in plist)
    decoder = PacketDecoder()
    out = []
    for i in range(len(wire)):
        out.extend(decoder.feed(wire[i : i + 1]))
        if i < len(wire) - 1:
            assert len(out) < 3
    assert out == plist


def test_partial_packet_is_kept_until_complete() -> None:
    wire = encode_packet(9, 0, b"hello")
    decoder = PacketDecoder()
    assert decoder.feed(wire[:-1]) == []
    assert decoder.pending_bytes == len(wire) - 1
    assert decoder.feed(wire[-1:]) == [Packet(9, 0, b"hello")]


@pytest.mark.parametrize("size", [-1, 0, 9, DEFAULT_MAX_PACKET_SIZE + 1, 0x50545448])
def test_bad_sizes_raise(size: int) -> None:
    decoder = PacketDecoder()
    with pytest.raises(RconProtocolError, match="invalid packet size"):
        decoder.feed(struct.pack("<i", size) + b"\x00" * 20)
    # The decoder stays broken: the connection must be dropped.
    with pytest.raises(RconProtocolError):
        decoder.feed(encode_packet(1, 0, b"ok"))


def test_http_answer_is_a_protocol_error() -> None:
    with pytest.raises(RconProtocolError):
        PacketDecoder().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_size_bounds_are_inclusive_and_configurable() -> None:
    assert decode_packet(encode_packet(1, 0)).body == b""
    biggest = b"x" * (DEFAULT_MAX_PACKET_SIZE - MIN_PACKET_SIZE)
    assert decode_packet(encode_packet(1, 0, biggest)).body == biggest
    with pytest.raises(RconProtocolError):
        decode_packet(encode_packet(1, 0, biggest + b"x"))
    big = b"y" * 12288
    assert decode_packet(encode_packet(1, 0, big), max_size=12298).body == big
    with pytest.raises(ValueError):
        PacketDecoder(max_size=9)


def test_decode_packet_wants_exactly_one() -> None:
    one = encode_packet(1, 0, b"a")
    with pytest.raises(RconProtocolError):
        decode_packet(one + one)
    with pytest.raises(RconProtocolError):
        decode_packet(one[:-1])


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", '1347703880 (bytes "HTTP", expected 10..4106)'),
        (b"SSH-2.0-OpenSSH_9.6\r\n", '759714643 (bytes "SSH-", expected 10..4106)'),
        (
            b"\x15\x03\x01\x00\x02\x02\x46",
            '66325 (bytes "\\x15\\x03\\x01\\x00", a TLS record,',
        ),
        (b'\x05\x00"\\ garbage', '1545732101 (bytes "\\x05\\x00\\x22\\x5c", expected 10..4106)'),
    ],
)
def test_bad_size_message_shows_the_bytes_and_asks_about_the_port(
    answer: bytes, shown: str
) -> None:
    with pytest.raises(RconProtocolError) as info:
        PacketDecoder(max_size=4106).feed(answer)
    message = str(info.value)
    assert f"invalid packet size {shown}" in message
    assert message.endswith(": is this an RCON port?")
    assert message.isprintable()  # one line, whatever the peer sent
