"""ConnectionRateLimit: parsing (mesh file and Kubernetes object), precedence, compilation to
kernel entries, `policy check` output, and the telemetry of a rate-limited deny."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from agent.abi import ID_PLAINTEXT
from agent.cli import main
from agent.datapath.identities import IdentityTable
from agent.datapath.layouts import FlowEvent, RateLimitEntry, RateLimitKey
from agent.datapath.ratelimitmap import RateLimitCompiler
from agent.datapath.verdicts import KernelDirection, KernelEventKind, KernelVerdict, Reason
from agent.identity.spiffe import Identity
from agent.model.mesh import Labels, Workload
from agent.policy.ratelimit import (
    ConnectionRateLimit,
    RateLimitRule,
    RateLimitSource,
    limit_for,
)
from agent.runtime import flows
from agent.sources.file import MeshConfigError, parse_files
from agent.sources.k8sconvert import object_from_k8s
from agent.telemetry.metrics import FlowMetrics

pytestmark = pytest.mark.unit

HEAD = """\
kind: Workload
metadata: {name: debug, namespace: tools}
spec: {serviceAccount: debug, ips: [10.251.0.10]}
---
kind: Workload
metadata: {name: ops, namespace: tools}
spec: {serviceAccount: ops, ips: [10.251.0.12]}
---
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccount: db, ips: [10.251.1.10]}
---
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, ips: [10.251.1.11]}
"""
LIMIT = """\
---
apiVersion: nodemesh.io/v1alpha1
kind: ConnectionRateLimit
metadata: {name: db-limits, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  limits:
  - from: {principal: cluster.local/ns/tools/sa/debug}
    connectionsPerSecond: 5
    burst: 5
  - from: {namespace: tools}
    connectionsPerSecond: 0.5
    maxConnections: 3
  - from: {plaintext: true}
    maxConnections: 1
"""
DEBUG = Identity("cluster.local", "tools", "debug")
OPS = Identity("cluster.local", "tools", "ops")


def load(text: str) -> object:
    return parse_files([(Path("mesh.yaml"), text.encode())])


def test_the_mesh_file_kind_parses_into_rules() -> None:
    state = load(HEAD + LIMIT)
    (lim,) = state.rate_limits  # type: ignore[attr-defined]
    assert (lim.key, lim.selector) == ("shop/db-limits", Labels({"app": "db"}))
    assert lim.rules == (
        RateLimitRule(RateLimitSource(principal="cluster.local/ns/tools/sa/debug"), 5.0, 5, None),
        RateLimitRule(RateLimitSource(namespace="tools"), 0.5, 1, 3),  # burst: ceil(rate)
        RateLimitRule(RateLimitSource(plaintext=True), None, 0, 1),
    )
    assert lim.rules[0].interval_ns == 200_000_000 and lim.rules[2].interval_ns == 0


@pytest.mark.parametrize(("body", "where"), [
    ("  - from: {principal: a/b}\n    connectionsPerSecond: 1\n",
     "mesh.yaml:22: spec.limits[0].from.principal"),
    ("  - from: {namespace: tools, plaintext: true}\n    connectionsPerSecond: 1\n",
     "mesh.yaml:22: spec.limits[0].from: want exactly one"),
    ("  - from: {namespace: tools}\n    connectionsPerSecond: -1\n",
     "mesh.yaml:23: spec.limits[0].connectionsPerSecond: -1 is out of range"),
    ("  - from: {namespace: tools}\n    burst: 3\n    maxConnections: 2\n",
     "mesh.yaml:23: spec.limits[0].burst: burst sizes the token bucket"),
    ("  - from: {namespace: tools}\n", "mesh.yaml:22: spec.limits[0]: a limit needs"),
    ("  - from: {namespace: tools}\n    maxConnections: 1.5\n",
     "mesh.yaml:23: spec.limits[0].maxConnections: want an integer"),
    ("  - from: {plaintext: false}\n    maxConnections: 1\n",
     "mesh.yaml:22: spec.limits[0].from.plaintext"),
])
def test_bad_limits_name_file_line_and_field(body: str, where: str) -> None:
    doc = ("---\napiVersion: nodemesh.io/v1alpha1\nkind: ConnectionRateLimit\n"
           "metadata: {name: l, namespace: shop}\nspec:\n  limits:\n" + body)
    with pytest.raises(MeshConfigError) as e:
        load(HEAD + doc)
    assert str(e.value).startswith(where), str(e.value)


def test_the_kubernetes_object_converts_to_the_same_limit() -> None:
    doc = yaml.safe_load(LIMIT.removeprefix("---\n"))
    doc["metadata"].update(uid="u1", resourceVersion="7",
                           creationTimestamp="2026-01-01T00:00:00Z")
    obj = object_from_k8s(doc)
    (from_file,) = load(HEAD + LIMIT).rate_limits  # type: ignore[attr-defined]
    assert isinstance(obj, ConnectionRateLimit)
    assert (obj.key, obj.selector, obj.rules) == (from_file.key, from_file.selector,
                                                  from_file.rules)


def test_the_most_specific_source_wins_and_others_are_unlimited() -> None:
    (lim,) = load(HEAD + LIMIT).rate_limits  # type: ignore[attr-defined]
    db = Workload("db", "shop", "db", (ipaddress.ip_address("10.251.1.10"),),
                  labels=Labels({"app": "db"}))
    web = Workload("web", "shop", "web", (ipaddress.ip_address("10.251.1.11"),),
                   labels=Labels({"app": "web"}))
    pick = {who: limit_for([lim], ident, db) for who, ident in
            (("debug", DEBUG), ("ops", OPS), ("plain", None),
             ("shop", Identity("cluster.local", "shop", "web")))}
    assert pick["debug"] is not None and pick["debug"].index == 0
    assert pick["ops"] is not None and pick["ops"].index == 1
    assert pick["plain"] is not None and pick["plain"].index == 2
    assert pick["shop"] is None
    assert limit_for([lim], DEBUG, web) is None  # not selected


def test_compiled_entries_cross_each_known_source_id_with_the_destination() -> None:
    state = load(HEAD + LIMIT)
    ids = IdentityTable()
    debug, ops = ids.allocate(DEBUG), ids.allocate(OPS)
    web = ids.allocate(Identity("cluster.local", "shop", "web"))
    out = RateLimitCompiler(ids).compile(state.rate_limits,  # type: ignore[attr-defined]
                                         state.workloads)  # type: ignore[attr-defined]
    db = ipaddress.IPv4Address("10.251.1.10")
    assert out.entries == {
        RateLimitKey(db, debug): RateLimitEntry(200_000_000, 5, 0, 1),
        RateLimitKey(db, ops): RateLimitEntry(2_000_000_000, 1, 3, 1),  # its own bucket
        RateLimitKey(db, ID_PLAINTEXT): RateLimitEntry(0, 0, 1, 1),
    }
    assert web not in {k.src_id for k in out.entries}
    assert out.names == {1: "shop/db-limits"}


def test_policy_check_explains_the_limit(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(HEAD + LIMIT)
    base = ["policy", "check", "--config", str(mesh), "--to", "shop/db", "--port", "5432"]
    assert main([*base, "--from", "tools/debug"]) == 0
    lines = dict(x.split(":", 1) for x in capsys.readouterr().out.splitlines())
    assert lines["rate limit"].strip() == (
        "shop/db-limits limits[0] (principal cluster.local/ns/tools/sa/debug): 5 connections/s, "
        "burst 5; beyond it a connect fails with ECONNREFUSED, reason RATE_LIMITED")
    assert main([*base, "--from", "tools/ops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["rate_limit"]
    assert (report["limit"], report["entry"], report["connections_per_second"], report["burst"],
            report["max_connections"], report["over_limit"]["reason"]) == (
        "shop/db-limits", 1, 0.5, 1, 3, "RATE_LIMITED")
    assert main([*base[:4], "--to", "shop/web", "--port", "80", "--from", "tools/debug"]) == 0
    lines = dict(x.split(":", 1) for x in capsys.readouterr().out.splitlines())
    assert lines["rate limit"].strip() == "none applies"


def test_a_rate_limited_deny_becomes_an_rl_record_and_counts_in_its_metric() -> None:
    db = Workload("db", "shop", "db", (ipaddress.ip_address("10.251.1.10"),))
    debug = Workload("debug", "tools", "debug", (ipaddress.ip_address("10.251.0.10"),))
    ev = FlowEvent(1, 2, 3, 0, 0, 0, ipaddress.IPv4Address("10.251.0.10"),
                   ipaddress.IPv4Address("10.251.1.10"), 0, 5432, 100, 1, 0, KernelEventKind.DENY,
                   KernelVerdict.DENY, Reason.RATE_LIMITED, KernelDirection.EGRESS)
    by_ip = {"10.251.1.10": db, "10.251.0.10": debug}.get
    rec = flows.from_kernel(ev, by_ip, {1: "shop/db-limits"}.__getitem__)
    assert (rec.kind.value, rec.reason, rec.response_flags, rec.policy) == (
        "deny", "rate_limited", "RL", "shop/db-limits")
    registry = CollectorRegistry()
    metrics = FlowMetrics(registry)
    metrics.record(rec)
    text = generate_latest(registry).decode()
    assert ('nodemesh_rate_limited_total{destination_workload="db",'
            'destination_workload_namespace="shop",limit="shop/db-limits",reporter="source",'
            'source_principal="spiffe://cluster.local/ns/tools/sa/debug",'
            'source_workload="debug",source_workload_namespace="tools"} 1.0') in text
