"""Turns the datapath's and the tunnel's connection events into telemetry FlowRecords."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from agent.datapath.layouts import FlowEvent
from agent.datapath.verdicts import Direction, EventKind, Reason
from agent.state.model import Workload
from agent.telemetry.flow import Endpoint, FlowRecord, Reporter, SecurityPolicy, Verdict
from agent.telemetry.flow import EventKind as Kind
from ztunnel.events import ConnectionEvent, Flag

WorkloadByIp = Callable[[str], Workload | None]


def _endpoint(ip: str, port: int, by_ip: WorkloadByIp, principal: str = "") -> Endpoint:
    w = by_ip(ip)
    if w is None:
        return Endpoint(ip=ip, port=port, principal=principal)
    return Endpoint(
        workload=w.name,
        namespace=w.namespace,
        principal=principal or w.identity.uri,
        ip=ip,
        port=port,
    )


def from_kernel(
    ev: FlowEvent,
    by_ip: WorkloadByIp,
    policy_name: Callable[[int], str],
    service_host: Callable[[str], str] = lambda _vip: "",
) -> FlowRecord:
    """Kernel events: captured connections (open/close) and connect-time denies. A connect to a
    Service VIP names the Service (`service_host` of the VIP) on the destination; the address
    is the endpoint chosen (none when no endpoint was ready: then the VIP)."""
    kind = {EventKind.OPEN: Kind.OPEN, EventKind.CLOSE: Kind.CLOSE, EventKind.DENY: Kind.DENY}[
        ev.kind
    ]
    src = _endpoint(str(ev.src_ip), ev.src_port, by_ip)
    dst = _endpoint(str(ev.dst_ip), ev.dst_port, by_ip)
    if ev.svc_ip is not None:
        dst = dataclasses.replace(dst, service=service_host(str(ev.svc_ip)))
    denied = ev.kind == EventKind.DENY
    no_upstream = denied and ev.reason == Reason.NO_HEALTHY_UPSTREAM
    reporter = Reporter.DESTINATION if ev.direction == Direction.INGRESS else Reporter.SOURCE
    return FlowRecord(
        kind,
        reporter,
        src,
        dst,
        verdict=Verdict.DENIED if denied else Verdict.ALLOWED,
        reason=Reason(ev.reason).label if denied else "",
        reason_code=int(ev.reason) if denied else None,
        # Envoy's UH: no healthy upstream
        response_flags=("UH" if no_upstream else "DENY") if denied else "-",
        bytes_sent=ev.bytes_sent,
        bytes_received=ev.bytes_received,
        duration=ev.duration_ns / 1e9,
        tunneled=not denied,
        connection_security_policy=SecurityPolicy.MUTUAL_TLS,
        policy=policy_name(ev.policy) if ev.policy else "",
        rule=str(ev.rule) if denied else "",
    )


def _flags(flags: Flag) -> str:
    for flag, name in (
        (Flag.DENY, "DENY"),
        (Flag.TLS_FAILURE, "TLS_FAILURE"),
        (Flag.UPSTREAM_FAILURE, "CONNECT"),
        (Flag.NO_ROUTE, "NO_ROUTE"),
        (Flag.BAD_REQUEST, "CONNECT"),
    ):
        if flags & flag:
            return name
    return "-"


def from_tunnel(ev: ConnectionEvent, by_ip: WorkloadByIp) -> FlowRecord:
    """Tunnel events: each side of an HBONE connection, with identities and response flags."""
    flags = _flags(ev.flags)
    if ev.flags & Flag.TLS_FAILURE:
        kind = Kind.AUTH_FAILURE
    elif ev.flags & Flag.DENY:
        kind = Kind.DENY
    else:
        kind = Kind.OPEN if ev.phase == "open" else Kind.CLOSE
    src = _endpoint(ev.src_ip, ev.src_port, by_ip, ev.src_identity.uri if ev.src_identity else "")
    dst = _endpoint(ev.dst_ip, ev.dst_port, by_ip, ev.dst_identity.uri if ev.dst_identity else "")
    denied = kind in (Kind.DENY, Kind.AUTH_FAILURE)
    return FlowRecord(
        kind,
        Reporter.SOURCE if ev.direction.value == "outbound" else Reporter.DESTINATION,
        src,
        dst,
        verdict=Verdict.DENIED if denied else Verdict.ALLOWED,
        reason=ev.reason if denied else "",
        response_flags=flags if denied or flags != "-" else "-",
        bytes_sent=ev.bytes_sent,
        bytes_received=ev.bytes_received,
        duration=ev.duration,
        tunneled=bool(ev.flags & Flag.HBONE),
        connection_security_policy=SecurityPolicy.MUTUAL_TLS
        if ev.flags & Flag.HBONE
        else SecurityPolicy.UNKNOWN,
    )
