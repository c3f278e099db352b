"""The RCON packet codec: bytes in, packets out. No I/O.

Wire format (Valve's "Source RCON Protocol", also spoken by Minecraft)::

    int32 LE size   # bytes that follow: 4 (id) + 4 (type) + len(body) + 2
    int32 LE id     # chosen by the client, echoed by the server (-1: bad password)
    int32 LE type   # see the SERVERDATA_* constants
    body            # bytes, no NUL inside
    b"\\x00\\x00"    # body terminator + empty-string terminator

so the smallest packet has ``size == 10`` (empty body).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from adapters.base import RconProtocolError

SERVERDATA_AUTH = 3
SERVERDATA_AUTH_RESPONSE = 2
SERVERDATA_EXECCOMMAND = 2
SERVERDATA_RESPONSE_VALUE = 0

# id the server puts in an AUTH_RESPONSE (and, on Minecraft, in the reply to a
# command sent before authenticating) when the password is wrong.
AUTH_FAILED_ID = -1

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

# Size field of an empty-bodied packet: id + type + two NULs.
MIN_PACKET_SIZE = 10
# Default upper bound for the size field of a reply: a 4096-byte body. Callers
# pass their own bound where a platform legitimately sends bigger packets
# (vanilla Minecraft: see adapters/rcon.py).
DEFAULT_MAX_PACKET_SIZE = 4096 + MIN_PACKET_SIZE

_HEADER = struct.Struct("<iii")
_SIZE = struct.Struct("<i")
_ID_TYPE = struct.Struct("<ii")
_TERMINATOR = b"\x00\x00"


class Packet(NamedTuple):
    request_id: int
    type: int
    body: bytes


def encode_packet(request_id: int, packet_type: int, body: bytes = b"") -> bytes:
    """One packet, ready to write. ``body`` must not contain NUL bytes."""
    if not INT32_MIN <= request_id <= INT32_MAX:
        raise ValueError(f"request id {request_id} is outside int32")
    if not INT32_MIN <= packet_type <= INT32_MAX:
        raise ValueError(f"packet type {packet_type} is outside int32")
    if b"\x00" in body:
        raise ValueError("an RCON body cannot contain NUL bytes")
    return _HEADER.pack(len(body) + MIN_PACKET_SIZE, request_id, packet_type) + body + _TERMINATOR


def decode_packet(data: bytes, *, max_size: int = DEFAULT_MAX_PACKET_SIZE) -> Packet:
    """Decode exactly one whole packet (no more, no less)."""
    decoder = PacketDecoder(max_size=max_size)
    packets = decoder.feed(data)
    if len(packets) != 1 or decoder.pending_bytes:
        raise RconProtocolError(
            f"expected exactly one packet, got {len(packets)} and "
            f"{decoder.pending_bytes} bytes left over"
        )
    return packets[0]


class PacketDecoder:
    """Incremental decoder: feed it whatever the socket returned, get whole packets.

    Bytes may arrive split anywhere (inside the size field, the header, the body)
    or several packets at once; ``feed`` returns the packets completed so far and
    keeps the rest. A size field below 10 or above ``max_size`` raises
    RconProtocolError (the peer is not speaking RCON, e.g. an HTTP server answers
    with b"HTTP", which reads as a size of about 1.3 billion; the message shows
    those four bytes). After an error the decoder is unusable; the connection
    must be dropped.

    The last two bytes of each packet are the terminators and are stripped
    without being checked: every server we target sends NULs there, and the
    size check already catches a peer that is not RCON.
    """

    __slots__ = ("_broken", "_buf", "max_size")

    def __init__(self, *, max_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        if max_size < MIN_PACKET_SIZE:
            raise ValueError(f"max_size must be at least {MIN_PACKET_SIZE}")
        self.max_size = max_size
        self._buf = bytearray()
        self._broken = False

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a whole packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        if self._broken:
            raise RconProtocolError("decoder already failed on an invalid packet")
        buf = self._buf
        buf += data
        packets: list[Packet] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _SIZE.unpack_from(buf, pos)
            if size < MIN_PACKET_SIZE or size > self.max_size:
                self._broken = True
                raw = bytes(buf[pos : pos + 4])
                del buf[:]
                raise RconProtocolError(_invalid_size_message(size, raw, self.max_size))
            if end - pos - 4 < size:
                break
            request_id, packet_type = _ID_TYPE.unpack_from(buf, pos + 4)
            body = bytes(buf[pos + 12 : pos + 4 + size - 2])
            packets.append(Packet(request_id, packet_type, body))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return packets


def _invalid_size_message(size: int, raw: bytes, max_size: int) -> str:
    """One line saying what a bad size field probably means, e.g. for an HTTP server:

    ``invalid packet size 1347703880 (bytes "HTTP", expected 10..4106): is this an RCON port?``
    """
    shown = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in raw
    )
    # A TLS record starts with its content type (20..23) and major version 3;
    # its bytes are not readable, so say what they are.
    tls = ", a TLS record" if len(raw) >= 2 and 20 <= raw[0] <= 23 and raw[1] == 3 else ""
    return (
        f'invalid packet size {size} (bytes "{shown}"{tls}, '
        f"expected {MIN_PACKET_SIZE}..{max_size}): is this an RCON port?"
    )
