"""The sans-IO HBONE core: a client and a server Core wired back to back, no sockets."""

from __future__ import annotations

import os

import h2.config
import h2.connection
import pytest
from h2.errors import ErrorCodes

from ztunnel import hbone
from ztunnel.hbone import Core

MIB = 1 << 20
HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080"),
           ("forwarded", 'for="10.0.0.1:4000"'),
           ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00")]


def pump(client: Core, server: Core) -> tuple[list[hbone.Event], list[hbone.Event]]:
    """Move bytes both ways until quiet; return (client events, server events)."""
    ce: list[hbone.Event] = []
    se: list[hbone.Event] = []
    while True:
        to_server, to_client = client.outbound(), server.outbound()
        if not to_server and not to_client:
            return ce, se
        if to_server:
            se += server.receive(to_server)
        if to_client:
            ce += client.receive(to_client)


def of(events: list[hbone.Event], kind: type[hbone.Event]) -> list[hbone.Event]:
    return [e for e in events if isinstance(e, kind)]


def data_len(events: list[hbone.Event]) -> int:
    return sum(len(e.data) for e in events if isinstance(e, hbone.Data))


def connected() -> tuple[Core, Core]:
    client = Core(client=True, settings=hbone.Settings(max_concurrent_streams=100))
    server = Core(client=False)
    client.start()
    server.start()
    ce, se = pump(client, server)
    assert of(ce, hbone.SettingsReceived) and of(se, hbone.SettingsReceived)
    return client, server


def tunnel(client: Core, server: Core) -> int:
    sid = client.open_stream(HEADERS)
    ce, se = pump(client, server)
    (req,) = of(se, hbone.Request)
    assert isinstance(req, hbone.Request)
    server.respond(req.stream_id, 200)
    ce, _ = pump(client, server)
    (resp,) = of(ce, hbone.Response)
    assert isinstance(resp, hbone.Response) and resp.status == 200
    return sid


def test_settings_are_ztunnels() -> None:
    client, server = connected()
    assert client.peer_max_streams == 200  # the server's advertised limit
    assert server.peer_max_streams == 100
    sid = tunnel(client, server)
    assert client.send_window(sid) == 4 * MIB
    assert client.connection_send_window == 16 * MIB
    assert client.peer_max_frame == MIB


def test_request_reaches_server_with_headers() -> None:
    client, server = connected()
    client.open_stream(HEADERS)
    _, se = pump(client, server)
    (req,) = of(se, hbone.Request)
    assert isinstance(req, hbone.Request)
    assert req.headers[":method"] == "CONNECT"
    assert req.headers[":authority"] == "10.0.0.2:8080"
    assert req.headers["forwarded"] == 'for="10.0.0.1:4000"'


def test_flow_control_is_end_to_end() -> None:
    client, server = connected()
    sid = tunnel(client, server)
    payload = os.urandom(10 * MIB)
    # More than the stream window: back-pressure, the rest waits in the core.
    assert client.send(sid, payload) is False
    assert client.buffered(sid) > 0
    _, se = pump(client, server)
    got = [e for e in se if isinstance(e, hbone.Data)]
    # Nothing acknowledged yet: the peer may send one stream window and no more.
    assert data_len(se) == 4 * MIB
    assert all(len(e.data) <= MIB for e in got)  # frames capped at the peer's max frame size
    received = b"".join(e.data for e in got)
    writable = False
    while client.buffered(sid):
        server.consumed(sid, data_len(se))  # the plain side wrote it all onward
        ce, se = pump(client, server)
        writable = writable or bool(of(ce, hbone.Writable))
        received += b"".join(e.data for e in se if isinstance(e, hbone.Data))
    server.consumed(sid, data_len(se))
    _, se = pump(client, server)
    received += b"".join(e.data for e in se if isinstance(e, hbone.Data))
    assert writable
    assert received == payload


def test_unacknowledged_data_on_one_stream_does_not_block_another() -> None:
    client, server = connected()
    slow, fast = tunnel(client, server), tunnel(client, server)
    client.send(slow, os.urandom(6 * MIB))
    pump(client, server)  # slow's window is full and never acknowledged
    assert client.send(fast, b"x" * 100_000) is True
    _, se = pump(client, server)
    fast_data = [e for e in se if isinstance(e, hbone.Data) and e.stream_id == fast]
    assert sum(len(e.data) for e in fast_data) == 100_000


def test_half_close_both_ways() -> None:
    client, server = connected()
    sid = tunnel(client, server)
    client.send(sid, b"request")
    client.end(sid)
    ce, se = pump(client, server)
    assert [type(e) for e in se] == [hbone.Data, hbone.End]
    # The other direction still flows after the client's END_STREAM.
    assert server.send(sid, b"response") is True
    ce, se = pump(client, server)
    assert [e.data for e in ce if isinstance(e, hbone.Data)] == [b"response"]
    events = server.end(sid)
    assert of(events, hbone.Closed)
    ce, _ = pump(client, server)
    assert [type(e) for e in ce] == [hbone.End, hbone.Closed]
    assert client.open_streams == 0 and server.open_streams == 0


def test_end_waits_for_buffered_data() -> None:
    client, server = connected()
    sid = tunnel(client, server)
    payload = os.urandom(5 * MIB)
    client.send(sid, payload)
    client.end(sid)
    _, se = pump(client, server)
    assert not of(se, hbone.End)  # data still queued behind the window
    got = data_len(se)
    while not of(se, hbone.End):
        server.consumed(sid, got)
        _, se = pump(client, server)
        got = data_len(se)
    assert of(se, hbone.End)


def test_reset_is_per_stream() -> None:
    client, server = connected()
    doomed, other = tunnel(client, server), tunnel(client, server)
    assert of(client.reset(doomed), hbone.Closed)
    _, se = pump(client, server)
    assert [(type(e), e.stream_id) for e in se] == [(hbone.Reset, doomed), (hbone.Closed, doomed)]
    client.send(other, b"still fine")
    _, se = pump(client, server)
    assert [e.data for e in se if isinstance(e, hbone.Data)] == [b"still fine"]
    assert client.open_streams == 1 and server.open_streams == 1


def test_error_status_ends_the_stream() -> None:
    client, server = connected()
    sid = client.open_stream(HEADERS)
    pump(client, server)
    server.respond(sid, 401)
    assert not server.has_stream(sid)
    ce, _ = pump(client, server)
    resp = of(ce, hbone.Response)
    assert isinstance(resp[0], hbone.Response) and resp[0].status == 401
    assert of(ce, hbone.End)


def test_protocol_garbage_fails_the_connection_with_goaway() -> None:
    _, server = connected()
    events = server.receive(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"garbage!" * 4)
    assert of(events, hbone.ConnectionFailed)
    assert server.terminated
    assert server.outbound()  # GOAWAY queued
    assert server.receive(b"anything") == []


def test_goaway_stops_new_streams() -> None:
    client, server = connected()
    server.close()
    ce, _ = pump(client, server)
    assert of(ce, hbone.GoAway) and client.goaway_received
    with pytest.raises(hbone.StreamError):
        client.open_stream(HEADERS)


def test_only_clients_open_streams_and_unknown_streams_are_errors() -> None:
    client, server = connected()
    with pytest.raises(hbone.StreamError):
        server.open_stream(HEADERS)
    with pytest.raises(hbone.StreamError):
        client.send(99, b"x")
    sid = tunnel(client, server)
    client.end(sid)
    with pytest.raises(hbone.StreamError):
        client.send(sid, b"after end")


def test_graceful_goaway_lets_open_streams_finish() -> None:
    client, server = connected()
    sid = tunnel(client, server)
    server.goaway()
    ce, _ = pump(client, server)
    assert of(ce, hbone.GoAway) and client.goaway_received and not client.terminated
    with pytest.raises(hbone.StreamError):
        client.open_stream(HEADERS)
    # h2 alone would reject every frame after GOAWAY; the open stream still works both ways.
    assert server.send(sid, b"after goaway") is True
    client.send(sid, b"still talking")
    client.end(sid)
    ce, se = pump(client, server)
    assert [e.data for e in ce if isinstance(e, hbone.Data)] == [b"after goaway"]
    assert [e.data for e in se if isinstance(e, hbone.Data)] == [b"still talking"]
    assert of(se, hbone.End)


def test_data_in_the_same_read_as_a_graceful_goaway_is_delivered() -> None:
    # A draining tunnel (an agent being replaced) sends GOAWAY while a stream streams on: the
    # frames after it often arrive in the same read, and h2 alone would fail the connection.
    client, server = connected()
    sid = tunnel(client, server)
    server.send(sid, b"before")
    server.goaway()
    server.send(sid, b"after")
    ce = client.receive(server.outbound())  # one read: DATA, GOAWAY, DATA
    assert not of(ce, hbone.ConnectionFailed) and not client.terminated
    assert of(ce, hbone.GoAway) and client.goaway_received
    assert [e.data for e in ce if isinstance(e, hbone.Data)] == [b"before", b"after"]
    client.send(sid, b"reply")
    client.end(sid)
    server.end(sid)
    ce, se = pump(client, server)
    assert [e.data for e in se if isinstance(e, hbone.Data)] == [b"reply"]
    assert of(se, hbone.End) and of(ce, hbone.End)


def test_error_goaway_fails_open_streams() -> None:
    client, server = connected()
    sid = tunnel(client, server)
    server.close(ErrorCodes.INTERNAL_ERROR)
    ce, _ = pump(client, server)
    assert [(type(e), e.stream_id) for e in ce] == [
        (hbone.GoAway, 0), (hbone.Reset, sid), (hbone.Closed, sid)]
    assert client.terminated and client.open_streams == 0


def test_window_update_and_reset_in_one_batch_fail_only_that_stream() -> None:
    """A batch of frames is parsed before window openings are served, so a WINDOW_UPDATE
    followed by RST_STREAM opens the window of a stream the batch then closed. Flushing the
    buffered data then must not fail the connection: only that stream ends."""
    client, server = connected()
    sid = tunnel(client, server)
    other = tunnel(client, server)
    assert not server.send(sid, os.urandom(5 * MIB))  # 1 MiB stays buffered past the window
    ce, _ = pump(client, server)
    assert data_len(ce) == 4 * MIB and server.buffered(sid) == MIB
    client.consumed(sid, 4 * MIB)  # WINDOW_UPDATE ...
    client.reset(sid)  # ... then RST_STREAM, sent together
    se = server.receive(client.outbound())
    assert [e.stream_id for e in of(se, hbone.Reset)] == [sid]
    assert not server.has_stream(sid)
    server.send(other, b"still here")
    ce, _ = pump(client, server)
    assert [(e.stream_id, e.data) for e in of(ce, hbone.Data)] == [(other, b"still here")]


def test_a_reopened_connection_window_is_shared_between_waiting_streams() -> None:
    """With more data waiting than the connection window holds, small window updates (a
    receiver returning credit as its app reads) must not all go to the first waiting stream:
    every waiting stream gets a share."""
    client, server = connected()
    sids = [tunnel(client, server) for _ in range(8)]
    for sid in sids:  # 8 x 3 MiB waiting; the 16 MiB connection window holds 5 and a bit
        server.send(sid, os.urandom(3 * MIB))
    ce, _ = pump(client, server)
    first = sids[0]
    assert sum(len(e.data) for e in of(ce, hbone.Data) if e.stream_id == first) == 3 * MIB
    waiting = [sid for sid in sids if server.buffered(sid) > 0]
    assert len(waiting) >= 3
    before = {sid: server.buffered(sid) for sid in waiting}
    for _ in range(len(waiting)):  # the app reads stream `first` 256 KiB at a time
        client.consumed(first, 256 * 1024)
        pump(client, server)
    assert all(server.buffered(sid) < before[sid] for sid in waiting)


@pytest.mark.parametrize(("status", "want"), [("200", 200), ("401", 401), ("\u0662\u0660\u0660", 0),
                                              ("2OO", 0), ("20", 0), ("+20", 0)])
def test_a_response_status_is_three_ascii_digits_or_not_success(status: str, want: int) -> None:
    """A peer's :status in Arabic-Indic digits must not read as 200 (int() would); garbage must
    not raise out of the core."""
    client = Core(client=True)
    client.start()
    # A raw h2 server: the Core's own would never send such a status.
    raw = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding="utf-8", validate_outbound_headers=False))
    raw.initiate_connection()
    raw.receive_data(client.outbound())
    client.receive(raw.data_to_send())
    sid = client.open_stream(HEADERS)
    raw.receive_data(client.outbound())
    raw.send_headers(sid, [(":status", status)])
    (resp,) = of(client.receive(raw.data_to_send()), hbone.Response)
    assert isinstance(resp, hbone.Response) and resp.status == want


def test_a_stream_that_ends_gives_its_unacknowledged_bytes_back_to_the_connection() -> None:
    """Data a plain side never acknowledged (it was reset, or closed while its writes were
    blocked) must not shrink the connection window for good: 100-stream runs did that until
    single-stream bulk over the same connection fell to a third."""
    client, server = connected()
    for _ in range(8):  # 8 x 3 MiB never acknowledged: more than the 16 MiB connection window
        sid = tunnel(client, server)
        client.send(sid, b"x" * 3 * MIB)
        _, se = pump(client, server)
        assert data_len(se) == 3 * MIB
        server.reset(sid)  # the plain side went away without writing it onward
        pump(client, server)
    sid = tunnel(client, server)
    assert client.send(sid, b"y" * 3 * MIB) is True  # the connection window is whole again


def test_a_view_held_back_by_the_window_is_copied_before_the_caller_reuses_its_buffer() -> None:
    """Plain sides read into one shared buffer and pass views: what the window holds back must
    not change when that buffer is rewritten by the next read."""
    client, server = connected()
    sid = tunnel(client, server)
    buf = bytearray(b"a" * (5 * MIB))
    assert client.send(sid, memoryview(buf)) is False  # 4 MiB framed, 1 MiB waits
    framed = client.outbound()  # written out before the buffer is reused
    buf[:] = b"b" * len(buf)  # the next read
    se = server.receive(framed)
    server.consumed(sid, data_len(se))
    _, more = pump(client, server)
    got = b"".join(bytes(e.data) for e in se + more if isinstance(e, hbone.Data))
    assert len(got) == 5 * MIB
    assert got.count(b"b") == 0  # (a plain == would make pytest diff 5 MiB on failure)
