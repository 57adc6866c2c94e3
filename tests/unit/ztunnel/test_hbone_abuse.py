"""HTTP/2 abuse against the HBONE server core (RFC 9113 answers and the issue #20 budgets).

The attacker's frames are built with hyperframe/hpack, independently of the core's codec, and
the core's answers are decoded the same way. A fake clock drives the per-second budgets."""

from __future__ import annotations

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from ztunnel import frames, hbone
from ztunnel.hbone import Budgets, Core, ErrorCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server(budgets: Budgets | None = None, **kw: int) -> tuple[Core, Clock]:
    clock = Clock()
    core = Core(client=False, settings=hbone.Settings(budgets=budgets or Budgets(), **kw),
                clock=clock)
    core.start()
    core.receive(PREFACE + SettingsFrame(0).serialize())
    core.outbound()
    return core, clock


def parse(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def goaway_code(core: Core) -> int | None:
    codes = [fr.error_code for fr in parse(core.outbound()) if isinstance(fr, GoAwayFrame)]
    return codes[-1] if codes else None


def resets(data: bytes) -> list[tuple[int, int]]:
    return [(fr.stream_id, fr.error_code) for fr in parse(data) if isinstance(fr, RstStreamFrame)]


def failed(events: list[hbone.Event]) -> hbone.ConnectionFailed:
    (ev,) = [e for e in events if isinstance(e, hbone.ConnectionFailed)]
    return ev


def request(enc: hpack.Encoder, sid: int) -> bytes:
    return HeadersFrame(sid, enc.encode(REQUEST), flags=["END_HEADERS"]).serialize()


def test_rapid_reset_is_answered_with_enhance_your_calm() -> None:
    before = hbone.budget_trips()["hbone_budget_trips_reset_rate"]
    core, _ = server(Budgets(resets_per_s=50))
    enc = hpack.Encoder()
    wire = b"".join(request(enc, sid) + RstStreamFrame(sid, error_code=8).serialize()
                    for sid in range(1, 2 * 60, 2))
    events = core.receive(wire)
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_code(core) == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["reset_rate"] == 1 and core.terminated
    assert hbone.budget_trips()["hbone_budget_trips_reset_rate"] == before + 1
    assert core.receive(request(enc, 201)) == []  # nothing more is processed


def test_resets_below_the_rate_are_fine_in_the_next_second() -> None:
    core, clock = server(Budgets(resets_per_s=50))
    enc = hpack.Encoder()
    sid = 1
    for _ in range(3):  # 3 seconds x 40 resets: under 50 per second every second
        wire = b""
        for _ in range(40):
            wire += request(enc, sid) + RstStreamFrame(sid, error_code=8).serialize()
            sid += 2
        assert not [e for e in core.receive(wire) if isinstance(e, hbone.ConnectionFailed)]
        clock.now += 1.0
    assert core.trips["reset_rate"] == 0


def test_stream_open_rate_is_bounded() -> None:
    core, _ = server(Budgets(streams_per_s=10), max_concurrent_streams=1000)
    enc = hpack.Encoder()
    events = core.receive(b"".join(request(enc, sid) for sid in range(1, 2 * 12, 2)))
    assert len([e for e in events if isinstance(e, hbone.Request)]) == 10
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["stream_rate"] == 1


def test_continuation_flood_is_cut_before_the_block_is_buffered() -> None:
    core, _ = server(Budgets(max_header_block=16 * 1024))
    enc = hpack.Encoder()
    block = enc.encode(REQUEST)
    wire = HeadersFrame(1, block).serialize()  # no END_HEADERS: CONTINUATIONs follow
    fill = ContinuationFrame(1, b"\x00" * 4096).serialize()
    buffered = []
    events: list[hbone.Event] = []
    for _ in range(63):
        events += core.receive(fill if buffered else wire + fill)
        buffered.append(len(core._block or b""))
        if core.terminated:
            break
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert max(buffered) <= 16 * 1024
    assert core.trips["header_block"] == 1


def test_one_oversized_headers_frame_is_refused_from_its_frame_header() -> None:
    core, _ = server(Budgets(max_header_block=1024))
    head = frames.header(500_000, frames.HEADERS, 0, 1)
    events = core.receive(head + b"\x00" * 100)  # the payload never needs to arrive
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["header_block"] == 1


def test_header_bytes_per_connection_are_rate_limited() -> None:
    core, _ = server(Budgets(header_bytes_per_s=4096), max_concurrent_streams=1000)
    enc = hpack.Encoder()
    wire = b"".join(  # a new value each time: HPACK cannot index it away
        HeadersFrame(sid, enc.encode([*REQUEST, ("x-pad", f"{sid:03d}" + "v" * 1000)]),
                     flags=["END_HEADERS"]).serialize() for sid in range(1, 20, 2))
    assert failed(core.receive(wire)).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["header_bytes_rate"] == 1


@pytest.mark.parametrize("frame", [
    SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}),
    PingFrame(0, b"12345678"),
    PriorityFrame(1, depends_on=0, stream_weight=16),
    PingFrame(0, b"12345678", flags=["ACK"]),  # unsolicited ACKs
    SettingsFrame(0, flags=["ACK"]),
])
def test_control_frame_floods_are_answered_with_enhance_your_calm(frame: Frame) -> None:
    core, _ = server(Budgets(control_frames_per_s=100))
    events = core.receive(frame.serialize() * 150)
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["control_frame_rate"] == 1


def test_unknown_frame_floods_are_answered_with_enhance_your_calm() -> None:
    core, _ = server(Budgets(control_frames_per_s=100))
    events = core.receive((frames.header(0, 0xEE, 0, 0)) * 150)
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM


def test_zero_window_updates_count_as_control_frames_and_reset_their_stream() -> None:
    core, _ = server(Budgets(control_frames_per_s=5))
    enc = hpack.Encoder()
    core.receive(request(enc, 1))
    events = core.receive(WindowUpdateFrame(1, window_increment=0).serialize())
    assert [type(e) for e in events] == [hbone.Reset, hbone.Closed]
    assert resets(core.outbound()) == [(1, ErrorCodes.PROTOCOL_ERROR)]
    events = core.receive(WindowUpdateFrame(1, window_increment=0).serialize() * 10)
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM


def test_zero_window_update_on_the_connection_is_a_protocol_error() -> None:
    core, _ = server()
    events = core.receive(WindowUpdateFrame(0, window_increment=0).serialize())
    assert failed(events).code == ErrorCodes.PROTOCOL_ERROR
    assert goaway_code(core) == ErrorCodes.PROTOCOL_ERROR


def test_unread_ping_acks_are_bounded() -> None:
    core, _ = server(Budgets(max_unread_control=1024, control_frames_per_s=10_000))
    core.write_blocked = True  # the peer stopped reading: our socket buffer is full
    events = core.receive(PingFrame(0, b"12345678").serialize() * 200)
    assert failed(events).code == ErrorCodes.ENHANCE_YOUR_CALM
    assert core.trips["unread_control"] == 1
    acks = [fr for fr in parse(core.outbound()) if isinstance(fr, PingFrame)]
    assert 0 < len(acks) * 17 <= 1024


def test_ping_acks_flow_while_the_peer_reads() -> None:
    core, _ = server(Budgets(max_unread_control=1024, control_frames_per_s=10_000))
    for _ in range(20):
        core.write_blocked = True
        core.receive(PingFrame(0, b"12345678").serialize() * 50)
        core.outbound()
        core.write_resumed()
    assert not core.terminated and core.trips["unread_control"] == 0


def test_connection_window_overflow_is_a_flow_control_error() -> None:
    core, _ = server()
    wire = WindowUpdateFrame(0, window_increment=2**31 - 1).serialize()
    assert failed(core.receive(wire)).code == ErrorCodes.FLOW_CONTROL_ERROR
    assert goaway_code(core) == ErrorCodes.FLOW_CONTROL_ERROR


def test_stream_window_overflow_resets_only_that_stream() -> None:
    core, _ = server()
    enc = hpack.Encoder()
    core.receive(request(enc, 1) + request(enc, 3))
    core.outbound()
    events = core.receive(WindowUpdateFrame(1, window_increment=2**31 - 1).serialize())
    assert [(type(e), e.stream_id) for e in events] == [(hbone.Reset, 1), (hbone.Closed, 1)]
    assert resets(core.outbound()) == [(1, ErrorCodes.FLOW_CONTROL_ERROR)]
    assert core.has_stream(3) and not core.terminated


def test_settings_window_overflow_is_a_flow_control_error() -> None:
    core, _ = server()
    wire = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31}).serialize()
    assert failed(core.receive(wire)).code == ErrorCodes.FLOW_CONTROL_ERROR


def test_data_beyond_the_advertised_window_is_a_flow_control_error() -> None:
    core, _ = server(stream_window=65535, connection_window=65535, max_frame=16384)
    enc = hpack.Encoder()
    core.receive(request(enc, 1))
    wire = DataFrame(1, b"x" * 16384).serialize() * 5  # 80 KiB into a 64 KiB window
    assert failed(core.receive(wire)).code == ErrorCodes.FLOW_CONTROL_ERROR


def test_hpack_garbage_is_a_compression_error() -> None:
    core, _ = server()
    wire = HeadersFrame(1, b"\xff\xff\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize()
    assert failed(core.receive(wire)).code == ErrorCodes.COMPRESSION_ERROR
    assert goaway_code(core) == ErrorCodes.COMPRESSION_ERROR


@pytest.mark.parametrize("wire", [
    frames.header(7, frames.PING, 0, 0) + b"1234567",  # PING must be 8 bytes
    frames.header(3, frames.WINDOW_UPDATE, 0, 0) + b"\x00\x00\x01",
    frames.header(5, frames.RST_STREAM, 0, 1) + b"\x00" * 5,
    frames.header(7, frames.SETTINGS, 0, 0) + b"\x00" * 7,  # not a multiple of 6
    frames.header(2_000_000, frames.DATA, 0, 1),  # above our SETTINGS_MAX_FRAME_SIZE
])
def test_malformed_frame_sizes_are_frame_size_errors(wire: bytes) -> None:
    core, _ = server()
    assert failed(core.receive(wire)).code == ErrorCodes.FRAME_SIZE_ERROR


@pytest.mark.parametrize("wire", [
    DataFrame(7, b"x").serialize(),  # idle stream
    DataFrame(0, b"x").serialize() if False else frames.header(1, frames.DATA, 0, 0) + b"x",
    RstStreamFrame(9, error_code=0).serialize(),  # idle stream
    HeadersFrame(2, hpack.Encoder().encode(REQUEST), flags=["END_HEADERS"]).serialize(),
    ContinuationFrame(1, b"").serialize(),  # no open header block
    frames.header(4, frames.PUSH_PROMISE, frames.END_HEADERS, 1) + b"\x00\x00\x00\x02",
])
def test_protocol_violations_are_protocol_errors(wire: bytes) -> None:
    core, _ = server()
    assert failed(core.receive(wire)).code == ErrorCodes.PROTOCOL_ERROR
    assert goaway_code(core) == ErrorCodes.PROTOCOL_ERROR


def test_data_after_end_stream_resets_the_stream_closed() -> None:
    core, _ = server()
    enc = hpack.Encoder()
    core.receive(request(enc, 1) + DataFrame(1, b"x", flags=["END_STREAM"]).serialize())
    core.outbound()
    events = core.receive(DataFrame(1, b"late").serialize())
    assert (hbone.Reset, 1) in [(type(e), e.stream_id) for e in events]
    assert resets(core.outbound()) == [(1, ErrorCodes.STREAM_CLOSED)]
    assert not core.terminated


def test_streams_over_the_limit_are_refused_and_the_connection_stays() -> None:
    core, _ = server(max_concurrent_streams=2)
    enc = hpack.Encoder()
    events = core.receive(b"".join(request(enc, sid) for sid in (1, 3, 5)))
    assert [e.stream_id for e in events if isinstance(e, hbone.Request)] == [1, 3]
    assert resets(core.outbound()) == [(5, ErrorCodes.REFUSED_STREAM)]
    assert not core.terminated


def test_unknown_frames_and_priority_are_ignored() -> None:
    core, _ = server()
    enc = hpack.Encoder()
    wire = (frames.header(3, 0xEE, 0, 0) + b"abc" + request(enc, 1)
            + PriorityFrame(1, depends_on=0, stream_weight=3).serialize()
            + DataFrame(1, b"hello").serialize())
    events = core.receive(wire)
    assert [type(e) for e in events] == [hbone.Request, hbone.Data]
    assert not core.terminated


def test_any_split_of_the_input_gives_the_same_stream_of_bytes() -> None:
    """Frames cut at every byte boundary (reads of any size) parse to the same data."""
    enc = hpack.Encoder()
    padded = DataFrame(1, b"a" * 300, flags=["PADDED"])
    padded.pad_length = 7
    wire = (request(enc, 1) + padded.serialize() + PingFrame(0, b"12345678").serialize()
            + DataFrame(1, b"b" * 50, flags=["END_STREAM"]).serialize())
    for step in (1, 2, 5, 9, 10, 64, len(wire)):
        core, _ = server()
        events: list[hbone.Event] = []
        for i in range(0, len(wire), step):
            events += core.receive(wire[i:i + step])
            events = [hbone.Data(e.stream_id, bytes(e.data)) if isinstance(e, hbone.Data)
                      else e for e in events]  # views are valid during the call only
        data = b"".join(bytes(e.data) for e in events if isinstance(e, hbone.Data))
        assert data == b"a" * 300 + b"b" * 50, step
        assert [type(e) for e in events if not isinstance(e, hbone.Data)] == [
            hbone.Request, hbone.End]
        assert not core.terminated
