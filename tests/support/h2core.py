"""The HBONE core as it was on h2 (its general HTTP/2 state machine), kept as the reference the
lean core (ztunnel/hbone.py) must match byte for byte (tests/unit/fuzz/test_fuzz_hbone_vs_h2.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

MIB = 1 << 20
DEFAULT_STREAM_WINDOW = 4 * MIB
# 4x the stream window so one stalled stream can never starve the connection of window.
DEFAULT_CONNECTION_WINDOW = 16 * MIB
DEFAULT_MAX_FRAME = 1 * MIB
H2_DEFAULT_WINDOW = 65535


@dataclass(frozen=True)
class Settings:
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_concurrent_streams: int = 200
    max_header_list: int = 64 * 1024


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
    """Tunnel bytes for the plain side; acknowledge with `consumed(stream_id, len(data))`."""

    data: bytes


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


# -- state -----------------------------------------------------------------------------------
@dataclass
class _Stream:
    pending: deque[bytes] = field(default_factory=deque)
    pending_len: int = 0
    end_requested: bool = False
    local_closed: bool = False
    remote_closed: bool = False


class StreamError(RuntimeError):
    """An operation on a stream this core does not know (already closed or never opened)."""


class Core:
    """One HTTP/2 connection carrying HBONE tunnels, as client or server."""

    def __init__(self, client: bool, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings or Settings()
        cfg = h2.config.H2Configuration(client_side=client, header_encoding="utf-8",
                                        validate_inbound_headers=True)
        self._h2 = h2.connection.H2Connection(cfg)
        initial: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.settings.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self.settings.max_frame,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.settings.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.settings.max_header_list,
        }
        if client:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        # Sent in the preface and in force from the start (the peer applies them on receipt);
        # h2 copies two of them into separate attributes at construction, so set those too.
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        self._h2.max_inbound_frame_size = self.settings.max_frame
        self._h2.decoder.max_header_list_size = self.settings.max_header_list
        self._streams: dict[int, _Stream] = {}
        self._rotation = 0  # where the next shared-window flush starts (see _flush_many)
        self.goaway_received = False
        self.goaway_sent = False
        self.settings_received = False
        self.terminated = False

    # -- setup -------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the preface/SETTINGS and open the connection window beyond h2's 64 KiB."""
        self._h2.initiate_connection()
        extra = self.settings.connection_window - H2_DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)

    def outbound(self) -> bytes:
        return self._h2.data_to_send()

    # -- queries -----------------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

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
        sid = int(self._h2.get_next_available_stream_id())
        self._h2.send_headers(sid, headers)
        self._streams[sid] = _Stream()
        return sid

    # -- server ------------------------------------------------------------------------------
    def respond(self, stream_id: int, status: int,
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer a CONNECT; anything but 200 also ends the stream and forgets it (no tunnel)."""
        self._stream(stream_id)
        final = status != 200
        self._h2.send_headers(stream_id, [(":status", str(status)), *headers], end_stream=final)
        if final:
            del self._streams[stream_id]

    # -- data --------------------------------------------------------------------------------
    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue tunnel bytes. True when all of it is framed (no back-pressure)."""
        s = self._stream(stream_id)
        if s.end_requested or s.local_closed:
            raise StreamError(f"stream {stream_id} is already half-closed for sending")
        if data:
            s.pending.append(data)
            s.pending_len += len(data)
            self._flush(stream_id, s)
        return s.pending_len == 0

    def end(self, stream_id: int) -> list[Event]:
        """Half-close our direction once the queued bytes are sent."""
        s = self._streams.get(stream_id)
        if s is None or s.end_requested:
            return []
        s.end_requested = True
        self._flush(stream_id, s)
        events: list[Event] = []
        self._maybe_closed(stream_id, events)
        return events

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> list[Event]:
        s = self._streams.pop(stream_id, None)
        if s is None:
            return []
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # the peer closed it first
            self._h2.reset_stream(stream_id, code)
        return [Closed(stream_id)]

    def consumed(self, stream_id: int, n: int) -> None:
        """The plain side has written n bytes of this stream onward: open the window again."""
        if n <= 0:
            return
        # h2 still credits the connection window when the stream is already gone.
        self._h2.acknowledge_received_data(n, stream_id)

    def ping(self, payload: bytes) -> None:
        self._h2.ping(payload)

    def goaway(self) -> None:
        """Graceful drain: the peer must open no new streams; the ones open carry on."""
        if not self.goaway_sent and not self.terminated:
            self.goaway_sent = True
            self._h2.close_connection(error_code=ErrorCodes.NO_ERROR)
            self._reopen()

    def _reopen(self) -> None:
        # h2 treats GOAWAY (sent or received) as the end of the connection and then rejects
        # every frame, but HTTP/2 lets streams up to the last stream id finish. Put h2's
        # connection state back; new streams are refused by this core instead.
        sm = self._h2.state_machine
        if sm.state is h2.connection.ConnectionState.CLOSED:
            sm.state = (h2.connection.ConnectionState.CLIENT_OPEN if self.client
                        else h2.connection.ConnectionState.SERVER_OPEN)

    def close(self, code: int = ErrorCodes.NO_ERROR) -> None:
        if not self.terminated:
            self.terminated = True
            self._h2.close_connection(error_code=code)

    # -- input -------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        if self.terminated:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
            self.close(code)
            return [ConnectionFailed(0, f"HTTP/2 protocol error from peer: {exc}")]
        except UnicodeDecodeError as exc:
            # h2 decodes header fields as UTF-8 and raises mid-frame on other bytes; its state is
            # not to be trusted after that, so the whole connection goes (found by fuzzing).
            self.close(ErrorCodes.PROTOCOL_ERROR)
            return [ConnectionFailed(0, f"HTTP/2 header field is not UTF-8: {exc.reason} at "
                                        f"byte {exc.start}")]
        out: list[Event] = []
        for ev in h2_events:
            self._translate(ev, out)
        return out

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:  # noqa: PLR0912 -- one branch per h2 event type
        if isinstance(ev, h2.events.RequestReceived):
            sid = int(ev.stream_id)
            if self.goaway_sent:
                self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # came after our GOAWAY
                return
            self._streams[sid] = _Stream()
            out.append(Request(sid, _headers(ev.headers)))
        elif isinstance(ev, h2.events.ResponseReceived):
            hdrs = _headers(ev.headers)
            out.append(Response(int(ev.stream_id), _status(hdrs.get(":status", "")), hdrs))
        elif isinstance(ev, h2.events.DataReceived):
            self._on_data(ev, out)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = int(ev.stream_id)
            s = self._streams.get(sid)
            if s is not None:
                s.remote_closed = True
                out.append(End(sid))
                self._maybe_closed(sid, out)
        elif isinstance(ev, h2.events.StreamReset):
            sid = int(ev.stream_id)
            if self._streams.pop(sid, None) is not None:
                out.append(Reset(sid, int(ev.error_code or 0)))
                out.append(Closed(sid))
        elif isinstance(ev, h2.events.WindowUpdated):
            sid = int(ev.stream_id)
            targets = list(self._streams) if sid == 0 else [sid]
            self._flush_many(targets, out)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A new initial window may open every stream's window at once.
            self._flush_many(list(self._streams), out)
            if not self.settings_received:
                self.settings_received = True
            out.append(SettingsReceived(0, self.peer_max_streams))
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAck(0, bytes(ev.ping_data or b"")))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._on_goaway(ev, out)
        elif isinstance(ev, h2.events.TrailersReceived | h2.events.InformationalResponseReceived):
            pass  # CONNECT tunnels carry neither; ignore rather than fail the stream

    # -- internals ---------------------------------------------------------------------------
    def _on_data(self, ev: h2.events.DataReceived, out: list[Event]) -> None:
        sid = int(ev.stream_id)
        data = bytes(ev.data or b"")
        padding = int(ev.flow_controlled_length or 0) - len(data)
        if padding > 0:
            self.consumed(sid, padding)  # padding never reaches the plain side
        if sid in self._streams:
            if data:
                out.append(Data(sid, data))
        else:
            self.consumed(sid, len(data))  # stream already reset locally: drop, keep window

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        self.goaway_received = True
        code = int(ev.error_code or 0)
        last = int(ev.last_stream_id or 0)
        if code == ErrorCodes.NO_ERROR:
            self._reopen()  # graceful: let open streams finish
        else:
            self.terminated = True
        out.append(GoAway(0, code, last))
        if self.client:
            # Streams above the last id were never processed: fail them so apps can retry.
            for sid in [s for s in self._streams if s > last or self.terminated]:
                del self._streams[sid]
                out.append(Reset(sid, ErrorCodes.REFUSED_STREAM))
                out.append(Closed(sid))

    def _stream(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamError(f"stream {stream_id} is closed or unknown")
        return s

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
                if st is not None and st.pending and self._flush(sid, st, max_frames=1):
                    sent = True
        for sid in order:
            st = self._streams.get(sid)
            if st is None:
                continue
            self._flush(sid, st)  # ends streams whose data is all out
            if had[sid] and not st.pending_len:
                out.append(Writable(sid))
            self._maybe_closed(sid, out)

    def _flush(self, sid: int, s: _Stream, max_frames: int | None = None) -> int:
        """Send pending data as the windows allow, at most max_frames frames; bytes sent."""
        try:
            return self._send_pending(sid, s, max_frames)
        except h2.exceptions.StreamClosedError:
            # h2 applies a whole batch of frames before reporting events, so a window update
            # can be handled for a stream a later frame of the same batch reset. That stream
            # takes no more data; its StreamReset event follows and ends it, and the other
            # streams of the connection are untouched.
            s.pending.clear()
            s.pending_len = 0
            return 0

    def _send_pending(self, sid: int, s: _Stream, max_frames: int | None) -> int:
        h2c = self._h2
        sent = frames = 0
        while s.pending and (max_frames is None or frames < max_frames):
            room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if room <= 0:
                return sent
            chunk = s.pending[0]
            if len(chunk) <= room:
                s.pending.popleft()
            else:
                s.pending[0] = chunk[room:]
                chunk = chunk[:room]
            s.pending_len -= len(chunk)
            h2c.send_data(sid, chunk)
            sent += len(chunk)
            frames += 1
        if not s.pending and s.end_requested and not s.local_closed:
            h2c.end_stream(sid)
            s.local_closed = True
        return sent

    def _maybe_closed(self, sid: int, out: list[Event]) -> None:
        s = self._streams.get(sid)
        if s is not None and s.local_closed and s.remote_closed:
            del self._streams[sid]
            out.append(Closed(sid))


def _status(text: str) -> int:
    """`:status` as three ASCII digits; anything else is 0, which no caller takes as success
    (int() would read "٢٠٠" as 200 and raise on garbage)."""
    return int(text) if len(text) == 3 and text.isascii() and text.isdigit() else 0


def _headers(raw: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw or []:  # type: ignore[attr-defined]  # h2 gives a list of pairs
        out[str(name).lower()] = str(value)
    return out
