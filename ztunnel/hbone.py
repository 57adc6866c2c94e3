"""Sans-IO HBONE core: the client and server halves of HTTP/2 CONNECT tunnels (RFC 9113).

Bytes in (`receive`), events out; bytes to send collect in `outbound()`. The I/O layer owns the
sockets. This is a purpose-built HTTP/2 for the HBONE subset (CONNECT streams, DATA, flow control
and the control frames) with `hpack` for header blocks: h2's general state machine cost more per
DATA frame than the whole TLS record (see benchmarks/README.md, profile). Flow control is end to
end:
- outbound: `send()` frames only what the peer's stream and connection windows allow (and at most
  the peer's max frame size per frame); the rest waits in a per-stream buffer and `send` reports
  back-pressure, so the caller stops reading its plain socket until `Writable` arrives;
- inbound: received data is acknowledged (WINDOW_UPDATE, coalesced) only when the caller says it
  has been written onward (`consumed`), so a slow reader bounds what the peer may send.
DATA payloads are handed out as memoryviews of the buffer passed to `receive` (valid only during
the call: copy what you keep). Streams are independent: a reset or error on one stream never
touches the others. Frame-level abuse is bounded by `Budgets`; every trip is counted in `trips`.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import hpack
import hpack.exceptions
from mypy_extensions import mypyc_attr

from ztunnel import frames as f

MIB = 1 << 20
DEFAULT_STREAM_WINDOW = 4 * MIB
# 4x the stream window so one stalled stream can never starve the connection of window.
DEFAULT_CONNECTION_WINDOW = 16 * MIB
DEFAULT_MAX_FRAME = 1 * MIB
H2_DEFAULT_WINDOW = f.DEFAULT_WINDOW


@mypyc_attr(native_class=False)  # compiled, class constants would become instance slots
class ErrorCodes:
    """RFC 9113 section 7 error codes (names as h2 spells them)."""

    NO_ERROR = f.NO_ERROR
    PROTOCOL_ERROR = f.PROTOCOL_ERROR
    INTERNAL_ERROR = f.INTERNAL_ERROR
    FLOW_CONTROL_ERROR = f.FLOW_CONTROL_ERROR
    STREAM_CLOSED = f.STREAM_CLOSED
    FRAME_SIZE_ERROR = f.FRAME_SIZE_ERROR
    REFUSED_STREAM = f.REFUSED_STREAM
    CANCEL = f.CANCEL
    COMPRESSION_ERROR = f.COMPRESSION_ERROR
    CONNECT_ERROR = f.CONNECT_ERROR
    ENHANCE_YOUR_CALM = f.ENHANCE_YOUR_CALM


@dataclass(frozen=True)
class Budgets:
    """Frame-level limits per HTTP/2 connection (issue #20). Rates are per second, counted in
    one-second windows. Each trip closes the connection with GOAWAY (ENHANCE_YOUR_CALM unless
    RFC 9113 names another code) and counts one in `Core.trips[name]`."""

    # HEADERS+CONTINUATION bytes of one header block, checked on each frame header before its
    # payload is buffered (h2 bounded CONTINUATION frames by count only: 63 x 1 MiB each).
    max_header_block: int = 64 * 1024
    # Header-block bytes per connection per second (all streams).
    header_bytes_per_s: int = 8 * MIB
    # New streams per connection per second (the peer's HEADERS opening a stream).
    streams_per_s: int = 5000
    # RST_STREAM frames from the peer per second: rapid reset (CVE-2023-44487).
    resets_per_s: int = 1000
    # SETTINGS, PING (and their ACKs), PRIORITY, zero-increment WINDOW_UPDATE and unknown-type
    # frames per second.
    control_frames_per_s: int = 1000
    # Bytes of PING/SETTINGS ACKs we queued while the peer was not reading (write side blocked).
    max_unread_control: int = 64 * 1024


BUDGET_NAMES = ("header_block", "header_bytes_rate", "stream_rate", "reset_rate",
                "control_frame_rate", "unread_control")
# Trips of every connection in this process (a connection's own count dies with it).
_TRIPS_TOTAL: dict[str, int] = dict.fromkeys(BUDGET_NAMES, 0)


def budget_trips() -> dict[str, float]:
    """Process-wide frame-budget trips, flat and named for Tunnel.stats()."""
    return {f"hbone_budget_trips_{name}": float(n) for name, n in _TRIPS_TOTAL.items()}


@dataclass(frozen=True)
class Settings:
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_concurrent_streams: int = 200
    max_header_list: int = 64 * 1024
    budgets: Budgets = field(default_factory=Budgets)


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    stream_id: int


@dataclass(frozen=True)
class Request(Event):
    """Server: a new tunnel request (headers as received, lowercase names)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class Response(Event):
    """Client: the peer's answer to our CONNECT."""

    status: int
    headers: dict[str, str]


@dataclass(frozen=True)
class Data(Event):
    """Tunnel bytes for the plain side; acknowledge with `consumed(stream_id, len(data))`.
    A view of the receive buffer: valid during the `receive` call only."""

    data: bytes | memoryview


@dataclass(frozen=True)
class End(Event):
    """The peer half-closed its direction (END_STREAM): shut down writing on the plain side."""


@dataclass(frozen=True)
class Reset(Event):
    """The peer reset the stream (RST_STREAM): reset the plain side."""

    code: int


@dataclass(frozen=True)
class Writable(Event):
    """A stream's outbound buffer drained: resume reading its plain side."""


@dataclass(frozen=True)
class Closed(Event):
    """Both directions of a stream are finished (or it was reset); forget it."""


@dataclass(frozen=True)
class PingAck(Event):
    payload: bytes


@dataclass(frozen=True)
class SettingsReceived(Event):
    """The peer's SETTINGS arrived (the first one completes connection setup)."""

    max_concurrent_streams: int


@dataclass(frozen=True)
class GoAway(Event):
    """The peer is closing the connection: open no new streams on it."""

    code: int
    last_stream_id: int


@dataclass(frozen=True)
class ConnectionFailed(Event):
    """The connection is unusable (protocol violation); send what is queued, then close."""

    reason: str
    code: int = f.PROTOCOL_ERROR


# -- state -----------------------------------------------------------------------------------
class _RecvWindow:
    """Inbound window accounting with coalesced updates (the rule h2 uses, so both emit the
    same WINDOW_UPDATE stream: update after half the window, or when it ran empty)."""

    __slots__ = ("current", "max", "processed")

    def __init__(self, size: int) -> None:
        self.current = size
        self.max = size
        self.processed = 0

    def process(self, n: int) -> int:
        self.processed += n
        if not self.processed:
            return 0
        if (self.current == 0 and self.processed > min(1024, self.max // 4)) \
                or self.processed >= self.max // 2:
            inc = min(self.processed, self.max - self.current)
            self.processed = 0
            self.current += inc
            return inc
        return 0


@dataclass(eq=False)
class _Stream:
    send_window: int
    recv: _RecvWindow
    pending: deque[bytes | memoryview] = field(default_factory=deque)
    pending_len: int = 0
    unacked: int = 0  # received, counted against the windows, not yet `consumed`
    end_requested: bool = False
    response_seen: bool = False
    local_closed: bool = False
    remote_closed: bool = False


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of this builtin
class StreamError(RuntimeError):
    """An operation on a stream this core does not know (already closed or never opened)."""


class _Fail(Exception):  # noqa: N818 -- internal control flow, never escapes the core
    def __init__(self, code: int, reason: str, budget: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.budget = budget


class _Rate:
    __slots__ = ("count", "limit", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.start = 0.0
        self.count = 0

    def add(self, now: float, n: int = 1) -> bool:
        """Count n; False once more than `limit` arrived within the current second."""
        if now - self.start >= 1.0:
            self.start = now
            self.count = 0
        self.count += n
        return self.count <= self.limit


_CONNECTION_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"})


class Core:
    """One HTTP/2 connection carrying HBONE tunnels, as client or server."""

    def __init__(self, client: bool, settings: Settings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.settings = settings or Settings()
        self.budgets = self.settings.budgets
        self.trips: dict[str, int] = dict.fromkeys(BUDGET_NAMES, 0)
        self._clock = clock
        self._out: list[bytes | memoryview] = []
        self._enc = hpack.Encoder()
        self._dec = hpack.Decoder(max_header_list_size=self.settings.max_header_list)
        self._dec.max_allowed_table_size = 4096
        self._streams: dict[int, _Stream] = {}
        self._rotation = 0  # where the next shared-window flush starts (see _flush_many)
        self._next_sid = 1 if client else 2
        self._peer_high = 0  # highest stream id the peer opened (GOAWAY's last stream id)
        # peer's settings (RFC defaults until its SETTINGS arrive)
        self._peer_initial_window = f.DEFAULT_WINDOW
        self._peer_max_frame = f.MIN_MAX_FRAME
        self._peer_max_streams = 2**31 - 1
        self._send_window = f.DEFAULT_WINDOW  # connection send window
        self._recv = _RecvWindow(f.DEFAULT_WINDOW)  # connection receive window
        # receive state: partial frame header / payload, or inside a DATA payload
        self._pend = bytearray()
        self._expect_preface = not client
        self._data_sid = 0
        self._data_left = 0  # payload bytes of the current DATA frame still to arrive
        self._data_pad = 0  # then padding bytes to skip
        self._data_end = False
        self._data_live = False  # stream known and open for data
        self._block: bytearray | None = None  # header block being assembled
        self._block_sid = 0
        self._block_end_stream = False
        # window openings (a stream, None: all) to serve after parsing, and events to report
        # after them
        self._flush_queue: list[int | Event | None] = []
        now = clock()
        self._streams_rate = _Rate(self.budgets.streams_per_s)
        self._resets_rate = _Rate(self.budgets.resets_per_s)
        self._control_rate = _Rate(self.budgets.control_frames_per_s)
        self._header_rate = _Rate(self.budgets.header_bytes_per_s)
        for r in (self._streams_rate, self._resets_rate, self._control_rate, self._header_rate):
            r.start = now
        self.write_blocked = False  # set by the I/O layer while the peer is not reading
        self._unread_control = 0
        self.goaway_received = False
        self.goaway_sent = False
        self.settings_received = False
        self.terminated = False

    # -- setup -------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the preface/SETTINGS and open the connection window beyond 64 KiB."""
        s = self.settings
        values = [(f.HEADER_TABLE_SIZE, 4096), (f.ENABLE_PUSH, 0),
                  (f.INITIAL_WINDOW_SIZE, s.stream_window), (f.MAX_FRAME_SIZE, s.max_frame),
                  (f.ENABLE_CONNECT_PROTOCOL, 0),
                  (f.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                  (f.MAX_HEADER_LIST_SIZE, s.max_header_list)]
        self._out.append((f.PREFACE if self.client else b"") + f.settings(values))
        extra = s.connection_window - f.DEFAULT_WINDOW
        if extra > 0:
            self._recv.current += extra
            self._recv.max = max(self._recv.max, self._recv.current)
            self._out.append(f.window_update(0, extra))

    def outbound(self) -> bytes:
        """Everything queued, as one bytes (tests, simple callers)."""
        return b"".join(self.outbound_chunks())

    def outbound_chunks(self) -> list[bytes | memoryview]:
        """Everything queued, as frame headers and payload views (no copies)."""
        out, self._out = self._out, []
        return out

    # -- queries -----------------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_streams(self) -> int:
        return self._peer_max_streams

    @property
    def peer_max_frame(self) -> int:
        return self._peer_max_frame

    @property
    def connection_send_window(self) -> int:
        return self._send_window

    def send_window(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return min(s.send_window, self._send_window) if s else 0

    def buffered(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.pending_len if s else 0

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- client ------------------------------------------------------------------------------
    def open_stream(self, headers: list[tuple[str, str]]) -> int:
        if not self.client:
            raise StreamError("only the client side opens streams")
        if self.goaway_received or self.terminated:
            raise StreamError("connection is going away: open the stream on a new connection")
        sid = self._next_sid
        self._next_sid += 2
        self._send_headers(sid, headers, end_stream=False)
        self._streams[sid] = self._new_stream()
        return sid

    # -- server ------------------------------------------------------------------------------
    def respond(self, stream_id: int, status: int,
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer a CONNECT; anything but 200 also ends the stream and forgets it (no tunnel)."""
        self._stream(stream_id)
        final = status != 200
        self._send_headers(stream_id, [(":status", str(status)), *headers], end_stream=final)
        if final:
            self._release(self._streams.pop(stream_id))

    def _send_headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        norm = [(k.lower().encode(), v.strip().encode()) for k, v in headers]
        block = self._enc.encode(norm)
        self._out.append(f.headers(sid, block, self._peer_max_frame, end_stream))

    # -- data --------------------------------------------------------------------------------
    def send(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Queue tunnel bytes. True when all of it is framed (no back-pressure). A view is
        framed without a copy (the caller writes `outbound_chunks()` before reusing its
        buffer); what the windows hold back is copied."""
        s = self._stream(stream_id)
        if s.end_requested or s.local_closed:
            raise StreamError(f"stream {stream_id} is already half-closed for sending")
        if data:
            s.pending.append(data)
            s.pending_len += len(data)
            self._send_pending(stream_id, s, None)
            # Pending is FIFO: anything left of this call's data is the last item.
            if s.pending and isinstance(data, memoryview):
                s.pending[-1] = bytes(s.pending[-1])
        return s.pending_len == 0

    def end(self, stream_id: int) -> list[Event]:
        """Half-close our direction once the queued bytes are sent."""
        s = self._streams.get(stream_id)
        if s is None or s.end_requested:
            return []
        s.end_requested = True
        self._send_pending(stream_id, s, None)
        events: list[Event] = []
        self._maybe_closed(stream_id, events)
        return events

    def reset(self, stream_id: int, code: int = f.CANCEL) -> list[Event]:
        s = self._streams.pop(stream_id, None)
        if s is None:
            return []
        if not (s.local_closed and s.remote_closed):
            self._out.append(f.rst_stream(stream_id, code))
        self._release(s)
        return [Closed(stream_id)]

    def consumed(self, stream_id: int, n: int) -> None:
        """The plain side has written n bytes of this stream onward: open the window again."""
        s = self._streams.get(stream_id)
        if n <= 0 or self.terminated or s is None:
            return  # a stream that ended gave its bytes back to the connection then
        n = min(n, s.unacked)
        s.unacked -= n
        self._credit(n)
        if not s.remote_closed:
            inc = s.recv.process(n)
            if inc:
                self._out.append(f.window_update(stream_id, inc))

    def _credit(self, n: int) -> None:
        """n received bytes are done with: open the connection window (coalesced)."""
        inc = self._recv.process(n)
        if inc:
            self._out.append(f.window_update(0, inc))

    def _release(self, s: _Stream) -> None:
        """A stream ends: what it received but the plain side never acknowledged (reset,
        closed while its writes were blocked) goes back to the connection window, or every
        such stream would shrink the window for good (measured: bulk fell 3x after two runs
        of 100 streams)."""
        if s.unacked:
            self._credit(s.unacked)
            s.unacked = 0

    def ping(self, payload: bytes) -> None:
        self._out.append(f.ping(payload))

    def goaway(self) -> None:
        """Graceful drain: the peer must open no new streams; the ones open carry on."""
        if not self.goaway_sent and not self.terminated:
            self.goaway_sent = True
            self._out.append(f.goaway(self._peer_high, f.NO_ERROR))

    def close(self, code: int = f.NO_ERROR) -> None:
        if not self.terminated:
            self.terminated = True
            self._out.append(f.goaway(self._peer_high, code))

    def write_resumed(self) -> None:
        """The I/O layer's write buffer drained: the peer reads again."""
        self.write_blocked = False
        self._unread_control = 0

    # -- input -------------------------------------------------------------------------------
    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.terminated:
            return []
        out: list[Event] = []
        try:
            self._parse(memoryview(data), out)
        except _Fail as exc:
            if exc.budget:
                self.trips[exc.budget] += 1
                _TRIPS_TOTAL[exc.budget] += 1
            self.close(exc.code)
            self._flush_queue.clear()
            out.append(ConnectionFailed(0, str(exc), exc.code))
            return out
        if self._flush_queue:
            self._serve_flush_queue(out)
        return out

    def _parse(self, mv: memoryview, out: list[Event]) -> None:  # noqa: PLR0911,PLR0912,PLR0915 -- one loop over frame boundaries
        pos, n = 0, len(mv)
        if self._expect_preface:
            need = len(f.PREFACE) - len(self._pend)
            self._pend += mv[:need]
            pos = min(need, n)
            if len(self._pend) < len(f.PREFACE):
                if not f.PREFACE.startswith(self._pend):
                    raise _Fail(f.PROTOCOL_ERROR, "invalid HTTP/2 connection preface")
                return
            if bytes(self._pend) != f.PREFACE:
                raise _Fail(f.PROTOCOL_ERROR, "invalid HTTP/2 connection preface")
            self._pend.clear()
            self._expect_preface = False
        while pos < n and not self.terminated:
            if self._data_left or self._data_pad:
                pos = self._data_payload(mv, pos, n, out)
                continue
            pend = self._pend
            if pend:
                # a frame split across reads: assemble its header (and non-DATA payload)
                if len(pend) < f.HEADER_LEN:
                    take = min(f.HEADER_LEN - len(pend), n - pos)
                    pend += mv[pos:pos + take]
                    pos += take
                    if len(pend) < f.HEADER_LEN:
                        return
                length, ftype, flags, sid = f.parse_header(pend)
                self._check_frame(length, ftype, flags, sid)
                if ftype == f.DATA:
                    pad = flags & f.PADDED
                    if pad and len(pend) < f.HEADER_LEN + 1:
                        if pos >= n:
                            return
                        pend.append(mv[pos])
                        pos += 1
                    self._data_start(length, flags, sid, pend[f.HEADER_LEN] if pad else -1, out)
                    pend.clear()
                    continue
                take = min(f.HEADER_LEN + length - len(pend), n - pos)
                pend += mv[pos:pos + take]
                pos += take
                if len(pend) < f.HEADER_LEN + length:
                    return
                payload = bytes(pend[f.HEADER_LEN:])
                pend.clear()
                self._frame(ftype, flags, sid, memoryview(payload), out)
                continue
            if n - pos < f.HEADER_LEN:
                pend += mv[pos:]
                return
            length, ftype, flags, sid = f.parse_header(mv, pos)
            self._check_frame(length, ftype, flags, sid)
            if ftype == f.DATA:
                if flags & f.PADDED:
                    if n - pos < f.HEADER_LEN + 1:
                        pend += mv[pos:]
                        return
                    self._data_start(length, flags, sid, mv[pos + f.HEADER_LEN], out)
                    pos += f.HEADER_LEN + 1
                else:
                    self._data_start(length, flags, sid, -1, out)
                    pos += f.HEADER_LEN
                continue
            end = pos + f.HEADER_LEN + length
            if end > n:
                pend += mv[pos:]
                return
            self._frame(ftype, flags, sid, mv[pos + f.HEADER_LEN:end], out)
            pos = end

    def _check_frame(self, length: int, ftype: int, flags: int, sid: int) -> None:
        """Checks on a frame header, before any of its payload is buffered."""
        if length > self.settings.max_frame:
            raise _Fail(f.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum "
                                            f"{self.settings.max_frame}")
        if self._block is not None:
            if ftype != f.CONTINUATION or sid != self._block_sid:
                raise _Fail(f.PROTOCOL_ERROR, "expected CONTINUATION of the open header block")
            self._header_budget(len(self._block) + length)
        elif ftype == f.HEADERS:
            self._header_budget(length)

    def _header_budget(self, block_len: int) -> None:
        if block_len > self.budgets.max_header_block:
            raise _Fail(f.ENHANCE_YOUR_CALM, f"header block of {block_len}+ bytes exceeds the "
                                             f"budget of {self.budgets.max_header_block}",
                        "header_block")

    # -- DATA --------------------------------------------------------------------------------
    def _data_start(self, length: int, flags: int, sid: int, padlen: int,
                    out: list[Event]) -> None:
        if sid == 0:
            raise _Fail(f.PROTOCOL_ERROR, "DATA frame on stream 0")
        data_len = length
        if padlen >= 0:
            if padlen >= length:
                raise _Fail(f.PROTOCOL_ERROR, "DATA padding is longer than the frame")
            data_len = length - 1 - padlen
        if length > self._recv.current:
            raise _Fail(f.FLOW_CONTROL_ERROR, "peer sent DATA beyond the connection window")
        self._recv.current -= length
        s = self._streams.get(sid)
        live = False
        if s is None:
            if self._is_idle(sid):
                raise _Fail(f.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # closed or reset by us: drop, but keep the connection window moving
            self._credit(length)
        elif s.remote_closed:
            self._credit(length)
            self._stream_error(sid, f.STREAM_CLOSED, out)
        elif length > s.recv.current:
            self._credit(length)
            self._stream_error(sid, f.FLOW_CONTROL_ERROR, out)
        else:
            s.recv.current -= length
            s.unacked += length
            live = True
            if length - data_len:
                self.consumed(sid, length - data_len)  # padding never reaches the plain side
        self._data_sid = sid
        self._data_left = data_len
        self._data_pad = length - data_len - (1 if padlen >= 0 else 0)
        self._data_end = bool(flags & f.END_STREAM)
        self._data_live = live
        if not self._data_left and not self._data_pad:
            self._data_done(out)

    def _data_payload(self, mv: memoryview, pos: int, n: int, out: list[Event]) -> int:
        if self._data_left:
            take = min(self._data_left, n - pos)
            if self._data_live:
                out.append(Data(self._data_sid, mv[pos:pos + take]))
            self._data_left -= take
            pos += take
        if not self._data_left and self._data_pad and pos < n:
            skip = min(self._data_pad, n - pos)
            self._data_pad -= skip
            pos += skip
        if not self._data_left and not self._data_pad:
            self._data_done(out)
        return pos

    def _data_done(self, out: list[Event]) -> None:
        if self._data_end and self._data_live:
            self._remote_end(self._data_sid, out)
        self._data_live = False
        self._data_end = False

    # -- other frames ------------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: memoryview,  # noqa: PLR0912 -- one branch per frame type
               out: list[Event]) -> None:
        if ftype == f.HEADERS:
            self._on_headers(flags, sid, payload, out)
        elif ftype == f.CONTINUATION:
            if self._block is None:
                raise _Fail(f.PROTOCOL_ERROR, "CONTINUATION without an open header block")
            self._block += payload
            self._rate(self._header_rate, "header_bytes_rate", len(payload))
            if flags & f.END_HEADERS:
                self._end_block(out)
        elif ftype == f.SETTINGS:
            self._on_settings(flags, sid, payload, out)
        elif ftype == f.WINDOW_UPDATE:
            self._on_window_update(sid, payload, out)
        elif ftype == f.RST_STREAM:
            self._on_rst(sid, payload, out)
        elif ftype == f.PING:
            if sid != 0:
                raise _Fail(f.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _Fail(f.FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            self._rate(self._control_rate, "control_frame_rate")  # ACKs too: unsolicited ones
            if flags & f.ACK:
                out.append(PingAck(0, bytes(payload)))
            else:
                self._control_reply(f.ping(bytes(payload), ack=True))
        elif ftype == f.GOAWAY:
            if sid != 0:
                raise _Fail(f.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _Fail(f.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            self._on_goaway(f.u32(payload) & 0x7FFFFFFF, f.u32(payload, 4), out)
        elif ftype == f.PRIORITY:
            if sid == 0:
                raise _Fail(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
            self._rate(self._control_rate, "control_frame_rate")
            if len(payload) != 5:
                self._stream_error(sid, f.FRAME_SIZE_ERROR, out)
        elif ftype == f.PUSH_PROMISE:
            raise _Fail(f.PROTOCOL_ERROR, "PUSH_PROMISE although we disabled push")
        else:  # unknown frame types are ignored (RFC 9113 section 4.1), but not for free
            self._rate(self._control_rate, "control_frame_rate")

    def _on_headers(self, flags: int, sid: int, payload: memoryview, out: list[Event]) -> None:
        if sid == 0:
            raise _Fail(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        self._rate(self._header_rate, "header_bytes_rate", len(payload))
        start, end = 0, len(payload)
        if flags & f.PADDED:
            if not payload:
                raise _Fail(f.FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            start = 1
            end -= payload[0]
        if flags & f.PRIORITY_FLAG:
            start += 5
        if end < start:
            raise _Fail(f.PROTOCOL_ERROR, "HEADERS padding or priority longer than the frame")
        self._block = bytearray(payload[start:end])
        self._block_sid = sid
        self._block_end_stream = bool(flags & f.END_STREAM)
        if flags & f.END_HEADERS:
            self._end_block(out)

    def _end_block(self, out: list[Event]) -> None:
        block, sid, end_stream = self._block or b"", self._block_sid, self._block_end_stream
        self._block = None
        try:
            # raw=True: names and values stay bytes (validated and decoded below)
            raw = cast(list[tuple[bytes, bytes]], self._dec.decode(bytes(block), raw=True))
        except hpack.exceptions.OversizedHeaderListError as exc:
            raise _Fail(f.PROTOCOL_ERROR, f"header list too large: {exc}") from None
        except (hpack.exceptions.HPACKError, IndexError, ValueError) as exc:
            raise _Fail(f.COMPRESSION_ERROR, f"HPACK decoding failed: {exc}") from None
        s = self._streams.get(sid)
        if s is None:
            if self._is_idle(sid) or not self.client:
                self._server_headers(sid, raw, end_stream, out)
            return  # a stream already reset here: decoded above only to keep HPACK in sync
        if self.client and not s.response_seen:
            hdrs = _validate(raw, pseudo_ok=True)
            status = status_of(hdrs.get(":status", ""))
            if 100 <= status < 200:
                return  # informational: the final response follows
            s.response_seen = True
            out.append(Response(sid, status, hdrs))
        else:
            _validate(raw, pseudo_ok=False)  # trailers: a tunnel ignores them, END_STREAM counts
        if end_stream:
            self._remote_end(sid, out)

    def _server_headers(self, sid: int, raw: list[tuple[bytes, bytes]], end_stream: bool,
                        out: list[Event]) -> None:
        if self.client or sid % 2 == 0 or sid <= self._peer_high:
            raise _Fail(f.PROTOCOL_ERROR, f"peer opened stream {sid} out of order")
        self._peer_high = sid
        hdrs = _validate(raw, pseudo_ok=True)
        self._rate(self._streams_rate, "stream_rate")
        if self.goaway_sent:
            self._out.append(f.rst_stream(sid, f.REFUSED_STREAM))  # came after our GOAWAY
            return
        if len(self._streams) >= self.settings.max_concurrent_streams:
            self._out.append(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        s = self._new_stream()
        self._streams[sid] = s
        out.append(Request(sid, hdrs))
        if end_stream:
            self._remote_end(sid, out)

    def _on_settings(self, flags: int, sid: int, payload: memoryview, out: list[Event]) -> None:
        if sid != 0:
            raise _Fail(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise _Fail(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._rate(self._control_rate, "control_frame_rate")
            return
        if len(payload) % 6:
            raise _Fail(f.FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
        if self.settings_received:
            self._rate(self._control_rate, "control_frame_rate")
        for key, value in f.parse_settings(payload):
            self._apply_setting(key, value)
        self._control_reply(f.SETTINGS_ACK)
        self.settings_received = True
        # reported after the flush the new settings allow (the order callers saw from h2)
        self._flush_queue += [None, SettingsReceived(0, self._peer_max_streams)]

    def _apply_setting(self, key: int, value: int) -> None:
        if key == f.INITIAL_WINDOW_SIZE:
            if value > f.MAX_WINDOW:
                raise _Fail(f.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
            delta = value - self._peer_initial_window
            self._peer_initial_window = value
            for st in self._streams.values():
                st.send_window += delta
                if st.send_window > f.MAX_WINDOW:
                    raise _Fail(f.FLOW_CONTROL_ERROR, "stream window overflow from SETTINGS")
        elif key == f.MAX_FRAME_SIZE:
            if not f.MIN_MAX_FRAME <= value <= f.MAX_MAX_FRAME:
                raise _Fail(f.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
            self._peer_max_frame = value
        elif key == f.MAX_CONCURRENT_STREAMS:
            self._peer_max_streams = value
        elif key == f.ENABLE_PUSH:
            if value > 1:
                raise _Fail(f.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH is not 0 or 1")
        elif key == f.HEADER_TABLE_SIZE:
            self._enc.header_table_size = value
        # unknown settings are ignored (section 6.5.2)

    def _on_window_update(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        if len(payload) != 4:
            raise _Fail(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = f.u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                self._rate(self._control_rate, "control_frame_rate")
                raise _Fail(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += inc
            if self._send_window > f.MAX_WINDOW:
                raise _Fail(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_queue.append(None)
            return
        if self._is_idle(sid):
            raise _Fail(f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
        s = self._streams.get(sid)
        if inc == 0:
            self._rate(self._control_rate, "control_frame_rate")
            if s is not None:
                self._stream_error(sid, f.PROTOCOL_ERROR, out)
            return
        if s is None:
            return  # closed stream: allowed, ignored
        s.send_window += inc
        if s.send_window > f.MAX_WINDOW:
            self._stream_error(sid, f.FLOW_CONTROL_ERROR, out)
            return
        self._flush_queue.append(sid)

    def _on_rst(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        if sid == 0:
            raise _Fail(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _Fail(f.FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if self._is_idle(sid):
            raise _Fail(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        self._rate(self._resets_rate, "reset_rate")
        s = self._streams.pop(sid, None)
        if s is not None:
            self._release(s)
            out.append(Reset(sid, f.u32(payload)))
            out.append(Closed(sid))

    def _on_goaway(self, last: int, code: int, out: list[Event]) -> None:
        self.goaway_received = True
        if code != f.NO_ERROR:
            self.terminated = True
        out.append(GoAway(0, code, last))
        if self.client:
            # Streams above the last id were never processed: fail them so apps can retry.
            for sid in [s for s in self._streams if s > last or self.terminated]:
                self._release(self._streams.pop(sid))
                out.append(Reset(sid, f.REFUSED_STREAM))
                out.append(Closed(sid))

    # -- internals ---------------------------------------------------------------------------
    def _new_stream(self) -> _Stream:
        return _Stream(self._peer_initial_window, _RecvWindow(self.settings.stream_window))

    def _is_idle(self, sid: int) -> bool:
        """A stream id no one has opened yet (frames on it are a connection error)."""
        if (sid % 2 == 1) == self.client:  # ours
            return sid >= self._next_sid
        return sid > self._peer_high

    def _rate(self, rate: _Rate, name: str, n: int = 1) -> None:
        if not rate.add(self._clock(), n):
            raise _Fail(f.ENHANCE_YOUR_CALM, f"peer exceeded {rate.limit} {name.replace('_', ' ')}"
                                             " per second", name)

    def _control_reply(self, frame: bytes) -> None:
        """Queue an ACK; while the peer is not reading, bound what such replies may pile up."""
        if self.write_blocked:
            self._unread_control += len(frame)
            if self._unread_control > self.budgets.max_unread_control:
                raise _Fail(f.ENHANCE_YOUR_CALM, "peer does not read the control frames it "
                                                 "provokes", "unread_control")
        self._out.append(frame)

    def _stream_error(self, sid: int, code: int, out: list[Event]) -> None:
        self._out.append(f.rst_stream(sid, code))
        s = self._streams.pop(sid, None)
        if s is not None:
            self._release(s)
            out.append(Reset(sid, code))
            out.append(Closed(sid))

    def _remote_end(self, sid: int, out: list[Event]) -> None:
        s = self._streams.get(sid)
        if s is not None and not s.remote_closed:
            s.remote_closed = True
            out.append(End(sid))
            self._maybe_closed(sid, out)

    def _stream(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamError(f"stream {stream_id} is closed or unknown")
        return s

    def _serve_flush_queue(self, out: list[Event]) -> None:
        queue, self._flush_queue = self._flush_queue, []
        for target in queue:
            if isinstance(target, Event):
                out.append(target)
            else:
                self._flush_many(list(self._streams) if target is None else [target], out)

    def _flush_many(self, ids: list[int], out: list[Event]) -> None:
        """Send what waiting streams can, sharing the connection window: round-robin, one frame
        per stream per round, starting one stream later each time. Serving them in a fixed
        order let the first waiting streams take every window update and starve the rest."""
        waiting = [sid for sid in ids if (st := self._streams.get(sid)) is not None
                   and (st.pending_len or st.end_requested)]
        if not waiting:
            return
        start = self._rotation % len(waiting)
        self._rotation += 1
        order = waiting[start:] + waiting[:start]
        had = {sid: self._streams[sid].pending_len for sid in order}
        sent = True
        while sent:
            sent = False
            for sid in order:
                st = self._streams.get(sid)
                if st is not None and st.pending and self._send_pending(sid, st, 1):
                    sent = True
        for sid in order:
            st = self._streams.get(sid)
            if st is None:
                continue
            self._send_pending(sid, st, None)  # ends streams whose data is all out
            if had[sid] and not st.pending_len:
                out.append(Writable(sid))
            self._maybe_closed(sid, out)

    def _send_pending(self, sid: int, s: _Stream, max_frames: int | None) -> int:
        """Frame pending data as the windows allow, at most max_frames frames; bytes sent."""
        sent = frames = 0
        out = self._out
        while s.pending and (max_frames is None or frames < max_frames):
            room = min(s.send_window, self._send_window, self._peer_max_frame)
            if room <= 0:
                return sent
            chunk = s.pending[0]
            if len(chunk) <= room:
                s.pending.popleft()
            else:
                view = memoryview(chunk)
                s.pending[0] = view[room:]
                chunk = view[:room]
            n = len(chunk)
            s.pending_len -= n
            s.send_window -= n
            self._send_window -= n
            out.append(f.data_header(sid, n))
            out.append(chunk)
            sent += n
            frames += 1
        if not s.pending and s.end_requested and not s.local_closed:
            out.append(f.data_header(sid, 0, end=True))
            s.local_closed = True
        return sent

    def _maybe_closed(self, sid: int, out: list[Event]) -> None:
        s = self._streams.get(sid)
        if s is not None and s.local_closed and s.remote_closed:
            self._release(self._streams.pop(sid))
            out.append(Closed(sid))


def _informational(raw: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b":status" and v[:1] == b"1" for k, v in raw)


# One regex scan per field instead of a Python loop over its bytes (every CONNECT and answer).
_BAD_NAME = re.compile(rb"[ \t\r\n\x00:]")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


def _validate(raw: list[tuple[bytes, bytes]], pseudo_ok: bool) -> dict[str, str]:
    """Header fields as RFC 9113 section 8.2 wants them (lowercase names, no connection-specific
    fields, pseudo-fields first), decoded as UTF-8; a malformed block fails the connection."""
    hdrs: dict[str, str] = {}
    regular = False
    for name, value in raw:
        if not name or name != name.lower() or _BAD_NAME.search(name, 1):
            raise _Fail(f.PROTOCOL_ERROR, f"invalid header field name {name[:64]!r}")
        if _BAD_VALUE.search(value) or value != value.strip(b" \t"):
            raise _Fail(f.PROTOCOL_ERROR, f"invalid value for header field {name[:64]!r}")
        if name[:1] == b":":
            if regular or not pseudo_ok:
                raise _Fail(f.PROTOCOL_ERROR, "pseudo-header field after a regular field")
        else:
            regular = True
            if name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
                raise _Fail(f.PROTOCOL_ERROR, f"connection-specific header field {name!r}")
        try:
            hdrs[name.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Fail(f.PROTOCOL_ERROR, f"HTTP/2 header field is not UTF-8: {exc.reason} at "
                                          f"byte {exc.start}") from None
    return hdrs


def status_of(text: str) -> int:
    """`:status` as three ASCII digits; anything else is 0, which no caller takes as success
    (int() would read "٢٠٠" as 200 and raise on garbage)."""
    return int(text) if len(text) == 3 and text.isascii() and text.isdigit() else 0
