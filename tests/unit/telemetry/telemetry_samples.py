"""Sample endpoints and records shared by the telemetry tests (a uniquely named module:
every test folder has a conftest)."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.telemetry.flow import (
    FlowEndpoint,
    FlowEventKind,
    FlowRecord,
    FlowVerdict,
    Reporter,
    SecurityPolicy,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)

SLEEP = FlowEndpoint(workload="sleep", namespace="default",
                     principal="spiffe://cluster.local/ns/default/sa/sleep", ip="10.0.1.5",
                     port=40312, app="sleep", version="v1")
REVIEWS = FlowEndpoint(workload="reviews-v2", namespace="prod",
                       principal="spiffe://cluster.local/ns/prod/sa/reviews", ip="10.0.2.7",
                       port=9080, service="reviews.prod.svc.cluster.local", app="reviews",
                       version="v2", cluster="kind-a")
OUTSIDER = FlowEndpoint(ip="192.0.2.9", port=51000)


def sample_records() -> list[FlowRecord]:
    """A known sequence: 2 opens and 2 closes sleep→reviews (one failed), a kernel deny from an
    identity, a deny and an auth failure from a plaintext outsider, and an open reported by the
    source side."""
    mtls = SecurityPolicy.MUTUAL_TLS
    return [
        FlowRecord(FlowEventKind.OPEN, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                   tunneled=True, connection_security_policy=mtls),
        FlowRecord(FlowEventKind.CLOSE, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                   bytes_sent=1200, bytes_received=34000, duration=1.5, tunneled=True,
                   connection_security_policy=mtls),
        FlowRecord(FlowEventKind.OPEN, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                   tunneled=True, connection_security_policy=mtls),
        FlowRecord(FlowEventKind.CLOSE, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                   bytes_sent=300, bytes_received=0, duration=0.25, tunneled=True,
                   response_flags="CONNECT", connection_security_policy=mtls),
        FlowRecord(FlowEventKind.DENY, Reporter.DESTINATION, SLEEP, REVIEWS, time=T0,
                   verdict=FlowVerdict.DENIED, reason="policy_deny", reason_code=1,
                   policy="prod/deny-sleep", rule="0", connection_security_policy=mtls),
        FlowRecord(FlowEventKind.DENY, Reporter.DESTINATION, OUTSIDER, REVIEWS, time=T0,
                   verdict=FlowVerdict.DENIED, reason="mtls_required", reason_code=3),
        FlowRecord(FlowEventKind.AUTH_FAILURE, Reporter.DESTINATION, OUTSIDER, REVIEWS, time=T0,
                   verdict=FlowVerdict.DENIED, reason="TLS_HANDSHAKE"),
        FlowRecord(FlowEventKind.OPEN, Reporter.SOURCE, SLEEP, REVIEWS, time=T0, tunneled=True),
    ]
