"""Parsing Istio policy documents: what is accepted, what is rejected and how errors read."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from agent.model.fields import FieldError
from agent.model.mesh import Labels, Workload
from agent.policy.authz import Action, Scope, parse_authorization_policy
from agent.policy.evaluator import (
    PolicySet,
    depends_on_source_identity,
    depends_on_source_ip,
    referenced_cidrs,
    referenced_ports,
)
from agent.policy.peerauth import MtlsMode, MtlsResolver, parse_peer_authentication

BASE: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "p", "namespace": "shop"},
    "spec": {"action": "ALLOW", "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/a"]}}],
        "to": [{"operation": {"ports": ["8080"]}}],
        "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
    }]},
}
DB = Workload("db", "shop", "db", (ipaddress.ip_address("10.251.1.10"),), "node1",
              Labels({"app": "db"}))


def doc(**changes: Any) -> dict[str, Any]:
    """BASE with changes at dotted paths ("spec.rules.0.from.0.source.principals.1": value)."""
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = d
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return d


def error(d: dict[str, Any]) -> str:
    with pytest.raises(FieldError) as info:
        parse_authorization_policy(d)
    return str(info.value)


def test_v1beta1_and_defaults() -> None:
    d = doc(apiVersion="security.istio.io/v1beta1")
    del d["spec"]["action"]
    del d["metadata"]["namespace"]
    p = parse_authorization_policy(d)
    assert p.action is Action.ALLOW and p.namespace == "default" and not p.dry_run
    assert p.scope() is Scope.NAMESPACE and p.key == "default/p"


def test_scope() -> None:
    assert parse_authorization_policy(doc(metadata={"name": "g", "namespace": "istio-system"})
                                      ).scope() is Scope.GLOBAL
    sel = doc(spec__selector={"matchLabels": {"app": "db"}})
    assert parse_authorization_policy(sel).scope() is Scope.WORKLOAD_SELECTOR
    empty = doc(spec__selector={"matchLabels": {}})
    assert parse_authorization_policy(empty).scope() is Scope.NAMESPACE


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_audit_and_custom_are_rejected(action: str) -> None:
    msg = error(doc(spec__action=action))
    assert msg.startswith("spec.action: ")
    assert "not supported by ztunnel-style L4 enforcement" in msg


@pytest.mark.parametrize(("change", "expected"), [
    ({"spec__action": "REJECT"}, "spec.action: 'REJECT': want ALLOW or DENY"),
    ({"spec__provider": {"name": "x"}}, "spec.provider: provider is only valid with action CUSTOM"),
    ({"apiVersion": "security.istio.io/v2"}, "apiVersion: 'security.istio.io/v2': want one of"),
    ({"kind": "PeerAuthentication"}, "kind: want AuthorizationPolicy"),
    ({"spec__rules__0__from__0__source__principals": ["a", "b*c"]},
     "spec.rules[0].from[0].source.principals[1]: 'b*c': '*' is allowed only alone"),
    ({"spec__rules__0__from__0__source__principals": ["*a*"]}, "principals[0]: '*a*'"),
    ({"spec__rules__0__from__0__source__principals": [""]}, "principals[0]: must not be empty"),
    ({"spec__rules__0__from__0__source__principals": "x"}, "principals: want a list, got string"),
    ({"spec__rules__0__from__0__source__ipBlocks": ["10.0.0.300/8"]},
     "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.300/8' is not an IP address or CIDR"),
    ({"spec__rules__0__to__0__operation__ports": ["80", "http"]},
     "spec.rules[0].to[0].operation.ports[1]: want a port number, got 'http'"),
    ({"spec__rules__0__to__0__operation__ports": ["70000"]}, "port 70000 is out of range"),
    ({"spec__rules__0__from__0__source__principal": ["x"]},
     "spec.rules[0].from[0].source.principal: unknown field"),
    ({"spec__rules__0__from__0": {"source": {}}},
     "spec.rules[0].from[0].source: must set at least one field"),
    ({"spec__rules__0__from__0": {}}, "spec.rules[0].from[0].source: required field is missing"),
    ({"spec__rules__0__to__0": {"operation": None}}, "to[0].operation: required field is missing"),
    ({"spec__rules__0__when__0": {"key": "source.ip"}}, "when[0]: set values or notValues"),
    ({"spec__rules__0__when__0__key": "source.port"},
     "spec.rules[0].when[0].key: 'source.port' is not an Istio condition key"),
    ({"spec__rules__0__when__0__values": ["nope"]}, "when[0].values[0]: 'nope' is not an IP"),
    ({"spec__rules__0__from__0__source__serviceAccounts": ["shop"]},
     "serviceAccounts[0]: 'shop': want <namespace>/<service account>"),
    ({"spec__rules__0__bogus": 1}, "spec.rules[0].bogus: unknown field"),
    ({"spec__rule": []}, "spec.rule: unknown field"),
    ({"metadata__annotations": {"istio.io/dry-run": "yes"}},
     "metadata.annotations.istio.io/dry-run: 'yes': want \"true\" or \"false\""),
    ({"metadata__labels": {"n": 1}}, "metadata.labels.n: want a string value (quote it)"),
    ({"metadata": {"namespace": "x"}}, "metadata.name: required field is missing"),
])
def test_invalid_policies(change: dict[str, Any], expected: str) -> None:
    assert expected in error(doc(**change))


def test_kubernetes_metadata_and_status_are_accepted() -> None:
    d = doc(metadata={"name": "p", "namespace": "shop", "uid": "x", "resourceVersion": "12",
                      "generation": 3, "creationTimestamp": "2024-01-01T00:00:00Z",
                      "managedFields": [{}], "annotations": {"kubectl.kubernetes.io/x": "{}"}},
            status={"conditions": []})
    assert parse_authorization_policy(d).name == "p"


def test_dry_run_annotation() -> None:
    for value, expected in (("true", True), ("True", True), ("1", True), ("false", False)):
        d = doc(metadata={"name": "p", "namespace": "shop",
                          "annotations": {"istio.io/dry-run": value}})
        assert parse_authorization_policy(d).dry_run is expected


def test_l7_allow_warns_with_policy_and_field() -> None:
    d = doc(spec__rules__0__to__0__operation={"ports": ["80"], "methods": ["GET"]})
    p = parse_authorization_policy(d)
    assert p.rules[0].never_matches
    (w,) = p.warnings
    assert w.startswith("AuthorizationPolicy shop/p: spec.rules[0]: ")
    assert "spec.rules[0].to[0].operation.methods" in w and "never matches" in w


def test_l7_deny_warns_fail_closed() -> None:
    d = doc(spec__action="DENY",
            spec__rules__0__when__0={"key": "request.headers[x]", "values": ["1"]})
    p = parse_authorization_policy(d)
    assert not p.rules[0].never_matches
    (w,) = p.warnings
    assert "when[0].key (request.headers[x])" in w and "fail closed" in w


def test_spiffe_prefixed_principal_warns() -> None:
    d = doc(spec__rules__0__from__0__source__principals=["spiffe://cluster.local/ns/a/sa/b"])
    (w,) = parse_authorization_policy(d).warnings
    assert "principals[0]" in w and "without 'spiffe://'" in w


def test_waypoint_policy_warns_and_never_applies() -> None:
    d = doc(spec__targetRefs=[{"kind": "Gateway", "name": "wp"}])
    p = parse_authorization_policy(d)
    assert p.targets_waypoint and not p.applies_to(DB)
    assert "spec.targetRefs" in p.warnings[0]


# -- PeerAuthentication ------------------------------------------------------------------------

def peer(spec: dict[str, Any], ns: str = "shop", name: str = "pa") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def test_peer_authentication_parse_and_resolve() -> None:
    p = parse_peer_authentication(peer({"selector": {"matchLabels": {"app": "db"}},
                                        "mtls": {"mode": "PERMISSIVE"},
                                        "portLevelMtls": {5432: {"mode": "STRICT"},
                                                          "9090": {"mode": "DISABLE"}}}))
    assert p.port_modes == ((5432, MtlsMode.STRICT), (9090, MtlsMode.DISABLE))
    r = MtlsResolver([p])
    assert r.mtls_mode(DB, 5432) is MtlsMode.STRICT
    assert r.mtls_mode(DB, 9090) is MtlsMode.DISABLE
    assert r.mtls_mode(DB, 80) is MtlsMode.PERMISSIVE
    assert r.strict_ports(DB) == (MtlsMode.PERMISSIVE, frozenset({5432, 9090}))
    assert MtlsResolver([]).resolve(DB, 80) == (MtlsMode.PERMISSIVE, None)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"mtls": {"mode": "strict"}}, "spec.mtls.mode: 'strict': want one of UNSET, DISABLE"),
    ({"portLevelMtls": {80: {"mode": "STRICT"}}}, "spec.portLevelMtls: portLevelMtls needs a"),
    ({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}},
     "spec.portLevelMtls.http: want a port number"),
    ({"mtls": {"mode": "STRICT", "x": 1}}, "spec.mtls.x: unknown field"),
    ({"mode": "STRICT"}, "spec.mode: unknown field"),
])
def test_invalid_peer_authentication(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_peer_authentication(peer(spec))
    assert expected in str(info.value)


# -- helpers for the kernel compiler -----------------------------------------------------------

def test_partition_helpers() -> None:
    pols = [parse_authorization_policy(BASE),
            parse_authorization_policy(doc(metadata={"name": "q", "namespace": "shop"},
                                           spec__rules__0__when__0={
                                               "key": "destination.ip",
                                               "notValues": ["10.251.1.0/24"]})),
            # dry-run and L7-dropped rules never change a verdict, so they reference nothing
            parse_authorization_policy(doc(
                metadata={"name": "dry", "namespace": "shop",
                          "annotations": {"istio.io/dry-run": "true"}},
                spec__rules__0__to__0__operation__ports=["1"])),
            parse_authorization_policy(doc(metadata={"name": "l7", "namespace": "shop"},
                                           spec__rules__0__to__0__operation={
                                               "ports": ["2"], "paths": ["/x"]}))]
    ps = PolicySet(tuple(pols))
    assert referenced_ports(ps, DB) == {8080}
    cidrs = referenced_cidrs(ps, DB)
    assert cidrs.source == {ipaddress.ip_network("10.0.0.0/8")}
    assert cidrs.destination == {ipaddress.ip_network("10.251.1.0/24")}
    assert depends_on_source_identity(ps, DB) and depends_on_source_ip(ps, DB)

    ports_only = PolicySet((parse_authorization_policy(doc(spec__rules=[
        {"to": [{"operation": {"notPorts": ["22"]}}]}])),))
    assert referenced_ports(ports_only, DB) == {22}
    assert not depends_on_source_identity(ports_only, DB)
    assert not depends_on_source_ip(ports_only, DB)

    strict = PolicySet((), (parse_peer_authentication(peer({"mtls": {"mode": "STRICT"}})),))
    assert depends_on_source_identity(strict, DB) and referenced_ports(strict, DB) == set()
    port_strict = PolicySet((), (parse_peer_authentication(peer(
        {"selector": {"matchLabels": {"app": "db"}}, "portLevelMtls": {
            5432: {"mode": "STRICT"}, 80: {"mode": "PERMISSIVE"}}})),))
    assert referenced_ports(port_strict, DB) == {5432}  # 80 is PERMISSIVE like the default
    assert depends_on_source_identity(port_strict, DB)
