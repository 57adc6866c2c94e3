"""The incremental policy compile equals the full one for randomized change sequences, and
evaluates only the destinations a change can affect (issue #14)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.datapath.identities import IdentityTable
from agent.datapath.layouts import PolicyEntry, PolicyKey
from agent.datapath.policymap import CompiledPolicy, PolicyCompiler
from agent.model.mesh import Labels, Workload
from agent.policy.authz import AuthorizationPolicy, parse_authorization_policy
from agent.policy.evaluator import PolicySet
from agent.policy.peerauth import PeerAuthentication, parse_peer_authentication

pytestmark = pytest.mark.unit

APPS = ("web", "db", "cache")
WORKLOADS = [Workload(f"w{i}", ns, sa, (ipaddress.ip_address(f"10.251.0.{10 + i}"),), "node0",
                      Labels({"app": APPS[i % 3]}))
             for i, (ns, sa) in enumerate([("shop", "web"), ("shop", "db"), ("tools", "default"),
                                           ("shop", "cache"), ("tools", "debug")])]


def _authz(i: int, ns: str, app: str | None, action: str, src: dict[str, Any],  # noqa: PLR0917
           port: str | None) -> AuthorizationPolicy:
    rule: dict[str, Any] = {"from": [{"source": src}]}
    if port:
        rule["to"] = [{"operation": {"ports": [port]}}]
    spec: dict[str, Any] = {"action": action, "rules": [rule]}
    if app:
        spec["selector"] = {"matchLabels": {"app": app}}
    return parse_authorization_policy({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": f"a{i}", "namespace": ns}, "spec": spec})


def _peer(i: int, ns: str, app: str | None, mode: str,
          port_mode: str | None) -> PeerAuthentication:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if app:
        spec["selector"] = {"matchLabels": {"app": app}}
        if port_mode:
            spec["portLevelMtls"] = {"5432": {"mode": port_mode}}
    return parse_peer_authentication({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": f"p{i}", "namespace": ns}, "spec": spec})


sources = st.sampled_from([{"principals": ["cluster.local/ns/shop/sa/web"]},
                           {"namespaces": ["tools"]}, {"ipBlocks": ["10.251.0.0/28"]},
                           {"notIpBlocks": ["10.0.0.0/8"]}, {"principals": ["*"]}])
apps = st.sampled_from([None, *APPS])
namespaces = st.sampled_from(["shop", "tools", "istio-system"])
authz = st.builds(_authz, st.integers(0, 5), namespaces, apps, st.sampled_from(["ALLOW", "DENY"]),
                  sources, st.sampled_from([None, "8080", "5432"]))
peer = st.builds(_peer, st.integers(0, 2), namespaces, apps,
                 st.sampled_from(["STRICT", "PERMISSIVE", "UNSET"]),
                 st.sampled_from([None, "STRICT", "PERMISSIVE"]))
# One change: put or drop a policy (same name replaces), relabel, or add/remove a workload.
change = st.one_of(
    st.tuples(st.just("authz"), authz), st.tuples(st.just("drop-authz"), st.integers(0, 5)),
    st.tuples(st.just("peer"), peer), st.tuples(st.just("drop-peer"), st.integers(0, 2)),
    st.tuples(st.just("label"), st.integers(0, len(WORKLOADS) - 1), st.sampled_from(APPS)),
    st.tuples(st.just("toggle"), st.integers(0, len(WORKLOADS) - 1)),
)


def _normalized(c: CompiledPolicy) -> dict[PolicyKey, tuple[object, ...]]:
    """Entries with policy ids as names: two compilers number policies in their own order."""
    def norm(e: PolicyEntry) -> tuple[object, ...]:
        return (e.verdict, e.reason, c.policy_names.get(e.policy, e.policy), e.rule)
    return {k: norm(e) for k, e in c.entries.items()}


@settings(max_examples=60, deadline=None)
@given(st.lists(change, min_size=1, max_size=12))
def test_incremental_equals_full_for_random_change_sequences(changes: list[Any]) -> None:
    table = IdentityTable()
    incremental, full = PolicyCompiler(table), PolicyCompiler(table)
    policies: dict[str, AuthorizationPolicy] = {}
    peers: dict[str, PeerAuthentication] = {}
    workloads = {w.uid: w for w in WORKLOADS[:3]}
    for ch in [("none",), *changes]:
        match ch:
            case ("authz", p):
                policies[p.key] = p
            case ("drop-authz", i):
                policies = {k: p for k, p in policies.items() if p.name != f"a{i}"}
            case ("peer", p):
                peers[p.key] = p
            case ("drop-peer", i):
                peers = {k: p for k, p in peers.items() if p.name != f"p{i}"}
            case ("label", i, app):
                w = WORKLOADS[i]
                if w.uid in workloads:
                    workloads[w.uid] = Workload(w.name, w.namespace, w.service_account, w.ips,
                                                w.node, Labels({"app": app}))
            case ("toggle", i):
                w = WORKLOADS[i]
                if workloads.pop(w.uid, None) is None:
                    workloads[w.uid] = w
        ps = PolicySet(tuple(policies.values()), tuple(peers.values()))
        got = incremental.compile(ps, list(workloads.values()))
        want = full.compile(ps, list(workloads.values()), full=True)
        assert _normalized(got) == _normalized(want), ch
        assert got.cidrs == want.cidrs
        assert set(got.groups) == set(want.groups)


def test_an_unrelated_change_evaluates_nothing_and_a_relabel_only_that_pod() -> None:
    compiler = PolicyCompiler(IdentityTable())
    ps = PolicySet((_authz(0, "shop", "db", "ALLOW", {"namespaces": ["shop"]}, "5432"),))
    first = compiler.compile(ps, WORKLOADS)
    assert sorted(first.recompiled) == sorted(w.uid for w in WORKLOADS)
    again = compiler.compile(ps, WORKLOADS)
    assert again.recompiled == [] and all(again.groups[u] is first.groups[u] for u in first.groups)
    w = WORKLOADS[0]
    moved = Workload(w.name, w.namespace, w.service_account, w.ips, w.node, Labels({"app": "db"}))
    relabelled = compiler.compile(ps, [moved, *WORKLOADS[1:]])
    assert relabelled.recompiled == [w.uid]
    assert relabelled.groups[w.uid] != first.groups[w.uid]  # now selected by the db policy
