"""tlswire's writes over a real TLS connection (a socket pair): what a frame's pieces become in
TLS records, and that every byte arrives in order whatever mix of small and large pieces is
written."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Any

from support.testca import TestCA, identity

from ztunnel import frames, tls, tlswire


class Sink:
    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes | memoryview) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def _records(writes: list[list[bytes | memoryview]]) -> tuple[bytes, list[int]]:
    """Write each list with one writelines; the plaintext the peer got and its size per
    SSL read (one TLS record each)."""
    loop = asyncio.get_running_loop()
    ctxs = tls.Contexts(TestCA())
    server_ctx, client_ctx = ctxs.server(identity("server")), ctxs.client(identity("client"))
    a, b = socket.socketpair()
    try:
        (tls_s, tls_c) = await asyncio.gather(
            tlswire.handshake(a, server_ctx, server_side=True, timeout=10),
            tlswire.handshake(b, client_ctx, server_side=False, timeout=10))
        wire = tlswire.TlsWire(loop, a, tls_s, Sink())
        wire.start()
        expected = 0
        for chunks in writes:
            wire.writelines(chunks)
            expected += sum(len(c) for c in chunks)
        obj, rbio, _ = tls_c
        got = bytearray()
        sizes: list[int] = []
        buf = bytearray(1 << 20)
        while len(got) < expected:
            raw = await asyncio.wait_for(loop.sock_recv(b, 1 << 20), 10)
            assert raw, "peer closed early"
            rbio.write(raw)
            while True:
                try:
                    n = obj.read(len(buf), buf)
                except ssl.SSLWantReadError:
                    break
                got += buf[:n]
                sizes.append(int(n))
        wire.abort()
        return bytes(got), sizes
    finally:
        a.close()
        b.close()


def test_a_data_frame_header_shares_the_first_record_of_its_payload() -> None:
    payload = os.urandom(256 * 1024 + 3)
    header = frames.data_header(1, len(payload))
    got, sizes = asyncio.run(_records([[header, memoryview(payload)]]))
    assert got == header + payload
    assert sizes[0] == 16384  # not a 9-byte record of its own
    assert len(sizes) == -(-len(got) // 16384)  # as few records as the bytes need


def test_any_mix_of_small_and_large_pieces_arrives_whole_and_in_order() -> None:
    big = os.urandom(40 * 1024)
    pieces: list[list[bytes | memoryview]] = [
        [b"a", b"bc", big, b"d"],  # small pieces before a large one, and after it
        [os.urandom(15 * 1024), os.urandom(15 * 1024), memoryview(big)],  # small > a record
        [memoryview(big)[:20000], memoryview(big)[20000:]],  # large pieces only
        [b"e" * 9],
        [b"", big, b""],
    ]
    got, _ = asyncio.run(_records(pieces))
    assert got == b"".join(bytes(c) for chunks in pieces for c in chunks)
