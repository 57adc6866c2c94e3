"""HTTP/2 frame codec for the HBONE subset (RFC 9113 section 4 and 6): headers parsed in place
with struct, frames built as small bytes headers in front of caller-owned payloads.

No state lives here; hbone.Core owns connection and stream state.
"""

from __future__ import annotations

import struct
from typing import Final

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_LEN: Final = 9
MIN_MAX_FRAME: Final = 16384
MAX_MAX_FRAME: Final = (1 << 24) - 1
MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_WINDOW: Final = 65535

# frame types
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# flags
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# settings identifiers
HEADER_TABLE_SIZE: Final = 0x1
ENABLE_PUSH: Final = 0x2
MAX_CONCURRENT_STREAMS: Final = 0x3
INITIAL_WINDOW_SIZE: Final = 0x4
MAX_FRAME_SIZE: Final = 0x5
MAX_HEADER_LIST_SIZE: Final = 0x6
ENABLE_CONNECT_PROTOCOL: Final = 0x8

# error codes (section 7)
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
SETTINGS_TIMEOUT: Final = 0x4
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
CONNECT_ERROR: Final = 0xA
ENHANCE_YOUR_CALM: Final = 0xB

_HDR = struct.Struct(">HBBBL")  # 24-bit length as 16+8, type, flags, R+stream id
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def parse_header(buf: bytes | bytearray | memoryview, off: int = 0) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the 9-byte frame header at buf[off:]."""
    hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, off)
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return _HDR.pack(length >> 8, length & 0xFF, ftype, flags, sid)


def u32(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    return int(_U32.unpack_from(buf, off)[0])


def settings(values: list[tuple[int, int]]) -> bytes:
    body = b"".join(_SETTING.pack(k, v) for k, v in values)
    return header(len(body), SETTINGS, 0, 0) + body


def parse_settings(payload: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    return [(int(k), int(v)) for k, v in _SETTING.iter_unpack(payload)]


SETTINGS_ACK = header(0, SETTINGS, ACK, 0)


def window_update(sid: int, increment: int) -> bytes:
    return header(4, WINDOW_UPDATE, 0, sid) + _U32.pack(increment)


def rst_stream(sid: int, code: int) -> bytes:
    return header(4, RST_STREAM, 0, sid) + _U32.pack(code)


def ping(payload: bytes, ack: bool = False) -> bytes:
    return header(8, PING, ACK if ack else 0, 0) + payload


def goaway(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return header(8 + len(debug), GOAWAY, 0, 0) + _U32x2.pack(last_sid, code) + debug


def data_header(sid: int, length: int, end: bool = False) -> bytes:
    return header(length, DATA, END_STREAM if end else 0, sid)


def headers(sid: int, block: bytes, max_frame: int, end_stream: bool) -> bytes:
    """HEADERS (+ CONTINUATION frames when the block is larger than the peer's max frame)."""
    first = block[:max_frame]
    rest = block[max_frame:]
    flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
    parts = [header(len(first), HEADERS, flags, sid), first]
    while rest:
        chunk, rest = rest[:max_frame], rest[max_frame:]
        parts += [header(len(chunk), CONTINUATION, 0 if rest else END_HEADERS, sid), chunk]
    return b"".join(parts)
