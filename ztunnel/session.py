"""One HBONE connection (TLS + HTTP/2): the sans-IO core joined to its wire and plain sides.

`dial` and `accept` run the TLS handshake on a connected socket (tlswire, no asyncio SSL
transport) and start a session on it. The session only sees the `Wire` seam, so its logic is
tested without sockets. The peer's identity is checked in `connection_made`, before a single
HTTP/2 byte is processed.
Streams are joined to PlainSide relays through `StreamHandle`. Back-pressure from the TLS
transport (its write buffer above high water) pauses reading on every plain socket that feeds
this connection until the buffer drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from mypy_extensions import mypyc_attr

from agent.identity.spiffe import Identity
from ztunnel import hbone, tlswire
from ztunnel.lograte import RepeatLimiter
from ztunnel.relay import PlainSide
from ztunnel.tls import PeerIdentityError

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())  # a peer decides how often these warnings fire

TLS_HIGH_WATER = 1024 * 1024
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_TIMEOUT = 20.0

Verifier = Callable[[ssl.SSLObject | None], Identity]


class Wire(Protocol):
    """The transport seam: what a session needs from the connection under it. tlswire.TlsWire
    is the real one; tests join two sessions with an in-memory pair (no sockets)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def writelines(self, chunks: list[bytes | memoryview]) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of this builtin
class TunnelClosedError(ConnectionError):
    """The HBONE connection went away (or was refused) before the stream finished."""


class StreamHandle:
    """A tunnel stream seen as a relay Endpoint by the plain side."""

    def __init__(self, session: HboneSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id

    def send(self, data: bytes | memoryview) -> bool:
        return self.session.stream_send(self.stream_id, data)

    def drained(self, n: int) -> None:
        self.session.stream_consumed(self.stream_id, n)

    def finish(self) -> None:
        self.session.stream_end(self.stream_id)

    def reset(self) -> None:
        self.session.stream_reset(self.stream_id)


RequestHandler = Callable[["HboneSession", int, dict[str, str]], None]


class HboneSession:
    """One HBONE connection: the core's events joined to plain sides, over a Wire."""

    def __init__(self, client: bool, verify: Verifier, settings: hbone.Settings | None = None, *,
                 on_request: RequestHandler | None = None, label: str = "",
                 keepalive: float = KEEPALIVE_INTERVAL,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.client = client
        self.core = hbone.Core(client, settings)
        self.label = label
        self.peer: Identity | None = None
        self.local_addr: tuple[str, int] = ("", 0)
        self.remote_addr: tuple[str, int] = ("", 0)
        self.transport: Wire | None = None
        self.failure: BaseException | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        # Only dialers await `ready`; a server-side failure must not warn "never retrieved".
        self.ready.add_done_callback(_retrieve)
        self.closed: asyncio.Future[None] = loop.create_future()
        self.reserved = 0  # pool: stream slots promised but not yet opened
        self.on_change: Callable[[HboneSession], None] | None = None
        self._verify = verify
        self._on_request = on_request
        self._plains: dict[int, PlainSide] = {}
        self._early: dict[int, list[bytes]] = {}
        self._early_end: set[int] = set()
        self._early_reset: set[int] = set()
        self._responses: dict[int, asyncio.Future[tuple[int, dict[str, str]]]] = {}
        self._tls_paused = False
        self._waiting_tls: set[int] = set()
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout
        self._ping_sent: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = loop

    # -- state -------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return (self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None
                and not self.closed.done() and not self.core.goaway_received
                and not self.core.terminated)

    @property
    def load(self) -> int:
        return self.core.open_streams + self.reserved

    def capacity(self, limit: int) -> int:
        return min(limit, self.core.peer_max_streams)

    def stream_open(self, stream_id: int) -> bool:
        """The stream still exists and was not reset (checked before and after an upstream
        connect: a reset stream gets none, or has its fresh one closed)."""
        return (self.core.has_stream(stream_id) and stream_id not in self._early_reset
                and not self.closed.done())

    @property
    def accepting(self) -> bool:
        """False once the connection is ending (failed, closed or closing): no new work
        (upstream connects) for it. A graceful GOAWAY is not the end: the streams up to its
        last stream id are still served (RFC 9113 6.8); the core refuses the ones above."""
        return not (self.core.terminated or self.closed.done()
                    or (self.transport is not None and self.transport.is_closing()))

    def recheck(self) -> PeerIdentityError | None:
        """Verify the peer again (after a trust change); the error if it no longer passes."""
        if self.transport is None:
            return None
        try:
            self._verify(self.transport.get_extra_info("ssl_object"))
        except PeerIdentityError as exc:
            log.warning("HBONE %s %s:%d no longer trusted: %.300s",
                        "server" if self.client else "client", *self.remote_addr, exc)
            return exc
        return None

    @property
    def trips(self) -> dict[str, int]:
        """Frame-level budget trips on this connection (hbone.BUDGET_NAMES)."""
        return self.core.trips

    # -- protocol (called by the wire) -------------------------------------------------------
    def connection_made(self, transport: Wire) -> None:
        self.transport = transport
        self.local_addr = tuple(transport.get_extra_info("sockname") or ("", 0))[:2]
        self.remote_addr = tuple(transport.get_extra_info("peername") or ("", 0))[:2]
        try:
            self.peer = self._verify(transport.get_extra_info("ssl_object"))
        except PeerIdentityError as exc:
            self.failure = exc
            side = "server" if self.client else "client"
            # The text can carry a peer-chosen identity: cut it so a line stays bounded.
            log.warning("rejecting HBONE %s %s:%d: %.300s", side, *self.remote_addr, exc)
            if not self.ready.done():
                self.ready.set_exception(exc)
            transport.abort()
            return
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER)
        self.core.start()
        self._flush()
        if self._keepalive > 0:
            self._timer = self._loop.call_later(self._keepalive, self._tick)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.failure is not None:
            return
        self._dispatch(self.core.receive(data))
        self._flush()

    def eof_received(self) -> bool:
        return False  # TLS close_notify / FIN from the peer: the connection is over

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        reason = exc or self.failure or TunnelClosedError("HBONE connection closed by peer")
        if not self.ready.done():
            self.ready.set_exception(reason)
        for fut in self._responses.values():
            if not fut.done():
                fut.set_exception(
                    TunnelClosedError(f"HBONE connection lost before the response: {reason}"))
        plains, self._plains = self._plains, {}
        for plain in plains.values():
            plain.reset()
        if not self.closed.done():
            self.closed.set_result(None)
        self._changed()

    def pause_writing(self) -> None:
        self._tls_paused = True
        self.core.write_blocked = True

    def resume_writing(self) -> None:
        self._tls_paused = False
        self.core.write_resumed()
        waiting, self._waiting_tls = self._waiting_tls, set()
        for sid in waiting:
            plain = self._plains.get(sid)
            if plain is not None and not self.core.buffered(sid):
                plain.drained(0)

    # -- client ------------------------------------------------------------------------------
    def open_stream(self, headers: list[tuple[str, str]]) -> int:
        sid = self.core.open_stream(headers)
        # Kept until `response()` takes it, so an early reset still reaches the caller.
        fut: asyncio.Future[tuple[int, dict[str, str]]] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._responses[sid] = fut
        self._flush()
        return sid

    def response_future(self, stream_id: int) -> asyncio.Future[tuple[int, dict[str, str]]]:
        """The stream's response for a caller that chains a callback instead of awaiting
        `response` (no Task wake-up). Forgotten here once done; cancel it to give up."""
        fut = self._responses[stream_id]
        fut.add_done_callback(lambda _: self._responses.pop(stream_id, None))
        return fut

    async def response(self, stream_id: int) -> tuple[int, dict[str, str]]:
        try:
            return await self._responses[stream_id]
        finally:
            self._responses.pop(stream_id, None)

    # -- server ------------------------------------------------------------------------------
    def respond(self, stream_id: int, status: int) -> None:
        if not self.core.has_stream(stream_id):
            return  # the client gave up (reset) while we were connecting upstream
        self.core.respond(stream_id, status)
        if status != 200:
            self._forget(stream_id)
        self._flush()

    # -- both --------------------------------------------------------------------------------
    def attach(self, stream_id: int, plain: PlainSide) -> bool:
        """Join a stream to its plain side; replays anything that arrived first. False if the
        stream is already gone (the plain side has then been reset)."""
        if not self.core.has_stream(stream_id) or stream_id in self._early_reset:
            self._early_reset.discard(stream_id)
            self._forget(stream_id)
            plain.reset()
            return False
        self._plains[stream_id] = plain
        plain.attach(StreamHandle(self, stream_id))
        for chunk in self._early.pop(stream_id, []):
            if plain.send(chunk):
                self.core.consumed(stream_id, len(chunk))
        if stream_id in self._early_end:
            self._early_end.discard(stream_id)
            plain.finish()
        self._flush()
        return True

    def stream_send(self, stream_id: int, data: bytes | memoryview) -> bool:
        try:
            clear = self.core.send(stream_id, data)
        except hbone.StreamError:
            return True  # stream already gone; the plain side is being reset
        self._flush()
        if clear and not self._tls_paused:
            return True
        if clear:
            self._waiting_tls.add(stream_id)
        return False

    def stream_consumed(self, stream_id: int, n: int) -> None:
        self.core.consumed(stream_id, n)
        self._flush()

    def stream_end(self, stream_id: int) -> None:
        self._dispatch(self.core.end(stream_id))
        self._flush()

    def stream_reset(self, stream_id: int) -> None:
        self._plains.pop(stream_id, None)
        self._dispatch(self.core.reset(stream_id))
        self._flush()

    def goaway(self) -> None:
        """Drain: no new streams from the peer; close once the open ones finish."""
        self.core.goaway()
        self._flush()
        if not self.core.open_streams:
            self.close()

    def close(self) -> None:
        """GOAWAY, then close once written (open streams are cut)."""
        self.core.close()
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------------
    def _flush(self) -> None:
        out = self.core.outbound_chunks()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _forget(self, sid: int) -> None:
        self._plains.pop(sid, None)
        self._early.pop(sid, None)
        self._early_end.discard(sid)
        self._waiting_tls.discard(sid)
        fut = self._responses.get(sid)
        if fut is not None and not fut.done():
            fut.set_exception(TunnelClosedError(f"stream {sid} was reset before a response"))
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _dispatch(self, events: list[hbone.Event]) -> None:
        for ev in events:
            if isinstance(ev, hbone.Data | hbone.Writable | hbone.End | hbone.Reset | hbone.Closed):
                self._stream_event(ev)
            else:
                self._connection_event(ev)

    def _stream_event(self, ev: hbone.Event) -> None:  # noqa: PLR0912 -- per event: attached or not yet
        sid = ev.stream_id
        if isinstance(ev, hbone.Data):
            plain = self._plains.get(sid)
            if plain is None:
                # Not acknowledged until written onward: bounded by the stream window.
                self._early.setdefault(sid, []).append(bytes(ev.data))  # a view: copy
            elif plain.send(ev.data):
                self.core.consumed(sid, len(ev.data))
        elif isinstance(ev, hbone.Writable):
            plain = self._plains.get(sid)
            if plain is not None:
                if self._tls_paused:
                    self._waiting_tls.add(sid)
                else:
                    plain.drained(0)
        elif isinstance(ev, hbone.End):
            plain = self._plains.get(sid)
            if plain is None:
                self._early_end.add(sid)
            else:
                plain.finish()
        elif isinstance(ev, hbone.Reset):
            plain = self._plains.pop(sid, None)
            if plain is None:
                self._early_reset.add(sid)
            else:
                plain.reset()
            fut = self._responses.get(sid)
            if fut is not None and not fut.done():
                fut.set_exception(
                    TunnelClosedError(f"peer reset stream {sid} (code {ev.code})"))
        elif isinstance(ev, hbone.Closed):
            self._plains.pop(sid, None)
            self._waiting_tls.discard(sid)
            if self.core.goaway_sent and not self.core.open_streams:
                self.close()  # draining and the last stream is done
            self._changed()

    def _connection_event(self, ev: hbone.Event) -> None:
        sid = ev.stream_id
        if isinstance(ev, hbone.Request):
            if self._on_request is not None:
                self._on_request(self, sid, ev.headers)
        elif isinstance(ev, hbone.Response):
            fut = self._responses.get(sid)
            if fut is not None and not fut.done():
                fut.set_result((ev.status, ev.headers))
        elif isinstance(ev, hbone.SettingsReceived):
            if not self.ready.done():
                self.ready.set_result(None)
            self._changed()
        elif isinstance(ev, hbone.PingAck):
            self._ping_sent = None
        elif isinstance(ev, hbone.GoAway):
            log.info("HBONE peer %s:%d sent GOAWAY (code %d): no new streams on it",
                     *self.remote_addr, ev.code)
            if self.core.terminated:
                self.close()
            self._changed()
        elif isinstance(ev, hbone.ConnectionFailed):
            log.warning("HBONE connection with %s:%d failed (%s): %.300s", *self.remote_addr,
                        _code_name(ev.code), ev.reason)
            self._flush()
            if self.transport is not None:
                self.transport.close()

    def _tick(self) -> None:
        now = time.monotonic()
        if self._ping_sent is not None and now - self._ping_sent > self._keepalive_timeout:
            log.warning("HBONE peer %s:%d sent no PING ACK within %.0fs: closing the connection "
                        "(peer hung or the path is dropping packets)", *self.remote_addr,
                        self._keepalive_timeout)
            self.abort()
            return
        if self._ping_sent is None:
            self._ping_sent = now
            self.core.ping(os.urandom(8))
            self._flush()
        self._timer = self._loop.call_later(self._keepalive, self._tick)


async def dial(sock: socket.socket, ctx: ssl.SSLContext, verify: Verifier,
               settings: hbone.Settings | None = None, *, label: str = "",
               handshake_timeout: float = 10.0) -> HboneSession:
    """Client: TLS over a connected socket, verify the server, exchange SETTINGS. Raises
    ssl.SSLError, ConnectionError (PeerIdentityError for a wrong identity), TimeoutError; on
    failure the socket is closed."""
    loop = asyncio.get_running_loop()
    try:
        tls = await tlswire.handshake(sock, ctx, server_side=False,
                                      timeout=handshake_timeout)
    except BaseException:
        sock.close()
        raise
    session = HboneSession(True, verify, settings, label=label)
    tlswire.TlsWire(loop, sock, tls, session).start()
    try:
        await asyncio.wait_for(asyncio.shield(session.ready), handshake_timeout)
    except BaseException:
        session.abort()
        raise
    return session


async def accept(sock: socket.socket, ctx: ssl.SSLContext, verify: Verifier,
                 settings: hbone.Settings | None = None, *,
                 on_request: RequestHandler | None = None, label: str = "",
                 handshake_timeout: float = 10.0) -> HboneSession:
    """Server: TLS over an accepted socket and a session on it. Raises ssl.SSLError, OSError,
    TimeoutError for a failed handshake (the socket is closed). A peer whose identity does not
    pass `verify` gets a session with `failure` set, already aborted."""
    loop = asyncio.get_running_loop()
    try:
        tls = await tlswire.handshake(sock, ctx, server_side=True,
                                      timeout=handshake_timeout)
    except BaseException:
        sock.close()
        raise
    session = HboneSession(False, verify, settings, on_request=on_request, label=label)
    tlswire.TlsWire(loop, sock, tls, session).start()
    return session


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _code_name(code: int) -> str:
    for name, value in vars(hbone.ErrorCodes).items():
        if value == code and not name.startswith("_"):
            return name
    return f"error {code}"
