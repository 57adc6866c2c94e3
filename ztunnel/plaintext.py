"""Inbound plaintext (15006): the accepted socket's local address is the original destination
(sk_lookup steered it here); STRICT pods refuse it, PERMISSIVE pods forward it to the app with
no peer identity (mark id 0) and the client's source address."""

from __future__ import annotations

import asyncio
import logging
import socket

from ztunnel import connect
from ztunnel.carry import splice
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)
from ztunnel.guard import ConnectionGuard
from ztunnel.inbound import connect_app, upstream_refusal
from ztunnel.lograte import RepeatLimiter
from ztunnel.model import Counters, Mode, PodState, TunnelConfig
from ztunnel.relay import PlainSide
from ztunnel.upstream import UpstreamConnect, UpstreamError, reset

log = logging.getLogger(__name__)
log.addFilter(RepeatLimiter.shared())


class Plaintext:
    def __init__(self, config: TunnelConfig, counters: Counters,
                 connect_socket: UpstreamConnect) -> None:
        self.config = config
        self.counters = counters
        self._connect_socket = connect_socket

    async def handle(self, pod: PodState, conn: socket.socket, addr: tuple[str, int],
                     guard: ConnectionGuard) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        spec = pod.spec
        dst_ip_a, dst_port = cfg.inbound_original_dst(conn)
        src_wl = cfg.resolver(addr[0])
        ev = guard.track(ConnectionEvent(
            Phase.OPEN, TunnelDirection.INBOUND_PLAINTEXT, addr[0], addr[1], str(dst_ip_a),
            dst_port, src_workload=src_wl.name if src_wl else "", dst_workload=spec.name,
            dst_identity=spec.identity))
        if spec.mode is Mode.STRICT:
            log.warning("plaintext connection from %s:%d to pod %s port %d refused: the pod is "
                        "STRICT (mTLS required); is the client outside the mesh?", addr[0],
                        addr[1], spec.name, dst_port)
            reset(conn)
            guard.refuse(ev, ResponseFlag.DENY, Cause.STRICT_MTLS, TransportFlag.DENY,
                         "STRICT mode")
            return
        if dst_port in connect.ILLEGAL_PORTS:
            reset(conn)
            guard.refuse(ev, ResponseFlag.NO_ROUTE, Cause.ILLEGAL_PORT,
                         TransportFlag.BAD_REQUEST, "illegal port")
            return
        try:
            up = await connect_app(cfg, self.counters, spec, peer=None, src_ip=addr[0],
                                   target=(str(dst_ip_a), dst_port),
                                   connect_socket=self._connect_socket)
        except UpstreamError as err:
            reset(conn)
            guard.close(upstream_refusal(ev, err))
            return
        _, app = await loop.connect_accepted_socket(lambda: PlainSide(start_paused=True), conn)
        await splice(guard, ev, app, up, TransportFlag.CONNECT)
