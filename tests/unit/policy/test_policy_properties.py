"""Randomized checks of the evaluator: against a direct reading of Istio's documented semantics
on the raw policy documents, and the soundness of the partitioning helpers the kernel compiler
relies on."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.identity.spiffe import Identity
from agent.model.mesh import Labels, Workload
from agent.policy.authz import parse_authorization_policy
from agent.policy.connection import Connection
from agent.policy.evaluator import (
    PolicySet,
    depends_on_source_identity,
    depends_on_source_ip,
    evaluate,
    referenced_cidrs,
    referenced_ports,
)
from agent.policy.peerauth import parse_peer_authentication
from agent.policy.strmatch import MatchKind, StringMatch

DB = Workload("db", "shop", "db", (ipaddress.ip_address("10.251.1.10"),), "node1",
              Labels({"app": "db"}))
IDENTITIES = [Identity("cluster.local", "shop", "frontend"),
              Identity("cluster.local", "shop", "backend"),
              Identity("cluster.local", "tools", "default"),
              Identity("example.org", "shop", "frontend"), None]
SRC_IPS = ["10.251.0.10", "10.251.1.11", "10.9.0.1", "192.168.1.1"]
PORTS = [5432, 8080, 22]
UNREFERENCED_PORTS = [9999, 40000]

principals = st.sampled_from(["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/shop/*",
                              "*/sa/default", "*", "cluster.local/ns/tools/sa/default",
                              "example.org/*"])
namespaces = st.sampled_from(["shop", "tools", "t*", "*", "*op"])
blocks = st.sampled_from(["10.251.0.0/24", "10.251.1.11", "10.0.0.0/8", "10.251.1.0/24"])
ports = st.sampled_from([str(p) for p in PORTS])


def _opt(key: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), st.lists(values, min_size=1, max_size=2).map(
        lambda v: {key: v}))


def _merged(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def merge(ds: tuple[dict[str, Any], ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in ds:
            out.update(d)
        return out
    return st.tuples(*parts).map(merge)


source = _merged(_opt("principals", principals), _opt("notPrincipals", principals),
                 _opt("namespaces", namespaces), _opt("notNamespaces", namespaces),
                 _opt("ipBlocks", blocks), _opt("notIpBlocks", blocks)).filter(bool)
operation = _merged(_opt("ports", ports), _opt("notPorts", ports)).filter(bool)
condition = st.one_of(
    st.tuples(st.sampled_from(["source.ip", "destination.ip"]), blocks),
    st.tuples(st.just("destination.port"), ports),
    st.tuples(st.just("source.namespace"), namespaces),
    st.tuples(st.just("source.principal"), principals),
).flatmap(lambda kv: st.sampled_from([{"key": kv[0], "values": [kv[1]]},
                                      {"key": kv[0], "notValues": [kv[1]]}]))
rule = _merged(
    st.one_of(st.just({}), st.lists(source.map(lambda s: {"source": s}), min_size=1,
                                    max_size=2).map(lambda v: {"from": v})),
    st.one_of(st.just({}), st.lists(operation.map(lambda o: {"operation": o}), min_size=1,
                                    max_size=2).map(lambda v: {"to": v})),
    st.one_of(st.just({}), st.lists(condition, min_size=1, max_size=2).map(
        lambda v: {"when": v})))
def _policy(action: str, rules: list[dict[str, Any]], ns: str, dry: bool) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": ns,
                     "annotations": {"istio.io/dry-run": "true" if dry else "false"}},
        "spec": {"action": action, "rules": rules}}


policy_doc = st.builds(_policy, st.sampled_from(["ALLOW", "DENY"]), st.lists(rule, max_size=3),
                       st.sampled_from(["shop", "istio-system"]), st.booleans())


def _named(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**d, "metadata": {**d["metadata"], "name": f"p{i}"}} for i, d in enumerate(ds)]


policy_docs = st.lists(policy_doc, max_size=4).map(_named)
connection = st.builds(
    lambda ident, ip, port: Connection(ipaddress.ip_address(ip), ident, DB,
                                       ipaddress.ip_address("10.251.1.10"), port),
    st.sampled_from(IDENTITIES), st.sampled_from(SRC_IPS), st.sampled_from(PORTS))


# -- the oracle: Istio's AuthorizationPolicy documentation, read literally ----------------------

def _str(pattern: str, value: str) -> bool:
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _ip(block: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip in ipaddress.ip_network(block, strict=False)


def _oracle(docs: list[dict[str, Any]], c: Connection) -> bool:
    principal = c.src_identity.principal if c.src_identity else ""
    namespace = c.src_identity.namespace if c.src_identity else ""

    def field_ok(d: dict[str, Any], key: str, test: Any) -> bool:
        # "key" lists: any value matches; "notKey" lists: no value matches.
        if key in d and not any(test(v) for v in d[key]):
            return False
        neg = "not" + key[0].upper() + key[1:]
        return not (neg in d and any(test(v) for v in d[neg]))

    def source_ok(s: dict[str, Any]) -> bool:
        return (field_ok(s, "principals", lambda p: _str(p, principal))
                and field_ok(s, "namespaces", lambda n: _str(n, namespace))
                and field_ok(s, "ipBlocks", lambda b: _ip(b, c.src_ip)))

    def operation_ok(o: dict[str, Any]) -> bool:
        return field_ok(o, "ports", lambda p: int(p) == c.dst_port)

    def condition_ok(w: dict[str, Any]) -> bool:
        tests: dict[str, Callable[[str], bool]] = {
            "source.ip": lambda v: _ip(v, c.src_ip),
            "destination.ip": lambda v: _ip(v, c.dst_ip),
            "destination.port": lambda v: int(v) == c.dst_port,
            "source.namespace": lambda v: _str(v, namespace),
            "source.principal": lambda v: _str(v, principal)}
        test = tests[w["key"]]
        return field_ok(w, "values", test) if "values" in w else not any(
            test(v) for v in w["notValues"])

    def rule_ok(r: dict[str, Any]) -> bool:
        # "A match occurs when at least one source, one operation and all conditions matches."
        return ((not r.get("from") or any(source_ok(x["source"]) for x in r["from"]))
                and (not r.get("to") or any(operation_ok(x["operation"]) for x in r["to"]))
                and all(condition_ok(w) for w in r.get("when", [])))

    live = [d for d in docs if d["metadata"]["annotations"]["istio.io/dry-run"] != "true"]
    denies = [d for d in live if d["spec"]["action"] == "DENY"]
    allows = [d for d in live if d["spec"]["action"] == "ALLOW"]
    if any(rule_ok(r) for d in denies for r in d["spec"]["rules"]):
        return False
    return not allows or any(rule_ok(r) for d in allows for r in d["spec"]["rules"])


@settings(max_examples=300, deadline=None)
@given(policy_docs, connection)
def test_evaluator_agrees_with_istio_semantics(docs: list[dict[str, Any]], conn: Connection
                                               ) -> None:
    policies = [parse_authorization_policy(d) for d in docs]
    assert evaluate(policies, conn).allowed == _oracle(docs, conn)


# -- partitioning helpers ----------------------------------------------------------------------

peer_auths = st.lists(st.builds(
    lambda i, mode, port_mode: parse_peer_authentication({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": f"pa{i}", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": mode},
                 **({"portLevelMtls": {5432: {"mode": port_mode}}} if port_mode else {})}}),
    st.integers(0, 3), st.sampled_from(["STRICT", "PERMISSIVE", "UNSET"]),
    st.sampled_from([None, "STRICT", "PERMISSIVE"])), max_size=1)


@settings(max_examples=200, deadline=None)
@given(policy_docs, peer_auths, connection)
def test_partitions_are_sound(docs: list[dict[str, Any]], pas: list[Any],
                              conn: Connection) -> None:
    ps = PolicySet(tuple(parse_authorization_policy(d) for d in docs), tuple(pas))
    verdict = evaluate(ps, conn).verdict

    def with_(**kw: Any) -> Connection:
        fields = {"src_ip": conn.src_ip, "src_identity": conn.src_identity, "dst": conn.dst,
                  "dst_ip": conn.dst_ip, "dst_port": conn.dst_port, **kw}
        return Connection(**fields)

    if conn.dst_port not in referenced_ports(ps, DB):
        for p in UNREFERENCED_PORTS:
            assert evaluate(ps, with_(dst_port=p)).verdict is verdict
    if not depends_on_source_ip(ps, DB):
        assert not referenced_cidrs(ps, DB).source
        for ip in SRC_IPS:
            assert evaluate(ps, with_(src_ip=ipaddress.ip_address(ip))).verdict is verdict
    if not depends_on_source_identity(ps, DB):
        for ident in IDENTITIES:
            assert evaluate(ps, with_(src_identity=ident)).verdict is verdict


# -- string matching ---------------------------------------------------------------------------

text = st.text(alphabet="abc/.-", max_size=8)


@given(text.filter(bool))
def test_string_match_round_trips(value: str) -> None:
    for pattern in (value, value + "*", "*" + value, "*"):
        assert str(StringMatch.parse(pattern)) == pattern


@given(text.filter(bool), text)
def test_prefix_and_suffix(fixed: str, rest: str) -> None:
    assert StringMatch.parse(fixed + "*").matches(fixed + rest)
    assert StringMatch.parse("*" + fixed).matches(rest + fixed)
    assert StringMatch.parse(fixed).matches(fixed + rest) == (rest == "")
    assert StringMatch.parse("*").kind is MatchKind.PRESENCE
    assert not StringMatch.parse(fixed + "*").matches(None)


_PEERS = [None, *(Identity("cluster.local", ns, sa) for ns in ("a", "b") for sa in ("x", "y"))]
_SOURCES = [
    {"principals": ["cluster.local/ns/a/sa/x"]},
    {"principals": ["cluster.local/ns/a/sa/y", "cluster.local/ns/b/sa/x"]},
    {"principals": ["cluster.local/ns/b/*"]},
    {"principals": ["cluster.local/ns/a/sa/x"], "namespaces": ["b"]},
    {"notPrincipals": ["cluster.local/ns/a/sa/x"]},
    {"namespaces": ["a"]},
    {"ipBlocks": ["10.0.0.0/8"]},
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(_SOURCES), max_size=2),
                          st.sampled_from([None, [80], [81]])), max_size=8),
       st.sampled_from(_PEERS), st.sampled_from([80, 81]))
def test_the_principal_index_finds_the_first_matching_rule(
        rules: list[tuple[list[dict[str, Any]], list[int] | None]],
        peer: Identity | None, port: int) -> None:
    spec_rules: list[dict[str, Any]] = []
    for sources, ports in rules:
        rule: dict[str, Any] = {}
        if sources:
            rule["from"] = [{"source": s} for s in sources]
        if ports is not None:
            rule["to"] = [{"operation": {"ports": [str(p) for p in ports]}}]
        spec_rules.append(rule)
    policy = parse_authorization_policy({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "a"}, "spec": {"rules": spec_rules}})
    dst = Workload("d", "a", "d", (ipaddress.ip_address("10.1.0.2"),))
    conn = Connection(ipaddress.ip_address("10.1.0.1"), peer, dst, dst.ips[0], port)
    linear = next((r.index for r in policy.rules if r.matches(conn)), None)
    assert policy.matching_rule(conn) == linear
