"""The reference evaluator against Istio's L4 authorization semantics, one scenario per row."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.identity.spiffe import Identity
from agent.model.mesh import Labels, Workload
from agent.policy.authz import AuthorizationPolicy, parse_authorization_policy
from agent.policy.connection import Connection
from agent.policy.evaluator import PolicySet, PolicyVerdict, evaluate
from agent.policy.peerauth import PeerAuthentication, parse_peer_authentication

DB = Workload("db", "shop", "db", (ipaddress.ip_address("10.251.1.10"),), "node1",
              Labels({"app": "db", "tier": "data"}))
FRONTEND = Identity("cluster.local", "shop", "frontend")
BACKEND = Identity("cluster.local", "shop", "backend")
DEBUG = Identity("cluster.local", "tools", "default")
OTHER_TD = Identity("example.org", "shop", "frontend")


def ap(name: str, *rules: dict[str, Any], ns: str = "shop", action: str | None = "ALLOW",
       selector: dict[str, str] | None = None, dry_run: bool = False,
       no_rules: bool = False, **spec_extra: Any) -> AuthorizationPolicy:
    spec: dict[str, Any] = dict(spec_extra)
    if action is not None:
        spec["action"] = action
    if not no_rules:
        spec["rules"] = list(rules)
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    return parse_authorization_policy({"apiVersion": "security.istio.io/v1",
                                       "kind": "AuthorizationPolicy", "metadata": meta,
                                       "spec": spec})


def pa(name: str, ns: str, mode: str | None, selector: dict[str, str] | None = None, *,
       ports: dict[int, str] | None = None, created: str = "") -> PeerAuthentication:
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    meta = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return parse_peer_authentication({"apiVersion": "security.istio.io/v1beta1",
                                      "kind": "PeerAuthentication", "metadata": meta,
                                      "spec": spec})


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def src(**s: Any) -> dict[str, Any]:
    return {"from": [{"source": s}]}


def to(**o: Any) -> dict[str, Any]:
    return {"to": [{"operation": o}]}


def when(*conds: dict[str, Any]) -> dict[str, Any]:
    return {"when": list(conds)}


@dataclass
class Case:
    name: str
    policies: list[AuthorizationPolicy]
    verdict: PolicyVerdict
    decided_by: str | None = None
    rule: int | None = None
    identity: Identity | None = FRONTEND
    src_ip: str = "10.251.0.10"
    port: int = 5432
    dst: Workload = DB
    dst_ip: str = "10.251.1.10"
    peer_auth: list[PeerAuthentication] = field(default_factory=list)
    root_namespace: str = "istio-system"
    dry_run: list[str] = field(default_factory=list)


A, D = PolicyVerdict.ALLOW, PolicyVerdict.DENY
FE = "cluster.local/ns/shop/sa/frontend"

CASES = [
    Case("no policies: default allow", [], A),
    Case("plaintext, no policies: allow", [], A, identity=None),
    # principals and StringMatch forms
    Case("principal exact", [ap("p", src(principals=[FE]))], A, "shop/p", 0),
    Case("principal exact, other sa", [ap("p", src(principals=[FE]))], D, identity=BACKEND),
    Case("principal is trust-domain sensitive", [ap("p", src(principals=[FE]))], D,
         identity=OTHER_TD),
    Case("principal prefix", [ap("p", src(principals=["cluster.local/ns/shop/*"]))], A, "shop/p"),
    Case("principal prefix, other ns", [ap("p", src(principals=["cluster.local/ns/shop/*"]))], D,
         identity=DEBUG),
    Case("principal suffix", [ap("p", src(principals=["*/sa/frontend"]))], A, "shop/p"),
    Case("principal suffix across trust domains", [ap("p", src(principals=["*/sa/frontend"]))],
         A, identity=OTHER_TD),
    Case("principal presence with identity", [ap("p", src(principals=["*"]))], A),
    Case("principal presence, plaintext", [ap("p", src(principals=["*"]))], D, identity=None),
    Case("principal list is OR", [ap("p", src(principals=["x/ns/a/sa/b", FE]))], A),
    Case("principal with spiffe:// never matches",
         [ap("p", src(principals=["spiffe://" + FE]))], D),
    Case("notPrincipals excludes", [ap("p", src(notPrincipals=[FE]))], D),
    Case("notPrincipals admits others", [ap("p", src(notPrincipals=[FE]))], A, identity=BACKEND),
    Case("notPrincipals admits plaintext", [ap("p", src(notPrincipals=[FE]))], A, identity=None),
    Case("DENY notPrincipals '*' rejects plaintext",
         [ap("strict", src(notPrincipals=["*"]), action="DENY")], D, "shop/strict", 0,
         identity=None),
    Case("DENY notPrincipals '*' passes mTLS",
         [ap("strict", src(notPrincipals=["*"]), action="DENY")], A),
    # namespaces
    Case("namespace match", [ap("p", src(namespaces=["shop"]))], A),
    Case("namespace mismatch", [ap("p", src(namespaces=["shop"]))], D, identity=DEBUG),
    Case("namespace prefix", [ap("p", src(namespaces=["to*"]))], A, identity=DEBUG),
    Case("namespace needs identity", [ap("p", src(namespaces=["*"]))], D, identity=None),
    Case("notNamespaces", [ap("p", src(notNamespaces=["tools"]))], D, identity=DEBUG),
    Case("notNamespaces admits plaintext", [ap("p", src(notNamespaces=["tools"]))], A,
         identity=None),
    # service accounts
    Case("serviceAccounts", [ap("p", src(serviceAccounts=["shop/frontend"]))], A),
    Case("serviceAccounts ignore trust domain", [ap("p", src(serviceAccounts=["shop/frontend"]))],
         A, identity=OTHER_TD),
    Case("serviceAccounts mismatch", [ap("p", src(serviceAccounts=["shop/frontend"]))], D,
         identity=BACKEND),
    Case("notServiceAccounts", [ap("p", src(notServiceAccounts=["shop/frontend"]))], D),
    # IP blocks
    Case("ipBlocks CIDR", [ap("p", src(ipBlocks=["10.251.0.0/24"]))], A, identity=None),
    Case("ipBlocks single IP", [ap("p", src(ipBlocks=["10.251.0.10"]))], A),
    Case("ipBlocks miss", [ap("p", src(ipBlocks=["10.251.0.11"]))], D),
    Case("notIpBlocks", [ap("p", src(notIpBlocks=["10.251.0.0/24"]))], D),
    Case("notIpBlocks admits others", [ap("p", src(notIpBlocks=["10.251.0.0/24"]))], A,
         src_ip="10.9.0.1"),
    Case("IPv6 block, IPv4 source", [ap("p", src(ipBlocks=["fd00::/8"]))], D),
    Case("fields in one source are AND",
         [ap("p", src(principals=[FE], ipBlocks=["10.9.0.0/16"]))], D),
    Case("sources are OR",
         [ap("p", {"from": [{"source": {"principals": ["x/ns/y/sa/z"]}},
                            {"source": {"ipBlocks": ["10.251.0.0/16"]}}]})], A),
    # ports
    Case("ports", [ap("p", to(ports=["5432"]))], A),
    Case("ports as integers", [ap("p", to(ports=[5432]))], A),
    Case("ports miss", [ap("p", to(ports=["8080"]))], D),
    Case("notPorts", [ap("p", to(notPorts=["5432"]))], D),
    Case("notPorts admits other ports", [ap("p", to(notPorts=["22"]))], A),
    Case("operations are OR", [ap("p", {"to": [{"operation": {"ports": ["1"]}},
                                               {"operation": {"ports": ["5432"]}}]})], A),
    Case("from AND to", [ap("p", {**src(principals=[FE]), **to(ports=["8080"])})], D),
    # when conditions
    Case("when source.ip", [ap("p", when({"key": "source.ip", "values": ["10.251.0.0/24"]}))], A),
    Case("when source.ip notValues",
         [ap("p", when({"key": "source.ip", "notValues": ["10.251.0.0/24"]}))], D),
    Case("when source.namespace", [ap("p", when({"key": "source.namespace",
                                                 "values": ["tools"]}))], D),
    Case("when source.namespace notValues", [ap("p", when({"key": "source.namespace",
                                                           "notValues": ["tools"]}))], A),
    Case("when source.principal", [ap("p", when({"key": "source.principal", "values": [FE]}))],
         A),
    Case("when source.principal plaintext",
         [ap("p", when({"key": "source.principal", "values": ["*"]}))], D, identity=None),
    Case("when destination.ip", [ap("p", when({"key": "destination.ip",
                                               "values": ["10.251.1.0/24"]}))], A),
    Case("when destination.ip miss", [ap("p", when({"key": "destination.ip",
                                                    "values": ["10.251.2.0/24"]}))], D),
    Case("when destination.port", [ap("p", when({"key": "destination.port",
                                                 "values": ["5432"]}))], A),
    Case("when destination.port notValues",
         [ap("p", when({"key": "destination.port", "notValues": ["5432"]}))], D),
    Case("when values and notValues together",
         [ap("p", when({"key": "source.ip", "values": ["10.251.0.0/16"],
                        "notValues": ["10.251.0.10"]}))], D),
    Case("when conditions are AND",
         [ap("p", when({"key": "destination.port", "values": ["5432"]},
                       {"key": "source.namespace", "values": ["tools"]}))], D),
    Case("when conditions are AND (both hold)",
         [ap("p", when({"key": "destination.port", "values": ["5432"]},
                       {"key": "source.namespace", "values": ["shop"]}))], A),
    # DENY precedence and rules
    Case("matching DENY beats matching ALLOW",
         [ap("allow", src(principals=[FE])), ap("deny", to(ports=["5432"]), action="DENY")],
         D, "shop/deny", 0),
    Case("non-matching DENY, default allow", [ap("deny", to(ports=["1"]), action="DENY")], A),
    Case("second rule decides", [ap("p", to(ports=["1"]), src(principals=[FE]))], A, "shop/p", 1),
    Case("empty rule allows all", [ap("p", {})], A, "shop/p", 0, identity=None),
    Case("DENY with empty rule denies all", [ap("d", {}, action="DENY")], D, "shop/d", 0),
    Case("ALLOW without rules denies all", [ap("p", no_rules=True)], D),
    Case("DENY without rules never matches", [ap("d", no_rules=True, action="DENY")], A),
    Case("default action is ALLOW", [ap("p", src(principals=[FE]), action=None)], A, "shop/p"),
    # L7 handling
    Case("ALLOW with methods never matches", [ap("p", to(ports=["5432"], methods=["GET"]))], D),
    Case("ALLOW with L7 rule, other L4 rule still matches",
         [ap("p", to(methods=["GET"]), to(ports=["5432"]))], A, "shop/p", 1),
    Case("ALLOW with requestPrincipals never matches",
         [ap("p", src(principals=[FE], requestPrincipals=["*"]))], D),
    Case("ALLOW with remoteIpBlocks never matches",
         [ap("p", src(remoteIpBlocks=["10.0.0.0/8"]))], D),
    Case("ALLOW with L7 when key never matches",
         [ap("p", when({"key": "request.headers[x-user]", "values": ["a"]}))], D),
    Case("DENY with methods enforced on its ports",
         [ap("d", to(ports=["5432"], methods=["POST"]), action="DENY")], D, "shop/d", 0),
    Case("DENY with methods, other port unaffected",
         [ap("d", to(ports=["5432"], methods=["POST"]), action="DENY")], A, port=8080),
    Case("DENY with only paths denies every port",
         [ap("d", to(paths=["/admin"]), action="DENY")], D, "shop/d", 0, port=8080),
    Case("DENY with L7 when condition drops it",
         [ap("d", {**src(namespaces=["shop"]),
                   **when({"key": "request.auth.claims[iss]", "values": ["x"]})},
             action="DENY")], D, "shop/d"),
    Case("DENY with requestPrincipals only: entry matches anyone",
         [ap("d", src(requestPrincipals=["*"]), action="DENY")], D, "shop/d", identity=None),
    # dry run
    Case("dry-run DENY is not enforced",
         [ap("d", src(principals=[FE]), action="DENY", dry_run=True)], A, dry_run=["shop/d"]),
    Case("dry-run ALLOW alone leaves default allow",
         [ap("p", src(principals=["x/ns/y/sa/z"]), dry_run=True)], A),
    Case("dry-run ALLOW reported, enforced ALLOW decides",
         [ap("p", src(principals=[FE]), dry_run=True), ap("q", to(ports=["1"]))], D,
         dry_run=["shop/p"]),
    # scope
    Case("root namespace policy applies mesh-wide",
         [ap("g", to(ports=["1"]), ns="istio-system")], D),
    Case("root namespace selector applies to other namespaces",
         [ap("g", to(ports=["1"]), ns="istio-system", selector={"app": "db"})], D),
    Case("root namespace selector must match labels",
         [ap("g", to(ports=["1"]), ns="istio-system", selector={"app": "web"})], A),
    Case("other namespace's policy does not apply", [ap("p", to(ports=["1"]), ns="tools")], A),
    Case("other namespace's selector policy does not apply",
         [ap("p", to(ports=["1"]), ns="tools", selector={"app": "db"})], A),
    Case("selector must match all labels",
         [ap("p", to(ports=["1"]), selector={"app": "db", "tier": "web"})], A),
    Case("selector subset of labels applies",
         [ap("p", to(ports=["1"]), selector={"tier": "data"})], D),
    Case("configurable root namespace",
         [ap("g", to(ports=["1"]), ns="mesh-root")], D, root_namespace="mesh-root"),
    Case("istio-system is plain when root is elsewhere",
         [ap("g", to(ports=["1"]), ns="istio-system")], A, root_namespace="mesh-root"),
    Case("waypoint (targetRefs) policy is not enforced",
         [ap("w", to(ports=["1"]), targetRefs=[{"kind": "Gateway", "group":
                                                "gateway.networking.k8s.io", "name": "wp"}])],
         A),
    # PeerAuthentication
    Case("STRICT rejects plaintext", [], D, "shop/s", identity=None,
         peer_auth=[pa("s", "shop", "STRICT")]),
    Case("STRICT admits mTLS", [], A, peer_auth=[pa("s", "shop", "STRICT")]),
    Case("mesh STRICT", [], D, "istio-system/m", identity=None,
         peer_auth=[pa("m", "istio-system", "STRICT")]),
    Case("namespace PERMISSIVE overrides mesh STRICT", [], A, identity=None,
         peer_auth=[pa("m", "istio-system", "STRICT"), pa("n", "shop", "PERMISSIVE")]),
    Case("namespace UNSET inherits mesh STRICT", [], D, "istio-system/m", identity=None,
         peer_auth=[pa("m", "istio-system", "STRICT"), pa("n", "shop", None)]),
    Case("workload DISABLE overrides namespace STRICT", [], A, identity=None,
         peer_auth=[pa("n", "shop", "STRICT"), pa("w", "shop", "DISABLE", {"app": "db"})]),
    Case("port-level PERMISSIVE exception", [], A, identity=None,
         peer_auth=[pa("w", "shop", "STRICT", {"app": "db"}, ports={5432: "PERMISSIVE"})]),
    Case("port-level exception is per port", [], D, "shop/w", identity=None, port=8080,
         peer_auth=[pa("w", "shop", "STRICT", {"app": "db"}, ports={5432: "PERMISSIVE"})]),
    Case("port-level STRICT in a PERMISSIVE namespace", [], D, "shop/w", identity=None,
         peer_auth=[pa("w", "shop", None, {"app": "db"}, ports={5432: "STRICT"})]),
    Case("oldest namespace PeerAuthentication wins", [], A, identity=None,
         peer_auth=[pa("b", "shop", "STRICT", created="2024-02-01T00:00:00Z"),
                    pa("a", "shop", "PERMISSIVE", created="2024-01-01T00:00:00Z")]),
    Case("other namespace's STRICT does not apply", [], A, identity=None,
         peer_auth=[pa("s", "tools", "STRICT")]),
    Case("STRICT plus ALLOW: mTLS still needs a matching rule", [ap("p", to(ports=["1"]))], D,
         peer_auth=[pa("s", "shop", "STRICT")]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_scenario(case: Case) -> None:
    conn = Connection(src_ip=ipaddress.ip_address(case.src_ip), src_identity=case.identity,
                      dst=case.dst, dst_ip=ipaddress.ip_address(case.dst_ip), dst_port=case.port)
    ps = PolicySet(tuple(case.policies), tuple(case.peer_auth), case.root_namespace)
    decision = evaluate(ps, conn)
    assert decision.verdict is case.verdict, decision.reason
    if case.decided_by is not None:
        assert decision.policy == case.decided_by, decision.reason
    if case.rule is not None:
        assert decision.rule == case.rule, decision.reason
    assert [m.policy for m in decision.dry_run] == case.dry_run


def test_plain_policy_list_is_accepted() -> None:
    conn = Connection(ip("10.251.0.10"), FRONTEND, DB, ip("10.251.1.10"), 5432)
    assert evaluate([ap("p", to(ports=["1"]))], conn).verdict is PolicyVerdict.DENY


def test_reasons_name_the_outcome() -> None:
    conn = Connection(ip("10.251.0.10"), FRONTEND, DB, ip("10.251.1.10"), 5432)
    assert "allowed by default" in evaluate([], conn).reason
    denied = evaluate([ap("d", {}, action="DENY")], conn)
    assert denied.reason == "explicitly denied by shop/d rule 0"
    assert denied.policy_kind == "AuthorizationPolicy"
    none = evaluate([ap("a", to(ports=["1"])), ap("b", to(ports=["2"]))], conn)
    assert none.reason == "ALLOW policies exist (shop/a, shop/b), but none allowed this connection"
    assert none.policy is None and none.rule is None
    strict = evaluate(PolicySet((), (pa("s", "shop", "STRICT"),)),
                      Connection(ip("10.1.1.1"), None, DB, ip("10.251.1.10"), 5432))
    assert strict.policy_kind == "PeerAuthentication" and "STRICT" in strict.reason


def test_dry_run_match_records_action_and_rule() -> None:
    conn = Connection(ip("10.251.0.10"), FRONTEND, DB, ip("10.251.1.10"), 5432)
    d = evaluate([ap("d", to(ports=["1"]), {}, action="DENY", dry_run=True)], conn)
    assert d.allowed
    assert [(m.policy, m.action.value, m.rule) for m in d.dry_run] == [("shop/d", "DENY", 1)]
