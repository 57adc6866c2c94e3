"""HboneSession through its transport seam: two sessions joined by an in-memory wire pair (no
sockets, no TLS), so the session logic (plain-side joins, early data, half-close, resets,
drain, budgets closing the connection) is tested on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hyperframe.frame import PingFrame

from agent.identity.spiffe import Identity
from ztunnel import hbone
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession
from ztunnel.tls import PeerIdentityError

PEER = Identity("cluster.local", "default", "peer")
HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")]


class MemoryWire:
    """One end of an in-memory connection; bytes reach the other end on the next loop turn."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.protocol: HboneSession | None = None
        self.peer: MemoryWire | None = None
        self.closing = False
        self.written = 0

    def start(self, protocol: HboneSession) -> None:
        self.protocol = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("10.0.0.2", 15008), "peername": ("10.0.0.1", 40000)}.get(name,
                                                                                      default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def writelines(self, chunks: list[bytes | memoryview]) -> None:
        if self.closing:
            return
        data = b"".join(chunks)
        self.written += len(data)
        peer = self.peer
        if peer is not None and peer.protocol is not None and not peer.closing:
            self.loop.call_soon(peer.deliver, data)

    def deliver(self, data: bytes) -> None:
        if not self.closing and self.protocol is not None:
            self.protocol.data_received(memoryview(bytearray(data)))  # a view, like tlswire

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        assert self.protocol is not None
        self.loop.call_soon(self.protocol.connection_lost, None)
        if self.peer is not None:
            self.loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()


class Plain(PlainSide):
    """A plain side that records what the tunnel gives it (no socket: the session's calls are
    the seam; a PlainSide subclass, as the session's type says and a compiled session checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.finished = False
        self.was_reset = False
        self.handle: Any = None

    def attach(self, peer: Any) -> None:
        self.handle = peer

    def send(self, data: bytes | memoryview) -> bool:
        self.data += data
        return True

    def finish(self) -> None:
        self.finished = True

    def reset(self) -> None:
        self.was_reset = True

    def drained(self, n: int) -> None:
        pass


def ok(_: object) -> Identity:
    return PEER


async def pair(server_settings: hbone.Settings | None = None,
               on_request: Callable[[HboneSession, int, dict[str, str]], None] | None = None,
               ) -> tuple[HboneSession, HboneSession]:
    client = HboneSession(True, ok, keepalive=0)
    server = HboneSession(False, ok, server_settings, on_request=on_request, keepalive=0)
    a, b = MemoryWire(), MemoryWire()
    a.peer, b.peer = b, a
    a.protocol, b.protocol = client, server
    a.start(client)
    b.start(server)
    await asyncio.wait_for(client.ready, 5)
    return client, server


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_tunnel_carries_data_both_ways_with_half_close() -> None:
    async def body() -> None:
        plains: dict[int, Plain] = {}

        def on_request(s: HboneSession, sid: int, headers: dict[str, str]) -> None:
            assert headers[":authority"] == "10.0.0.2:8080"
            s.respond(sid, 200)
            plains[sid] = Plain()
            assert s.attach(sid, plains[sid])

        client, server = await pair(on_request=on_request)
        sid = client.open_stream(HEADERS)
        assert await client.response(sid) == (200, {":status": "200"})
        mine = Plain()
        assert client.attach(sid, mine)
        mine.handle.send(b"hello " * 1000)
        mine.handle.finish()
        await settle()
        assert bytes(plains[sid].data) == b"hello " * 1000 and plains[sid].finished
        plains[sid].handle.send(b"answer")  # the other direction still flows
        plains[sid].handle.finish()
        await settle()
        assert bytes(mine.data) == b"answer" and mine.finished
        assert client.core.open_streams == 0 and server.core.open_streams == 0
        assert client.accepting and client.stream_open(sid) is False

    run(body)


def test_data_before_attach_is_kept_and_replayed() -> None:
    async def body() -> None:
        sids: list[int] = []
        client, server = await pair(on_request=lambda s, sid, h: sids.append(sid))
        sid = client.open_stream(HEADERS)
        await settle()
        server.respond(sids[0], 200)
        await client.response(sid)
        early = Plain()
        client.attach(sid, early)
        early.handle.send(b"early bytes")
        await settle()  # the server has not attached its plain side yet
        late = Plain()
        assert server.attach(sid, late)
        assert bytes(late.data) == b"early bytes"

    run(body)


def test_a_reset_reaches_the_other_plain_side_only_for_that_stream() -> None:
    async def body() -> None:
        plains: dict[int, Plain] = {}

        def on_request(s: HboneSession, sid: int, headers: dict[str, str]) -> None:
            s.respond(sid, 200)
            plains[sid] = Plain()
            s.attach(sid, plains[sid])

        client, _ = await pair(on_request=on_request)
        a, b = client.open_stream(HEADERS), client.open_stream(HEADERS)
        await client.response(a)
        await client.response(b)
        client.attach(a, Plain())
        pb = Plain()
        client.attach(b, pb)
        client.stream_reset(a)
        pb.handle.send(b"still here")
        await settle()
        assert plains[a].was_reset and not plains[b].was_reset
        assert bytes(plains[b].data) == b"still here"

    run(body)


def test_goaway_drains_then_closes() -> None:
    async def body() -> None:
        client, server = await pair(on_request=lambda s, sid, h: s.respond(sid, 200))
        sid = client.open_stream(HEADERS)
        await client.response(sid)
        client.attach(sid, Plain())
        server.goaway()
        await settle()
        assert not client.usable  # the pool opens no new stream on it
        # A graceful GOAWAY does not end the connection: streams up to its last stream id are
        # still served, with their upstream connects (RFC 9113 6.8).
        assert client.accepting and server.accepting
        assert not server.closed.done()  # one stream still open
        client.stream_reset(sid)
        await asyncio.wait_for(server.closed, 5)

    run(body)


def test_a_peer_failing_verification_never_gets_a_frame_processed() -> None:
    async def body() -> None:
        def refuse(_: object) -> Identity:
            raise PeerIdentityError("wrong identity")

        server = HboneSession(False, refuse, keepalive=0)
        wire = MemoryWire()
        wire.start(server)
        assert isinstance(server.failure, PeerIdentityError) and wire.closing
        assert wire.written == 0  # not even our SETTINGS

    run(body)


def test_a_ping_flood_closes_the_connection_with_enhance_your_calm_and_counts_it() -> None:
    async def body() -> None:
        budgets = hbone.Budgets(control_frames_per_s=50)
        client, server = await pair(hbone.Settings(budgets=budgets))
        assert client.transport is not None
        client.transport.writelines([PingFrame(0, b"12345678").serialize() * 100])
        await asyncio.wait_for(server.closed, 5)
        assert server.trips["control_frame_rate"] == 1
        await asyncio.wait_for(client.closed, 5)

    run(body)


def test_write_back_pressure_reaches_the_core() -> None:
    async def body() -> None:
        client, _ = await pair()
        client.pause_writing()
        assert client.core.write_blocked
        client.resume_writing()
        assert not client.core.write_blocked

    run(body)
