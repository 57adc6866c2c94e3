"""Differential test: the kernel's verdict equals the reference evaluator's.

Also for Service destinations (second test): app connects to VIP:port, translated in the kernel,
and with connection rate limits (third test): a burst-only token bucket model.

2000 cases: random Istio AuthorizationPolicy/PeerAuthentication sets (principals, namespaces,
ipBlocks and their not-forms, ports/notPorts, when conditions, L7 fields, dry-run, root /
namespace / selector scope, STRICT/PERMISSIVE with port exceptions) and random connections
(peer identity or plaintext, source address, destination, port). Each case is a real connect()
from the node's cgroup inside an enrolled pod, marked with the peer's identity like the tunnel's
upstream socket, so the kernel decides from the socket mark, the bound source address, the
destination and the port.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import random
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from peers import APP_CONNECT_BATCH, CONNECT_BATCH

from agent.datapath.datapath import Datapath
from agent.datapath.identities import IdentityTable
from agent.datapath.layouts import Backend, FlowEvent, Frontend
from agent.datapath.policymap import PolicyCompiler
from agent.datapath.ratelimitmap import RateLimitCompiler
from agent.datapath.servicemap import compile_services
from agent.identity.spiffe import Identity
from agent.model.mesh import Labels, Service, ServicePort, Workload
from agent.policy.authz import parse_authorization_policy
from agent.policy.connection import Connection
from agent.policy.evaluator import PolicySet, evaluate
from agent.policy.peerauth import parse_peer_authentication
from agent.policy.ratelimit import ConnectionRateLimit, limit_for, parse_connection_rate_limit
from agent.state.snapshot import MeshState
from agent.testbed import Cluster, PodProcess

SEED = 20261123
SETS, CASES_PER_SET = 50, 40
NAMESPACES = ["a", "b"]
ACCOUNTS = ["s1", "s2", "s3"]
PORTS = [80, 443, 8080, 9000]
CIDRS = ["10.251.0.0/16", "10.251.0.0/24", "10.251.0.128/25", "10.250.0.0/24", "10.251.0.7/32"]
SOURCES = ["10.251.0.5", "10.251.0.7", "10.251.0.200", "10.251.1.9", "10.250.0.3", "10.252.0.1"]
IDENTITIES = [Identity("cluster.local", ns, sa) for ns in NAMESPACES for sa in ACCOUNTS] + [
    Identity("other.td", "a", "s1")
]
WORKLOADS = [
    Workload("w0", "a", "s1", (ipaddress.IPv4Address("10.251.0.201"),), labels={"app": "w0"}),
    Workload("w1", "a", "s2", (ipaddress.IPv4Address("10.251.0.202"),), labels={"app": "w1"}),
    Workload("w2", "b", "s3", (ipaddress.IPv4Address("10.251.0.203"),), labels={"app": "w2"}),
]


def _principal(r: random.Random) -> str:
    ident = r.choice(IDENTITIES).principal
    return r.choice([ident, ident[: r.randint(5, len(ident) - 1)] + "*", "*" + ident[-3:], "*"])


def _source(r: random.Random) -> dict[str, Any]:
    fields = {
        "principals": lambda: [_principal(r) for _ in range(r.randint(1, 2))],
        "notPrincipals": lambda: [_principal(r)],
        "namespaces": lambda: r.sample(NAMESPACES, r.randint(1, 2)),
        "notNamespaces": lambda: [r.choice(NAMESPACES)],
        "ipBlocks": lambda: r.sample(CIDRS, r.randint(1, 2)),
        "notIpBlocks": lambda: [r.choice(CIDRS)],
    }
    keys = r.sample(sorted(fields), r.randint(1, 2))
    return {k: fields[k]() for k in keys}


def _rule(r: random.Random) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if r.random() < 0.7:
        rule["from"] = [{"source": _source(r)} for _ in range(r.randint(1, 2))]
    if r.random() < 0.5:
        op: dict[str, Any] = {
            "ports" if r.random() < 0.7 else "notPorts": [
                str(p) for p in r.sample(PORTS, r.randint(1, 2))
            ]
        }
        if r.random() < 0.1:
            op["methods"] = ["GET"]  # L7: ALLOW never matches, DENY drops it (fail closed)
        rule["to"] = [{"operation": op}]
    if r.random() < 0.3:
        key = r.choice(
            [
                "source.ip",
                "source.namespace",
                "source.principal",
                "destination.port",
                "destination.ip",
            ]
        )
        values = {
            "source.ip": lambda: r.sample(CIDRS + SOURCES, 2),
            "source.namespace": lambda: [r.choice(NAMESPACES)],
            "source.principal": lambda: [_principal(r)],
            "destination.port": lambda: [str(r.choice(PORTS))],
            "destination.ip": lambda: [str(r.choice(WORKLOADS).ips[0])],
        }[key]()
        rule["when"] = [{"key": key, "values" if r.random() < 0.7 else "notValues": values}]
    return rule


def random_policies(r: random.Random) -> PolicySet:
    authz = []
    for i in range(r.randint(0, 4)):
        ns = r.choice([*NAMESPACES, "istio-system"])
        meta: dict[str, Any] = {"name": f"p{i}", "namespace": ns}
        if r.random() < 0.1:
            meta["annotations"] = {"istio.io/dry-run": "true"}
        spec: dict[str, Any] = {"action": r.choice(["ALLOW", "DENY"])}
        if ns != "istio-system" and r.random() < 0.5:
            spec["selector"] = {"matchLabels": {"app": r.choice(WORKLOADS).name}}
        rules = [_rule(r) for _ in range(r.randint(0, 2))]
        if rules or r.random() < 0.5:
            spec["rules"] = rules
        authz.append(
            parse_authorization_policy(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "AuthorizationPolicy",
                    "metadata": meta,
                    "spec": spec,
                }
            )
        )
    peer = []
    if r.random() < 0.5:
        ns = r.choice([*NAMESPACES, "istio-system"])
        spec = {"mtls": {"mode": r.choice(["STRICT", "PERMISSIVE"])}}
        if r.random() < 0.5 and ns != "istio-system":
            spec["selector"] = {"matchLabels": {"app": r.choice(WORKLOADS).name}}
            spec["portLevelMtls"] = {
                str(r.choice(PORTS)): {"mode": r.choice(["STRICT", "PERMISSIVE", "DISABLE"])}
            }
        peer.append(
            parse_peer_authentication(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "PeerAuthentication",
                    "metadata": {"name": "pa", "namespace": ns},
                    "spec": spec,
                }
            )
        )
    return PolicySet(tuple(authz), tuple(peer))


@pytest.fixture
def batcher(kcluster: Cluster, clean_policy: Datapath) -> Iterator[PodProcess]:
    pod = kcluster.pod(0, 0)
    clean_policy.enroll(pod.netns, 99, pod.ip)
    proc = kcluster.nodes[0].python(
        CONNECT_BATCH, pod.netns_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == "ready"
    yield proc
    proc.stop()


def test_kernel_verdict_equals_reference_on_2000_random_cases(
    clean_policy: Datapath, batcher: PodProcess
) -> None:
    rng = random.Random(SEED)
    table = IdentityTable()
    for ident in IDENTITIES:
        table.allocate(ident)
    compiler = PolicyCompiler(table)
    assert batcher.popen is not None and batcher.popen.stdin and batcher.popen.stdout
    checked, mismatches = 0, []
    verdicts_seen = set()
    for set_index in range(SETS):
        policies = random_policies(rng)
        compiled = compiler.compile(policies, WORKLOADS)
        clean_policy.apply_policy(compiled.entries, compiled.cidrs)
        cases = []
        for _ in range(CASES_PER_SET):
            ident = rng.choice([None, *IDENTITIES])
            dst = rng.choice(WORKLOADS)
            cases.append((ident, rng.choice(SOURCES), dst, rng.choice([*PORTS, 22, 31337])))
        batch = [[table.mark_for(i), src, str(d.ips[0]), port] for i, src, d, port in cases]
        batcher.popen.stdin.write(json.dumps(batch) + "\n")
        batcher.popen.stdin.flush()
        kernel = json.loads(batcher.popen.stdout.readline())
        for (ident, src, dst, port), got in zip(cases, kernel, strict=True):
            ref = evaluate(policies, Connection(src, ident, dst, dst.ips[0], port))
            want = "OK" if ref.allowed else "EPERM"
            verdicts_seen.add(want)
            checked += 1
            if got != want:
                mismatches.append(
                    f"set {set_index}: {ident} {src}->{dst.ref}:{port}: kernel {got},"
                    f" reference {want} ({ref.reason})"
                )
    assert checked == SETS * CASES_PER_SET >= 2000
    assert verdicts_seen == {"OK", "EPERM"}  # both outcomes exercised
    assert not mismatches, "\n".join(mismatches[:20])


# -- Service destinations ---------------------------------------------------------------------
# The same random policies, now reached through Service VIPs from an enrolled pod's app: the
# kernel translates VIP:port to an endpoint:targetPort and decides policy for that endpoint with
# the pod's identity. Each case checks the endpoint the kernel chose (the tunnel's original
# destination, or the DENY event of the refused socket) and the reference verdict for it.
SVC_WORKLOADS = [
    Workload("w0", "a", "s1", (ipaddress.IPv4Address("10.251.0.201"),),
             labels={"app": "w0", "tier": "t"}, ports=(("http", 80), ("https", 9000))),
    Workload("w1", "a", "s2", (ipaddress.IPv4Address("10.251.0.202"),),
             labels={"app": "w1", "tier": "t"}, ports=(("http", 8080),)),
    Workload("w2", "b", "s3", (ipaddress.IPv4Address("10.251.0.203"),), labels={"app": "w2"},
             ports=(("https", 443),)),
]
SERVICES = [
    Service("svc-w0", "a", (ipaddress.IPv4Address("10.96.0.10"),),
            (ServicePort(80, 8080), ServicePort(443, "https")), Labels({"app": "w0"})),
    Service("svc-t", "a", (ipaddress.IPv4Address("10.96.0.11"),),
            (ServicePort(80, "http"), ServicePort(9000, 9000)), Labels({"tier": "t"})),
    Service("svc-b", "b", (ipaddress.IPv4Address("10.96.0.12"),),
            (ServicePort(443, "https"), ServicePort(8443, "https")), Labels({"app": "w2"})),
]
SVC_SETS, SVC_CASES_PER_SET = 25, 40


@pytest.fixture
def app_batcher(kcluster: Cluster, clean_policy: Datapath) -> Iterator[PodProcess]:
    proc = kcluster.pod(0, 0).python(
        APP_CONNECT_BATCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.popen is not None and proc.popen.stdout is not None
    assert proc.popen.stdout.readline().strip() == "ready"
    yield proc
    proc.stop()
    clean_policy.apply_services({})


def test_kernel_verdict_equals_reference_for_service_destinations(
    kcluster: Cluster, clean_policy: Datapath, app_batcher: PodProcess
) -> None:
    rng = random.Random(SEED + 1)
    pod = kcluster.pod(0, 0)
    table = IdentityTable()
    for ident in IDENTITIES:
        table.allocate(ident)
    compiler = PolicyCompiler(table)
    state = MeshState.build([*SVC_WORKLOADS, *SERVICES])
    lb = compile_services(state)
    clean_policy.apply_services(lb)
    events: dict[int, FlowEvent] = {}
    clean_policy.open_events(lambda e: events.__setitem__(e.cookie, e))
    assert app_batcher.popen is not None and app_batcher.popen.stdin and app_batcher.popen.stdout
    checked, mismatches, outcomes = 0, [], collections.Counter[str]()
    for set_index in range(SVC_SETS):
        policies = random_policies(rng)
        compiled = compiler.compile(policies, SVC_WORKLOADS)
        clean_policy.apply_policy(compiled.entries, compiled.cidrs)
        ident = rng.choice(IDENTITIES)
        clean_policy.enroll(pod.netns, table.allocate(ident), pod.ip)
        cases = []
        for _ in range(SVC_CASES_PER_SET):
            svc = rng.choice(SERVICES)
            port = rng.choice([*(p.port for p in svc.ports), 22])  # 22: not declared
            cases.append((svc.vips[0], port))
        app_batcher.popen.stdin.write(json.dumps([[str(v), p] for v, p in cases]) + "\n")
        app_batcher.popen.stdin.flush()
        kernel = json.loads(app_batcher.popen.stdout.readline())
        clean_policy.drain_events()
        for (vip, port), (got, detail) in zip(cases, kernel, strict=True):
            checked += 1
            outcomes[got] += 1
            wrong = _judge(lb, events, policies, src_ip=pod.ip, ident=ident,
                           fe=Frontend(vip, port), got=got, detail=detail)
            if wrong:
                mismatches.append(f"set {set_index}: {ident} -> {vip}:{port}: {wrong}")
    assert checked == SVC_SETS * SVC_CASES_PER_SET >= 1000
    assert outcomes["OK"] > 0 and outcomes["EPERM"] > 0, outcomes  # both outcomes exercised
    assert not mismatches, "\n".join(mismatches[:20])


def _judge(lb: dict[Frontend, tuple[Backend, ...]], events: dict[int, FlowEvent],
           policies: PolicySet, *, src_ip: ipaddress.IPv4Address, ident: Identity,
           fe: Frontend, got: str, detail: Any) -> str | None:
    """What is wrong with the kernel's outcome of one Service connect, or None."""
    if got == "OK":
        chosen = str(detail)
    elif got == "EPERM" and detail in events:
        ev = events[detail]
        chosen = f"{ev.dst_ip}:{ev.dst_port}"
        if (ev.svc_ip, ev.svc_port) != (fe.vip, fe.port):
            return f"DENY event names {ev.svc_ip}:{ev.svc_port}"
    else:
        return f"kernel {got} {detail}"
    if fe not in lb:  # a port the Service does not declare: untranslated, to the VIP
        return None if (got, chosen) == ("OK", f"{fe.vip}:{fe.port}") else f"{got} {chosen}"
    ip, _, target = chosen.rpartition(":")
    backend = Backend(ipaddress.IPv4Address(ip), int(target))
    if backend not in lb[fe]:
        return f"{chosen} is not one of {lb[fe]}"
    dst = next(w for w in SVC_WORKLOADS if w.ips[0] == backend.ip)
    ref = evaluate(policies, Connection(src_ip, ident, dst, backend.ip, backend.port))
    want = "OK" if ref.allowed else "EPERM"
    return None if got == want else (
        f"{dst.ref}:{backend.port}: kernel {got}, reference {want} ({ref.reason})")


# -- connection rate limits ---------------------------------------------------------------------
# The same random policies plus random ConnectionRateLimits, burst-only (one token per 1000 s:
# none refills within the test), on the tunnel's upstream connects (ingress buckets). The
# reference: the evaluator's verdict, then, for an allowed connect, the limit `limit_for` picks
# and a count of the tokens its (destination, source) bucket has left.
RL_SETS, RL_CASES_PER_SET = 25, 40


def random_limits(r: random.Random) -> list[ConnectionRateLimit]:
    out = []
    for i in range(r.randint(0, 2)):
        rules = []
        for _ in range(r.randint(1, 2)):
            source = r.choice([{"principal": r.choice(IDENTITIES).principal},
                               {"namespace": r.choice(NAMESPACES)}, {"plaintext": True}])
            rules.append({"from": source, "connectionsPerSecond": 0.001,
                          "burst": r.randint(1, 3)})
        spec: dict[str, Any] = {"limits": rules}
        if r.random() < 0.5:
            spec["selector"] = {"matchLabels": {"app": r.choice(WORKLOADS).name}}
        out.append(parse_connection_rate_limit({
            "apiVersion": "nodemesh.io/v1alpha1", "kind": "ConnectionRateLimit",
            "metadata": {"name": f"l{i}", "namespace": r.choice(NAMESPACES)}, "spec": spec}))
    return out


def test_kernel_rate_limits_equal_the_reference_bucket_model(
    clean_policy: Datapath, batcher: PodProcess
) -> None:
    rng = random.Random(SEED + 2)
    table = IdentityTable()
    for ident in IDENTITIES:
        table.allocate(ident)
    compiler, limiter = PolicyCompiler(table), RateLimitCompiler(table)
    assert batcher.popen is not None and batcher.popen.stdin and batcher.popen.stdout
    mismatches, outcomes = [], collections.Counter[str]()
    try:
        for set_index in range(RL_SETS):
            policies, limits = random_policies(rng), random_limits(rng)
            compiled = compiler.compile(policies, WORKLOADS)
            clean_policy.apply_policy(compiled.entries, compiled.cidrs)
            clean_policy.apply_rate_limits({})  # every bucket starts full
            clean_policy.apply_rate_limits(limiter.compile(limits, WORKLOADS).entries)
            cases = [(rng.choice([None, *IDENTITIES]), rng.choice(SOURCES), rng.choice(WORKLOADS),
                      rng.choice(PORTS)) for _ in range(RL_CASES_PER_SET)]
            batch = [[table.mark_for(i), src, str(d.ips[0]), port] for i, src, d, port in cases]
            batcher.popen.stdin.write(json.dumps(batch) + "\n")
            batcher.popen.stdin.flush()
            kernel = json.loads(batcher.popen.stdout.readline())
            taken: collections.Counter[tuple[str, int]] = collections.Counter()
            for (ident, src, dst, port), got in zip(cases, kernel, strict=True):
                ref = evaluate(policies, Connection(src, ident, dst, dst.ips[0], port))
                want, why = ("OK", "allowed") if ref.allowed else ("EPERM", ref.reason)
                applied = limit_for(limits, ident, dst) if ref.allowed else None
                if applied is not None:
                    bucket = (str(dst.ips[0]), table.id_of(ident))
                    taken[bucket] += 1
                    if taken[bucket] > applied.rule.burst:
                        want, why = "EPERM", f"rate limited by {applied.limit.key}"
                outcomes[why if why.startswith(("rate", "allowed")) else "policy"] += 1
                if got != want:
                    mismatches.append(f"set {set_index}: {ident} {src}->{dst.ref}:{port}: "
                                      f"kernel {got}, reference {want} ({why})")
    finally:
        clean_policy.apply_rate_limits({})
    assert not mismatches, "\n".join(mismatches[:20])
    limited = sum(n for k, n in outcomes.items() if k.startswith("rate"))
    assert limited and outcomes["allowed"] and outcomes["policy"], outcomes  # all exercised
