"""The node tunnel: per-pod listeners inside each enrolled pod's netns, outbound HBONE through the
pool, inbound HBONE and plaintext to the pod's apps with the client's source IP preserved.

Listeners per pod (all created inside the pod's netns, then served by asyncio):
- 15001 outbound: the original destination comes from `original_dst(sock)` (SO_ORIGINAL_DST,
  answered by the kernel capture program); mesh destinations go over HBONE, others pass through
  as plain TCP or are refused (`outside_mesh`);
- 15006 inbound plaintext: the accepted socket's local address is the original destination;
  STRICT pods refuse it, PERMISSIVE pods forward it with no peer identity;
- 15008 HBONE: mTLS + HTTP/2 CONNECT server.
Upstream sockets to a pod's apps carry mark (identity id << 12) | 0x539 so the kernel's policy
program can decide on the authenticated identity; EPERM/EACCES from that connect becomes 401.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from agent import abi
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity
from ztunnel import connect, hbone, podnet
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    EventHook,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
    emit,
)
from ztunnel.lograte import RepeatLimiter
from ztunnel.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_STREAMS, Pool, PoolKey
from ztunnel.relay import PlainSide
from ztunnel.session import HboneSession, TunnelClosedError
from ztunnel.session import accept as accept_hbone
from ztunnel.session import dial as dial_hbone
from ztunnel.tls import (
    CertificateSource,
    Contexts,
    PeerIdentityError,
    PeerTrust,
    describe_handshake_error,
    limit_tls_read_buffers,
    verify_client,
    verify_server,
)

log = logging.getLogger(__name__)
# Refusals are logged once each but an attacker controls how many there are: bounded.
log.addFilter(RepeatLimiter.shared())


class Mode(enum.Enum):
    """PeerAuthentication mode for plaintext arriving at a pod."""

    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"


@dataclass(frozen=True)
class TunnelWorkload:
    """What the resolver knows about a destination IP. identity None = not in the mesh."""

    ip: str
    identity: Identity | None = None
    name: str = ""


@dataclass(frozen=True)
class PodSpec:
    """An enrolled local pod: its netns (name under /var/run/netns, or a path), IP and identity."""

    uid: str
    netns: str
    ip: str
    identity: Identity
    name: str = ""
    mode: Mode = Mode.STRICT


Resolver = Callable[[str], TunnelWorkload | None]
OriginalDst = Callable[[socket.socket], tuple[ipaddress.IPv4Address, int]]
ServiceDst = Callable[[socket.socket], "tuple[ipaddress.IPv4Address, int] | None"]
IdentityIds = Callable[[Identity | None], int]


def _no_ids(_: Identity | None) -> int:
    return 0


@dataclass
class TunnelConfig:
    certificates: CertificateSource
    resolver: Resolver
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    identity_id: IdentityIds = _no_ids
    trust: PeerTrust | None = None  # federated trust domains and aliases; None: ours only
    original_dst: OriginalDst = podnet.original_dst
    inbound_original_dst: OriginalDst = podnet.local_address
    service_dst: ServiceDst = podnet.service_dst  # the VIP an outbound destination came from
    outside_mesh: Literal["passthrough", "refuse"] = "passthrough"
    on_event: EventHook | None = None
    hbone_port: int = abi.HBONE_PORT
    outbound_port: int = abi.OUTBOUND_PORT
    inbound_port: int = abi.INBOUND_PORT
    outbound_bind: str = "127.0.0.1"
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS
    settings: hbone.Settings = field(default_factory=hbone.Settings)
    client_settings: hbone.Settings = field(
        default_factory=lambda: hbone.Settings(max_concurrent_streams=DEFAULT_MAX_STREAMS))


class DialError(ConnectionError):
    """No HBONE connection to the destination; `flag`, `response` and `cause` say why."""

    def __init__(self, message: str, flag: TransportFlag,
        response: ResponseFlag = ResponseFlag.CONNECT,
                 cause: Cause = Cause.UPSTREAM) -> None:
        super().__init__(message)
        self.flag = flag
        self.response = response
        self.cause = cause


@dataclass
class _Pod:
    spec: PodSpec
    listeners: list[socket.socket] = field(default_factory=list)
    by_port: dict[int, socket.socket] = field(default_factory=dict)
    accept_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    sessions: set[HboneSession] = field(default_factory=set)


class Tunnel:
    def __init__(self, config: TunnelConfig) -> None:
        limit_tls_read_buffers()
        self.config = config
        self.contexts = Contexts(config.certificates)
        self.pool = Pool(self._dial, max_streams=config.max_streams_per_connection,
                         idle_timeout=config.idle_timeout)
        self._pods: dict[str, _Pod] = {}
        self._by_ip: dict[str, _Pod] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False

    # -- pods --------------------------------------------------------------------------------
    async def add_pod(self, spec: PodSpec) -> None:
        """Open the pod's three listeners inside its netns; other pods are not touched."""
        if spec.uid in self._pods:
            raise ValueError(f"pod {spec.uid} is already enrolled")
        if self.draining:
            raise RuntimeError("tunnel is draining: not enrolling new pods")
        # pyroute2 runs its own event loop, so netlink work goes to a worker thread.
        await asyncio.to_thread(podnet.prepare_pod_netns, spec.netns)
        pod = _Pod(spec)
        cfg = self.config
        try:
            for ip, port, handler in (
                (cfg.outbound_bind, cfg.outbound_port, self._outbound),
                ("0.0.0.0", cfg.inbound_port, self._plaintext),
                ("0.0.0.0", cfg.hbone_port, self._hbone_conn),
            ):
                lsock = podnet.listener(spec.netns, ip, port)
                pod.listeners.append(lsock)
                pod.by_port[port] = lsock
                pod.accept_tasks.append(asyncio.create_task(self._accept_loop(pod, lsock, handler)))
        except BaseException:
            self._close_listeners(pod)
            raise
        self._pods[spec.uid] = pod
        self._by_ip[spec.ip] = pod
        log.info("pod %s (%s, %s) enrolled: listeners %d/%d/%d in netns %s", spec.name or spec.uid,
                 spec.ip, spec.identity, cfg.outbound_port, cfg.inbound_port, cfg.hbone_port,
                 spec.netns)

    async def remove_pod(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        self._by_ip.pop(pod.spec.ip, None)
        self._close_listeners(pod)
        for s in list(pod.sessions):
            s.close()
        log.info("pod %s removed: listeners closed", pod.spec.name or uid)

    def recheck_peers(self) -> int:
        """The trust changed (a bundle removed): re-verify every open HBONE connection's peer
        and send GOAWAY on those no longer trusted (streams open on them finish; new ones need
        a new handshake). Returns how many were refused."""
        sessions = [s for pod in self._pods.values() for s in pod.sessions]
        refused = 0
        for s in [*sessions, *self.pool.connections()]:
            if s.peer is not None and s.recheck() is not None:
                s.goaway()
                refused += 1
        return refused

    def update_pod(self, spec: PodSpec) -> bool:
        """Apply a running pod's new mode or name to connections accepted from now on.

        Listeners, pooled sessions and established connections are left alone (each holds the
        spec it was accepted under). What the pod's enrollment rests on (netns, IP, identity)
        cannot change this way: that is a new pod. True when something changed.
        """
        pod = self._pods.get(spec.uid)
        if pod is None:
            raise KeyError(f"pod {spec.uid} is not enrolled")
        old = pod.spec
        if (old.netns, old.ip, old.identity) != (spec.netns, spec.ip, spec.identity):
            raise ValueError(f"pod {spec.uid}: netns, IP or identity changed; enroll it again")
        if old == spec:
            return False
        pod.spec = spec
        if old.mode is not spec.mode:
            log.info("pod %s: plaintext now %s", spec.name or spec.uid,
                     "refused (STRICT)" if spec.mode is Mode.STRICT else "accepted (PERMISSIVE)")
        return True

    def inbound_listener(self, uid: str) -> socket.socket:
        """The pod's 15006 listener: the kernel's sk_lookup program steers plaintext to it."""
        pod = self._pods.get(uid)
        sock = pod.by_port.get(self.config.inbound_port) if pod else None
        if sock is None:
            raise KeyError(f"pod {uid} is not enrolled (or is draining): no inbound listener")
        return sock

    def listening(self, uid: str) -> bool:
        """Whether the pod's listeners are open (False once removed or draining)."""
        pod = self._pods.get(uid)
        return bool(pod and pod.listeners)

    def pod(self, uid: str) -> PodSpec | None:
        pod = self._pods.get(uid)
        return pod.spec if pod is not None else None

    @property
    def pods(self) -> list[PodSpec]:
        return [p.spec for p in self._pods.values()]

    # -- lifecycle ---------------------------------------------------------------------------
    async def drain(self, deadline: float) -> None:
        """Stop accepting, let open connections finish for up to `deadline` seconds, then close."""
        self.draining = True
        for pod in self._pods.values():
            self._close_listeners(pod)
            for s in list(pod.sessions):
                s.goaway()  # peers stop opening streams here; open ones finish
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            log.info("draining: waiting up to %.1fs for %d connections", deadline, len(pending))
            _, pending = await asyncio.wait(pending, timeout=deadline)
        if pending:
            log.warning("drain deadline passed: closing %d connections still open", len(pending))
        await self.close()

    async def close(self) -> None:
        RepeatLimiter.shared().flush()  # say what a flood suppressed before going away
        self.draining = True
        for pod in list(self._pods.values()):
            self._close_listeners(pod)
            for s in list(pod.sessions):
                s.close()
        self._pods.clear()
        self._by_ip.clear()
        self.pool.close_all()
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accept ------------------------------------------------------------------------------
    def _close_listeners(self, pod: _Pod) -> None:
        for t in pod.accept_tasks:
            t.cancel()
        pod.accept_tasks.clear()
        for s in pod.listeners:
            s.close()
        pod.listeners.clear()
        pod.by_port.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, pod: _Pod, lsock: socket.socket,
                           handler: Callable[[_Pod, socket.socket, tuple[str, int]],
                                             Coroutine[Any, Any, None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if lsock.fileno() < 0:
                    return  # listener closed (pod removed or draining)
                log.warning("accept on %s in pod %s failed: %s", lsock.getsockname(),
                            pod.spec.name, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            # Small writes (HTTP/2 frames, CONNECT replies) must not wait for delayed ACKs.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            podnet.set_mark(conn, podnet.TUNNEL_MARK)
            self._spawn(self._guard(handler(pod, conn, addr), conn))

    async def _guard(self, coro: Coroutine[Any, Any, None], conn: socket.socket) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:
            # A bug, but one a peer may trigger at will: one bounded line, traceback at DEBUG.
            log.error("BUG: connection handler failed: %s: %.200s", type(exc).__name__, exc)
            log.debug("connection handler traceback", exc_info=True)
            conn.close()

    # -- outbound (15001) --------------------------------------------------------------------
    async def _outbound(self, pod: _Pod, conn: socket.socket, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        spec = pod.spec
        try:
            dst_ip_a, dst_port = self.config.original_dst(conn)
        except OSError as exc:
            log.warning("outbound connection from pod %s: cannot recover the original destination "
                        "(%s): is the capture program loaded?", spec.name, exc)
            conn.close()
            return
        dst_ip = str(dst_ip_a)
        wl = self.config.resolver(dst_ip)
        svc = self.config.service_dst(conn)
        ev = ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, spec.ip, addr[1], dst_ip,
                             dst_port, src_workload=spec.name, src_identity=spec.identity,
                             dst_workload=wl.name if wl else "",
                             dst_identity=wl.identity if wl else None,
                             svc_ip=str(svc[0]) if svc else "", svc_port=svc[1] if svc else 0)
        if dst_port in connect.ILLEGAL_PORTS:
            log.warning("outbound connection from pod %s to %s:%d refused: tunnel ports are never "
                        "a target (redirect loop?)", spec.name, dst_ip, dst_port)
            _reset(conn)
            emit(self.config.on_event, ev.refused(ResponseFlag.NO_ROUTE, Cause.ILLEGAL_PORT,
                                                  TransportFlag.BAD_REQUEST))
            return
        _, app = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), conn)
        if wl is None or wl.identity is None:
            await self._passthrough(spec, app, ev)
            return
        key = PoolKey(spec.identity, wl.identity, dst_ip, spec.ip)
        headers = connect.request_headers(dst_ip_a, dst_port, ipaddress.ip_address(spec.ip),
                                          addr[1])
        sid = 0
        try:
            session, sid = await self.pool.open_stream(key, headers)
            status, _ = await asyncio.wait_for(session.response(sid), self.config.connect_timeout)
        except DialError as exc:
            app.reset()
            emit(self.config.on_event, ev.refused(exc.response, exc.cause, exc.flag, str(exc)))
            return
        except (TunnelClosedError, OSError, TimeoutError, hbone.StreamError) as exc:
            why = str(exc) or "no response in time (destination tunnel overloaded or hung?)"
            log.warning("HBONE CONNECT from pod %s to %s:%d failed: %s", spec.name, dst_ip,
                        dst_port, why)
            if sid:
                session.stream_reset(sid)  # do not leave the stream open on the connection
            app.reset()
            emit(self.config.on_event, ev.refused(ResponseFlag.CONNECT, Cause.UPSTREAM,
                                                  TransportFlag.UPSTREAM_FAILURE, why))
            return
        if status != connect.OK:
            flag, response, cause, why = _status_meaning(status)
            log.warning("HBONE CONNECT from pod %s (%s) to %s:%d (%s) answered %d: %s", spec.name,
                        spec.identity, dst_ip, dst_port, wl.identity, status, why)
            app.reset()
            # Refused by the destination over an established mTLS connection.
            emit(self.config.on_event, ev.refused(response, cause, flag | TransportFlag.HBONE,
                                                  f"{status}: {why}"))
            return
        await self._carry(ev, session, sid, app, source_side=True)

    async def _carry(self, ev: ConnectionEvent, session: HboneSession, sid: int,
                     plain: PlainSide, *, source_side: bool) -> None:
        """An accepted HBONE stream: report it open, relay until both halves end, report it
        closed. `plain` is the source app's socket (source_side) or the destination app's."""
        ev.flags = TransportFlag.CONNECT | TransportFlag.HBONE
        emit(self.config.on_event, ev)
        if session.attach(sid, plain):
            await _wait(plain)
        sent, received = ((plain.bytes_read, plain.bytes_written) if source_side
                          else (plain.bytes_written, plain.bytes_read))
        emit(self.config.on_event, ev.closed(
            bytes_sent=sent, bytes_received=received,
            flags=ev.flags | (TransportFlag.RESET if plain.reset_seen else TransportFlag.NONE)))

    async def _passthrough(self, spec: PodSpec, app: PlainSide, ev: ConnectionEvent) -> None:
        if self.config.outside_mesh == "refuse":
            log.warning("outbound connection from pod %s to %s:%d refused: destination is not in "
                        "the mesh and passthrough is off", spec.name, ev.dst_ip, ev.dst_port)
            app.reset()
            emit(self.config.on_event, ev.refused(ResponseFlag.NO_ROUTE, Cause.OUTSIDE_MESH,
                                                  TransportFlag.NO_ROUTE))
            return
        up = await self._connect_plain(spec, (ev.dst_ip, ev.dst_port), podnet.TUNNEL_MARK, None)
        if isinstance(up, str):
            app.reset()
            emit(self.config.on_event, ev.refused(ResponseFlag.CONNECT, Cause.UPSTREAM,
                                                  TransportFlag.UPSTREAM_FAILURE, up))
            return
        ev.flags = TransportFlag.CONNECT | TransportFlag.PASSTHROUGH
        emit(self.config.on_event, ev)
        await self._splice(app, up, ev)

    async def _splice(self, a: PlainSide, b: PlainSide, ev: ConnectionEvent) -> None:
        a.attach(b)
        b.attach(a)
        try:
            await asyncio.gather(a.done, b.done)
        except asyncio.CancelledError:
            a.reset()
            b.reset()
            raise
        emit(self.config.on_event, ev.closed(
            bytes_sent=a.bytes_read, bytes_received=a.bytes_written,
            flags=ev.flags | (TransportFlag.RESET if a.reset_seen or b.reset_seen
                              else TransportFlag.NONE)))

    async def _dial(self, key: PoolKey) -> HboneSession:
        loop = asyncio.get_running_loop()
        pod = self._by_ip.get(key.src_ip)
        if pod is None:
            raise DialError(f"source pod {key.src_ip} is no longer enrolled",
                TransportFlag.UPSTREAM_FAILURE)
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
            raise DialError(msg, TransportFlag.UPSTREAM_FAILURE) from None
        except ConnectionRefusedError:
            sock.close()
            msg = (f"connection to {where} refused: no tunnel listens there (destination pod not "
                   "enrolled, or its node's tunnel is down)")
            log.warning("%s", msg)
            raise DialError(msg, TransportFlag.UPSTREAM_FAILURE) from None
        except OSError as exc:
            sock.close()
            msg = f"connection to {where} failed: {exc.strerror or exc}"
            log.warning("%s", msg)
            raise DialError(msg, TransportFlag.UPSTREAM_FAILURE) from None
        expected = key.dst_identity
        try:
            session = await dial_hbone(
                sock, self.contexts.client(key.src_identity),
                lambda so: verify_server(so, expected, self.config.trust),
                cfg.client_settings, label=where, handshake_timeout=cfg.handshake_timeout)
        except PeerIdentityError as exc:
            sock.close()
            raise DialError(f"mTLS to {where} rejected: {exc}", TransportFlag.TLS_FAILURE,
                            ResponseFlag.IDENTITY_ERROR, Cause.PEER_IDENTITY) from None
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            sock.close()
            cause = describe_handshake_error(exc)
            closed = isinstance(exc, ConnectionError | TimeoutError)
            if closed and not isinstance(exc, ssl.SSLError):
                cause = (f"{cause}: the peer closed the connection during setup; it probably "
                         "rejected our client certificate (see its logs)")
            msg = f"mTLS handshake with {where} (expecting {expected}) failed: {cause}"
            log.warning("%s", msg)
            raise DialError(msg, TransportFlag.TLS_FAILURE, ResponseFlag.TLS_FAILURE,
                            Cause.TLS_HANDSHAKE) from None
        return session

    # -- inbound HBONE (15008) ---------------------------------------------------------------
    async def _hbone_conn(self, pod: _Pod, conn: socket.socket, addr: tuple[str, int]) -> None:
        spec = pod.spec
        td = self.config.trust_domain

        def on_request(session: HboneSession, sid: int, headers: dict[str, str]) -> None:
            self._spawn(self._serve_stream(pod, session, sid, headers))

        try:
            session = await accept_hbone(
                conn, self.contexts.server(spec.identity),
                lambda so: verify_client(so, td, self.config.trust), self.config.settings,
                on_request=on_request, label=f"{addr[0]}:{addr[1]}",
                handshake_timeout=self.config.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.warning("rejected HBONE connection from %s:%d to pod %s: %s", addr[0], addr[1],
                        spec.name, describe_handshake_error(exc))
            conn.close()
            emit(self.config.on_event, ConnectionEvent(
                Phase.CLOSE, TunnelDirection.INBOUND, addr[0], addr[1], spec.ip,
                self.config.hbone_port,
                dst_workload=spec.name, dst_identity=spec.identity, flags=TransportFlag.TLS_FAILURE,
                reason=describe_handshake_error(exc), response=ResponseFlag.TLS_FAILURE,
                cause=Cause.TLS_HANDSHAKE))
            return
        if session.failure is not None:
            emit(self.config.on_event, ConnectionEvent(
                Phase.CLOSE, TunnelDirection.INBOUND, addr[0], addr[1], spec.ip,
                self.config.hbone_port,
                dst_workload=spec.name, dst_identity=spec.identity, flags=TransportFlag.TLS_FAILURE,
                reason=str(session.failure), response=ResponseFlag.IDENTITY_ERROR,
                cause=Cause.PEER_IDENTITY))
            return
        pod.sessions.add(session)
        try:
            await session.closed
        finally:
            pod.sessions.discard(session)
            if not session.closed.done():
                session.abort()

    async def _serve_stream(self, pod: _Pod, session: HboneSession, sid: int,
                            headers: dict[str, str]) -> None:
        spec = pod.spec
        src_ip, src_port = session.remote_addr
        src_wl = self.config.resolver(src_ip)
        verdict = connect.validate_request(headers, ipaddress.ip_address(session.local_addr[0]))
        dst_ip, dst_port = (str(verdict.target[0]), verdict.target[1]) if verdict.target else (
            spec.ip, 0)
        ev = ConnectionEvent(Phase.OPEN, TunnelDirection.INBOUND, src_ip, src_port, dst_ip,
                             dst_port, src_workload=src_wl.name if src_wl else "",
                             src_identity=session.peer,
                             dst_workload=spec.name, dst_identity=spec.identity)
        if self.draining:
            session.respond(sid, connect.UNAVAILABLE)
            emit(self.config.on_event, ev.refused(ResponseFlag.CONNECT, Cause.DRAINING,
                                                  TransportFlag.UPSTREAM_FAILURE, "draining"))
            return
        if not verdict.ok:
            log.warning("HBONE request from %s (%s) to pod %s rejected with %d: %s", src_ip,
                        session.peer, spec.name, verdict.status, verdict.reason)
            session.respond(sid, verdict.status)
            emit(self.config.on_event, ev.refused(
                ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, verdict.cause or Cause.BAD_AUTHORITY,
                TransportFlag.BAD_REQUEST, verdict.reason))
            return
        up = await self._upstream(spec, session.peer, src_ip, (dst_ip, dst_port))
        if isinstance(up, int):
            session.respond(sid, up)
            emit(self.config.on_event, _upstream_refusal(ev, up))
            return
        session.respond(sid, connect.OK)
        await self._carry(ev, session, sid, up, source_side=False)

    async def _upstream(self, spec: PodSpec, peer: Identity | None, src_ip: str,
                        target: tuple[str, int]) -> PlainSide | int:
        """Connect to the pod's app as `src_ip`, marked with the peer identity; 401 on policy
        deny, 503 on any other failure."""
        mark = podnet.mark_for_identity(self.config.identity_id(peer))
        up = await self._connect_plain(spec, target, mark, src_ip, peer)
        if isinstance(up, str):
            return connect.UNAUTHORIZED if up == "deny" else connect.UNAVAILABLE
        return up

    async def _upstream_connect(self, spec: PodSpec, peer: Identity | None,
                                sock: socket.socket, target: tuple[str, int], mark: int) -> None:
        """connect() of a marked upstream socket: the kernel's policy program decides here
        (EPERM/EACCES raise PermissionError). `spec`, `peer` and `mark` say who is connecting."""
        del spec, peer, mark  # the kernel reads the socket's mark itself
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, target), self.config.connect_timeout)

    async def _connect_plain(self, spec: PodSpec, target: tuple[str, int], mark: int,
                             source_ip: str | None, peer: Identity | None = None,
                             ) -> PlainSide | str:
        loop = asyncio.get_running_loop()
        who = f"{peer}" if peer else "no identity (plaintext)"
        try:
            sock = podnet.upstream(spec.netns, mark, source_ip)
        except OSError as exc:
            log.warning("cannot create upstream socket in pod %s: %s", spec.name, exc)
            return "error"
        try:
            await self._upstream_connect(spec, peer, sock, target, mark)
        except PermissionError as exc:
            sock.close()
            log.warning("upstream connect to %s:%d in pod %s for %s denied by policy (%s)",
                        target[0], target[1], spec.name, who, exc.strerror or exc)
            return "deny"
        except (OSError, TimeoutError) as exc:
            sock.close()
            hint = "nothing listens on that port?" if isinstance(exc, ConnectionRefusedError) else (
                "the app did not answer in time" if isinstance(exc, TimeoutError) else "")
            log.warning("upstream connect to %s:%d in pod %s failed: %s %s", target[0], target[1],
                        spec.name, getattr(exc, "strerror", None) or type(exc).__name__, hint)
            return "error"
        _, plain = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), sock)
        return plain

    # -- inbound plaintext (15006) -----------------------------------------------------------
    async def _plaintext(self, pod: _Pod, conn: socket.socket, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        spec = pod.spec
        dst_ip_a, dst_port = self.config.inbound_original_dst(conn)
        src_wl = self.config.resolver(addr[0])
        ev = ConnectionEvent(Phase.OPEN, TunnelDirection.INBOUND_PLAINTEXT, addr[0], addr[1],
                             str(dst_ip_a), dst_port, src_workload=src_wl.name if src_wl else "",
                             dst_workload=spec.name, dst_identity=spec.identity)
        if spec.mode is Mode.STRICT:
            log.warning("plaintext connection from %s:%d to pod %s port %d refused: the pod is "
                        "STRICT (mTLS required); is the client outside the mesh?", addr[0],
                        addr[1], spec.name, dst_port)
            _reset(conn)
            emit(self.config.on_event, ev.refused(ResponseFlag.DENY, Cause.STRICT_MTLS,
                TransportFlag.DENY,
                                                  "STRICT mode"))
            return
        if dst_port in connect.ILLEGAL_PORTS:
            _reset(conn)
            emit(self.config.on_event, ev.refused(ResponseFlag.NO_ROUTE, Cause.ILLEGAL_PORT,
                                                  TransportFlag.BAD_REQUEST, "illegal port"))
            return
        up = await self._upstream(spec, None, addr[0], (str(dst_ip_a), dst_port))
        if isinstance(up, int):
            _reset(conn)
            emit(self.config.on_event, _upstream_refusal(ev, up))
            return
        _, app = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), conn)
        ev.flags = TransportFlag.CONNECT
        emit(self.config.on_event, ev)
        await self._splice(app, up, ev)


def _status_meaning(status: int) -> tuple[TransportFlag, ResponseFlag, Cause, str]:
    """What a non-200 CONNECT answer means for the source side."""
    if status == connect.UNAUTHORIZED:
        return (TransportFlag.DENY, ResponseFlag.DENY, Cause.REMOTE_DENY,
                "denied by the destination's policy")
    if status == connect.BAD_REQUEST:
        return (TransportFlag.BAD_REQUEST, ResponseFlag.CONNECT, Cause.REMOTE_BAD_REQUEST,
                "the destination rejected the request (wrong pod for that IP?)")
    if status == connect.UNAVAILABLE:
        return (TransportFlag.UPSTREAM_FAILURE, ResponseFlag.CONNECT, Cause.UPSTREAM,
                "the destination could not reach the app (not listening?)")
    return TransportFlag.UPSTREAM_FAILURE, ResponseFlag.CONNECT, Cause.UPSTREAM, "unexpected status"


def _upstream_refusal(ev: ConnectionEvent, status: int) -> ConnectionEvent:
    """The destination side's event for a failed upstream connect: 401 is the policy program's
    EPERM, anything else a connection failure."""
    if status == connect.UNAUTHORIZED:
        return ev.refused(ResponseFlag.DENY, Cause.POLICY_DENY, TransportFlag.DENY, str(status))
    return ev.refused(ResponseFlag.CONNECT, Cause.UPSTREAM, TransportFlag.UPSTREAM_FAILURE,
        str(status))


def _reset(conn: socket.socket) -> None:
    podnet.abort_with_reset(conn)
    conn.close()


async def _wait(plain: PlainSide) -> None:
    try:
        await plain.done
    except asyncio.CancelledError:
        plain.reset()
        raise

