"""One hop, two processes on loopback: 1-byte round trips/s and bulk Gbit/s.

- `tls`: a TLS echo server, asyncio's SSL transport (`--impl asyncio`) vs ztunnel.tlswire
  (`--impl wire`); the client is a blocking ssl socket in another process.
- `hbone`: an HBONE server session echoing each stream, client session in another process;
  uses `ztunnel.session.dial/accept` when the tree has them, else asyncio's SSL transport (so the
  same script measures the tree before the lean path: run it with PYTHONPATH at that tree).

    python -m benchmarks.hbone_hop tls --impl wire
    python -m benchmarks.hbone_hop hbone [--uvloop]

Not a test: numbers vary with the shared machine; repeat and report ranges.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import ssl
import time
from datetime import timedelta
from typing import Any

from agent.identity import pki
from agent.identity.spiffe import Identity
from ztunnel import hbone, tls
from ztunnel.relay import PlainSide

TD = "cluster.local"
RR_SECONDS = 3.0
BULK = 256 << 20


class _Source:
    def __init__(self) -> None:
        self.ca = pki.Authority.generate(TD)
        self.leaves: dict[Identity, tuple[bytes, bytes]] = {}

    def current(self, identity: Identity) -> tuple[bytes, bytes]:
        if identity not in self.leaves:
            key = pki.generate_key()
            leaf = self.ca.issue(key.public_key(), timedelta(hours=1), uris=[str(identity)])
            self.leaves[identity] = ("".join(self.ca.chain_pems(leaf)).encode(),
                                     pki.key_to_pem(key))
        return self.leaves[identity]

    def trust_bundle_pem(self) -> bytes:
        return pki.cert_to_pem(self.ca.root).encode()


CLIENT, SERVER = Identity(TD, "default", "client"), Identity(TD, "default", "server")


# -- TLS echo ------------------------------------------------------------------------------
class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes | memoryview) -> None:
        tail = bytes(data[-1:])
        if tail != b"\0":  # a round trip's byte or the end-of-bulk mark; bulk (zeros) is dropped
            self.t.write(tail)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def _tls_server(sock: socket.socket, ctx: ssl.SSLContext, impl: str) -> None:
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(sock)
    done = loop.create_future()
    proto = _Echo()
    proto.connection_lost = lambda exc: done.done() or done.set_result(None)  # type: ignore[method-assign]
    if impl == "asyncio":
        await loop.connect_accepted_socket(lambda: proto, conn, ssl=ctx)
    else:
        from ztunnel import tlswire  # noqa: PLC0415 -- absent in the tree before
        t = await tlswire.handshake(conn, ctx, server_side=True, timeout=10)
        tlswire.TlsWire(loop, conn, t, proto).start()
    await done


def _tls_client(port: int, ctx: ssl.SSLContext) -> dict[str, float]:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw)
    return _measure(s.sendall, s.recv)


def _measure(send: Any, recv: Any) -> dict[str, float]:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < RR_SECONDS:
        send(b"x")
        if recv(16) != b"x":
            raise RuntimeError("echo mismatch")
        n += 1
    rr = n / (time.perf_counter() - t0)
    block = b"\0" * (256 << 10)
    t0 = time.perf_counter()
    for _ in range(BULK // len(block)):
        send(block)
    send(b"!")  # the echo of a small message proves the server read everything before it
    while recv(16) != b"!":
        pass
    gbps = BULK * 8 / (time.perf_counter() - t0) / 1e9
    return {"rr_per_s": rr, "bulk_gbps": gbps}


# -- HBONE echo ----------------------------------------------------------------------------
class _StreamEcho(PlainSide):
    """Plain side stand-in: echoes small messages back on the stream, discards bulk (a
    PlainSide subclass: the compiled session checks the type it is handed)."""

    def __init__(self, session: Any, sid: int) -> None:
        super().__init__()
        self.session, self.sid = session, sid

    def attach(self, peer: Any) -> None:
        pass

    def send(self, data: bytes | memoryview) -> bool:
        tail = bytes(data[-1:])
        if tail != b"\0":
            self.session.stream_send(self.sid, tail)
        return True

    def finish(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def drained(self, n: int) -> None:
        pass


async def _hbone_server(sock: socket.socket, ctxs: tls.Contexts) -> None:
    from ztunnel import session as sm  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(sock)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_request(s: Any, sid: int, headers: dict[str, str]) -> None:
        s.respond(sid, 200)
        s.attach(sid, _StreamEcho(s, sid))

    def verify(so: Any) -> Identity:
        return tls.verify_client(so, TD)

    if hasattr(sm, "accept"):
        session = await sm.accept(conn, ctxs.server(SERVER), verify, on_request=on_request)
    else:
        _, session = await loop.connect_accepted_socket(
            lambda: sm.HboneSession(False, verify, hbone.Settings(), on_request=on_request),
            conn, ssl=ctxs.server(SERVER))
    await session.closed


async def _hbone_client(port: int, ctxs: tls.Contexts) -> dict[str, float]:
    from ztunnel import session as sm  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def verify(so: Any) -> Identity:
        return tls.verify_server(so, SERVER)

    if hasattr(sm, "dial"):
        session = await sm.dial(sock, ctxs.client(CLIENT), verify)
    else:
        _, session = await loop.create_connection(
            lambda: sm.HboneSession(True, verify), sock=sock, ssl=ctxs.client(CLIENT),
            server_hostname="")
        await session.ready
    sid = session.open_stream([(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
    status, _ = await session.response(sid)
    assert status == 200
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    class Sink(_StreamEcho):
        def send(self, data: bytes | memoryview) -> bool:
            inbox.put_nowait(bytes(data[-1:]))
            return True

    session.attach(sid, Sink(session, sid))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < RR_SECONDS:
        session.stream_send(sid, b"x")
        if await inbox.get() != b"x":
            raise RuntimeError("echo mismatch")
        n += 1
    rr = n / (time.perf_counter() - t0)
    block = b"\0" * (256 << 10)
    t0 = time.perf_counter()
    sent = 0
    while sent < BULK:
        if not session.stream_send(sid, block):
            while session.core.buffered(sid):
                await asyncio.sleep(0)
        sent += len(block)
    session.stream_send(sid, b"!")
    while await inbox.get() != b"!":
        pass
    gbps = BULK * 8 / (time.perf_counter() - t0) / 1e9
    session.close()
    return {"rr_per_s": rr, "bulk_gbps": gbps}


def _serve(kind: str, impl: str, sock: socket.socket, source: _Source) -> None:
    ctxs = tls.Contexts(source)
    if kind == "tls":
        asyncio.run(_tls_server(sock, ctxs.server(SERVER), impl))
    else:
        asyncio.run(_hbone_server(sock, ctxs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("tls", "hbone"))
    ap.add_argument("--impl", choices=("asyncio", "wire"), default="wire")
    ap.add_argument("--uvloop", action="store_true", help="both processes on uvloop")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop  # noqa: PLC0415 -- optional, only for this comparison

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    source = _Source()
    ctxs = tls.Contexts(source)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    proc = mp.get_context("fork").Process(target=_serve, args=(args.kind, args.impl, lsock,
                                                               source))
    proc.start()
    try:
        if args.kind == "tls":
            cctx = ctxs.client(CLIENT)
            res = _tls_client(port, cctx)
        else:
            res = asyncio.run(_hbone_client(port, ctxs))
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    print(f"{args.kind} {args.impl if args.kind == 'tls' else ''}: "
          f"{res['rr_per_s']:,.0f} round trips/s, bulk {res['bulk_gbps']:.2f} Gbit/s")


if __name__ == "__main__":
    main()
