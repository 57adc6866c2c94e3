"""tlswire over real loopback TCP and TLS: everything written before close() reaches a slow
peer that sent more than was read (lingering close: closing a socket with unread input makes
the kernel send RST and drop what it has not sent yet), and a peer that never closes is let go
after LINGER."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.identity import pki
from ztunnel import tlswire

FLOOD = 256 * 1024
# A response larger than the kernel's send buffer, so part of it is still queued there when the
# transport has handed over its last byte; the last word is at its very end.
LAST = bytes(2 << 20) + b"goodbye"


def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = pki.Authority.generate("cluster.local")
    key = pki.generate_key()
    leaf = ca.issue(key.public_key(), timedelta(hours=1),
                    uris=["spiffe://cluster.local/ns/default/sa/server"])
    cert, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("".join(ca.chain_pems(leaf)), encoding="ascii")
    key_path.write_bytes(pki.key_to_pem(key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key_path))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the test is about closing, not about trust
    return server, client


class SayGoodbye:
    """Answers the first bytes with LAST and closes (a budget trip's GOAWAY behind a
    download)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: Any = None
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.transport.is_closing():
            self.transport.write(LAST)
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def flooding_client(ctx: ssl.SSLContext, addr: tuple[str, int], got: bytearray,
                    hold: threading.Event | None) -> None:
    """Sends FLOOD bytes without reading (small receive buffer), then reads until the end."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(addr)
    with raw, ctx.wrap_socket(raw) as tls:
        chunk = bytes(64 * 1024)
        with contextlib.suppress(OSError):
            for _ in range(FLOOD // len(chunk)):
                tls.sendall(chunk)
        with contextlib.suppress(OSError):
            while data := tls.recv(65536):
                got += data
        if hold is not None:
            hold.wait(60)  # keeps the connection open until the server has let it go


def serve_one(tmp_path: Path, hold: threading.Event | None = None) -> bytes:
    """One connection answered by SayGoodbye; returns what the client read. With `hold`, the
    client keeps its end open until hold is set (after the server's connection_lost)."""
    server_ctx, client_ctx = contexts(tmp_path)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        got = bytearray()
        client = threading.Thread(target=flooding_client, daemon=True,
                                  args=(client_ctx, listener.getsockname(), got, hold))
        client.start()
        with listener:
            sock, _ = await loop.sock_accept(listener)
        tls = await tlswire.handshake(sock, server_ctx, server_side=True, timeout=10)
        proto = SayGoodbye(loop)
        wire = tlswire.TlsWire(loop, sock, tls, proto)
        wire.start()
        try:
            await asyncio.wait_for(proto.lost, 20)
        finally:
            if hold is not None:
                hold.set()
        await asyncio.to_thread(client.join, 30)
        return bytes(got)

    return asyncio.run(main())


def test_the_last_word_reaches_a_peer_that_is_still_sending(tmp_path: Path) -> None:
    got = serve_one(tmp_path)
    assert got == LAST, (len(got), got[-16:])


def test_a_peer_that_never_closes_is_let_go_after_the_linger(tmp_path: Path) -> None:
    """connection_lost comes from the LINGER timer while the peer still holds its end."""
    got = serve_one(tmp_path, threading.Event())
    assert got == LAST, (len(got), got[-16:])


class SayTooMuch(SayGoodbye):
    """Answers with more than the kernel's buffers hold, then closes: part stays queued here."""

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.transport.is_closing():
            self.transport.write(bytes(32 << 20))
            self.transport.close()


def test_a_peer_that_reads_nothing_is_cut_off_at_the_close_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() with a backlog the peer never reads: the connection is aborted after
    CLOSE_DEADLINE instead of staying open for as long as the peer likes."""
    monkeypatch.setattr(tlswire, "CLOSE_DEADLINE", 0.5)
    server_ctx, client_ctx = contexts(tmp_path)
    release = threading.Event()

    def client(addr: tuple[str, int]) -> None:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(10)
        raw.connect(addr)
        with raw, client_ctx.wrap_socket(raw) as tls:
            tls.sendall(b"x")
            release.wait(30)  # never reads

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        thread = threading.Thread(target=client, args=(listener.getsockname(),), daemon=True)
        thread.start()
        with listener:
            sock, _ = await loop.sock_accept(listener)
        tls = await tlswire.handshake(sock, server_ctx, server_side=True, timeout=10)
        proto = SayTooMuch(loop)
        wire = tlswire.TlsWire(loop, sock, tls, proto)
        wire.start()
        try:
            await asyncio.wait_for(proto.lost, 20)
            return not release.is_set()  # lost while the peer still held its end, unread
        finally:
            release.set()
            await asyncio.to_thread(thread.join, 30)

    assert asyncio.run(main())
