"""Outbound (15001): an app's captured connection, its original destination recovered from the
kernel, carried over a pooled HBONE connection to a mesh destination, passed through as plain
TCP (or refused) outside the mesh. `dial` makes the pool's new HBONE connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from ztunnel import connect, hbone, podnet
from ztunnel.carry import carry_stream, splice
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
from ztunnel.model import PodSpec, PodState, Spawn, TunnelConfig
from ztunnel.pool import Pool, PoolKey
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession, TunnelClosedError
from ztunnel.session import dial as dial_hbone
from ztunnel.tls import Contexts, PeerIdentityError, describe_handshake_error, verify_server
from ztunnel.upstream import DialError, UpstreamConnect, UpstreamError, connect_plain, reset

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


class Outbound:
    def __init__(self, config: TunnelConfig, contexts: Contexts,
                 pod_by_ip: Callable[[str], PodState | None],
                 connect_socket: UpstreamConnect, *, track: Track, spawn: Spawn) -> None:
        self.config = config
        self.contexts = contexts
        self._pod_by_ip = pod_by_ip
        self._connect_socket = connect_socket
        self._track = track
        self._spawn = spawn
        self.pool = Pool(self.dial, max_streams=config.max_streams_per_connection,
                         idle_timeout=config.idle_timeout,
                         prewarm_destinations=config.prewarm_destinations,
                         prewarm_ttl=config.prewarm_ttl)

    def start(self, pod: PodState, conn: socket.socket, addr: tuple[str, int],
              guard: ConnectionGuard) -> Coroutine[Any, Any, None] | None:
        """Serve an accepted connection (tunnel.Handler). On a pooled HBONE connection with room
        the CONNECT goes out from here and the rest runs by callbacks (`_Carried`); a dial or a
        passthrough is returned as a coroutine for a Task."""
        cfg = self.config
        spec = pod.spec
        try:
            dst_ip_a, dst_port = cfg.original_dst(conn)
        except OSError as exc:
            log.warning("outbound connection from pod %s: cannot recover the original destination "
                        "(%s): is the capture program loaded?", spec.name, exc)
            conn.close()
            return None
        dst_ip = str(dst_ip_a)
        wl = cfg.resolver(dst_ip)
        svc = cfg.service_dst(conn)
        ev = guard.track(ConnectionEvent(
            Phase.OPEN, TunnelDirection.OUTBOUND, spec.ip, addr[1], dst_ip, dst_port,
            src_workload=spec.name, src_identity=spec.identity,
            dst_workload=wl.name if wl else "", dst_identity=wl.identity if wl else None,
            svc_ip=str(svc[0]) if svc else "", svc_port=svc[1] if svc else 0))
        if dst_port in connect.ILLEGAL_PORTS:
            log.warning("outbound connection from pod %s to %s:%d refused: tunnel ports are never "
                        "a target (redirect loop?)", spec.name, dst_ip, dst_port)
            reset(conn)
            guard.refuse(ev, ResponseFlag.NO_ROUTE, Cause.ILLEGAL_PORT, TransportFlag.BAD_REQUEST)
            return None
        if wl is None or wl.identity is None:
            return self._passthrough(spec, conn, ev, guard)
        key = PoolKey(spec.identity, wl.identity, dst_ip, spec.ip)
        headers = connect.request_headers(dst_ip_a, dst_port, ipaddress.ip_address(spec.ip),
                                          addr[1])
        opened = self.pool.try_open_stream(key, headers)
        if opened is None:
            return self._dialed(spec, conn, ev, key, headers, guard)
        flight = _Carried(self, guard, spec, ev, key, headers, *opened)
        self._track(flight)
        flight.step(flight.start, conn)
        return None

    async def _dialed(self, spec: PodSpec, conn: socket.socket,  # noqa: PLR0917 -- start's context
                      ev: ConnectionEvent, key: PoolKey, headers: list[tuple[str, str]],
                      guard: ConnectionGuard) -> None:
        """No pooled connection had room: dial one (the pool makes one dial per key)."""
        app = await _app_side(conn)
        await self._hbone(spec, app, ev, key, headers, guard, attempts=3)

    async def _hbone(self, spec: PodSpec, app: PlainSide,  # noqa: PLR0917 -- start's context
                     ev: ConnectionEvent, key: PoolKey, headers: list[tuple[str, str]],
                     guard: ConnectionGuard, *, attempts: int) -> None:
        try:
            session, sid, status = await self._connect_stream(key, headers, attempts)
        except UpstreamError as exc:  # the dial failed (DialError)
            app.reset()
            guard.close(exc.refusal(ev))
            return
        except (TunnelClosedError, OSError, TimeoutError, hbone.StreamError) as exc:
            no_stream(spec, ev, app, guard, exc)
            return
        if status != connect.OK:
            refused_by_destination(spec, ev, app, guard, status)
            return
        await carry_stream(guard, ev, session, sid, app, source_side=True)

    async def _connect_stream(self, key: PoolKey, headers: list[tuple[str, str]],
                              attempts: int = 3) -> tuple[HboneSession, int, int]:
        """CONNECT on a pooled connection: (session, stream id, status). A stream that failed
        before its response on a connection the peer sent GOAWAY on (its tunnel is draining:
        an agent being replaced) is opened again on another connection; the peer refused it
        unprocessed (RFC 9113 8.7), and the app's bytes wait until a stream is answered."""
        for attempt in range(attempts):
            session: HboneSession | None = None
            sid = 0
            try:
                session, sid = await self.pool.open_stream(key, headers)
                # A timeout scope, not wait_for: no extra Task (and loop turns) per connection.
                async with asyncio.timeout(self.config.connect_timeout):
                    status, _ = await session.response(sid)
                return session, sid, status
            except (TunnelClosedError, hbone.StreamError):
                if (session is not None and session.core.goaway_received
                        and attempt + 1 < attempts):
                    log.debug("HBONE stream to %s refused by a draining peer: retrying",
                              key.dst_ip)
                    continue
                if session is not None and sid:
                    session.stream_reset(sid)  # do not leave the stream open on the connection
                raise
            except BaseException:
                if session is not None and sid:
                    session.stream_reset(sid)
                raise
        raise AssertionError("unreachable")

    async def _passthrough(self, spec: PodSpec, conn: socket.socket, ev: ConnectionEvent,
                           guard: ConnectionGuard) -> None:
        app = await _app_side(conn)
        if self.config.outside_mesh == "refuse":
            log.warning("outbound connection from pod %s to %s:%d refused: destination is not in "
                        "the mesh and passthrough is off", spec.name, ev.dst_ip, ev.dst_port)
            app.reset()
            guard.refuse(ev, ResponseFlag.NO_ROUTE, Cause.OUTSIDE_MESH, TransportFlag.NO_ROUTE)
            return
        try:
            up = await connect_plain(spec, (ev.dst_ip, ev.dst_port), podnet.TUNNEL_MARK,
                                     source_ip=None, peer=None,
                                     connect_socket=self._connect_socket)
        except UpstreamError as exc:
            app.reset()
            # Passthrough has no policy verdict of its own: any failure is a connect failure.
            guard.refuse(ev, ResponseFlag.CONNECT, Cause.UPSTREAM,
                         TransportFlag.UPSTREAM_FAILURE, exc.why)
            return
        await splice(guard, ev, app, up, TransportFlag.CONNECT | TransportFlag.PASSTHROUGH)

    async def dial(self, key: PoolKey) -> HboneSession:
        loop = asyncio.get_running_loop()
        pod = self._pod_by_ip(key.src_ip)
        if pod is None:
            raise DialError(f"source pod {key.src_ip} is no longer enrolled")
        cfg = self.config
        target = (key.dst_ip, cfg.hbone_port)
        where = f"{key.dst_ip}:{cfg.hbone_port}"
        sock = podnet.upstream(pod.spec.netns, podnet.TUNNEL_MARK)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, target), cfg.connect_timeout)
        except TimeoutError:
            sock.close()
            msg = (f"connection to {where} timed out: maybe a NetworkPolicy is blocking HBONE "
                   f"port {cfg.hbone_port}")
            log.warning("%s", msg)
            raise DialError(msg) from None
        except ConnectionRefusedError:
            sock.close()
            msg = (f"connection to {where} refused: no tunnel listens there (destination pod not "
                   "enrolled, or its node's tunnel is down)")
            log.warning("%s", msg)
            raise DialError(msg) from None
        except OSError as exc:
            sock.close()
            msg = f"connection to {where} failed: {exc.strerror or exc}"
            log.warning("%s", msg)
            raise DialError(msg) from None
        expected = key.dst_identity
        try:
            session = await dial_hbone(
                sock, self.contexts.client(key.src_identity),
                lambda so: verify_server(so, expected, self.config.trust),
                cfg.client_settings, label=where, handshake_timeout=cfg.handshake_timeout)
        except PeerIdentityError as exc:
            sock.close()
            raise DialError(f"mTLS to {where} rejected: {exc}", flag=TransportFlag.TLS_FAILURE,
                            response=ResponseFlag.IDENTITY_ERROR,
                            cause=Cause.PEER_IDENTITY) from None
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            sock.close()
            cause = describe_handshake_error(exc)
            closed = isinstance(exc, ConnectionError | TimeoutError)
            if closed and not isinstance(exc, ssl.SSLError):
                cause = (f"{cause}: the peer closed the connection during setup; it probably "
                         "rejected our client certificate (see its logs)")
            msg = f"mTLS handshake with {where} (expecting {expected}) failed: {cause}"
            log.warning("%s", msg)
            raise DialError(msg, flag=TransportFlag.TLS_FAILURE,
                            response=ResponseFlag.TLS_FAILURE,
                            cause=Cause.TLS_HANDSHAKE) from None
        return session


async def _app_side(conn: socket.socket) -> PlainSide:
    loop = asyncio.get_running_loop()
    _, app = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), conn)
    return app


def no_stream(spec: PodSpec, ev: ConnectionEvent, app: PlainSide, guard: ConnectionGuard,
              exc: BaseException | None) -> None:
    """The CONNECT got no answer: the connection went, the stream was reset, or time ran out."""
    why = str(exc or "") or "no response in time (destination tunnel overloaded or hung?)"
    log.warning("HBONE CONNECT from pod %s to %s:%d failed: %s", spec.name, ev.dst_ip,
                ev.dst_port, why)
    app.reset()
    guard.close(UpstreamError.unavailable(why).refusal(ev))


def refused_by_destination(spec: PodSpec, ev: ConnectionEvent, app: PlainSide,
                           guard: ConnectionGuard, status: int) -> None:
    err = UpstreamError.from_status(status)
    log.warning("HBONE CONNECT from pod %s (%s) to %s:%d (%s) answered %d: %s", spec.name,
                spec.identity, ev.dst_ip, ev.dst_port, ev.dst_identity, status, err.why)
    app.reset()
    # Refused by the destination over an established mTLS connection.
    guard.close(ev.refused(err.response, err.cause, err.flag | TransportFlag.HBONE,
                           f"{status}: {err.why}"))


class _Carried(Flight):
    """An outbound connection on a pooled HBONE connection, by callbacks: the CONNECT is out
    (start), the app's transport is made meanwhile, the response's done callback attaches the
    relay (or refuses), the app side's end reports the close. A stream refused by a draining
    peer (GOAWAY) is opened again elsewhere by `Outbound._hbone` in a Task."""

    def __init__(self, outbound: Outbound, guard: ConnectionGuard,  # noqa: PLR0917 -- start's context
                 spec: PodSpec, ev: ConnectionEvent, key: PoolKey,
                 headers: list[tuple[str, str]], session: HboneSession, sid: int) -> None:
        super().__init__(guard)
        self.outbound = outbound
        self.spec = spec
        self.ev = ev
        self.key = key
        self.headers = headers
        self.session = session
        self.sid = sid
        self.app: MadePlain | None = None
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Future[tuple[int, dict[str, str]]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False  # a 200: carry once the app's transport is in place too
        self.carrying = False

    def start(self, conn: socket.socket) -> None:
        self.app = MadePlain(lambda _: self.step(self._made))
        self.transport = plain_transport(conn, self.app)
        self.response = self.session.response_future(self.sid)
        self.response.add_done_callback(lambda fut: self.step(self._answered, fut))
        self.timer = self.loop.call_later(self.outbound.config.connect_timeout, self.step,
                                          self._timed_out)

    def _answered(self, fut: asyncio.Future[tuple[int, dict[str, str]]]) -> None:
        self._stop_timer()
        app = self.app
        assert app is not None
        exc = TunnelClosedError("response abandoned") if fut.cancelled() else fut.exception()
        if exc is not None:
            if (isinstance(exc, TunnelClosedError | hbone.StreamError)
                    and self.session.core.goaway_received):
                log.debug("HBONE stream to %s refused by a draining peer: retrying",
                          self.key.dst_ip)
                self.outbound._spawn(self.guard.run(self.outbound._hbone(
                    self.spec, app, self.ev, self.key, self.headers, self.guard, attempts=2)))
                self.finish()  # the Task has the connection now
                return
            self.session.stream_reset(self.sid)  # do not leave the stream open on the connection
            no_stream(self.spec, self.ev, app, self.guard, exc)
            self.finish()
            return
        status, _ = fut.result()
        if status != connect.OK:
            refused_by_destination(self.spec, self.ev, app, self.guard, status)
            self.finish()
            return
        self.answered = True
        if app.transport is not None:
            self._carry()

    def _made(self) -> None:
        if self.answered and not self.carrying:
            self._carry()

    def _carry(self) -> None:
        assert self.app is not None
        self.carrying = True
        self.carry(self.ev, self.session, self.sid, self.app, source_side=True)

    def _timed_out(self) -> None:
        self.timer = None
        self._give_up()
        assert self.app is not None
        no_stream(self.spec, self.ev, self.app, self.guard, None)
        self.finish()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _give_up(self) -> None:
        """No answer wanted any more: forget the response, reset the stream."""
        self._stop_timer()
        if self.response is not None and not self.response.done():
            self.response.cancel()
        if not self.carrying:
            self.session.stream_reset(self.sid)

    def _abort(self) -> None:
        self._give_up()
        if self.app is not None and self.app.transport is not None:
            self.app.reset()
        elif self.transport is not None:
            self.transport.abort()
