"""The HBONE pool over real mTLS sessions on socket pairs (no privileges, no netns): one dial per
key at a time, streams per connection capped by our limit and by the peer's SETTINGS."""

from __future__ import annotations

import asyncio
import socket

from support.testca import TestCA, identity

from ztunnel import hbone, tls
from ztunnel import session as sessions
from ztunnel.pool import Pool, PoolKey
from ztunnel.session import HboneSession

A, B = identity("a"), identity("b")
KEY = PoolKey(A, B, "10.0.0.2", "10.0.0.1")
HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")]


class Peer:
    """Dials HBONE sessions to an in-process server over socket pairs."""

    def __init__(self, server_max_streams: int) -> None:
        self.contexts = tls.Contexts(TestCA())
        self.server_settings = hbone.Settings(max_concurrent_streams=server_max_streams)
        self.dials = 0
        self.sessions: list[HboneSession] = []

    async def dial(self, key: PoolKey) -> HboneSession:
        self.dials += 1
        a, b = socket.socketpair()

        def on_request(s: HboneSession, sid: int, headers: dict[str, str]) -> None:
            s.respond(sid, 200)

        server = sessions.accept(b, self.contexts.server(key.dst_identity),
                                 lambda so: tls.verify_client(so, "cluster.local"),
                                 self.server_settings, on_request=on_request)
        client = sessions.dial(a, self.contexts.client(key.src_identity),
                               lambda so: tls.verify_server(so, key.dst_identity))
        srv, cli = await asyncio.gather(server, client)
        self.sessions += [srv, cli]
        return cli

    async def close(self) -> None:
        for s in self.sessions:
            s.close()
        await asyncio.wait_for(asyncio.gather(*(s.closed for s in self.sessions)), 10)


async def open_many(pool: Pool, n: int) -> list[tuple[HboneSession, int]]:
    async def one() -> tuple[HboneSession, int]:
        session, sid = await pool.open_stream(KEY, HEADERS)
        status, _ = await session.response(sid)
        assert status == 200
        return session, sid

    return await asyncio.gather(*(one() for _ in range(n)))


def streams_per_connection(opened: list[tuple[HboneSession, int]]) -> list[int]:
    counts: dict[int, int] = {}
    for session, _ in opened:
        counts[id(session)] = counts.get(id(session), 0) + 1
    return sorted(counts.values())


def test_a_burst_shares_one_dial() -> None:
    async def run() -> None:
        peer = Peer(server_max_streams=200)
        pool = Pool(peer.dial, max_streams=100)
        opened = await open_many(pool, 60)
        assert peer.dials == 1 and pool.connections_opened == 1
        assert pool.streams_opened == 60
        assert streams_per_connection(opened) == [60]
        await peer.close()

    asyncio.run(run())


def test_streams_per_connection_are_capped_by_us_and_by_the_peer() -> None:
    async def run() -> None:
        peer = Peer(server_max_streams=200)
        pool = Pool(peer.dial, max_streams=10)
        assert streams_per_connection(await open_many(pool, 35)) == [5, 10, 10, 10]
        await peer.close()

        peer = Peer(server_max_streams=3)  # the server's SETTINGS_MAX_CONCURRENT_STREAMS
        pool = Pool(peer.dial, max_streams=100)
        assert streams_per_connection(await open_many(pool, 7)) == [1, 3, 3]
        await peer.close()

    asyncio.run(run())


def test_closed_streams_free_their_slots_for_reuse() -> None:
    async def run() -> None:
        peer = Peer(server_max_streams=200)
        pool = Pool(peer.dial, max_streams=2)
        first = await open_many(pool, 2)
        for session, sid in first:
            session.stream_reset(sid)
        await open_many(pool, 2)
        assert peer.dials == 1
        await peer.close()

    asyncio.run(run())
