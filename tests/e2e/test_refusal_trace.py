"""Every refusal leaves a trace (issue #19): on the test bed with real TLS and real sockets,
each class of refusal the tunnel makes (TLS handshake failure, wrong or untrusted peer identity,
STRICT refusal of plaintext, malformed CONNECT -> 400, destination policy deny -> 401) becomes
a flow record, a failed-connection metric and an audit line, and the log has one bounded line
per refusal and no traceback; a flood of identical refusals logs a bounded number of lines and
says how many it suppressed. The kernel's connect-time deny is covered with real agents."""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prereq import require_root
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.agents import live_mesh as live_agents
from support.mesh import Mesh, mesh
from support.testca import identity

from agent.commands.demo import _run_client, http_get
from agent.identity.spiffe import Identity
from agent.model.mesh import Workload as StateWorkload
from agent.runtime import flows
from agent.telemetry.pipeline import Telemetry, TelemetryConfig
from agent.testbed import Cluster
from agent.testbed.cluster import Pod
from ztunnel import connect, podnet
from ztunnel.events import ConnectionEvent, ResponseFlag
from ztunnel.lograte import RepeatLimiter
from ztunnel.pool import PoolKey
from ztunnel.tunnel import PodSpec, TunnelWorkload

SMALL = 16 * 1024


@pytest.fixture
def small_cluster() -> Any:
    require_root()
    with Cluster(nodes=2, pods_per_node=2, description="pytest refusal trace") as c:
        yield c


class Traced:
    """A Telemetry pipeline (flow log, audit log, metrics) fed by every tunnel of a Mesh, as
    the agent feeds it (agent/runtime/node.py)."""

    def __init__(self, m: Mesh, work: Path) -> None:
        self.work = work
        self.tel = Telemetry(TelemetryConfig(node="node0", flow_log=work / "flows.log",
                                             audit_log=work / "audit.log"))
        self.state = {str(p.ip): StateWorkload(p.name, "default", p.name, (p.ip,))
                      for p in m.cluster.pods}
        for t in m.tunnels:
            t.config.on_event = self._event(m)

    def _event(self, m: Mesh) -> Any:
        def on_event(ev: ConnectionEvent) -> None:
            m.events.append(ev)
            self.tel.emit(flows.from_tunnel(ev, self.state.get))
        return on_event

    def flows(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (self.work / "flows.log").read_text().splitlines()]

    def audits(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (self.work / "audit.log").read_text().splitlines()]

    def failed(self) -> dict[tuple[str, str, str], float]:
        """istio_tcp_connections_failed_total by (reporter, response_flags, security policy)."""
        out: dict[tuple[str, str, str], float] = {}
        text = generate_latest(self.tel.registry).decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "istio_tcp_connections_failed_total":
                    key = (s.labels["reporter"], s.labels["response_flags"],
                           s.labels["connection_security_policy"])
                    out[key] = out.get(key, 0) + s.value
        return out

    def auth_failures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        text = generate_latest(self.tel.registry).decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "nodemesh_auth_failures_total":
                    out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
        return out


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Any]:
    made: list[Traced] = []

    def make(m: Mesh) -> Traced:
        made.append(Traced(m, tmp_path))
        return made[-1]

    yield make
    for t in made:
        t.tel.close()


def through_tunnel(m: Mesh, src: Pod, dst: Pod, port: int = 8080) -> dict[str, Any]:
    m.route(src, str(dst.ip), port)
    return m.run_clients(src, "127.0.0.1", 15001, SMALL, 1)


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]
    assert max(len(r.getMessage()) for r in caplog.records) < 1024


def count(records: list[dict[str, Any]], **want: str) -> int:
    return sum(all(r[k] == v for k, v in want.items()) for r in records)


def test_each_tunnel_refusal_is_in_the_flow_log_the_metrics_and_the_audit_log(
        small_cluster: Cluster, traced: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = small_cluster
    deny_src = c.pod(0, 1)

    def gate(pod: PodSpec, peer: Identity | None, target: tuple[str, int], mark: int) -> None:
        # Stands in for the kernel program on the upstream connect: it sees only the mark.
        if podnet.identity_of_mark(mark) == m.identity_ids[m.identity(deny_src)]:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    with mesh(c, upstream_gate=gate) as m:
        t = traced(m)
        dst = c.pod(1, 0)
        m.start_server(dst, 8080, SMALL)

        # 1. TLS handshake failure: an expired client certificate.
        src = c.pod(0, 0)
        m.ca.install(m.identity(src), m.ca.leaf(m.identity(src).uri, expired=True))
        assert through_tunnel(m, src, dst)["ok"] == 0
        # 2. Untrusted peer identity: a verified certificate from another trust domain.
        m.ca.install(m.identity(src), m.ca.leaf("spiffe://other.domain/ns/default/sa/n0p0"))
        assert through_tunnel(m, src, dst)["ok"] == 0
        # 3. Wrong peer identity: the server is not who the client expects at that address.
        m.ca.install(m.identity(src), m.ca.leaf(m.identity(src).uri))
        m.workloads[str(dst.ip)] = TunnelWorkload(str(dst.ip), identity("impostor"), dst.name)
        assert through_tunnel(m, src, dst)["ok"] == 0
        m.workloads[str(dst.ip)] = TunnelWorkload(str(dst.ip), m.identity(dst), dst.name)
        # 4. STRICT refusal of plaintext (sk_lookup would deliver it to 15006).
        m.inbound_routes[dst.cookie()] = 8080
        assert m.run_clients(src, str(dst.ip), 15006, SMALL, 1)["ok"] == 0
        # 5. Malformed CONNECT -> 400: the non-ASCII port.
        tunnel = m.tunnel_of(src)
        key = PoolKey(m.identity(src), m.identity(dst), str(dst.ip), str(src.ip))

        async def status(authority: str) -> int:
            session, sid = await tunnel.pool.open_stream(
                key, [(":method", "CONNECT"), (":authority", authority)])
            code, _ = await session.response(sid)
            return code

        assert m.loop.run(status(f"{dst.ip}:\u0668\u0660\u0668\u0660")) == connect.BAD_REQUEST
        # 6. Destination policy deny -> 401.
        assert through_tunnel(m, deny_src, dst)["ok"] == 0

        def done() -> bool:
            return len([e for e in m.events if e.response is not ResponseFlag.NONE]) >= 9
        m.wait_until(done, "every refusal's events")
    check_refusal_traces(t)
    no_traceback(caplog)


def check_refusal_traces(t: Traced) -> None:
    recs = t.flows()
    # Destination side (15008 / 15006 listeners of n1p0) and source side (15001 of n0p*).
    assert count(recs, kind="auth_failure", reporter="destination", response_flags="TLS_FAILURE",
                 reason="TLS_HANDSHAKE") >= 1
    assert count(recs, kind="auth_failure", reporter="destination",
                 response_flags="IDENTITY_ERROR", reason="PEER_IDENTITY") == 1
    assert count(recs, kind="auth_failure", reporter="source", response_flags="IDENTITY_ERROR",
                 reason="PEER_IDENTITY") == 1
    assert count(recs, kind="deny", reporter="destination", response_flags="DENY",
                 reason="STRICT_MTLS", connection_security_policy="none") == 1
    assert count(recs, kind="reject", reporter="destination", response_flags="DPE",
                 reason="BAD_AUTHORITY", connection_security_policy="mutual_tls") == 1
    assert count(recs, kind="deny", reporter="destination", response_flags="DENY",
                 reason="POLICY_DENY", connection_security_policy="mutual_tls") == 1
    assert count(recs, kind="deny", reporter="source", response_flags="DENY",
                 reason="REMOTE_DENY", connection_security_policy="mutual_tls") == 1
    # Every refusal record has its audit line, and nothing else does.
    refusals = [r for r in recs if r["verdict"] == "denied"]
    audits = t.audits()
    assert len(audits) == len(refusals) >= 7
    assert sorted((a["event"], a["reason"], a["response_flags"]) for a in audits) == sorted(
        ({"deny": "policy_deny", "auth_failure": "auth_failure", "reject": "rejected"}[r["kind"]],
         r["reason"], r["response_flags"]) for r in refusals)
    # Counted in Istio's failed-connections metric with the same labels.
    failed = t.failed()
    assert failed[("destination", "DENY", "none")] == 1
    assert failed[("destination", "DPE", "mutual_tls")] == 1
    assert failed[("destination", "DENY", "mutual_tls")] == 1
    assert failed[("source", "DENY", "mutual_tls")] == 1
    assert failed[("source", "IDENTITY_ERROR", "unknown")] == 1
    assert failed[("destination", "IDENTITY_ERROR", "unknown")] == 1
    assert failed[("destination", "TLS_FAILURE", "unknown")] >= 1
    auth = t.auth_failures()
    assert auth["PEER_IDENTITY"] == 2 and auth["TLS_HANDSHAKE"] >= 2  # both sides of the expiry
    assert t.tel.sink_errors == 0


def test_a_flood_of_identical_refusals_logs_a_bounded_number_of_lines(
        small_cluster: Cluster, traced: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    c = small_cluster
    limiter = RepeatLimiter.shared()
    limiter.flush()  # start from a clean slate whatever earlier tests logged
    n = 60

    def strict_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if not getattr(r, "nm_summary", False)
                and "is STRICT (mTLS required)" in r.getMessage()]

    with mesh(c) as m:
        t = traced(m)
        src, dst = c.pod(0, 0), c.pod(1, 0)
        m.inbound_routes[dst.cookie()] = 8080
        start = time.monotonic()
        assert m.run_clients(src, str(dst.ip), 15006, SMALL, n)["ok"] == 0
        m.wait_until(lambda: len(m.events) >= n, "a refusal event per connection")
        elapsed = time.monotonic() - start
        # At most `burst` lines per window (60 s; a slow run may span more than one).
        assert 1 <= len(strict_lines()) <= limiter.burst * (1 + int(elapsed // limiter.window))
    # Closing the tunnels reports what was held back: every refusal is a line or in a count.
    reported = sum(int(x) for r in caplog.records if "STRICT" in r.getMessage()
                   for x in re.findall(r"(\d+) similar lines suppressed", r.getMessage()))
    assert reported > 0
    assert len(strict_lines()) + reported == n
    # Every refusal is still recorded in full where it matters.
    assert count(t.flows(), kind="deny", reason="STRICT_MTLS") == n
    assert len(t.audits()) == n
    assert t.failed()[("destination", "DENY", "none")] == n
    no_traceback(caplog)


# A PERMISSIVE pod with one STRICT port, a workload outside the mesh, and an ALLOW policy.
KERNEL_MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
kind: Workload
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {serviceAccount: frontend, ips: [10.251.0.10], node: node0}
---
kind: Workload
metadata: {name: backend, namespace: shop, labels: {app: backend}}
spec: {serviceAccount: backend, ips: [10.251.0.11], node: node0}
---
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccount: db, ips: [10.251.1.10], node: node1}
---
kind: Workload
metadata: {name: stranger, namespace: outside, labels: {app: stranger}}
spec: {ips: [10.251.1.11], node: node1, inMesh: false}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-allow-backend, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/backend"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {5432: {mode: STRICT}}
"""


def _kernel_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples]


def test_kernel_connect_time_denies_are_traced_with_istios_security_labels(
        tmp_path: Path) -> None:
    """Real agents and the real kernel: a deny at the pod's own connect() (egress, source side)
    and a plaintext peer refused at the tunnel's upstream connect for a STRICT port
    (mtls_required, destination side, connection_security_policy=none)."""
    def audit(node: int) -> tuple[str, str]:
        return "--audit-log", str(tmp_path / f"audit-n{node}.log")

    with live_agents(tmp_path, "pytest kernel deny trace", mesh_text=KERNEL_MESH,
                     per_node=audit, servers=((1, 0, "db", "5432"),)) as live:
        c = live.cluster
        # Egress: frontend may not reach db; the kernel refuses its connect() at once.
        assert _run_client(c.pod(0, 0), "10.251.1.10", 5432, "x") == "ERR EPERM"
        # Ingress: plaintext from outside the mesh to db's STRICT port.
        out = _run_client(c.pod(1, 1), "10.251.1.10", 5432, "x")
        assert out.startswith("ERR"), out
        assert _run_client(c.pod(0, 1), "10.251.1.10", 5432, "x").startswith("OK")

        def deny(node: int, reason: str) -> dict[str, Any] | None:
            path = tmp_path / f"flows-n{node}.log"
            lines = path.read_text().splitlines() if path.exists() else []
            return next((r for r in map(json.loads, lines)
                         if r["kind"] == "deny" and r["reason"] == reason), None)

        deadline = time.monotonic() + 30
        while (deny(0, "policy_not_allowed") is None or deny(1, "mtls_required") is None) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        egress, plaintext = deny(0, "policy_not_allowed"), deny(1, "mtls_required")
        assert egress is not None and plaintext is not None, (
            out, (tmp_path / "flows-n1.log").read_text())
        assert (egress["reporter"], egress["response_flags"],
                egress["connection_security_policy"], egress["source"]["workload"]) == (
            "source", "DENY", "unknown", "frontend")
        assert (plaintext["reporter"], plaintext["response_flags"],
                plaintext["connection_security_policy"], plaintext["policy"],
                plaintext["source"]["ip"], plaintext["destination"]["workload"]) == (
            "destination", "DENY", "none", "shop/db", "10.251.1.11", "db")
        assert plaintext["source"]["principal"] == ""  # plaintext: nothing proves who
        # One record per refusal: the tunnel's view of that EPERM is not recorded again.
        flows1 = [json.loads(x) for x in
                  (tmp_path / "flows-n1.log").read_text().splitlines()]
        assert [r["reason"] for r in flows1 if r["verdict"] == "denied"] == ["mtls_required"]

        for node, reason, security in ((0, "policy_not_allowed", "unknown"),
                                       (1, "mtls_required", "none")):
            audits = [json.loads(x) for x in
                      (tmp_path / f"audit-n{node}.log").read_text().splitlines()]
            assert [(a["event"], a["reason"]) for a in audits] == [("policy_deny", reason)]
            metrics = http_get(c.nodes[node].netns, 15020, "/metrics")
            assert metrics is not None
            failed = [(labels["response_flags"], labels["connection_security_policy"], v)
                      for name, labels, v in _kernel_samples(metrics)
                      if name == "istio_tcp_connections_failed_total"]
            assert failed == [("DENY", security, 1.0)], failed
            denies = [(labels["reason"], v) for name, labels, v in _kernel_samples(metrics)
                      if name == "nodemesh_policy_denies_total"]
            assert denies == [(reason, 1.0)]
    for node in (0, 1):
        log = (tmp_path / f"agent-n{node}.log").read_text()
        assert "Traceback" not in log and "FlowRecordError" not in log, log[-3000:]
        assert max(map(len, log.splitlines())) < 1024
