"""Every refusal the tunnel or the kernel reports becomes a flow record, a failed-connection
metric with the right labels and one bounded audit line: the tunnel's event vocabulary
(ztunnel.events.ResponseFlag / Cause) is what telemetry records, without translation."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import config
from agent.abi import ID_PLAINTEXT
from agent.commands import identity as identity_cli
from agent.commands import telemetry as telemetry_cli
from agent.datapath.layouts import FlowEvent
from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason
from agent.identity.spiffe import Identity
from agent.model.mesh import Workload
from agent.runtime import flows
from agent.telemetry import stream
from agent.telemetry.flow import (
    RESPONSE_FLAGS,
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
)
from agent.telemetry.pipeline import Telemetry, TelemetryConfig
from ztunnel.events import (
    Cause,
    ConnectionEvent,
    Phase,
    ResponseFlag,
    TransportFlag,
    TunnelDirection,
    emit,
)

SLEEP = Workload("sleep", "default", "sleep", (ipaddress.ip_address("10.0.1.5"),))
DB = Workload("db", "prod", "db", (ipaddress.ip_address("10.0.2.7"),))
BY_IP = {"10.0.1.5": SLEEP, "10.0.2.7": DB}
SLEEP_ID = Identity.parse("spiffe://cluster.local/ns/default/sa/sleep")
DB_ID = Identity.parse("spiffe://cluster.local/ns/prod/sa/db")


def by_ip(ip: str) -> Workload | None:
    return BY_IP.get(ip)


@pytest.fixture
def tel(tmp_path: Path) -> Iterator[Telemetry]:
    t = Telemetry(TelemetryConfig(node="node-1", flow_log=tmp_path / "flows.log",
                                  audit_log=tmp_path / "audit.log"))
    yield t
    t.close()


def refusal(direction: TunnelDirection, response: ResponseFlag, cause: Cause, flags: TransportFlag,
    *,
            peer: Identity | None = None, src: str = "10.0.1.5") -> ConnectionEvent:
    """A close event as the tunnel emits it for a refused connection."""
    ev = ConnectionEvent(Phase.OPEN, direction, src, 40000, "10.0.2.7", 5432,
                         src_identity=peer, dst_identity=DB_ID)
    return ev.refused(response, cause, flags, reason="free text: not a label (with spaces)")


# (event, kind, response flag, reason, connection_security_policy, audit event)
CASES = {
    "TLS handshake failure": (
        refusal(TunnelDirection.INBOUND, ResponseFlag.TLS_FAILURE, Cause.TLS_HANDSHAKE,
                TransportFlag.TLS_FAILURE, src="192.0.2.9"),
        FlowEventKind.AUTH_FAILURE, "TLS_FAILURE", "TLS_HANDSHAKE", "unknown", "auth_failure"),
    "untrusted peer identity": (
        refusal(TunnelDirection.INBOUND, ResponseFlag.IDENTITY_ERROR, Cause.PEER_IDENTITY,
                TransportFlag.TLS_FAILURE, src="192.0.2.9"),
        FlowEventKind.AUTH_FAILURE, "IDENTITY_ERROR", "PEER_IDENTITY", "unknown", "auth_failure"),
    "wrong server identity (source side)": (
        refusal(TunnelDirection.OUTBOUND, ResponseFlag.IDENTITY_ERROR, Cause.PEER_IDENTITY,
                TransportFlag.TLS_FAILURE),
        FlowEventKind.AUTH_FAILURE, "IDENTITY_ERROR", "PEER_IDENTITY", "unknown", "auth_failure"),
    "STRICT refusal of plaintext": (
        refusal(TunnelDirection.INBOUND_PLAINTEXT, ResponseFlag.DENY, Cause.STRICT_MTLS,
            TransportFlag.DENY),
        FlowEventKind.DENY, "DENY", "STRICT_MTLS", "none", "policy_deny"),
    "malformed CONNECT (400)": (
        refusal(TunnelDirection.INBOUND, ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
            Cause.BAD_AUTHORITY,
                TransportFlag.BAD_REQUEST, peer=SLEEP_ID),
        FlowEventKind.REJECT, "DPE", "BAD_AUTHORITY", "mutual_tls", "rejected"),
    "destination deny answered 401 (source side)": (
        refusal(TunnelDirection.OUTBOUND, ResponseFlag.DENY, Cause.REMOTE_DENY,
                TransportFlag.DENY | TransportFlag.HBONE),
        FlowEventKind.DENY, "DENY", "REMOTE_DENY", "mutual_tls", "policy_deny"),
    "outside the mesh, passthrough off": (
        refusal(TunnelDirection.OUTBOUND, ResponseFlag.NO_ROUTE, Cause.OUTSIDE_MESH,
            TransportFlag.NO_ROUTE),
        FlowEventKind.REJECT, "NR", "OUTSIDE_MESH", "unknown", "rejected"),
}


def test_the_tunnel_vocabulary_is_the_flow_record_vocabulary() -> None:
    assert {f.value for f in ResponseFlag} == RESPONSE_FLAGS
    for cause in Cause:  # every cause is a valid reason token
        FlowRecord(FlowEventKind.REJECT, Reporter.DESTINATION, FlowEndpoint(), FlowEndpoint(),
                   verdict=FlowVerdict.DENIED, reason=cause.value)


@pytest.mark.parametrize("case", list(CASES))
def test_each_tunnel_refusal_is_recorded_counted_and_audited(
        case: str, tel: Telemetry, tmp_path: Path) -> None:
    ev, kind, flag, reason, security, audit_event = CASES[case]
    tel.emit(flows.from_tunnel(ev, by_ip))
    assert tel.sink_errors == 0

    (line,) = (tmp_path / "flows.log").read_text().splitlines()
    rec = json.loads(line)
    assert (rec["kind"], rec["verdict"], rec["response_flags"], rec["reason"],
            rec["connection_security_policy"]) == (kind.value, "denied", flag, reason, security)

    (audit_line,) = (tmp_path / "audit.log").read_text().splitlines()
    audit = json.loads(audit_line)
    assert (audit["event"], audit["response_flags"], audit["reason"]) == (
        audit_event, flag, reason)
    assert len(audit_line) < 1024 and "Traceback" not in audit_line
    assert "free text" not in audit_line + line  # the explanation is for logs, not labels
    # A peer's address never vouches for its identity: only a verified certificate does.
    proven = ev.src_identity.uri if ev.src_identity else ""
    if ev.direction is not TunnelDirection.OUTBOUND:
        assert rec["source"]["principal"] == proven and audit["source"]["identity"] == (
            proven or None)

    metrics = _samples(tel)
    failed = metrics["istio_tcp_connections_failed_total"]
    assert [(lb["response_flags"], lb["connection_security_policy"], v)
            for lb, v in failed] == [(flag, security, 1.0)]
    auth = metrics.get("nodemesh_auth_failures_total", [])
    denies = metrics.get("nodemesh_policy_denies_total", [])
    if kind is FlowEventKind.AUTH_FAILURE:
        assert [(lb["reason"], v) for lb, v in auth] == [(reason, 1.0)] and not denies
    elif kind is FlowEventKind.DENY:
        assert [(lb["reason"], v) for lb, v in denies] == [(reason, 1.0)] and not auth
    else:
        assert not auth and not denies


def _samples(tel: Telemetry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(tel.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_allowed_connections_are_recorded_as_before() -> None:
    ev = ConnectionEvent(Phase.OPEN, TunnelDirection.INBOUND, "10.0.1.5", 40000, "10.0.2.7", 5432,
                         src_identity=SLEEP_ID, dst_identity=DB_ID,
                             flags=TransportFlag.CONNECT | TransportFlag.HBONE)
    opened = flows.from_tunnel(ev, by_ip)
    closed = flows.from_tunnel(ev.closed(bytes_sent=5, bytes_received=7), by_ip)
    assert (opened.kind, closed.kind) == (FlowEventKind.OPEN, FlowEventKind.CLOSE)
    for rec in (opened, closed):
        assert rec.response_flags == "-" and rec.reason == "" and rec.tunneled
        assert rec.connection_security_policy is SecurityPolicy.MUTUAL_TLS
    # An upstream failure is a failed connection, not a refusal.
    failed = flows.from_tunnel(ev.refused(ResponseFlag.CONNECT, Cause.UPSTREAM,
                                          TransportFlag.UPSTREAM_FAILURE, "503"), by_ip)
    assert (failed.kind, failed.verdict.value, failed.response_flags) == (
        FlowEventKind.CLOSE, "allowed", "CONNECT")


def test_the_kernels_own_denies_are_not_recorded_twice() -> None:
    # EPERM at the upstream connect: the kernel's deny event carries the policy and reason.
    upstream_eperm = refusal(TunnelDirection.INBOUND, ResponseFlag.DENY, Cause.POLICY_DENY,
        TransportFlag.DENY)
    assert flows.reported_by_kernel(upstream_eperm)
    for ev, *_ in CASES.values():
        assert not flows.reported_by_kernel(ev)


def kernel_deny(direction: KernelDirection, src_id: int, reason: Reason) -> FlowEvent:
    return FlowEvent(ts_ns=1, cookie=2, netns=3, bytes_sent=0, bytes_received=0, duration_ns=0,
                     src_ip=ipaddress.IPv4Address("10.0.1.5"),
                     dst_ip=ipaddress.IPv4Address("10.0.2.7"), src_port=0, dst_port=5432,
                     src_id=src_id, policy=1, rule=0, kind=KernelEventKind.DENY,
                         verdict=KernelVerdict.DENY,
                     reason=reason, direction=direction)


@pytest.mark.parametrize(("direction", "src_id", "reason", "reporter", "security"), [
    # Plaintext refused at the tunnel's upstream connect for a STRICT port: not mTLS.
    (KernelDirection.INGRESS, ID_PLAINTEXT, Reason.MTLS_REQUIRED, "destination", "none"),
    # An authenticated peer denied by policy at the upstream connect.
    (KernelDirection.INGRESS, 7, Reason.POLICY_DENY, "destination", "mutual_tls"),
    # The pod's own connect(): nothing was encrypted yet; Istio's source side says unknown.
    (KernelDirection.EGRESS, 7, Reason.POLICY_NOT_ALLOWED, "source", "unknown"),
])
def test_kernel_denies_carry_the_security_policy_istio_would(  # noqa: PLR0917 -- parametrized
        direction: KernelDirection, src_id: int, reason: Reason, reporter: str, security: str,
        tel: Telemetry, tmp_path: Path) -> None:
    rec = flows.from_kernel(kernel_deny(direction, src_id, reason), by_ip, lambda _: "prod/p")
    # The kernel knows the pod's own identity and the authenticated peer's; plaintext has none.
    assert rec.source.principal == ("" if src_id == ID_PLAINTEXT else SLEEP.identity.uri)
    assert (rec.kind, rec.reporter.value, rec.connection_security_policy.value, rec.reason,
            rec.response_flags, rec.policy) == (
        FlowEventKind.DENY, reporter, security, reason.label, "DENY", "prod/p")
    tel.emit(rec)
    assert json.loads((tmp_path / "audit.log").read_text())["event"] == "policy_deny"
    (labels, _), = _samples(tel)["istio_tcp_connections_failed_total"]
    assert labels["connection_security_policy"] == security


def test_a_service_with_no_ready_endpoint_is_recorded_as_no_healthy_upstream(
        tel: Telemetry, tmp_path: Path) -> None:
    ev = dataclasses.replace(kernel_deny(KernelDirection.EGRESS, 7, Reason.NO_HEALTHY_UPSTREAM),
                             policy=0, svc_ip=ipaddress.IPv4Address("10.96.0.20"), svc_port=80)
    rec = flows.from_kernel(ev, by_ip, lambda _: "", lambda vip: f"backend.shop ({vip})")
    assert (rec.kind, rec.response_flags, rec.reason) == (
        FlowEventKind.DENY, "UH", "no_healthy_upstream")
    assert rec.destination.service == "backend.shop (10.96.0.20)"
    tel.emit(rec)  # validates: UH is one of the flow schema's flags
    (labels, _), = _samples(tel)["istio_tcp_connections_failed_total"]
    assert labels["response_flags"] == "UH"


def test_a_failing_event_hook_logs_one_bounded_line_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ztunnel.events")

    def broken(ev: ConnectionEvent) -> None:
        raise ValueError("x" * 10_000)

    emit(broken, CASES["TLS handshake failure"][0])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert len(errors[0].getMessage()) < 300
    # The traceback is still there for whoever turns DEBUG on.
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


ARABIC_8080 = "\u0668\u0660\u0668\u0660"  # int() and str.isdigit() read it as 8080


def test_numbers_from_requests_and_config_are_ascii_digits() -> None:
    """Beyond :authority (tests/unit/ztunnel): the admin /flows `limit`, the `--since` age, the
    listen addresses in the config, and the identity CLI's durations."""
    assert stream._limit("25") == 25
    for bad in ("\u0663", " 3", "1_0", "+3", ""):
        with pytest.raises(ValueError, match="ASCII digits"):
            stream._limit(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        telemetry_cli.parse_time("\u0665m")
    assert config.parse_addr("127.0.0.1:15020") == ("127.0.0.1", 15020)
    for bad in (f"127.0.0.1:{ARABIC_8080}", "127.0.0.1: 80", "127.0.0.1:99999", "x"):
        with pytest.raises(config.ConfigError, match="ASCII digits"):
            config.parse_addr(bad)
    assert identity_cli.duration("15m").total_seconds() == 900
    with pytest.raises(argparse.ArgumentTypeError):
        identity_cli.duration("\u0661\u0665m")


def test_a_service_at_its_connection_cap_is_recorded_as_upstream_overflow(
        tel: Telemetry) -> None:
    ev = dataclasses.replace(kernel_deny(KernelDirection.EGRESS, 7, Reason.UPSTREAM_OVERFLOW),
                             policy=0, svc_ip=ipaddress.IPv4Address("10.96.0.20"), svc_port=80)
    rec = flows.from_kernel(ev, by_ip, lambda _: "", lambda _vip: "db.prod.svc.cluster.local")
    assert (rec.kind, rec.response_flags, rec.reason, rec.service_address) == (
        FlowEventKind.DENY, "UO", "upstream_overflow", "10.96.0.20:80")
    # The endpoint the kernel chose, and the Service it was chosen from.
    assert (rec.destination.ip, rec.destination.port) == ("10.0.2.7", 5432)
    tel.emit(rec)
    (labels, _), = _samples(tel)["istio_tcp_connections_failed_total"]
    assert (labels["response_flags"], labels["destination_service"],
            labels["destination_service_name"], labels["destination_service_namespace"]) == (
        "UO", "db.prod.svc.cluster.local", "db", "prod")


def test_tunnel_records_name_the_service_the_endpoint_was_chosen_from(
        tel: Telemetry, tmp_path: Path) -> None:
    src = ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, "10.0.1.5", 40000, "10.0.2.7", 5432,
                          src_identity=SLEEP_ID, dst_identity=DB_ID,
                          flags=TransportFlag.CONNECT | TransportFlag.HBONE, svc_ip="10.96.0.20",
                              svc_port=80)
    hosts = {"10.96.0.20": "db.prod.svc.cluster.local"}
    closed = flows.from_tunnel(src.closed(bytes_sent=3, bytes_received=4), by_ip, hosts.get,
                               lambda _ip, _port: "wrong")
    assert (closed.destination.service, closed.service_address, closed.ejected) == (
        "db.prod.svc.cluster.local", "10.96.0.20:80", False)
    # The destination side cannot know the VIP: the one Service the endpoint backs.
    dst = dataclasses.replace(src, direction=TunnelDirection.INBOUND, svc_ip="", svc_port=0)
    inbound = flows.from_tunnel(dst.closed(), by_ip, hosts.get, lambda ip, port: (
        "db.prod.svc.cluster.local" if (ip, port) == ("10.0.2.7", 5432) else ""))
    assert (inbound.destination.service, inbound.service_address) == (
        "db.prod.svc.cluster.local", "")
    # The failed connect that ejected its endpoint carries the flag.
    failed = flows.from_tunnel(src.refused(ResponseFlag.CONNECT, Cause.UPSTREAM,
                                           TransportFlag.UPSTREAM_FAILURE, "503"), by_ip, hosts.get,
                               ejected=True)
    assert failed.ejected and failed.response_flags == "CONNECT"
    for rec in (closed, inbound, failed):
        tel.emit(rec)
    logged = [json.loads(line) for line in (tmp_path / "flows.log").read_text().splitlines()]
    assert [(r["service_address"], r["ejected"], r["destination"]["ip"]) for r in logged] == [
        ("10.96.0.20:80", False, "10.0.2.7"), ("", False, "10.0.2.7"),
        ("10.96.0.20:80", True, "10.0.2.7")]
    sent = {s[0]["reporter"]: s[0] for s in _samples(tel)["istio_tcp_connections_closed_total"]}
    for reporter in ("source", "destination"):
        assert (sent[reporter]["destination_service"],
                sent[reporter]["destination_service_name"],
                sent[reporter]["destination_service_namespace"]) == (
            "db.prod.svc.cluster.local", "db", "prod")


def test_v1_records_still_load() -> None:
    rec = flows.from_tunnel(ConnectionEvent(Phase.OPEN, TunnelDirection.OUTBOUND, "10.0.1.5", 1,
                                            "10.0.2.7", 5432), by_ip)
    v1 = rec.to_dict()
    v1["schema"] = "nodemesh.flow/v1"
    del v1["service_address"], v1["ejected"]
    assert FlowRecord.from_dict(v1) == rec
