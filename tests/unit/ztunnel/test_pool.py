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


def test_a_recently_used_destination_keeps_one_spare_connection() -> None:
    async def run() -> None:
        peer = Peer(server_max_streams=200)
        pool = Pool(peer.dial, max_streams=2, prewarm_destinations=4, prewarm_ttl=60)
        opened = await open_many(pool, 1)
        # The spare is dialed in the background after the stream opened.
        for _ in range(200):
            if pool.prewarm_opened:
                break
            await asyncio.sleep(0.01)
        assert pool.connections_opened == 1 and pool.prewarm_opened == 1 and peer.dials == 2
        spare = [s for s in pool.connections(KEY) if s.load == 0]
        assert len(spare) == 1 and spare[0] is not opened[0][0]
        # The first connection still has room: the spare stays idle.
        session, _ = await pool.open_stream(KEY, HEADERS)
        assert session is opened[0][0] and peer.dials == 2
        # Full now: the next stream takes the spare without a dial on its path, and a new
        # spare is warmed behind it.
        session, _ = await pool.open_stream(KEY, HEADERS)
        assert session is spare[0] and pool.connections_opened == 1
        for _ in range(200):
            if pool.prewarm_opened == 2:
                break
            await asyncio.sleep(0.01)
        assert pool.prewarm_opened == 2 and pool.stats()["pool_connections"] == 3
        assert pool.stats()["pool_prewarm_destinations"] == 1
        pool.close_all()
        await peer.close()

    asyncio.run(run())


def test_prewarming_is_bounded_by_destinations_and_off_by_default() -> None:
    async def run() -> None:
        peer = Peer(server_max_streams=200)
        pool = Pool(peer.dial, max_streams=100)
        await open_many(pool, 1)
        await asyncio.sleep(0.05)
        assert peer.dials == 1 and pool.prewarm_opened == 0
        pool.close_all()
        keys = [PoolKey(A, B, f"10.0.0.{i}", "10.0.0.1") for i in range(2, 6)]
        bounded = Pool(peer.dial, max_streams=100, prewarm_destinations=2)
        for k in keys:
            session, sid = await bounded.open_stream(k, HEADERS)
            assert (await session.response(sid))[0] == 200
        assert bounded.stats()["pool_prewarm_destinations"] == 2
        bounded.close_all()
        await peer.close()

    asyncio.run(run())
