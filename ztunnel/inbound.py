"""Inbound HBONE (15008): handshake admission, the mTLS + HTTP/2 server, and each CONNECT stream
carried to the pod's app with the client's source IP and the peer's identity in the mark.

Work a peer can make us do is bounded before it is done: pending handshakes per source IP and
overall (`HandshakeAdmission`), upstream connects in flight per connection, and no upstream
connect at all for a stream the client already reset or on a connection going away (checked
again after the connect: a fresh upstream whose stream died meanwhile is closed at once).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from agent.identity.spiffe import Identity
from ztunnel import connect, podnet
from ztunnel.admission import HandshakeAdmission, Refusal
from ztunnel.chain import Flight, MadePlain, Track, plain_transport
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)
from ztunnel.guard import ConnectionGuard
from ztunnel.lograte import RepeatLimiter
from ztunnel.model import Counters, PodSpec, PodState, TunnelConfig
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession
from ztunnel.session import accept as accept_hbone
from ztunnel.tls import Contexts, describe_handshake_error, verify_client
from ztunnel.upstream import (
    UpstreamCheck,
    UpstreamConnect,
    UpstreamError,
    connect_failure,
    connect_plain,
    reset,
    upstream_socket,
)

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


@dataclass
class _Connection:
    """Per accepted HBONE connection: its upstream connects in flight."""

    upstreams_in_flight: int = 0


async def connect_app(config: TunnelConfig, counters: Counters, spec: PodSpec, *,
                      peer: Identity | None, src_ip: str, target: tuple[str, int],
                      connect_socket: UpstreamConnect) -> PlainSide:
    """Connect to the pod's app as `src_ip`, marked with the peer's identity id (the kernel's
    policy decides on it): UpstreamError 401 on a policy deny, 503 on any other failure."""
    mark = upstream_mark(config, counters, peer)
    return await connect_plain(spec, target, mark, source_ip=src_ip, peer=peer,
                               connect_socket=connect_socket)


def upstream_mark(config: TunnelConfig, counters: Counters, peer: Identity | None) -> int:
    """Count an upstream connect and give the mark its socket carries: the peer's identity id,
    which the kernel's policy program reads."""
    counters.upstream_connects += 1
    return podnet.mark_for_identity(config.identity_id(peer))


def upstream_refusal(ev: ConnectionEvent, err: UpstreamError) -> ConnectionEvent:
    """The destination side's event for a failed upstream connect."""
    return err.refusal(ev, f"{err.status} {err.why}")


class Inbound:
    def __init__(self, config: TunnelConfig, contexts: Contexts, counters: Counters, *,
                 track: Track, draining: Callable[[], bool], check: UpstreamCheck) -> None:
        self.config = config
        self.contexts = contexts
        self.counters = counters
        self.admission = HandshakeAdmission(config.max_pending_handshakes,
                                            config.max_pending_handshakes_per_ip)
        self._track = track
        self._draining = draining
        self._check = check

    async def handle(self, pod: PodState, conn: socket.socket, addr: tuple[str, int],
                     guard: ConnectionGuard) -> None:
        refused = self.admission.admit(addr[0])
        if refused is not None:
            self._refuse_handshake(pod, conn, addr, refused)
            return
        try:
            session = await self._handshake(pod, conn, addr, guard)
        finally:
            self.admission.release(addr[0])
        if session is None:
            return
        if not pod.listeners:
            # The pod was removed or is draining while this handshake ran: no new streams.
            session.goaway()
        pod.sessions.add(session)
        try:
            await session.closed
        finally:
            pod.sessions.discard(session)
            if not session.closed.done():
                session.abort()

    def _refuse_handshake(self, pod: PodState, conn: socket.socket, addr: tuple[str, int],
                          refused: Refusal) -> None:
        if refused is Refusal.GLOBAL:
            self.counters.handshakes_refused_global += 1
            limit = self.admission.max_pending
        else:
            self.counters.handshakes_refused_per_ip += 1
            limit = self.admission.max_per_ip
        # One bounded line: the RepeatLimiter counts the rest of a flood.
        log.warning("HBONE connection from %s to pod %s reset before TLS: %s (%d) pending "
                    "handshakes reached", addr[0], pod.spec.name, refused.value, limit)
        reset(conn)

    async def _handshake(self, pod: PodState, conn: socket.socket, addr: tuple[str, int],
                         guard: ConnectionGuard) -> HboneSession | None:
        spec = pod.spec
        cfg = self.config
        td = cfg.trust_domain
        state = _Connection()

        def on_request(session: HboneSession, sid: int, headers: dict[str, str]) -> None:
            stream = _InboundStream(self, pod, session, sid, state)
            self._track(stream)
            stream.step(stream.start, headers)

        ev = ConnectionEvent(Phase.CLOSE, TunnelDirection.INBOUND, addr[0], addr[1], spec.ip,
                             cfg.hbone_port, dst_workload=spec.name, dst_identity=spec.identity,
                             flags=TransportFlag.TLS_FAILURE)
        try:
            session = await accept_hbone(
                conn, self.contexts.server(spec.identity),
                lambda so: verify_client(so, td, cfg.trust), cfg.settings,
                on_request=on_request, label=f"{addr[0]}:{addr[1]}",
                handshake_timeout=cfg.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.warning("rejected HBONE connection from %s:%d to pod %s: %s", addr[0], addr[1],
                        spec.name, describe_handshake_error(exc))
            conn.close()
            guard.close(ev.closed(reason=describe_handshake_error(exc),
                                  response=ResponseFlag.TLS_FAILURE, cause=Cause.TLS_HANDSHAKE))
            return None
        if session.failure is not None:
            guard.close(ev.closed(reason=str(session.failure),
                                  response=ResponseFlag.IDENTITY_ERROR,
                                  cause=Cause.PEER_IDENTITY))
            return None
        guard.closed = True  # the connection's streams report themselves
        return session

    def _admit_stream(self, pod: PodState, session: HboneSession, sid: int,  # noqa: PLR0917 -- one call site, the stream's whole context
                      verdict: connect.ConnectVerdict, state: _Connection,
                      guard: ConnectionGuard, ev: ConnectionEvent) -> bool:
        """Every check before an upstream connect; False after answering and reporting the
        refusal."""
        c = self.counters
        cfg = self.config
        spec = pod.spec
        src_ip = ev.src_ip
        if self._draining():
            # The stream came before this connection's GOAWAY: it is served (the peer opens the
            # streams above the GOAWAY's last stream id again, elsewhere).
            session.goaway()
        if not session.accepting:
            c.streams_refused_going_away += 1
            session.respond(sid, connect.UNAVAILABLE)
            guard.refuse(ev, ResponseFlag.CONNECT, Cause.UPSTREAM,
                         TransportFlag.UPSTREAM_FAILURE, "HBONE connection going away")
            return False
        if not verdict.ok:
            log.warning("HBONE request from %s (%s) to pod %s rejected with %d: %s", src_ip,
                        session.peer, spec.name, verdict.status, verdict.reason)
            session.respond(sid, verdict.status)
            guard.refuse(ev, ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
                         verdict.cause or Cause.BAD_AUTHORITY, TransportFlag.BAD_REQUEST,
                         verdict.reason)
            return False
        if state.upstreams_in_flight >= cfg.max_upstream_connects_per_connection:
            c.upstream_connects_capped += 1
            log.warning("HBONE connection from %s (%s) to pod %s: %d upstream connects in flight "
                        "(max_upstream_connects_per_connection): stream refused with 503",
                        src_ip, session.peer, spec.name, state.upstreams_in_flight)
            session.respond(sid, connect.UNAVAILABLE)
            guard.refuse(ev, ResponseFlag.CONNECT, Cause.UPSTREAM,
                         TransportFlag.UPSTREAM_FAILURE,
                         "max_upstream_connects_per_connection reached")
            return False
        return True


class _InboundStream(Flight):
    """One CONNECT stream served by callbacks: checks, the upstream connect (often done when
    connect() returns: then no wait at all), the 200, the relay, the close event."""

    def __init__(self, inbound: Inbound, pod: PodState, session: HboneSession, sid: int,
                 state: _Connection) -> None:
        super().__init__(ConnectionGuard(inbound.config))
        self.inbound = inbound
        self.pod = pod
        self.spec = pod.spec
        self.session = session
        self.sid = sid
        self.state = state
        self.ev: ConnectionEvent | None = None
        self.target = ("", 0)
        self.sock: socket.socket | None = None  # the upstream while it connects
        self.in_flight = False  # counted in state.upstreams_in_flight
        self.timer: asyncio.TimerHandle | None = None
        self.writer = -1  # the fd watched for the connect to finish
        self.transport: asyncio.Transport | None = None
        self.plain: MadePlain | None = None

    def start(self, headers: dict[str, str]) -> None:
        inbound, session, sid = self.inbound, self.session, self.sid
        c = inbound.counters
        if not session.stream_open(sid):
            # Reset by the client before we got to it (rapid reset): no upstream connect and
            # no flow record (the client never had a connection), only the counter.
            c.streams_reset_before_connect += 1
            self.finish()
            return
        cfg = inbound.config
        spec = self.spec
        src_ip, src_port = session.remote_addr
        src_wl = cfg.resolver(src_ip)
        verdict = connect.validate_request(headers, ipaddress.ip_address(session.local_addr[0]))
        dst_ip, dst_port = (str(verdict.target[0]), verdict.target[1]) if verdict.target else (
            spec.ip, 0)
        self.target = (dst_ip, dst_port)
        ev = self.ev = self.guard.track(ConnectionEvent(
            Phase.OPEN, TunnelDirection.INBOUND, src_ip, src_port, dst_ip, dst_port,
            src_workload=src_wl.name if src_wl else "", src_identity=session.peer,
            dst_workload=spec.name, dst_identity=spec.identity))
        if not inbound._admit_stream(self.pod, session, sid, verdict, self.state, self.guard,
                                     ev):
            self.finish()
            return
        self.state.upstreams_in_flight += 1
        self.in_flight = True
        mark = upstream_mark(cfg, c, session.peer)
        try:
            sock = self.sock = upstream_socket(spec, mark, src_ip)
        except UpstreamError as err:
            self._refused(err)
            return
        try:
            inbound._check(spec, session.peer, self.target, mark)
            code = sock.connect_ex(self.target)
            if code in _PENDING:
                # A local connect has usually finished inside connect() (the handshake runs in
                # the caller's softirq): ask instead of waiting a loop turn for writability.
                code = _connected(sock)
        except OSError as exc:
            self._connect_failed(exc)
            return
        if code == 0:
            self._connected()
        elif code in _PENDING:
            self.writer = sock.fileno()
            self.loop.add_writer(self.writer, self.step, self._writable)
            self.timer = self.loop.call_later(cfg.connect_timeout, self.step, self._timed_out)
        else:
            self._connect_failed(OSError(code, os.strerror(code)))

    def _writable(self) -> None:
        self._stop_waiting()
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(OSError(err, os.strerror(err)))
        else:
            self._connected()

    def _timed_out(self) -> None:
        self.timer = None
        self._stop_waiting()
        self._connect_failed(TimeoutError())

    def _stop_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.writer >= 0:
            self.loop.remove_writer(self.writer)
            self.writer = -1

    def _done_connecting(self) -> None:
        if self.in_flight:
            self.in_flight = False
            self.state.upstreams_in_flight -= 1

    def _connect_failed(self, exc: OSError) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._refused(connect_failure(self.spec, self.target, self.session.peer, exc))

    def _refused(self, err: UpstreamError) -> None:
        self._done_connecting()
        assert self.ev is not None
        self.session.respond(self.sid, err.status)
        self.guard.close(upstream_refusal(self.ev, err))
        self.finish()

    def _connected(self) -> None:
        self._done_connecting()
        sock, self.sock = self.sock, None
        assert sock is not None and self.ev is not None
        if not self.session.stream_open(self.sid):
            # The client reset the stream (or the connection went) while we connected.
            self.inbound.counters.upstreams_closed_stream_gone += 1
            reset(sock)
            self.guard.refuse(self.ev, ResponseFlag.CONNECT, Cause.UPSTREAM, TransportFlag.RESET,
                              "stream reset by the client during the upstream connect")
            self.finish()
            return
        self.plain = MadePlain(lambda plain: self.step(self._carry, plain))
        self.transport = plain_transport(sock, self.plain)
        # Answered now, while the transport is set up: the client's bytes that come first wait
        # in the session (bounded by the stream window) until the relay is attached.
        self.session.respond(self.sid, connect.OK)

    def _carry(self, plain: MadePlain) -> None:
        assert self.ev is not None
        self.carry(self.ev, self.session, self.sid, plain, source_side=False)

    def _abort(self) -> None:
        self._stop_waiting()
        self._done_connecting()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.plain is not None and self.plain.transport is not None:
            self.plain.reset()
        elif self.transport is not None:
            self.transport.abort()


_PENDING = (errno.EINPROGRESS, errno.EALREADY)


def _connected(sock: socket.socket) -> int:
    """0 once a non-blocking connect has finished, EINPROGRESS while it runs. getpeername, not a
    second connect(): that would run the kernel's connect programs (policy, rate limits) again."""
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return errno.EINPROGRESS
        raise
    return 0
