"""Turns the datapath's and the tunnel's connection events into telemetry FlowRecords."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from agent.abi import ID_PLAINTEXT
from agent.datapath.layouts import FlowEvent
from agent.datapath.verdicts import KernelDirection, KernelEventKind, Reason
from agent.model.mesh import Workload
from agent.telemetry.flow import (
    REFUSAL_KINDS,
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
)
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
)

WorkloadByIp = Callable[[str], Workload | None]
ServiceHost = Callable[[str], str]  # a VIP -> its Service's host (name.ns.svc.cluster.local)
# An endpoint ip, port -> the host of the one Service it backs ("" if none, or several).
EndpointService = Callable[[str, int], str]


def _no_service(_ip: str, _port: int = 0) -> str:
    return ""


def _endpoint(ip: str, port: int, by_ip: WorkloadByIp,
    principal: str | None = None) -> FlowEndpoint:
    """`principal` None: the workload's own identity (an enrolled local pod, whose identity the
    agent assigned). A string, even empty: what was authenticated; an address never vouches for
    a peer's identity."""
    w = by_ip(ip)
    if w is None:
        return FlowEndpoint(ip=ip, port=port, principal=principal or "")
    return FlowEndpoint(
        workload=w.name,
        namespace=w.namespace,
        principal=w.identity.uri if principal is None else principal,
        ip=ip,
        port=port,
    )


def _kernel_security(ev: FlowEvent) -> SecurityPolicy:
    """At the tunnel's upstream connect (ingress) the kernel knows whether the peer was
    authenticated: the plaintext id means no mTLS (Istio's `none`). At the source pod's own
    connect (egress) nothing has been encrypted yet: `unknown`, as Istio's source reporter."""
    if ev.direction != KernelDirection.INGRESS:
        return SecurityPolicy.UNKNOWN
    return SecurityPolicy.NONE if ev.src_id == ID_PLAINTEXT else SecurityPolicy.MUTUAL_TLS


def from_kernel(
    ev: FlowEvent,
    by_ip: WorkloadByIp,
    policy_name: Callable[[int], str],
    service_host: ServiceHost = _no_service,
) -> FlowRecord:
    """Kernel events: captured connections (open/close) and connect-time denies. A connect to a
    Service VIP names the Service (`service_host` of the VIP) on the destination and the VIP in
    `service_address`; the address is the endpoint chosen (none when no endpoint was ready:
    then the VIP)."""
    kind = {KernelEventKind.OPEN: FlowEventKind.OPEN, KernelEventKind.CLOSE: FlowEventKind.CLOSE,
            KernelEventKind.DENY: FlowEventKind.DENY}[ev.kind]
    plaintext_peer = ev.direction == KernelDirection.INGRESS and ev.src_id == ID_PLAINTEXT
    src = _endpoint(str(ev.src_ip), ev.src_port, by_ip, "" if plaintext_peer else None)
    dst = _endpoint(str(ev.dst_ip), ev.dst_port, by_ip)
    svc_address = ""
    if ev.svc_ip is not None:
        dst = dataclasses.replace(dst, service=service_host(str(ev.svc_ip)))
        svc_address = f"{ev.svc_ip}:{ev.svc_port}"
    denied = ev.kind == KernelEventKind.DENY
    flag = _KERNEL_FLAGS.get(Reason(ev.reason), ResponseFlag.DENY) if denied else ResponseFlag.NONE
    reporter = Reporter.DESTINATION if ev.direction == KernelDirection.INGRESS else Reporter.SOURCE
    return FlowRecord(
        kind,
        reporter,
        src,
        dst,
        verdict=FlowVerdict.DENIED if denied else FlowVerdict.ALLOWED,
        reason=Reason(ev.reason).label if denied else "",
        reason_code=int(ev.reason) if denied else None,
        response_flags=flag.value,
        bytes_sent=ev.bytes_sent,
        bytes_received=ev.bytes_received,
        duration=ev.duration_ns / 1e9,
        # A same-node bypassed connection (reported once, by the source, from the kernel) was
        # never tunnelled nor encrypted: no wire was crossed.
        tunneled=not denied and not ev.bypass,
        connection_security_policy=_kernel_security(ev) if denied or ev.bypass
        else SecurityPolicy.MUTUAL_TLS,
        policy=policy_name(ev.policy) if ev.policy else "",
        rule=str(ev.rule) if denied else "",
        service_address=svc_address,
    )


# Kernel refusals that are not policy: Envoy's flags for a Service with no ready endpoint, for
# one at its connection cap, and for a connect a ConnectionRateLimit refused.
_KERNEL_FLAGS = {
    Reason.NO_HEALTHY_UPSTREAM: ResponseFlag.NO_HEALTHY_UPSTREAM,
    Reason.UPSTREAM_OVERFLOW: ResponseFlag.UPSTREAM_OVERFLOW,
    Reason.RATE_LIMITED: ResponseFlag.RATE_LIMITED,
}


# The tunnel's response flag decides the record's kind; flags not listed are failures of a
# connection that was allowed (CONNECT) or none at all.
_TUNNEL_KINDS = {
    ResponseFlag.DENY: FlowEventKind.DENY,
    ResponseFlag.TLS_FAILURE: FlowEventKind.AUTH_FAILURE,
    ResponseFlag.IDENTITY_ERROR: FlowEventKind.AUTH_FAILURE,
    ResponseFlag.CERT_REVOKED: FlowEventKind.AUTH_FAILURE,
    ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR: FlowEventKind.REJECT,
    ResponseFlag.NO_ROUTE: FlowEventKind.REJECT,
}


_HBONE = TransportFlag.HBONE.value  # int tests: Flag's & builds a member each time


def _tunnel_security(ev: ConnectionEvent) -> SecurityPolicy:
    if ev.direction is TunnelDirection.INBOUND_PLAINTEXT:
        return SecurityPolicy.NONE
    if ev.direction is TunnelDirection.INBOUND:
        # A peer that passed the identity check spoke mTLS, whatever happened next.
        return SecurityPolicy.MUTUAL_TLS if ev.src_identity else SecurityPolicy.UNKNOWN
    return SecurityPolicy.MUTUAL_TLS if ev.flags.value & _HBONE else SecurityPolicy.UNKNOWN


def reported_by_kernel(ev: ConnectionEvent) -> bool:
    """A tunnel refusal the kernel reports itself: EPERM on the upstream connect comes from the
    policy program, whose own deny event names the policy, rule and reason (e.g. mtls_required).
    Recording both would count one connection twice."""
    return ev.cause is Cause.POLICY_DENY


def from_tunnel(ev: ConnectionEvent, by_ip: WorkloadByIp, service_host: ServiceHost = _no_service,
                endpoint_service: EndpointService = _no_service,
                ejected: bool = False) -> FlowRecord:
    """Tunnel events: each side of an HBONE connection, with identities and response flags.
    The destination's Service is the one the kernel chose it from (the source tunnel read the
    VIP), else the one Service the destination endpoint backs, if exactly one (the destination
    side cannot know which VIP the source asked for: ztunnel infers it the same way)."""
    kind = _TUNNEL_KINDS.get(ev.response)
    if kind is None:
        kind = FlowEventKind.OPEN if ev.phase is Phase.OPEN else FlowEventKind.CLOSE
    # Inbound, the source is a peer: only what its certificate proved names it.
    outbound = ev.direction is TunnelDirection.OUTBOUND
    src_principal = ev.src_identity.uri if ev.src_identity else (None if outbound else "")
    src = _endpoint(ev.src_ip, ev.src_port, by_ip, src_principal)
    dst = _endpoint(ev.dst_ip, ev.dst_port, by_ip, ev.dst_identity.uri if ev.dst_identity else None)
    svc = service_host(ev.svc_ip) if ev.svc_ip else endpoint_service(ev.dst_ip, ev.dst_port)
    if svc:
        dst = dataclasses.replace(dst, service=svc)
    return FlowRecord(
        kind,
        Reporter.SOURCE if ev.direction is TunnelDirection.OUTBOUND else Reporter.DESTINATION,
        src,
        dst,
        verdict=FlowVerdict.DENIED if kind in REFUSAL_KINDS else FlowVerdict.ALLOWED,
        reason=ev.cause.value if ev.cause else "",
        response_flags=ev.response.value,
        bytes_sent=ev.bytes_sent,
        bytes_received=ev.bytes_received,
        duration=ev.duration,
        tunneled=bool(ev.flags.value & _HBONE),
        connection_security_policy=_tunnel_security(ev),
        service_address=f"{ev.svc_ip}:{ev.svc_port}" if ev.svc_ip else "",
        ejected=ejected,
    )


SHAPES = 4096  # record shapes kept by TunnelRecords (emptied when full)
_Shape = tuple[Workload | None, Workload | None, object, object, FlowRecord]


class TunnelRecords:
    """`from_tunnel`, with what every event of one shape shares built once: the control process
    records two events per connection per node. A shape is the direction, phase, outcome,
    both workloads and identities, the Service and `ejected`; its first event goes through
    `from_tunnel` and later ones copy that record with their own addresses, bytes, duration and
    time (FlowRecord.again), so both give the same record. Workloads and identities are told
    apart by object (a changed mesh state makes new Workloads, hence a new shape)."""

    def __init__(self, by_ip: WorkloadByIp, service_host: ServiceHost = _no_service,
                 endpoint_service: EndpointService = _no_service) -> None:
        self.by_ip, self.service_host, self.endpoint_service = (
            by_ip, service_host, endpoint_service)
        self._shapes: dict[tuple[object, ...], _Shape] = {}
        self.evicted = 0  # shapes dropped because the cache was full (a metric)

    def __len__(self) -> int:
        return len(self._shapes)

    def record(self, ev: ConnectionEvent, ejected: bool = False) -> FlowRecord:
        src_w, dst_w = self.by_ip(ev.src_ip), self.by_ip(ev.dst_ip)
        src_id, dst_id = ev.src_identity, ev.dst_identity
        svc = (self.service_host(ev.svc_ip) if ev.svc_ip
               else self.endpoint_service(ev.dst_ip, ev.dst_port))
        key = (id(ev.direction), ev.phase, ev.response, ev.cause, ev.flags.value, id(src_w),
               id(dst_w), id(src_id), id(dst_id), svc, ejected)
        shape = self._shapes.get(key)
        if shape is None:  # (a shape holds its objects: their ids are not reused meanwhile)
            rec = from_tunnel(ev, lambda ip: src_w if ip == ev.src_ip else dst_w,
                              lambda _vip: svc, lambda _ip, _port: svc, ejected)
            if len(self._shapes) >= SHAPES:
                self.evicted += len(self._shapes)
                self._shapes.clear()
            self._shapes[key] = (src_w, dst_w, src_id, dst_id, rec)
            return rec
        proto = shape[4]
        return proto.again(
            proto.source.at(ev.src_ip, ev.src_port),
            proto.destination.at(ev.dst_ip, ev.dst_port),
            bytes_sent=ev.bytes_sent, bytes_received=ev.bytes_received, duration=ev.duration,
            service_address=f"{ev.svc_ip}:{ev.svc_port}" if ev.svc_ip else "")
